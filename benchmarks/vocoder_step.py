"""Time train_vocoder.py's training step, variants side by side in one process, on synthetic audio of the real shape.

The step is the script's own `train_step` with its own models, losses and optimizers (built from the script's flags),
fed random waveforms already on the GPU, so the numbers measure the step alone: no data loading, validation or
checkpoints. Each variant is built afresh, warmed up (cuDNN autotuning and compilation happen there), then timed
over --steps steps with a device synchronisation at both ends. Printed last, as JSON: per variant, steps/s,
segments/s, FLOPs utilisation of the dense bf16 peak, peak memory allocated during the timed steps (steady state)
and during warm-up, and the warm-up time (compilation included). Step 1, where cuDNN autotunes, counts the FLOPs and
is in neither memory figure.

    python benchmarks/vocoder_step.py --variants eager,compile,compile+discbf16 [--profile eager] \
        -- --model hifigan-v1 --discriminator hifigan --train_batch_size 16 --segment_length 8192

Flags after `--` are train_vocoder.py's. Variants, joined with `+`: `eager` (no --compile), `compile` (--compile
--compile_mode default: inductor without CUDA graphs), `graphs` (--compile: CUDA graphs, the recipe's mode),
`discbf16` (--disc_precision bf16), `nolayout` (compiled graphs keep the convolutions' NCHW layout),
`nobench` (cuDNN autotuning off), `alltried` (cuDNN autotuning tries every algorithm, not the first 10: what
train_vocoder.py sets; the other variants keep cuDNN's default of 10), `cap32`
(the process may allocate at most 32 GiB, as on a 32 GB card). A variant named twice runs twice, which shows the
spread between identical runs.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_vocoder as tv  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from common.args import optimizer_kwargs  # noqa: E402
from common.optim import build_optimizer  # noqa: E402
from common.perf import FlopCount, peak_bf16_flops  # noqa: E402
from common.spectral import MelSpectrogram  # noqa: E402
from common.training import configure_torch  # noqa: E402
import side_by_side  # noqa: E402  (beside this file)


def run_variant(variant, script_argv, steps, warmup, profile):
    parts = set(variant.split("+"))
    unknown = parts - {"eager", "compile", "graphs", "discbf16", "nobench", "cap32", "nolayout", "alltried"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--train_data_dir", tmp, "--output_dir", tmp, *script_argv]
        if "compile" in parts or "graphs" in parts:
            argv += ["--compile", "--compile_mode", "reduce-overhead" if "graphs" in parts else "default"]
        if "discbf16" in parts:
            argv += ["--disc_precision", "bf16"]
        args = tv.build_parser().parse_args(argv)
    torch._dynamo.reset()
    torch._inductor.config.layout_optimization = "nolayout" not in parts
    configure_torch(args.allow_tf32)
    if "nobench" in parts:
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.benchmark_limit = 0 if "alltried" in parts else 10
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 32 * 2**30 / total) if "cap32" in parts else 1.0)
    accelerator = Accelerator(mixed_precision=args.mixed_precision or "no")
    device = accelerator.device
    torch.manual_seed(0)
    mel = tv.mel_config(args)
    generator, disc, _ = tv.build_models(args, mel, device)
    mel_fn = MelSpectrogram(mel).to(device)
    spectral = tv.SpectralLosses(args, mel).to(device)
    opt_g = build_optimizer(params=generator.parameters(), **optimizer_kwargs(args)["optimizer"])
    opt_d = build_optimizer(params=disc.parameters(), **optimizer_kwargs(args, "disc_")["optimizer"])
    if args.compile:
        tv.compile_models(generator, spectral, disc, args.compile_mode)
    generator, opt_g, disc, opt_d = accelerator.prepare(generator, opt_g, disc, opt_d)
    batches = [torch.randn(args.train_batch_size, args.segment_length, device=device).clamp_(-1, 1) * 0.5
               for _ in range(4)]  # rotated, so no step sees the same input twice in a row

    def step(i):
        return tv.train_step(batches[i % len(batches)], generator, disc, mel_fn, spectral, opt_g, opt_d, accelerator,
                             args, step=i)

    with FlopCount() as counter:
        step(0)
    flops = counter.total
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(1, warmup):
        out = step(i)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    warmup_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        out = step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "steps_per_s": round(steps / elapsed, 3),
        "segments_per_s": round(steps * args.train_batch_size / elapsed, 1),
        "mfu_bf16_peak": round(flops * steps / elapsed / peak_bf16_flops(), 4) if peak_bf16_flops() else None,
        "step_tflop": round(flops / 1e12, 3),
        "peak_gib_steady": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
        "peak_gib_warmup": round(warmup_peak, 2),
        "warmup_s": round(warmup_s, 1),
        "loss_mel": round(float(out["loss/mel"]), 4),
    }
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            start = time.perf_counter()
            for i in range(5):
                step(warmup + steps + i)
            torch.cuda.synchronize()
            result["wall_ms_per_step_profiled"] = round((time.perf_counter() - start) / 5 * 1000, 2)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        print(f"---- profile of 5 steps, {variant}\n{table}", flush=True)
        convs = [e for e in prof.key_averages(group_by_input_shape=True)
                 if e.key in ("aten::cudnn_convolution", "aten::convolution_backward")]
        convs.sort(key=lambda e: -e.device_time_total)
        print("---- convolutions by input shape (ms per step, calls per step, input/weight shapes)")
        for e in convs[:30]:
            print(f"{e.device_time_total / 5000:7.2f} {e.count // 5:3d} {e.key[6:]:22s} {e.input_shapes[:2]}")
        kernels = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
        result["kernel_ms_per_step"] = round(kernels / 5 / 1000, 2)
    return result


if __name__ == "__main__":
    side_by_side.main(run_variant, __doc__.split("\n\n")[0], "eager,compile,compile+discbf16", steps=100, warmup=20)

#!/usr/bin/env python
"""Speed of train_image_vae.py's training step, variants side by side.

    python benchmarks/image_vae.py                      # all variants, 256 px, batch 16, GAN + LPIPS + R1 on
    python benchmarks/image_vae.py --variants default compile --resolution 512 --batch 8

Each variant runs in a fresh process: the script's own models and `train_step` on random images already on the
GPU (data loading is measured separately, by a real run), warm-up steps first (compilation included), then
timed steps between CUDA synchronisations. FLOPs are counted by torch's FlopCounterMode on one eager step of each
kind (with and without the lazy R1 penalty) and averaged over the R1 interval; MFU is against the GPU's dense bf16
peak (common/perf.py). LPIPS runs with a random VGG backbone: the same cost as the ImageNet one.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "default": [],  # what the script does by default on a GPU: bf16, channels_last, fused AdamW
    "compile": ["--compile"],
    "no-channels-last": ["--no-channels_last"],
    "foreach-adamw": [],  # AdamW without the fused kernel (multi-tensor 'foreach' path)
    "fp32-tf32": ["--mixed_precision", "no"],
    "compile-no-channels-last": ["--compile", "--no-channels_last"],
}


def measure(variant, resolution, batch, model, warmup, steps, profile=False):
    import torch
    from accelerate import Accelerator

    import train_image_vae as script
    from common.discriminators import build_image_discriminator
    from common.losses import LPIPS
    from common.optim import build_optimizer
    from common.perf import FlopCount, peak_bf16_flops
    from common.training import configure_torch

    argv = ["--output_dir", "/tmp/bench", "--train_data_dir", ".", "--model", model, "--resolution", str(resolution),
            "--train_batch_size", str(batch), "--disc_start_step", "0", "--lpips_backbone", "random",
            "--mixed_precision", "bf16", *VARIANTS[variant]]
    args = script.build_parser().parse_args(argv)
    configure_torch(args.allow_tf32)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    vae = script.build_vae(script.VAE_PRESETS[model]).to(device, memory_format=fmt)
    disc = build_image_discriminator("patchgan").to(device, memory_format=fmt)
    lpips = LPIPS(pretrained_backbone=False).to(device, memory_format=fmt)
    if variant == "foreach-adamw":
        opt_vae = torch.optim.AdamW(vae.parameters(), lr=1e-4, foreach=True, fused=False)
        opt_disc = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.8, 0.99), foreach=True, fused=False)
    else:
        opt_vae = build_optimizer("adamw", vae.parameters(), lr=1e-4)
        opt_disc = build_optimizer("adamw", disc.parameters(), lr=1e-4, betas=(0.8, 0.99))
    model_t = script.VAEForTraining(vae)
    if args.compile:
        model_t.compile()
        disc.compile()
    model_t, disc, opt_vae, opt_disc = accelerator.prepare(model_t, disc, opt_vae, opt_disc)
    images = (torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1).contiguous(memory_format=fmt)

    def step(i):
        return script.train_step(images, model_t, disc, lpips, opt_vae, opt_disc, accelerator, args, i)

    for i in range(1, warmup + 1):  # step 0 (an R1 step) comes last, inside the timed window
        step(i)
    flops = {}
    for r1_step in (1, args.r1_interval):  # a plain step and an R1 step, each counted eagerly
        with FlopCount() as counter:
            step(r1_step)
        flops[r1_step == args.r1_interval] = counter.total
    per_step = (flops[False] * (args.r1_interval - 1) + flops[True]) / args.r1_interval
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - start
    if profile:  # where the time goes: the top CUDA kernels, and CPU vs GPU time per step
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(1, 6):
                step(i)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)
    peak = peak_bf16_flops()
    return {"variant": variant, "model": model, "resolution": resolution, "batch": batch,
            "precision": args.mixed_precision, "compile": args.compile, "channels_last": args.channels_last,
            "steps_per_s": steps / elapsed, "images_per_s": steps * batch / elapsed,
            "gflop_per_image": per_step / batch / 1e9,
            "mfu": per_step * steps / elapsed / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model", default="kl-f8-5m")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--profile", action="store_true", help="Print a profiler table of 5 steps per variant.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    a = parser.parse_args()
    if a.one:
        result = measure(a.one, a.resolution, a.batch, a.model, a.warmup, a.steps, a.profile)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for variant in a.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--model", a.model, "--resolution", str(a.resolution),
               "--batch", str(a.batch), "--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--profile"] if a.profile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        if a.profile:
            print(f"--- {variant}\n" + "\n".join(l for l in proc.stderr.splitlines() if "|" not in l and l.strip()
                                                  and not l.startswith(("/", " ")) or "  " in l)[-6000:], flush=True)
        results.append(json.loads(lines[-1][7:]))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':18} {'img/s':>8} {'it/s':>7} {'MFU':>6} {'GFLOP/img':>10} {'peak GiB':>9}")
    base = next((r for r in results if r["variant"] == "default"), None)
    for r in results:
        ratio = f"  x{r['images_per_s'] / base['images_per_s']:.2f} vs default" if base else ""
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "   n/a"
        print(f"{r['variant']:18} {r['images_per_s']:8.1f} {r['steps_per_s']:7.2f} {mfu} {r['gflop_per_image']:10.1f} "
              f"{r['peak_mem_gib']:9.2f}{ratio}")
    if results:
        print(f"({results[0]['gpu']}, torch {results[0]['torch']}, {a.model}, {a.resolution} px, batch {a.batch}, "
              f"GAN + LPIPS + R1 every 16 steps)")


if __name__ == "__main__":
    main()

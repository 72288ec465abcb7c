"""Is a compiled audio VAE step's drift from eager rounding or an error? The GPU test's 3 steps (tiny mel VAE,
batch-normed PatchGAN, GAN from the first step) in float32 and float64, eager and compiled (with Inductor's
channels-last layout forced or not), each compared with eager float64. In float64 a correct variant agrees to
~1e-13; in float32 the GAN amplifies rounding.

    python benchmarks/audio_vae_float64_probe.py        # on a GPU
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import torch
import torch._inductor.config as ic
import train_audio_vae as script
from test_train_audio_vae import TINY
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from common.optim import build_optimizer

DEV = "cuda"
KEYS = ("loss/total", "loss/rec", "loss/kl", "loss/disc", "loss/adv", "loss/fm")


def steps(dtype, mode=None, channels_last=False, force=False, n=3):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    ic.force_layout_optimization = force
    flags = ["--compile", "--compile_mode", mode] if mode else []
    args = script.build_parser().parse_args(["--output_dir", "/tmp/unused", "--train_data_dir", ".", *TINY,
                                             "--disc_start_step", "0", "--kl_anneal_start", "0", *flags])
    args.multiscale_mel_weight = args.mrstft_weight = 0.0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    accelerator = Accelerator()
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    vae, disc = script.build_models(args, torch.device(DEV), fmt)
    vae.to(dtype), disc.to(dtype)
    model = script.VAEForTraining(vae)
    model.sample_posterior = False
    opt_vae = build_optimizer("adamw", vae.parameters(), lr=1e-3)
    opt_disc = build_optimizer("adamw", disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
    if args.compile:
        model.compile(dynamic=False, mode=args.compile_mode)
        disc.compile(dynamic=False, mode=args.compile_mode)
    model_p, disc_p, opt_vae, opt_disc = accelerator.prepare(model, disc, opt_vae, opt_disc)
    g = torch.Generator().manual_seed(1)
    read = []
    for step in range(n):
        x = torch.randn(4, 1, 24, 16, generator=g).to(DEV, dtype).contiguous(memory_format=fmt)
        if mode in ("reduce-overhead",):
            torch.compiler.cudagraph_mark_step_begin()
        out = script.train_step(x, model_p, disc_p, None, opt_vae, opt_disc, accelerator, args, step)
        read.append({k: float(out[k]) for k in KEYS})
    weights = {f"vae.{k}": v.detach().double().clone() for k, v in vae.state_dict().items() if v.is_floating_point()}
    weights.update({f"disc.{k}": v.detach().double().clone() for k, v in disc.state_dict().items() if v.is_floating_point()})
    ic.force_layout_optimization = False
    return read, weights


variants = {
    "eager f32": (torch.float32, None, False, False),
    "eager f32 channels_last": (torch.float32, None, True, False),
    "compiled f32": (torch.float32, "reduce-overhead", False, False),
    "compiled f32 forced layout": (torch.float32, "reduce-overhead", False, True),
    "compiled f64": (torch.float64, "default", False, False),
    "compiled f64 forced layout": (torch.float64, "default", False, True),
    "compiled f64 forced layout graphs": (torch.float64, "reduce-overhead", False, True),
}
ref, ref_w = steps(torch.float64)
print("eager f64", json.dumps(ref))
table = {}
for name, spec in variants.items():
    try:
        read, w = steps(*spec)
    except Exception as e:  # noqa: BLE001  (report it and go on to the next variant)
        print(name, "FAILED", repr(e)[:300]); continue
    rel = [{k.split("/")[1]: abs(r[k] - e[k]) / max(abs(e[k]), 1e-12) for k in KEYS} for r, e in zip(read, ref)]
    wmax = max(float((w[k] - ref_w[k]).abs().max()) for k in ref_w)
    table[name] = {"max_rel_per_step": [max(d.values()) for d in rel], "worst_key_step3": max(rel[-1], key=rel[-1].get),
                   "max_weight_diff": wmax}
    print(name, json.dumps(table[name]), flush=True)
print(json.dumps(table, indent=1))

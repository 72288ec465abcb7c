"""GroupNorm + SiLU, forward and backward, at the shapes of the mel audio VAE (mel-f4-5m, batch 32, 80 x 256 mels):
PyTorch's ops eager and compiled, NCHW and channels-last, and `common.group_norm`'s Triton kernels
(`--fused_group_norm`), under bf16 autocast as the training step runs them.

    python benchmarks/group_norm_bench.py [--batch 32] [--iters 50] [--device cpu]   # cpu: a quick check of the script

For each shape it prints milliseconds per forward + backward and the bandwidth that time implies for the least
traffic such a step can have (the input read twice and the output written in the forward; input, output gradient
and input gradient in the backward: five passes over a tensor of the input's size in bf16). A kernel far below the
GPU's memory bandwidth leaves time to win.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.group_norm import GroupNormSiLU, kernels_run_on  # noqa: E402

# (channels, height, width, how many the VAE's encoder + decoder have), from the mel-f4-5m preset, 16 groups
SHAPES = [(48, 80, 256, 10), (96, 40, 128, 8), (192, 20, 64, 18), (48, 40, 128, 1), (96, 80, 256, 1),
          (192, 40, 128, 1)]


# (label, compiled, channels-last, fused)
VARIANTS = [("eager NCHW", False, False, False), ("eager channels-last", False, True, False),
            ("compiled NCHW", True, False, False), ("compiled channels-last", True, True, False),
            ("fused NCHW", False, False, True), ("fused channels-last", False, True, True),
            ("fused compiled c-last", True, True, True)]


class NormAct(nn.Module):
    def __init__(self, channels, groups=16, fused=False):
        super().__init__()
        self.fused = fused
        self.norm = (GroupNormSiLU if fused else nn.GroupNorm)(groups, channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x) if self.fused else F.silu(self.norm(x))


def time_variant(module, x, iters, device):
    def step():
        x.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            y = module(x)
        y.backward(torch.ones_like(y))

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", type=str, default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (--device cpu checks the script)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch}")
    variants = [v for v in VARIANTS if not v[3] or kernels_run_on(args.device)]
    print(f"{'shape':>18s} {'x VAE':>6s} " + " ".join(f"{v[0]:>22s}" for v in variants))
    totals = [0.0] * len(variants)
    for c, h, w, count in SHAPES:
        cells = []
        for n, (_, compiled, channels_last, fused) in enumerate(variants):
            torch._dynamo.reset()
            module = NormAct(c, fused=fused).to(args.device)
            x = torch.randn(args.batch, c, h, w, device=args.device, dtype=torch.bfloat16)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            run = torch.compile(module) if compiled else module
            seconds = time_variant(run, x, args.iters, args.device)
            totals[n] += seconds * count
            gbps = 5 * x.numel() * x.element_size() / seconds / 1e9
            cells.append(f"{seconds * 1e3:8.3f} ms {gbps:6.0f} GB/s")
        print(f"{f'{c}x{h}x{w}':>18s} {count:6d} " + " ".join(f"{cell:>22s}" for cell in cells))
    print(f"{'all the VAE has':>25s} " + " ".join(f"{t * 1e3:19.2f} ms" for t in totals))


if __name__ == "__main__":
    main()

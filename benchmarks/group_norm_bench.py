"""GroupNorm + SiLU, forward and backward, at the shapes of the mel audio VAE (mel-f4-5m, batch 32, 80 x 256 mels):
eager and compiled, NCHW and channels-last, under bf16 autocast as the training step runs it.

    python benchmarks/group_norm_bench.py [--batch 32] [--iters 50] [--device cpu]   # cpu: a quick check of the script

For each shape it prints milliseconds per forward + backward and the bandwidth that time implies for the least
traffic such a step can have (the input read twice and the output written in the forward; input, output gradient
and input gradient in the backward: five passes over a tensor of the input's size in bf16). A kernel far below the
GPU's memory bandwidth leaves time to win.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# (channels, height, width, how many the VAE's encoder + decoder have), from the mel-f4-5m preset, 16 groups
SHAPES = [(48, 80, 256, 10), (96, 40, 128, 8), (192, 20, 64, 18), (48, 40, 128, 1), (96, 80, 256, 1),
          (192, 40, 128, 1)]


class NormAct(nn.Module):
    def __init__(self, channels, groups=16):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):
        return F.silu(self.norm(x))


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
    print(f"{'shape':>18s} {'x VAE':>6s} " + " ".join(f"{v:>22s}" for v in
          ("eager NCHW", "eager channels-last", "compiled NCHW", "compiled channels-last")))
    totals = [0.0] * 4
    for c, h, w, count in SHAPES:
        cells = []
        for n, (compiled, channels_last) in enumerate(((False, False), (False, True), (True, False), (True, True))):
            torch._dynamo.reset()
            module = NormAct(c).to(args.device)
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

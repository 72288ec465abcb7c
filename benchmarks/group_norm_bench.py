"""GroupNorm + SiLU, forward and backward, at the shapes of the mel audio VAE (mel-f4-5m, batch 32, 80 x 256 mels):
PyTorch's ops eager and compiled, NCHW and channels-last, and `common.group_norm`'s Triton kernels
(`--fused_group_norm`), under bf16 autocast as the training step runs them.

    python benchmarks/group_norm_bench.py [--batch 32] [--iters 50] [--device cpu]   # cpu: a quick check of the script
    python benchmarks/group_norm_bench.py --sweep 2048,4096,8192:4,8   # the fused kernels' tile sizes and warps

For each shape it prints milliseconds per forward + backward (wall time, then on a GPU the kernels' own time
from torch.profiler, which leaves out the host's launch overhead) and the bandwidth that time implies for the least
traffic such a step can have (the input read twice and the output written in the forward; input, output gradient
and input gradient in the backward: five passes over a tensor of the input's size in bf16). A kernel far below the
GPU's memory bandwidth leaves time to win.
"""

import argparse
import itertools
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
    seconds = (time.perf_counter() - start) / iters
    if device != "cuda":
        return seconds, None, {}
    # The GPU's own time: kernels only, without the host's launch overhead that the wall time above includes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        sync()
    kernels = {e.key: e.self_device_time_total / iters / 1e3 for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}
    return seconds, sum(kernels.values()) / 1e3, kernels


def sweep(args):
    """GPU time of the fused kernels over all the VAE's norms, NCHW and channels-last, per (tile elements, warps,
    channels split into tiles of a power of two or not, programs in memory order or with the samples fastest)."""
    import common.group_norm as gn

    tiles, warps = ([int(v) for v in part.split(",")] for part in args.sweep.split(":"))
    print(f"{'tile elements':>14s} {'warps':>6s} {'split':>6s} {'order':>6s} {'NCHW GPU ms':>12s} "
          f"{'channels-last GPU ms':>21s}")
    for tile, num_warps, split, order in itertools.product(tiles, warps, (False, True), (False, True)):
        gn.TILE_ELEMENTS, gn.NUM_WARPS, gn.CHANNEL_SPLIT, gn.MEMORY_ORDER = tile, num_warps, split, order
        totals = []
        for channels_last in (False, True):
            total = 0.0
            for c, h, w, count in SHAPES:
                x = torch.randn(args.batch, c, h, w, device=args.device, dtype=torch.bfloat16)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                _, kernel_seconds, _ = time_variant(NormAct(c, fused=True).to(args.device), x, args.iters,
                                                    args.device)
                total += (kernel_seconds or 0.0) * count
            totals.append(total)
        print(f"{tile:14d} {num_warps:6d} {int(split):6d} {('memory' if order else 'sample'):>6s} "
              f"{totals[0] * 1e3:12.2f} {totals[1] * 1e3:21.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", type=str, default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--kernels", action="store_true", help="list each variant's kernels and their GPU time")
    parser.add_argument("--sweep", type=str, default=None, metavar="TILES:WARPS",
                        help="only the fused kernels' GPU time at each tile size and warp count, e.g. 2048,4096:4,8")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (--device cpu checks the script)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch}")
    if args.sweep:
        return sweep(args)
    variants = [v for v in VARIANTS if not v[3] or kernels_run_on(args.device)]
    print(f"{'shape':>18s} {'x VAE':>6s} " + " ".join(f"{v[0]:>22s}" for v in variants))
    totals, kernel_totals = [0.0] * len(variants), [0.0] * len(variants)
    breakdowns = []
    for c, h, w, count in SHAPES:
        cells = []
        for n, (label, compiled, channels_last, fused) in enumerate(variants):
            torch._dynamo.reset()
            module = NormAct(c, fused=fused).to(args.device)
            x = torch.randn(args.batch, c, h, w, device=args.device, dtype=torch.bfloat16)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            run = torch.compile(module) if compiled else module
            seconds, kernel_seconds, kernels = time_variant(run, x, args.iters, args.device)
            totals[n] += seconds * count
            gbps = 5 * x.numel() * x.element_size() / seconds / 1e9
            cell = f"{seconds * 1e3:7.3f} ms {gbps:5.0f} GB/s"
            if kernel_seconds is not None:
                kernel_totals[n] += kernel_seconds * count
                cell += f" | GPU {kernel_seconds * 1e3:6.3f} ms"
                if args.kernels:
                    breakdowns.append((f"{c}x{h}x{w} {label}", kernels))
            cells.append(cell)
        print(f"{f'{c}x{h}x{w}':>18s} {count:6d} " + " ".join(f"{cell:>36s}" for cell in cells))
    print(f"{'all the VAE has (wall)':>25s} " + " ".join(f"{t * 1e3:33.2f} ms" for t in totals))
    if args.device == "cuda":
        print(f"{'all the VAE has (GPU)':>25s} " + " ".join(f"{t * 1e3:33.2f} ms" for t in kernel_totals))
    for name, kernels in breakdowns:
        print(f"kernels of {name} (ms per forward + backward):")
        for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {ms:7.3f}  {kernel[:100]}")


if __name__ == "__main__":
    main()

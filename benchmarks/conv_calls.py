"""Every convolution one training step dispatches, each replayed alone and timed: which shapes take the time, and at
what share of the GPU's bf16 peak.

    python benchmarks/conv_calls.py [--top 30] -- train_audio_vae.py ARGS --dry_run --dry_run_steps 3

The script's --dry_run builds its models, data and optimizers as training does. Two eager steps warm up (cuDNN picks
its algorithms), then a third is recorded at the operator level: each `aten.convolution` (forward) and
`aten.convolution_backward` call, with its tensors' shapes, strides and dtypes. Each distinct call is then run again
on random tensors of the same layout and timed on the GPU; the table lists them by total time per step, with
their FLOPs' rate against the bf16 peak (common.perf). Forward and backward are separate rows: a backward row is
dgrad and wgrad together, or whichever of them the step needs. The sum is the step's convolution time as cuDNN
runs these calls one by one, comparable with a profile's convolution share.
"""

import argparse
import importlib.util
import os
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.perf import DryRun, peak_bf16_flops  # noqa: E402

aten = torch.ops.aten
CONV_OPS = (aten.convolution.default, aten.convolution_backward.default)


def describe(value):
    """A hashable description of one argument: a tensor by shape, strides and dtype, anything else as itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(describe(v) for v in value)
    return value


class RecordConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONV_OPS:
            self.calls[(func, describe(args))] += 1
        return func(*args, **(kwargs or {}))


def materialise(desc, device):
    """Random tensors for a recorded call's arguments, with the recorded shapes, strides and dtypes."""
    if isinstance(desc, tuple) and desc and desc[0] == "tensor":
        _, shape, stride, dtype = desc
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return t.normal_() if t.is_floating_point() else t.zero_()
    if isinstance(desc, tuple):
        return [materialise(d, device) for d in desc]
    return desc


def label(func, desc):
    """input shape, weight shape, stride, channels-last or not, dtype; for a backward, which gradients."""
    if func is aten.convolution.default:
        x, w, stride = desc[0], desc[1], desc[3]
        kind = "fwd"
    else:
        x, w, stride = desc[1], desc[2], desc[4]
        mask = desc[10]
        kind = "bwd " + "+".join(n for n, m in zip(("dgrad", "wgrad", "bias"), mask) if m)
    layout = "NHWC" if len(x[1]) == 4 and x[2][1] == 1 and x[1][1] > 1 else "NCHW" if len(x[1]) == 4 else "NCL"
    return (f"{kind:22s} x{list(x[1])} w{list(w[1])} s{list(stride)} {layout} "
            f"{str(x[3]).replace('torch.', '')}")


def time_call(func, args, device, repeat):
    run = lambda: func(*args)  # noqa: E731
    for _ in range(3):
        run()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat / 1e3
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - start) / repeat


def report(calls, device, top, repeat):
    peak = peak_bf16_flops() if device.type == "cuda" else None
    rows = []
    for (func, desc), count in calls.items():
        args = materialise(desc, device)
        with FlopCounterMode(display=False) as flops:
            func(*args)
        seconds = time_call(func, args, device, repeat)
        rows.append((seconds * count, count, seconds, flops.get_total_flops(), label(func, desc)))
    total = sum(r[0] for r in rows)
    flops_total = sum(r[1] * r[3] for r in rows)
    lines = [f"{len(rows)} distinct convolution calls, {sum(calls.values())} per step: {total * 1e3:.2f} ms per step"
             + (f", {flops_total / total / peak:.1%} of the bf16 peak" if peak else ""),
             f"{'ms/step':>8s} {'calls':>5s} {'ms/call':>8s} {'% peak':>7s}  call"]
    for step_s, count, seconds, flop, name in sorted(rows, key=lambda r: -r[0])[:top]:
        share = f"{flop / seconds / peak:7.1%}" if peak else f"{'':7s}"
        lines.append(f"{step_s * 1e3:8.3f} {count:5d} {seconds * 1e3:8.3f} {share}  {name}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--top", type=int, default=30, help="how many calls to list, the longest first")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each call")
    parser.add_argument("script", help="the training script, then its arguments (with --dry_run)")
    args, rest = parser.parse_known_args()

    def record_one_step(self, step_fn):
        for i in range(2):  # warm-up: cuDNN's algorithm search, the allocator's pools
            step_fn(i)
        recorder = RecordConvolutions()
        with recorder:
            step_fn(2)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return report(recorder.calls, device, args.top, args.repeat)

    DryRun.run = record_one_step
    spec = importlib.util.spec_from_file_location("recorded_script", args.script)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    sys.argv = [args.script, *[a for a in rest if a != "--"]]
    script.main(script.parse_args())


if __name__ == "__main__":
    main()

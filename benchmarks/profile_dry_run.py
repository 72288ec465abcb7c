"""Where a training step's time goes on the GPU: a script's own --dry_run, then a few more steps under torch.profiler.

    python benchmarks/profile_dry_run.py [--steps 10] [--host_sync] -- train_ldm.py ARGS --dry_run --dry_run_steps 30

Prints the dry run's report, then for the profiled steps: wall time per step, the time the GPU spent in kernels
(its busy share of the wall time; the rest is the GPU waiting for the host), that kernel time by kind (matrix
multiplies, attention, fused elementwise, optimizer, ...) and the kernels that took longest. Kernels replayed
from CUDA graphs are counted like any other.

Also printed: the host-side operations that took the most CPU time (data loading, kernel launches, graph
replays), to tell a GPU-bound step from a host-bound one. Comparisons in one process and one compilation cache:

- `--host_sync`: every optimizer step decides on the host whether its gradients are finite (clip_and_step's
  synchronising path; train_rvq.py's guarded_step with defer=False) instead of on the GPU;
- `--fixed_batch`: every step trains on the first batch, so the data loader's cost drops out;
- `--diffusers_attention`: the UNet's attention runs through diffusers' own processor, without the head padding
  that lets heads of 3-6 channels use the fused kernels (common.denoisers.PaddedHeadAttnProcessor).
"""

import argparse
import importlib.util
import itertools
import re
import sys
import time
from collections import defaultdict

import torch

import common.denoisers
import common.training
from common.perf import DryRun

KINDS = [  # (kind, pattern on the kernel name), first match wins
    ("attention", r"flash|fmha|attention|softmax"),
    ("matmul", r"gemm|cutlass|sm90_|nvjet|wgmma|cublas|Kernel2|xmma"),
    ("optimizer", r"adam|FusedOptimizer"),
    ("foreach (clip, EMA)", r"multi_tensor_apply|foreach"),
    ("reduction", r"reduce|norm"),
    ("copy / cast", r"copy|Memcpy|Memset|cast|fill"),
    ("fused elementwise (triton)", r"^triton"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kind_of(name):
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_steps(step_fn, steps, first_index, top=25):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step_fn(first_index + i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages()  # name -> (us, calls)
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}
    busy = sum(us for us, _ in kernels.values()) / 1e6
    lines = [f"profiled {steps} steps: {wall / steps * 1e3:.2f} ms per step, GPU kernels {busy / steps * 1e3:.2f} ms "
             f"per step ({busy / wall:.0%} busy)"]
    by_kind = defaultdict(float)
    for name, (us, _) in kernels.items():
        by_kind[kind_of(name)] += us
    lines += [f"  {kind:28s} {us / steps / 1e3:7.2f} ms/step {us / 1e6 / busy:6.1%}"
              for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines.append("longest kernels (ms per step, launches per step, name):")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    lines += [f"  {us / steps / 1e3:7.3f} {calls / steps:6.1f}  {name[:110]}" for name, (us, calls) in top]
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    lines.append("host operations with the most CPU time, own time (ms per step, calls per step, name):")
    lines += [f"  {e.self_cpu_time_total / steps / 1e3:7.3f} {e.count / steps:6.1f}  {e.key[:110]}"
              for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:15]]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=10, help="steps to profile after the dry run")
    parser.add_argument("--top", type=int, default=25, help="how many of the longest kernels to list")
    parser.add_argument("--host_sync", action="store_true", help="decide skipped steps on the host (synchronising)")
    parser.add_argument("--fixed_batch", action="store_true", help="train every step on the first batch")
    parser.add_argument("--diffusers_attention", action="store_true",
                        help="UNet attention through diffusers' processor, heads not padded")
    parser.add_argument("script", help="the training script, then its arguments (with --dry_run)")
    args, rest = parser.parse_known_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_dry_run.py needs a CUDA GPU")

    dry_run = DryRun.run

    def run_and_profile(self, step_fn):
        lines = dry_run(self, step_fn)
        return lines + profile_steps(step_fn, args.steps, self.steps + 1, args.top)

    DryRun.run = run_and_profile
    if args.host_sync:
        deferred = common.training.clip_and_step_all
        common.training.clip_and_step_all = lambda accelerator, updates, defer=False: deferred(accelerator, updates)
    if args.diffusers_attention:
        common.denoisers.UNetDenoiser.pad_attention_heads = lambda self: None
    spec = importlib.util.spec_from_file_location("profiled_script", args.script)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    if args.host_sync and hasattr(script, "guarded_step"):
        guarded = script.guarded_step
        script.guarded_step = lambda *a, **k: guarded(*a, **{**k, "defer": False})
    if args.fixed_batch:
        batches = script.infinite_batches

        def first_batch_forever(*a, **k):
            return itertools.repeat(next(batches(*a, **k)))

        script.infinite_batches = first_batch_forever
    sys.argv = [args.script, *[a for a in rest if a != "--"]]
    script.main(script.parse_args())


if __name__ == "__main__":
    main()

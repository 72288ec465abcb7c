"""Throughput, model-FLOPs utilisation and peak memory, measured rather than guessed."""

import math
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulate) from the vendors' datasheets. MFU is always reported
# against this bf16 peak, also for fp32/TF32 runs, so figures compare across precisions.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 5090": 209.5,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_bf16_flops(device=None):
    """The device's dense bf16 peak in FLOP/s, or None when unknown (then MFU is not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


class _CountFlops(TorchDispatchMode):
    """Adds up torch's own FLOP formulas (torch.utils.flop_counter) for every operator dispatched, with
    convolution gradients counted right for grouped convolutions.

    Unlike FlopCounterMode it tracks no modules, so it also works through `torch.autograd.grad` (R1 penalties).
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket is torch.ops.aten.convolution_backward:
            self.total += _conv_backward_flops(*args)
            return out
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _conv_backward_flops(grad_output, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask):
    """Each of a convolution's input and weight gradients costs what its forward pass does. (torch's own formula
    treats a grouped convolution's gradients as ungrouped and overcounts them `groups` times.)"""
    spatial = (x if transposed else grad_output).shape[2:]
    forward = 2 * x.shape[0] * weight.numel() * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


class FlopCount:
    """Counts the FLOPs (multiply-adds x 2, forward and backward) dispatched inside a `with` block.

    The count comes from torch's per-operator formulas on the real model and inputs. The block runs eagerly:
    compiled regions would hide their operations from the counter.
    """

    def __enter__(self):
        self.stance = torch.compiler.set_stance("force_eager")
        self.stance.__enter__()
        self.mode = _CountFlops()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.stance.__exit__(*exc)
        self.total = self.mode.total
        return False


class Throughput:
    """Samples/s, steps/s, MFU and peak memory between two `measure()` calls (call it at logging steps only).

    Peak memory is per window, so the first window shows start-up transients (cuDNN tries its algorithms with
    workspaces sized to the free memory of the card) and later ones the memory the run really keeps needing."""

    def __init__(self, peak_flops=None):
        self.peak_flops = peak_flops
        self.last_time, self.samples, self.steps, self.flops = time.perf_counter(), 0, 0, 0.0

    def add(self, samples, flops=None):
        """One optimizer step of `samples` samples (all processes together) and its FLOPs if known."""
        self.samples += samples
        self.steps += 1
        if flops:
            self.flops += flops

    def measure(self):
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        out = {"perf/samples_per_s": self.samples / elapsed, "perf/steps_per_s": self.steps / elapsed}
        if self.flops and self.peak_flops:
            out["perf/mfu"] = self.flops / elapsed / self.peak_flops
        if torch.cuda.is_available():
            out["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.last_time, self.samples, self.steps, self.flops = now, 0, 0, 0.0
        return out


class DryRun:
    """`--dry_run`: a few real optimizer steps at the configured shapes, then a report, and nothing written.

    Each script builds its models, data and optimizers as for training, then calls `run(step_fn)` with a function
    that does one optimizer step (all its micro-batches) the way its loop does; the discriminator's and other
    occasional passes should be on, so the step measured is the costliest one. The report gives seconds per step
    (the mean over the steps after the first, which run back to back as in training), throughput, the time to
    --max_train_steps, peak GPU memory (the warm-up steps apart: cuDNN's autotuning takes transient workspaces then)
    and whether that fits cards of 32, 24 and 16 GB; a step that runs out of memory is reported with what to change
    instead of a traceback. `hints` are the script's own levers, most effective first.
    """

    CARDS_GIB = (32, 24, 16)

    def __init__(self, steps, samples_per_step, remaining_steps, hints, unit="samples"):
        self.steps, self.samples_per_step, self.remaining = max(2, steps), samples_per_step, remaining_steps
        self.hints, self.unit = hints, unit

    def run(self, step_fn):
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        done, first, per_step, first_peak, peak = 0, None, None, None, None
        # Warm-up steps, timed apart: compilation, autotuning, CUDA-graph recording.
        warm = max(1, min(3, self.steps // 4))
        # Memory is what the caching allocator holds from the card (reserved), not what tensors occupy (allocated):
        # replayed CUDA graphs keep their memory in private pools that the allocated figure does not count.
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            for i in range(warm):
                step_fn(i)
                done += 1
            sync()
            first = time.perf_counter() - start
            if cuda:
                first_peak = torch.cuda.max_memory_reserved() / 2**30
                torch.cuda.empty_cache()  # the warm-up's transients (autotuning workspaces) go back to the card
                torch.cuda.reset_peak_memory_stats()
            # The other steps back to back with one sync at the end, as the training loop runs them: the CPU queues
            # work ahead of the GPU, so host-side costs show only where they really stall the GPU.
            start = time.perf_counter()
            for i in range(warm, self.steps):
                step_fn(i)
                done += 1
            sync()
            per_step = (time.perf_counter() - start) / (self.steps - warm)
            if cuda:
                peak = torch.cuda.max_memory_reserved() / 2**30
            with FlopCount() as counter:  # one more step, untimed: the FLOPs the model really does per step
                step_fn(self.steps)
        except torch.cuda.OutOfMemoryError:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
            return self.report_lines(done, first, per_step, None, None, oom=total, warm=warm)
        return self.report_lines(done, first, per_step, first_peak, peak, flops=counter.total, warm=warm)

    def report_lines(self, done, first, per_step, first_peak, peak, oom=None, flops=None, warm=1):
        """`first`: seconds of the `warm` first steps (compilation, autotuning); `per_step`: mean of the others."""
        lines = [f"dry run: {done} of {self.steps} optimizer steps"]
        if oom is not None:
            card = f" on the {oom:.0f} GiB card" if oom else ""
            lines.append(f"out of memory{card} at step {done + 1}; to fit: " + "; ".join(self.hints))
            return lines
        eta = per_step * self.remaining
        firsts = "first step" if warm == 1 else f"first {warm} steps"
        lines += [f"seconds per step {per_step:.3f} ({firsts} {first:.2f}); {self.samples_per_step / per_step:.1f} "
                  f"{self.unit}/s; {self.remaining} steps to go: {eta / 3600:.1f} h"]
        if flops:
            peak_flops = peak_bf16_flops()
            mfu = f"; {flops / per_step / peak_flops:.1%} of the GPU's dense bf16 peak" if peak_flops else ""
            lines.append(f"model FLOPs per step {flops / 1e12:.3f} TFLOP{mfu}")
        if peak is None:
            lines.append("peak GPU memory: no GPU")
            return lines
        # A card of N GB holds N * 0.93 GiB; 10% headroom for the allocator's fragmentation and other processes.
        fits = [f"{card} GB: {'fits' if peak * 1.1 <= card * 0.93 else 'does not fit'}" for card in self.CARDS_GIB]
        lines.append(f"peak GPU memory {peak:.2f} GiB reserved ({firsts} {first_peak:.2f} GiB, start-up transients "
                     f"such as cuDNN's autotuning included); " + ", ".join(fits))
        if peak * 1.1 > self.CARDS_GIB[0] * 0.93:
            lines.append("to fit a 32 GB card: " + "; ".join(self.hints))
        return lines

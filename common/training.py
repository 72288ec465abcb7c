"""The small pieces of glue every training loop needs: precision flags, RNG state, guarded optimizer steps,
metric accumulation and logging. None of it is a loop; each script's loop stays in the script."""

import atexit
import contextlib
import faulthandler
import json
import logging
import math
import operator
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def configure_torch(allow_tf32=True):
    """TF32 for float32 matmuls/convolutions on GPUs that have it, and cuDNN autotuning for fixed shapes."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = torch.cuda.is_available()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # --compile_mode
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def uses_cuda_graphs(args):
    """Whether the compiled models replay as CUDA graphs (`--compile` with a `--compile_mode` that has them): each
    training step then starts with torch.compiler.cudagraph_mark_step_begin()."""
    return bool(args.compile) and args.compile_mode in CUDA_GRAPH_MODES


def compile_mode_for_accumulation(mode, accumulation_steps):
    """The torch.compile mode to use: a CUDA-graph mode falls back to its counterpart without graphs when gradients
    accumulate over several micro-batches. The first micro-batch's gradients would then live in the graphs' memory
    pool (autograd keeps the backward's output as `.grad`), and the next replay would overwrite them: the
    accumulated gradient comes out silently wrong (pytorch/pytorch#169545)."""
    if accumulation_steps > 1 and mode in CUDA_GRAPH_MODES:
        fallback = CUDA_GRAPH_MODES[mode]
        logger.warning(f"--compile_mode {mode} uses CUDA graphs, which do not accumulate gradients over "
                       f"--gradient_accumulation_steps {accumulation_steps} correctly: compiling with '{fallback}'")
        return fallback
    return mode


def setup_accelerator(args, mixed_precision):
    """The Accelerator of a training run, from the shared run flags (common/args.add_run_args): accumulation,
    precision, trackers logging under output_dir/logs, and collectives that time out after the watchdog fires;
    then logging and torch's precision flags. Each script chooses its default `mixed_precision`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # DDP's default re-broadcasts every buffer from process 0 at each forward, in place. A discriminator called on
    # real and then on generated images before one backward has its BatchNorm statistics overwritten in between,
    # and cuDNN's BatchNorm backward refuses them ("modified by an inplace operation"): the GAN scripts failed on two
    # GPUs. The buffers that matter here are constants (rotary tables) or BatchNorm's running statistics, which
    # training-mode discriminators never read, so each process keeps its own.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=report_to(args.report_to), kwargs_handlers=[ddp, *process_group_kwargs(args.stall_timeout)],
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, "logs"))))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    configure_torch(args.allow_tf32)
    return accelerator


def bf16_if_supported():
    """bf16 on GPUs that have it, full precision elsewhere (CPUs, older GPUs)."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ---------------------------------------------------------------------------------------------------------------
# RNG state, saved per process so a resumed run draws the same random numbers as an uninterrupted one.


def rng_state():
    _, py_state, gauss = random.getstate()
    state = {
        "python": {"state": list(py_state), "gauss": gauss},
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate((3, tuple(int(v) for v in state["python"]["state"]), state["python"]["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state():
    _, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain tensors and numbers only, so the file loads with torch.load(weights_only=True).
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer steps that never let a non-finite gradient reach the weights.


def clip_and_step(accelerator, optimizer, parameters, max_grad_norm, defer=False):
    """Clip to `max_grad_norm` (0: no clipping, norm still measured), then step only if the norm is finite.

    The gradients were already averaged across processes, so every process sees the same norm and skips alike,
    with no extra collective. Returns (grad_norm, stepped). Under fp16 the grad scaler decides: it skips non-finite
    steps itself and lowers its scale.

    By default `stepped` is a bool, which makes this a host sync point (one per optimizer step): the CPU waits for
    the backward pass before it can queue the next step. With `defer=True` and an optimizer whose kernel takes the
    skip decision on the GPU (torch's fused Adam/AdamW/SGD, the way GradScaler drives them), nothing waits:
    `stepped` is a bool tensor on the device, a skipped step leaves weights, moments and step counts exactly as
    they were, and the caller reads the flag later (SkipGuard does, at its next flush). Other optimizers, and fp16,
    fall back to the synchronising path.
    """
    return clip_and_step_all(accelerator, [(optimizer, parameters, max_grad_norm)], defer=defer)[0]


def skips_on_device(optimizer):
    """Whether `optimizer` (or the one an AcceleratedOptimizer wraps) can skip a step from a device flag."""
    return bool(getattr(getattr(optimizer, "optimizer", optimizer), "_step_supports_amp_scaling", False))


def clip_and_step_all(accelerator, updates, defer=False):
    """`clip_and_step` for several optimizers that step together (a GAN's generator and discriminator), with one
    host sync for all of them instead of one each (none with `defer`, see clip_and_step). `updates`: (optimizer,
    parameters, max_grad_norm) triples. Returns a (grad_norm, stepped) pair per triple, in order."""
    norms = [accelerator.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else math.inf)
             for _, parameters, max_grad_norm in updates]
    if defer and accelerator.scaler is None and all(skips_on_device(opt) for opt, _, _ in updates):
        results = []
        for (optimizer, _, _), grad_norm in zip(updates, norms):
            finite = torch.isfinite(grad_norm.detach().float())
            step_on_device(optimizer, finite)
            optimizer.zero_grad(set_to_none=True)
            results.append((grad_norm.detach(), finite))
        return results
    finite = torch.stack([torch.isfinite(n.detach().float()) for n in norms]).tolist()  # the sync point
    results = []
    for (optimizer, _, _), grad_norm, ok in zip(updates, norms, finite):
        if ok or accelerator.scaler is not None:
            optimizer.step()
        results.append((grad_norm.detach(), ok and not optimizer.step_was_skipped))
        optimizer.zero_grad(set_to_none=True)
    return results


def step_on_device(optimizer, ok):
    """`optimizer.step()`, which the GPU carries out only where the bool tensor `ok` is true: no host sync. For
    optimizers where `skips_on_device`; a skipped step leaves weights, moments and step counts as they were."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~ok).float()  # read by the fused kernel, as when GradScaler drives it
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def all_stepped(flags):
    """Whether every optimizer of one step stepped: a bool, or a device bool tensor (no sync) when any flag is one
    (clip_and_step with defer=True)."""
    flags = list(flags)
    if any(f is False for f in flags):
        return False
    tensors = [f.reshape(()) for f in flags if torch.is_tensor(f)]
    return torch.stack(tensors).all() if tensors else True


class SkipGuard:
    """Counts optimizer steps skipped for non-finite gradients; too many in a row stops the run.

    `stepped` may be a device tensor (clip_and_step with defer=True): it is then kept and read, all pending flags
    with one host sync, at the next `flush()`, which the loop calls where it logs; `state_dict()` flushes too, so a
    checkpoint counts every step before it. The run then stops at the flush after the limit was reached.
    """

    def __init__(self, max_consecutive):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.pending = []

    def update(self, stepped, step, what="optimizer", reason=None):
        """`reason`: why the step was skipped when it was not for non-finite gradients (e.g. a loss spike); a
        callable (called only for a skipped step, after its flag was read) when the decision was taken on the
        device."""
        if torch.is_tensor(stepped):
            self.pending.append((stepped.detach().reshape(()), step, what, reason))
            return
        if stepped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if callable(reason):
            reason = reason()
        logger.warning(f"step {step}: {reason or f'non-finite {what} gradients'}, update skipped "
                       f"({self.consecutive} in a row, {self.total} in all)")
        if self.consecutive >= self.max_consecutive:
            why = "were skipped (last: " + reason + ")" if reason else "had non-finite gradients"
            raise SystemExit(f"stopping: {self.consecutive} optimizer steps in a row {why} "
                             f"(--max_consecutive_skips {self.max_consecutive}); the run is diverging. The last "
                             f"checkpoint is intact: resume from it with a lower learning rate or stronger clipping.")

    def flush(self):
        """Read the flags of deferred steps (one host sync) and count them in order."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for ok, (_, step, what, reason) in zip(torch.stack([p[0] for p in pending]).tolist(), pending):
            self.update(bool(ok), step, what, reason)

    def state_dict(self):
        self.flush()
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state):
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
        self.pending = []


def freeze(model, prefixes):
    """`--freeze encoder quant_conv`: the parameters whose names start with one of `prefixes` stop training
    (requires_grad off; they stay in checkpoints, the EMA and the export). Returns the trainable parameters, for the
    optimizer. A prefix that names no parameter is refused with the model's top-level names."""
    params = list(model.named_parameters())
    if not prefixes:
        return [p for _, p in params]

    def matches(name, prefix):
        prefix = prefix.rstrip(".")
        return name == prefix or name.startswith(prefix + ".")

    tops = sorted({name.split(".")[0] for name, _ in params})
    for prefix in prefixes:
        if not any(matches(name, prefix) for name, _ in params):
            raise SystemExit(f"--freeze {prefix}: no parameter's name starts with it (the model's top-level names: "
                             f"{', '.join(tops)})")
    trainable = []
    for name, p in params:
        if any(matches(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)
        else:
            trainable.append(p)
    if not trainable:
        raise SystemExit(f"--freeze {' '.join(prefixes)} freezes every parameter: nothing would train")
    return trainable


def all_finite(tensors):
    """True if every tensor is finite (one host sync for all of them)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return bool(torch.isfinite(torch.stack(norms)).all())


@contextlib.contextmanager
def frozen(module):
    """Parameters of `module` do not require grad inside the block: a generator loss computed through a frozen
    discriminator leaves the discriminator's gradients untouched (and accumulating ones intact)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsAccumulator:
    """Sums per-step metric tensors on the device; `pop()` averages them over steps and processes.

    Only `pop()` synchronises with the host, so call it at logging steps.
    """

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics):
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self, accelerator):
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([(self.sums[k] / self.counts[k]).to(accelerator.device) for k in keys])
        means = accelerator.reduce(means, reduction="mean")
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means.tolist()))  # sync point


class MetricsFile:
    """Every logged value as one JSON line (`metrics.jsonl`), so runs compare without any service.

    On resume, lines from steps after the resumed checkpoint are dropped, keeping steps increasing.
    """

    def __init__(self, path, resume_step=None, enabled=True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _line_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.start = time.time()

    def write(self, step, values):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time() - self.start, 3), **values}) + "\n")


def write_run_info(output_dir, args, accelerator, script):
    """`run.json` beside metrics.jsonl: what this launch was (script, command line, resolved arguments, git commit,
    package versions, devices), so a run can be compared and reproduced without any service. A resumed run keeps
    the earlier launches' records under "previous_launches"."""
    if not accelerator.is_main_process:
        return
    import platform
    import subprocess
    from datetime import datetime, timezone
    from importlib import metadata

    path = Path(output_dir, "run.json")
    previous = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            previous = old.pop("previous_launches", []) + [{k: old.get(k) for k in ("started", "git", "command")}]
        except (OSError, json.JSONDecodeError):
            previous = []
    root = Path(script).resolve().parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    packages = {}
    for name in ("torch", "accelerate", "diffusers", "transformers", "safetensors", "numpy", "open_clip_torch", "wandb"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() else [])
    info = {
        "script": Path(script).name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
        "packages": packages, "python": platform.python_version(), "platform": platform.platform(),
        "devices": devices or ["cpu"], "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "args": {k: (v if isinstance(v, (int, float, str, bool, list)) or v is None else str(v))
                 for k, v in vars(args).items()},
        "previous_launches": previous,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


def _line_step(line):
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def read_metrics(path):
    """The lines of a metrics.jsonl as dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tracker_tags(args, script):
    """The tags a run gets in wandb (unless --tracker_tags names them): the script, its recipe file and model."""
    tags = [Path(script).stem]
    if getattr(args, "config", None):
        tags.append(Path(args.config).stem)
    if isinstance(getattr(args, "model", None), str):
        tags.append(args.model)
    return tags


def init_trackers(accelerator, project_name, config, run_id, output_dir, name=None, group=None, tags=None):
    """Start the trackers; with wandb the run id is fixed so a resumed run continues the same wandb run, and the
    run's name (the output folder's by default), group and tags are set so runs of one experiment sit together."""
    if not accelerator.log_with:
        return
    init_kwargs = {"wandb": {"id": run_id, "resume": "allow", "dir": str(output_dir),
                             "name": name or Path(output_dir).name, "group": group, "tags": list(tags or [])}}
    flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in config.items()}
    accelerator.init_trackers(project_name, config=flat, init_kwargs=init_kwargs)


def new_run_id():
    return uuid.uuid4().hex[:12]


def report_to(value):
    """--report_to as accelerate's `log_with`."""
    return {"none": None, "all": "all"}.get(value, [value])


# ---------------------------------------------------------------------------------------------------------------
# Unattended runs: preemption, stalls, changed settings on resume


class GracefulStop:
    """SIGTERM (a cluster preempting the job): finish the current step, checkpoint, exit 0.

    The signal only sets a flag; `requested()` is checked after every optimizer step. With several processes the
    flag is agreed by an all-reduce, so every process stops after the same step even if the signal reached them
    at different moments. The all-reduce's result is read one check later, by when it is long done: on GPUs it
    lands in pinned host memory behind an event, so no process waits for its GPU to drain at every step.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.flag = False
        self._pending = None  # (host tensor, CUDA event or None) of the last all-reduce
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True
        print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint", file=sys.stderr,
              flush=True)

    def requested(self, accelerator):
        if accelerator.num_processes == 1:
            return self.flag
        previous = self._pending
        flag = torch.full((1,), float(self.flag), device=accelerator.device)  # a fill: no copy from the host
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.is_cuda:
            host, event = torch.empty(1, pin_memory=True), torch.cuda.Event()
            host.copy_(flag, non_blocking=True)
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (flag, None)
        if previous is None:
            return False
        host, event = previous
        if event is not None:
            event.synchronize()  # the previous step's all-reduce, not the work queued since
        return bool(host[0] > 0)


class StopCondition:
    """`--stop_when "loss/recon<0.01"`: end a run early once a logged metric has met a threshold in `patience`
    consecutive logs of it (each log is that metric's value averaged over a logging window, or one validation).

    The step where it holds becomes the run's last: validated, checkpointed and exported like the end of
    `--max_train_steps`. The checkpoint records that the condition was met, so resuming with the same condition
    finds the run finished (a staged pipeline skips it); resume with another condition, or none, to train on.
    With no condition it never fires. Operators: <, <=, >, >=.
    """

    PATTERN = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
    OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

    def __init__(self, spec=None, patience=1):
        self.spec, self.patience = spec, patience
        self.count, self.met, self.seen = 0, False, False
        if spec is not None:
            self.metric, self.op, self.threshold = self.parse(spec)

    @classmethod
    def parse(cls, spec):
        match = cls.PATTERN.match(spec)
        if not match:
            raise ValueError(f"'{spec}' is not METRIC<VALUE (operators <, <=, >, >=; e.g. 'loss/recon<0.01')")
        return match.group(1), match.group(2), float(match.group(3))

    def update(self, logs, accelerator=None, main_only=False):
        """Feed one set of logged values; True once the condition has held `patience` logs in a row. `main_only`:
        the values exist on the main process alone (validation), whose verdict every process then adopts (a
        collective, so every process must call it there)."""
        if self.spec is None:
            return False
        if not main_only or accelerator is None or accelerator.is_main_process:
            if self.metric not in logs and not main_only and not self.seen and not self.metric.startswith("val/"):
                self.seen = True  # warn once
                logger.warning(f"--stop_when: '{self.metric}' is not among the logged metrics "
                               f"({', '.join(sorted(logs))}); the condition cannot hold")
            if self.metric in logs:
                self.seen = True
                held = self.OPERATORS[self.op](float(logs[self.metric]), self.threshold)
                self.count = self.count + 1 if held else 0
                self.met = self.met or self.count >= self.patience
        if main_only and accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([float(self.met)], device=accelerator.device)
            torch.distributed.broadcast(flag, src=0)
            self.met = bool(flag.item())
        return self.met

    def state_dict(self):
        return {"spec": self.spec, "patience": self.patience, "count": self.count, "met": self.met}

    def load_state_dict(self, state):
        """Restore the count of a run that watched the same condition; another condition starts afresh."""
        if state and state.get("spec") == self.spec and self.spec is not None:
            self.count, self.met = int(state["count"]), bool(state["met"]) and state.get("patience") == self.patience


class Watchdog:
    """If no `beat()` comes for `timeout` seconds, print every thread's stack and exit with status 3.

    A collective that waits for a process that died, or a data loader worker that hangs, otherwise blocks a run
    for ever without a word. The first beat, just before the training loop, arms it: start-up (imports, loading
    models, building a cache) takes as long as it takes, and a collective stuck there times out with the process
    group (`process_group_kwargs`). Beat after every optimizer step and around long pauses (validation, checkpoints).
    """

    def __init__(self, timeout):
        self.timeout = timeout
        self.last = None

    def beat(self):
        if self.last is None and self.timeout and self.timeout > 0:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        self.last = time.monotonic()

    def _watch(self):
        while True:
            time.sleep(min(5.0, self.timeout / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(f"no training progress for {idle:.0f} s (--stall_timeout {self.timeout:g}): a stuck collective, "
                      f"data loader or filesystem? Stacks of every thread follow; exiting.", file=sys.stderr,
                      flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(3)


def process_group_kwargs(stall_timeout):
    """Accelerator kwargs_handlers: collectives time out a little after the watchdog fires, so a stuck one is
    reported with every thread's stack first."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=stall_timeout + 120))] if stall_timeout else []


@contextlib.contextmanager
def fail_fast(grace=60.0):
    """Around a script's `main`: in a run of several processes, a process that fails exits at once with the error's
    status, instead of through the interpreter's teardown.

    On that path the process group was never destroyed (`end_training` does it on success), and its destructor can
    wait for ever on peers that are failing too (NCCL's, pytorch/pytorch#119215): the launcher, which ends every
    process once one has exited, then waits with them and the job never ends. Here the error is printed as Python
    prints it, exit handlers (trackers closing their files, data loader workers) get `grace` seconds, and the
    process ends without tearing the interpreter down. Single-process runs and errors before the process group
    exists are left to Python."""
    try:
        yield
    except BaseException as err:
        import torch.distributed as dist

        if isinstance(err, SystemExit):
            status = err.code if isinstance(err.code, int) else int(err.code is not None)
        else:
            status = 130 if isinstance(err, KeyboardInterrupt) else 1
        if status == 0 or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise
        if isinstance(err, SystemExit):
            print(err.code, file=sys.stderr)
        else:
            traceback.print_exception(err)

        def give_up():
            print(f"exit handlers still running after {grace:g} s: exiting without them", file=sys.stderr, flush=True)
            os._exit(status)

        timer = threading.Timer(grace, give_up)
        timer.daemon = True
        timer.start()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)


def log_changed_settings(saved_args, args, keys, saved_processes=None, processes=None):
    """State every setting that differs from the checkpoint's on resume, so nothing is silently misapplied."""
    changed = [f"--{k} {getattr(args, k)} (the checkpoint was trained with {saved_args.get(k)})"
               for k in keys if k in saved_args and saved_args.get(k) != getattr(args, k)]
    if saved_processes is not None and saved_processes != processes:
        changed.append(f"{processes} processes (the checkpoint was trained with {saved_processes}); the global batch "
                       f"and the data position per process change with it")
    for line in changed:
        logger.warning(f"resuming with {line}")
    return changed

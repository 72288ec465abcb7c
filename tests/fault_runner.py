"""Run a training script with a fault injected at a chosen point, the way a crash, a full disk, a bad batch or a
hung peer would hit it. The script itself is unchanged: faults patch the library functions it calls.

    python tests/fault_runner.py [FAULTS] -- train_x.py ARGS...
    accelerate launch ... tests/fault_runner.py [FAULTS] -- train_x.py ARGS...

Steps below are accelerate's micro-step counter (1-based within one process lifetime): with no gradient
accumulation and no resume, the optimizer step being computed.

--exit_after_checkpoint STEP   die (os._exit(17), no cleanup) right after checkpoint STEP is complete
--slow_checkpoint STEP         stall for an hour after the first file of checkpoint STEP, so a test can kill the
                               process while the checkpoint is half-written
--fail_checkpoint STEP         the second file of checkpoint STEP fails with ENOSPC (a full disk)
--exit_at_backward N           die at the N-th backward pass (e.g. in the middle of a gradient-accumulation window)
--nan_at_step K                losses of micro-step K (and the next --nan_count - 1) become NaN ...
--nan_from_step K              losses of micro-step K and every later one become NaN (a run that diverged) ...
--nan_rank R                   ... on process R only (default: every process)
--hang_at_step K               process --hang_rank hangs for ever in the backward pass of micro-step K
--raise_at_step K              the backward pass of micro-step K raises a RuntimeError, on every process
--block_teardown               an object that only the interpreter's teardown destroys blocks for ever there, as
                               a process group's destructor can when its peers are failing too
--hang_data_at N               the data iterator hangs for ever before its N-th batch
--step_delay SECONDS           sleep this long in every backward pass (to make a run slow enough to signal)
--main_delay SECONDS           process 0 sleeps this long before every wait_for_everyone: its validation, samples
                               and checkpoint writing are slow while the other processes wait for it
"""

import argparse
import errno
import os
import runpy
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--exit_after_checkpoint", type=int)
parser.add_argument("--slow_checkpoint", type=int)
parser.add_argument("--fail_checkpoint", type=int)
parser.add_argument("--exit_at_backward", type=int)
parser.add_argument("--nan_at_step", type=int)
parser.add_argument("--nan_count", type=int, default=1)
parser.add_argument("--nan_from_step", type=int)
parser.add_argument("--nan_rank", type=int)
parser.add_argument("--hang_at_step", type=int)
parser.add_argument("--hang_rank", type=int, default=1)
parser.add_argument("--hang_data_at", type=int)
parser.add_argument("--raise_at_step", type=int)
parser.add_argument("--block_teardown", action="store_true")
parser.add_argument("--step_delay", type=float)
parser.add_argument("--main_delay", type=float)
opts, rest = parser.parse_known_args()
if rest and rest[0] == "--":
    rest = rest[1:]
script, script_args = rest[0], rest[1:]
sys.path.insert(0, str(Path(script).resolve().parent))

from accelerate import Accelerator  # noqa: E402

from common import checkpoint, data  # noqa: E402


def say(message):
    print(f"fault_runner: {message}", file=sys.stderr, flush=True)


if opts.exit_after_checkpoint is not None:
    original_commit = checkpoint.CheckpointWriter.commit

    def commit_then_die(self, *args, **kwargs):
        path = original_commit(self, *args, **kwargs)
        if self.step == opts.exit_after_checkpoint:
            say(f"exiting after {path}")
            os._exit(17)
        return path

    checkpoint.CheckpointWriter.commit = commit_then_die

if opts.slow_checkpoint is not None or opts.fail_checkpoint is not None:
    original_write = checkpoint._write
    written = {}

    def faulty_write(path, writer):
        for step, fault in ((opts.slow_checkpoint, "slow"), (opts.fail_checkpoint, "fail")):
            if step is None or f".checkpoint-{step}.tmp" not in str(path):
                continue
            written[step] = written.get(step, 0) + 1
            if fault == "fail" and written[step] == 2:
                say(f"failing to write {path}")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original_write(path, writer)
        if opts.slow_checkpoint is not None and f".checkpoint-{opts.slow_checkpoint}.tmp" in str(path):
            say(f"stalling while writing {path}")
            time.sleep(3600)

    checkpoint._write = faulty_write

original_backward = Accelerator.backward
backward_calls = [0]


def faulty_backward(self, loss, **kwargs):
    backward_calls[0] += 1
    if opts.exit_at_backward is not None and backward_calls[0] == opts.exit_at_backward:
        say(f"exiting at backward pass {backward_calls[0]} (micro-step {self.step})")
        os._exit(17)
    nan_now = (opts.nan_at_step is not None and opts.nan_at_step <= self.step < opts.nan_at_step + opts.nan_count) \
        or (opts.nan_from_step is not None and self.step >= opts.nan_from_step)
    if nan_now and opts.nan_rank in (None, self.process_index):
        say(f"NaN loss at micro-step {self.step} on process {self.process_index}")
        loss = loss * float("nan")
    if opts.hang_at_step is not None and self.step == opts.hang_at_step and self.process_index == opts.hang_rank:
        say(f"process {self.process_index} hangs at micro-step {self.step}")
        time.sleep(10**6)
    if opts.raise_at_step is not None and self.step == opts.raise_at_step:
        raise RuntimeError(f"injected error at micro-step {self.step} on process {self.process_index}")
    if opts.step_delay:
        time.sleep(opts.step_delay)
    return original_backward(self, loss, **kwargs)


Accelerator.backward = faulty_backward

if opts.main_delay:
    original_wait = Accelerator.wait_for_everyone
    delays = [0]

    def slow_main_wait(self):
        if self.is_main_process:
            delays[0] += 1
            if delays[0] == 1:
                say(f"process 0 is {opts.main_delay:g} s late at every barrier")
            time.sleep(opts.main_delay)
        return original_wait(self)

    Accelerator.wait_for_everyone = slow_main_wait

if opts.hang_data_at is not None:
    original_batches = data.infinite_batches

    def hanging_batches(*args, **kwargs):
        for n, item in enumerate(original_batches(*args, **kwargs), 1):
            if n == opts.hang_data_at:
                say(f"the data iterator hangs before batch {n}")
                time.sleep(10**6)
            yield item

    data.infinite_batches = hanging_batches

if opts.block_teardown:
    class TeardownBlocker:
        def __del__(self):
            say("teardown blocks")
            time.sleep(10**6)

    sys.modules["fault_runner_teardown"] = type(sys)("fault_runner_teardown")
    sys.modules["fault_runner_teardown"].blocker = TeardownBlocker()

sys.argv = [script, *script_args]
runpy.run_path(script, run_name="__main__")

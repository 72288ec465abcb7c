"""Run a training script with a fault injected at a chosen point, the way a crash or a slow disk would hit it.

    python tests/fault_runner.py [--exit_after_checkpoint STEP] [--slow_checkpoint STEP] -- train_x.py ARGS...

--exit_after_checkpoint STEP   the process dies (os._exit, no cleanup) right after checkpoint STEP is complete
--slow_checkpoint STEP         writing checkpoint STEP stalls for an hour after its first file, so a test can kill
                               the process while the checkpoint is half-written
"""

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--exit_after_checkpoint", type=int, default=None)
parser.add_argument("--slow_checkpoint", type=int, default=None)
opts, rest = parser.parse_known_args()
if rest and rest[0] == "--":
    rest = rest[1:]
script, script_args = rest[0], rest[1:]
sys.path.insert(0, str(Path(script).resolve().parent))

from common import checkpoint  # noqa: E402

if opts.exit_after_checkpoint is not None:
    original_commit = checkpoint.CheckpointWriter.commit

    def commit_then_die(self, *args, **kwargs):
        path = original_commit(self, *args, **kwargs)
        if self.step == opts.exit_after_checkpoint:
            print(f"fault_runner: exiting after {path}", flush=True)
            os._exit(17)
        return path

    checkpoint.CheckpointWriter.commit = commit_then_die

if opts.slow_checkpoint is not None:
    original_write = checkpoint._write

    def slow_write(path, writer):
        original_write(path, writer)
        if f".checkpoint-{opts.slow_checkpoint}.tmp" in str(path):
            print(f"fault_runner: stalling while writing {path}", flush=True)
            time.sleep(3600)

    checkpoint._write = slow_write

sys.argv = [script, *script_args]
runpy.run_path(script, run_name="__main__")

"""Running the scripts the way users do: as subprocesses, through `python` or `accelerate launch`."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra):
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)})
    e.update(extra)
    return e


def run(script, *args, launcher="python", processes=1, timeout=600, faults=None, check=True, **env_extra):
    """Run `script` with `args`; `launcher` is "python" or "accelerate" (`processes` CPU processes, gloo).

    `faults` are flags for tests/fault_runner.py, which patches the run to fail at a chosen point.
    """
    target = [str(ROOT / script), *map(str, args)]
    if faults:
        target = [str(ROOT / "tests" / "fault_runner.py"), *map(str, faults), "--", *target]
    if launcher == "accelerate":
        # Several CPU processes need torchrun's launcher (--multi_gpu) and ACCELERATE_USE_CPU, which makes
        # Accelerate join them with gloo; `--cpu --num_processes N` alone starts a single process.
        devices = ["--cpu"] if processes == 1 else ["--multi_gpu"]
        if processes > 1:
            env_extra.setdefault("ACCELERATE_USE_CPU", "true")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *devices, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target]
    else:
        cmd = [sys.executable, *target]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def start(script, *args, faults=None, **env_extra):
    """Start a run in the background (for kill tests); returns the Popen."""
    target = [str(ROOT / script), *map(str, args)]
    if faults:
        target = [str(ROOT / "tests" / "fault_runner.py"), *map(str, faults), "--", *target]
    return subprocess.Popen([sys.executable, *target], cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

"""Running the scripts the way users do: as subprocesses, through `python` or `accelerate launch`.

Plain `python` runs start from tests/forkserver.py, a process that has imported torch, accelerate, diffusers and
the scripts once, so that a run costs its own work rather than seconds of imports. Each run is still a process of
its own (exit status, signals, stdout and stderr as with `subprocess`). Set TESTS_FRESH_PROCESSES=1 to start every
run from a new interpreter instead.
"""

import atexit
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra):
    # One OpenMP thread: the tiny models run thousands of small ops, beside loader workers (and a second process
    # in the gloo tests) on 2 cores, where thread barriers cost more than the arithmetic. A 15-step reliability
    # run of train_vocoder.py took 8 s with one thread and 16 s with two; train_image_vae.py 33 s and 78 s.
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": "1",
              # the repository first, then whatever the caller's environment had there (packages installed with
              # pip --target, say)
              "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    e.update(extra)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(script, args, faults):
    target = [str(ROOT / script), *map(str, args)]
    if faults:
        target = [str(ROOT / "tests" / "fault_runner.py"), *map(str, faults), "--", *target]
    return target


def run(script, *args, launcher="python", processes=1, timeout=600, faults=None, check=True, **env_extra):
    """Run `script` with `args`; `launcher` is "python" or "accelerate" (`processes` CPU processes, gloo).

    `faults` are flags for tests/fault_runner.py, which patches the run to fail at a chosen point.
    """
    target = _command(script, args, faults)
    if launcher == "accelerate":
        # Several CPU processes need torchrun's launcher (--multi_gpu) and ACCELERATE_USE_CPU, which makes
        # Accelerate join them with gloo; `--cpu --num_processes N` alone starts a single process.
        devices = ["--cpu"] if processes == 1 else ["--multi_gpu"]
        if processes > 1:
            env_extra.setdefault("ACCELERATE_USE_CPU", "true")
        # A free port per launch: runs of several processes may go on side by side (pytest -n).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *devices, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *target]
    else:
        cmd = [sys.executable, *target]
    run_env = env(**env_extra)
    server = _server() if launcher == "python" else None
    if server is not None and server.serves(run_env):
        proc = server.run(cmd, run_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def start(script, *args, faults=None, **env_extra):
    """Start a run in the background (for kill tests); returns a Popen (or one that behaves like it), its stderr
    merged into its stdout."""
    cmd = [sys.executable, *_command(script, args, faults)]
    run_env = env(**env_extra)
    server = _server()
    if server is not None and server.serves(run_env):
        return server.start(cmd, run_env, merge=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ---------------------------------------------------------------------------------------------------------------
# The fork server's client


class ForkedProcess:
    """A run started by the fork server, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, conn, args, stdout, stderr):
        self.args, self._conn, self._stdout, self._stderr = args, conn, stdout, stderr
        self._reader = conn.makefile("r")
        self.pid = json.loads(self._reader.readline())["pid"]
        self.returncode = None

    def _finish(self, timeout):
        if self.returncode is not None:
            return True
        if timeout is not None and not select.select([self._conn], [], [], max(timeout, 0))[0]:
            return False
        line = self._reader.readline()
        self.returncode = json.loads(line)["returncode"] if line else -9
        self._reader.close()
        self._conn.close()
        return True

    def poll(self):
        self._finish(0)
        return self.returncode

    def wait(self, timeout=None):
        if not self._finish(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(9)

    def terminate(self):
        self.send_signal(15)

    def output(self):
        """(stdout, stderr) as `subprocess` reads them in text mode; stderr is None when merged into stdout."""
        read = [Path(p).read_text(errors="replace") if p else None for p in (self._stdout, self._stderr)]
        for p in (self._stdout, self._stderr):
            if p:
                os.unlink(p)
        self._stdout = self._stderr = None
        return tuple(read)

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output()


class ForkServer:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="forkserver-")
        self.socket = os.path.join(self.folder, "socket")
        self.env = env()
        preload = [p.stem for p in sorted(ROOT.glob("train_*.py"))]
        preload += [f"common.{p.stem}" for p in sorted((ROOT / "common").glob("*.py")) if p.stem != "__init__"]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py"), self.socket, *preload],
                                     cwd=ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = None
        atexit.register(self.close)

    def wait_ready(self):
        if self.ready is None:
            line = self.proc.stdout.readline()  # "ready", or nothing if it could not serve
            self.ready = line.strip() == "ready"
            if not self.ready:
                print("tests/forkserver.py is not serving: every run starts a new interpreter", file=sys.stderr)
        return self.ready

    def serves(self, run_env):
        """Only runs in the environment the server imported its modules in (but for pytest's note of the test)."""
        return _without_pytest(run_env) == _without_pytest(self.env) and self.wait_ready()

    def start(self, cmd, run_env, merge=False):
        out = os.path.join(self.folder, f"{time.monotonic_ns()}.out")
        err = out if merge else out[:-4] + ".err"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        conn.sendall(json.dumps({"argv": cmd[1:], "cwd": str(ROOT), "env": run_env, "stdout": out,
                                 "stderr": err}).encode() + b"\n")
        return ForkedProcess(conn, cmd, out, None if merge else err)

    def run(self, cmd, run_env, timeout):
        """Like `subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`."""
        proc = self.start(cmd, run_env)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stdout, stderr = proc.output()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
        stdout, stderr = proc.output()
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server exits when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def _without_pytest(e):
    return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST"}


_SERVER = []


def _server():
    """The session's fork server, started on first use (None with TESTS_FRESH_PROCESSES=1 or off Linux)."""
    if os.environ.get("TESTS_FRESH_PROCESSES") == "1" or not hasattr(os, "fork") or sys.platform != "linux":
        return None
    if not _SERVER:
        _SERVER.append(ForkServer())
    return _SERVER[0]


def warm_up():
    """Start the fork server now (it imports in the background while other tests run)."""
    _server()

"""Start `python SCRIPT ARGS...` without paying for `import torch` (and accelerate, diffusers, transformers) each
time: a server process imports the training scripts' dependencies once, then forks a child per run.

The child is a process of its own, like `python SCRIPT ARGS...`: it takes the run's environment, working directory,
`sys.argv` and `sys.path[0]`, has its stdout and stderr in files of its own, runs SCRIPT as `__main__` from its file
and ends through the interpreter's usual exit (atexit handlers, flushed streams; an uncaught exception or
`SystemExit` gives the usual status and message). Signals reach it directly (SIGTERM, SIGKILL), and `os._exit`
ends it with that status. Only the modules already imported differ, and they are loaded before any run starts, so
a run never sees state that another run left behind.

    python tests/forkserver.py SOCKET [MODULE ...]     # serves until its stdin closes; prints "ready" when ready

The protocol (one connection per run, JSON lines): the client sends {"argv", "cwd", "env", "stdout", "stderr"}
(the last two are file paths, the same path for both merges them); the server answers {"pid": N} once the child
runs, then {"returncode": N} when it has ended (negative: killed by that signal, as subprocess reports it).
"""

import gc
import json
import os
import select
import socket
import sys


def _preload(modules):
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # a script whose imports fail still fails in its own run, with its own message
            print(f"forkserver: could not preload {name}: {err!r}", file=sys.stderr, flush=True)


def _serve(path):
    """Returns (in a forked child only) the request that child is to run."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [])
        _reap()
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            server.close()
            os.unlink(path)
            sys.exit(0)
        if server not in ready:
            continue
        conn, _ = server.accept()
        request = json.loads(conn.makefile("r").readline())
        sys.stdout.flush(), sys.stderr.flush()
        if os.fork() == 0:  # the monitor: starts the run, reports its pid and then its exit status
            server.close()
            pid = os.fork()
            if pid == 0:
                conn.close()
                return request
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                _, status = os.waitpid(pid, 0)
                conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            finally:
                os._exit(0)
        conn.close()


def _reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _become(request):
    """Turn this forked child into `python ARGV...` as the request describes it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = out if request["stderr"] == request["stdout"] else \
        os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err}:
        os.close(fd)
    script = os.path.abspath(request["argv"][0])
    sys.argv = list(request["argv"])
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts it


if __name__ == "__main__":
    socket_path, preload = sys.argv[1], sys.argv[2:]
    sys.path.pop(0)  # this file's folder (tests/) is no part of the runs' path
    _preload(preload)
    import threading

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA
        print("forkserver: CUDA was initialised by the imports; not serving", file=sys.stderr, flush=True)
        sys.exit(1)
    # A Python thread running at fork time could leave the child holding one of its locks for ever. (Native pools
    # such as OpenBLAS's shut down at fork and start again in the child.)
    if threading.active_count() != 1:
        print(f"forkserver: threads {threading.enumerate()} after the imports; not serving", file=sys.stderr,
              flush=True)
        sys.exit(1)
    # The preloaded modules' objects go to the collector's permanent generation: a child's garbage collections,
    # and the ones of its exit, then walk only the objects of its own run. Walking the whole preloaded heap (and
    # writing to every page of it, copying each page that the child shares with this process) took a child 3 s
    # to exit, and 0.6 s once frozen; the run itself is unchanged.
    gc.collect()
    gc.freeze()
    request = _serve(socket_path)
    _become(request)
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")

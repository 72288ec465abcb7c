import json
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from common.training import (MetricsAccumulator, MetricsFile, SkipGuard, all_stepped, clip_and_step, clip_and_step_all,
                             frozen, init_trackers, read_metrics, rng_state, set_rng_state, tracker_tags)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item()) == expected


def test_non_finite_gradients_never_reach_the_weights():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 3)).sum() * float("nan")
    accelerator.backward(loss)
    norm, stepped = clip_and_step(accelerator, opt, model.parameters(), 1.0)
    assert not stepped and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state_dict()["state"] == {}  # no moments were touched
    accelerator.backward(model(torch.ones(2, 3)).sum())
    norm, stepped = clip_and_step(accelerator, opt, model.parameters(), 1e-3)
    assert stepped and norm > 1e-3


def test_clip_and_step_all_skips_only_the_optimizer_with_non_finite_gradients():
    accelerator = Accelerator(cpu=True)
    g, d = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt_g, opt_d = torch.optim.AdamW(g.parameters(), lr=0.1), torch.optim.AdamW(d.parameters(), lr=0.1)
    g, opt_g, d, opt_d = accelerator.prepare(g, opt_g, d, opt_d)
    g_before, d_before = [p.detach().clone() for p in g.parameters()], [p.detach().clone() for p in d.parameters()]
    accelerator.backward(g(torch.ones(2, 3)).sum() + d(torch.ones(2, 3)).sum() * float("inf"))
    (g_norm, g_stepped), (d_norm, d_stepped) = clip_and_step_all(
        accelerator, [(opt_g, g.parameters(), 0.0), (opt_d, d.parameters(), 1.0)])
    assert g_stepped and torch.isfinite(g_norm) and not d_stepped and not torch.isfinite(d_norm)
    assert not any(torch.equal(a, b) for a, b in zip(g_before, g.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(d_before, d.parameters()))
    assert all(p.grad is None for p in (*g.parameters(), *d.parameters()))  # both zeroed for the next step


@pytest.mark.parametrize("inject", [None, "nan"])
def test_deferred_step_skips_on_the_device_without_a_host_sync(inject):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # its kernel reads the skip flag itself
    model, opt = accelerator.prepare(model, opt)
    accelerator.backward(model(torch.ones(2, 3)).sum())
    clip_and_step(accelerator, opt, model.parameters(), 1.0, defer=True)  # moments exist from here on
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    loss = model(torch.ones(2, 3)).sum()
    accelerator.backward(loss * float("nan") if inject else loss)
    norm, stepped = clip_and_step(accelerator, opt, model.parameters(), 1.0, defer=True)
    assert torch.is_tensor(stepped) and bool(stepped) == (inject is None)
    assert torch.isfinite(norm) == (inject is None)
    after = opt.state_dict()["state"][0]
    if inject:  # weights, both moments and the step count are those before the step
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
        assert all(torch.equal(state[k], after[k]) for k in state)
    else:
        assert not any(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
        assert after["step"] == state["step"] + 1
    assert not hasattr(opt.optimizer, "found_inf") and all(p.grad is None for p in model.parameters())


def test_deferred_step_falls_back_to_a_host_decision_for_other_optimizers():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    model, opt = accelerator.prepare(model, opt)
    accelerator.backward(model(torch.ones(2, 3)).sum() * float("inf"))
    _, stepped = clip_and_step(accelerator, opt, model.parameters(), 1.0, defer=True)
    assert stepped is False and opt.state_dict()["state"] == {}


def test_skip_guard_reads_device_flags_at_its_flush(caplog):
    guard = SkipGuard(3)
    guard.update(torch.tensor(False), 1), guard.update(torch.tensor(True), 2), guard.update(torch.tensor(False), 3)
    assert (guard.consecutive, guard.total) == (0, 0)  # nothing read yet
    guard.flush()
    assert (guard.consecutive, guard.total) == (1, 2) and "step 3: non-finite optimizer gradients" in caplog.text
    guard.update(torch.tensor(False), 4)
    assert guard.state_dict() == {"consecutive": 2, "total": 3}  # a checkpoint counts every step before it
    guard.update(torch.tensor(False), 5)
    with pytest.raises(SystemExit, match="3 optimizer steps in a row"):
        guard.flush()


def test_skip_guard_stops_after_consecutive_skips():
    guard = SkipGuard(3)
    guard.update(False, 1), guard.update(False, 2), guard.update(True, 3), guard.update(False, 4)
    assert (guard.consecutive, guard.total) == (1, 3)
    guard.update(False, 5)
    with pytest.raises(SystemExit, match="3 optimizer steps in a row"):
        guard.update(False, 6)


def test_frozen_keeps_generator_loss_out_of_discriminator_grads():
    d = torch.nn.Linear(2, 1)
    x = torch.randn(4, 2, requires_grad=True)
    with frozen(d):
        out = d(x).sum()
    out.backward()
    assert d.weight.grad is None and x.grad is not None and d.weight.requires_grad


def test_metrics_accumulator_averages_over_steps():
    acc = MetricsAccumulator()
    acc.add({"loss": torch.tensor(1.0)})
    acc.add({"loss": torch.tensor(3.0), "gn": torch.tensor(5.0)})
    assert acc.pop(Accelerator(cpu=True)) == {"gn": 5.0, "loss": 2.0}


def test_metrics_file_drops_steps_after_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = MetricsFile(path)
    for step in (10, 20, 30):
        f.write(step, {"loss": step / 10})
    MetricsFile(path, resume_step=20).write(30, {"loss": 9.0})
    assert [(m["step"], m["loss"]) for m in read_metrics(path)] == [(10, 1.0), (20, 2.0), (30, 9.0)]


def test_wandb_runs_get_a_name_a_group_and_tags():
    class Recorder:
        log_with = ["wandb"]

        def init_trackers(self, project, config, init_kwargs):
            self.got = (project, config, init_kwargs)

    acc = Recorder()
    init_trackers(acc, "vocoders", {"lr": 1e-4, "betas": (0.8, 0.99)}, "abc123", "/tmp/out/v1-run", group="sweep",
                  tags=["train_vocoder"])
    assert acc.got[0] == "vocoders" and acc.got[1] == {"lr": 1e-4, "betas": "(0.8, 0.99)"}
    assert acc.got[2]["wandb"] == {"id": "abc123", "resume": "allow", "dir": "/tmp/out/v1-run", "name": "v1-run",
                                   "group": "sweep", "tags": ["train_vocoder"]}


def test_default_tags_name_the_script_its_recipe_and_its_model():
    import argparse

    args = argparse.Namespace(config="configs/vocoder_dac.yaml", model="hifigan-5m")
    assert tracker_tags(args, "/repo/train_vocoder.py") == ["train_vocoder", "vocoder_dac", "hifigan-5m"]
    assert tracker_tags(argparse.Namespace(config=None), "train_rvq.py") == ["train_rvq"]


def test_all_stepped_combines_host_and_device_flags():
    assert all_stepped([True, True]) is True and all_stepped([True, False]) is False
    assert all_stepped([torch.tensor(True), False]) is False  # known on the host: no tensor needed
    combined = all_stepped([torch.tensor(True), True, torch.tensor(False)])
    assert torch.is_tensor(combined) and combined.shape == () and not combined
    assert all_stepped([torch.tensor(True), True])


def test_watchdog_is_armed_by_the_first_beat_and_then_exits_on_a_stall():
    """Start-up may take longer than --stall_timeout (imports, model loading, a cache); a stalled loop may not."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    program = ("import sys, time; from common.training import Watchdog; w = Watchdog(0.4); time.sleep(1.5); "
               "print('start-up done', flush=True); w.beat(); time.sleep(0.2); w.beat(); "
               "print('stepped', flush=True); time.sleep(float(sys.argv[1])); print('finished', flush=True)")
    root = str(Path(__file__).resolve().parents[1])
    started = time.monotonic()
    stalled = subprocess.run([sys.executable, "-c", program, "30"], cwd=root, capture_output=True, text=True,
                             timeout=60)
    assert stalled.returncode == 3 and time.monotonic() - started < 20
    assert stalled.stdout.split() == ["start-up", "done", "stepped"]
    assert "no training progress for" in stalled.stderr and "--stall_timeout 0.4" in stalled.stderr
    quick = subprocess.run([sys.executable, "-c", program, "0"], cwd=root, capture_output=True, text=True, timeout=60)
    assert quick.returncode == 0 and "finished" in quick.stdout


def test_graceful_stop_is_agreed_by_every_process_at_the_same_step(tmp_path):
    """A SIGTERM that reaches one process only stops every process after the same step; the agreement is read
    one step late, so no step waits for the device."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    program = tmp_path / "stop.py"
    program.write_text('''
import os, sys, types
import torch, torch.distributed as dist, torch.multiprocessing as mp
from common.training import GracefulStop

def worker(rank, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stop = GracefulStop(signals=())
    accelerator = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    answers = []
    for step in range(1, 8):
        if rank == 1 and step == 3:
            stop.flag = True  # the signal reached process 1 during step 3
        answers.append(stop.requested(accelerator))
    open(os.path.join(folder, f"rank{rank}"), "w").write(" ".join(str(int(a)) for a in answers))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
''')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(program), str(tmp_path), str(port)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "0 0 0 1 1 1 1"


def test_discriminators_keep_their_batch_norm_statistics_per_process(tmp_path):
    """Under DDP's default every buffer is re-broadcast in place at each forward; the VAE scripts' discriminator
    (BatchNorm) runs on real and then on generated images before one backward, and on two GPUs cuDNN's BatchNorm
    backward refused the overwritten statistics. setup_accelerator turns the re-broadcast off: two passes and a
    backward complete on two processes, each keeping the statistics of its own batches."""
    from helpers import run

    run("tests/ddp_buffers.py", tmp_path, launcher="accelerate", processes=2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["backward"] for r in ranks] == ["ok", "ok"]
    assert [r["broadcast_buffers"] for r in ranks] == [False, False]
    assert ranks[0]["running_mean"] != ranks[1]["running_mean"]


def test_cuda_graph_modes_fall_back_when_gradients_accumulate(caplog):
    """With several micro-batches, CUDA graphs would overwrite the first micro-batch's gradients (kept in their
    memory pool) at the next replay: such runs compile without graphs, and say so."""
    from common.training import compile_mode_for_accumulation

    assert compile_mode_for_accumulation("reduce-overhead", 1) == "reduce-overhead"
    assert compile_mode_for_accumulation("max-autotune", 1) == "max-autotune"
    assert not caplog.records
    assert compile_mode_for_accumulation("default", 4) == "default"
    assert compile_mode_for_accumulation("max-autotune-no-cudagraphs", 4) == "max-autotune-no-cudagraphs"
    assert compile_mode_for_accumulation("reduce-overhead", 2) == "default"
    assert compile_mode_for_accumulation("max-autotune", 2) == "max-autotune-no-cudagraphs"
    assert len(caplog.records) == 2
    assert "--gradient_accumulation_steps 2" in caplog.records[0].getMessage()

import argparse
import json
import logging
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from common import checkpoint
from common.checkpoint import (Checkpoint, CheckpointError, CheckpointWriter, checkpoint_dirs, commit_checkpoint,
                               latest_checkpoint, load_matching, load_models, refuse_non_finite, resolve_resume,
                               restore_ema, restore_training_parts, save_training_parts, start_checkpoint,
                               state_mismatches, training_state)
from common.data import CorruptSampleTracker
from common.ema import EMA
from common.training import SkipGuard


def save(out, step, limit=None, value=1.0):
    w = CheckpointWriter(out, step)
    w.start()
    w.add_tensors("model", {"w": torch.full((3,), value)})
    w.add_object("optimizer", {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}},
                               "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]})
    w.add_json("training_state", {"step": step})
    w.add_rank_object("rng_state", {"torch": torch.get_rng_state()}, 0)
    return w.commit(limit)


def test_round_trip(tmp_path):
    path = save(tmp_path, 10, value=2.5)
    ck = Checkpoint(path)
    assert ck.step == 10
    assert torch.equal(ck.tensors("model")["w"], torch.full((3,), 2.5))
    assert ck.object("optimizer")["param_groups"][0]["betas"] == (0.9, 0.999)  # loaded with weights_only=True
    assert ck.json("training_state") == {"step": 10}
    assert ck.rank_object("rng_state", 0) is not None and ck.rank_object("rng_state", 1) is None


def test_latest_ignores_half_written_checkpoints(tmp_path):
    save(tmp_path, 5)
    w = CheckpointWriter(tmp_path, 10)  # killed while writing: files but no manifest, still under its temp name
    w.start()
    w.add_tensors("model", {"w": torch.zeros(3)})
    (tmp_path / "checkpoint-20").mkdir()  # a stray folder without a manifest
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    assert resolve_resume("latest", tmp_path).name == "checkpoint-5"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path)
    save(tmp_path, 15)  # the next save removes the leftover temporary folder
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert resolve_resume("latest", tmp_path / "missing") is None
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_retention_deletes_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, step, limit=2)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 3]

    # A write that fails part-way (e.g. the disk is full) must leave the older checkpoints alone.
    original = checkpoint._write

    def failing(path, writer):
        if "optimizer" in str(path):
            raise OSError(28, "No space left on device")
        original(path, writer)

    monkeypatch.setattr(checkpoint, "_write", failing)
    with pytest.raises(OSError):
        save(tmp_path, 4, limit=1)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 3]
    assert Checkpoint(latest_checkpoint(tmp_path)).step == 3


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    save(tmp_path, 7, value=1.0)
    save(tmp_path, 7, value=9.0)
    assert torch.equal(Checkpoint(tmp_path / "checkpoint-7").tensors("model")["w"], torch.full((3,), 9.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]


def test_missing_unexpected_or_truncated_files_are_refused(tmp_path):
    path = save(tmp_path, 3)
    (path / "extra.bin").write_text("x")
    with pytest.raises(CheckpointError, match="unexpected file extra.bin"):
        Checkpoint(path)
    (path / "extra.bin").unlink()
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing file optimizer.pt"):
        Checkpoint(path)
    path = save(tmp_path, 4)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="model.safetensors has"):
        Checkpoint(path)


def test_manifest_lists_every_file(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "complete.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "training_state.json", "rng_state_0.pt"}


def test_a_changed_model_is_described_and_loads_what_still_fits():
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    new = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1))
    saved = old.state_dict()
    assert state_mismatches(old, saved) == []
    described = state_mismatches(new, saved)
    assert "missing 2.weight" in described and "1.weight: (2, 8) in the checkpoint, (3, 8) in the model" in described
    fresh = new[1].weight.clone()
    assert load_matching(new, saved) == ["1.bias", "1.weight", "2.bias", "2.weight"]
    assert torch.equal(new[0].weight, old[0].weight) and torch.equal(new[1].weight, fresh)


# ---------------------------------------------------------------------------------------------------------------
# The shared parts of a training script's save_checkpoint / load_checkpoint


class Run:
    """What a training script holds between steps: a model, its optimizer and schedule, EMA, guards, a scaler."""

    def __init__(self, seed, model=None):
        torch.manual_seed(seed)
        self.model = model or torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1 / (1 + step))
        self.ema = EMA(self.model, 0.99)
        self.guard, self.corrupt = SkipGuard(5), CorruptSampleTracker(0.5, min_samples=1)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** seed)

    def step(self):
        x = torch.randn(3, 4) + np.random.randn() + random.random()  # every generator the data path may use
        self.model(x).pow(2).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update(self.model)
        self.guard.update(self.sched.last_epoch % 3 != 0, self.sched.last_epoch)  # every third update skipped
        self.corrupt.update([("/data/bad.png", "truncated")] if random.random() < 0.5 else [], 3)


def save_run(accelerator, run, out, step, files=None):
    """A training script's save_checkpoint, in miniature."""
    args = argparse.Namespace(output_dir=str(out), learning_rate=1e-2)
    accelerator.scaler = run.scaler
    writer = start_checkpoint(accelerator, out, step)
    save_training_parts(writer, accelerator, {"model": run.opt}, {"model": run.sched}, run.ema,
                        per_process={"corrupt": run.corrupt})
    for name, module in (files or {"model": run.model}).items():
        writer.add_tensors(name, module.state_dict())
    writer.add_json("training_state", training_state(accelerator, args, step, {"epoch": 1}, run.ema, run.guard,
                                                     extra_value=3))
    return commit_checkpoint(writer, accelerator)


def restore_run(accelerator, run, path, allow_model_change=False):
    """A training script's load_checkpoint, in miniature; returns the names of the models that changed."""
    ckpt = Checkpoint(path)
    state = ckpt.json("training_state")
    accelerator.scaler = run.scaler
    changed = load_models(ckpt, {"model": run.model}, allow_model_change)
    restore_training_parts(ckpt, accelerator, state, {"model": run.opt}, {"model": run.sched}, run.guard,
                           per_process={"corrupt": run.corrupt}, changed=changed)
    restore_ema(ckpt, run.ema, run.model, state, changed="model" in changed)
    return changed


def test_training_parts_round_trip_exactly(tmp_path):
    accelerator = Accelerator(cpu=True)
    random.seed(1), np.random.seed(1)
    run = Run(seed=1)
    for _ in range(5):
        run.step()
    path = save_run(accelerator, run, tmp_path, 5)
    assert Checkpoint(path).files == {"model.safetensors", "ema.safetensors", "optimizer_model.pt",
                                      "scheduler_model.pt", "scaler.pt", "training_state.json", "rng_state_0.pt"}
    assert list(Checkpoint(path).json("training_state")) == ["epoch", "step", "ema_updates", "skips", "extra_value",
                                                              "num_processes", "args"]
    assert set(Checkpoint(path).rank_object("rng_state", 0)) == {"rng", "corrupt"}
    guard = run.guard.state_dict()
    for _ in range(3):  # the uninterrupted run goes on
        run.step()

    random.seed(2), np.random.seed(2)  # a new process: other weights, other random state
    resumed = Run(seed=2)
    assert restore_run(accelerator, resumed, path) == set()
    assert resumed.scaler.get_scale() == 2.0 and resumed.guard.state_dict() == guard == {"consecutive": 0, "total": 1}
    for _ in range(3):
        resumed.step()
    for a, b in zip(run.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for name in run.ema.shadow:
        assert torch.equal(run.ema.shadow[name], resumed.ema.shadow[name])
    assert resumed.ema.num_updates == run.ema.num_updates == 8
    assert resumed.sched.state_dict() == run.sched.state_dict()
    for i, moments in run.opt.state_dict()["state"].items():
        assert all(torch.equal(v, resumed.opt.state_dict()["state"][i][k]) for k, v in moments.items())
    assert resumed.corrupt.state_dict() == run.corrupt.state_dict() and resumed.guard.total == run.guard.total


def test_a_changed_model_is_refused_naming_the_difference(tmp_path):
    accelerator = Accelerator(cpu=True)
    run = Run(seed=1)
    path = save_run(accelerator, run, tmp_path, 1)
    bigger = Run(seed=2, model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)))
    before = [p.detach().clone() for p in bigger.model.parameters()]
    with pytest.raises(SystemExit, match=r"the model differs from the checkpoint's \(1.weight: \(2, 8\) in the "
                                         r"checkpoint, \(3, 8\) in the model; 1.bias: .*--allow_model_change"):
        restore_run(accelerator, bigger, path)
    assert all(torch.equal(a, b) for a, b in zip(before, bigger.model.parameters()))  # nothing was loaded

    # Several models: each difference names its model; a model the checkpoint lacks and a changed configuration
    # (found by the script) count as differences too.
    disc = torch.nn.Linear(8, 1)
    with pytest.raises(SystemExit) as refused:
        load_models(Checkpoint(path), {"model": run.model, "disc": disc}, False, files={"disc": "discriminator"},
                    config_changes={"model": ["config channels: 8 vs 16"]})
    assert "(model: config channels: 8 vs 16; disc: the checkpoint has no discriminator)" in str(refused.value)
    assert load_models(Checkpoint(path), {"model": run.model, "disc": None}, False) == set()  # None: not in this run


def test_allow_model_change_loads_the_tensors_that_fit(tmp_path, caplog):
    accelerator = Accelerator(cpu=True)
    run = Run(seed=1)
    for _ in range(3):
        run.step()
    path = save_run(accelerator, run, tmp_path, 3)
    bigger = Run(seed=2, model=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)))
    fresh = bigger.model[1].weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        assert restore_run(accelerator, bigger, path, allow_model_change=True) == {"model"}
    assert "the model loads the tensors that fit; 2 start fresh (1.bias, 1.weight)" in caplog.text
    assert torch.equal(bigger.model[0].weight, run.model[0].weight) and torch.equal(bigger.model[1].weight, fresh)
    assert bigger.opt.state_dict()["state"] == {}  # moments of another shape: the optimizer starts afresh
    assert bigger.sched.state_dict()["last_epoch"] == 3  # the schedule continues from the saved step
    assert bigger.ema.num_updates == 0 and torch.equal(bigger.ema.shadow["0.weight"], run.model[0].weight)


def test_a_process_the_checkpoint_has_no_state_for_starts_fresh(tmp_path, caplog, monkeypatch):
    accelerator = Accelerator(cpu=True)
    path = save_run(accelerator, Run(seed=1), tmp_path, 1)
    monkeypatch.setattr(type(accelerator), "process_index", property(lambda self: 1))  # the second of two processes
    resumed = Run(seed=2)
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING):
        restore_run(accelerator, resumed, path)
    assert "was written by fewer processes: process 1 starts with fresh random state" in caplog.text
    assert torch.equal(torch.rand(1), expected)  # its own random state, not process 0's
    assert resumed.corrupt.state_dict()["loaded"] == 0


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(2, 2)
    refuse_non_finite(4, {"model": model, "disc": None})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match=r"the EMA weights hold non-finite values at step 4; not checkpointing them "
                                         r"\(the previous checkpoint is intact; see why\)"):
        refuse_non_finite(4, {"EMA": dict(model.named_parameters())}, hint="; see why")
    with pytest.raises(SystemExit, match="the model weights hold non-finite values"):
        refuse_non_finite(4, {"model": model})

import json

import pytest
import torch

from common import checkpoint
from common.checkpoint import (Checkpoint, CheckpointError, CheckpointWriter, checkpoint_dirs, latest_checkpoint,
                               load_matching, resolve_resume, state_mismatches)


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

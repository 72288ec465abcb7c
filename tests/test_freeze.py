"""`--freeze PREFIX ...`: parts of the trained model stay fixed (e.g. an image VAE's encoder while its decoder
fine-tunes)."""

import pytest
import torch

from common.checkpoint import Checkpoint
from common.training import freeze
from helpers import run
from scripts import SCRIPTS


def net():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)))


def test_prefixes_freeze_whole_names_only_and_the_rest_trains():
    model = net()
    trainable = freeze(model, ["1.0", "0."])
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, False, True, True]
    assert trainable == [model[1][1].weight, model[1][1].bias]
    assert len(freeze(net(), None)) == 6


@pytest.mark.parametrize("prefixes, message", [
    (["2"], r"no parameter's name starts with it \(the model's top-level names: 0, 1\)"),
    (["10"], "no parameter"),  # a prefix is whole names: "10" is not "1"
    (["0", "1"], "nothing would train"),
])
def test_bad_prefixes_are_refused(prefixes, message):
    with pytest.raises(SystemExit, match=message):
        freeze(net(), prefixes)


def test_frozen_parameters_of_a_run_never_move(tmp_path):
    spec = next(s for s in SCRIPTS if s.name == "rvq")
    out = tmp_path / "out"
    run(spec.script, *spec.make_data(tmp_path / "data"), "--output_dir", out, *spec.tiny, "--train_batch_size", "4",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--freeze", "embed", "blocks.0")
    before, after = Checkpoint(out / "checkpoint-1").tensors("model"), Checkpoint(out / "checkpoint-2").tensors("model")
    frozen = [k for k in before if k.startswith(("embed.", "blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    bad = run(spec.script, *spec.make_data(tmp_path / "data2"), "--output_dir", tmp_path / "bad", *spec.tiny,
              "--freeze", "encoder", check=False)
    assert bad.returncode != 0 and "--freeze encoder: no parameter's name starts with it" in bad.stderr

"""`--stop_when METRIC<VALUE`: a run ends early, as finished, once a logged metric meets a threshold."""

import pytest

from common.training import StopCondition, read_metrics
from helpers import run
from scripts import SCRIPTS


def test_condition_holds_after_patience_consecutive_logs_and_a_miss_resets_the_count():
    cond = StopCondition("loss/recon<0.01", patience=2)
    assert not cond.update({"loss/recon": 0.005})
    assert not cond.update({"loss/recon": 0.02})  # a miss: the count starts again
    assert not cond.update({"loss/recon": 0.009})
    assert not cond.update({"loss/other": 0.0})  # logs without the metric leave the count alone
    assert cond.update({"loss/recon": 0.001})
    assert cond.update({"loss/recon": 5.0})  # once met, the run is over


@pytest.mark.parametrize("spec, value, held", [("m<1", 1.0, False), ("m<=1", 1.0, True), ("m>1", 1.0, False),
                                               ("m>=1", 1.0, True), ("val/psnr > 2.5e1", 26.0, True),
                                               ("x.y-z < -1", -2.0, True)])
def test_operators(spec, value, held):
    metric = StopCondition.parse(spec)[0]
    assert StopCondition(spec).update({metric: value}) is held


@pytest.mark.parametrize("spec", ["loss", "loss<", "<0.1", "loss=0.1", "loss<<0.1", "loss < 0.1 or so"])
def test_malformed_conditions_are_refused(spec):
    with pytest.raises(ValueError, match="METRIC<VALUE"):
        StopCondition(spec)


def test_no_condition_never_fires_and_state_resumes_only_for_the_same_condition():
    assert not StopCondition(None).update({"loss/total": 0.0})
    cond = StopCondition("loss/total<1", patience=3)
    cond.update({"loss/total": 0.5}), cond.update({"loss/total": 0.5})
    same, other = StopCondition("loss/total<1", patience=3), StopCondition("loss/total<0.5", patience=3)
    same.load_state_dict(cond.state_dict()), other.load_state_dict(cond.state_dict())
    assert same.count == 2 and other.count == 0
    assert same.update({"loss/total": 0.5}) and not other.update({"loss/total": 0.1})


def test_a_malformed_flag_stops_before_any_work(capsys):
    import train_vocoder

    with pytest.raises(SystemExit):
        train_vocoder.parse_args(["--output_dir", "out", "--train_data_dir", ".", "--stop_when", "loss/mel=0.1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--stop_when" in err and "METRIC<VALUE" in err


@pytest.mark.parametrize("spec", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_run_ends_finished_when_the_condition_holds_and_a_resume_finds_it_done(spec, tmp_path):
    data = spec.make_data(tmp_path / "data")
    out = tmp_path / "out"
    args = [*data, "--output_dir", out, *spec.tiny, "--train_batch_size", "4", "--max_train_steps", "8",
            "--checkpointing_steps", "100", "--validation_steps", "100", "--resume_from_checkpoint", "latest",
            "--stop_when", "loss/total<1e9", "--stop_when_logs", "2"]
    run(spec.script, *args)
    steps = {m["step"] for m in read_metrics(out / "metrics.jsonl")}
    assert max(steps) == 2  # logged every step; the condition held at steps 1 and 2
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (out / spec.export_file).exists()  # exported, as at the end of --max_train_steps
    proc = run(spec.script, *args)  # the same command again: nothing left to train
    assert "resumed from" in proc.stdout + proc.stderr
    assert max(m["step"] for m in read_metrics(out / "metrics.jsonl")) == 2
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_validation_metric_ends_the_run_at_a_validation_step(tmp_path):
    spec = next(s for s in SCRIPTS if s.name == "rvq")
    out = tmp_path / "out"
    run(spec.script, *spec.make_data(tmp_path / "data"), "--output_dir", out, *spec.tiny, "--train_batch_size", "4",
        "--max_train_steps", "9", "--checkpointing_steps", "100", "--validation_steps", "3",
        "--stop_when", "val/loss>=0")
    assert max(m["step"] for m in read_metrics(out / "metrics.jsonl")) == 3
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"] and (out / "config.json").exists()

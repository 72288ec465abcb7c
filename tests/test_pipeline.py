"""Staged pipelines (python -m common.pipeline): stages in order, outputs by name, finished stages skipped."""

import json
import subprocess
import sys

import pytest
import yaml

from common.pipeline import PipelineError, load_pipeline, stage_config
from common.training import read_metrics
from helpers import ROOT, env
from scripts import SCRIPTS

RVQ = next(s for s in SCRIPTS if s.name == "rvq")


def write(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_stage_outputs_are_named_by_later_stages_and_args_override_the_recipe(tmp_path):
    spec = {"output_dir": str(tmp_path / "runs"), "stages": [
        {"name": "warmup", "script": "train_image_vae.py", "config": "configs/image_vae.yaml",
         "args": {"adv_weight": 0, "max_train_steps": 10}, "stop_when": "loss/rec<0.1"},
        {"name": "gan", "script": "train_image_vae.py",
         "args": {"pretrained_vae_model_name_or_path": "${stages.warmup.output_dir}", "note": "${output_dir}/x"}}]}
    warmup, gan = load_pipeline(write(tmp_path / "p.yaml", spec))["stages"]
    assert warmup["output_dir"] == str(tmp_path / "runs" / "warmup")
    assert gan["args"]["pretrained_vae_model_name_or_path"] == warmup["output_dir"]
    assert gan["args"]["note"] == f"{tmp_path / 'runs'}/x"
    config = stage_config(warmup)
    assert config["model"] == "kl-f8-5m" and config["adv_weight"] == 0 and config["max_train_steps"] == 10
    assert config["stop_when"] == "loss/rec<0.1" and config["resume_from_checkpoint"] == "latest"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "script": "train_rvq.py", "args": {"x": "${stages.b.output_dir}"}},
      {"name": "b", "script": "train_rvq.py"}], r"names nothing known here \(earlier stages: none"),
    ([{"name": "a", "script": "train_nothing.py"}], "no script train_nothing.py"),
    ([{"name": "a", "script": "train_rvq.py"}, {"name": "a", "script": "train_rvq.py"}], "comes earlier"),
    ([{"name": "a", "script": "train_rvq.py", "flags": {}}], "unknown key"),
    ([{"name": "a", "script": "train_rvq.py", "config": "configs/nothing.yaml"}], "no config file"),
])
def test_bad_pipelines_are_refused_with_the_stage_named(tmp_path, stages, message):
    with pytest.raises(PipelineError, match=message):
        load_pipeline(write(tmp_path / "p.yaml", {"stages": stages}))


def pipeline_run(path, check=True):
    proc = subprocess.run([sys.executable, "-m", "common.pipeline", str(path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def test_runs_stages_in_order_skips_finished_ones_and_resumes_an_interrupted_one(tmp_path):
    flags = RVQ.make_data(tmp_path / "data")
    data = {flags[i].lstrip("-"): str(flags[i + 1]) for i in range(0, len(flags), 2)}
    tiny = {RVQ.tiny[i].lstrip("-"): RVQ.tiny[i + 1] for i in range(0, len(RVQ.tiny), 2)}
    common = {**data, **tiny, "train_batch_size": 4, "checkpointing_steps": 2}
    path = write(tmp_path / "p.yaml", {"output_dir": str(tmp_path / "runs"), "stages": [
        {"name": "first", "script": "train_rvq.py", "args": {**common, "max_train_steps": 6},
         "stop_when": "loss/total<1e9", "stop_when_logs": 2},
        {"name": "second", "script": "train_rvq.py", "args": {**common, "max_train_steps": 4, "tag": "second"}}]})
    out = pipeline_run(path).stdout
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    assert out.index("first: finished") < out.index("second: finished")
    assert max(m["step"] for m in read_metrics(first / "metrics.jsonl")) == 2  # its stop condition ended it
    assert max(m["step"] for m in read_metrics(second / "metrics.jsonl")) == 4
    assert json.loads((second / "pipeline_stage.json").read_text())["config"]["tag"] == "second"

    again = pipeline_run(path).stdout  # nothing left to do
    assert "first: finished earlier, skipped" in again and "second: finished earlier, skipped" in again

    # The second stage as if killed after its checkpoint at step 2: the next run resumes it there.
    (second / "pipeline_stage.json").unlink(), (second / "config.json").unlink()
    for ckpt in second.glob("checkpoint-4"):
        import shutil

        shutil.rmtree(ckpt)
    resumed = pipeline_run(path)
    assert "first: finished earlier, skipped" in resumed.stdout and "second: finished" in resumed.stdout
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr

    spec = yaml.safe_load(path.read_text())
    spec["stages"][0]["args"]["learning_rate"] = 1e-4
    changed = pipeline_run(write(path, spec), check=False)
    assert changed.returncode and "finished in" in changed.stderr and "learning_rate" in changed.stderr

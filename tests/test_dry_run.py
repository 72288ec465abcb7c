"""`--dry_run`: a few real steps at the configured shapes, a report of time and memory, nothing written."""

import pytest
import torch

from common.perf import DryRun
from helpers import run
from scripts import SCRIPTS


def test_report_names_time_to_go_and_what_fits():
    dry = DryRun(3, samples_per_step=16, remaining_steps=7200, hints=["lower --train_batch_size"])
    lines = dry.report_lines(3, 2.0, 0.5, first_peak=40.0, peak=21.0)
    assert "seconds per step 0.500" in lines[1] and "32.0 samples/s" in lines[1] and "1.0 h" in lines[1]
    assert "32 GB: fits, 24 GB: does not fit, 16 GB: does not fit" in lines[2]
    too_big = dry.report_lines(3, 2.0, 0.5, first_peak=40.0, peak=31.0)
    assert too_big[-1] == "to fit a 32 GB card: lower --train_batch_size"


def test_out_of_memory_is_a_report_not_a_traceback():
    def step(i):
        if i == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    lines = DryRun(3, 16, 100, hints=["lower --resolution", "--gradient_checkpointing"]).run(step)
    assert "out of memory" in lines[-1] and "at step 2" in lines[-1] and "lower --resolution" in lines[-1]


@pytest.mark.parametrize("spec", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_dry_run_trains_a_few_steps_reports_and_writes_nothing(spec, tmp_path):
    out = tmp_path / "out"
    proc = run(spec.script, *spec.make_data(tmp_path / "data"), "--output_dir", out, *spec.tiny, *spec.gan(0),
               "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_train_steps", "1000",
               "--dry_run", "--dry_run_steps", "3")
    text = proc.stdout + proc.stderr
    assert "dry run: 3 of 3 optimizer steps" in text and "1000 steps to go" in text and "peak GPU memory" in text
    assert "model FLOPs per step" in text
    assert not out.exists() or not any(p.name.startswith("checkpoint") or p.name in ("metrics.jsonl", "run.json")
                                       for p in out.iterdir())

"""Comparing runs from their metrics.jsonl and run.json: the table's final and best values, the figure, errors."""

import json

import numpy as np
from PIL import Image

from common.compare import main, read_run, summary_table
from helpers import run


def make_run(folder, losses, psnrs, resume_at=None):
    folder.mkdir(parents=True)
    lines, t = [], 0.0
    for step, (loss, value) in enumerate(zip(losses, psnrs), 1):
        t = 0.5 * (step - resume_at) if resume_at and step > resume_at else 1.0 * step  # the clock restarts
        lines.append(json.dumps({"step": step, "time": t, "loss/total": loss, "val/psnr": value, "perf/mfu": 0.1}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "run.json").write_text(json.dumps({"script": "train_x.py", "git": {"commit": "0123456789abcdef"},
                                                 "devices": ["cpu"], "started": "2026-01-01T00:00:00+00:00"}))
    return folder


def test_table_gives_final_and_best_with_the_right_direction(tmp_path):
    a = make_run(tmp_path / "a", [3.0, 1.0, 2.0], [10.0, 14.0, 12.0])
    b = make_run(tmp_path / "b", [2.5, 2.0, 1.5], [11.0, 11.5, float("nan")])
    runs = [read_run(a), read_run(b)]
    table = summary_table(runs, ["loss/total", "val/psnr"])
    rows = [line.split() for line in table[1:]]
    assert rows[0] == ["loss/total", "a", "2", "3", "1", "2"]  # lowest loss at step 2
    assert rows[1] == ["loss/total", "b", "1.5", "3", "1.5", "3"]
    assert rows[2] == ["val/psnr", "a", "12", "3", "14", "2"]  # highest PSNR
    assert rows[3] == ["val/psnr", "b", "11.5", "2", "11.5", "2"]  # the NaN is left out


def test_wall_time_adds_up_over_resumed_launches(tmp_path):
    _, rows = read_run(make_run(tmp_path / "a", [3, 2, 1, 0.5], [1, 2, 3, 4], resume_at=2))
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times == [1.0, 2.0, 2.5, 3.0]


def test_command_prints_the_table_and_writes_one_figure(tmp_path, capsys):
    a = make_run(tmp_path / "a", [3.0, 1.0, 2.0], [10.0, 14.0, 12.0])
    b = make_run(tmp_path / "b", [2.5, 2.0, 1.5], [11.0, 11.5, 13.0])
    main([str(a), str(b), "--plot", str(tmp_path / "cmp.png"), "--x", "time"])
    out = capsys.readouterr().out
    assert "a: train_x.py at 0123456789, cpu" in out and "val/psnr" in out and "loss/total" in out
    image = np.asarray(Image.open(tmp_path / "cmp.png").convert("RGB"))
    assert image.shape[1] > image.shape[0] > 200 and image.std() > 5  # two panels side by side, with lines


def test_bad_input_is_one_line(tmp_path):
    make_run(tmp_path / "a", [1.0], [1.0])
    proc = run("common/compare.py", tmp_path / "a", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no metrics.jsonl" in proc.stderr
    proc = run("common/compare.py", tmp_path / "a", "--metrics", "val/fid", check=False)
    assert proc.returncode == 2 and "no run logged val/fid (logged: loss/total, perf/mfu, val/psnr)" in proc.stderr

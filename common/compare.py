"""Compare runs from their own files, no service needed: a table of final and best values, and one figure.

    python -m common.compare out/vae_a out/vae_b --metrics loss/rec val/psnr --plot compare.png [--x time]

Each run folder holds the `metrics.jsonl` every script writes (one JSON line per logged step: "step", "time" in
seconds since its launch, and every value) and, from its launch, `run.json` (arguments, git commit, versions). The
table gives, for each metric and run, its last logged value and its best one (the lowest, or the highest for
metrics where higher is better: PSNR, SSIM, SI-SDR, PESQ, accuracy, throughput). The figure has one panel per
metric with every run as a line, against the optimizer step or against wall-clock time (summed over the launches
of a resumed run). Without --metrics, the losses and validation metrics logged by every run are compared.
"""

import argparse
import json
import math
import sys
from pathlib import Path

HIGHER_IS_BETTER = ("psnr", "ssim", "si_sdr", "pesq", "acc", "samples_per_s", "frames_per_s", "steps_per_s", "mfu")


def higher_is_better(metric):
    return any(part in metric.lower() for part in HIGHER_IS_BETTER)


def read_run(folder):
    """(label, [{step, time, values...}, ...]) with "time" made cumulative across resumed launches."""
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{folder}: no metrics.jsonl (not a run folder of these scripts?)")
    rows, offset, last_time = [], 0.0, 0.0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        t = float(row.get("time", 0.0))
        if t + offset < last_time:  # a resumed launch restarts its clock
            offset = last_time
        row["time"] = last_time = t + offset
        rows.append(row)
    return folder.name, rows


def series(rows, metric, x="step"):
    """[(x, value)] of one metric, non-finite values left out."""
    return [(row[x], float(row[metric])) for row in rows
            if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]


def default_metrics(runs):
    common = None
    for _, rows in runs:
        keys = {k for row in rows for k in row if k.startswith(("loss/", "val/"))}
        common = keys if common is None else common & keys
    return sorted(common or [])


def summary_table(runs, metrics):
    """Lines of a plain-text table: metric, run, final (at step), best (at step)."""
    header = ("metric", "run", "final", "at step", "best", "at step")
    lines = [header]
    for metric in metrics:
        pick = max if higher_is_better(metric) else min
        for label, rows in runs:
            points = series(rows, metric)
            if not points:
                lines.append((metric, label, "-", "-", "-", "-"))
                continue
            best = pick(points, key=lambda p: p[1])
            lines.append((metric, label, f"{points[-1][1]:.5g}", str(points[-1][0]), f"{best[1]:.5g}", str(best[0])))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines]


def plot(runs, metrics, path, x="step"):
    """One PNG: a panel per metric, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(metrics))
    rows_ = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(5 * columns, 3.4 * rows_), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, rows in runs:
            points = series(rows, metric, x)
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel("step" if x == "step" else "wall time (s)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="Run folders (each with metrics.jsonl).")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="Metrics to compare (default: the loss/ and val/ metrics every run logged).")
    parser.add_argument("--plot", type=str, default=None, help="Write the figure to this PNG file.")
    parser.add_argument("--x", type=str, default="step", choices=["step", "time"], help="The figure's x axis.")
    args = parser.parse_args(argv)

    def fail(message):
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        runs = [read_run(folder) for folder in args.runs]
    except ValueError as err:
        fail(str(err))
    metrics = args.metrics or default_metrics(runs)
    if not metrics:
        fail("the runs log no loss/ or val/ metric in common; name some with --metrics")
    missing = [m for m in metrics if not any(series(rows, m) for _, rows in runs)]
    if missing:
        known = sorted({k for _, rows in runs for row in rows for k in row if k not in ("step", "time")})
        fail(f"no run logged {', '.join(missing)} (logged: {', '.join(known[:30])})")
    for folder, (label, _) in zip(args.runs, runs):
        info = Path(folder) / "run.json"
        if info.is_file():
            meta = json.loads(info.read_text())
            commit = (meta.get("git") or {}).get("commit") or "?"
            print(f"{label}: {meta.get('script')} at {commit[:10]}, {', '.join(meta.get('devices', []))}, "
                  f"started {meta.get('started')}")
    print("\n".join(summary_table(runs, metrics)))
    if args.plot:
        plot(runs, metrics, args.plot, args.x)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()

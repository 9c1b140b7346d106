#!/usr/bin/env python3
"""
Validation curves of several training runs on one figure.

  speedrun plot LOG [LOG ...] --out curves.png [--labels A,B,...] [--title TEXT]

Top row: val_bpb against training time and against step, one line per run (the `step:N/T val_loss:... val_bpb:...`
lines of logs/<RUN_ID>.txt or a record's train_seed<N>.log). Bottom row: each run minus the first (baseline) run,
the baseline interpolated linearly at the run's own points where both curves exist, so gains of a few thousandths of
a bit per byte stay visible. A record folder may be given instead of a log: its train_seed*.log are plotted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speedrun.analysis.run_log import parse_log


def curves(path: Path) -> tuple[str, list[float], list[float], list[float]]:
    """(label, steps, train seconds, val_bpb) of a log's periodic validation lines."""
    log = parse_log(path)
    rows = sorted(log.val_steps, key=lambda r: r["step"])
    steps = [float(r["step"]) for r in rows]
    seconds = [float(r.get("train_time", 0)) / 1000.0 for r in rows]
    bpb = [float(r["val_bpb"]) for r in rows]
    return log.label, steps, seconds, bpb


def difference(x_base, y_base, x, y):
    """y - baseline at the points of x inside the baseline's range (np.interp: the baseline is piecewise linear)."""
    import numpy as np

    x, y, x_base, y_base = map(np.asarray, (x, y, x_base, y_base))
    if len(x_base) == 0 or len(x) == 0:
        return np.array([]), np.array([])
    order = np.argsort(x_base, kind="stable")
    x_base, y_base = x_base[order], y_base[order]
    inside = (x >= x_base[0]) & (x <= x_base[-1])
    return x[inside], y[inside] - np.interp(x[inside], x_base, y_base)


def expand(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("train_seed*.log"))
            if not found:
                raise SystemExit(f"error: {p}: no train_seed*.log in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: {p}: no such file")
    return out


def plot(paths: list[Path], out: Path, labels: list[str] | None = None, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [curves(p) for p in paths]
    for path, (_, steps, _, _) in zip(paths, runs):
        if not steps:
            raise SystemExit(f"error: {path}: no `step:N/T val_loss:... val_bpb:...` lines to plot")
    if labels:
        if len(labels) != len(runs):
            raise SystemExit(f"error: --labels has {len(labels)} names for {len(runs)} logs")
        runs = [(label, *run[1:]) for label, run in zip(labels, runs)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    longest = max(max(run[2]) for run in runs)
    unit, scale = ("min", 60.0) if longest >= 120 else ("s", 1.0)
    runs = [(label, steps, [s / scale for s in secs], bpb) for label, steps, secs, bpb in runs]
    base_label, base_steps, base_times, base_bpb = runs[0]
    for i, (label, steps, times, bpb) in enumerate(runs):
        color = f"C{i % 10}"
        axes[0, 0].plot(times, bpb, "o-", ms=3, color=color, label=label)
        axes[0, 1].plot(steps, bpb, "o-", ms=3, color=color, label=label)
        for col, (xb, x) in enumerate(((base_times, times), (base_steps, steps))):
            dx, dy = difference(xb, base_bpb, x, bpb)
            axes[1, col].plot(dx, dy, "o-" if i else "-", ms=3, color=color, label=label)
    for col in range(2):
        axes[1, col].axhline(0.0, color="0.5", lw=0.8)
        axes[1, col].set_ylabel(f"val_bpb − {base_label}")
        axes[0, col].set_ylabel("val_bpb")
        for row in range(2):
            axes[row, col].grid(True, alpha=0.3)
    axes[1, 0].set_xlabel(f"training time ({unit})")
    axes[1, 1].set_xlabel("step")
    axes[0, 1].legend(fontsize=8)
    # Zoom the upper panels onto the later part of training, where the runs differ by little
    all_bpb = sorted(v for run in runs for v in run[3])
    if len(all_bpb) >= 8:
        low, high = all_bpb[0], all_bpb[int(0.75 * (len(all_bpb) - 1))]
        if high > low:
            pad = 0.05 * (high - low)
            for col in range(2):
                axes[0, col].set_ylim(low - pad, high + pad)
    fig.suptitle(title or f"validation bits per byte ({len(runs)} runs; difference to {base_label} below)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun plot", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG",
                        help="training logs or record folders; the first is the baseline")
    parser.add_argument("--out", required=True, help="output image (.png)")
    parser.add_argument("--labels", help="comma-separated names, one per log (default: each run's RUN_ID)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    paths = expand(args.logs)
    plot(paths, Path(args.out), args.labels.split(",") if args.labels else None, args.title)
    print(f"wrote {args.out} ({len(paths)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

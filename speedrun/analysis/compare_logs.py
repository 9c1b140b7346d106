#!/usr/bin/env python3
"""
Our training loss against parameter-golf's (or any other log's), per token trained on.

  speedrun compare-logs OURS.txt PEER.txt --out parity.png
      [--ours-tokens-per-step N] [--peer-tokens-per-step N] [--labels ours,parameter-golf] [--title TEXT]

Both logs are read for their `step:N/M train_loss:X ...` lines. A log that starts with our embedded code (`#### file
NAME bytes=N ...`) is read by speedrun.analysis.run_log, the one reader of our logs; any other log is read as parameter-golf's:
its script text, printed before its first line of 100 `=`, is skipped, and every later line that starts with
`step:N/M train_loss:X` counts. A step is turned into tokens with the log's tokens per step: the flag if given, else
what the log states (ours: `hparam train_batch_tokens=N`; parameter-golf: `train_batch_tokens:N train_seq_len:...`).
Either log may be of either kind (two of our runs, or two of theirs, compare the same way).

Writes a PNG with two panels, both losses against tokens and their difference (ours minus peer, the peer interpolated
linearly), and prints a table: the two losses at a quarter, half, three quarters and the end of the token range both
logs cover, and the mean difference over the last 20% of that range.

What a train-loss comparison can and cannot show: each logged value is the loss of one step's batch, so the two curves
are comparable point by point only when both runs read the same documents in the same order (ours with DOC_SHUFFLE=0;
parameter-golf always reads the shards in order). Ours does not score a document's last token against the next
document's BOS and never attends across documents; parameter-golf does both, which shifts its train loss. The common
evaluator (eval_ttt.py on both final models) is the comparison that counts; this plot shows where in training two runs
part ways. Bad input: one line `error: <file>: <problem>`, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
from data.files import write_atomic
from speedrun.analysis.curves import LogError, LossCurve, at, common_range, difference, fit_y_to_bulk, read_curve

TABLE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
LAST_FRACTION = 0.2


@dataclass
class Summary:
    rows: list[tuple[float, float, float]]  # (tokens, ours, peer)
    last_from: float
    last_to: float
    last_points: int
    last_mean_difference: float


def summarize(ours: LossCurve, peer: LossCurve) -> Summary:
    lo, hi = common_range(ours, peer)
    marks = [lo + f * (hi - lo) for f in TABLE_FRACTIONS]
    rows = [(t, float(at(ours, t)), float(at(peer, t))) for t in marks]
    points, diff = difference(ours, peer)
    start = hi - LAST_FRACTION * (hi - lo)
    last = points >= start
    return Summary(rows, start, hi, int(last.sum()), float(diff[last].mean()))


def summary_text(ours: LossCurve, peer: LossCurve, summary: Summary) -> str:
    width = max(len(ours.label), len(peer.label), 10)
    lines = [f"{'tokens':>12}  {ours.label:>{width}}  {peer.label:>{width}}  {'difference':>10}"]
    for tokens, a, b in summary.rows:
        lines.append(f"{tokens:>12,.0f}  {a:>{width}.4f}  {b:>{width}.4f}  {a - b:>+10.4f}")
    lines.append(f"mean difference ({ours.label} - {peer.label}) over the last {LAST_FRACTION:.0%} of the common"
                 f" range (tokens {summary.last_from:,.0f}..{summary.last_to:,.0f}, {summary.last_points} points):"
                 f" {summary.last_mean_difference:+.4f}")
    for c in (ours, peer):
        lines.append(f"{c.label}: {len(c.steps)} logged steps, {c.tokens_per_step:,} tokens per step"
                     f" (from the {c.tokens_per_step_source})")
    return "\n".join(lines)


def plot(ours: LossCurve, peer: LossCurve, out: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    scale, unit = (1e6, "M") if max(ours.tokens[-1], peer.tokens[-1]) >= 1e6 else (1e3, "k")
    for i, c in enumerate((ours, peer)):
        top.plot(c.tokens / scale, c.losses, "o-", ms=2.5, lw=1, color=f"C{i}", label=c.label)
    points, diff = difference(ours, peer)
    bottom.plot(points / scale, diff, "o-", ms=2.5, lw=1, color="C2")
    lo, hi = common_range(ours, peer)
    start = hi - LAST_FRACTION * (hi - lo)
    last = points >= start
    mean = float(diff[last].mean())
    bottom.hlines(mean, start / scale, hi / scale, colors="C3", lw=2,
                  label=f"mean over the last {LAST_FRACTION:.0%}: {mean:+.4f}")
    bottom.axhline(0.0, color="0.5", lw=0.8)
    top.set_ylabel("train loss (nats per token)")
    bottom.set_ylabel(f"{ours.label} − {peer.label}")
    bottom.set_xlabel(f"tokens trained on ({unit})")
    fit_y_to_bulk(top, np.concatenate([ours.losses, peer.losses]))
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"train loss per token: {ours.label} vs {peer.label}")
    fig.tight_layout()
    try:
        write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="speedrun compare-logs", description=__doc__.strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ours", help="our training log (logs/<RUN_ID>.txt)")
    parser.add_argument("peer", help="the other log (parameter-golf's logs/<RUN_ID>.txt, or any log with"
                                     " `step:N/M train_loss:X` lines)")
    parser.add_argument("--out", required=True, help="output image (.png)")
    parser.add_argument("--ours-tokens-per-step", type=int, help="default: the log's hparam train_batch_tokens")
    parser.add_argument("--peer-tokens-per-step", type=int, help="default: the log's train_batch_tokens")
    parser.add_argument("--labels", default="ours,parameter-golf", help="two comma-separated names")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    labels = args.labels.split(",")
    if len(labels) != 2 or not all(labels):
        parser.error(f"--labels needs two comma-separated names, got {args.labels!r}")
    try:
        ours = read_curve(args.ours, labels[0], args.ours_tokens_per_step)
        peer = read_curve(args.peer, labels[1], args.peer_tokens_per_step)
        try:
            common_range(ours, peer)
        except ValueError as e:
            raise LogError(args.peer, str(e)) from None
        summary = summarize(ours, peer)
        plot(ours, peer, Path(args.out), args.title)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_text(ours, peer, summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

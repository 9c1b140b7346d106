#!/usr/bin/env python3
"""
compare_logs.py: our training loss against parameter-golf's (or any other log's), per token trained on.

  python tools/compare_logs.py OURS.txt PEER.txt --out parity.png
      [--ours-tokens-per-step N] [--peer-tokens-per-step N] [--labels ours,parameter-golf] [--title TEXT]

Both logs are read for their `step:N/M train_loss:X ...` lines. A log that starts with our embedded code (`#### file
NAME bytes=N ...`) is read by tools/run_log.py, the one reader of our logs; any other log is read as parameter-golf's:
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
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, tools/ is on the path but the repository root is not
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data.files import write_atomic  # noqa: E402
from run_log import TrainLog, parse_log  # noqa: E402

STEP_LINE = re.compile(r"step:(\d+)/(\d+) train_loss:(\S+)")
PEER_BATCH_LINE = re.compile(r"train_batch_tokens:(\d+)(?:\s|$)")
PEER_CODE_END = "=" * 100  # parameter-golf prints its own source, then this line
TABLE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
LAST_FRACTION = 0.2


class LogError(Exception):
    """Bad input: reported as `error: <path>: <problem>`."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class LossCurve:
    label: str
    steps: np.ndarray  # int, ascending, unique
    losses: np.ndarray  # float
    tokens_per_step: int
    tokens_per_step_source: str  # "flag" or "log"

    @property
    def tokens(self) -> np.ndarray:
        return self.steps.astype(np.float64) * self.tokens_per_step


def _our_log(path: Path) -> tuple[dict[int, float], int | None]:
    """(step -> train loss, stated tokens per step) of one of our logs, through run_log.parse_log."""
    log = parse_log(path)
    damaged = [p for p in log.problems if "embedded" in p or "#### file" in p or "unreadable line" in p]
    if damaged:
        raise LogError(path, damaged[0])
    return _train_losses(log), _stated_tokens_per_step(log)


def _train_losses(log: TrainLog) -> dict[int, float]:
    path = log.path
    losses = {}
    for row in log.train_steps:
        value = row["train_loss"]
        if not isinstance(value, (int, float)):
            raise LogError(path, f"train_loss {value!r} at step {row['step']} is not a number")
        losses[row["step"]] = float(value)  # a resumed run may repeat steps: the last value counts
    return losses


def _stated_tokens_per_step(log: TrainLog) -> int | None:
    stated = log.hparams.get("train_batch_tokens")
    return int(stated) if stated and stated.isdigit() else None


def _peer_log(path: Path, data: bytes) -> tuple[dict[int, float], int | None]:
    """(step -> train loss, stated tokens per step) of a parameter-golf log."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if PEER_CODE_END in lines:  # the script's own text comes first
        lines = lines[lines.index(PEER_CODE_END) + 1:]
    stated, losses = None, {}
    for line in lines:
        m = PEER_BATCH_LINE.match(line)
        if m and stated is None:
            stated = int(m.group(1))
        m = STEP_LINE.match(line)
        if m:
            try:
                losses[int(m.group(1))] = float(m.group(3))
            except ValueError:
                raise LogError(path, f"train_loss {m.group(3)!r} on line `{line.strip()[:80]}` is not a number") from None
    return losses, stated


def read_curve(path: str | os.PathLike, label: str, tokens_per_step: int | None = None) -> LossCurve:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LogError(path, "no such file" if isinstance(e, FileNotFoundError) else f"cannot read: {e.strerror}")
    losses, stated = _our_log(path) if data.startswith(b"#### file ") else _peer_log(path, data)
    return _curve(path, label, losses, stated, tokens_per_step)


def curve_of_log(log: TrainLog, label: str) -> LossCurve:
    """The curve of one of our logs already read by run_log.parse_log (its own tokens per step)."""
    return _curve(log.path, label, _train_losses(log), _stated_tokens_per_step(log), None)


def _curve(path, label: str, losses: dict[int, float], stated: int | None, tokens_per_step: int | None) -> LossCurve:
    if not losses:
        raise LogError(path, "no `step:N/M train_loss:X` lines")
    if tokens_per_step is None:
        if stated is None:
            raise LogError(path, "the log does not say how many tokens a step trains on (no `hparam"
                                 " train_batch_tokens=N` or `train_batch_tokens:N` line); give it with the flag")
        tokens_per_step, source = stated, "log"
    else:
        source = "flag"
    if tokens_per_step <= 0:
        raise LogError(path, f"tokens per step must be positive, got {tokens_per_step}")
    steps = np.array(sorted(losses), dtype=np.int64)
    return LossCurve(label, steps, np.array([losses[s] for s in steps]), tokens_per_step, source)


def common_range(a: LossCurve, b: LossCurve) -> tuple[float, float]:
    lo, hi = max(a.tokens[0], b.tokens[0]), min(a.tokens[-1], b.tokens[-1])
    if lo > hi:
        raise ValueError(f"its tokens {b.tokens[0]:,.0f}..{b.tokens[-1]:,.0f} do not overlap with {a.label}'s"
                         f" {a.tokens[0]:,.0f}..{a.tokens[-1]:,.0f}")
    return lo, hi


def at(curve: LossCurve, tokens) -> np.ndarray:
    """The curve's loss at these token counts, linear between logged steps."""
    return np.interp(tokens, curve.tokens, curve.losses)


def common_points(curves: list[LossCurve]) -> np.ndarray:
    """Every logged token count of any of the curves inside the range all of them cover (empty when they do not
    overlap): the points at which curves are compared, each interpolated linearly (`at`)."""
    if not curves:
        return np.array([])
    lo, hi = max(c.tokens[0] for c in curves), min(c.tokens[-1] for c in curves)
    points = np.unique(np.concatenate([c.tokens for c in curves]))
    return points[(points >= lo) & (points <= hi)]


def difference(ours: LossCurve, peer: LossCurve) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, ours - peer) at every logged point of either curve inside the range both cover."""
    common_range(ours, peer)  # raises when they do not overlap
    points = common_points([ours, peer])
    return points, at(ours, points) - at(peer, points)


def fit_y_to_bulk(ax, values: np.ndarray) -> None:
    """On a long run the first steps (loss ~7) would squash the rest of the curve: the y axis spans the lowest value to
    the 95th percentile, with 5% margins. Short curves (fewer than 40 finite values) are shown whole."""
    finite = values[np.isfinite(values)]
    if len(finite) >= 40:
        low, high = finite.min(), np.quantile(finite, 0.95)
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))


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
    parser = OneLineParser(prog="compare_logs.py", description=__doc__.strip(),
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

"""Training-loss curves against tokens trained on, from any log dialect (read by run_log), and the helpers that compare
them: interpolation at common token counts and a y range that fits the bulk of a long curve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedrun.analysis.run_log import TrainLog, parameter_golf_train_losses, parse_log




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
    """(step -> train loss, stated tokens per step) of a parameter-golf log, read by run_log."""
    losses, stated = parameter_golf_train_losses(data.decode("utf-8", errors="replace"))
    for step, value in losses.items():
        if not isinstance(value, float):
            raise LogError(path, f"train_loss {value!r} at step {step} is not a number")
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

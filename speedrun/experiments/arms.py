"""
Trainings of two arms, seed by seed, and what their logs say. The machinery that
speedrun.experiments.experiment (an idea against the baseline) and speedrun.records.reproduce (a record against the record it beat) share,
written once:

  Run              one training: its arm, seed, environment, command, working folder, and where its console output
                   and its train log go
  execute          a list of runs in order, at most `jobs` at once; the first failure stops the others and raises
                   RunFailed
  keep_failure     the failing run's last TAIL_LINES lines of output: on stderr and in a file
  log_figures      a log's figures: val_loss, val_bpb, steps, train tokens, train time, tokens/s, steps/s (the
                   training clock: the `final` line's steps and train_time with the log's train_batch_tokens)
  arm_statistics   per arm: n, mean ± std of val_loss and val_bpb, mean speed
  difference       between arms: the difference of the means and the one-sided Welch p that the second arm's
                   val_loss is lower by a margin (speedrun.records.check's welch_test: the statistics of a record claim)
  thread_env       OMP_NUM_THREADS and MKL_NUM_THREADS for `jobs` runs at once
  OutputFolder     experiments/<stem>/: built in a temporary sibling, renamed into place when complete, a failing
                   run's tail beside it in <stem>.failed.log
  UsageError, OneLineParser, folder_date: bad input as one line `error: ...` (exit status 2)

Logs are read only through speedrun.analysis.run_log's parse_log. No torch here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

from data.files import write_atomic
from speedrun.stats import mean_std, welch_test
from speedrun.analysis.run_log import TrainLog, parse_log

TAIL_LINES = 30


class UsageError(Exception):
    """Bad input: reported as one line `error: <message>`, exit status 2, before anything is run or written."""


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments raise UsageError instead of printing the usage."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def folder_date(value: str | None) -> str:
    """--date: YYYY-MM-DD, default today."""
    try:
        return datetime.date.fromisoformat(value).isoformat() if value else datetime.date.today().isoformat()
    except ValueError:
        raise UsageError(f"--date {value!r}: expected YYYY-MM-DD") from None


@dataclass(eq=False)  # a run is itself: hashable by identity
class Run:
    arm: str
    seed: int
    env: dict[str, str]
    log: Path  # where its train log ends up
    command: list[str]
    cwd: Path
    console: Path  # its stdout and stderr, as they came
    title: str = ""  # what messages call its arm (default: the arm)
    cache_fields: dict | None = None  # speedrun.experiments.experiment's baseline runs: what the cache key is made of
    cached: bool = False
    train_log: TrainLog | None = None

    @property
    def run_id(self) -> str:
        return f"{self.arm}_seed{self.seed}"

    @property
    def name(self) -> str:
        return self.title or self.arm


class RunFailed(Exception):
    """A run ended without a usable result."""

    def __init__(self, run: Run, reason: str):
        super().__init__(f"{run.name} run, seed {run.seed}: {reason}")
        self.run, self.reason = run, reason


def relative(path: Path) -> str:
    """The path relative to the repository when it is inside it, else absolute (POSIX form)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


@lru_cache(maxsize=1)
def gpu_names() -> tuple[str, ...]:
    """The GPUs `nvidia-smi -L` lists (names without UUIDs), as run.sh counts them; () without any."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(re.sub(r"\s*\(UUID:.*\)$", "", line.split(":", 1)[1]).strip()
                 for line in listing.splitlines() if line.startswith("GPU"))


def hardware() -> str:
    names = gpu_names()
    return f"{len(names)} x {', '.join(sorted(set(names)))}" if names else "cpu"


def thread_env(jobs: int) -> dict[str, str]:
    """With jobs > 1, each run's share of the cores (torch's thread count follows OMP_NUM_THREADS); with one job, the
    environment's settings stay as they are."""
    if jobs <= 1:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def replace_dir(src: Path, dest: Path) -> None:
    """Rename src to dest; an existing dest is moved aside first and removed after."""
    old = dest.parent / f".{dest.name}.old{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


class OutputFolder:
    """What a tool that writes experiments_dir/<stem>/ shares (a mixin: the class has `experiments_dir` and `stem`).
    The folder is built in a hidden temporary sibling, `work`, and renamed into place by publish() once complete; a
    failing run's tail goes to <stem>.failed.log beside it."""

    @property
    def folder(self) -> Path:
        return self.experiments_dir / self.stem

    @property
    def work(self) -> Path:
        return self.experiments_dir / f".{self.stem}.tmp{os.getpid()}"

    @property
    def failed_log(self) -> Path:
        return self.experiments_dir / f"{self.stem}.failed.log"

    def run(self, arm: str, seed: int, env: dict[str, str], command: list[str], cwd: Path, title: str = "") -> Run:
        """A run whose train log goes to work/logs/<arm>_seed<N>.txt and console output to work/console/."""
        return Run(arm, seed, env, log=self.work / "logs" / f"{arm}_seed{seed}.txt", command=command, cwd=cwd,
                   console=self.work / "console" / f"{arm}_seed{seed}.out", title=title)

    def publish(self, scratch: tuple[str, ...]) -> None:
        """Remove the scratch folders from work, rename it to the folder (replacing an older one), and remove the
        tail an earlier failure left (no longer news)."""
        for name in scratch:
            shutil.rmtree(self.work / name, ignore_errors=True)
        replace_dir(self.work, self.folder)
        self.failed_log.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Running


def has_result(log: TrainLog) -> bool:
    final = log.final or {}
    return all(isinstance(final.get(k), (int, float)) and math.isfinite(final[k]) for k in ("val_loss", "val_bpb"))


def finished_log(run: Run, status: int) -> TrainLog:
    """A finished run's log, when it has a result and its seed; RunFailed otherwise."""
    if status != 0:
        raise RunFailed(run, f"exit status {status}")
    if not run.log.is_file():
        raise RunFailed(run, f"no train log at {relative(run.log)}")
    log = parse_log(run.log)
    if not has_result(log):
        raise RunFailed(run, "no `final val_loss:... val_bpb:...` line in its log")
    if log.seed != run.seed:
        raise RunFailed(run, f"its log says seed {log.seed}, not {run.seed}")
    return log


def start(run: Run) -> subprocess.Popen:
    run.console.parent.mkdir(parents=True, exist_ok=True)
    with open(run.console, "wb") as out:
        return subprocess.Popen(run.command, cwd=run.cwd, env=run.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a run this tool started (its whole process group: run.sh's python, or torchrun and its workers)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def result_text(run: Run) -> str:
    return f"val_loss {run.train_log.final['val_loss']:.6f} val_bpb {run.train_log.final['val_bpb']:.6f}"


def execute(runs: list[Run], jobs: int, check: Callable[[Run, int], None], say: Callable[[str], None],
            lookup: Callable[[Run], bool] | None = None, store: Callable[[Run], None] | None = None) -> None:
    """These runs, at most `jobs` at once, in their order. lookup(run) True: its result is already there (cached), it
    is not run. check(run, exit status) sets run.train_log or raises RunFailed; store(run) follows a good run. The
    first failure stops the runs still going and raises."""
    total = len(runs)
    pending: deque[Run] = deque()
    for run in runs:
        if lookup is not None and lookup(run):
            say(f"{run.run_id}: cached ({result_text(run)})")
        else:
            pending.append(run)
    active: dict[Run, tuple[subprocess.Popen, float]] = {}
    done = total - len(pending)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.popleft()
                say(f"{run.run_id}: running ({done + len(active) + 1}/{total})")
                active[run] = (start(run), time.monotonic())
            _wait_a_little(active)
            for run, (proc, started) in list(active.items()):
                status = proc.poll()
                if status is None:
                    continue
                del active[run]
                check(run, status)
                if store is not None:
                    store(run)
                done += 1
                say(f"{run.run_id}: done in {time.monotonic() - started:.1f} s ({result_text(run)})")
    finally:
        for proc, _ in active.values():
            stop(proc)


def _wait_a_little(active: dict) -> None:
    """Until the one active run ends (at most a second), or a moment when several are running."""
    if len(active) == 1:
        proc, _ = next(iter(active.values()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    else:
        time.sleep(0.05)


def tail(run: Run) -> list[str]:
    """The failing run's last lines of output (stdout and stderr as they came), else of its train log."""
    for path in (run.console, run.log):
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            if lines:
                return lines[-TAIL_LINES:]
    return []


def keep_failure(failure: RunFailed, failed_log: Path, heading: str, command: str, not_written: str) -> None:
    """The failing run's tail: written to failed_log under `# heading` and `# command: command`, and on stderr after
    one line `error: <failure>; no <not_written> written; ...`."""
    lines = tail(failure.run)
    text = (f"# {heading}\n# command: {command}\n# its last {len(lines)} lines of output:\n"
            + "".join(line + "\n" for line in lines))
    write_atomic(failed_log, text.encode())
    print(f"error: {failure}; no {not_written} written; its last {len(lines)} lines of output (kept in "
          f"{relative(failed_log)}):", file=sys.stderr)
    for line in lines:
        print(f"  | {line}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# Figures and statistics


def log_figures(log: TrainLog) -> dict:
    """A finished run's figures, from its log: the `final` line (val_loss, val_bpb, steps, train_time) and the batch."""
    final = log.final
    steps, train_ms = int(final["steps"]), float(final["train_time"])
    batch = int(log.hparams.get("train_batch_tokens", "0"))
    seconds = train_ms / 1000
    return {"val_loss": float(final["val_loss"]), "val_bpb": float(final["val_bpb"]), "steps": steps,
            "train_tokens": steps * batch, "train_time_ms": train_ms,
            "tokens_per_s": steps * batch / seconds if seconds > 0 else None,
            "steps_per_s": steps / seconds if seconds > 0 else None}


def run_result(run: Run) -> dict:
    return {"arm": run.arm, "seed": run.seed, **log_figures(run.train_log), "log": f"logs/{run.log.name}",
            "cached": run.cached}


def finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def arm_statistics(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in ("val_loss", "val_bpb"):
        mean, std = mean_std([r[key] for r in rows])
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    for key in ("tokens_per_s", "steps_per_s"):
        values = [r[key] for r in rows if r[key] is not None]
        out[f"{key}_mean"] = mean_std(values)[0] if values else None
    return out


def difference(baseline: list[dict], variant: list[dict], margin: float = 0.0) -> dict:
    """Variant mean minus baseline mean, and the one-sided Welch p that the variant's val_loss is lower than the
    baseline's by more than `margin` nats (n/a with fewer than 2 runs per arm)."""
    out = {key: mean_std([r[key] for r in variant])[0] - mean_std([r[key] for r in baseline])[0]
           for key in ("val_loss", "val_bpb")}
    if len(baseline) >= 2 and len(variant) >= 2:
        w = welch_test([r["val_loss"] for r in variant], [r["val_loss"] for r in baseline], margin=margin)
        out.update(p_variant_lower=w.p, welch_t=finite(w.t), welch_dof=finite(w.dof))
    else:
        out.update(p_variant_lower=None, welch_t=None, welch_dof=None)
    return out


def num(x, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)

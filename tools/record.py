#!/usr/bin/env python3
"""
record.py: package, verify and rank speedrun records. Standard library only (no torch needed to check a record),
but for the dataset fingerprint, which uses tools/audit.py when the record's dataset is on the machine.

A record is a folder records/<track>/<YYYY-MM-DD>_<Name>/ holding README.md, submission.json, the exact code that
produced it (train_gpt.py, kernels/*.py, eval_ttt.py: copied out of the training logs, which embed it byte for byte),
one training log per seed (train_seed<N>.log) and, optionally, the evaluation results of eval_ttt.py
(eval_results.json). The record runs from inside its folder.

  python tools/record.py new --name NAME --track TRACK LOG [LOG ...] [--eval RESULTS.json] [--author A] [--blurb TEXT]
                             [--date YYYY-MM-DD] [--records-dir DIR] [--no-record] [--margin M] [--alpha A]
  python tools/record.py verify PATH [PATH ...] [--margin M] [--alpha A]
  python tools/record.py leaderboard [--check] [--readme README.md] [--records-dir DIR]

verify checks, for each record (a folder with submission.json; a PATH that is not one is searched for them):
  code        every *.py in the folder equals, byte for byte, the code embedded in every log; no embedded file missing
  numbers     submission.json equals what the logs (and eval_results.json) say; eval_results.json is self-consistent
  logs        complete (final line last), no `error:` line, every loss finite, seeds distinct and matching file names,
              the same configuration in every log (all hparams but seed and the run's paths)
  track       the track is known or its name parses; train_time <= the track's budget (a run stopped by its own
              MAX_WALLCLOCK_SECONDS <= budget may overrun by one average step: the cap is checked after each step;
              evaluation time is not counted); hardware: the GPU model in the `gpus:` line and world_size <= the
              track's GPUs, or no GPU for a cpu track
  dataset     when a log's DATA_PATH (relative to the repository) is on this machine, tools/audit.py's fingerprint of
              it equals the log's: tokenizer sha256, val_data documents/tokens/bytes, number of train shards (this
              check imports numpy, sentencepiece and torch; without them it is skipped with a warning)
  statistics  one-sided Welch t-test of the seeds' final val_loss against the previous record of the track (the best
              record dated strictly earlier, by mean val_loss, among records/<track>/*/ with "record": true):
              H0: new_mean >= prev_mean - margin. A submission that claims "record": true fails when p >= alpha
              (or when it has fewer than 2 seeds and a previous record exists); with "record": false it is only
              reported.
Exit status 0 only when every check of every record holds; otherwise one line per failed check, naming the file.
`new` builds the folder, runs the same checks on it and writes nothing when one fails (a submission that does not
beat the previous record significantly can go in with --no-record). `leaderboard` ranks every submission.json of a
track by mean val_bpb.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MARGIN = 0.005  # nats of val_loss a new record must beat the previous one by
DEFAULT_ALPHA = 0.01
START_MARKER = "<!-- leaderboard:start -->"
END_MARKER = "<!-- leaderboard:end -->"
EVAL_FILE = "eval_results.json"
SKIP_DIRS = {"logs", "checkpoints", "results", "__pycache__", ".pytest_cache"}  # run outputs inside a record folder
# hparams that may differ between the seeds of one record: the seed and where each run read and wrote its files
PER_RUN_HPARAMS = {"seed", "run_id", "data_path", "tokenizer_path", "log_dir", "checkpoint_dir", "resume"}


class RecordError(Exception):
    """A problem that stops `new`; its message is one line."""


# ----------------------------------------------------------------------------------------------------------------------
# Tracks: named by hardware and training budget. Unknown names of the same shape are accepted with a warning.


@dataclass(frozen=True)
class Track:
    name: str
    budget_seconds: float  # training wall clock (train_time in the log), evaluation not included
    gpus: int  # 0 means CPU
    gpu_model: str  # substring of the GPU name, e.g. "H100"; "" for CPU
    known: bool = True

    def describe(self) -> str:
        hardware = "CPU" if self.gpus == 0 else f"{self.gpus}x {self.gpu_model}"
        return f"{hardware}, {self.budget_seconds / 60:g} min training"


TRACKS = {
    "8xh100_10min": Track("8xh100_10min", 600, 8, "H100"),
    "1xh100_10min": Track("1xh100_10min", 600, 1, "H100"),
    "cpu_5min": Track("cpu_5min", 300, 0, ""),
}
TRACK_PATTERN = re.compile(r"^(?:cpu|(\d+)x([a-z0-9]+))_(\d+)min$")


def get_track(name: str) -> Track:
    """The known track, or one read from a name like `4xa100_20min` / `cpu_10min` (flagged unknown)."""
    if name in TRACKS:
        return TRACKS[name]
    m = TRACK_PATTERN.match(name)
    if not m or int(m.group(3)) <= 0 or (m.group(1) is not None and int(m.group(1)) <= 0):
        raise RecordError(f"track {name!r}: not a known track ({', '.join(TRACKS)}) and not of the form "
                          f"<N>x<gpu>_<M>min or cpu_<M>min")
    gpus = int(m.group(1)) if m.group(1) else 0
    return Track(name, 60.0 * int(m.group(3)), gpus, (m.group(2) or "").upper(), known=False)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# Training logs (written by train_gpt.py, rank 0)

_KV = re.compile(r"(\w+):(\S+)")


@dataclass
class TrainLog:
    path: Path
    code: dict[str, bytes] = field(default_factory=dict)  # embedded files, in log order
    problems: list[str] = field(default_factory=list)  # the log is damaged or incomplete
    versions: dict[str, str] = field(default_factory=dict)
    gpus: str = ""
    hparams: dict[str, str] = field(default_factory=dict)
    attention_backend: str = ""
    fused_ops: str = ""
    tokenizer_sha256: str = ""
    val_data: dict[str, int] = field(default_factory=dict)
    train_data: dict[str, int] = field(default_factory=dict)
    run: dict[str, int] = field(default_factory=dict)  # model_params, world_size, grad_accum, micro_batch_tokens
    train_steps: list[dict] = field(default_factory=list)
    val_steps: list[dict] = field(default_factory=list)
    final_evals: list[dict] = field(default_factory=list)
    final: dict | None = None
    stopped_early: bool = False
    checkpoint: str = ""  # the final checkpoint's path
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        try:
            return int(self.hparams["seed"])
        except (KeyError, ValueError):
            return None

    @property
    def label(self) -> str:
        return self.hparams.get("run_id") or self.path.stem

    def final_eval(self, mode: str) -> dict | None:
        found = [e for e in self.final_evals if e.get("mode") == mode]
        return found[-1] if found else None


def _number(text: str) -> float | int:
    text = text.removesuffix("ms").removesuffix("MiB")
    try:
        return int(text)
    except ValueError:
        return float(text)  # may be nan/inf; checked by the caller


def _fields(line: str) -> dict:
    """`step:3/20 val_loss:5.1 train_time:12ms` -> {'step': '3/20', 'val_loss': 5.1, 'train_time': 12}."""
    out = {}
    for key, value in _KV.findall(line):
        if key in ("step", "mode"):
            out[key] = value
        else:
            try:
                out[key] = _number(value)
            except ValueError:
                out[key] = value
    return out


def _split_step(value: str) -> tuple[int, int]:
    step, total = value.split("/")
    return int(step), int(total)


def _parse_embedded(data: bytes, log: TrainLog) -> int:
    """Read the `#### file NAME bytes=N sha256=H` blocks at the top of a log; returns where the text lines begin."""
    pos = 0
    header = re.compile(rb"#### file (\S+) bytes=(\d+) sha256=([0-9a-f]{64})\n")
    while data.startswith(b"#### file ", pos):
        m = header.match(data, pos)
        if not m:
            log.problems.append("malformed `#### file` header")
            return len(data)
        name, size, digest = m.group(1).decode(), int(m.group(2)), m.group(3).decode()
        start = m.end()
        content = data[start:start + size]
        trailer = f"\n#### end {name}\n".encode()
        if len(content) < size or not data.startswith(trailer, start + size):
            log.problems.append(f"embedded {name} is truncated or not followed by `#### end {name}`")
            return len(data)
        if hashlib.sha256(content).hexdigest() != digest:
            log.problems.append(f"embedded {name} does not match its sha256 {digest[:12]}...")
        if name in log.code:
            log.problems.append(f"embedded {name} appears twice")
        log.code[name] = content
        pos = start + size + len(trailer)
    if not log.code:
        log.problems.append("no embedded code (`#### file` blocks) at the top")
    return pos


def parse_log(path: str | os.PathLike) -> TrainLog:
    path = Path(path)
    log = TrainLog(path)
    data = path.read_bytes()
    text_start = _parse_embedded(data, log)
    text = data[text_start:].decode("utf-8", errors="replace")
    lines = [line for line in text.split("\n") if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:") or line.startswith("stopped by SIGTERM"):
            log.errors.append(line)
        elif line.startswith("versions: "):
            log.versions = dict(_KV.findall(line))
        elif line.startswith("gpus: "):
            log.gpus = line[len("gpus: "):]
        elif line.startswith("hparam "):
            name, _, value = line[len("hparam "):].partition("=")
            log.hparams[name] = value
        elif line.startswith("attention_backend: "):
            log.attention_backend = line.split(": ", 1)[1]
        elif line.startswith("fused_ops: "):
            log.fused_ops = line.split(": ", 1)[1]
        elif line.startswith("tokenizer: "):
            m = re.search(r"sha256:([0-9a-f]{64})", line)
            log.tokenizer_sha256 = m.group(1) if m else ""
        elif line.startswith("val_data: "):
            log.val_data = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("train_data: "):
            log.train_data = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("model_params:"):
            log.run = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("checkpoint: ") and "(resumable" not in line:
            log.checkpoint = line[len("checkpoint: "):].strip()
        elif line.startswith("stopping_early:"):
            log.stopped_early = True
        elif line.startswith("step:"):
            f = _fields(line)
            try:
                f["step"], f["total"] = _split_step(f["step"])
            except ValueError:
                log.problems.append(f"unreadable line: {line[:80]}")
                continue
            (log.val_steps if "val_loss" in f else log.train_steps).append(f)
        elif line.startswith("final_eval "):
            log.final_evals.append(_fields(line))
        elif line.startswith("final "):
            log.final = _fields(line)
            if i != len(lines) - 1:
                log.problems.append("the `final` line is not the last line")
    for kind, rows in (("step", log.train_steps + log.val_steps), ("final_eval", log.final_evals),
                       ("final", [log.final] if log.final else [])):
        for row in rows:
            for key, value in row.items():
                numeric = key in ("train_loss", "val_loss", "val_bpb") or isinstance(value, float)
                if numeric and not (isinstance(value, (int, float)) and math.isfinite(value)):
                    where = f" at step {row['step']}" if "step" in row else ""
                    log.problems.append(f"{key} is {value}{where} ({kind} line)")
    if log.final is None:
        log.problems.append("incomplete: no `final val_loss:... val_bpb:...` line")
    else:
        for key in ("val_loss", "val_bpb", "mode", "steps", "train_time"):
            if key not in log.final:
                log.problems.append(f"the `final` line has no {key}")
        fe = log.final_eval(log.final["mode"]) if "mode" in log.final else None
        if "mode" in log.final and fe is None:
            log.problems.append(f"no `final_eval mode:{log.final['mode']}` line for the final mode")
        for key in ("val_loss", "val_bpb"):
            if fe is not None and key in log.final and fe.get(key) != log.final[key]:
                log.problems.append(f"the `final` line's {key} {log.final[key]} differs from its final_eval line's "
                                    f"{fe.get(key)}")
    for line in log.errors:
        log.problems.append(f"run failed: {line[:120]}")
    if log.seed is None:
        log.problems.append("no `hparam seed=N` line")
    return log


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation results (eval_ttt.py's JSON)

# eval_ttt.py's config keys shown in a record's README (all its scalar config keys go into submission.json)
EVAL_PARAMETERS_SHOWN = ("window", "stride", "chunk", "lora_rank", "lora_lr", "lora_targets", "doc_batch", "seed",
                         "rope_ntk_alpha", "max_docs")


def eval_problems(results: dict) -> list[str]:
    """bpb and loss recomputed from the per-document rows, and the totals, within 1e-9 relative."""
    problems = []
    if not isinstance(results.get("config"), dict):
        problems.append("no `config` object")
    docs = results.get("docs")
    if not isinstance(docs, list) or not docs:
        return problems + ["no `docs` rows"]
    try:
        nats = math.fsum(float(d["nats"]) for d in docs)
        tokens = sum(int(d["tokens"]) for d in docs)
        nbytes = sum(int(d["bytes"]) for d in docs)
    except (KeyError, TypeError, ValueError):
        return problems + ["a `docs` row lacks nats, tokens or bytes"]
    if len({d.get("id") for d in docs}) != len(docs):
        problems.append("a document id appears twice in `docs`")
    if results.get("tokens") != tokens:
        problems.append(f"tokens {results.get('tokens')} != sum of docs' tokens {tokens}")
    if results.get("bytes") != nbytes:
        problems.append(f"bytes {results.get('bytes')} != sum of docs' bytes {nbytes}")
    expected = {"bpb": nats / math.log(2) / max(nbytes, 1), "loss": nats / max(tokens, 1)}
    for key, want in expected.items():
        got = results.get(key)
        if not isinstance(got, (int, float)) or not math.isfinite(got) or not _close(got, want, 1e-9):
            problems.append(f"{key} {got} != {want:.12g} recomputed from `docs`")
    return problems


def eval_summary(results: dict) -> dict:
    """The results JSON's totals and every scalar of its config (mode, window, stride, chunk, LoRA rank and lr, ...)."""
    config = results.get("config") or {}
    summary = {k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool))}
    summary.update({k: results.get(k) for k in ("bpb", "loss", "tokens", "bytes", "seconds", "tokens_per_s")})
    summary["docs"] = len(results.get("docs") or [])
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: mean, sample std, one-sided Welch t-test with the Student-t tail from the regularized incomplete beta


def mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry I_x(a,b)=1-I_{1-x}(b,a)
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom (dof may be fractional, as Welch's is)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass
class WelchResult:
    t: float
    dof: float
    p: float
    diff: float  # (prev_mean - margin) - new_mean: how far below the bar the new mean is

    def text(self) -> str:
        return f"t={self.t:.3f} dof={self.dof:.2f} p={self.p:.3g}"


def welch_test(new: list[float], prev: list[float], margin: float) -> WelchResult:
    """One-sided Welch t-test of H0: mean(new) >= mean(prev) - margin against H1: mean(new) < mean(prev) - margin.
    A sample with fewer than 2 values contributes no variance (and no degrees of freedom)."""
    if not new or not prev:
        raise ValueError("both samples need at least one value")
    new_mean, new_std = mean_std(new)
    prev_mean, prev_std = mean_std(prev)
    terms = [(std * std / len(xs), len(xs) - 1) for xs, std in ((new, new_std), (prev, prev_std)) if std is not None]
    var = sum(v for v, _ in terms)
    diff = (prev_mean - margin) - new_mean
    if var == 0.0:  # no spread at all: the sign of the difference decides
        return WelchResult(math.copysign(math.inf, diff) if diff else 0.0, math.nan, 0.0 if diff > 0 else 1.0, diff)
    dof = var * var / sum(v * v / k for v, k in terms)
    t = diff / math.sqrt(var)
    return WelchResult(t, dof, student_t_sf(t, dof), diff)


def _close(a: float, b: float, rel: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


# ----------------------------------------------------------------------------------------------------------------------
# submission.json: everything but the free fields is derived from the logs and the results JSON, so `verify` can
# rebuild it and compare.

FREE_FIELDS = ("name", "author", "date", "track", "blurb", "record")


def log_file_name(seed: int) -> str:
    return f"train_seed{seed}.log"


def seed_entry(lg: TrainLog) -> dict:
    fin = lg.final
    fe = lg.final_eval(fin["mode"]) or {}
    return {
        "seed": lg.seed, "log": log_file_name(lg.seed), "run_id": lg.hparams.get("run_id", ""),
        "val_bpb": fin["val_bpb"], "val_loss": fin["val_loss"], "steps": fin["steps"],
        "train_seconds": fin["train_time"] / 1000.0, "eval_mode": fin["mode"],
        "eval_seconds": fe.get("eval_time", 0) / 1000.0, "stopped_early": lg.stopped_early,
    }


def checkpoint_seed(results: dict, logs: list[TrainLog]) -> int | None:
    """The seed whose final checkpoint the results JSON evaluated (matched by file name), if any."""
    config = results.get("config") or {}
    names = {Path(v).name for k, v in config.items() if "checkpoint" in k and isinstance(v, str) and v.endswith(".pt")}
    seeds = [lg.seed for lg in logs if lg.checkpoint and Path(lg.checkpoint).name in names]
    return seeds[0] if len(seeds) == 1 else None


def derived_submission(logs: list[TrainLog], results: dict | None) -> dict:
    logs = sorted(logs, key=lambda lg: lg.seed)
    seeds = [seed_entry(lg) for lg in logs]
    bpb_mean, bpb_std = mean_std([s["val_bpb"] for s in seeds])
    loss_mean, loss_std = mean_std([s["val_loss"] for s in seeds])
    first = logs[0]
    fe = first.final_eval(first.final["mode"]) or {}
    out = {
        "seeds": seeds,
        "val_bpb": {"mean": bpb_mean, "std": bpb_std, "n": len(seeds)},
        "val_loss": {"mean": loss_mean, "std": loss_std, "n": len(seeds)},
        "evaluation": {"mode": first.final["mode"], "window": fe.get("window"), "stride": fe.get("stride"),
                       "docs": fe.get("docs"), "tokens": fe.get("tokens"), "bytes": fe.get("bytes")},
        "hardware": {"gpus": first.gpus, "world_size": first.run.get("world_size"),
                     "attention_backend": first.attention_backend, "fused_ops": first.fused_ops},
        "versions": dict(first.versions),
        "model_params": first.run.get("model_params"),
        "tokenizer_sha256": first.tokenizer_sha256,
        "code": {name: hashlib.sha256(data).hexdigest() for name, data in first.code.items()},
        "eval_results": None,
    }
    if results is not None:
        out["eval_results"] = {"file": EVAL_FILE, "checkpoint_seed": checkpoint_seed(results, logs),
                               **eval_summary(results)}
    return out


def _compare(path: str, want, got, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got:
                out.append(f"{path}.{key} is missing")
            elif key not in want:
                out.append(f"{path}.{key} is not expected")
            else:
                _compare(f"{path}.{key}", want[key], got[key], out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{path} has {len(got)} entries, the logs give {len(want)}")
        for i, (w, g) in enumerate(zip(want, got)):
            _compare(f"{path}[{i}]", w, g, out)
    elif isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, (int, float)) \
            or not isinstance(got, (int, float)):
        if want != got or type(want) is not type(got):
            out.append(f"{path} is {json.dumps(got)}, the logs give {json.dumps(want)}")
    elif not _close(float(got), float(want)):
        out.append(f"{path} is {got!r}, the logs give {want!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Consistency of a set of logs (shared by `new` and `verify`)


def log_set_problems(logs: list[TrainLog], track: Track | None) -> list[tuple[TrainLog, str]]:
    """(log, problem) for every problem of the logs as a set: each log, seeds, identical code and config, track budget
    and hardware."""
    out = [(lg, p) for lg in logs for p in lg.problems]
    by_seed: dict[int, list[TrainLog]] = {}
    for lg in logs:
        if lg.seed is not None:
            by_seed.setdefault(lg.seed, []).append(lg)
    for seed, same in by_seed.items():
        if len(same) > 1:
            out.append((same[-1], f"seed {seed} used twice ({', '.join(lg.name for lg in same)}): seeds must be "
                                  f"distinct"))
    base = logs[0]
    for lg in logs[1:]:
        if lg.code != base.code:
            differing = sorted(n for n in set(lg.code) | set(base.code) if lg.code.get(n) != base.code.get(n))
            out.append((lg, f"embeds different code than {base.name}: {', '.join(differing)}"))
        for key in sorted(set(lg.hparams) | set(base.hparams)):
            if key not in PER_RUN_HPARAMS and lg.hparams.get(key) != base.hparams.get(key):
                out.append((lg, f"hparam {key}={lg.hparams.get(key)} but {base.name} has "
                                     f"{key}={base.hparams.get(key)}: every seed must run the same configuration"))
        for what in ("tokenizer_sha256", "val_data"):
            if getattr(lg, what) != getattr(base, what):
                out.append((lg, f"{what} differs from {base.name}"))
        if lg.final and base.final and lg.final.get("mode") != base.final.get("mode"):
            out.append((lg, f"final mode {lg.final.get('mode')} but {base.name} has {base.final.get('mode')}"))
    if track is not None:
        for lg in logs:
            out.extend((lg, p) for p in track_problems(lg, track))
    return out


def track_problems(lg: TrainLog, track: Track) -> list[str]:
    problems = []
    if lg.final and isinstance(lg.final.get("train_time"), (int, float)):
        train_ms = float(lg.final["train_time"])
        budget_ms = 1000.0 * track.budget_seconds
        try:
            cap_s = float(lg.hparams.get("max_wallclock_seconds", "0"))
        except ValueError:
            cap_s = 0.0
        steps = lg.final.get("steps") or 1
        # The cap is checked after each step, so a capped run ends at most one step past it; allow one average step.
        allowed_ms = budget_ms + (train_ms / steps if 0 < cap_s <= track.budget_seconds else 0.0)
        if train_ms > allowed_ms:
            problems.append(f"train_time {train_ms / 1000:.1f}s exceeds the {track.name} budget of "
                            f"{track.budget_seconds:g}s" + ("" if 0 < cap_s <= track.budget_seconds else
                                                           f" (MAX_WALLCLOCK_SECONDS={cap_s:g})"))
    if track.gpus == 0:
        if not lg.gpus.startswith("none"):
            problems.append(f"track {track.name} is a CPU track but the run had GPUs: {lg.gpus}")
    else:
        if track.gpu_model.lower() not in lg.gpus.lower():
            problems.append(f"track {track.name} needs {track.gpu_model} GPUs, the log says gpus: {lg.gpus or '?'}")
        world = lg.run.get("world_size")
        if world is None or world > track.gpus:
            problems.append(f"world_size {world} exceeds the {track.gpus} GPUs of track {track.name}")
    return problems


def eval_vs_logs_problems(results: dict, logs: list[TrainLog], folder_code: dict[str, bytes] | None) -> list[str]:
    """The results JSON belongs to this record: same eval_ttt.py (code_sha256) and tokenizer."""
    problems = []
    config = results.get("config") or {}
    code_sha = config.get("code_sha256")
    embedded = logs[0].code.get("eval_ttt.py") if logs else None
    source = folder_code.get("eval_ttt.py") if folder_code is not None else embedded
    if not code_sha:
        problems.append("config has no code_sha256 (sha256 of eval_ttt.py)")
    elif source is None:
        problems.append("there is no eval_ttt.py in the logs' embedded code to match its code_sha256")
    elif hashlib.sha256(source).hexdigest() != code_sha:
        problems.append(f"code_sha256 {code_sha[:12]}... is not the sha256 of the record's eval_ttt.py")
    tok = config.get("tokenizer_sha256")
    if tok and logs and tok != logs[0].tokenizer_sha256:
        problems.append(f"tokenizer_sha256 {tok[:12]}... differs from the logs' tokenizer")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Records on disk


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_code_files(folder: Path) -> dict[str, bytes]:
    """Every *.py in a record folder (run outputs and caches left out), by path relative to the folder."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(root) / name
                found[path.relative_to(folder).as_posix()] = path.read_bytes()
    return found


def find_records(path: Path) -> list[Path]:
    if (path / "submission.json").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("submission.json")
                  if not any(part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(path).parts[:-1]))


def record_loss_values(sub: dict) -> list[float]:
    return [float(s["val_loss"]) for s in sub["seeds"]]


def previous_record(track_dir: Path, folder: Path, date: str) -> tuple[Path, dict] | None:
    """The best (lowest mean val_loss) record of the track dated strictly before `date`."""
    best = None
    if not track_dir.is_dir():
        return None
    for other in sorted(track_dir.iterdir()):
        if other.name.startswith(".") or not other.is_dir() or other.resolve() == folder.resolve():
            continue
        sub_path = other / "submission.json"
        if not sub_path.is_file():
            continue
        try:
            sub = read_json(sub_path)
            if sub.get("record", True) is not True or str(sub["date"]) >= date:
                continue
            values = record_loss_values(sub)
            score = math.fsum(values) / len(values)
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            warn(f"{sub_path}: unreadable, not considered as a previous record")
            continue
        if best is None or score < best[0]:
            best = (score, other, sub)
    return (best[1], best[2]) if best else None


def significance(sub: dict, folder: Path, margin: float, alpha: float) -> tuple[str, str | None]:
    """(a line describing the test, a failure message or None)."""
    prev = previous_record(folder.parent, folder, str(sub.get("date", "")))
    claims = sub.get("record", True) is True
    if prev is None:
        return "first record of its track: no previous record to test against", None
    prev_folder, prev_sub = prev
    new_values = record_loss_values(sub)
    result = welch_test(new_values, record_loss_values(prev_sub), margin)
    desc = (f"vs {prev_folder.name}: val_loss {mean_std(new_values)[0]:.5f} vs "
            f"{mean_std(record_loss_values(prev_sub))[0]:.5f} - {margin:g}, {result.text()}")
    modes = [(s.get("evaluation") or {}).get("mode") for s in (sub, prev_sub)]
    if modes[0] != modes[1]:
        desc += f" [evaluation modes differ: {modes[0]} vs {modes[1]}]"
    if len(new_values) < 2:
        return desc, ("needs at least 2 seeds for the t-test against " + prev_folder.name) if claims else None
    if result.p < alpha:
        return desc + f" (significant at alpha={alpha:g})", None
    verdict = f"not significant: p={result.p:.3g} >= {alpha:g}"
    if claims:
        return desc, (f"{verdict} (one-sided Welch t-test on val_loss vs {prev_folder.name}, margin {margin:g}: "
                      f"t={result.t:.3f} dof={result.dof:.2f}); add seeds or submit as \"record\": false")
    return f"{desc} ({verdict}; not claimed as a record)", None


def dataset_fingerprint(logs: list[TrainLog], fail) -> list[str]:
    """tools/audit.py's fingerprint checks of each log's dataset (DATA_PATH relative to the repository, where records'
    runs start), when it is on this machine: tokenizer sha256, val_data documents/tokens/bytes, train shards. They
    need numpy, sentencepiece and torch (train_gpt.py's reader and byte tables); without them they are skipped with a
    warning. Returns the datasets checked."""
    tools = str(Path(__file__).resolve().parent)
    if tools not in sys.path:
        sys.path.insert(0, tools)
    checked, cache = [], {}
    try:
        from audit import record_fingerprint_problems

        for lg in logs:
            problems, data = record_fingerprint_problems(lg.hparams, lg.tokenizer_sha256, lg.val_data, lg.train_data,
                                                         REPO, cache)
            for p in problems:
                fail(lg.name, p)
            if data is not None and data not in checked:
                checked.append(data)
    except ImportError as e:
        warn(f"dataset fingerprints not checked ({e})")
    return checked


def verify_record(folder: Path, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA) -> tuple[list[str], str]:
    """(failure lines, each naming a file; a one-line summary)."""
    failures: list[str] = []

    def fail(name: str, message: str) -> None:
        failures.append(f"{folder / name if name else folder}: {message}")

    sub_path = folder / "submission.json"
    try:
        sub = read_json(sub_path)
        if not isinstance(sub, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        fail("submission.json", f"unreadable ({e})")
        return failures, ""
    for key in FREE_FIELDS:
        if key not in sub:
            fail("submission.json", f"no `{key}`")
    date = str(sub.get("date", ""))
    try:
        datetime.date.fromisoformat(date)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise ValueError
    except ValueError:
        fail("submission.json", f"date {date!r} is not YYYY-MM-DD")
    if not folder.name.startswith(f"{date}_"):
        fail("submission.json", f"date {date} does not match the folder name {folder.name} (<YYYY-MM-DD>_<Name>)")
    track_name = str(sub.get("track", ""))
    if track_name != folder.parent.name:
        fail("submission.json", f"track {track_name!r} but the folder is under {folder.parent.name}/")
    track = None
    try:
        track = get_track(track_name)
        if not track.known:
            warn(f"{folder}: unknown track {track_name}; budget {track.budget_seconds:g}s read from its name")
    except RecordError as e:
        fail("submission.json", str(e))
    if not isinstance(sub.get("record", True), bool):
        fail("submission.json", "`record` must be true or false")

    log_paths = sorted(folder.glob("train_seed*.log"))
    if not log_paths:
        fail("", "no train_seed<N>.log in the folder")
        return failures, ""
    logs = [parse_log(p) for p in log_paths]
    for lg in logs:
        m = re.fullmatch(r"train_seed(\d+)\.log", lg.name)
        if not m:
            fail(lg.name, "log names are train_seed<N>.log")
        elif lg.seed is not None and int(m.group(1)) != lg.seed:
            fail(lg.name, f"the log's seed is {lg.seed}, not the {m.group(1)} of its name")
    for lg, problem in log_set_problems(logs, track):
        fail(lg.name, problem)
    checked = dataset_fingerprint(logs, fail)

    # (a) code: every file in the folder equals the code embedded in each log, and nothing embedded is missing
    code = folder_code_files(folder)
    for lg in logs:
        for name, data in lg.code.items():
            if name not in code:
                fail(name, f"missing: embedded in {lg.name} but not in the folder")
            elif code[name] != data:
                have, want = (hashlib.sha256(x).hexdigest()[:12] for x in (code[name], data))
                fail(name, f"differs from the code embedded in {lg.name} (sha256 {have}... vs {want}...)")
        for name in code:
            if name not in lg.code:
                fail(name, f"not embedded in {lg.name}: a record holds only the code that produced it")

    # (b) numbers: submission.json against the logs and the results JSON
    results = None
    eval_path = folder / EVAL_FILE
    if eval_path.is_file():
        try:
            results = read_json(eval_path)
            if not isinstance(results, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            fail(EVAL_FILE, f"unreadable ({e})")
            results = None
        if results is not None:
            for p in eval_problems(results) + eval_vs_logs_problems(results, logs, code):
                fail(EVAL_FILE, p)
    elif sub.get("eval_results") is not None:
        fail(EVAL_FILE, "missing, but submission.json has eval_results")
    usable = [lg for lg in logs if lg.seed is not None and lg.final is not None
              and all(k in lg.final for k in ("val_loss", "val_bpb", "mode", "steps", "train_time"))]
    mismatches: list[str] = []
    if len(usable) == len(logs) and len({lg.seed for lg in logs}) == len(logs):
        try:
            want = derived_submission(logs, results)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            fail("submission.json", f"cannot be rebuilt from the logs ({type(e).__name__}: {e})")
            want = None
        if want is not None:
            for key, value in want.items():
                if key not in sub:
                    mismatches.append(f"{key} is missing")
                else:
                    _compare(key, value, sub[key], mismatches)
            for key in sub:
                if key not in want and key not in FREE_FIELDS:
                    mismatches.append(f"{key} is not expected")
    else:  # some logs are broken (already reported): still check the seeds of the others
        listed = {s.get("seed"): (i, s) for i, s in enumerate(sub.get("seeds") or []) if isinstance(s, dict)}
        for lg in usable:
            if lg.seed not in listed:
                mismatches.append(f"seeds has no entry for seed {lg.seed} ({lg.name})")
            else:
                i, entry = listed[lg.seed]
                _compare(f"seeds[{i}]", seed_entry(lg), entry, mismatches)
    for m in mismatches:
        fail("submission.json", m)

    # (d) statistics
    summary = ""
    try:
        values = record_loss_values(sub)
        bpb = [float(s["val_bpb"]) for s in sub["seeds"]]
        mean, std = mean_std(bpb)
        desc, problem = significance(sub, folder, margin, alpha)
        if problem:
            fail("submission.json", problem)
        summary = (f"{len(values)} seeds, val_bpb {mean:.5f} ± {std if std is not None else 0:.5f}; {desc}; "
                   + (f"dataset {', '.join(checked)} matches the logs" if checked else "dataset not on this machine"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        fail("submission.json", f"seeds unreadable for the statistics ({type(e).__name__})")
    return failures, summary


# ----------------------------------------------------------------------------------------------------------------------
# `new`


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._-")
    if not s:
        raise RecordError(f"name {name!r}: needs at least one letter or digit")
    return s


def hparam_defaults(train_gpt_source: bytes) -> dict[str, str]:
    """The Hyperparameters defaults of a train_gpt.py, as the log would print them (read with ast, not imported),
    including those it inherits from base dataclasses defined in the same file (ModelConfig)."""
    try:
        tree = ast.parse(train_gpt_source.decode("utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return {}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def defaults_of(name: str) -> dict[str, str]:
        node = classes.get(name)
        if node is None:
            return {}
        out = {}
        for base in node.bases:
            if isinstance(base, ast.Name):
                out.update(defaults_of(base.id))
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                try:
                    out[item.target.id] = str(ast.literal_eval(item.value))
                except ValueError:
                    pass
        return out

    return defaults_of("Hyperparameters")


def reproduce_command(lg: TrainLog) -> str:
    defaults = hparam_defaults(lg.code.get("train_gpt.py", b""))
    env = []
    for key, value in lg.hparams.items():
        if key in ("run_id", "seed", "log_dir", "checkpoint_dir", "resume", "data_path"):
            continue
        if key == "tokenizer_path" and value == os.path.join(lg.hparams.get("data_path", ""), "tokenizer.model"):
            continue
        if key == "eval_window" and value == lg.hparams.get("train_seq_len"):
            continue
        window = lg.hparams.get("eval_window", "")
        if key == "eval_stride" and window.isdigit() and value == str(max(1, int(window) // 2)):
            continue
        if defaults.get(key) == value:
            continue
        value = {"True": "1", "False": "0"}.get(value, value)
        env.append(f"{key.upper()}={value}")
    world = lg.run.get("world_size", 1) or 1
    launch = f"torchrun --standalone --nproc_per_node={world} train_gpt.py" if world > 1 else "python train_gpt.py"
    return " ".join([f"DATA_PATH={lg.hparams.get('data_path', '...')}", "SEED=<seed>", "RUN_ID=seed<seed>"] + env
                    + [launch])


def readme_text(sub: dict, logs: list[TrainLog], folder_rel: str, stats_line: str, margin: float) -> str:
    def fmt(value, digits=4):
        return "–" if value is None else f"{value:.{digits}f}"

    rows = [f"| {s['seed']} | {s['val_bpb']:.5f} | {s['val_loss']:.5f} | {s['steps']} | {s['train_seconds']:.1f} s | "
            f"{s['eval_mode']} | {s['eval_seconds']:.1f} s |" for s in sub["seeds"]]
    ev = sub["evaluation"]
    track = get_track(sub["track"])
    lines = [
        f"# {sub['name']}",
        "",
        sub["blurb"] or "TODO: one line on what this record does.",
        "",
        f"Track `{sub['track']}` ({track.describe()}), {sub['date']}, by {sub['author'] or 'TODO'}."
        + ("" if sub.get("record", True) else " Not a record claim."),
        "",
        "## What changed and why",
        "",
        "TODO: what changed against the previous record of the track, and why it helps.",
        "",
        "## Results",
        "",
        "| seed | val_bpb | val_loss | steps | train time | eval mode | eval time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        f"| **mean ± std** | **{fmt(sub['val_bpb']['mean'], 5)} ± {fmt(sub['val_bpb']['std'], 5)}** | "
        f"{fmt(sub['val_loss']['mean'], 5)} ± {fmt(sub['val_loss']['std'], 5)} | | | | |",
        "",
        f"Evaluation: `{ev['mode']}`, window {ev['window']}, stride {ev['stride']}, {ev['docs']} documents, "
        f"{ev['tokens']} tokens, {ev['bytes']} bytes.",
    ]
    if sub.get("eval_results"):
        er = sub["eval_results"]
        params = ", ".join(f"{k} {er[k]}" for k in EVAL_PARAMETERS_SHOWN if er.get(k) is not None)
        seed = er.get("checkpoint_seed")
        of_seed = f" on the checkpoint of seed {seed}" if seed is not None else ""
        lines += ["", f"`eval_ttt.py` ({EVAL_FILE}){of_seed}: mode `{er.get('mode')}` ({params}): "
                      f"val_bpb {fmt(er.get('bpb'), 5)}, val_loss {fmt(er.get('loss'), 5)}, "
                      f"{er.get('docs')} documents, {fmt(er.get('seconds'), 1)} s."]
    lines += [
        "",
        f"Statistics (one-sided Welch t-test on val_loss, margin {margin:g} nats): {stats_line}.",
        "",
        f"Hardware: {sub['hardware']['gpus']}; world size {sub['hardware']['world_size']}. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sub["versions"].items()) + ".",
        "",
        "## Reproduce",
        "",
        "From inside this folder, for each seed (the logs hold every hyperparameter; the command sets those that "
        "differ from the defaults of this train_gpt.py; a relative DATA_PATH is relative to where the runs started, "
        "e.g. `../../../data/datasets/...` for the repository's data):",
        "",
        "```bash",
        reproduce_command(logs[0]),
        "```",
        "",
        "Check the record (code byte for byte against the logs, numbers, statistics) from the repository root:",
        "",
        "```bash",
        f"python tools/record.py verify {folder_rel}",
        "```",
        "",
    ]
    return "\n".join(lines)


def cmd_new(args) -> int:
    try:
        track = get_track(args.track)
        if not track.known:
            warn(f"unknown track {track.name}: budget {track.budget_seconds:g}s and {track.describe()} read from its "
                 f"name; add it to TRACKS in tools/record.py to make it official")
        date = args.date or datetime.date.today().isoformat()
        try:
            datetime.date.fromisoformat(date)
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
                raise ValueError
        except ValueError:
            raise RecordError(f"--date {date!r}: expected YYYY-MM-DD") from None
        records_dir = Path(args.records_dir) if args.records_dir else REPO / "records"
        folder = records_dir / track.name / f"{date}_{slug(args.name)}"
        if folder.exists():
            raise RecordError(f"{folder} already exists; not overwriting it")

        logs = [parse_log(p) for p in args.logs]
        problems = log_set_problems(logs, track)
        if problems:
            raise RecordError("\n".join(f"{lg.path}: {p}" for lg, p in problems))
        results = None
        if args.eval:
            try:
                results = read_json(Path(args.eval))
            except (OSError, ValueError) as e:
                raise RecordError(f"{args.eval}: unreadable ({e})") from None
            eval_issues = eval_problems(results) + eval_vs_logs_problems(results, logs, None)
            if eval_issues:
                raise RecordError("\n".join(f"{args.eval}: {p}" for p in eval_issues))
        for name in logs[0].code:
            if name.startswith("/") or ".." in Path(name).parts or not name.endswith(".py"):
                raise RecordError(f"{logs[0].path}: embedded file name {name!r} is not a relative .py path")

        sub = {
            "name": args.name, "author": args.author or "", "date": date, "track": track.name,
            "blurb": args.blurb or "", "record": not args.no_record,
            **derived_submission(logs, results),
        }
        # Build in a hidden sibling folder, verify it there, then move it into place.
        track_dir = records_dir / track.name
        track_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=track_dir))
        try:
            staged = tmp / folder.name
            staged.mkdir()
            for name, data in logs[0].code.items():
                (staged / name).parent.mkdir(parents=True, exist_ok=True)
                (staged / name).write_bytes(data)
            for lg in logs:
                shutil.copyfile(lg.path, staged / log_file_name(lg.seed))
            if args.eval:
                shutil.copyfile(args.eval, staged / EVAL_FILE)
            (staged / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
            # the significance line for the README, with the final folder as the place in the track
            desc, problem = significance(sub, folder, args.margin, args.alpha)
            try:
                folder_rel = folder.resolve().relative_to(Path.cwd().resolve()).as_posix()
            except ValueError:
                folder_rel = folder.as_posix()
            (staged / "README.md").write_text(readme_text(sub, logs, folder_rel, desc, args.margin), encoding="utf-8")
            # verify as if in place: move it under the track folder first (same file system), back out on failure
            os.replace(staged, folder)
            failures, summary = verify_record(folder, args.margin, args.alpha)
            if failures:
                os.replace(folder, staged)
                for line in failures:
                    print(line, file=sys.stderr)
                print(f"error: {folder} not written" + (" (use --no-record for a submission that does not claim a "
                                                         "record)" if problem else ""), file=sys.stderr)
                return 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"wrote {folder}: {summary}")
        print(f"next: edit {folder / 'README.md'} (what changed and why), then "
              f"python tools/record.py verify {folder} && python tools/record.py leaderboard")
        return 0
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------------------------------
# `verify`


def cmd_verify(args) -> int:
    records: list[Path] = []
    failures: list[str] = []
    for p in args.paths:
        path = Path(p)
        if not path.exists():
            failures.append(f"{path}: no such file or directory")
            continue
        found = find_records(path) if path.is_dir() else []
        if not found:
            if path.is_dir() and not any(path.glob("train_seed*.log")):
                print(f"no records under {path}")  # nothing to check (a record folder without submission.json fails)
            else:
                failures.append(f"{path}: not a record (a folder with submission.json and train_seed<N>.log)")
        records.extend(found)
    for folder in records:
        record_failures, summary = verify_record(folder, args.margin, args.alpha)
        if record_failures:
            failures.extend(record_failures)
        else:
            print(f"ok {folder}: {summary}")
    for line in failures:
        print(line)
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------------------------
# `leaderboard`


def leaderboard_markdown(records_dir: Path, readme_dir: Path) -> str:
    by_track: dict[str, list[tuple[Path, dict]]] = {}
    for folder in find_records(records_dir) if records_dir.is_dir() else []:
        try:
            sub = read_json(folder / "submission.json")
            by_track.setdefault(str(sub["track"]), []).append((folder, sub))
        except (OSError, ValueError, KeyError, TypeError):
            warn(f"{folder / 'submission.json'}: unreadable, left out of the leaderboard")
    if not by_track:
        return "No records yet."
    order = [t for t in TRACKS if t in by_track] + sorted(t for t in by_track if t not in TRACKS)
    parts = []
    for track_name in order:
        try:
            heading = f"### `{track_name}` ({get_track(track_name).describe()})"
        except RecordError:
            heading = f"### `{track_name}`"
        rows = []
        entries = sorted(by_track[track_name], key=lambda e: (e[1]["val_bpb"]["mean"], str(e[1].get("date")),
                                                              e[0].name))
        for rank, (folder, sub) in enumerate(entries, 1):
            bpb = sub["val_bpb"]
            std = f"{bpb['std']:.4f}" if bpb.get("std") is not None else "–"
            ev = sub.get("evaluation") or {}
            mode = f"{ev.get('mode')} (w{ev.get('window')}/s{ev.get('stride')})"
            er = sub.get("eval_results")
            if er:
                mode += f"; {er.get('mode')}: {er.get('bpb'):.4f}" if isinstance(er.get("bpb"), (int, float)) \
                    else f"; {er.get('mode')}"
            name = str(sub.get("name", folder.name)) + ("" if sub.get("record", True) else " (non-record)")
            link = os.path.relpath(folder, readme_dir).replace(os.sep, "/")
            cells = [str(rank), f"{bpb['mean']:.4f} ± {std}", str(len(sub.get("seeds", []))), str(sub.get("date", "")),
                     name, str(sub.get("author", "")), mode, f"[{folder.name}]({link})"]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join([heading, "", "| rank | val_bpb (mean ± std) | seeds | date | name | author | eval | "
                                             "folder |", "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]))
    return "\n\n".join(parts)


def cmd_leaderboard(args) -> int:
    readme = Path(args.readme) if args.readme else REPO / "README.md"
    records_dir = Path(args.records_dir) if args.records_dir else REPO / "records"
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        print(f"{readme}: unreadable ({e.strerror})")
        return 1
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        print(f"{readme}: leaderboard markers {START_MARKER} ... {END_MARKER} missing")
        return 1
    table = leaderboard_markdown(records_dir, readme.resolve().parent)
    new_text = text[:start + len(START_MARKER)] + "\n" + table + "\n" + text[end:]
    if args.check:
        if new_text != text:
            print(f"{readme}: leaderboard is out of date; run python tools/record.py leaderboard")
            return 1
        return 0
    if new_text != text:
        readme.write_text(new_text, encoding="utf-8")
        print(f"updated the leaderboard in {readme}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="record.py", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def stats_options(p):
        p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                       help=f"nats of val_loss to beat the previous record by (default {DEFAULT_MARGIN})")
        p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                       help=f"significance level of the one-sided Welch t-test (default {DEFAULT_ALPHA})")

    p = sub.add_parser("new", help="build a record folder from training logs")
    p.add_argument("logs", nargs="+", metavar="LOG", help="training logs (logs/<RUN_ID>.txt), one per seed")
    p.add_argument("--name", required=True)
    p.add_argument("--track", required=True, help=f"one of {', '.join(TRACKS)} (or <N>x<gpu>_<M>min, cpu_<M>min)")
    p.add_argument("--eval", help="eval_ttt.py results JSON")
    p.add_argument("--author", default="")
    p.add_argument("--blurb", default="")
    p.add_argument("--date", help="YYYY-MM-DD (default today)")
    p.add_argument("--records-dir", help="default: records/ of this repository")
    p.add_argument("--no-record", action="store_true", help='a submission that does not claim a record ("record": '
                                                            "false): the t-test is reported, not required")
    stats_options(p)
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("verify", help="check records: code, numbers, logs, track, statistics")
    p.add_argument("paths", nargs="+", metavar="PATH", help="record folders (or folders holding records)")
    stats_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("leaderboard", help="write the per-track tables into README.md between the markers")
    p.add_argument("--check", action="store_true", help="exit non-zero when the README's tables are out of date")
    p.add_argument("--readme", help="default: README.md of this repository")
    p.add_argument("--records-dir", help="default: records/ of this repository")
    p.set_defaults(func=cmd_leaderboard)

    args = parser.parse_args(argv)
    if hasattr(args, "alpha") and not 0 < args.alpha < 1:
        parser.error("--alpha must be in (0, 1)")
    if hasattr(args, "margin") and not (math.isfinite(args.margin) and args.margin >= 0):
        parser.error("--margin must be >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

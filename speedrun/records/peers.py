"""
The rules of two other leaderboards, so that `speedrun verify` checks their record
folders in their own terms: parameter-golf (openai/parameter-golf: records/track_10min_16mb, track_non_record_16mb)
and modded-nanogpt (KellerJordan/modded-nanogpt: records/track_1_short, track_2_medium). The logs are read by
speedrun.analysis.run_log (read_run: one summary for every dialect); the statistics are speedrun.stats' (welch_test, mean_std).
Nothing here needs the dataset.

parameter-golf, per record folder (records/<track>/<date>_<name>/; its README's submission rules):
  files          a submission JSON (submission.json or submission_<x>.json), at least one training log, train_gpt.py
                 (or other code), README.md; what is missing or unreadable
  claim          the claimed val_bpb (val_bpb, mean_val_bpb or mean_bpb) equals the mean over the logs of each log's
                 scored line (its last final evaluation: int8/int6 round trip, sliding window, TTT, phased TTT, ...;
                 never a `step:` line, a diagnostic, a pre-quantization or pre-EMA figure) within the printed
                 precision; where a seed was run twice, the mean of one log per seed may match. A claim that equals
                 one seed's value but not the mean, or that no log's scored line gives, is a FAULT (the detail says
                 where the number does appear); so is a per-seed value (seed_results, seeds) no log of that seed gives
  seeds          the distinct seeds, read from each log's content; a log whose file name names another seed is a FAULT;
                 a seed run twice, and seeds the JSON lists without a log, are reported
  significance   against the best (lowest mean val_bpb) record of the same track dated earlier: a one-sided Welch
                 t-test on val_loss that the improvement is at least 0.005 nats at p < 0.01, printed with and
                 without the margin (a previous record on another tokenizer enters through its val_bpb, in this
                 record's nats per token); fewer than 2 seeds cannot be tested; the non-record track has no such rule.
                 The README waives the rule for systems-only speed-ups; the logs cannot show that, so the FAULT
                 says so and a reader decides
  artifact_size  each log's last `Total submission size ...: N bytes` that counts a compressed model (and the JSON's
                 figures) at most 16,000,000 bytes; a JSON claiming fewer bytes than a log shows is reported
  train_time     at most 600 s per log (`stopping_early: wallclock_cap train_time:`, else the last step's); a run
                 stopped by its own cap may end one average step past it, as the cap is checked after each step
  eval_time      at most 600 s per log (`total_eval_time`, else the scored line's eval_time)
  val_set        the log's validation token count is the one the other records on the same tokenizer use
  bpb_ratio      val_bpb / val_loss (tokens per byte / ln 2) agrees within 1% with the other records on the same
                 tokenizer: a ratio further off points at a byte-counting error
The non-record track (a folder name with `non_record`) reports train_time and eval_time without a limit.

modded-nanogpt, per folder holding run logs (a record folder, or its this_pr/ baseline/ ... subfolders):
  files          the run logs and statistics.md
  claim          statistics.md (runs, mean val_loss, p) against the logs
  seeds          the number of runs (one log each)
  significance   one-sided one-sample t-test that the mean final val_loss is below the track's target (3.28; 2.92 on
                 track_2_medium) at p < 0.01; a folder named baseline... is a comparison run, reported only
  train_time     the runs' final train_time, mean and spread (the time is the score: reported)
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from speedrun.records.check import (ARTIFACT_LIMIT, DEFAULT_ALPHA, DEFAULT_MARGIN, SKIP_DIRS, Check, RecordReport,
                                    train_time_allowed_ms)
from speedrun.stats import mean_std, welch_test
from speedrun.analysis.run_log import NUM, RunSummary, printed_decimals, read_run

RULES = ("parameter-golf", "modded-nanogpt")
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RATIO_TOLERANCE = 0.01  # relative: val_bpb / val_loss of records on one tokenizer agree far better than this
VAL_SET_TOLERANCE = 0.005  # relative: token counts cut to whole sequences differ by less than this
CLAIM_FIELDS = ("val_bpb", "mean_val_bpb", "mean_bpb")
MODDED_TARGETS = {"track_2_medium": 2.92}  # any other track: 3.28
MODDED_TARGET = 3.28
LOG_SUFFIXES = (".log", ".txt")
MAX_COMBINATIONS = 256
WAIVER = "both READMEs waive the rule for speed-ups that change no ML, which the logs cannot show"


# ----------------------------------------------------------------------------------------------------------------------
# Reading a folder once


@dataclass(eq=False)  # one object per folder (_loaded): compared by identity
class Folder:
    path: Path
    rules: str
    runs: list[RunSummary] = field(default_factory=list)  # logs with a result
    partial: list[RunSummary] = field(default_factory=list)  # logs of the same dialect without one (never finished)
    other_logs: list[str] = field(default_factory=list)  # log-like files without one: "name (why)"
    submission: dict | None = None
    submission_name: str = ""
    submission_text: str = ""
    submission_problem: str = ""
    date: str = ""
    chosen: list[RunSummary] = field(default_factory=list)  # the runs the record's result is the mean of
    claim_check: Check | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def rel(self, run: RunSummary) -> str:
        return run.path.relative_to(self.path).as_posix()

    @property
    def track(self) -> str:
        return self.path.parent.name

    @property
    def record_track(self) -> bool:
        return "non_record" not in self.track and "non-record" not in self.track

    @property
    def mean_bpb(self) -> float | None:
        values = [r.scored.val_bpb for r in self.chosen]
        return mean_std(values)[0] if values else None

    @property
    def tokenizer(self) -> str:
        names = [r.tokenizer for r in self.chosen or self.runs if r.tokenizer]
        return collections.Counter(names).most_common(1)[0][0] if names else ""

    @property
    def ratio(self) -> float | None:
        ratios = [r.scored.val_bpb / r.scored.val_loss for r in self.chosen if r.scored.val_loss > 0]
        return mean_std(ratios)[0] if ratios else None


_RUNS: dict[Path, RunSummary | str] = {}  # every log read in this process, or why it could not be


def _run(path: Path) -> RunSummary | str:
    if path not in _RUNS:
        try:
            _RUNS[path] = read_run(path)
        except OSError as e:
            _RUNS[path] = f"unreadable ({e.strerror or e})"
    return _RUNS[path]


def _log_files(folder: Path, recursive: bool) -> list[Path]:
    """Files named *.log or *.txt (but requirements*.txt): directly in the folder, or anywhere under it (parameter-golf
    keeps logs in logs/ and other subfolders), hidden folders and caches left out."""
    found = []
    walk = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(walk):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") or part == "__pycache__" for part in rel):
            continue
        if p.is_file() and p.suffix in LOG_SUFFIXES and not p.name.startswith("requirements"):
            found.append(p)
    return found


def _date_of(folder: Path, sub: dict | None) -> str:
    """The record's day: its JSON's `date` (the submission's own time stamp), else the one its folder name starts
    with."""
    for text in (str((sub or {}).get("date", "")), folder.name):
        m = re.match(r"\d{4}-\d{2}-\d{2}", text)
        if m:
            return m.group(0)
    return ""


def load(folder: Path, rules: str) -> Folder:
    """Read a record folder; never raises (what cannot be read is noted for the checks)."""
    rec = Folder(folder, rules)
    try:
        logs = _log_files(folder, recursive=rules == "parameter-golf")
        subs = sorted(folder.glob("submission*.json"))
    except OSError as e:
        rec.submission_problem = f"{folder}: cannot be listed ({e.strerror or e})"
        return rec
    if subs:
        chosen = next((p for p in subs if p.name == "submission.json"), subs[0])
        rec.submission_name = chosen.name
        try:
            rec.submission_text = chosen.read_text(encoding="utf-8")
            rec.submission = json.loads(rec.submission_text)
            if not isinstance(rec.submission, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            rec.submission = None
            rec.submission_problem = f"{chosen.name} unreadable ({e})"
    for p in logs:
        run = _run(p)
        rel = p.relative_to(folder).as_posix()
        if isinstance(run, str):
            rec.other_logs.append(f"{rel} ({run})")
        elif run.dialect == rules and run.scored is not None:
            rec.runs.append(run)
        elif run.dialect == rules:
            rec.partial.append(run)
            rec.other_logs.append(f"{rel} (no final evaluation)")
        elif run.dialect != "unknown":
            rec.other_logs.append(f"{rel} (a {run.dialect} log)")
    rec.date = _date_of(folder, rec.submission)
    if rules == "parameter-golf":
        rec.claim_check = _claim(rec)
    return rec


# ----------------------------------------------------------------------------------------------------------------------
# Which folders are records, and of which leaderboard


def shape_of(folder: Path) -> str | None:
    """"ours", "parameter-golf", "modded-nanogpt", or None for a folder that is not itself a record."""
    try:
        direct = [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return None
    names = {p.name for p in direct}
    seed_logs = [p for p in direct if re.fullmatch(r"train_seed\d+\.log", p.name)]
    for p in seed_logs:
        try:
            with open(p, "rb") as f:
                if f.read(10) == b"#### file ":
                    return "ours"
        except OSError:
            pass
    if "submission.json" in names:
        try:
            sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
            if isinstance(sub, dict) and "code" in sub and "evaluation" in sub:
                return "ours"
        except (OSError, UnicodeDecodeError, ValueError):
            pass
    dialects = set()
    for p in direct:
        if p.suffix in LOG_SUFFIXES and not p.name.startswith("requirements"):
            run = _run(p)
            if not isinstance(run, str):
                dialects.add(run.dialect)
    if "parameter-golf" in dialects:
        return "parameter-golf"
    if seed_logs and "submission.json" in names:
        return "ours"  # our layout: our verifier says what is wrong with it
    if any(n.startswith("submission") and n.endswith(".json") for n in names):
        return "parameter-golf"
    if "modded-nanogpt" in dialects:
        return "modded-nanogpt"
    if "submission.json" in names or seed_logs:
        return "ours"
    return None


def find_records(path: Path, rules: str = "auto") -> list[tuple[Path, str]]:
    """(folder, rules) for every record at or under path: a folder that is one is not searched further."""
    shape = shape_of(path)
    if shape is not None:
        return [(path, shape if rules == "auto" else rules)]
    out = []
    try:
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name not in SKIP_DIRS)
    except OSError:
        return []
    for sub in subdirs:
        out.extend(find_records(sub, rules))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# parameter-golf


def _json_number_text(text: str, key: str) -> str | None:
    """A top-level number exactly as the JSON file prints it (json.loads drops trailing zeros)."""
    m = re.search(rf'"{re.escape(key)}"\s*:\s*({NUM})', text)
    return m.group(1) if m else None


def _claimed(rec: Folder) -> tuple[float | None, str, str]:
    """(value, field, text as printed)."""
    sub = rec.submission or {}
    for key in CLAIM_FIELDS:
        value = sub.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), key, _json_number_text(rec.submission_text, key) or repr(float(value))
    return None, "", ""


def _per_seed(sub: dict, key: str) -> dict[int, float]:
    """{seed: value} from seed_results / seeds (objects keyed by seed) or `seeds` + `seed_scores` lists."""
    out: dict[int, float] = {}
    for container in ("seed_results", "seeds"):
        rows = sub.get(container)
        if isinstance(rows, dict):
            for seed, row in rows.items():
                if str(seed).isdigit() and isinstance(row, dict) and isinstance(row.get(key), (int, float)):
                    out[int(seed)] = float(row[key])
    if not out and key == "val_bpb" and isinstance(sub.get("seeds"), list) and isinstance(sub.get("seed_scores"), list):
        for seed, value in zip(sub["seeds"], sub["seed_scores"]):
            if isinstance(seed, int) and isinstance(value, (int, float)):
                out[seed] = float(value)
    return out


def _listed_seeds(sub: dict) -> list[int]:
    seeds = sub.get("seeds")
    if isinstance(seeds, list):
        return [s for s in seeds if isinstance(s, int)]
    return sorted(_per_seed(sub, "val_bpb")) or sorted(_per_seed(sub, "val_loss"))


def _candidate_sets(rec: Folder, runs: list[RunSummary], listed: list[int]) -> list[tuple[list[RunSummary], str]]:
    """Sets of logs whose mean a claim may be: all of them; where a seed was run more than once, one log per seed; the
    logs of the seeds the JSON lists."""
    out = [(runs, f"the mean of the scored lines of all {len(runs)} logs")]
    by_seed: dict[object, list[RunSummary]] = {}
    for r in runs:
        by_seed.setdefault(r.seed if r.seed is not None else rec.rel(r), []).append(r)
    groups = list(by_seed.values())
    if any(len(g) > 1 for g in groups) and math.prod(len(g) for g in groups) <= MAX_COMBINATIONS:
        for combo in itertools.product(*groups):
            out.append((list(combo), "the mean of one log per seed (" + ", ".join(rec.rel(r) for r in combo) + ")"))
    if listed and set(listed) < set(by_seed) and all(s in by_seed for s in listed):
        subset = [by_seed[s] for s in listed]
        if math.prod(len(g) for g in subset) <= MAX_COMBINATIONS:
            for combo in itertools.product(*subset):
                out.append((list(combo), f"the mean over the {len(listed)} seeds the JSON lists ("
                            + ", ".join(rec.rel(r) for r in combo) + ")"))
    return out


def _where(rec: Folder, value: float, tol: float) -> str:
    """Where in the logs a number appears when it is not a scored line: another final line, a step, a diagnostic."""
    for r in rec.runs + rec.partial:
        for f in r.finals[:-1] + r.other_values:
            if f.val_bpb is not None and abs(f.val_bpb - value) <= tol:
                return f"; it is line {f.line_no} of {rec.rel(r)} (`{f.label}` val_bpb {f.bpb_text}), not a scored line"
    return ""


def _claim(rec: Folder) -> Check:
    runs = rec.runs
    rec.chosen = _one_per_seed(rec, runs)
    if rec.submission is None:
        return Check("claim", "skip" if not rec.submission_problem else "FAULT",
                     f"{rec.path}: {rec.submission_problem or 'no submission JSON'}: no claim to check")
    value, key, text = _claimed(rec)
    sub_name = rec.submission_name
    if not runs:
        tol = 10 ** -printed_decimals(text) if text else 0.0
        return Check("claim", "FAULT", f"{rec.path / sub_name}: claims {key or 'val_bpb'} {text or '?'} but no log in "
                                       "the folder has a final evaluation" + (_where(rec, value, tol) if text else ""))
    mean_all = mean_std([r.scored.val_bpb for r in runs])[0]
    if value is None:
        return Check("claim", "FAULT", f"{rec.path / sub_name}: no claimed val_bpb ({', '.join(CLAIM_FIELDS)}); the "
                                       f"{len(runs)} logs' scored lines have mean val_bpb {mean_all:.8f}")
    log_decimals = max(printed_decimals(r.scored.bpb_text) for r in runs)
    # one unit of the claim's last digit (it may be the mean of values already rounded to that digit), plus the
    # rounding of the logs' own numbers
    tol = (10 ** -printed_decimals(text) + 0.5 * 10 ** -log_decimals) * (1 + 1e-9)
    problems = []
    per_seed = _per_seed(rec.submission, "val_bpb")
    for seed, seed_value in sorted(per_seed.items()):
        of_seed = [r for r in runs if r.seed == seed]
        if of_seed and not any(abs(r.scored.val_bpb - seed_value) <= tol for r in of_seed):
            problems.append(f"its seed {seed} val_bpb {seed_value} is not the scored line of "
                            + ", ".join(f"{rec.rel(r)} ({r.scored.bpb_text})" for r in of_seed)
                            + _where(rec, seed_value, tol))
    for members, how in _candidate_sets(rec, runs, _listed_seeds(rec.submission)):
        mean = mean_std([r.scored.val_bpb for r in members])[0]
        if abs(value - mean) <= tol:
            rec.chosen = members
            labels = sorted({r.scored.label for r in members})
            detail = (f"{rec.path / sub_name}: {key} {text} = {how}, {mean:.8f} (scored lines: {', '.join(labels)})")
            if problems:
                return Check("claim", "FAULT", detail + "; but " + "; ".join(problems))
            return Check("claim", "ok", detail)
    single = sorted((r for r in runs if abs(r.scored.val_bpb - value) <= tol), key=lambda r: r.scored.val_bpb)
    if single:
        best = min(runs, key=lambda r: r.scored.val_bpb)
        which = "the best seed's" if single[0] is best and len(runs) > 1 else "one log's"
        detail = (f"{rec.path / sub_name}: {key} {text} is {which} value ({rec.rel(single[0])}, seed {single[0].seed}: "
                  f"{single[0].scored.bpb_text}), not the mean over the {len(runs)} logs, {mean_all:.8f}")
    else:
        detail = (f"{rec.path / sub_name}: {key} {text} is in no log's scored line (the {len(runs)} logs' mean is "
                  f"{mean_all:.8f}: " + ", ".join(f"{rec.rel(r)} {r.scored.bpb_text}" for r in runs) + ")"
                  + _where(rec, value, tol))
    return Check("claim", "FAULT", "; ".join([detail] + problems))


def _one_per_seed(rec: Folder, runs: list[RunSummary]) -> list[RunSummary]:
    seen, out = set(), []
    for r in runs:
        key = r.seed if r.seed is not None else rec.rel(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _name_seed(name: str) -> int | None:
    m = re.search(r"seed[_-]?(\d+)", name, flags=re.I)
    return int(m.group(1)) if m else None


def _seeds(rec: Folder) -> Check:
    if not rec.runs:
        return Check("seeds", "skip", f"{rec.path}: no log with a final evaluation")
    wrong, notes = [], []
    by_seed: dict[int, list[str]] = {}
    for r in rec.runs:
        named = _name_seed(Path(rec.rel(r)).name)
        if r.seed is None:
            notes.append(f"{rec.rel(r)} names no seed")
        else:
            by_seed.setdefault(r.seed, []).append(rec.rel(r))
            if named is not None and named != r.seed:
                wrong.append(f"{rec.path / rec.rel(r)} is named for seed {named} but ran seed {r.seed} "
                             "(its `seed` line)")
        notes.extend(f"{rec.rel(r)} {p}" for p in r.problems)
    notes.extend(f"seed {s} run {len(names)} times ({', '.join(names)})" for s, names in by_seed.items()
                 if len(names) > 1)
    listed = _listed_seeds(rec.submission or {})
    missing = [s for s in listed if s not in by_seed]
    if missing:
        notes.append(f"{rec.submission_name} lists seed{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(map(str, missing))} without a log")
    seeds = ", ".join(map(str, sorted(by_seed)))
    plural = "s" if len(by_seed) != 1 else ""
    head = f"{rec.path}: {len(by_seed)} distinct seed{plural} ({seeds}) in {len(rec.runs)} logs"
    status = "FAULT" if wrong else "info" if notes else "ok"
    return Check("seeds", status, "; ".join([head] + wrong + notes))


def _previous(rec: Folder, pool: list[Folder]) -> Folder | None:
    track_dir = rec.path.absolute().parent
    earlier = [o for o in pool if o is not rec and o.path.absolute().parent == track_dir and o.mean_bpb is not None
               and o.date and rec.date and o.date < rec.date]
    return min(earlier, key=lambda o: (o.mean_bpb, o.date, o.name)) if earlier else None


def _significance(rec: Folder, pool: list[Folder], margin: float, alpha: float) -> Check:
    if not rec.record_track:
        return Check("significance", "skip", f"{rec.path}: non-record track, no significance rule")
    new = [r.scored.val_loss for r in rec.chosen]
    if not new:
        return Check("significance", "skip", f"{rec.path}: no scored line to test")
    prev = _previous(rec, pool)
    if prev is None:
        return Check("significance", "skip", f"{rec.path}: no earlier record of {rec.track} to test against")
    if rec.tokenizer and rec.tokenizer == prev.tokenizer:
        old, how = [r.scored.val_loss for r in prev.chosen], ""
    else:  # other tokenizer: its val_bpb in this record's nats per token
        old = [r.scored.val_bpb / rec.ratio for r in prev.chosen]
        how = f"; its val_bpb in this record's nats per token ({prev.tokenizer or '?'} vs {rec.tokenizer or '?'})"
    desc = (f"vs {prev.name} (val_loss {mean_std(new)[0]:.5f} over {len(new)} seeds vs {mean_std(old)[0]:.5f} over "
            f"{len(old)}{how})")
    if len(new) < 2:
        return Check("significance", "skip", f"{rec.path}: {len(new)} seed: the t-test cannot be made {desc}")
    with_margin = welch_test(new, old, margin)
    without = welch_test(new, old, 0.0)
    detail = (f"{rec.path}: {desc}: p={with_margin.p:.3g} with the {margin:g}-nat margin, p={without.p:.3g} without "
              f"(one-sided Welch, alpha {alpha:g})")
    if with_margin.p < alpha:
        return Check("significance", "ok", detail)
    return Check("significance", "FAULT", detail + f"; {WAIVER}")


def _json_bytes(sub: dict) -> list[tuple[str, int]]:
    """The byte counts a submission JSON states: (field, value)."""
    out = []
    for key in ("bytes_total", "artifact_bytes", "artifact_size_bytes", "artifact_bytes_max"):
        if isinstance(sub.get(key), int):
            out.append((key, sub[key]))
    for container in ("seed_results", "seeds"):
        rows = sub.get(container)
        if isinstance(rows, dict):
            for seed, row in rows.items():
                for key in ("artifact_bytes", "bytes_total"):
                    if isinstance(row, dict) and isinstance(row.get(key), int):
                        out.append((f"{container}.{seed}.{key}", row[key]))
    return out


def _artifact(rec: Folder) -> Check:
    sized = [r for r in rec.runs + rec.partial if r.artifact_bytes is not None]
    stated = _json_bytes(rec.submission or {})
    over = [f"{rec.path / rec.rel(r)}: {r.artifact_bytes:,} bytes ({r.artifact_line})" for r in sized
            if r.artifact_bytes > ARTIFACT_LIMIT]
    over += [f"{rec.path / rec.submission_name}: {key} {value:,}" for key, value in stated if value > ARTIFACT_LIMIT]
    if not sized and not stated:
        return Check("artifact_size", "skip", f"{rec.path}: no `Total submission size` line and no byte count in "
                                              "the JSON")
    notes = []
    if sized:
        top = max(sized, key=lambda r: r.artifact_bytes)
        notes.append(f"largest in the logs {top.artifact_bytes:,} bytes ({rec.rel(top)})")
        headline = [(k, v) for k, v in stated if "." not in k]
        if headline and max(v for _, v in headline) < top.artifact_bytes:
            k, v = max(headline, key=lambda kv: kv[1])
            notes.append(f"{rec.submission_name} says {k} {v:,}, fewer than {rec.rel(top)} shows")
        for key, value in stated:
            if "." in key:
                seed = int(key.split(".")[1]) if key.split(".")[1].isdigit() else None
                logged = [r.artifact_bytes for r in sized if r.seed == seed]
                if logged and value < max(logged):
                    notes.append(f"{rec.submission_name} {key} {value:,} < {max(logged):,} in the log of seed {seed}")
    else:
        notes.append(f"no size line in the logs; {rec.submission_name} says " + ", ".join(f"{k} {v:,}"
                                                                                          for k, v in stated[:3]))
    if over:
        return Check("artifact_size", "FAULT", f"over {ARTIFACT_LIMIT:,} bytes: " + "; ".join(over + notes))
    status = "ok" if sized and len(notes) == 1 else "info"
    return Check("artifact_size", status, f"{rec.path}: " + "; ".join(notes) + f" (limit {ARTIFACT_LIMIT:,})")


def _train_time(rec: Folder) -> Check:
    timed = [r for r in rec.runs + rec.partial if r.train_time_ms is not None]
    if not timed:
        return Check("train_time", "skip", f"{rec.path}: no train_time in the logs")
    over = []
    for r in timed:
        # parameter-golf's loop sees the cap after a step and stops at the top of the next iteration, after
        # synchronising the ranks: its runs end up to about 1.6 average steps past the cap; two are allowed
        allowed = train_time_allowed_ms(TRAIN_LIMIT_S, r.train_time_ms, r.steps, r.capped, steps_allowed=2)
        if r.train_time_ms > allowed:
            over.append(f"{rec.path / rec.rel(r)}: train_time {r.train_time_ms / 1000:.1f} s "
                        f"(from {r.train_time_from})")
    top = max(timed, key=lambda r: r.train_time_ms)
    detail = (f"longest {top.train_time_ms / 1000:.1f} s ({rec.rel(top)}, from {top.train_time_from}"
              + (f", stopped by its cap at step {top.steps}" if top.capped else "") + f") over {len(timed)} logs")
    if not rec.record_track:
        return Check("train_time", "info", f"{rec.path}: {detail} (non-record track: no limit)")
    if over:
        return Check("train_time", "FAULT", f"over {TRAIN_LIMIT_S:g} s: " + "; ".join(over))
    return Check("train_time", "ok", f"{rec.path}: {detail}, limit {TRAIN_LIMIT_S:g} s")


def _eval_time(rec: Folder) -> Check:
    timed = [r for r in rec.runs if r.eval_time_ms is not None]
    if not timed:
        return Check("eval_time", "skip", f"{rec.path}: no total_eval_time and no eval_time on the scored lines")
    top = max(timed, key=lambda r: r.eval_time_ms)
    source = "total_eval_time" if top.total_eval_time_ms is not None else f"`{top.scored.label}` eval_time"
    detail = f"longest {top.eval_time_ms / 1000:.1f} s ({rec.rel(top)}, {source}) over {len(timed)} logs"
    if not rec.record_track:
        return Check("eval_time", "info", f"{rec.path}: {detail} (non-record track: no limit)")
    over = [f"{rec.path / rec.rel(r)}: {r.eval_time_ms / 1000:.1f} s" for r in timed
            if r.eval_time_ms > 1000 * EVAL_LIMIT_S]
    if over:
        return Check("eval_time", "FAULT", f"over {EVAL_LIMIT_S:g} s: " + "; ".join(over))
    return Check("eval_time", "ok", f"{rec.path}: {detail}, limit {EVAL_LIMIT_S:g} s")


def _others_on(rec: Folder, pool: list[Folder]) -> list[Folder]:
    return [o for o in pool if o is not rec and o.tokenizer and o.tokenizer == rec.tokenizer]


def _val_set(rec: Folder, pool: list[Folder]) -> Check:
    counts = {(rec.rel(r), r.val_tokens) for r in rec.runs if r.val_tokens is not None}
    if not counts:
        return Check("val_set", "skip", f"{rec.path}: no validation token count in the logs")
    by_record = collections.Counter()
    for o in _others_on(rec, pool):
        values = [r.val_tokens for r in o.runs if r.val_tokens is not None]
        if values:
            by_record[collections.Counter(values).most_common(1)[0][0]] += 1
    if not by_record:
        return Check("val_set", "skip", f"{rec.path}: no other record on tokenizer {rec.tokenizer or '?'} to compare "
                                        f"its {sorted({c for _, c in counts})[0]:,} validation tokens with")
    usual, n = by_record.most_common(1)[0]
    off = sorted((c, name) for name, c in counts if c != usual)
    base = f"tokenizer {rec.tokenizer}: usual {usual:,} validation tokens ({n} of {sum(by_record.values())} records)"
    if not off:
        return Check("val_set", "ok", f"{rec.path}: {len(counts)} logs score {usual:,} tokens; {base}")
    far = [(c, name) for c, name in off if abs(c / usual - 1) > VAL_SET_TOLERANCE]
    shown = "; ".join(f"{rec.path / name}: {c:,} tokens ({100 * (c / usual - 1):+.2f}%)" for c, name in (far or off))
    if far:
        return Check("val_set", "FAULT", f"{shown}; {base}")
    return Check("val_set", "info", f"{shown}, within {100 * VAL_SET_TOLERANCE:g}% (cut to whole sequences); {base}")


def _bpb_ratio(rec: Folder, pool: list[Folder]) -> Check:
    ratio = rec.ratio
    if ratio is None:
        return Check("bpb_ratio", "skip", f"{rec.path}: no scored line")
    others = [o.ratio for o in _others_on(rec, pool) if o.ratio is not None]
    tokens_per_byte = ratio * math.log(2)
    if not others:
        return Check("bpb_ratio", "skip", f"{rec.path}: val_bpb/val_loss {ratio:.5f} ({tokens_per_byte:.5f} tokens per "
                                          f"byte); no other record on tokenizer {rec.tokenizer or '?'}")
    ref = statistics.median(others)
    off = ratio / ref - 1
    detail = (f"{rec.path}: val_bpb/val_loss {ratio:.5f} ({tokens_per_byte:.5f} tokens per byte) vs {ref:.5f}, the "
              f"median of {len(others)} other records on {rec.tokenizer}: {100 * off:+.2f}%")
    return Check("bpb_ratio", "FAULT" if abs(off) > RATIO_TOLERANCE else "ok",
                 detail + (" (a byte-counting error?)" if abs(off) > RATIO_TOLERANCE else ""))


def _files(rec: Folder) -> Check:
    try:
        names = sorted(p.name for p in rec.path.iterdir())
    except OSError as e:
        return Check("files", "FAULT", f"{rec.path}: cannot be listed ({e.strerror or e})")
    code = [n for n in names if n.endswith(".py")]
    missing, notes = [], []
    if rec.submission_problem:
        missing.append(rec.submission_problem)
    elif not rec.submission_name:
        missing.append("no submission JSON")
    elif rec.submission_name != "submission.json":
        notes.append(f"the JSON is {rec.submission_name}")
    if not rec.runs:
        missing.append("no training log with a final evaluation")
    if not code:
        missing.append("no code (train_gpt.py)")
    elif "train_gpt.py" not in code:
        notes.append(f"the code is {', '.join(code)} (no train_gpt.py)")
    if "README.md" not in names:
        missing.append("no README.md")
    if rec.other_logs:
        notes.append("not counted as runs: " + ", ".join(rec.other_logs))
    detail = f"{rec.path}: {rec.submission_name or 'no JSON'}, {len(rec.runs)} logs, {len(code)} code files"
    return Check("files", "FAULT" if missing else "ok", "; ".join([detail] + missing + notes))


def parameter_golf_checks(rec: Folder, pool: list[Folder], margin: float = DEFAULT_MARGIN,
                          alpha: float = DEFAULT_ALPHA) -> list[Check]:
    return [_files(rec), rec.claim_check or _claim(rec), _seeds(rec), _significance(rec, pool, margin, alpha),
            _artifact(rec), _train_time(rec), _eval_time(rec), _val_set(rec, pool), _bpb_ratio(rec, pool)]


# ----------------------------------------------------------------------------------------------------------------------
# modded-nanogpt


def modded_target(folder: Path) -> float:
    for part in folder.parts:
        if part in MODDED_TARGETS:
            return MODDED_TARGETS[part]
    return MODDED_TARGET


STATS_PATTERNS = {  # what a statistics.md states, in the phrasings modded-nanogpt's records use
    "runs": (r"(\d+)\s+(?:[a-z]+\s+)?runs\b", r"runs:\s*`?(\d+)"),
    "mean": (rf"\|\s*val_loss\s*\|\s*({NUM})\s*\|", rf"\|\s*mean val loss\s*\|\s*({NUM})"),
    "p": (rf"p\(val_loss < {NUM}\)\s*=\s*\**({NUM})", rf"\|\s*one-sided p vs {NUM}\s*\|\s*({NUM})"),
    "train_s": (rf"\|\s*mean train time\s*\|\s*({NUM})\s*s", rf"\|\s*train_time \(ms\)\s*\|\s*({NUM})"),
}


def _statistics_md(path: Path) -> dict[str, tuple[float, int, str]]:
    """{runs, mean, p, train_s: (value, decimals printed, as printed)} of a statistics.md; absent when not found
    (train_s: mean train time in seconds, also when printed in ms)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out = {}
    for key, patterns in STATS_PATTERNS.items():
        for i, pattern in enumerate(patterns):
            m = re.search(pattern, text, flags=re.I)
            if m:
                in_ms = key == "train_s" and i == 1
                value, digits = float(m.group(1)), printed_decimals(m.group(1))
                out[key] = (value / 1000, digits + 3, f"{m.group(1)} ms") if in_ms else (value, digits, m.group(1))
                break
    return out


def _statistics_claim(stats_path: Path, losses: list[float], times_s: list[float], target: float) -> Check:
    try:
        stated = _statistics_md(stats_path)
    except OSError as e:
        return Check("claim", "FAULT", f"{stats_path}: unreadable ({e.strerror or e})")
    if not stated:
        return Check("claim", "skip", f"{stats_path}: states no runs, mean val_loss or p in a form this reader knows")
    logs = {"runs": float(len(losses)), "mean": mean_std(losses)[0],
            "p": welch_test(losses, [target], 0.0).p if len(losses) > 1 else None,
            "train_s": mean_std(times_s)[0] if times_s else None}
    names = {"runs": "runs", "mean": "mean val_loss", "p": "p", "train_s": "mean train time"}
    problems, agree = [], []
    for key, (value, digits, text) in stated.items():
        want = logs[key]
        if want is None:
            continue
        # one unit of the last printed digit; runs exactly; p within 1% (t tails differ slightly between tools)
        tol = 0.5 if key == "runs" else max(10 ** -digits, 0.01 * want) if key == "p" else 10 ** -digits
        if abs(value - want) <= tol * (1 + 1e-9):
            agree.append(f"{names[key]} {text}")
        else:
            problems.append(f"{names[key]} {text}, the logs give {want:.6g}")
    if problems:
        return Check("claim", "FAULT", f"{stats_path}: says " + "; ".join(problems))
    return Check("claim", "ok", f"{stats_path}: " + ", ".join(agree) + f" agree with the {len(losses)} logs")


def modded_checks(rec: Folder, alpha: float = DEFAULT_ALPHA) -> list[Check]:
    runs = rec.runs
    target = modded_target(rec.path)
    stats_path = rec.path / "statistics.md"
    losses = [r.scored.val_loss for r in runs]
    names = ", ".join(rec.rel(r) for r in runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    checks = [Check("files", "ok" if runs else "FAULT",
                    f"{rec.path}: {len(runs)} run logs" + (f" ({names})" if runs else "")
                    + ("; statistics.md" if stats_path.is_file() else "; no statistics.md")
                    + (f"; not counted as runs: {', '.join(rec.other_logs)}" if rec.other_logs else ""))]
    if not runs:
        return checks + [Check(name, "skip", f"{rec.path}: no run log") for name in
                         ("claim", "seeds", "significance", "train_time")]
    mean, std = mean_std(losses)
    steps = sorted({r.scored.label for r in runs})
    times = [r.train_time_ms / 1000 for r in runs if r.train_time_ms is not None]
    if stats_path.is_file():
        checks.append(_statistics_claim(stats_path, losses, times, target))
    else:
        checks.append(Check("claim", "skip", f"{rec.path}: no statistics.md; the logs' mean val_loss is {mean:.5f}"))
    checks.append(Check("seeds", "ok" if len(runs) > 1 else "info",
                        f"{rec.path}: {len(runs)} runs, final steps {', '.join(steps)}"))
    baseline = "baseline" in rec.name.lower()
    if len(losses) < 2:
        checks.append(Check("significance", "skip", f"{rec.path}: 1 run, val_loss {losses[0]:.4f}: the t-test cannot "
                                                    f"be made"))
    else:
        p = welch_test(losses, [target], 0.0).p
        detail = (f"{rec.path}: mean val_loss {mean:.5f} ± {std:.5f} over {len(losses)} runs, one-sided t-test "
                  f"against {target:g}: p={p:.3g} (alpha {alpha:g})")
        why = (" (a baseline re-run, not the claim)" if baseline else
               " (runs of different lengths: not one configuration)" if len(steps) > 1 else "")
        status = "ok" if p < alpha else "info" if why else "FAULT"
        checks.append(Check("significance", status, detail + (why if p >= alpha else "")
                            + (f"; {WAIVER}" if status == "FAULT" else "")))
    if times:
        t_mean, t_std = mean_std(times)
        checks.append(Check("train_time", "info", f"{rec.path}: train_time {t_mean:.2f} s"
                            + (f" ± {t_std:.2f}" if t_std is not None else "") + f" over {len(times)} runs"))
    else:
        checks.append(Check("train_time", "skip", f"{rec.path}: no train_time on the val_loss lines"))
    return checks


# ----------------------------------------------------------------------------------------------------------------------
# Verifying


_LOADED: dict[tuple[Path, str], Folder] = {}  # every folder read in this process
_POOLS: dict[tuple[Path, str], list[Folder]] = {}


def forget() -> None:
    """Drop what this process has read (logs, folders, pools): a new verification reads the files as they are now."""
    _RUNS.clear()
    _LOADED.clear()
    _POOLS.clear()


def _loaded(folder: Path, rules: str) -> Folder:
    key = (folder.absolute(), rules)
    if key not in _LOADED:
        _LOADED[key] = load(folder, rules)
    return _LOADED[key]


def pool_of(folder: Path, rules: str) -> list[Folder]:
    """The records a parameter-golf folder is compared with: every record of its tree (the folder above its track
    folder when that is named track_...), else its siblings; the folder itself included."""
    track_dir = folder.absolute().parent
    root = track_dir.parent if track_dir.name.startswith("track") else track_dir
    if (root, rules) not in _POOLS:
        _POOLS[root, rules] = [_loaded(p, rules) for p, r in find_records(root, rules) if r == rules]
    pool = _POOLS[root, rules]
    rec = _loaded(folder, rules)
    return pool if rec in pool else pool + [rec]


def verify_folder(folder: Path, rules: str, margin: float = DEFAULT_MARGIN,
                  alpha: float = DEFAULT_ALPHA) -> RecordReport:
    """The named checks of one record folder under parameter-golf's or modded-nanogpt's rules."""
    rec = _loaded(folder, rules)
    if rules == "parameter-golf":
        checks = parameter_golf_checks(rec, pool_of(folder, rules), margin, alpha)
    else:
        checks = modded_checks(rec, alpha)
    return RecordReport(folder, rules, checks)


def leaderboard_rows(records_dir: Path, rules: str, margin: float = DEFAULT_MARGIN,
                     alpha: float = DEFAULT_ALPHA) -> dict[str, list[dict]]:
    """{track: rows} for a tree of another leaderboard: each record's result and the checks that flag it."""
    by_track: dict[str, list[dict]] = {}
    for folder, r in find_records(records_dir, rules):
        if r not in RULES:
            continue
        report = verify_folder(folder, r, margin, alpha)
        rec = _loaded(folder, r)
        row = {"folder": folder, "rules": r, "date": rec.date, "flags": [c.check for c in report.faults],
               "runs": len(rec.chosen if r == "parameter-golf" else rec.runs)}
        if r == "parameter-golf":
            claimed = _claimed(rec)
            values = [x.scored.val_bpb for x in rec.chosen]
            row.update(score=claimed[0], logs=mean_std(values) if values else None,
                       name=str((rec.submission or {}).get("name", folder.name)))
        else:
            losses = [x.scored.val_loss for x in rec.runs]
            times = [x.train_time_ms / 1000 for x in rec.runs if x.train_time_ms is not None]
            row.update(score=mean_std(times)[0] if times else None, logs=mean_std(losses) if losses else None,
                       name=str(folder.relative_to(records_dir)))
        by_track.setdefault(str(folder.relative_to(records_dir).parts[0]) if folder != records_dir else folder.name,
                            []).append(row)
    return by_track

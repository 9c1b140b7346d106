"""
`speedrun reproduce`: A record against the record it beat, trained again on this
machine, seed by seed, each with its own embedded code.

  speedrun reproduce FOLDER [--seeds N] [--against FOLDER] [--jobs 1] [--tolerance T] [--margin M]
                                   [--alpha A] [--date YYYY-MM-DD] [--experiments-dir DIR] [--force]

Why: on a wall-clock track (cpu_5min: 215 s of training) a run's score depends on the machine's speed, so a record's
claimed val_bpb does not carry over to another machine. What carries over is the comparison made on one machine in
one sitting: the record against the record it beat, same seeds, one run after the other.

The two arms: FOLDER (the record) and the record it was compared with: --against FOLDER (a path, or a folder name in
FOLDER's track), else submission.json's `compared_with`. Both must be scored on the same data (the logs' tokenizer
sha256 and validation documents, tokens and bytes), and that dataset must be on this machine with the fingerprint the
logs give (speedrun.audit's, as `speedrun verify` checks it; DATA_PATH is relative to the repository root).

Seeds: the first N (--seeds, default 3, or fewer when the record has fewer) of FOLDER's seeds, for both arms. A seed
the other record has no log of runs with the configuration of that record's first log (a record runs the same
configuration for every seed) and has no claimed figure to compare with; the table says so.

Code: each arm runs its own: the train_gpt.py, kernels/ and eval_ttt.py embedded in its logs (they must equal the
folder's files), written into a temporary folder and run from there with `python train_gpt.py` (torchrun for a log
with world_size > 1), never the repository's code. A run's environment is this one without any variable the records'
code reads as a hyperparameter (whatever is set in this shell does not leak in), plus the variables its log was given
(the `env_overrides:` line; for a log older than that line, every hyperparameter it printed) less the per-run ones,
plus SEED, RUN_ID (`<arm>_seed<N>`, arm `against` or `record`), LOG_DIR and CHECKPOINT_DIR (in the output folder),
and DATA_PATH and TOKENIZER_PATH made absolute.

Order: seed by seed, the two arms of a seed one after the other, the arm that goes first alternating (against,
record; record, against; ...), so that a drift in the machine's speed hits both arms alike. --jobs 2 runs both arms
of a seed at once, each with half the cores (OMP_NUM_THREADS); the speeds are then not solo figures.

Step by step: a record scored on a fixed number of steps (MAX_WALLCLOCK_SECONDS=0, no wall-clock cap) trains the same
steps on any machine, so each seed's reproduced train losses are compared with its log's, step by step, within
--tolerance nats (default 0.001; the log prints 4 decimals), and the first step where they part is named. A
wall-clock record's step count follows the machine's speed: its losses are not compared step by step.

Output: one table, printed and written to experiments/<date>_reproduce_<FOLDER name>/ (README.md and summary.json
are meant to be committed; the runs' logs/ stay local): per arm the claimed val_bpb (mean of all its logs), the
reproduced val_bpb mean ± std and val_loss mean, steps and tokens/s claimed and here; the improvement here (the other
record's mean val_loss minus this one's) in nats and BPB, next to the claimed one; the record rule's one-sided Welch
p (speedrun.records.check's welch_test, H1: record mean < other mean - margin; margin 0.005 nats and alpha 0.01, as
`verify`); and the verdict:
  holds           the improvement is significant here (p < alpha, at the margin)
  weaker          the record is better here, but not significantly (with one seed: not tested)
  does not hold   the record is not better here
Exit status 0 when it holds, 1 when it is weaker or does not hold.

Bad input (not a record folder, no compared_with and no --against, records on other data, a dataset that is not on
this machine or not the one in the logs, a folder whose code differs from its logs', bad options, an existing output
folder without --force): one line `error: ...`, exit status 2, nothing run or written. A run that fails (non-zero
exit, no `final` line, other code or data than the record's): the other runs are stopped, its last 30 lines go to
stderr and to experiments/<date>_reproduce_<FOLDER name>.failed.log, no folder is written, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from data.files import write_atomic
from speedrun.experiments.arms import (OneLineParser, OutputFolder, Run, RunFailed, UsageError, arm_statistics,
                      difference, execute, finished_log, folder_date, gpu_names, hardware, keep_failure, log_figures,
                      num, relative, run_result, thread_env)
from speedrun.records.check import (DEFAULT_ALPHA, DEFAULT_MARGIN, PER_RUN_HPARAMS, Dataset, folder_code_files,
                          log_dataset, mean_std, read_json, same_data)
from speedrun.analysis.run_log import TrainLog, parse_log

DEFAULT_EXPERIMENTS_DIR = ROOT / "experiments"
DEFAULT_SEEDS = 3
DEFAULT_TOLERANCE = 1e-3
ARMS = ("against", "record")


# ----------------------------------------------------------------------------------------------------------------------
# The records


@dataclass
class Arm:
    key: str  # "against" or "record": the arm's RUN_ID prefix
    folder: Path
    logs: dict[int, TrainLog]  # every log of the folder, by seed, in seed order
    code: dict[str, bytes]  # the embedded code (the same in every log)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def first(self) -> TrainLog:
        return next(iter(self.logs.values()))

    @property
    def wallclock_cap(self) -> float:
        try:
            return float(self.first.hparams.get("max_wallclock_seconds", "0"))
        except ValueError:
            return 0.0

    @property
    def fixed_steps(self) -> bool:
        """Scored on a fixed number of steps: no wall-clock cap, so every machine trains the same steps."""
        return self.wallclock_cap <= 0


def read_record(folder: Path, key: str, what: str) -> Arm:
    """The record in `folder`, its logs parsed and its code checked; UsageError naming the file otherwise."""
    sub_path = folder / "submission.json"
    log_paths = sorted(folder.glob("train_seed*.log")) if folder.is_dir() else []
    if not sub_path.is_file() or not log_paths:
        raise UsageError(f"{relative(folder)}{what}: not a record (a folder with submission.json and "
                         "train_seed<N>.log)")
    try:
        if not isinstance(read_json(sub_path), dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise UsageError(f"{relative(sub_path)}: unreadable ({e})") from None
    logs = {}
    for path in log_paths:
        lg = parse_log(path)
        if lg.problems:
            raise UsageError(f"{relative(path)}: {lg.problems[0]} (speedrun verify {relative(folder)} "
                             "lists every problem)")
        if lg.seed in logs:
            raise UsageError(f"{relative(path)}: seed {lg.seed} is also the seed of {logs[lg.seed].name}")
        logs[lg.seed] = lg
    logs = dict(sorted(logs.items()))
    first = next(iter(logs.values()))
    for lg in logs.values():
        if lg.code != first.code:
            raise UsageError(f"{relative(lg.path)}: embeds other code than {first.name}; a record's runs ran one "
                             "code")
    on_disk = folder_code_files(folder)
    for name, data in first.code.items():
        if name.startswith("/") or ".." in Path(name).parts or not name.endswith(".py"):
            raise UsageError(f"{relative(first.path)}: embedded file name {name!r} is not a relative .py path")
        if on_disk.get(name) != data:
            problem = "missing" if name not in on_disk else f"differs from the code embedded in {first.name}"
            raise UsageError(f"{relative(folder / name)}: {problem} (speedrun verify "
                             f"{relative(folder)} checks the code)")
    return Arm(key, folder, logs, first.code)


def against_folder(record: Path, against: str | None) -> tuple[Path, str]:
    """The folder of the record to compare with, and where it was named."""
    if against:
        path = Path(against)
        return (path if path.is_dir() else record.parent / against).resolve(), "--against"
    sub = read_json(record / "submission.json")
    name = sub.get("compared_with")
    if not name:
        raise UsageError(f"{relative(record / 'submission.json')}: no compared_with; name the record to compare "
                         "with: --against FOLDER")
    return (record.parent / str(name)).resolve(), "its compared_with"


def dataset_problem(lg: TrainLog, cache: dict) -> str | None:
    """Why the log's dataset cannot be used on this machine (not here, or not the data the log was scored on)."""
    from speedrun.audit.fingerprint import record_fingerprint_problems  # (numpy, sentencepiece and torch: only once the input is read)

    problems, checked = record_fingerprint_problems(lg.hparams, lg.tokenizer_sha256, lg.val_data, lg.train_data,
                                                    ROOT, cache)
    if checked is None:
        return (f"its dataset {lg.hparams.get('data_path', '(no data_path)')} is not on this machine (DATA_PATH is "
                "relative to the repository root; see the README's Data section)")
    if problems:
        return f"the dataset on this machine is not the one it was scored on: {'; '.join(problems)}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The plan: every run's code, environment and order, checked before the first one starts


@dataclass
class Reproduction(OutputFolder):
    record: Arm
    against: Arm
    against_named_by: str
    seeds: list[int]
    jobs: int
    tolerance: float
    margin: float
    alpha: float
    date: str
    experiments_dir: Path
    dataset: Dataset
    runs: list[Run] = field(default_factory=list)

    @property
    def arms(self) -> dict[str, Arm]:
        return {"against": self.against, "record": self.record}

    @property
    def stem(self) -> str:  # experiments/<date>_reproduce_<record folder>/
        return f"{self.date}_reproduce_{self.record.name}"

    def missing_seeds(self, arm: Arm) -> list[int]:
        return [s for s in self.seeds if s not in arm.logs]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="speedrun reproduce", description=__doc__.strip(),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="the record folder, e.g. records/cpu_5min/2026-11-23_SmallBatch")
    p.add_argument("--seeds", type=int, help=f"the first N seeds of FOLDER's logs (default {DEFAULT_SEEDS}, or all "
                                             "when it has fewer)")
    p.add_argument("--against", metavar="FOLDER", help="the record to compare with (a path, or a folder name in "
                                                       "FOLDER's track); default: FOLDER's compared_with")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1); speeds are then not solo figures")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"nats a reproduced train loss may differ from the log's, for a fixed-step record (default "
                        f"{DEFAULT_TOLERANCE:g})")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"nats of val_loss the record must beat the other by (default {DEFAULT_MARGIN}, as verify)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"significance level of the one-sided Welch t-test (default {DEFAULT_ALPHA}, as verify)")
    p.add_argument("--date", help="the output folder's date, YYYY-MM-DD (default: today)")
    p.add_argument("--experiments-dir", default=str(DEFAULT_EXPERIMENTS_DIR),
                   help="where the output folder goes (default: experiments/)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


def plan(argv) -> Reproduction:
    """Parse and check everything; raises UsageError before anything is run or written."""
    args = build_parser().parse_args([str(a) for a in argv])
    date = folder_date(args.date)
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if not 0 <= args.tolerance < float("inf"):
        raise UsageError(f"--tolerance {args.tolerance}: must be >= 0")
    if not 0 <= args.margin < float("inf"):
        raise UsageError(f"--margin {args.margin}: must be >= 0")
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha {args.alpha}: must be in (0, 1)")
    record_dir = Path(args.folder).resolve()
    record = read_record(record_dir, "record", "")
    against_dir, named_by = against_folder(record_dir, args.against)
    if against_dir == record_dir:
        raise UsageError(f"{args.folder}: {named_by} names the record itself; compare it with another record")
    against = read_record(against_dir, "against", f" ({named_by})")
    data, other = log_dataset(record.first), log_dataset(against.first)
    if not same_data(data, other):
        raise UsageError(f"{record.name} was scored on {data.describe()}, {against.name} on {other.describe()}: "
                         "their losses do not compare")
    n = DEFAULT_SEEDS if args.seeds is None else args.seeds
    if n < 1:
        raise UsageError(f"--seeds {n}: must be at least 1")
    if args.seeds is not None and n > len(record.logs):
        raise UsageError(f"--seeds {n}: {args.folder} has {len(record.logs)} seeds")
    seeds = list(record.logs)[:n]
    rep = Reproduction(record=record, against=against, against_named_by=named_by, seeds=seeds, jobs=args.jobs,
                       tolerance=args.tolerance, margin=args.margin, alpha=args.alpha, date=date,
                       experiments_dir=Path(args.experiments_dir).resolve(), dataset=data)
    cache: dict = {}
    for arm in rep.arms.values():
        for lg in {id(log): log for log in (source_log(arm, s) for s in seeds)}.values():
            problem = dataset_problem(lg, cache)
            if problem:
                raise UsageError(f"{relative(lg.path)}: {problem}")
    if rep.folder.exists() and not args.force:
        raise UsageError(f"{relative(rep.folder)} exists; give --force to replace it")
    hp_names = {name.upper() for arm in rep.arms.values() for lg in arm.logs.values() for name in lg.hparams}
    for i, seed in enumerate(seeds):
        for key in ARMS if i % 2 == 0 else ARMS[::-1]:  # who goes first alternates: a drift hits both arms alike
            rep.runs.append(make_run(rep, rep.arms[key], seed, hp_names))
    return rep


def source_log(arm: Arm, seed: int) -> TrainLog:
    """The log whose configuration a seed's run repeats: the seed's own, else the arm's first."""
    return arm.logs.get(seed, arm.first)


def repository_path(path: str) -> str:
    """A record's paths are relative to the repository root, where its runs started."""
    return str(Path(path) if Path(path).is_absolute() else ROOT / path)


def make_run(rep: Reproduction, arm: Arm, seed: int, hp_names: set[str]) -> Run:
    lg = source_log(arm, seed)
    per_run = {name.upper() for name in PER_RUN_HPARAMS}
    env = {k: v for k, v in os.environ.items() if k not in hp_names}
    env.update(thread_env(rep.jobs))
    env.update({k: v for k, v in lg.run_env().items() if k not in per_run})
    env.update(SEED=str(seed), RUN_ID=f"{arm.key}_seed{seed}", LOG_DIR=str(rep.work / "logs"),
               CHECKPOINT_DIR=str(rep.work / "checkpoints"), DATA_PATH=repository_path(lg.hparams["data_path"]))
    if lg.hparams.get("tokenizer_path"):
        env["TOKENIZER_PATH"] = repository_path(lg.hparams["tokenizer_path"])
    world = lg.run.get("world_size", 1) or 1
    command = [sys.executable, "train_gpt.py"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "train_gpt.py"]
    return rep.run(arm.key, seed, env, command, rep.work / "code" / arm.key, title=arm.name)


def write_code(rep: Reproduction) -> None:
    """Each arm's embedded code, byte for byte, into its run folder."""
    for arm in rep.arms.values():
        for name, data in arm.code.items():
            path = rep.work / "code" / arm.key / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


# ----------------------------------------------------------------------------------------------------------------------
# Running


def progress(message: str) -> None:
    print(f"reproduce: {message}", file=sys.stderr, flush=True)


def check_run(rep: Reproduction, run: Run, status: int) -> None:
    """A finished run must have a result and its seed, and have run its record's code on its record's data."""
    log = finished_log(run, status)
    arm = rep.arms[run.arm]
    if log.code != arm.code:
        raise RunFailed(run, f"its log embeds other code than {arm.name}'s")
    data = log_dataset(log)
    if data.key != rep.dataset.key:
        raise RunFailed(run, f"it was scored on {data.describe()}, not on the records' {rep.dataset.describe()}")
    run.train_log = log


def report_failure(rep: Reproduction, failure: RunFailed) -> None:
    run = failure.run
    settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items() if os.environ.get(k) != v)
    keep_failure(failure, rep.failed_log, f"reproduce {rep.record.name}: the {run.title} run, seed {run.seed}, "
                 f"failed: {failure.reason}", f"{settings} {shlex.join(run.command)} (in a copy of {run.title}'s code)",
                 "output folder")


# ----------------------------------------------------------------------------------------------------------------------
# Results: figures, step-by-step agreement, statistics, verdict


def step_agreement(claimed: TrainLog, here: TrainLog, tolerance: float) -> dict:
    """A fixed-step run against its log: train losses at the steps both logged, where they first differ by more than
    the tolerance, and the final val_loss of each."""
    logged = {r["step"]: r["train_loss"] for r in claimed.train_steps if "train_loss" in r}
    ours = {r["step"]: r["train_loss"] for r in here.train_steps if "train_loss" in r}
    common = sorted(set(logged) & set(ours))
    gaps = {s: abs(ours[s] - logged[s]) for s in common}
    parts = next((s for s in common if gaps[s] > tolerance), None)
    return {"steps_logged": len(logged), "steps_here": len(ours), "steps_compared": len(common),
            "max_abs_difference": max(gaps.values()) if gaps else None, "parts_at_step": parts,
            "train_loss_logged": logged.get(parts), "train_loss_here": ours.get(parts),
            "agrees": parts is None and len(common) == len(logged) == len(ours) > 0,
            "val_loss_logged": float(claimed.final["val_loss"]), "val_loss_here": float(here.final["val_loss"])}


def agreement_text(a: dict, tolerance: float) -> str:
    if a["parts_at_step"] is not None:
        text = (f"parts at step {a['parts_at_step']}: train_loss {a['train_loss_logged']:.4f} logged, "
                f"{a['train_loss_here']:.4f} here (tolerance {tolerance:g})")
    elif a["agrees"]:
        text = (f"train_loss agrees at all {a['steps_compared']} logged steps (max |difference| "
                f"{a['max_abs_difference']:.4f}, tolerance {tolerance:g})")
    else:
        text = (f"train_loss agrees at the {a['steps_compared']} steps both logged, but {a['steps_logged']} were "
                f"logged and {a['steps_here']} here")
    return text + f"; val_loss {a['val_loss_logged']:.8f} logged, {a['val_loss_here']:.8f} here"


def claimed_statistics(arm: Arm) -> dict:
    """What the record claims: the statistics of all its logs (submission.json's numbers, as verify checks)."""
    rows = [log_figures(lg) for lg in arm.logs.values()]
    return {**arm_statistics(rows), "steps_mean": mean_std([r["steps"] for r in rows])[0]}


def verdict(improvement: float, p: float | None, alpha: float) -> str:
    if p is not None and p < alpha:
        return "holds"
    return "weaker" if improvement > 0 else "does not hold"


def summarize(rep: Reproduction) -> dict:
    rows = []
    for run in rep.runs:
        claimed = rep.arms[run.arm].logs.get(run.seed)
        rows.append({**run_result(run), "folder": rep.arms[run.arm].name,
                     "claimed": log_figures(claimed) if claimed else None})
    arms = {}
    for key, arm in rep.arms.items():
        mine = [r for r in rows if r["arm"] == key]
        arms[key] = {"folder": relative(arm.folder), "claimed": claimed_statistics(arm),
                     "here": {**arm_statistics(mine), "steps_mean": mean_std([r["steps"] for r in mine])[0]},
                     "seeds_without_log": rep.missing_seeds(arm), "fixed_steps": arm.fixed_steps,
                     "max_wallclock_seconds": arm.wallclock_cap}
    diff = difference([r for r in rows if r["arm"] == "against"], [r for r in rows if r["arm"] == "record"],
                      margin=rep.margin)
    claimed = {key: arms[key]["claimed"] for key in ARMS}
    improvement = {
        "val_loss": -diff["val_loss"], "val_bpb": -diff["val_bpb"],
        "claimed_val_loss": claimed["against"]["val_loss_mean"] - claimed["record"]["val_loss_mean"],
        "claimed_val_bpb": claimed["against"]["val_bpb_mean"] - claimed["record"]["val_bpb_mean"],
        "p": diff["p_variant_lower"], "welch_t": diff["welch_t"], "welch_dof": diff["welch_dof"]}
    step_by_step = []
    for run in rep.runs:
        arm = rep.arms[run.arm]
        if arm.fixed_steps and run.seed in arm.logs:
            step_by_step.append({"arm": run.arm, "seed": run.seed, "log": arm.logs[run.seed].name,
                                 **step_agreement(arm.logs[run.seed], run.train_log, rep.tolerance)})
    first = rep.runs[0].train_log
    return {
        "record": relative(rep.record.folder), "against": relative(rep.against.folder),
        "against_named_by": rep.against_named_by, "date": rep.date, "seeds": rep.seeds, "jobs": rep.jobs,
        "speeds_are_solo": rep.jobs == 1, "order": [r.run_id for r in rep.runs], "command": command(rep),
        "machine": machine(), "gpus_line": first.gpus, "versions": dict(first.versions),
        "dataset": rep.dataset.describe(), "margin": rep.margin, "alpha": rep.alpha, "tolerance": rep.tolerance,
        "runs": rows, "arms": arms, "improvement": improvement,
        "verdict": verdict(improvement["val_loss"], improvement["p"], rep.alpha), "step_by_step": step_by_step,
        "statistic": f"one-sided Welch t-test of val_loss, H1: record mean < other record's mean - {rep.margin:g} "
                     "(speedrun.records.check welch_test, the record rule)",
    }


def machine() -> str:
    """This machine, in words: its GPUs, or its CPU model and the cores this process may use."""
    if gpu_names():
        return hardware()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def command(rep: Reproduction) -> str:
    parts = ["speedrun", "reproduce", relative(rep.record.folder), "--seeds", str(len(rep.seeds))]
    if rep.against_named_by == "--against":
        parts += ["--against", relative(rep.against.folder)]
    for flag, value, default in (("--jobs", rep.jobs, 1), ("--tolerance", rep.tolerance, DEFAULT_TOLERANCE),
                                 ("--margin", rep.margin, DEFAULT_MARGIN), ("--alpha", rep.alpha, DEFAULT_ALPHA)):
        if value != default:
            parts += [flag, f"{value:g}"]
    if rep.experiments_dir != DEFAULT_EXPERIMENTS_DIR.resolve():
        parts += ["--experiments-dir", relative(rep.experiments_dir)]
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: the table (printed and in README.md), summary.json


def _arrow(claimed, here, spec: str) -> str:
    return f"{num(claimed, spec)} → {num(here, spec)}"


def verdict_text(s: dict) -> str:
    imp, p = s["improvement"], s["improvement"]["p"]
    test = (f"p = {p:.3g} {'<' if p < s['alpha'] else '>='} {s['alpha']:g} at the margin {s['margin']:g} nats"
            if p is not None else "no significance test with one seed per arm")
    return {"holds": f"holds: a significant improvement on this machine ({test})",
            "weaker": f"weaker: an improvement on this machine, but not a significant one ({test})",
            "does not hold": f"does not hold: no improvement on this machine ({imp['val_loss']:+.4f} nats; {test})",
            }[s["verdict"]]


ARM_COLUMNS = ("record", "claimed val_bpb (n)", "val_bpb here (mean ± std)", "val_loss here", "steps claimed → here",
               "tokens/s claimed → here")


def arm_rows(s: dict) -> list[list[str]]:
    """The table's cells, one row per arm (the other record first)."""
    rows = []
    for key in ARMS:
        c, h = s["arms"][key]["claimed"], s["arms"][key]["here"]
        rows.append([Path(s["arms"][key]["folder"]).name, f"{c['val_bpb_mean']:.4f} ({c['n']})",
                     f"{h['val_bpb_mean']:.4f} ± {num(h['val_bpb_std'], '.4f')}", f"{h['val_loss_mean']:.4f}",
                     _arrow(c["steps_mean"], h["steps_mean"], ".0f"),
                     _arrow(c["tokens_per_s_mean"], h["tokens_per_s_mean"], ",.0f")])
    return rows


def table(s: dict) -> str:
    rows = [list(ARM_COLUMNS)] + arm_rows(s)
    widths = [max(len(row[i]) for row in rows) for i in range(len(ARM_COLUMNS))]
    lines = [f"reproduce {s['record']} against {s['against']} ({s['against_named_by']}), seeds "
             f"{', '.join(map(str, s['seeds']))}, {s['date']}, on {s['machine']}"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    imp = s["improvement"]
    lines.append(f"improvement here ({Path(s['against']).name} - {Path(s['record']).name}): {imp['val_loss']:+.4f} "
                 f"nats of val_loss, {imp['val_bpb']:+.4f} BPB (claimed: {imp['claimed_val_loss']:+.4f} nats, "
                 f"{imp['claimed_val_bpb']:+.4f} BPB)")
    p_text = (f"{imp['p']:.3g} (t={num(imp['welch_t'], '.3f')}, dof={num(imp['welch_dof'], '.2f')})"
              if imp["p"] is not None else "n/a (needs 2 seeds per arm)")
    lines.append(f"one-sided Welch p (record lower by more than {s['margin']:g} nats): {p_text}")
    lines.append(f"verdict: {verdict_text(s)}")
    return "\n".join(lines + notes(s))


def notes(s: dict) -> list[str]:
    """What the table's numbers need said with them: seeds without a log, wall-clock arms, the step-by-step check."""
    arms, lines = s["arms"], []
    for key in ARMS:
        missing = arms[key]["seeds_without_log"]
        if missing:
            lines.append(f"(seeds {', '.join(map(str, missing))}: not in {Path(arms[key]['folder']).name}'s logs, "
                         "run with the configuration of its first log; no claimed figures for them)")
    for key in ARMS:
        name = Path(arms[key]["folder"]).name
        if not arms[key]["fixed_steps"]:
            lines.append(f"{name}: wall-clock record (MAX_WALLCLOCK_SECONDS={arms[key]['max_wallclock_seconds']:g}): "
                         "its step count follows this machine's speed; train losses not compared step by step")
    for a in s["step_by_step"]:
        lines.append(f"{Path(arms[a['arm']]['folder']).name} seed {a['seed']} against {a['log']}: "
                     f"{agreement_text(a, s['tolerance'])}")
    if not s["speeds_are_solo"]:
        lines.append(f"(--jobs {s['jobs']}: runs shared the machine; steps and tokens/s are not solo figures)")
    return lines


def readme(s: dict) -> str:
    lines = [f"# Reproduction of {Path(s['record']).name} against {Path(s['against']).name} ({s['date']})", "",
             (f"`{s['record']}` against `{s['against']}` ({s['against_named_by']}), each with its own embedded "
              f"code, seeds {', '.join(map(str, s['seeds']))}, "
              f"arms alternating seed by seed ({', '.join(s['order'])}), on this machine: {s['machine']} "
              f"(`{s['gpus_line']}`). Data: {s['dataset']}."), "",
             "| " + " | ".join(ARM_COLUMNS) + " |", "| --- |" + " ---: |" * (len(ARM_COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in arm_rows(s)]
    imp = s["improvement"]
    p = f"**{imp['p']:.3g}**" if imp["p"] is not None else "n/a (needs 2 seeds per arm)"
    lines += ["", (f"Improvement here: **{imp['val_loss']:+.4f} nats** of val_loss, **{imp['val_bpb']:+.4f} BPB** "
                   f"(claimed: {imp['claimed_val_loss']:+.4f} nats, {imp['claimed_val_bpb']:+.4f} BPB). One-sided "
                   f"Welch p that the record's val_loss is lower by more than {s['margin']:g} nats: {p}."), "",
              f"Verdict: **{verdict_text(s)}**.", ""]
    if notes(s):
        lines += [f"- {line}" for line in notes(s)] + [""]
    lines += ["## Runs", "", "| record | seed | val_bpb here | val_bpb logged | val_loss here | val_loss logged | "
              "steps here | steps logged | tokens/s here | log |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
              "---: | ---: | --- |"]
    for r in s["runs"]:
        c = r["claimed"] or {}
        lines.append(f"| {r['folder']} | {r['seed']} | {r['val_bpb']:.5f} | {num(c.get('val_bpb'), '.5f', '–')} | "
                     f"{r['val_loss']:.5f} | {num(c.get('val_loss'), '.5f', '–')} | {r['steps']} | "
                     f"{num(c.get('steps'), 'd', '–')} | {num(r['tokens_per_s'], ',.0f')} | "
                     f"[{r['log']}]({r['log']}) |")
    lines += ["", "The logs are not committed (gitignored); summary.json has every number above.", "",
              "## Reproduce", "", "```bash", s["command"], "```", "", f"- statistic: {s['statistic']}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in s['versions'].items())}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    try:
        rep = plan(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress(f"{rep.record.name} against {rep.against.name}, seeds {', '.join(map(str, rep.seeds))}: "
             f"{len(rep.runs)} runs, {rep.jobs} at a time")
    try:
        (rep.work / "logs").mkdir(parents=True)
        write_code(rep)
        try:
            execute(rep.runs, rep.jobs, lambda run, status: check_run(rep, run, status), progress)
        except RunFailed as failure:
            report_failure(rep, failure)
            return 2
        summary = summarize(rep)
        write_atomic(rep.work / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
        write_atomic(rep.work / "README.md", readme(summary).encode())
        rep.publish(("console", "checkpoints", "code"))
    finally:
        shutil.rmtree(rep.work, ignore_errors=True)  # (gone already when published)
    print(table(summary))
    print(f"wrote {relative(rep.folder)}/ (summary.json, README.md, logs/)")
    return 0 if summary["verdict"] == "holds" else 1


if __name__ == "__main__":
    sys.exit(main())

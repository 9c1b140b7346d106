#!/usr/bin/env python3
"""
One idea against the baseline, over several seeds, in one command.

  speedrun experiment --name leaky_relu --seeds 3 [--base VAR=val ...] -- VAR=val [VAR=val ...]

  speedrun experiment --name lr_x2 --seeds 3 --base ITERATIONS=140 MAX_WALLCLOCK_SECONDS=0 -- MATRIX_LR=0.08

For each seed (1337, 1338, ... for --seeds N, or --seed-list 1,2,3) the baseline and the variant are trained with
`bash run.sh` from the repository root, one run at a time (--jobs N: N at once). A run's environment is this one,
plus the --base overrides (both arms), plus SEED, RUN_ID (`<arm>_seed<N>`), LOG_DIR and CHECKPOINT_DIR (inside the
experiment's folder), plus, for the variant only, the idea's overrides after `--`. Every VAR must be a hyperparameter
of train_gpt.py (a field of train_gpt.Hyperparameters, upper case); SEED, RUN_ID, LOG_DIR and CHECKPOINT_DIR are set
by the tool. Both arms' configurations are checked with train_gpt.Hyperparameters.from_env before the first run, so
a value the trainer rejects stops here. run.sh fills in its own defaults for what is not set (on a CPU machine: the
tiny model on the bundled sample; on GPUs: torchrun with train_gpt.py's defaults).

Writes experiments/<YYYY-MM-DD>_<name>/ (built in a temporary folder next to it and renamed when complete; an
existing folder is refused unless --force):
  summary.json                 the settings, every run (arm, seed, val_loss, val_bpb, steps, train tokens, train time,
                               tokens/s, steps/s, log, cached), per-arm mean and std, the difference, Welch's p, the
                               dataset fingerprint and the code sha256
  README.md                    the table, both plots and the exact command that reproduces the experiment
  train_loss.png               training loss against training tokens, both arms: mean over seeds, min-max band
  train_loss_difference.png    variant minus baseline, mean over seeds on a common token grid (linear interpolation
                               between logged steps), with the min-max band of the per-seed differences
  logs/                        both arms' train logs (gitignored; summary.json, README.md and the plots are committed)
and prints one table: per arm n, val_bpb mean ± std, val_loss mean, steps/s and tokens/s; the difference (variant
mean - baseline mean) in nats of val_loss and in BPB; the one-sided Welch p that the variant's val_loss is lower
(speedrun.records.check's welch_test with margin 0: the same statistics as a record claim; n/a with one seed).
Logs are read only through speedrun.analysis.run_log's parse_log. steps/s and tokens/s are each run's `final` line (steps,
train_time) with its train_batch_tokens: the training clock, evaluation excluded.

Baseline cache: a finished baseline run is kept in experiments/.baseline_cache/<key>/ (gitignored) and reused by any
later experiment whose baseline run has the same key, so ten ideas cost ten sets of variants and one of baselines
(variants are never cached).
The key is (the first 32 hex digits of) the sha256 of:
  code      sha256 over train_gpt.record_source_files() (train_gpt.py, kernels/*.py, eval_ttt.py) and run.sh
  config    the sorted VAR=value hyperparameter variables the baseline run receives (the --base overrides and any
            hyperparameter variable already set in this environment), without SEED and the output locations RUN_ID,
            LOG_DIR, CHECKPOINT_DIR
  dataset   sha256 of DATA_PATH/manifest.json, or of the shard names and sizes when there is no manifest (DATA_PATH as
            set, else run.sh's default: the bundled sample, or FineWeb on a GPU machine that has it)
  seed, the runner command, and the hardware (`nvidia-smi -L` GPU names, or cpu)
An entry is written only after its run ended with a `final val_loss:` line (to a temporary folder, then renamed).
A fresh run's embedded code must equal the files hashed when the experiment started (an edit to train_gpt.py during
an experiment fails the run instead of poisoning the cache). run.sh prepares the bundled sample again when
prepare_corpus.py's output changes, so the first fresh run may replace the dataset the lookup fingerprinted: every
run's log must name the same tokenizer and training split, and a cached baseline that does not is run again.
--no-cache runs every baseline and refreshes its entry.

--jobs N runs N trainings at once, each with OMP_NUM_THREADS and MKL_NUM_THREADS = max(1, cores // N) (torch's
thread count follows OMP_NUM_THREADS); with --jobs 1 the environment's settings are left as they are. With --jobs > 1
the runs share the machine, so their steps/s and tokens/s are not solo figures (the table, README.md and summary.json
say so); a cached baseline's speed is from whenever it ran. Use --jobs 1 when speed is part of the idea, and on a GPU
machine (run.sh gives every run all GPUs).

Other options: --keep-checkpoints (keep the runs' checkpoints in the folder's checkpoints/, gitignored; default:
deleted), --date (the folder's date), --experiments-dir (another place for the folders and the cache), --runner (the
command that trains one run, default `bash run.sh`; part of the cache key).

Bad input (an unknown variable, a value the trainer rejects, a malformed VAR=val, an existing folder): one line
`error: ...` on stderr, exit status 2, nothing written. A run that fails (non-zero exit, or no `final` line): the
other runs are stopped, the failing run's last 30 lines of output go to stderr and to
experiments/<date>_<name>.failed.log, the temporary folder is removed, exit status 2 (baselines that finished stay
cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

import train_gpt as tg
from data.files import sha256_file, write_atomic
from speedrun.experiments.arms import (OneLineParser, OutputFolder, Run, RunFailed, UsageError,
                      arm_statistics, difference, execute as execute_runs, finished_log, folder_date, has_result,
                      hardware, keep_failure, num, relative, replace_dir, run_result, thread_env)
# (arm_runs: running, statistics and the output folder, shared with speedrun.records.reproduce)
from speedrun.analysis.curves import at, common_points, curve_of_log, fit_y_to_bulk
from speedrun.analysis.run_log import TrainLog, parse_log

DEFAULT_EXPERIMENTS_DIR = ROOT / "experiments"
CACHE_DIR_NAME = ".baseline_cache"
DEFAULT_RUNNER = "bash run.sh"
FIRST_SEED = 1337
ARMS = ("baseline", "variant")
HP_NAMES = tuple(f.name.upper() for f in dataclasses.fields(tg.Hyperparameters))
SET_BY_TOOL = ("SEED", "RUN_ID", "LOG_DIR", "CHECKPOINT_DIR")
OUTPUT_LOCATIONS = ("RUN_ID", "LOG_DIR", "CHECKPOINT_DIR")  # where a run writes: not part of its configuration
SAMPLE_DIR = "data/datasets/peps_sp1024_spread"  # run.sh's DATA_PATH when none is set (CPU, or GPU without FineWeb)
FINEWEB_DIR = "data/datasets/fineweb10B_sp1024"  # run.sh's DATA_PATH on a GPU machine that has the FineWeb shards
PLOTS = {"loss": "train_loss.png", "difference": "train_loss_difference.png"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


class ExperimentError(Exception):
    """The runs finished but do not make one experiment: reported as one line, exit status 2, nothing written."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and overrides


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="speedrun experiment", description=__doc__.strip(),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the idea's name: experiments/<date>_<name>/")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=3, help=f"number of seeds: {FIRST_SEED}, {FIRST_SEED + 1}, ... "
                                                            "(default 3)")
    seeds.add_argument("--seed-list", help="comma-separated seeds, instead of --seeds")
    p.add_argument("--base", action="extend", nargs="+", default=[], metavar="VAR=val",
                   help="overrides for both arms (e.g. ITERATIONS=140 MAX_WALLCLOCK_SECONDS=0, DATA_PATH=...); "
                        "end the list with -- before the idea's overrides")
    p.add_argument("overrides", nargs="*", metavar="VAR=val", help="the idea: overrides for the variant only")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1); speeds are then not solo figures")
    p.add_argument("--force", action="store_true", help="replace an existing experiments/<date>_<name>/")
    p.add_argument("--no-cache", action="store_true", help="run every baseline (and refresh its cache entry)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints in checkpoints/ "
                                                                   "(default: deleted)")
    p.add_argument("--date", help="the folder's date, YYYY-MM-DD (default: today)")
    p.add_argument("--experiments-dir", default=str(DEFAULT_EXPERIMENTS_DIR),
                   help="where experiment folders and the baseline cache live (default: experiments/)")
    p.add_argument("--runner", default=DEFAULT_RUNNER,
                   help=f"the command that trains one run, from the repository root (default: {DEFAULT_RUNNER})")
    return p


def parse_assignments(tokens: list[str], what: str) -> dict[str, str]:
    """{VAR: value} for `VAR=value` tokens, every VAR a train_gpt.py hyperparameter the tool does not set itself."""
    out: dict[str, str] = {}
    for token in tokens:
        m = ASSIGNMENT.fullmatch(token)
        if not m:
            raise UsageError(f"{what} {token!r}: expected VAR=value")
        name, value = m.groups()
        if name in SET_BY_TOOL:
            hint = "; use --seeds or --seed-list" if name == "SEED" else ""
            raise UsageError(f"{what} {token!r}: {name} is set by the tool for every run{hint}")
        if name not in HP_NAMES:
            close = difflib.get_close_matches(name.upper(), HP_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{what} {token!r}: unknown variable {name}: not a hyperparameter of train_gpt.py "
                             f"(a field of Hyperparameters){hint}")
        if name in out:
            raise UsageError(f"{what} {token!r}: {name} is given twice")
        out[name] = value
    return out


def parse_seeds(args) -> list[int]:
    if args.seed_list is None:
        if args.seeds < 1:
            raise UsageError(f"--seeds {args.seeds}: must be at least 1")
        return [FIRST_SEED + i for i in range(args.seeds)]
    try:
        seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seed-list {args.seed_list!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seed-list {args.seed_list!r}: expected distinct seeds")
    return seeds


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints: code, dataset, hardware, and the baseline cache key


def code_files() -> list[Path]:
    """The code a run depends on: the record's payload (its experiment files included, whichever arm switches them on),
    and run.sh."""
    return [ROOT / name for name in (*tg.PAYLOAD, *tg.EXPERIMENT_PAYLOAD)] + [ROOT / "run.sh"]


def code_hashes(files: list[Path]) -> dict[str, str]:
    """{path relative to the repository: sha256 of its bytes}, in the files' order."""
    return {relative(p): sha256_file(p) for p in files}


def code_sha256(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in hashes.items()).encode()).hexdigest()


def data_path(env: dict[str, str]) -> str:
    """The DATA_PATH a run gets: as set, else run.sh's default."""
    if env.get("DATA_PATH"):
        return env["DATA_PATH"]
    if hardware() != "cpu" and list((ROOT / FINEWEB_DIR).glob("fineweb_val_*.bin")):
        return FINEWEB_DIR
    return SAMPLE_DIR


def dataset_fingerprint(path: str) -> dict:
    """sha256 of the dataset's manifest.json, or of its shard names and sizes when it has none."""
    folder = ROOT / path
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return {"path": path, "source": "manifest.json", "sha256": sha256_file(manifest)}
    shards = sorted(folder.glob("*.bin")) if folder.is_dir() else []
    listing = "".join(f"{p.name} {p.stat().st_size}\n" for p in shards)
    return {"path": path, "source": f"names and sizes of {len(shards)} shards",
            "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def run_config(env: dict[str, str]) -> list[str]:
    """The hyperparameter variables a run receives, sorted, without its seed and output locations."""
    return sorted(f"{k}={v}" for k, v in tg.Hyperparameters.env_overrides(env).items()
                  if k not in OUTPUT_LOCATIONS and k != "SEED")


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------------
# The plan: every run's environment, checked before the first one starts


@dataclass
class Experiment(OutputFolder):
    name: str
    date: str
    seeds: list[int]
    base: dict[str, str]
    overrides: dict[str, str]
    inherited: dict[str, str]  # hyperparameter variables already set in this environment (both arms get them)
    runner: str
    jobs: int
    use_cache: bool
    keep_checkpoints: bool
    experiments_dir: Path
    code: dict[str, str]  # {file: sha256} when the experiment started
    data_path: str
    runs: list[Run] = field(default_factory=list)

    @property
    def stem(self) -> str:  # experiments/<date>_<name>/
        return f"{self.date}_{self.name}"

    @property
    def cache_dir(self) -> Path:
        return self.experiments_dir / CACHE_DIR_NAME

    @property
    def code_sha256(self) -> str:
        return code_sha256(self.code)


def arm_env(exp: Experiment, arm: str, seed: int) -> dict[str, str]:
    env = {**os.environ, **exp.base, **thread_env(exp.jobs), "SEED": str(seed), "RUN_ID": f"{arm}_seed{seed}",
           "LOG_DIR": str(exp.work / "logs"), "CHECKPOINT_DIR": str(exp.work / "checkpoints")}
    if arm == "variant":
        env.update(exp.overrides)
    return env


def plan(argv) -> Experiment:
    """Parse and check everything; raises UsageError before anything is written."""
    args = build_parser().parse_args([str(a) for a in argv])
    if not NAME_PATTERN.fullmatch(args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits, '_', '.' and '-' (a folder name)")
    date = folder_date(args.date)
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if not shlex.split(args.runner):
        raise UsageError("--runner: empty command")
    seeds = parse_seeds(args)
    base = parse_assignments(args.base, "--base")
    overrides = parse_assignments(args.overrides, "override")
    if not overrides:
        raise UsageError("no idea to compare: give the variant's overrides after --, e.g. -- MATRIX_LR=0.08")
    inherited = {k: v for k, v in tg.Hyperparameters.env_overrides(os.environ).items()
                 if k not in base and k not in SET_BY_TOOL}
    exp = Experiment(name=args.name, date=date, seeds=seeds, base=base, overrides=overrides, inherited=inherited,
                     runner=args.runner, jobs=args.jobs, use_cache=not args.no_cache,
                     keep_checkpoints=args.keep_checkpoints, experiments_dir=Path(args.experiments_dir).resolve(),
                     code=code_hashes(code_files()), data_path="")
    for arm in ARMS:  # the trainer's own check of each arm's configuration, before any run
        try:
            tg.Hyperparameters.from_env(arm_env(exp, arm, seeds[0]))
        except tg.ConfigError as e:
            raise UsageError(f"the {arm}'s configuration: {e}") from None
    if exp.folder.exists() and not args.force:
        raise UsageError(f"{relative(exp.folder)} exists; choose another --name or give --force to replace it")
    exp.data_path = data_path(arm_env(exp, "baseline", seeds[0]))
    for seed in seeds:
        for arm in ARMS:
            env = arm_env(exp, arm, seed)
            run = exp.run(arm, seed, env, shlex.split(exp.runner), ROOT)
            if arm == "baseline":
                run.cache_fields = {"code": exp.code_sha256, "config": run_config(env), "seed": seed,
                                    "runner": exp.runner, "hardware": hardware()}
            exp.runs.append(run)
    return exp


# ----------------------------------------------------------------------------------------------------------------------
# The baseline cache


def cache_entry(exp: Experiment, run: Run) -> tuple[Path, dict]:
    """The entry folder and the key's fields, with the dataset fingerprinted now (the first run may prepare it)."""
    fields = {**run.cache_fields, "dataset": dataset_fingerprint(exp.data_path)["sha256"]}
    return exp.cache_dir / cache_key(fields), fields


def cache_lookup(exp: Experiment, run: Run) -> bool:
    """Copy a cached baseline's log into place; False when there is none (or it is unreadable)."""
    entry, _ = cache_entry(exp, run)
    if not (entry / "train.log").is_file():
        return False
    run.log.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry / "train.log", run.log)
    log = parse_log(run.log)
    if not has_result(log):
        run.log.unlink()
        return False
    run.cached, run.train_log = True, log
    return True


def cache_store(exp: Experiment, run: Run) -> None:
    """Keep a finished baseline run: write the entry in a temporary folder, then rename it into place."""
    entry, fields = cache_entry(exp, run)
    tmp = exp.cache_dir / f".{entry.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(run.log, tmp / "train.log")
    stored = {**fields, "stored": datetime.datetime.now().isoformat(timespec="seconds"), "experiment": exp.name}
    (tmp / "key.json").write_text(json.dumps(stored, indent=1) + "\n")
    replace_dir(tmp, entry)


# ----------------------------------------------------------------------------------------------------------------------
# Running


def check_run(exp: Experiment, run: Run, status: int) -> None:
    """A finished run's log must have a result, its seed, the fingerprinted dataset and the experiment's code."""
    log = finished_log(run, status)
    read = log.hparams.get("data_path")
    if read is not None and (ROOT / read).resolve() != (ROOT / exp.data_path).resolve():
        raise RunFailed(run, f"it read DATA_PATH={read}, but the experiment fingerprinted {exp.data_path}; "
                             "give DATA_PATH with --base")
    for name, content in log.code.items():
        if name in exp.code and hashlib.sha256(content).hexdigest() != exp.code[name]:
            raise RunFailed(run, f"it ran a {name} that differs from the one the experiment started with (edited "
                                 "during the experiment?)")
    run.train_log = log


def progress(message: str) -> None:
    print(f"experiment: {message}", file=sys.stderr, flush=True)


def execute(exp: Experiment, runs: list[Run], use_cache: bool = True) -> None:
    """These runs, at most --jobs at once, in plan order (per seed: baseline, then variant). Cached baselines are
    copied; a fresh baseline that finishes is cached at once. The first failure stops the others and raises."""
    execute_runs(runs, exp.jobs, lambda run, status: check_run(exp, run, status), progress,
                 lookup=(lambda run: run.arm == "baseline" and cache_lookup(exp, run)) if use_cache else None,
                 store=lambda run: cache_store(exp, run) if run.arm == "baseline" else None)


def data_signature(log: TrainLog) -> tuple:
    """What a run says it trained on: the tokenizer's sha256 and the training split (shards, documents, tokens)."""
    return log.tokenizer_sha256, tuple(sorted(log.train_data.items()))


def stale_cached_runs(exp: Experiment) -> list[Run]:
    """Cached baselines that trained on other data than this experiment's fresh runs. run.sh prepares the bundled
    sample again when prepare_corpus.py's output changes, so the dataset fingerprinted for the cache lookup can be
    replaced by the first fresh run. The logs tell: every run's tokenizer and training split must agree (a variant
    that sets DATA_PATH or TOKENIZER_PATH is left out of the comparison)."""
    own_data = "DATA_PATH" in exp.overrides or "TOKENIZER_PATH" in exp.overrides
    fresh = {data_signature(r.train_log) for r in exp.runs if not r.cached and (r.arm == "baseline" or not own_data)}
    if len(fresh) > 1:
        raise ExperimentError("the runs trained on different data (tokenizer or training split changed during the "
                              "experiment?); run it again")
    return [r for r in exp.runs if r.cached and fresh and data_signature(r.train_log) not in fresh]


def run_all(exp: Experiment) -> None:
    execute(exp, exp.runs, use_cache=exp.use_cache)
    stale = stale_cached_runs(exp)
    if stale:
        progress(f"{len(stale)} cached baseline runs trained on other data than this experiment's runs (the dataset "
                 "was prepared again?): running them again")
        for run in stale:
            run.cached, run.train_log = False, None
        execute(exp, stale, use_cache=False)
        stale_cached_runs(exp)  # raises if the runs still disagree


def report_failure(exp: Experiment, failure: RunFailed) -> None:
    run = failure.run
    settings = {k: v for k, v in run.env.items() if k in exp.base or k in exp.overrides or k in SET_BY_TOOL}
    keep_failure(failure, exp.failed_log, f"experiment {exp.name}: the {run.arm} run, seed {run.seed}, failed: "
                 f"{failure.reason}", f"{' '.join(f'{k}={shlex.quote(v)}' for k, v in settings.items())} {exp.runner}",
                 "experiment folder")


# ----------------------------------------------------------------------------------------------------------------------
# Results and statistics


def summarize(exp: Experiment) -> dict:
    rows = [run_result(run) for run in exp.runs]
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}
    return {
        "name": exp.name, "date": exp.date, "overrides": exp.overrides, "base_overrides": exp.base,
        "environment_overrides": exp.inherited, "seeds": exp.seeds, "runner": exp.runner, "jobs": exp.jobs,
        "speeds_are_solo": exp.jobs == 1, "command": reproduce_command(exp),
        "code_sha256": exp.code_sha256, "code_files": exp.code, "dataset": dataset_fingerprint(exp.data_path),
        "hardware": hardware(), "runs": rows, "arms": {arm: arm_statistics(by_arm[arm]) for arm in ARMS},
        "difference": difference(by_arm["baseline"], by_arm["variant"]), "plots": list(PLOTS.values()),
        "statistic": "one-sided Welch t-test of val_loss, H1: variant mean < baseline mean "
                     "(speedrun.records.check welch_test, margin 0)",
    }


def reproduce_command(exp: Experiment) -> str:
    parts = ["speedrun", "experiment", "--name", exp.name, "--seed-list", ",".join(map(str, exp.seeds))]
    if exp.base:
        parts += ["--base", *(f"{k}={v}" for k, v in exp.base.items())]
    if exp.jobs != 1:
        parts += ["--jobs", str(exp.jobs)]
    if exp.runner != DEFAULT_RUNNER:
        parts += ["--runner", exp.runner]
    if exp.experiments_dir != DEFAULT_EXPERIMENTS_DIR.resolve():
        parts += ["--experiments-dir", relative(exp.experiments_dir)]
    parts += ["--", *(f"{k}={v}" for k, v in exp.overrides.items())]
    prefix = [f"{k}={v}" for k, v in exp.inherited.items()]
    return " ".join(shlex.quote(p) for p in prefix + parts)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: table, plots, README.md, summary.json


def table(summary: dict) -> str:
    """The printed table (also in README.md)."""
    arms, diff = summary["arms"], summary["difference"]
    cached = sum(r["cached"] for r in summary["runs"])
    overrides = " ".join(f"{k}={v}" for k, v in summary["overrides"].items())
    seeds = ", ".join(map(str, summary["seeds"]))
    title = f"experiment {summary['name']}: {overrides} against the baseline, seeds {seeds}"
    title += f" ({cached} baseline runs cached)"
    header = f"{'arm':<9} {'n':>2}  {'val_bpb mean ± std':>24}  {'val_loss mean':>13}  {'steps/s':>9}"
    header += f"  {'tokens/s':>10}"
    lines = [title, header]
    for arm in ARMS:
        a = arms[arm]
        bpb = f"{a['val_bpb_mean']:.6f} ± {num(a['val_bpb_std'], '.6f')}"
        lines.append(f"{arm:<9} {a['n']:>2}  {bpb:>24}  {a['val_loss_mean']:>13.6f}  "
                     f"{num(a['steps_per_s_mean'], '.3f'):>9}  {num(a['tokens_per_s_mean'], '.0f'):>10}")
    p = diff["p_variant_lower"]
    lines.append(f"difference (variant - baseline): val_loss {diff['val_loss']:+.6f} nats, "
                 f"val_bpb {diff['val_bpb']:+.6f}")
    p_text = (f"{p:.4g} (t={num(diff['welch_t'], '.3f')}, dof={num(diff['welch_dof'], '.2f')})" if p is not None
              else "n/a (needs 2 seeds per arm)")
    lines.append(f"one-sided Welch p (variant val_loss lower): {p_text}")
    if not summary["speeds_are_solo"]:
        lines.append(f"(--jobs {summary['jobs']}: runs shared the machine; steps/s and tokens/s are not solo figures)")
    return "\n".join(lines)


def _on_grid(curves, grid) -> np.ndarray:
    """(seeds, points): each curve interpolated linearly at the grid's token counts."""
    return np.array([at(c, grid) for c in curves])


def plot(exp: Experiment, out_dir: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {arm: {run.seed: curve_of_log(run.train_log, f"{arm} seed {run.seed}") for run in exp.runs
                    if run.arm == arm} for arm in ARMS}
    last = max((c.tokens[-1] for arm in ARMS for c in curves[arm].values()), default=0)
    scale, unit = (1e6, "M") if last >= 1e6 else (1e3, "k")
    overrides = " ".join(f"{k}={v}" for k, v in exp.overrides.items())

    fig, ax = plt.subplots(figsize=(8, 4.8))
    plotted = []
    for i, arm in enumerate(ARMS):
        arm_curves = list(curves[arm].values())
        grid = common_points(arm_curves)
        if len(grid) == 0:
            continue
        values = _on_grid(arm_curves, grid)
        label = f"{arm} ({overrides})" if arm == "variant" else arm
        ax.plot(grid / scale, values.mean(0), color=f"C{i}", lw=1.3, label=f"{label}, mean of {len(arm_curves)}")
        ax.fill_between(grid / scale, values.min(0), values.max(0), color=f"C{i}", alpha=0.2, lw=0)
        plotted.append(values)
    fit_y_to_bulk(ax, np.concatenate([v.ravel() for v in plotted]) if plotted else np.array([]))
    ax.set_xlabel(f"training tokens ({unit})")
    ax.set_ylabel("train loss (nats per token)")
    ax.set_title(f"{exp.name}: train loss, mean over seeds (band: min-max)")
    _save(fig, ax, out_dir / PLOTS["loss"])

    fig, ax = plt.subplots(figsize=(8, 4.8))
    seeds = [s for s in exp.seeds if s in curves["baseline"] and s in curves["variant"]]
    grid = common_points([curves[arm][s] for arm in ARMS for s in seeds])
    if len(grid):
        base = _on_grid([curves["baseline"][s] for s in seeds], grid)
        variant = _on_grid([curves["variant"][s] for s in seeds], grid)
        paired = variant - base  # the same seed in both arms
        ax.plot(grid / scale, variant.mean(0) - base.mean(0), color="C2", lw=1.3, label="variant - baseline, mean")
        ax.fill_between(grid / scale, paired.min(0), paired.max(0), color="C2", alpha=0.2, lw=0,
                        label="min-max of the per-seed differences")
    else:
        ax.text(0.5, 0.5, "the runs' logged steps cover no common token range", ha="center", transform=ax.transAxes)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel(f"training tokens ({unit})")
    ax.set_ylabel("train loss difference (nats)")
    ax.set_title(f"{exp.name}: variant - baseline (final val_loss {summary['difference']['val_loss']:+.4f})")
    _save(fig, ax, out_dir / PLOTS["difference"])


def _save(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def readme(summary: dict) -> str:
    arms, diff = summary["arms"], summary["difference"]
    p = diff["p_variant_lower"]
    overrides = " ".join(f"`{k}={v}`" for k, v in summary["overrides"].items())
    base = " ".join(f"`{k}={v}`" for k, v in {**summary["environment_overrides"], **summary["base_overrides"]}.items())
    seeds = ", ".join(map(str, summary["seeds"]))
    settings = (f"Variant: {overrides}, against the baseline. Both arms: {base or 'run.sh defaults'}; seeds {seeds}; "
                f"hardware: {summary['hardware']}.")
    lines = [f"# Experiment: {summary['name']} ({summary['date']})", "", settings, "",
             "| arm | n | val_bpb mean ± std | val_loss mean ± std | steps/s | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        a = arms[arm]
        lines.append(f"| {arm} | {a['n']} | {a['val_bpb_mean']:.6f} ± {num(a['val_bpb_std'], '.6f')} | "
                     f"{a['val_loss_mean']:.6f} ± {num(a['val_loss_std'], '.6f')} | "
                     f"{num(a['steps_per_s_mean'], '.3f')} | {num(a['tokens_per_s_mean'], ',.0f')} |")
    p_text = f"**{p:.4g}**." if p is not None else "n/a (needs 2 seeds per arm)."
    lines += ["", (f"Difference (variant − baseline): **{diff['val_loss']:+.6f} nats** of val_loss, "
                   f"**{diff['val_bpb']:+.6f} BPB**. One-sided Welch p that the variant's val_loss is lower: {p_text}"),
              ""]
    if not summary["speeds_are_solo"]:
        lines += [(f"Runs went {summary['jobs']} at a time (`--jobs {summary['jobs']}`), sharing the machine: the "
                   "speed columns are not solo figures."), ""]
    lines += [f"![train loss against training tokens]({PLOTS['loss']})", "",
              f"![variant minus baseline]({PLOTS['difference']})", "",
              "## Runs", "",
              ("| arm | seed | val_loss | val_bpb | steps | train tokens | train time | tokens/s | steps/s | cached "
              "| log |"),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in summary["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['val_loss']:.6f} | {r['val_bpb']:.6f} | {r['steps']} | "
                     f"{r['train_tokens']:,} | {r['train_time_ms'] / 1000:.1f} s | {num(r['tokens_per_s'], ',.0f')} | "
                     f"{num(r['steps_per_s'], '.3f')} | {'yes' if r['cached'] else 'no'} | [{r['log']}]({r['log']}) |")
    dataset = summary["dataset"]
    lines += ["", ("Cached baseline runs were trained by an earlier experiment with the same code, configuration, "
                   "dataset, seed, runner and hardware; their speed is from that time. The logs are not committed "
                   "(gitignored); summary.json has every number above."), "",
              "## Reproduce", "", "```bash", summary["command"], "```", "",
              f"- code sha256 (train_gpt.record_source_files() and run.sh): `{summary['code_sha256']}`",
              f"- dataset `{dataset['path']}`: sha256 of its {dataset['source']} `{dataset['sha256']}`",
              f"- statistic: {summary['statistic']}", ""]
    return "\n".join(lines)


def write_outputs(exp: Experiment, summary: dict) -> None:
    """Everything into the temporary folder; the caller renames it into place."""
    write_atomic(exp.work / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(exp.work / "README.md", readme(summary).encode())
    plot(exp, exp.work, summary)


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    try:
        exp = plan(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        (exp.work / "logs").mkdir(parents=True)
        try:
            run_all(exp)
        except RunFailed as failure:
            report_failure(exp, failure)
            return 2
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        summary = summarize(exp)
        write_outputs(exp, summary)
        exp.publish(("console",) + (() if exp.keep_checkpoints else ("checkpoints",)))
    finally:
        shutil.rmtree(exp.work, ignore_errors=True)  # (gone already when published)
    print(table(summary))
    print(f"wrote {relative(exp.folder)}/ (summary.json, README.md, {', '.join(PLOTS.values())}, logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

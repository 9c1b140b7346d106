"""Build a record folder records/<track>/<YYYY-MM-DD>_<Name>/ from training logs: README.md, submission.json, the
exact code the runs used (copied out of the logs, which embed it byte for byte), one log per seed (train_seed<N>.log)
and, optionally, eval_ttt.py's results (eval_results.json). The folder is checked as `speedrun verify` checks it,
and nothing is written when a check fails (a submission that does not beat the previous record significantly can go
in with --no-record).

  speedrun new --name NAME --track TRACK LOG [LOG ...] [--eval RESULTS.json] [--author A] [--blurb TEXT]
               [--date YYYY-MM-DD] [--records-dir DIR] [--against FOLDER] [--no-record] [--margin M] [--alpha A]
"""

from __future__ import annotations
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from speedrun.records.options import add_statistics_options, check_statistics_options
from speedrun.records.check import EVAL_FILE, EVAL_PARAMETERS_SHOWN, PER_RUN_HPARAMS, REPO, TRACKS, RecordError, derived_submission, eval_problems, log_dataset, eval_vs_logs_problems, get_track, log_file_name, log_set_problems, read_json, significance, verify_record, warn
from speedrun.analysis.run_log import TrainLog, parse_log


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._-")
    if not s:
        raise RecordError(f"name {name!r}: needs at least one letter or digit")
    return s


def reproduce_command(lg: TrainLog) -> str:
    """The command that ran `lg`: exactly the variables its `env_overrides:` line names (less the per-run ones, which
    the command spells out), or, for a log written before that line existed, every hyperparameter it printed."""
    per_run = {name.upper() for name in PER_RUN_HPARAMS}
    env = [f"{key}={shlex.quote(value)}" for key, value in lg.run_env().items() if key not in per_run]
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
        f"speedrun verify {folder_rel}",
        "```",
        "",
    ]
    return "\n".join(lines)


def cmd_new(args) -> int:
    try:
        track = get_track(args.track)
        if not track.known:
            warn(f"unknown track {track.name}: budget {track.budget_seconds:g}s and {track.describe()} read from its "
                 f"name; add it to TRACKS in speedrun.records to make it official")
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
            **({"compared_with": args.against} if args.against else {}),
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
            desc, problem = significance(sub, folder, args.margin, args.alpha, log_dataset(logs[0]))
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
              f"speedrun verify {folder} && speedrun leaderboard")
        return 0
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speedrun new", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", metavar="LOG", help="training logs (logs/<RUN_ID>.txt), one per seed")
    p.add_argument("--name", required=True)
    p.add_argument("--track", required=True, help=f"one of {', '.join(TRACKS)} (or <N>x<gpu>_<M>min, cpu_<M>min)")
    p.add_argument("--eval", help="eval_ttt.py results JSON")
    p.add_argument("--author", default="")
    p.add_argument("--blurb", default="")
    p.add_argument("--date", help="YYYY-MM-DD (default today)")
    p.add_argument("--records-dir", help="default: records/ of this repository")
    p.add_argument("--against", metavar="FOLDER",
                   help="the record of this track (folder name, e.g. 2026-11-23_Baseline) to test against; it must "
                        "be on the same data and not dated later (default: the best earlier record on the same data)")
    p.add_argument("--no-record", action="store_true", help='a submission that does not claim a record ("record": '
                                                            "false): the t-test is reported, not required")
    add_statistics_options(p)
    args = p.parse_args(argv)
    check_statistics_options(p, args)
    return cmd_new(args)


if __name__ == "__main__":
    sys.exit(main())

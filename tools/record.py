#!/usr/bin/env python3
"""
record.py: package, verify and rank speedrun records. Standard library only (no torch needed to check a record),
but for the dataset fingerprint, which uses tools/audit.py when the record's dataset is on the machine.

A record is a folder records/<track>/<YYYY-MM-DD>_<Name>/ holding README.md, submission.json, the exact code that
produced it (train_gpt.py, kernels/*.py, eval_ttt.py: copied out of the training logs, which embed it byte for byte),
one training log per seed (train_seed<N>.log) and, optionally, the evaluation results of eval_ttt.py
(eval_results.json). The record runs from inside its folder.

  python tools/record.py new --name NAME --track TRACK LOG [LOG ...] [--eval RESULTS.json] [--author A] [--blurb TEXT]
                             [--date YYYY-MM-DD] [--records-dir DIR] [--against FOLDER] [--no-record] [--margin M]
                             [--alpha A]
  python tools/record.py verify PATH [PATH ...] [--margin M] [--alpha A]
  python tools/record.py leaderboard [--check] [--readme README.md] [--records-dir DIR]
  python tools/record.py reproduce FOLDER [--seeds N] [--against FOLDER] [--jobs 1] ...   (tools/reproduce.py)

The checks `verify` makes are listed in tools/record_check.py; tools/run_log.py reads the logs.
Exit status 0 only when every check of every record holds; otherwise one line per failed check, naming the file.
`new` builds the folder, runs the same checks on it and writes nothing when one fails (a submission that does not
beat the previous record significantly can go in with --no-record). `leaderboard` ranks every submission.json of a
track by mean val_bpb, one table per dataset (a val_bpb ranks only against others on the same data).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import peer_records
from record_check import (DEFAULT_ALPHA, DEFAULT_MARGIN, EVAL_FILE, EVAL_PARAMETERS_SHOWN, PER_RUN_HPARAMS, REPO,
                          STATUSES, TRACKS, Check, RecordError, RecordReport, derived_submission, eval_problems,
                          log_dataset, record_dataset, eval_vs_logs_problems, find_records, get_track, log_file_name,
                          log_set_problems, our_record_checks, read_json, significance, verify_record, warn)
from run_log import TrainLog, parse_log

START_MARKER = "<!-- leaderboard:start -->"
END_MARKER = "<!-- leaderboard:end -->"


# ----------------------------------------------------------------------------------------------------------------------
# `new`


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
              f"python tools/record.py verify {folder} && python tools/record.py leaderboard")
        return 0
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------------------------------
# `verify`


def records_at(path: Path, rules: str) -> list[tuple[Path, str]]:
    """(folder, rules) for every record at or under path. Our own rules find folders with submission.json (and a
    folder with train_seed<N>.log but no submission.json, which then fails); `auto` tells the three kinds apart by
    their files (tools/peer_records.py)."""
    if rules != "ours":
        return peer_records.find_records(path, rules)
    found = find_records(path)
    if not found and any(path.glob("train_seed*.log")):
        found = [path]
    return [(folder, "ours") for folder in found]


def verify_one(folder: Path, rules: str, margin: float, alpha: float) -> tuple[RecordReport, list[str]]:
    """The record's named checks, and (ours) the failure lines verify prints; whatever cannot be read is a FAULT."""
    try:
        if rules == "ours":
            if not (folder / "submission.json").is_file():
                line = f"{folder}: not a record (a folder with submission.json and train_seed<N>.log)"
                return RecordReport(folder, rules, [Check("record", "FAULT", line)]), [line]
            return our_record_checks(folder, margin, alpha)
        return peer_records.verify_folder(folder, rules, margin, alpha), []
    except Exception as e:  # a record that cannot be read is a FAULT row, never a traceback
        line = f"{folder}: cannot be checked ({type(e).__name__}: {e})"
        return RecordReport(folder, rules, [Check("files", "FAULT", line)]), [line]


def cmd_verify(args) -> int:
    peer_records.forget()
    reports: list[RecordReport] = []
    usage = False
    for p in args.paths:
        path = Path(p)
        if not path.exists():
            print(f"{path}: no such file or directory")
            usage = True
            continue
        found = records_at(path, args.rules) if path.is_dir() else []
        if not found:
            print(f"no records under {path}")
            usage = True
        for folder, rules in found:
            report, failures = verify_one(folder, rules, args.margin, args.alpha)
            reports.append(report)
            if rules == "ours":
                print("\n".join(failures) if failures else f"ok {folder}: {report.summary}")
            else:
                print(f"{'FAULT' if report.faults else 'ok'} {folder} ({rules})")
                print("\n".join(c.line() for c in report.checks))
    peers = [r for r in reports if r.rules != "ours"]
    if peers:
        counts = collections.Counter((c.check, c.status) for r in peers for c in r.checks)
        names = list(dict.fromkeys(c.check for r in peers for c in r.checks))
        print(f"{len(peers)} records of other leaderboards, {sum(1 for r in peers if r.faults)} with a FAULT; per "
              "check: " + "; ".join(f"{n} " + " ".join(f"{counts[n, s]} {s}" for s in STATUSES if counts[n, s])
                                    for n in names))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({"records": [r.as_json() for r in reports]}, indent=1) + "\n",
                                       encoding="utf-8")
        except OSError as e:
            print(f"{args.json}: cannot write ({e.strerror or e})")
            return 2
    if usage:
        return 2
    return 1 if any(r.faults for r in reports) else 0


# ----------------------------------------------------------------------------------------------------------------------
# `leaderboard`


def leaderboard_markdown(records_dir: Path, readme_dir: Path) -> str:
    by_track: dict[str, list[tuple[Path, dict]]] = {}
    for folder in find_records(records_dir) if records_dir.is_dir() else []:
        try:
            sub = read_json(folder / "submission.json")
            float(sub["val_bpb"]["mean"])  # what the table ranks by: a submission.json of another kind has none
            by_track.setdefault(str(sub["track"]), []).append((folder, sub))
        except (OSError, ValueError, KeyError, TypeError):
            warn(f"{folder / 'submission.json'}: unreadable or not one of ours (no track, val_bpb.mean), left out of "
                 "the leaderboard")
    if not by_track:
        return "No records yet."
    order = [t for t in TRACKS if t in by_track] + sorted(t for t in by_track if t not in TRACKS)
    parts = []
    for track_name in order:
        try:
            heading = f"### `{track_name}` ({get_track(track_name).describe()})"
        except RecordError:
            heading = f"### `{track_name}`"
        parts.append(heading)
        # one table per dataset, the most recent data first
        by_data: dict[tuple, list] = {}
        for folder, sub in by_track[track_name]:
            data = record_dataset(folder)
            by_data.setdefault(data.key if data else (), []).append((folder, sub, data))
        groups = sorted(by_data.values(), key=lambda g: max(str(e[1].get("date")) for e in g), reverse=True)
        for group in groups:
            data = group[0][2]
            parts.append(f"Scored on {data.describe() if data else 'unknown data (no readable log)'}:")
            rows = []
            entries = sorted(group, key=lambda e: (e[1]["val_bpb"]["mean"], str(e[1].get("date")), e[0].name))
            for rank, (folder, sub, _) in enumerate(entries, 1):
                rows.append(leaderboard_row(rank, folder, sub, readme_dir))
            parts.append("\n".join(["| rank | val_bpb (mean ± std) | seeds | date | name | author | eval | folder |",
                                    "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]))
    return "\n\n".join(parts)


def leaderboard_row(rank: int, folder: Path, sub: dict, readme_dir: Path) -> str:
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
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def peer_leaderboard_markdown(records_dir: Path, rules: str, margin: float, alpha: float) -> str:
    """The tables of another leaderboard's tree, one per track: parameter-golf's ranked by claimed val_bpb (the logs'
    mean where nothing is claimed), modded-nanogpt's by mean train time; a row some check faults names the checks."""
    parts = []
    for track, rows in peer_records.leaderboard_rows(records_dir, rules, margin, alpha).items():
        golf = rows[0]["rules"] == "parameter-golf"
        rows.sort(key=lambda r: (r["score"] if r["score"] is not None else
                                 r["logs"][0] if r["logs"] else math.inf, r["date"], r["name"]))
        lines = [f"### {track} ({rows[0]['rules']})", "",
                 "| rank | " + ("val_bpb claimed | logs: mean ± std (runs)" if golf else
                              "train time (s) | val_loss: mean ± std (runs)") + " | date | name | flagged by |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for rank, r in enumerate(rows, 1):
            logs = "–" if not r["logs"] else f"{r['logs'][0]:.5f} ± " + (
                f"{r['logs'][1]:.5f}" if r["logs"][1] is not None else "–") + f" ({r['runs']})"
            score = "–" if r["score"] is None else f"{r['score']:.5f}" if golf else f"{r['score']:.2f}"
            cells = [str(rank), score, logs, r["date"], r["name"], ", ".join(r["flags"]) or "–"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "No records."


def cmd_leaderboard(args) -> int:
    readme = Path(args.readme) if args.readme else REPO / "README.md"
    records_dir = Path(args.records_dir) if args.records_dir else REPO / "records"
    rules = args.rules
    peer_records.forget()
    if rules == "auto":
        kinds = {r for _, r in peer_records.find_records(records_dir)} if records_dir.is_dir() else set()
        rules = "ours" if kinds <= {"ours"} else "other"
    if rules != "ours":  # another leaderboard's tree: its tables on stdout (our README is for our records)
        if not records_dir.is_dir():
            print(f"{records_dir}: not a directory")
            return 2
        print(peer_leaderboard_markdown(records_dir, "auto" if rules == "other" else rules, args.margin, args.alpha))
        return 0
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

    def rules_option(p):
        p.add_argument("--rules", choices=("auto", "ours") + peer_records.RULES, default="auto",
                       help="whose rules: ours, parameter-golf's or modded-nanogpt's (auto: by each folder's files)")

    p = sub.add_parser("new", help="build a record folder from training logs")
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
    stats_options(p)
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("verify", help="check records: code, numbers, logs, track, statistics")
    p.add_argument("paths", nargs="+", metavar="PATH", help="record folders (or folders holding records)")
    rules_option(p)
    p.add_argument("--json", metavar="FILE", help='also write {"records": [{"path", "rules", "checks": [{"check", '
                                                  '"status", "detail"}]}]} to FILE')
    stats_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("leaderboard", help="write the per-track tables into README.md between the markers")
    p.add_argument("--check", action="store_true", help="exit non-zero when the README's tables are out of date")
    p.add_argument("--readme", help="default: README.md of this repository")
    p.add_argument("--records-dir", help="default: records/ of this repository")
    rules_option(p)
    stats_options(p)
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("reproduce", add_help=False,
                       help="train a record and the record it beat again on this machine, seed by seed, and say "
                            "whether the improvement holds here (tools/reproduce.py; reproduce --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reproduce"]:  # its own parser: bad input is one line, exit status 2
        import reproduce

        return reproduce.main(argv[1:])

    args = parser.parse_args(argv)
    if hasattr(args, "alpha") and not 0 < args.alpha < 1:
        parser.error("--alpha must be in (0, 1)")
    if hasattr(args, "margin") and not (math.isfinite(args.margin) and args.margin >= 0):
        parser.error("--margin must be >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

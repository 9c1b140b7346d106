"""Check records: the code, the numbers, the logs, the track and the statistics (speedrun.records.check lists the
checks), by our rules or by parameter-golf's or modded-nanogpt's (speedrun.records.peers), chosen per folder.

  speedrun verify PATH [PATH ...] [--rules auto|ours|...] [--json FILE] [--margin M] [--alpha A]

Exit status 0 only when every check of every record holds; otherwise one line per failed check, naming the file.
"""

from __future__ import annotations
import argparse
import collections
import json
import sys
from pathlib import Path

from speedrun.records.options import add_rules_option, add_statistics_options, check_statistics_options
from speedrun.records import peers as peer_records
from speedrun.records.check import STATUSES, Check, RecordReport, find_records, our_record_checks


def records_at(path: Path, rules: str) -> list[tuple[Path, str]]:
    """(folder, rules) for every record at or under path. Our own rules find folders with submission.json (and a
    folder with train_seed<N>.log but no submission.json, which then fails); `auto` tells the three kinds apart by
    their files (speedrun.records.peers)."""
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speedrun verify", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="record folders (or folders holding records)")
    add_rules_option(p)
    p.add_argument("--json", metavar="FILE", help='also write {"records": [{"path", "rules", "checks": [{"check", '
                                                  '"status", "detail"}]}]} to FILE')
    add_statistics_options(p)
    args = p.parse_args(argv)
    check_statistics_options(p, args)
    return cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())

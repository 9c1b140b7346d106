"""The leaderboard: every submission.json of a track ranked by mean val_bpb, one table per dataset (a val_bpb ranks
only against others on the same data), written into README.md between the leaderboard markers; another
leaderboard's tree gets its tables on stdout.

  speedrun leaderboard [--check] [--readme README.md] [--records-dir DIR]
"""

from __future__ import annotations
import argparse
import math
import os
import sys
from pathlib import Path

from speedrun.records.options import add_rules_option, add_statistics_options, check_statistics_options
from speedrun.records import peers as peer_records
from speedrun.records.check import REPO, TRACKS, RecordError, record_dataset, find_records, get_track, read_json, warn

START_MARKER = "<!-- leaderboard:start -->"
END_MARKER = "<!-- leaderboard:end -->"


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
            print(f"{readme}: leaderboard is out of date; run speedrun leaderboard")
            return 1
        return 0
    if new_text != text:
        readme.write_text(new_text, encoding="utf-8")
        print(f"updated the leaderboard in {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speedrun leaderboard", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit non-zero when the README's tables are out of date")
    p.add_argument("--readme", help="default: README.md of this repository")
    p.add_argument("--records-dir", help="default: records/ of this repository")
    add_rules_option(p)
    add_statistics_options(p)
    args = p.parse_args(argv)
    check_statistics_options(p, args)
    return cmd_leaderboard(args)


if __name__ == "__main__":
    sys.exit(main())

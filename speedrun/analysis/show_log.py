"""Print what a training log says (ours, parameter-golf's or modded-nanogpt's): seed, steps, times, sizes, final lines.

  speedrun log LOG [LOG ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from speedrun.analysis.run_log import describe_run, read_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun log", description="Print what a training log says (ours, "
                                     "parameter-golf's or modded-nanogpt's): seed, steps, times, sizes, final lines.")
    parser.add_argument("logs", nargs="+", metavar="LOG")
    parser.add_argument("--json", action="store_true", help="one JSON object per log instead of text")
    args = parser.parse_args(argv)
    status = 0
    for name in args.logs:
        try:
            run = read_run(name)
        except OSError as e:
            print(f"{name}: cannot read ({e.strerror or e})", file=sys.stderr)
            status = 2
            continue
        if args.json:
            row = {k: v for k, v in run.__dict__.items() if k not in ("finals", "other_values")}
            row.update(path=str(run.path), finals=[f.__dict__ for f in run.finals],
                       scored=run.scored.__dict__ if run.scored else None, eval_time_ms=run.eval_time_ms)
            print(json.dumps(row))
        else:
            print("\n".join(describe_run(run)))
    return status


if __name__ == "__main__":
    sys.exit(main())

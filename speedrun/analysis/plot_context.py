#!/usr/bin/env python3
"""
Bits per byte against the context each scored token attends to, one point per eval_ttt.py results
file (its `bpb` and `context_slots_per_token`: raw tokens of its window for strided, raw tokens of its segment plus the
gist slots of earlier segments for gist mode).

  speedrun plot-context RESULTS.json [RESULTS.json ...] --labels A,B,... --out bpb_vs_context.png [--title T]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def points(paths: list[str]) -> list[tuple[float, float]]:
    """(context slots per scored token, BPB) of each results file."""
    out = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        if results.get("context_slots_per_token") is None:
            raise SystemExit(f"error: {path}: no context_slots_per_token (written by an older eval_ttt.py?)")
        out.append((float(results["context_slots_per_token"]), float(results["bpb"])))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun plot-context", description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--labels", required=True, help="comma-separated, one per results file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="BPB against context per scored token")
    args = parser.parse_args(argv)
    labels = args.labels.split(",")
    if len(labels) != len(args.results):
        raise SystemExit(f"error: --labels has {len(labels)} names for {len(args.results)} results files")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (context, bpb), label in zip(points(args.results), labels):
        ax.scatter([context], [bpb], s=40)
        ax.annotate(f"{label}\n{bpb:.4f}", (context, bpb), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("key/value slots attended per scored token (mean)")
    ax.set_ylabel("validation BPB")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

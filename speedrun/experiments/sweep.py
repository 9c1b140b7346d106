"""
Eval_ttt.py's evaluation over a grid of settings, with one loaded model and validation set for all of
them; writes sweep.csv (one row per configuration), sweep.json (the list of every configuration's results, as
eval_ttt.py --out writes one) and two plots: BPB against evaluation time, and BPB against the TTT chunk size.

Usage:
  speedrun sweep --checkpoint checkpoints/run.pt --mode ttt --sweep chunk=32,64,128,256 \
      --sweep lora-lr=0.003,0.01 --sweep-out DIR
  torchrun --nproc_per_node=8 -m speedrun sweep --checkpoint ... --mode ttt --sweep chunk=32,64,128 --sweep-out DIR
  speedrun sweep --checkpoint ... --beta1 0 --beta2 0.99 --weight-decay 0.5 --lora-alpha 144 --warm-a 1 \
      --virtual-layers 1 --phase-docs 20,40 --sweep mode=ttt,phased --sweep chunk=48,96 --sweep lora-rank=16,80 ...

Every other option is eval_ttt.py's and sets what the grid does not vary. The first configuration is the reference:
plain strided evaluation with the base window and stride. Then every point of the grid, the last --sweep varying
fastest. A swept window brings its own stride (window/2) and chunk (window/4) unless --stride or --chunk is given.
The CSV's `documents` column says which configurations are cross-document (phased, warm A).
Under torchrun every process scores its share of each configuration's documents, as eval_ttt.py does, and process 0
prints and writes the files.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

import eval_ttt
import train_gpt as tg
from data.files import write_atomic

# --sweep KEY: the type of its values (the option of the same name sets the value when KEY is not swept)
SWEEP_KEYS = {"mode": str, "chunk": int, "lora-rank": int, "lora-lr": float, "lora-targets": str, "window": int,
              "stride": int, "doc-batch": int, "rope-ntk-alpha": float, "lora-alpha": float, "beta1": float,
              "beta2": float, "weight-decay": float, "warm-a": eval_ttt.parse_flag,
              "virtual-layers": eval_ttt.parse_flag, "phase-docs": str, "global-lr": float, "global-chunk": int}
ALTERNATIVES_BY_SLASH = ("lora-targets", "phase-docs")  # values that hold commas themselves
CSV_FIELDS = ("mode", "documents", "window", "stride", "chunk", "lora_rank", "lora_lr", "lora_targets", "doc_batch",
              "rope_ntk_alpha", "lora_alpha", "beta1", "beta2", "weight_decay", "warm_a", "virtual_layers",
              "phase_docs", "global_lr", "global_chunk", "bpb", "loss", "tokens", "bytes", "seconds", "setup_seconds",
              "tokens_per_s", "reference")


# ----------------------------------------------------------------------------------------------------------------------
# The grid


def build_parser() -> argparse.ArgumentParser:
    p = eval_ttt.build_parser()
    p.prog = "speedrun sweep"
    p.description = ("eval_ttt.py's evaluation of a train_gpt.py checkpoint over a grid of settings, against plain "
                     "strided evaluation. --out, if given, gets the list of every configuration's results "
                     "(the same as sweep.json).")
    p.add_argument("--sweep", action="append", required=True, metavar="KEY=V1,V2",
                   help=f"a grid axis, one of {', '.join(SWEEP_KEYS)} (lora-targets and phase-docs alternatives "
                        "separated by '/'; mode: a mode per point instead of --mode's); give --sweep once per axis")
    p.add_argument("--sweep-out", default="results/sweep", help="folder for sweep.csv, sweep.json and the plots")
    return p


def parse_sweep(specs: list[str]) -> list[tuple[str, list]]:
    """[(KEY, [values])] for the --sweep options, in their order."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise eval_ttt.UsageError(f"--sweep {spec!r}: expected KEY=V1,V2,... with KEY one of "
                                      f"{', '.join(SWEEP_KEYS)}")
        if key in (k for k, _ in grid):
            raise eval_ttt.UsageError(f"--sweep {spec!r}: {key} is swept twice")
        parts = values.split("/" if key in ALTERNATIVES_BY_SLASH else ",")
        try:
            parsed = [SWEEP_KEYS[key](v.strip()) for v in parts if v.strip()]
        except ValueError:
            kind = {"parse_flag": "0/1 flags"}.get(SWEEP_KEYS[key].__name__, SWEEP_KEYS[key].__name__ + "s")
            raise eval_ttt.UsageError(f"--sweep {spec!r}: values must be {kind}") from None
        if key == "mode" and any(v not in eval_ttt.MODES for v in parsed):
            raise eval_ttt.UsageError(f"--sweep {spec!r}: modes are {', '.join(eval_ttt.MODES)}")
        if not parsed:
            raise eval_ttt.UsageError(f"--sweep {spec!r}: no values")
        grid.append((key, parsed))
    return grid


def sweep_specs(args, grid, checkpoint_hyperparameters: dict) -> list[tuple[eval_ttt.EvalSpec, bool]]:
    """[(EvalSpec, is the reference)]: the reference (plain strided evaluation with the base window and stride), then
    every point of the grid, each made (and so checked) before the first is run. An option not given stays unset, so
    that a point's swept window brings its own default stride and chunk."""
    options = {field: getattr(args, option) for option, field in eval_ttt.SPEC_OPTIONS.items() if option != "mode"}
    specs = [(eval_ttt.spec_from_options(options, "strided", checkpoint_hyperparameters), True)]
    for values in itertools.product(*(v for _, v in grid)):
        point = {**options, **{key.replace("-", "_"): value for (key, _), value in zip(grid, values)}}
        mode = point.pop("mode", None) or args.mode
        specs.append((eval_ttt.spec_from_options(point, mode, checkpoint_hyperparameters), False))
    return specs


# ----------------------------------------------------------------------------------------------------------------------
# Running the grid


def main(argv=None) -> int:
    return eval_ttt.command_line(lambda: run(*parse_args(argv), tg))


def parse_args(argv=None) -> tuple[argparse.Namespace, list[tuple[str, list]]]:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    grid = parse_sweep(args.sweep)
    if args.max_docs < 0:
        raise eval_ttt.UsageError(f"--max-docs {args.max_docs}: must be >= 0 (0: all documents)")
    if args.dump_token_losses:
        raise eval_ttt.UsageError("--dump-token-losses: not with a sweep (run the configuration on its own with "
                                  "eval_ttt.py)")
    return args, grid


def run(args, grid, trainer) -> int:
    started = time.perf_counter()
    env = trainer.setup_distributed()
    loaded = eval_ttt.load(args, env, trainer)
    specs = sweep_specs(args, grid, loaded.hyperparameters)
    setup_seconds = time.perf_counter() - started  # once for the whole grid: process group, checkpoint, data
    rows, results = [], []
    for spec, is_reference in specs:
        result = eval_ttt.evaluate(loaded.model, loaded.data, spec, process=(env.rank, env.world_size),
                                   progress=eval_ttt.progress_to_stderr)
        out = eval_ttt.results_dict(spec, result, loaded.data, loaded.setup, setup_seconds=setup_seconds)
        results.append(out)
        rows.append({**{k: out["config"].get(k) for k in CSV_FIELDS}, **{k: out[k] for k in CSV_FIELDS if k in out},
                     "reference": is_reference})
        if env.is_main:
            print(("reference " if is_reference else "") + eval_ttt.summary_line(spec, result, loaded.data,
                                                                                  loaded.model.config, setup_seconds),
                  flush=True)
    if env.is_main:
        write_sweep(args.sweep_out, rows, results)
        if args.out:
            write_atomic(args.out, (json.dumps(results, indent=1) + "\n").encode())
        print(f"sweep: {len(rows)} configurations -> {os.path.join(args.sweep_out, 'sweep.csv')}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: CSV, JSON, plots


def write_sweep(out_dir: str, rows: list[dict], results: list[dict]) -> None:
    """sweep.csv (one row per configuration), sweep.json (every configuration's results) and the two plots."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(os.path.join(out_dir, "sweep.csv"), buffer.getvalue().encode())
    write_atomic(os.path.join(out_dir, "sweep.json"), (json.dumps(results, indent=1) + "\n").encode())
    plot_sweep(out_dir, rows)


SHORT_NAMES = {"mode": "", "window": "W=", "stride": "S=", "chunk": "C=", "lora_rank": "r=", "lora_lr": "lr=",
               "lora_targets": "", "doc_batch": "B=", "rope_ntk_alpha": "ntk=", "lora_alpha": "alpha=",
               "beta1": "b1=", "beta2": "b2=", "weight_decay": "wd=", "warm_a": "warmA=", "virtual_layers": "perVL=",
               "phase_docs": "phases=", "global_lr": "glr=", "global_chunk": "gC="}
VARIED = tuple(SHORT_NAMES)  # the settings a plot's labels name when they vary


def _label(row: dict, keys) -> str:
    return " ".join(f"{SHORT_NAMES[k]}{row[k]:g}" if isinstance(row[k], float) else f"{SHORT_NAMES[k]}{row[k]}"
                    for k in keys if row[k] is not None) or row["mode"]


def plot_sweep(out_dir: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = next(r for r in rows if r["reference"])
    points = [r for r in rows if not r["reference"]]
    varying = [k for k in VARIED if len({str(r[k]) for r in points}) > 1]
    ref_label = f"strided W={reference['window']} S={reference['stride']} (reference)"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([reference["seconds"]], [reference["bpb"]], marker="s", color="black", label=ref_label, zorder=3)
    ax.axhline(reference["bpb"], color="black", linestyle="--", linewidth=0.8)
    for r in points:
        ax.scatter([r["seconds"]], [r["bpb"]], zorder=3)
        ax.annotate(_label(r, varying), (r["seconds"], r["bpb"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("evaluation time (s)")
    ax.set_ylabel("bits per byte")
    ax.set_title("BPB against evaluation time")
    save_figure(fig, ax, out_dir, "bpb_vs_time.png")

    ttt = [r for r in points if r["mode"] in eval_ttt.TTT_MODES]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(reference["bpb"], color="black", linestyle="--", linewidth=1, label=ref_label)
    others = [k for k in varying if k != "chunk"]
    groups: dict[str, list[dict]] = {}
    for r in ttt:
        groups.setdefault(_label(r, others) if others else r["mode"], []).append(r)
    for label, members in groups.items():
        members.sort(key=lambda r: r["chunk"])
        ax.plot([r["chunk"] for r in members], [r["bpb"] for r in members], marker="o", label=label)
    if ttt:
        chunks = sorted({r["chunk"] for r in ttt})
        ax.set_xscale("log", base=2)
        ax.set_xticks(chunks, [str(c) for c in chunks])
        ax.minorticks_off()
    ax.set_xlabel("TTT chunk size (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title("BPB against TTT chunk size")
    save_figure(fig, ax, out_dir, "bpb_vs_chunk.png")


def save_figure(fig, ax, out_dir: str, name: str) -> None:
    """Legend, layout, and an atomic write of out_dir/name (a half-written PNG never carries the real name)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

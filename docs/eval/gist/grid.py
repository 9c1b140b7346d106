#!/usr/bin/env python3
"""
The gist-token experiment of issue 23 on one corpus. Trains small models (2 layers, width 64, 2 heads /
1 KV head, 4,096 tokens a step: the issue's model) for every setting of the grid that has no checkpoint yet, scores each
checkpoint on the first --max-docs validation documents in the readings below, and prints the table.

  python -m docs.eval.gist.grid run --data DIR --out OUT [--seq-len 512] [--segments 32,128] [--gist-tokens 1,4]
                                [--steps 200,800] [--seeds 1,2,3] [--warmdown half|default|N] [--warmup-steps N]
                                [--plain] [--max-docs 20]
  python -m docs.eval.gist.grid table OUT [OUT ...]

Readings (each a BPB over the same scored tokens, also split at the training piece length T = --seq-len):
  gist model (GIST_TOKENS = k, GIST_SEGMENT = L):
    gist        eval_ttt.py --mode gist: pieces of T (the training layout), segment by segment with cached slots
    gist_whole  eval_ttt.py --mode gist --window (longer than any document): the whole document as one piece, the
                reading before issue 23's fix
    noctx       strided W = S = L: every segment alone, no context at all
    strided     strided W = T, S = T/2: windows of T read as training pieces (slots inserted), the last T/2 scored
  plain model (GIST_TOKENS = 0, --plain): noctx_<L> (strided W = S = L for every L of the grid) and strided (W = T,
  S = T/2: full raw context as trained).
Training runs one at a time with OMP_NUM_THREADS=1, a fixed number of steps (MAX_WALLCLOCK_SECONDS=0), so the figures
do not depend on the machine's load. Every run's command is in OUT/logs/<run>.cmd, its results in OUT/evals/<run>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]

MODEL = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_BATCH_TOKENS="4096", COMPILE="0",
             MAX_WALLCLOCK_SECONDS="0", VAL_MAX_DOCS="1", VAL_LOSS_EVERY="0", EVAL_MODES="flat")


def run_name(corpus: str, seq_len: int, seg: int, k: int, steps: int, seed: int) -> str:
    return f"{corpus}_T{seq_len}_k0_s{steps}_seed{seed}" if k == 0 else \
        f"{corpus}_T{seq_len}_L{seg}_k{k}_s{steps}_seed{seed}"


def train(out: Path, name: str, data: str, seq_len: int, seg: int, k: int, steps: int, seed: int, warmdown: str,
          warmup_steps: int | None):
    checkpoint = out / "ck" / f"{name}.pt"
    if checkpoint.is_file():
        return checkpoint
    env = {**MODEL, "DATA_PATH": data, "TRAIN_SEQ_LEN": str(seq_len), "ITERATIONS": str(steps), "SEED": str(seed),
           "GIST_TOKENS": str(k), "GIST_SEGMENT": str(seg if k else 128), "RUN_ID": name,
           "CHECKPOINT_DIR": str(out / "ck"), "LOG_DIR": str(out / "logs"), "OMP_NUM_THREADS": "1"}
    if warmdown != "default":
        env["WARMDOWN_ITERS"] = str(steps // 2 if warmdown == "half" else int(warmdown))
    if warmup_steps is not None:  # compile warm-up steps, undone afterwards: with COMPILE=0 only time
        env["WARMUP_STEPS"] = str(warmup_steps)
    command = " ".join(f"{key}={value}" for key, value in env.items()) + " python train_gpt.py"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.cmd").write_text(command + "\n")
    started = time.time()
    with open(out / "logs" / f"{name}.out", "w") as log:
        subprocess.run(shlex.split("env " + command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"trained {name} in {time.time() - started:.0f} s", flush=True)
    return checkpoint


def split_bpb(losses: dict, token_bytes: dict, positions: dict, split: int) -> dict:
    nats = np.concatenate([losses[d] for d in sorted(losses)])
    nbytes = np.concatenate([token_bytes[d] for d in sorted(losses)])
    early = np.concatenate([positions[d] for d in sorted(losses)]) < split
    bpb = lambda m: float(nats[m].sum() / math.log(2) / nbytes[m].sum())  # noqa: E731
    return {"bpb": bpb(slice(None)), "bpb_early": bpb(early), "bpb_late": bpb(~early), "tokens": int(len(nats)),
            "bytes": int(nbytes.sum()), "tokens_early": int(early.sum())}


def evaluate(out: Path, name: str, checkpoint: Path, data: str, seq_len: int, segments: list[int], max_docs: int):
    target = out / "evals" / f"{name}.json"
    if target.is_file():
        return json.loads(target.read_text())
    import torch

    import eval_ttt
    import train_gpt as tg
    from data.loader import ValidationSet, build_byte_tables, load_tokenizer

    torch.set_num_threads(1)
    model, state = tg.load_model(str(checkpoint), torch.device("cpu"))
    tokenizer = os.path.join(data, "tokenizer.model")
    tables = build_byte_tables(load_tokenizer(tokenizer), model.config.vocab_size, tokenizer)
    val = ValidationSet.load(data, model.config.vocab_size, tables, max_docs)
    docs = {d: val.document(d) for d in range(val.num_docs)}
    token_bytes = {d: tables.count(doc[:-1], doc[1:]).astype(np.float64) for d, doc in docs.items()}
    positions = {d: np.arange(len(doc) - 1) for d, doc in docs.items()}
    longest = max(len(doc) for doc in docs.values())
    k, seg = model.config.gist_tokens, model.config.gist_segment
    readings = {}

    def losses(mode, window, stride=0):
        spec = eval_ttt.EvalSpec(mode=mode, window=window, stride=stride, batch_tokens=65536)
        return eval_ttt.evaluate(model, val, spec, keep_token_losses=True).token_losses

    def strided(window, stride):
        return losses("strided", window, stride)

    if k:
        readings["gist"] = losses("gist", seq_len)
        readings["gist_whole"] = losses("gist", longest)
        readings["noctx"] = strided(seg, seg)
    else:
        for length in segments:
            readings[f"noctx_{length}"] = strided(length, length)
    readings["strided"] = strided(seq_len, seq_len // 2)
    result = {"run": name, "checkpoint": str(checkpoint), "data": data, "max_docs": max_docs, "seq_len": seq_len,
              "gist_tokens": k, "gist_segment": seg if k else None, "steps": state.get("step"),
              "date": time.strftime("%Y-%m-%d"),
              "readings": {key: split_bpb(losses, token_bytes, positions, seq_len) for key, losses in readings.items()}}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run(args) -> int:
    out = Path(args.out)
    corpus = Path(args.data).name
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    grid = [(seg, k) for seg in ints(args.segments) for k in ints(args.gist_tokens)]
    if args.plain:
        grid.append((0, 0))
    for steps in ints(args.steps):
        for seed in ints(args.seeds):
            for seg, k in grid:
                name = run_name(corpus, args.seq_len, seg, k, steps, seed)
                checkpoint = train(out, name, args.data, args.seq_len, seg, k, steps, seed, args.warmdown,
                                   args.warmup_steps)
                result = evaluate(out, name, checkpoint, args.data, args.seq_len, ints(args.segments), args.max_docs)
                print(name, {key: round(r["bpb"], 4) for key, r in result["readings"].items()}, flush=True)
    return 0


def table(args) -> int:
    results = [json.loads(p.read_text()) for out in args.outs for p in sorted(Path(out).glob("evals/*.json"))]
    groups: dict[tuple, list] = {}
    for r in results:
        corpus = r["run"].split("_T")[0]
        groups.setdefault((corpus, r["seq_len"], r["steps"], r["gist_segment"] or 0, r["gist_tokens"]), []).append(r)
    mean = lambda values: f"{statistics.mean(values):.4f}"  # noqa: E731

    def spread(values):
        return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else \
            f"{values[0]:+.4f}"

    print("| corpus | T | steps | L | k | seeds | gist (pieces of T) | gist, whole document | no context (W=S=L) | "
          "strided W=T S=T/2 | gist − no context | whole − no context | gist − no ctx, pos < T / ≥ T |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in sorted(groups):
        corpus, seq_len, steps, seg, k = key
        rs = groups[key]
        get = lambda name, part="bpb": [r["readings"][name][part] for r in rs]  # noqa: E731
        if k == 0:
            noctx = " / ".join(f"L={n.split('_')[1]}: {mean(get(n))}" for n in sorted(rs[0]["readings"])
                               if n.startswith("noctx_"))
            print(f"| {corpus} | {seq_len} | {steps} | – | 0 | {len(rs)} | – | – | {noctx} | {mean(get('strided'))} "
                  f"| – | – | – |")
            continue
        diff = [a - b for a, b in zip(get("gist"), get("noctx"))]
        whole = [a - b for a, b in zip(get("gist_whole"), get("noctx"))]
        early = [a - b for a, b in zip(get("gist", "bpb_early"), get("noctx", "bpb_early"))]
        late = [a - b for a, b in zip(get("gist", "bpb_late"), get("noctx", "bpb_late"))]
        print(f"| {corpus} | {seq_len} | {steps} | {seg} | {k} | {len(rs)} | {mean(get('gist'))} | "
              f"{mean(get('gist_whole'))} | {mean(get('noctx'))} | {mean(get('strided'))} | {spread(diff)} | "
              f"{spread(whole)} | {statistics.mean(early):+.4f} / {statistics.mean(late):+.4f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.eval.gist.grid", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--segments", default="32,128")
    r.add_argument("--gist-tokens", default="1,4")
    r.add_argument("--steps", default="200,800")
    r.add_argument("--seeds", default="1,2,3")
    r.add_argument("--warmdown", default="half", help="half (ITERATIONS // 2), default (train_gpt's), or a number")
    r.add_argument("--warmup-steps", type=int, help="WARMUP_STEPS (default: train_gpt's)")
    r.add_argument("--plain", action="store_true", help="also the GIST_TOKENS=0 model of every steps and seed")
    r.add_argument("--max-docs", type=int, default=20)
    t = sub.add_parser("table")
    t.add_argument("outs", nargs="+")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""
BPB of eval_ttt.py token-loss dumps (--dump-token-losses, all validation documents in order) split
by the position of the predicted token in its document: positions below --split and from --split on. Shows whether a
difference between evaluations comes from the tokens a model was trained at (positions < TRAIN_SEQ_LEN) or from
longer contexts.

  speedrun bpb-by-position --data data/datasets/peps_sp1024 --split 512 A.npy B.npy ... [--labels a,b,...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from data.loader import ValidationSet, build_byte_tables, load_tokenizer


def token_bytes_and_positions(data_path: str, vocab_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of every scored token of the validation set, and its position in its document (0: the token after BOS
    predicted from the BOS), in the order of the dumps."""
    tokenizer = str(Path(data_path) / "tokenizer.model")
    tables = build_byte_tables(load_tokenizer(tokenizer), vocab_size, tokenizer)
    val = ValidationSet.load(data_path, vocab_size, tables)
    docs = [val.document(k) for k in range(val.num_docs)]
    token_bytes = np.concatenate([tables.count(d[:-1], d[1:]) for d in docs])
    positions = np.concatenate([np.arange(len(d) - 1) for d in docs])
    return token_bytes, positions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun bpb-by-position", description=__doc__.strip().splitlines()[0])
    parser.add_argument("dumps", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", type=int, default=512)
    parser.add_argument("--labels", help="comma-separated, one per dump (default: the file names)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(d).stem for d in args.dumps]
    token_bytes, positions = token_bytes_and_positions(args.data)
    early = positions < args.split
    print(f"| evaluation | BPB, positions < {args.split} | BPB, positions >= {args.split} | BPB, all |")
    print("| --- | --- | --- | --- |")
    for label, path in zip(labels, args.dumps):
        losses = np.load(path).astype(np.float64)
        if len(losses) != len(token_bytes):
            raise SystemExit(f"error: {path}: {len(losses)} losses for {len(token_bytes)} validation tokens")
        parts = [losses[m].sum() / math.log(2) / token_bytes[m].sum() for m in (early, ~early, slice(None))]
        print(f"| {label} | {parts[0]:.4f} | {parts[1]:.4f} | {parts[2]:.4f} |")
    print(f"\ntokens: {int(early.sum())} at positions < {args.split}, {int((~early).sum())} from {args.split} on; "
          f"bytes: {int(token_bytes[early].sum())} and {int(token_bytes[~early].sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

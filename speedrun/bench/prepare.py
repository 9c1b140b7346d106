"""Throughput of data/prepare_corpus.py, with tokenizer training and encoding+writing timed apart.

    speedrun bench prepare [--input data/sample/peps.jsonl.gz] [--val-docs 60] [--vocab-size 1024] [--repeat 1]

Phases (each the best of --repeat runs, wall-clock seconds):
  train     prepare_corpus.train_tokenizer on the train split, read from the input file as prepare_corpus reads it
  encode    `prepare_corpus.py --tokenizer <that model>`: reading and checking the input, encoding, the decode check,
            writing the shards, the manifest and the copy of the tokenizer
  total     the whole `prepare_corpus.py` run that trains its own tokenizer (what run.sh does)
MB/s is of the input's UTF-8 text (documents, not the compressed file), MB = 10^6 bytes; tokens/s counts every token
written, BOS included. The figures depend on the load of the machine; the cores in use are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import prepare_corpus


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def quiet_main(argv) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = prepare_corpus.main(argv)
    if code != 0:
        raise SystemExit(f"prepare_corpus.py {' '.join(argv)} failed with exit code {code}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="speedrun bench prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=os.path.join(ROOT, "data", "sample", "peps.jsonl.gz"))
    p.add_argument("--val-docs", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)

    kind = prepare_corpus.input_kind(args.input)
    docs = list(prepare_corpus.iter_documents(args.input, kind))
    total_bytes = sum(n for _, n in docs)
    train_bytes = sum(n for _, n in docs[args.val_docs:])
    del docs
    settings = prepare_corpus.trainer_settings(args.vocab_size, 1.0)

    work = tempfile.mkdtemp(prefix="bench_prepare_")
    try:
        best = {"train": float("inf"), "encode": float("inf"), "total": float("inf")}
        for _ in range(args.repeat):
            documents = prepare_corpus.iter_documents(args.input, kind)
            texts = (t for i, (t, _) in enumerate(documents) if i >= args.val_docs)
            seconds, model = timed(lambda: prepare_corpus.train_tokenizer(texts, settings, args.input))
            best["train"] = min(best["train"], seconds)
            model_path = os.path.join(work, "bench.model")
            with open(model_path, "wb") as f:
                f.write(model)

            out = os.path.join(work, "encode")
            seconds, _ = timed(lambda: quiet_main(["--input", args.input, "--out", out, "--tokenizer", model_path,
                                                   "--val-docs", str(args.val_docs)]))
            best["encode"] = min(best["encode"], seconds)
            with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            shutil.rmtree(out)

            out = os.path.join(work, "total")
            seconds, _ = timed(lambda: quiet_main(["--input", args.input, "--out", out, "--val-docs",
                                                   str(args.val_docs), "--vocab-size", str(args.vocab_size)]))
            best["total"] = min(best["total"], seconds)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"input {os.path.relpath(args.input)}: {total_bytes / 1e6:.2f} MB of text"
          f" ({train_bytes / 1e6:.2f} MB train), {tokens} tokens; {cores} cores, load average {load:.2f};"
          f" best of {args.repeat}")
    print(f"{'phase':<8}{'seconds':>9}{'MB/s':>9}{'tokens/s':>12}")
    print(f"{'train':<8}{best['train']:>9.2f}{train_bytes / 1e6 / best['train']:>9.2f}{'-':>12}")
    for phase in ("encode", "total"):
        print(f"{phase:<8}{best[phase]:>9.2f}{total_bytes / 1e6 / best[phase]:>9.2f}{tokens / best[phase]:>12,.0f}")


if __name__ == "__main__":
    main()

"""speedrun.audit on a parameter-golf-sized dataset (a benchmark, not a test).

    speedrun bench audit --data /tmp/pg_synth [--train-shards 80] [--shard-tokens 100000000]
                                [--val-tokens 62000000] [--mean-doc 1000] [--tokenizer MODEL] [--threads 2]
                                [--only-make] [--keep]

Writes (unless DATA already holds it) a synthetic dataset shaped like parameter-golf's FineWeb sp1024: --train-shards
shards of --shard-tokens tokens and a validation split of --val-tokens tokens, documents of log-normal length (sigma
0.8, mean --mean-doc tokens) that run on from one shard into the next. Tokens are drawn one by one from the unigram
frequencies of the prepared bundled sample under its tokenizer (byte-fallback and control pieces left out, so that every
document decodes to exactly the bytes the tables count), independently for the two splits: like a clean FineWeb, almost
no 8-token shingle of the validation split occurs in training. To write 8B tokens in minutes, each training shard is
one pool of --shard-tokens drawn tokens rotated by a random offset, with its own document boundaries.

Then runs the audit twice in a subprocess and prints wall time, tokens/s and peak RSS (ru_maxrss of the child):
  exact:  `speedrun.audit DATA --shingle 0` (structure, exact overlap, bytes, completeness: the streamed exact part)
  full:   `speedrun.audit DATA` (also the near-overlap shingle index and probe)
The dataset is deleted afterwards unless --keep (generate it under /tmp; it is 2 bytes per token).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import write_shard


def unigram(tokenizer: str, sample_dir: str) -> np.ndarray:
    import sentencepiece as spm

    from data.loader import TokenStream, split_pattern

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    stream = TokenStream(split_pattern(sample_dir, "train"), sp.vocab_size())
    counts = np.zeros(sp.vocab_size(), dtype=np.float64)
    for shard in stream.shards:
        counts += np.bincount(np.asarray(shard), minlength=sp.vocab_size())[:sp.vocab_size()]
    for t in range(sp.vocab_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t) or sp.is_byte(t):
            counts[t] = 0
    return counts / counts.sum()


def write_split(folder: str, split: str, total: int, shard_tokens: int, mean_doc: float, p: np.ndarray, seed: int):
    """Shards of `total` tokens: one pool of `shard_tokens` tokens drawn from `p`, each shard that pool rotated by a
    random offset, with its own document boundaries (drawing 8B tokens one by one would take most of an hour)."""
    rng = np.random.default_rng(seed)
    pool = np.searchsorted(np.cumsum(p), rng.random(min(shard_tokens, total)), side="right").astype(np.uint16)
    sigma = 0.8
    mu = np.log(mean_doc) - sigma * sigma / 2
    shard = 0
    for start in range(0, total, shard_tokens):
        n = min(shard_tokens, total - start)
        tokens = np.roll(pool, int(rng.integers(len(pool))))[:n]
        lengths = np.maximum(2, rng.lognormal(mu, sigma, size=int(3 * n / mean_doc) + 10)).astype(np.int64)
        starts = np.cumsum(lengths)
        tokens[starts[starts < n]] = 1
        if start == 0:
            tokens[0] = 1
        write_shard(os.path.join(folder, f"synthetic_{split}_{shard:06d}.bin"), tokens)
        shard += 1
        print(f"  {split} shard {shard}: {n:,} tokens", file=sys.stderr, flush=True)


def run_audit(data: str, extra: list[str], threads: int) -> dict:
    """One audit in a child process; its peak RSS from a wrapper that waits for it (ru_maxrss of its children)."""
    out = os.path.join(data, "audit.json")
    cmd = [sys.executable, "-m", "speedrun", "audit", data, "--json", out, "--threads", str(threads),
           *extra]
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode == 2:
        raise SystemExit(proc.stderr)
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    os.remove(out)
    return {"command": " ".join(["speedrun audit", data, "--threads", str(threads), *extra]), "wall_s": wall,
            "report": report, "peak_rss_mib": peak_kib / 1024, "summary": proc.stdout}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="speedrun bench audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--train-shards", type=int, default=80)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--val-tokens", type=int, default=62_000_000)
    p.add_argument("--mean-doc", type=float, default=1000.0)
    p.add_argument("--tokenizer", default=os.path.join(REPO, "data", "datasets", "peps_sp1024_spread", "tokenizer.model"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only-make", action="store_true")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    sample_dir = os.path.dirname(args.tokenizer)
    os.makedirs(args.data, exist_ok=True)
    have = sorted(f for f in os.listdir(args.data) if f.endswith(".bin"))
    if len([f for f in have if "_train_" in f]) != args.train_shards or not any("_val_" in f for f in have):
        t0 = time.perf_counter()
        probs = unigram(args.tokenizer, sample_dir)
        shutil.copyfile(args.tokenizer, os.path.join(args.data, "tokenizer.model"))
        write_split(args.data, "val", args.val_tokens, args.shard_tokens, args.mean_doc, probs, seed=1)
        write_split(args.data, "train", args.train_shards * args.shard_tokens, args.shard_tokens, args.mean_doc,
                    probs, seed=2)
        print(f"made {args.data} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.only_make:
        return 0
    for name, extra in (("exact", ["--shingle", "0"]), ("full", [])):
        r = run_audit(args.data, extra, args.threads)
        rep = r["report"]
        tokens = rep["tokens"]
        t = rep["timings"]
        print(f"{name}: {r['command']}")
        print(r["summary"].rstrip())
        train_rate = rep["checks"]["structure"]["train"]["tokens"] / t["train_scan_s"] / 1e6
        print(f"  wall {r['wall_s']:.1f} s for {tokens:,} tokens: {tokens / r['wall_s'] / 1e6:.1f}M tokens/s overall; "
              f"train pass {t['train_scan_s']:.1f} s ({train_rate:.1f}M tokens/s); exact hashing "
              f"{t['exact_hash_s']:.1f} s of thread time, near probe {t['near_probe_s']:.1f} s, near index "
              f"{t['near_index_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB")
    if not args.keep:
        shutil.rmtree(args.data)
        print(f"removed {args.data}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

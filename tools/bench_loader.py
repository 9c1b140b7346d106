"""Packing throughput of train_gpt.DocumentLoader on the CPU (a benchmark, not a test).

    python tools/bench_loader.py [--data DIR] [--steps N]

Serves the default configuration's global batch (TRAIN_BATCH_TOKENS=524,288 as 8 micro-batches of 65,536 tokens,
pieces of at most 1,024 tokens) for one process, i.e. everything 8 GPUs consume per step, and prints tokens/s for:
the prepared sample (long documents, ~10k tokens each) and a synthetic stream with FineWeb-like short documents
(lengths drawn from a geometric distribution with mean 700 tokens). The loader must stay far above what 8 GPUs eat
(~1.5M tokens/s each, 12M tokens/s together); the target is 50M tokens/s.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from data.shards import write_shard  # noqa: E402


def measure(stream: tg.TokenStream, steps: int) -> tuple[float, float]:
    loader = tg.DocumentLoader(stream, seq_len=1024, batch_tokens=524_288, micro_batches=8, rank=0, world_size=1,
                               seed=1337)
    loader.next_step()  # first epoch permutation
    start = time.perf_counter()
    segments = 0
    for _ in range(steps):
        for batch in loader.next_step():
            segments += int(np.count_nonzero(np.diff(batch.cu_seqlens)))
    seconds = time.perf_counter() - start
    return steps * 524_288 / seconds, segments / (steps * 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data", default="data/datasets/peps_sp1024")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    if os.path.isdir(args.data):
        stream = tg.TokenStream(tg.split_pattern(args.data, "train"), 65536)
        rows.append((f"sample ({args.data})", stream, *measure(stream, args.steps)))
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        lengths = rng.geometric(1 / 700, size=30_000)
        tokens = rng.integers(4, 1024, size=int(lengths.sum()), dtype=np.uint16)
        tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = tg.BOS_ID
        write_shard(os.path.join(tmp, "syn_train_000000.bin"), tokens)
        stream = tg.TokenStream(os.path.join(tmp, "syn_train_*.bin"), 65536)
        rows.append(("synthetic, mean doc 700 tokens", stream, *measure(stream, args.steps)))
    print("| stream | documents | mean doc tokens | segments per micro-batch | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, stream, tokens_per_s, segments in rows:
        print(f"| {name} | {stream.num_docs} | {stream.num_tokens / stream.num_docs:.0f} | {segments:.0f} "
              f"| {tokens_per_s / 1e6:.1f}M |")


if __name__ == "__main__":
    main()

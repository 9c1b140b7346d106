"""The document loader on the CPU (a benchmark, not a test).

    speedrun bench loader [--shards 80] [--shard-tokens 100000000] [--mean-doc 1275] [--steps 30]
                                 [--step-ms 43.5] [--data DIR]

Writes a synthetic training split shaped like parameter-golf's FineWeb sp1024 (by default 80 shards of 100M tokens,
document lengths geometric with mean 1,275 tokens) to a temporary folder (or uses --data's), then prints one table:
- start-up: opening the split's shards (TokenStream) without the index cache (a full scan for BOS and the largest id)
  and with it (PATH.index.npz beside each shard);
- build: one rank's micro-batch of the default 8-GPU configuration (65,536 tokens, pieces of at most 1,024), built in
  the foreground, ms each, and tokens/s;
- exposed: the time a training step waits for its batch when the PrefetchingLoader builds the next one in its thread
  while the step runs (the device's work is stood in for by a sleep of --step-ms, 43.5 ms being parameter-golf's 8xH100
  step), in ms and as a share of the step. The target is under 1%.
"""

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

from data.loader import BOS_ID, DocumentLoader, LoaderConfig, PrefetchingLoader, TokenStream, split_pattern
from data.shards import write_shard


def write_synthetic_split(folder: str, shards: int, shard_tokens: int, mean_doc: float, seed: int = 0) -> None:
    """`shards` shards of FineWeb-like documents; documents run on from one shard into the next, as in FineWeb's."""
    rng = np.random.default_rng(seed)
    for i in range(shards):
        tokens = rng.integers(4, 1024, size=shard_tokens, dtype=np.uint16)
        starts = np.cumsum(rng.geometric(1 / mean_doc, size=int(2 * shard_tokens / mean_doc) + 10))
        tokens[starts[starts < shard_tokens]] = BOS_ID
        if i == 0:
            tokens[0] = BOS_ID
        write_shard(os.path.join(folder, f"synthetic_train_{i:06d}.bin"), tokens)


def open_seconds(pattern: str, cached: bool) -> tuple[float, TokenStream]:
    if not cached:
        for path in glob.glob(pattern):
            if os.path.exists(f"{path}.index.npz"):
                os.remove(f"{path}.index.npz")
    start = time.perf_counter()
    stream = TokenStream(pattern, 1024)
    return time.perf_counter() - start, stream


def loader_for(stream: TokenStream) -> DocumentLoader:
    # rank 0 of 8: one 65,536-token micro-batch per step, as each of 8 GPUs takes in the default configuration
    return DocumentLoader(stream, LoaderConfig(seq_len=1024, batch_tokens=524_288, micro_batches=8, seed=1337),
                             rank=0, world_size=8)


def build_ms(stream: TokenStream, steps: int) -> float:
    loader = loader_for(stream)
    loader.next_step()  # the first epoch's permutation
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return 1000 * (time.perf_counter() - start) / steps


def exposed_ms(stream: TokenStream, steps: int, step_ms: float) -> float:
    loader = PrefetchingLoader(loader_for(stream), pin_memory=False)
    loader.next_step()
    waited = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loader.next_step()
        waited += time.perf_counter() - start
        time.sleep(step_ms / 1000)  # the device's share of the step; the loader thread works meanwhile
    return 1000 * waited / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="speedrun bench loader", description=__doc__.splitlines()[1])
    parser.add_argument("--data", help="an existing folder with *_train_*.bin shards (default: a synthetic split)")
    parser.add_argument("--shards", type=int, default=80)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--mean-doc", type=float, default=1275.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-ms", type=float, default=43.5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or tmp
        if not args.data:
            start = time.perf_counter()
            write_synthetic_split(tmp, args.shards, args.shard_tokens, args.mean_doc)
            print(f"wrote {args.shards} x {args.shard_tokens:,} tokens in {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
        pattern = split_pattern(folder, "train")
        cold, stream = open_seconds(pattern, cached=False)
        warm, stream = open_seconds(pattern, cached=True)
        build = build_ms(stream, args.steps)
        exposed = exposed_ms(stream, args.steps, args.step_ms)
    print(f"| shards | tokens | documents | open, no cache | open, cached | build 65,536 tokens | loader tokens/s "
          f"| exposed per {args.step_ms} ms step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(stream.files)} | {stream.num_tokens:,} | {stream.num_docs:,} | {cold:.2f} s | {warm:.2f} s "
          f"| {build:.2f} ms | {65536 / build * 1000 / 1e6:.0f}M | {exposed:.3f} ms "
          f"({100 * exposed / args.step_ms:.2f}%) |")


if __name__ == "__main__":
    main()

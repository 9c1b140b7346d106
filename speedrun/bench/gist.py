#!/usr/bin/env python3
"""
The training-speed cost of gist tokens on this machine. For each GIST_TOKENS value, one training step
(forward and backward of every micro-batch, as train_gpt.forward_backward; no optimizer step) of run.sh's CPU model on
the same loader batches, timed in interleaved rounds (so a neighbour's load on shared cores hits every setting alike);
prints the median step time and raw tokens per second of each.

  OMP_NUM_THREADS=1 speedrun bench gist --data data/datasets/peps_sp1024_spread --gist-tokens 0,4,16 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import gist
import train_gpt as tg
from data.loader import DocumentLoader, TokenStream, split_pattern

RUN_SH_CPU = dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="512",
                  TRAIN_BATCH_TOKENS="8192", COMPILE="0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun bench gist", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default="data/datasets/peps_sp1024_spread")
    parser.add_argument("--gist-tokens", default="0,4,16")
    parser.add_argument("--gist-segment", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    stream = None
    settings = {}
    for k in (int(v) for v in args.gist_tokens.split(",")):
        hp = tg.Hyperparameters.from_env({**RUN_SH_CPU, "DATA_PATH": args.data, "GIST_TOKENS": str(k),
                                          "GIST_SEGMENT": str(args.gist_segment)})
        stream = stream or TokenStream(split_pattern(hp.data_path, "train"), hp.vocab_size)
        loader = DocumentLoader(stream, tg.loader_config(hp))
        torch.manual_seed(hp.seed)
        model_kernels = tg.choose_kernels(frozenset(), "reference", device, gist=k > 0)
        model = tg.build_model(tg.ModelConfig.from_hyperparameters(hp), model_kernels)
        settings[k] = (hp, model, loader.next_step())
    reducer = tg.GradientReducer(torch.nn.Linear(1, 1))  # one process: nothing to reduce
    times = {k: [] for k in settings}
    for _ in range(args.rounds):
        for k, (hp, model, batches) in settings.items():
            start = time.perf_counter()
            tg.forward_backward(model, batches, hp, device, reducer)
            times[k].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    print("| GIST_TOKENS | slots per micro-batch | step (median) | raw tokens/s | vs k=0 |")
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(times[min(times)])
    for k, (hp, _, batches) in settings.items():
        step = statistics.median(times[k])
        slots = gist.laid_out_length(len(batches[0].inputs), k, hp.gist_segment)
        print(f"| {k} | {slots} | {1000 * step:.0f} ms | {hp.train_batch_tokens / step:,.0f} | "
              f"{step / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

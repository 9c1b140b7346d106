"""Sizes and times of the artifact codecs (kernels/artifact.py).

    speedrun bench artifact                       # random baseline-shape model (9 x 512) and run.sh's CPU model
    speedrun bench artifact --checkpoint X.pt     # a train_gpt.py checkpoint's model instead
    speedrun bench artifact --checkpoint X.pt --data DIR --eval-docs 20   # + BPB lost by the round trip
    speedrun bench artifact --codecs int8_zlib,int6_lzma --threads 1

One markdown table row per model and codec: the artifact's bytes, encode and decode seconds, and the round trip's
largest relative error of a matrix. GPTQ's Hessians come from --calibration-batches batches of random tokens (their
collection time is its own column; for a real run it is training batches): the figures are times and sizes, not
quality. A randomly initialised model starts its output projections at zero, which would compress to nothing, so
the random models draw those like the other matrices (nn.Linear's default uniform init). Random weights are
near-uniform and compress far less than trained ones. A last column gives, for the int6 codecs, the bytes the same
payload would take with the int6 values one per byte instead of packed 4 in 3 (a what-if, for the choice of packing).

With --checkpoint and --data, GPTQ is calibrated as a training run calibrates it (train_gpt.gptq_hessians: the run's
own settings, ARTIFACT_CALIBRATION_BATCHES micro-batches of the training split), and each codec's round-trip model is
scored on the first --eval-docs validation documents in strided mode (the run's EVAL_WINDOW and EVAL_STRIDE) against
the checkpoint's own weights: the BPB the round trip costs.
"""

import argparse
import io
import lzma
import sys
import time
from pathlib import Path

import torch

import eval_ttt
import train_gpt as tg
from data.loader import DocumentLoader, TokenStream, ValidationSet, build_byte_tables, load_tokenizer, split_pattern
from kernels import artifact as A
from kernels import bundle as code_bundle

BASELINE = tg.ModelConfig()  # parameter-golf's baseline: 9 layers x 512, vocabulary 1024
FRONTIER = tg.ModelConfig(num_layers=11, model_dim=512, mlp_mult=4, vocab_size=8192)  # the frontier preset's shape
CPU_MODEL = tg.ModelConfig(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2)  # run.sh without a GPU


def random_model(config: tg.ModelConfig, seed: int) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.build_model(config)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            module.reset_parameters()  # the zero-initialised output projections
    return model


def unpacked_int6_bytes(data: bytes) -> int:
    """The int6 codecs' size with each int6 value in a byte of its own (everything else the same)."""
    payload = torch.load(io.BytesIO(lzma.decompress(data)), weights_only=True)
    for entry in payload["tensors"].values():
        if entry["kind"] == "int6":
            rows, cols = entry["shape"]
            q = A.unpack_int6(entry.pop("packed").numpy(), rows * cols)
            entry["q"] = torch.from_numpy(q).view(rows, cols)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return len(lzma.compress(buffer.getvalue(), preset=A.LZMA_PRESET))


GPTQ_CODECS = ("int6_gptq_lzma", "sdclip_gptq")  # one calibration serves every *gptq* codec of the bench


def quality(model: tg.GPT, hyperparameters: dict, data: str, eval_docs: int, small_numel: int):
    """(GPTQ Hessians from training batches, function scoring a state dict's strided BPB) for a run's checkpoint."""
    hp = tg.Hyperparameters(**{**hyperparameters, "artifact": "int6_gptq_lzma", "data_path": data})
    device = torch.device("cpu")
    stream = TokenStream(split_pattern(data, "train"), hp.vocab_size)
    loader = DocumentLoader(stream, tg.loader_config(hp))
    start = time.perf_counter()
    hessians = tg.gptq_hessians(model, loader, hp, device,
                                tg.calibration_names(model.state_dict(), GPTQ_CODECS, small_numel))
    hessian_s = time.perf_counter() - start
    tokenizer = str(Path(data) / "tokenizer.model")
    val = ValidationSet.load(data, hp.vocab_size, build_byte_tables(load_tokenizer(tokenizer), hp.vocab_size, tokenizer),
                             eval_docs)
    hp.resolve_defaults()
    spec = hp.eval_spec("strided")

    def strided_bpb(state_dict) -> float:
        scored = tg.build_model(model.config)
        scored.load_state_dict(state_dict)
        return eval_ttt.evaluate(scored, val, spec).bpb

    return hessians, hessian_s, strided_bpb


def code_bytes() -> tuple[int, int]:
    """(raw, bundled) bytes of the payload (train_gpt.PAYLOAD, no experiment files)."""
    files = tg.payload_contents()
    return sum(map(len, files.values())), len(code_bundle.bundle_bytes(files))


def bench(label: str, model: tg.GPT, codecs, calibration_batches: int, seq_len: int, scoring=None,
          small_numel: int = A.SMALL_TENSOR_NUMEL) -> None:
    model.eval()
    state_dict = {name: t.detach().clone() for name, t in model.state_dict().items()}
    plan = A.quantization_plan(state_dict, "int6_gptq_lzma")
    counts = {how: sum(state_dict[n].numel() for n, h in plan.items() if h == how) for how in set(plan.values())}
    raw = sum(t.numel() * t.element_size() for t in state_dict.values())
    raw_code, bundled_code = code_bytes()
    print(f"\n{label}: {raw:,} bytes as stored in training; values by how the int6 codecs store them: "
          + ", ".join(f"{how} {n:,}" for how, n in sorted(counts.items())))
    print(f"code bytes: raw {raw_code:,}, bundled {bundled_code:,}; sdclip small tensors: at most {small_numel:,} "
          f"values; compressors here: {', '.join(A.available_compressors())}")
    if scoring:
        base_bpb = scoring[2](state_dict)
        print(f"strided BPB of the checkpoint's own weights: {base_bpb:.4f}")
    print("| codec | model bytes | total (raw code) | total (bundled code) | encode s | decode s | Hessians s | "
          "max rel. error | int6 one per byte | BPB | Δ BPB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    random_hessians = None
    for codec in codecs:
        hessians, hessian_s = None, 0.0
        if A.needs_calibration(codec) and scoring:
            hessians, hessian_s = scoring[0], scoring[1]
        elif A.needs_calibration(codec):
            if random_hessians is None:
                g = torch.Generator().manual_seed(0)
                batches = [torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)
                           for _ in range(calibration_batches)]
                start = time.perf_counter()
                random_hessians = (A.collect_hessians(model, batches, lambda m, b: m(b[:, :-1], b[:, 1:]),
                                                      tg.calibration_names(state_dict, GPTQ_CODECS, small_numel)),
                                   time.perf_counter() - start)
            hessians, hessian_s = random_hessians
        kwargs = {"small_numel": small_numel} if A.codec_options(codec).sdclip else {}
        start = time.perf_counter()
        data = A.encode_artifact(state_dict, codec, {"model_config": vars(model.config)}, hessians, **kwargs)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded, _ = A.decode_artifact(data)
        decode_s = time.perf_counter() - start
        error = max(((decoded[n].float() - t.float()).abs().max() / t.float().abs().max()).item()
                    for n, t in state_dict.items() if t.is_floating_point() and t.abs().max() > 0)
        unpacked = f"{unpacked_int6_bytes(data):,}" if codec in ("int6_lzma", "int6_gptq_lzma") else ""
        scores = " | |"
        if scoring:
            bpb = scoring[2](decoded)
            scores = f" {bpb:.4f} | {bpb - base_bpb:+.4f} |"
        print(f"| {codec} | {len(data):,} | {len(data) + raw_code:,} | {len(data) + bundled_code:,} | {encode_s:.2f} | "
              f"{decode_s:.2f} | {hessian_s:.2f} | {error:.4f} | {unpacked} |{scores}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="speedrun bench artifact", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a train_gpt.py checkpoint (.pt); default: the two random models")
    p.add_argument("--codecs", default=",".join(A.CODECS), help="comma-separated (default: all)")
    p.add_argument("--calibration-batches", type=int, default=4, help="GPTQ: random-token batches for the Hessians")
    p.add_argument("--seq-len", type=int, default=1024, help="GPTQ: tokens per calibration batch")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--data", help="with --checkpoint: its dataset folder, for real calibration and the BPB columns")
    p.add_argument("--eval-docs", type=int, default=20, help="validation documents scored for the BPB columns")
    p.add_argument("--small-numel", type=int, default=A.SMALL_TENSOR_NUMEL,
                   help="sdclip codecs: float tensors of at most this many values stay float16")
    p.add_argument("--frontier-shape", action="store_true",
                   help="without --checkpoint: only a random model of the frontier preset's shape (11 x 512, MLP 4x, "
                        "vocabulary 8192)")
    args = p.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in codecs if c not in A.CODECS]
    if unknown:
        p.error(f"unknown codec {unknown[0]!r} (one of {', '.join(A.CODECS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.checkpoint:
        model, state = tg.load_model(args.checkpoint, torch.device("cpu"))
        scoring = (quality(model, state["hyperparameters"], args.data, args.eval_docs, args.small_numel)
                   if args.data else None)
        bench(f"{args.checkpoint} ({model.config.num_layers} x {model.config.model_dim})", model, codecs,
              args.calibration_batches, args.seq_len, scoring, args.small_numel)
        return 0
    models = ((("random frontier shape (11 x 512, MLP 4x, vocab 8192)", FRONTIER),) if args.frontier_shape else
              (("random baseline shape (9 x 512, vocab 1024)", BASELINE),
               ("random run.sh CPU model (4 x 128, 4 heads, 2 kv heads)", CPU_MODEL)))
    for label, config in models:
        bench(label, random_model(config, seed=0), codecs, args.calibration_batches, args.seq_len,
              small_numel=args.small_numel)
    return 0


if __name__ == "__main__":
    sys.exit(main())

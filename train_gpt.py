"""
train_gpt.py: the record script. Trains a small GPT on packed, shuffled documents and scores it in bits per byte.

Sections, in data-flow order:
  1. hyperparameters (environment variables, validated before any work)
  2. distributed setup (torchrun: NCCL on CUDA, gloo on CPU; or one plain process)
  3. data (data/loader.py: shards, the shuffled varlen document loader, the validation set, bytes per token)
  4. model: GPT with RMSNorm, rotary q/k, grouped-query varlen attention, relu^2 MLP, U-Net skips, tied embeddings;
     the frontier's switches (XSA, SmearGate, output gates, LN scale, gated skips, parallel lanes, depth recurrence)
  5. optimizers: Muon for matrices (work shared across ranks; Polar Express, MuonEq-R), Adam(W) for the rest
  6. training loop
  7. evaluation (eval_ttt.py: per-document flat and strided bits per byte)
  8. checkpoints, the artifact, logging, and main()

Run: `python train_gpt.py` (one process) or `torchrun --nproc_per_node=N train_gpt.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import platform
import random
import secrets
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from data.files import sha256_file, write_atomic
from data.loader import (IGNORE_INDEX, ConfigError, DataError, DocumentLoader, LoaderConfig, MicroBatch,
                         PrefetchingLoader, TokenStream, ValidationSet, build_byte_tables, load_tokenizer,
                         split_pattern)
from eval_ttt import (EvalResult, EvalSpec, compile_counts, evaluate, is_distributed, leave_process_group,
                      parse_flag, sum_over_processes, synchronize)
from kernels.artifact import CODECS as ARTIFACT_CODECS
from kernels.artifact import (SMALL_TENSOR_NUMEL, collect_hessians, encode_artifact, hessian_names, needs_calibration,
                              read_artifact)
from kernels.bundle import bundle_bytes
from kernels.attention import (REFERENCE_VARLEN, VARLEN_BACKENDS, BackendError, sdpa_causal, segment_ids,
                               select_gist_attention, select_varlen_attention)
from kernels.newton_schulz import NS_COEFFICIENTS, NS_SCHEDULES, coefficients_at

# The files a record needs to run and be scored: embedded in every log, counted as the artifact's code bytes, and
# what a record's verification reads back. A file of EXPERIMENT_PAYLOAD joins them when its switch is on.
PAYLOAD = ("train_gpt.py", "eval_ttt.py", "data/__init__.py", "data/files.py", "data/loader.py", "kernels/__init__.py",
           "kernels/_common.py", "kernels/artifact.py", "kernels/attention.py", "kernels/bundle.py",
           "kernels/newton_schulz.py", "kernels/relu2_linear.py", "kernels/rms_norm.py", "kernels/rotary_qk.py",
           "kernels/softcap_cross_entropy.py")
EXPERIMENT_PAYLOAD = {"gist.py": "gist_tokens"}  # file -> the hyperparameter that, when non-zero, imports it
ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------------
# 1. Hyperparameters
#
# Every field can be set by the environment variable of the same name in upper case (parameter-golf's names where they
# exist). Bad values stop the run with one line naming the variable, before any work is done.


@dataclass
class ModelConfig:
    """The model's shape: parameter-golf's baseline by default. Saved in every checkpoint."""

    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    mlp_act: str = "relu2"  # relu2: relu(x)^2 | leaky_relu2: leaky_relu(x, 0.5)^2 (negative inputs keep a gradient)
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 0  # head dimensions that rotary rotates (partial rotary; the rest carry no position); 0: all
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    # gist tokens, an experiment (gist.py): after every GIST_SEGMENT raw tokens of a document piece but the last,
    # GIST_TOKENS learned slots; later segments see those slots instead of the raw tokens. 0: off.
    gist_tokens: int = 0
    gist_segment: int = 128
    # the leaderboard's frontier (parameter-golf #1855 and the records it builds on), each off by default. Layer sets
    # are "" (none), "all", or indices and ranges of the physical layers ("3-5,8").
    xsa_layers: str = ""  # exclusive self-attention: remove from each head's output its own value's direction
    smear_gate: bool = False  # add a gated share of the previous token's embedding (never across a document start)
    sparse_attn_gate: bool = False  # per-head sigmoid gate on the attention output, from the first 12 input channels
    sparse_attn_gate_scale: float = 0.5
    ln_scale: bool = False  # the blocks' normed inputs times 1/sqrt(layer + 1)
    skip_gates: bool = False  # U-Net skips mixed in by a learned sigmoid gate (x <- lerp(w * skip, x, sigmoid(g)))
    parallel_start_layer: int = 0  # from this layer on, attention and MLP read and write two residual lanes; 0: off
    recur_layers: str = ""  # depth recurrence: a range of layers ("3-5") run RECUR_LOOPS more times; "" off
    recur_loops: int = 2
    orthogonal_init: bool = False  # q, k, v and MLP-in weights start orthogonal (default: nn.Linear's uniform)

    @classmethod
    def from_hyperparameters(cls, hp: ModelConfig) -> ModelConfig:
        return cls(**{f.name: getattr(hp, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Hyperparameters(ModelConfig):
    """Everything a run is configured by: the model's shape (above) and the rest (below)."""

    preset: str = ""  # a known record's configuration (PRESETS); every variable set explicitly wins
    # data
    data_path: str = "data/datasets/fineweb10B_sp1024"  # folder with *_train_*.bin and *_val_*.bin shards
    tokenizer_path: str = ""  # SentencePiece model; empty means DATA_PATH/tokenizer.model
    run_id: str = ""  # names the log and checkpoint files; empty means a timestamp and a random suffix
    seed: int = 1337
    doc_shuffle: bool = True  # a fresh permutation of the documents every epoch; 0 keeps the file order (ablations)
    # batch: the global batch is TRAIN_BATCH_TOKENS per step, cut into TRAIN_MICRO_BATCHES equal slices; each process
    # runs TRAIN_MICRO_BATCHES / world_size of them (gradient accumulation), so 1..8 processes train the same model.
    train_seq_len: int = 1024  # longest piece a document is cut into
    train_batch_tokens: int = 524_288
    train_micro_batches: int = 8
    # schedule
    iterations: int = 20_000
    warmup_steps: int = 20  # compile warm-up steps; their effect on weights and optimizer state is undone
    lr_warmup_steps: int = 0  # linear learning-rate warm-up at the start of the timed run
    warmdown_iters: int = 1200  # warm-down to 0 over the last iterations (estimated from the wall clock if capped)
    warmdown_shape: str = "linear"  # linear | cosine | sqrt (1 - sqrt of the warm-down's progress: below linear)
    warmdown_frac: float = 0.0  # > 0: the warm-down is this last fraction of training (by wall clock if capped)
    min_lr: float = 0.0  # floor of the learning-rate multiplier during the warm-down
    recur_start_frac: float = 0.0  # RECUR_LAYERS: the fraction of training after which the repeated layers run
    max_wallclock_seconds: float = 600.0  # 0 means no cap
    # optimizers
    tied_embed_lr: float = 0.05
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_ns: str = "quintic"  # quintic (fixed coefficients) | polar_express (per-iteration coefficients)
    muon_row_norm: bool = False  # MuonEq-R: each row of the update to unit norm before orthogonalising
    muon_wd: float = 0.0  # decoupled weight decay (p *= 1 - lr * wd) of Muon's matrices
    embed_wd: float = 0.0  # ... of the embedding (AdamW)
    scalar_wd: float = 0.0  # ... of the control tensors (AdamW)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0  # 0 means no clipping
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights; 0 means off
    # evaluation
    val_loss_every: int = 1000  # 0 means only at the end
    val_max_docs: int = 0  # 0 means every validation document (periodic and final evaluation)
    eval_modes: str = "flat,strided"  # final evaluation; the last one named is the run's headline figure
    eval_window: int = 0  # 0 means TRAIN_SEQ_LEN
    eval_stride: int = 0  # 0 means EVAL_WINDOW // 2
    eval_batch_tokens: int = 65_536  # tokens per evaluation forward pass on each process
    # logging and checkpoints
    train_log_every: int = 200
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps; 0 means none
    resume: str = ""  # path of a resumable checkpoint to continue from
    # the size-limited artifact (track_10min_16mb): none | a codec of kernels/artifact.py (int8_zlib, int6_lzma,
    # int6_gptq_lzma, sdclip[_gptq][_lqer][_grouped]) | auto: the first of ARTIFACT_CANDIDATES whose total fits
    artifact: str = "none"
    artifact_limit_bytes: int = 16_000_000  # code bytes + compressed model bytes; a larger artifact fails the run
    artifact_calibration_batches: int = 8  # the *gptq* codecs: training micro-batches per process that calibrate GPTQ
    artifact_code: str = "raw"  # code bytes: raw (the payload's files) | bundle (their self-extracting RUN_ID.pyz)
    artifact_small_numel: int = SMALL_TENSOR_NUMEL  # sdclip codecs: float tensors of at most this many values: float16
    # ARTIFACT=auto: codecs tried in order (least lossy first); the first whose total is at most the limit less the
    # margin is kept, else the last one (and the run fails if that one is over the limit)
    artifact_candidates: str = "int8_zlib,int6_gptq_lzma,sdclip_gptq_lqer_grouped"
    artifact_margin_bytes: int = 100_000
    # speed
    compile: bool = True
    fused: str = "0"  # 0 (plain torch) | 1 (every Triton kernel) | comma-separated kernel names (kernels/__init__.py)
    attn_backend: str = "auto"  # auto | fa3 | fa2 | torch_varlen | masked_sdpa | reference
    train_max_segments: int = 0  # segments per training micro-batch (one compiled shape); 0: max(64, tokens // 64)

    @classmethod
    def from_env(cls, environ=os.environ) -> Hyperparameters:
        """Every field from its environment variable where one is set, validated, with every default that depends on
        other fields filled in (so a caller never sees an unresolved 0 or empty value)."""
        values = {}
        for name, raw in cls.env_overrides(environ).items():
            kind = type(cls.__dataclass_fields__[name.lower()].default)
            try:
                values[name.lower()] = parse_env_value(raw.strip(), kind)
            except ValueError:
                raise ConfigError(f"{name}={raw.strip()!r}: expected {kind.__name__}") from None
        if values.get("preset"):
            values = {**preset_values(values["preset"], values.get("num_layers", 0)), **values}
        hp = cls(**values)
        hp.validate()
        hp.resolve_defaults()
        return hp

    @classmethod
    def env_overrides(cls, environ=os.environ) -> dict[str, str]:
        """The environment variables a run reads, as set: {NAME: raw value}. Logged as the `env_overrides:` line, from
        which a record's command is rebuilt."""
        return {f.name.upper(): environ[f.name.upper()] for f in dataclasses.fields(cls) if f.name.upper() in environ}

    def validate(self) -> None:
        def need(condition: bool, name: str, problem: str) -> None:
            if not condition:
                raise ConfigError(f"{name.upper()}={getattr(self, name)!r}: {problem}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "train_seq_len",
                     "train_batch_tokens", "train_micro_batches", "muon_backend_steps", "eval_batch_tokens",
                     "train_log_every", "gist_segment"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("iterations", "warmup_steps", "lr_warmup_steps", "warmdown_iters", "val_loss_every",
                     "val_max_docs", "eval_window", "eval_stride", "checkpoint_every", "muon_momentum_warmup_steps",
                     "train_max_segments", "gist_tokens"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("tied_embed_lr", "matrix_lr", "scalar_lr", "adam_eps", "rope_base", "tied_embed_init_std"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("max_wallclock_seconds", "grad_clip_norm", "logit_softcap"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2", "ema_decay"):
            need(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        need(self.vocab_size <= 65536, "vocab_size", "shards hold uint16 tokens, so at most 65536")
        need(self.mlp_act in MLP_ACTIVATIONS, "mlp_act", f"must be one of {', '.join(MLP_ACTIVATIONS)}")
        need(self.warmdown_shape in WARMDOWN_SHAPES, "warmdown_shape", f"must be one of {', '.join(WARMDOWN_SHAPES)}")
        need(self.artifact in ("none", "auto") + ARTIFACT_CODECS, "artifact",
             f"must be none, auto or one of {', '.join(ARTIFACT_CODECS)}")
        candidates = self.artifact_candidates.split(",")
        need(len(candidates) == len(set(candidates)) and all(c in ARTIFACT_CODECS for c in candidates),
             "artifact_candidates", f"must be distinct codecs, comma-separated, of {', '.join(ARTIFACT_CODECS)}")
        need(self.artifact_code in ("raw", "bundle"), "artifact_code", "must be raw or bundle")
        need(self.artifact_limit_bytes > 0, "artifact_limit_bytes", "must be a positive integer")
        need(self.artifact_small_numel >= 0, "artifact_small_numel", "must be >= 0")
        need(self.artifact_margin_bytes >= 0 and (self.artifact != "auto" or self.artifact_margin_bytes <
                                                  self.artifact_limit_bytes), "artifact_margin_bytes",
             "must be >= 0, and with ARTIFACT=auto less than ARTIFACT_LIMIT_BYTES")
        need(self.artifact_calibration_batches > 0, "artifact_calibration_batches", "must be a positive integer")
        head_dim = self.model_dim // self.num_heads
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, "rope_dims",
             f"must be an even number in [0, {head_dim}] (the head dimension; 0 means all)")
        need(self.model_dim % self.num_heads == 0, "model_dim", f"must be divisible by NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, "model_dim", "head dimension must be even for rotary")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide NUM_HEADS={self.num_heads}")
        need(self.train_batch_tokens % self.train_micro_batches == 0, "train_batch_tokens",
             f"must be divisible by TRAIN_MICRO_BATCHES={self.train_micro_batches}")
        need(all(m in ("flat", "strided") for m in self.eval_modes.split(",")), "eval_modes",
             "must be a comma-separated list of flat, strided")
        window = self.eval_window or self.train_seq_len
        need(self.eval_stride <= window, "eval_stride", f"must be <= the evaluation window {window}")
        need(self.attn_backend in ("auto",) + VARLEN_BACKENDS, "attn_backend",
             f"must be auto or one of {', '.join(VARLEN_BACKENDS)}")
        try:
            parse_fused_ops(self.fused)
        except ValueError as e:
            raise ConfigError(f"FUSED={self.fused!r}: {e}") from None
        layer_sets = {}
        for name in ("xsa_layers", "recur_layers"):
            try:
                layer_sets[name] = parse_layer_set(getattr(self, name), self.num_layers)
            except ValueError as e:
                need(False, name, f"{e} (NUM_LAYERS={self.num_layers})")
        recurring = layer_sets["recur_layers"]
        need(not recurring or recurring == tuple(range(recurring[0], recurring[-1] + 1)), "recur_layers",
             "must be one range of consecutive layers, e.g. 3-5")
        need(self.recur_loops > 0, "recur_loops", "must be a positive integer")
        need(0 <= self.parallel_start_layer < self.num_layers, "parallel_start_layer",
             f"must be in 0..{self.num_layers - 1} (0: off)")
        need(self.muon_ns in NS_SCHEDULES, "muon_ns", f"must be one of {', '.join(NS_SCHEDULES)}")
        for name in ("warmdown_frac", "min_lr", "recur_start_frac"):
            need(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        for name in ("muon_wd", "embed_wd", "scalar_wd", "sparse_attn_gate_scale"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("smear_gate", "recur_layers"):
            need(self.gist_tokens == 0 or not getattr(self, name), name,
                 "cannot be combined with GIST_TOKENS > 0 (gist slots have no previous token to smear, and their "
                 "cache holds one entry per layer)")
        need(self.gist_tokens == 0 or self.attn_backend in ("auto", "reference"), "attn_backend",
             "cannot express the gist attention mask (GIST_TOKENS > 0); use auto (flex_attention on CUDA, the "
             "dense-mask reference on CPUs) or reference")
        need(self.gist_tokens == 0 or self.gist_segment < self.train_seq_len, "gist_segment",
             f"must be shorter than TRAIN_SEQ_LEN={self.train_seq_len}: slots go between the segments of a piece of at "
             f"most TRAIN_SEQ_LEN tokens, so with one segment per piece no gist slot would ever be trained")

    def resolve_defaults(self) -> None:
        if not self.tokenizer_path:
            self.tokenizer_path = os.path.join(self.data_path, "tokenizer.model")
        if not self.run_id:  # the random suffix keeps two runs started in the same second apart
            self.run_id = f"{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"
        if not self.eval_window:
            self.eval_window = self.train_seq_len
        if not self.eval_stride:
            self.eval_stride = EvalSpec(mode="strided", window=self.eval_window).stride

    def eval_spec(self, mode: str, window: int = 0) -> EvalSpec:
        """The evaluation this run's settings describe, in `mode` (window 0: EVAL_WINDOW)."""
        window = window or self.eval_window
        return EvalSpec(mode=mode, window=window, stride=min(self.eval_stride, window),
                        batch_tokens=self.eval_batch_tokens)


# The configurations of known records, as their logs print them. Their layer indices are for the record's depth; with
# another NUM_LAYERS L each index i becomes round(i * L / depth) (lanes start at layer 1 at the earliest), so the same
# stack runs at any size. A variable set explicitly wins over the preset.
PRESETS = {
    # parameter-golf PR #1855 (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack, 1.0611 BPB, 8 x H100)
    "pg1855": dict(
        vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4, mlp_act="leaky_relu2",
        logit_softcap=30.0, rope_base=10000.0, rope_dims=16, qk_gain_init=5.0, tied_embed_init_std=0.005,
        xsa_layers="all", smear_gate=True, sparse_attn_gate=True, sparse_attn_gate_scale=0.5, ln_scale=True,
        skip_gates=True, parallel_start_layer=8, recur_layers="3-5", recur_loops=2, orthogonal_init=True,
        train_seq_len=2048, train_batch_tokens=786_432, train_micro_batches=8, iterations=20_000, warmup_steps=20,
        lr_warmup_steps=0, warmdown_frac=0.85, min_lr=0.1, recur_start_frac=0.35, max_wallclock_seconds=600.0,
        tied_embed_lr=0.03, matrix_lr=0.026, scalar_lr=0.02, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
        muon_momentum_warmup_steps=1500, muon_backend_steps=5, muon_ns="polar_express", muon_row_norm=True,
        muon_wd=0.095, embed_wd=0.085, scalar_wd=0.02, beta1=0.9, beta2=0.99, adam_eps=1e-8, grad_clip_norm=0.3,
        ema_decay=0.9965, val_loss_every=0, train_log_every=500,
    ),
}


def preset_values(name: str, num_layers: int = 0) -> dict:
    """PRESET's hyperparameters, its layer-indexed settings scaled to num_layers (0: the preset's own depth)."""
    if name not in PRESETS:
        raise ConfigError(f"PRESET={name!r}: unknown; known: {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    depth, layers = values["num_layers"], num_layers or values["num_layers"]
    if layers != depth:
        values["xsa_layers"] = scale_layer_set(values["xsa_layers"], depth, layers)
        values["recur_layers"] = scale_layer_set(values["recur_layers"], depth, layers)
        start = values["parallel_start_layer"]
        values["parallel_start_layer"] = min(max(1, scaled_layer(start, depth, layers)), layers - 1) if start else 0
    return values


def scaled_layer(index: int, depth: int, layers: int) -> int:
    """Layer `index` of a depth-`depth` model in a `layers`-deep one: round(index * layers / depth), at most the
    last."""
    return min(round(index * layers / depth), layers - 1)


def scale_layer_set(spec: str, depth: int, layers: int) -> str:
    """A layer set of a depth-`depth` model with each index scaled (scaled_layer)."""
    if spec in ("", "all"):
        return spec
    return ",".join("-".join(str(scaled_layer(int(i), depth, layers)) for i in part.split("-"))
                    for part in spec.split(","))


def parse_layer_set(spec: str, num_layers: int) -> tuple[int, ...]:
    """"" -> (), "all" -> every layer, "0,3-5" -> (0, 3, 4, 5). ValueError names what is wrong."""
    if spec.strip() in ("", "none"):
        return ()
    if spec.strip() == "all":
        return tuple(range(num_layers))
    layers = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a layer index or a range a-b")
        first, last = int(first), int(last or first)
        if not first <= last < num_layers:
            raise ValueError(f"{part.strip()!r} is not a range of layers in 0..{num_layers - 1}")
        layers.extend(range(first, last + 1))
    return tuple(sorted(set(layers)))


def parse_env_value(raw: str, kind: type):
    if kind is bool:
        return parse_flag(raw)
    if kind is int:
        return int(raw.replace("_", ""))
    if kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    return raw


def parse_fused_ops(spec: str) -> frozenset[str]:
    """FUSED=0: plain torch everywhere; 1: every Triton kernel; or a comma-separated list of kernel names. ValueError
    names an unknown kernel."""
    spec = spec.strip().lower()
    if spec in ("0", "", "none", "off", "false"):
        return frozenset()
    if spec in ("1", "all", "on", "true"):
        return frozenset(kernels.OPS)
    names = frozenset(s.strip() for s in spec.split(",") if s.strip())
    unknown = sorted(names - set(kernels.OPS))
    if unknown:
        raise ValueError(f"unknown kernel {unknown[0]!r}; known: {', '.join(sorted(kernels.OPS))} (or 0, 1)")
    return names


# ----------------------------------------------------------------------------------------------------------------------
# 2. Distributed setup
#
# is_distributed, sum_over_processes and synchronize come from eval_ttt.py, which spreads evaluation over the same
# processes.


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistributedEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train_gpt.py` is one process."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # processes on one machine share its cores; oversubscribed OpenMP threads spin and slow everything ~10x
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistributedEnv(rank, world_size, device)


def rank0_string(value: str) -> str:
    """Rank 0's value of a string, on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def slowest_rank_ms(own_ms: float, device: torch.device) -> float:
    """The largest of every rank's clock reading: the training time all ranks report (ranks start their clocks at
    different moments, and the run is as long as its slowest rank)."""
    clock = torch.tensor([own_ms], device=device, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)
    return float(clock.item())


# ----------------------------------------------------------------------------------------------------------------------
# 3. Data
#
# data/loader.py: the shard reader, the document stream, the shuffled varlen DocumentLoader (with a prefetching
# thread), the validation set and bytes per token. Here only the copy of a micro-batch to the device.


def to_device(batch: MicroBatch, device: torch.device):
    def move(array):  # tensors from PrefetchingLoader are already pinned on CUDA: the copy is asynchronous
        tensor = torch.as_tensor(array)
        return tensor.to(device, non_blocking=tensor.is_pinned())

    return move(batch.inputs)[None], move(batch.targets)[None], move(batch.cu_seqlens)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Model
#
# Input is either a batch of rows [B, T] (each row one causal sequence starting at position 0), or one packed row
# [1, N] with `cu_seqlens`: segment i is tokens cu_seqlens[i]:cu_seqlens[i+1]; a token attends only inside its segment
# and positions restart at 0 in each segment. Every fused kernel has its plain-torch twin right here (FUSED=0); the
# attention backends and their references are in kernels/attention.py.


@dataclass(frozen=True)
class Kernels:
    """How the model computes what has a fast path, chosen once and held by the model: the fused Triton ops (FUSED),
    the attention of training and of evaluation (ATTN_BACKEND; they differ where a backend is only fast compiled), and
    the autocast dtype of its matmuls (bf16 on GPUs; None: fp32, as on CPUs). The default is plain fp32 torch."""

    fused: frozenset = frozenset()
    attention: object = REFERENCE_VARLEN  # a kernels.attention.VarlenAttention, or a gist attention for gist models
    eval_attention: object = REFERENCE_VARLEN
    autocast: torch.dtype | None = None


def choose_kernels(fused: frozenset, attn_backend: str, device, compiling: bool = False, gist: bool = False) -> Kernels:
    """FUSED and ATTN_BACKEND resolved for this device. masked_sdpa trains compiled, but eager evaluation batches run
    the segment loop (reference) faster than its N x N mask; a gist model needs a gist attention."""
    device = torch.device(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    if gist:
        attention = select_gist_attention(attn_backend, device, compiling)
        return Kernels(fused, attention, attention, autocast)
    attention = select_varlen_attention(attn_backend, device, compiling)
    eval_attention = REFERENCE_VARLEN if attention.name == "masked_sdpa" else attention
    return Kernels(fused, attention, eval_attention, autocast)


def attention_line(model_kernels: Kernels, gist: bool) -> str:
    """The log's `attention_backend:` line: what training runs, and what evaluation runs where that differs."""
    prefix = "gist_" if gist else ""
    line = f"attention_backend: {prefix}{model_kernels.attention.name}"
    if model_kernels.eval_attention is not model_kernels.attention:
        line += f" evaluation:{prefix}{model_kernels.eval_attention.name}"
    return line


def rms_norm(x: torch.Tensor, fused: frozenset) -> torch.Tensor:
    if "rms_norm" in fused:
        return kernels.fused_rms_norm(x)
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension; x [..., T, H, D], cos/sin [..., T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def norm_and_rotate_qk(q, k, cos, sin, fused: frozenset):
    """RMSNorm over the head dimension, then rotary, for queries and keys."""
    if "rotary_qk" in fused:
        B, T = q.shape[:2]
        q, k = kernels.fused_rotary_qk(q.flatten(0, 1), k.flatten(0, 1), cos.flatten(0, 1).to(q.dtype),
                                 sin.flatten(0, 1).to(q.dtype))
        return q.unflatten(0, (B, T)), k.unflatten(0, (B, T))
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # keep bf16 activations bf16 (flash attention needs one dtype)
    return apply_rotary(rms_norm(q, fused), cos, sin), apply_rotary(rms_norm(k, fused), cos, sin)


class Rotary(nn.Module):
    """Angles for apply_rotary, which rotates dimension pair (i, i + D/2) by position x inv_freq[i]. Partial rotary
    (rope_dims r < D): the first r/2 pairs get the frequencies of an r-dimensional rotary, the others frequency 0, so
    cos 1 and sin 0 leave them unrotated: position-free dimensions, through the same (fused or not) rotation code."""

    def __init__(self, head_dim: int, base: float, rope_dims: int = 0):
        super().__init__()
        self.head_dim, self.base, self.rope_dims = head_dim, base, rope_dims or head_dim
        self.register_buffer("inv_freq", self._inv_freq(1.0), persistent=False)

    def _inv_freq(self, ntk_alpha: float) -> torch.Tensor:
        # NTK-aware scaling stretches the longest wavelengths most, so windows longer than training stay in range;
        # alpha 1 is the plain base.
        dims = self.rope_dims
        base = self.base * ntk_alpha ** (dims / (dims - 2)) if dims > 2 else self.base
        rotated = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
        return torch.cat((rotated, torch.zeros((self.head_dim - dims) // 2)))

    def set_ntk_alpha(self, alpha: float) -> None:
        self.inv_freq = self._inv_freq(alpha).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor):
        angles = positions.unsqueeze(-1).float() * self.inv_freq
        return angles.cos(), angles.sin()


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in; our Triton kernels are not autocast-aware, so callers cast for them."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; the matmul runs in the activations' dtype (bf16 under autocast)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # output projections start at zero, so every block starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


GATE_WINDOW = 12  # the input channels the frontier's small gates read (SmearGate, the sparse attention gate)


def exclude_own_value(y, v):
    """XSA: each head's output y [B, T, Hq, D] minus its component along the token's own value v [B, T, Hkv, D]
    (each value shared by its group of Hq / Hkv query heads), so attention adds only what the token does not carry."""
    B, T, Hkv, D = v.shape
    y = y.view(B, T, Hkv, -1, D)
    unit = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y - (y * unit).sum(-1, keepdim=True) * unit).view(B, T, -1, D)


def keep_heads(y, _):
    return y


class SparseOutputGate(nn.Module):
    """Per head, y_h *= sigmoid(scale * W_h . x[:12]) with x the attention's input; W starts at zero (gate 0.5)."""

    def __init__(self, num_heads: int, scale: float):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros(num_heads, GATE_WINDOW))

    def forward(self, y, x):
        gate = torch.sigmoid(self.scale * F.linear(x[..., :GATE_WINDOW], self.weight.to(x.dtype)))  # [B, T, H]
        return y * gate.unsqueeze(-1).to(y.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, fused: frozenset, layer: int = 0):
        super().__init__()
        self.fused = fused
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.model_dim // config.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(config.model_dim, config.model_dim)
        self.c_k = CastedLinear(config.model_dim, kv_dim)
        self.c_v = CastedLinear(config.model_dim, kv_dim)
        self.proj = CastedLinear(config.model_dim, config.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init))  # sharpness per head
        xsa = layer in parse_layer_set(config.xsa_layers, config.num_layers)
        self.value_exclusion = exclude_own_value if xsa else keep_heads
        self.output_gate = (SparseOutputGate(config.num_heads, config.sparse_attn_gate_scale)
                            if config.sparse_attn_gate else keep_heads)

    def forward(self, x, cos, sin, attend):
        """attend: the attention function (q, k, v) -> y that GPT chose for this input (see GPT.attention_for)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = norm_and_rotate_qk(q, k, cos, sin, self.fused)
        # Flash attention takes q, k, v in one dtype. Under CUDA bf16 autocast, torch >= 2.12 runs rms_norm in fp32
        # while the projections run in bf16, so q and k come back fp32: bring them to v's (the matmul) dtype.
        q = (q * self.q_gain.to(q.dtype)[:, None]).to(v.dtype)
        y = self.value_exclusion(attend(q, k.to(v.dtype), v), v)
        return self.proj(self.output_gate(y, x).reshape(B, T, -1))


MLP_ACTIVATIONS = ("relu2", "leaky_relu2")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: frozenset):
        super().__init__()
        self.fused = fused
        hidden = config.mlp_mult * config.model_dim
        self.fc = CastedLinear(config.model_dim, hidden)
        self.proj = CastedLinear(hidden, config.model_dim, zero_init=True)
        self.act = config.mlp_act

    def forward(self, x):
        if self.act == "leaky_relu2":  # no fused kernel: it is written for relu^2
            h = F.leaky_relu(self.fc(x), 0.5).square()
        elif "relu2_linear" in self.fused:
            dtype = matmul_dtype(x)
            h = kernels.fused_relu2_linear(x.to(dtype), self.fc.weight.to(dtype))
        else:
            h = F.relu(self.fc(x)).square()
        return self.proj(h)


class Block(nn.Module):
    parallel = False

    def __init__(self, config: ModelConfig, fused: frozenset, layer: int = 0):
        super().__init__()
        self.fused = fused
        self.attn = CausalSelfAttention(config, fused, layer)
        self.mlp = MLP(config, fused)
        self.attn_scale = nn.Parameter(torch.ones(config.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(config.model_dim))
        # each block reads a learned mix of the residual stream and the initial embedding
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(config.model_dim), torch.zeros(config.model_dim))))
        self.norm_scale = 1 / math.sqrt(layer + 1) if config.ln_scale else 1.0  # LN scale: deeper layers read less

    def norm(self, x):
        x = rms_norm(x, self.fused)
        return x * self.norm_scale if self.norm_scale != 1.0 else x

    def forward(self, x, x0, cos, sin, attend):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), cos, sin, attend)
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))
        return x


class ParallelBlock(Block):
    """Parallel residual lanes: attention reads lane 0 (mixed with x0), the MLP reads lane 1, side by side; each lane
    keeps its residual times a learned gain (1.1 at start) and receives both outputs through a learned 2 x 2 mix
    (post[i, j]: sublayer i (attention, MLP) into lane j; ones at start)."""

    parallel = True

    def __init__(self, config: ModelConfig, fused: frozenset, layer: int = 0):
        super().__init__(config, fused, layer)
        self.lane_gain = nn.Parameter(torch.full((2,), 1.1))
        self.lane_post = nn.Parameter(torch.ones(2, 2))

    def forward(self, lane0, lane1, x0, cos, sin, attend):
        mix = self.resid_mix.to(lane0.dtype)
        a = self.attn_scale.to(lane0.dtype) * self.attn(self.norm(mix[0] * lane0 + mix[1] * x0), cos, sin, attend)
        m = self.mlp_scale.to(lane1.dtype) * self.mlp(self.norm(lane1))
        gain, post = self.lane_gain.to(lane0.dtype), self.lane_post.to(lane0.dtype)
        return (gain[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                gain[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


class SmearGate(nn.Module):
    """x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1} on the token embeddings, except at the first token of every
    segment (a document start, or a piece's: the previous token belongs to another document). lambda, w start at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(GATE_WINDOW))
        self.strength = nn.Parameter(torch.zeros(1))

    def forward(self, x, positions):
        gate = self.strength.to(x.dtype) * torch.sigmoid(x[..., :GATE_WINDOW] @ self.weight.to(x.dtype))  # [B, T]
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        return x + (gate * (positions > 0)).unsqueeze(-1) * previous


def keep_embedding(x, _):
    return x


def layer_orders(config: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The physical layer of each virtual layer, without and with depth recurrence: RECUR_LAYERS a-b runs
    1 + RECUR_LOOPS times in a row (11 layers, 3-5, 2 loops: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10)."""
    plain = tuple(range(config.num_layers))
    recurring = parse_layer_set(config.recur_layers, config.num_layers)
    if not recurring:
        return plain, plain
    first, last = recurring[0], recurring[-1]
    return plain, plain[:first] + recurring * (1 + config.recur_loops) + plain[last + 1:]


class GPT(nn.Module):
    fixed_shapes = False  # its attention takes any batch length (evaluation needs no padding)

    def __init__(self, config: ModelConfig, model_kernels: Kernels = Kernels()):
        super().__init__()
        self.config, self.kernels = config, model_kernels
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=config.tied_embed_init_std)
        self.rotary = Rotary(config.model_dim // config.num_heads, config.rope_base, config.rope_dims)
        self.smear = SmearGate() if config.smear_gate else keep_embedding
        lanes_from = config.parallel_start_layer or config.num_layers
        self.blocks = nn.ModuleList((ParallelBlock if i >= lanes_from else Block)(config, model_kernels.fused, i)
                                    for i in range(config.num_layers))
        # Depth recurrence: the blocks run in plain_order, or, once `looping` is on, in loop_order (layers repeated;
        # the final model and its evaluations loop). The training loop switches it on at RECUR_START_FRAC.
        self.plain_order, self.loop_order = layer_orders(config)
        self.looping = True
        # U-Net: the first half of the virtual layers (encoder) hands its outputs, last first, to the second half
        self.num_skips = min(len(self.loop_order) // 2, len(self.loop_order) - len(self.loop_order) // 2)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, config.model_dim))
        # skip gates: the decoder's stream x and the weighted skip mixed as lerp(skip, x, sigmoid(g)), 0.5 at start
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, config.model_dim)) if config.skip_gates else None
        if config.orthogonal_init:
            for block in self.blocks:
                for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(linear.weight)

    def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen=0, head_correction=None):
        """The per-token losses [B, T] in nats (fp32), 0 where the target is IGNORE_INDEX. head_correction(x, index):
        added to the head's logits of the scored positions (x [n, D] their hidden states, index [n] their flat
        positions), as test-time training's head adapters are."""
        with self.precision():
            return self.losses(self.hidden_states(input_ids, cu_seqlens, max_seqlen), target_ids, head_correction)

    def precision(self):
        """The autocast context of this model's matmuls (Kernels.autocast)."""
        if self.kernels.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.tok_emb.weight.device.type, dtype=self.kernels.autocast)

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=0):
        """The final hidden states [B, T, D] (normed), before the head."""
        positions = self.positions(input_ids, cu_seqlens)
        cos, sin = self.rotary(positions)
        embedded = self.smear(self.tok_emb(input_ids), positions)
        return self.run_blocks(embedded, cos, sin, self.attention_for(cu_seqlens, max_seqlen))

    def positions(self, input_ids, cu_seqlens):
        B, T = input_ids.shape
        if cu_seqlens is None:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        index = torch.arange(T, device=input_ids.device)
        return (index - cu_seqlens.to(torch.int64)[segment_ids(cu_seqlens, T)]).unsqueeze(0)

    def attention_for(self, cu_seqlens, max_seqlen):
        """The causal attention function the blocks call for this input: q [B, T, Hq, D], k/v [B, T, Hkv, D] ->
        [B, T, Hq, D]; rows of plain causal SDPA, or the varlen backend over one packed row."""
        if cu_seqlens is None:
            return lambda q, k, v: sdpa_causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        attention = self.kernels.attention if self.training else self.kernels.eval_attention
        return lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens, max_seqlen).unsqueeze(0)

    def run_blocks(self, embedded, cos, sin, attend):
        fused = self.kernels.fused
        x = x0 = rms_norm(embedded, fused)
        order = self.loop_order if self.looping else self.plain_order
        encoder_layers = len(order) // 2
        skips, lane1 = [], None
        for j, i in enumerate(order):
            block = self.blocks[i]
            if block.parallel and lane1 is None:
                lane1 = x  # the lanes start equal; the skips go into lane 0 (x) only
            if j >= encoder_layers and skips:
                x = self.merge_skip(x, skips.pop(), j - encoder_layers)
            if block.parallel:
                x, lane1 = block(x, lane1, x0, cos, sin, attend)
            else:
                x = block(x, x0, cos, sin, attend)
            if j < encoder_layers:
                skips.append(x)
        if lane1 is not None:
            x = 0.5 * (x + lane1)
        return rms_norm(x, fused)

    def merge_skip(self, x, skip, index):
        skip = self.skip_weights[index].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[index]).to(x.dtype))

    def losses(self, x, target_ids, head_correction=None):
        """Per-token losses [B, T] of hidden states x [B, T, D]. Training scores every position; evaluation windows
        carry context positions whose targets are ignored (half of a strided window, most of a TTT window), so there
        the lm_head, the largest matmul of a small model, runs only where a target is scored."""
        flat_x, flat_targets = x.flatten(0, 1), target_ids.flatten()
        if self.training and head_correction is None:
            return self.token_losses(flat_x, flat_targets).view_as(target_ids)
        scored = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        x_scored, targets = flat_x[scored], flat_targets[scored]
        if head_correction is None:
            scored_losses = self.token_losses(x_scored, targets)
        else:
            scored_losses = self.softcap_losses(self.head(x_scored) + head_correction(x_scored, scored), targets)
        losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=x.device)
        losses[scored] = scored_losses
        return losses.view_as(target_ids)

    def head(self, x):
        """The tied lm_head's raw logits, before the softcap."""
        return F.linear(x, self.tok_emb.weight.to(x.dtype))

    def token_losses(self, x, targets):
        """Per-token softcapped cross-entropy of the tied lm_head, x [N, D] -> [N] (fp32 nats)."""
        if "linear_softcap_cross_entropy" in self.kernels.fused:
            # the fp32 tied weight itself: the kernel casts it for its matmuls and accumulates its gradient in fp32
            return kernels.fused_linear_softcap_cross_entropy(x.to(matmul_dtype(x)), self.tok_emb.weight, targets,
                                                              self.config.logit_softcap)
        return self.softcap_losses(self.head(x), targets)

    def softcap_losses(self, raw_logits, targets):
        """Per-token cross-entropy of softcapped logits, raw_logits [N, V] -> [N] (fp32 nats)."""
        cap = self.config.logit_softcap
        if "softcap_cross_entropy" in self.kernels.fused:
            return kernels.fused_softcap_cross_entropy(raw_logits, targets, cap)
        capped = cap * torch.tanh(raw_logits.float() / cap) if cap > 0 else raw_logits.float()
        return F.cross_entropy(capped, targets, ignore_index=IGNORE_INDEX, reduction="none")

    def adaptable_linears(self) -> dict[str, nn.Linear]:
        """The projections test-time training may adapt, by public name: blocks.{i}.attn.{q,k,v,o}, blocks.{i}.mlp.
        {fc,proj}. (The tied head is tok_emb.)"""
        layers = {}
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            for name, layer in (("attn.q", attn.c_q), ("attn.k", attn.c_k), ("attn.v", attn.c_v),
                                ("attn.o", attn.proj), ("mlp.fc", mlp.fc), ("mlp.proj", mlp.proj)):
                layers[f"blocks.{i}.{name}"] = layer
        return layers

    def set_rope_ntk_alpha(self, alpha: float) -> None:
        """NTK-aware rotary scaling for windows longer than training (1: off)."""
        self.rotary.set_ntk_alpha(alpha)


def build_model(config: ModelConfig, model_kernels: Kernels = Kernels()) -> GPT:
    """The model of this config: GPT, or GPT with gist tokens (gist.py, imported only then)."""
    if config.gist_tokens:
        import gist

        return gist.with_gist_tokens(GPT)(config, model_kernels)
    return GPT(config, model_kernels)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Optimizers


def orthogonalize_batched(G: torch.Tensor, steps: int, eps: float = 1e-7,
                          schedule: tuple = (NS_COEFFICIENTS,)) -> torch.Tensor:
    """Newton-Schulz quintic iteration (Muon) on a stack of same-shape matrices G [k, m, n] at once: for each, an
    approximately orthogonal matrix with its singular vectors. A few batched matmuls per step instead of a few per
    matrix; tests hold it to kernels/newton_schulz.py's reference, one matrix at a time (the fused Triton kernel, FUSED
    newton_schulz, is that reference's twin). bf16 on GPUs, as Muon. schedule: the (a, b, c) of each iteration."""
    X = G.to(torch.bfloat16 if G.is_cuda else G.dtype)
    X = X / (X.norm(dim=(1, 2), keepdim=True) + eps)
    transposed = X.size(1) > X.size(2)
    if transposed:
        X = X.mT
    for step in range(steps):
        a, b, c = coefficients_at(schedule, step)
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised.

    The matrices are grouped by shape. Of each group, rank r orthogonalises matrices r, r + world, ... as one stacked
    batch; one all-reduce of a flat buffer then hands every rank every update (each element is non-zero on exactly
    one rank, so the sum is exact in any dtype). The buffer has the dtype the iteration works in: bf16 on GPUs, where
    the orthogonalised update is bf16 anyway, so fp32 would double the traffic and add nothing; fp32 on CPUs. Momentum
    is kept on every rank (it is cheap), so rank 0's state is the whole state for checkpoints."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 compile_step: bool = False, fused_newton_schulz: bool = False, weight_decay: float = 0.0,
                 row_norm: bool = False, schedule: tuple = (NS_COEFFICIENTS,)):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay))
        self.fused_newton_schulz, self.row_norm, self.schedule = fused_newton_schulz, row_norm, schedule
        # compiled on GPUs: the eager iteration is ~45 small kernel launches a matrix
        self.orthogonalize_batched = (torch.compile(orthogonalize_batched, dynamic=False, fullgraph=True)
                                      if compile_step else orthogonalize_batched)

    @torch.no_grad()
    def step(self):
        distributed = is_distributed()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            directions = torch._foreach_add(grads, buffers, alpha=group["momentum"]) if group["nesterov"] else buffers
            if self.row_norm:
                directions = [row_normalized(d) for d in directions]
            dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            offsets = np.concatenate([[0], np.cumsum([p.numel() for p in params])]).tolist()
            updates = torch.zeros(offsets[-1], device=params[0].device, dtype=dtype)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            for (rows, cols), members in by_shape.items():
                mine = members[rank::world]
                if not mine:
                    continue
                if self.fused_newton_schulz:  # the Triton kernel takes one matrix at a time
                    ortho = [kernels.fused_newton_schulz(directions[i], group["backend_steps"], schedule=self.schedule)
                             for i in mine]
                else:
                    ortho = self.orthogonalize_batched(torch.stack([directions[i] for i in mine]),
                                                       group["backend_steps"], schedule=self.schedule)
                scale = max(1.0, rows / cols) ** 0.5  # the same RMS update for tall matrices
                for i, g in zip(mine, ortho):
                    updates[offsets[i]: offsets[i + 1]] = (g.float() * scale).flatten()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            if group.get("weight_decay"):  # decoupled: p *= 1 - lr * wd, then the update
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [updates[offsets[i]: offsets[i + 1]].view_as(p).to(p.dtype)
                                         for i, p in enumerate(params)], alpha=-group["lr"])


def row_normalized(update: torch.Tensor) -> torch.Tensor:
    """MuonEq-R: every row of the update scaled to unit L2 norm (norms in fp32), so each output unit moves alike."""
    return update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)


def optimizer_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Which optimizer trains each parameter, decided by what the parameter is, not by its number of dimensions:
    Muon orthogonalises the weight matrices of the blocks' linear layers; the embedding tables (tokens, and any an
    experiment adds) and every control tensor (gains, scales, the 2 x width `resid_mix`, skip weights) go to Adam, as
    in parameter-golf."""
    linear_weights = {id(m.weight) for m in model.blocks.modules() if isinstance(m, CastedLinear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"embedding": [], "matrices": [], "scalars": []}
    for name, p in model.named_parameters():
        group = "embedding" if id(p) in embeddings else "matrices" if id(p) in linear_weights else "scalars"
        groups[group].append((name, p))
    return groups


class Optimizers(NamedTuple):
    """The three optimizers of a run, by name; iterating gives them in this order (also the checkpoint's order)."""

    embedding: torch.optim.Adam
    matrices: Muon
    scalars: torch.optim.Adam


def build_optimizers(model: GPT, hp: Hyperparameters) -> Optimizers:
    groups = optimizer_groups(model)
    on_cuda = next(model.parameters()).is_cuda
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=on_cuda)

    def adam_for(group: str, lr: float, weight_decay: float) -> torch.optim.Adam:
        params = [{"params": [p for _, p in groups[group]], "lr": lr, "base_lr": lr}]
        if weight_decay:  # decoupled, as AdamW: p *= 1 - lr * wd
            return torch.optim.AdamW(params, weight_decay=weight_decay, **adam)
        return torch.optim.Adam(params, **adam)

    muon = Muon([p for _, p in groups["matrices"]], lr=hp.matrix_lr, momentum=hp.muon_momentum,
                backend_steps=hp.muon_backend_steps, compile_step=hp.compile and on_cuda,
                fused_newton_schulz="newton_schulz" in model.kernels.fused, weight_decay=hp.muon_wd,
                row_norm=hp.muon_row_norm, schedule=NS_SCHEDULES[hp.muon_ns])
    muon.param_groups[0]["base_lr"] = hp.matrix_lr
    return Optimizers(adam_for("embedding", hp.tied_embed_lr, hp.embed_wd), muon,
                      adam_for("scalars", hp.scalar_lr, hp.scalar_wd))


WARMDOWN_SHAPES = ("linear", "cosine", "sqrt")


def training_progress(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """The fraction of training done: of the iterations, or of the wall-clock cap when that comes first."""
    progress = step / hp.iterations if hp.iterations else 1.0
    if hp.max_wallclock_seconds > 0:
        progress = max(progress, elapsed_ms / (1000 * hp.max_wallclock_seconds))
    return min(progress, 1.0)


def learning_rate_scale(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """Linear warm-up, then constant, then a warm-down to MIN_LR (default 0) over the last WARMDOWN_ITERS steps, or,
    with WARMDOWN_FRAC, over that last fraction of training (training_progress). With a wall-clock cap the
    WARMDOWN_ITERS warm-down starts when the time left, at the measured step time, is WARMDOWN_ITERS steps. The
    warm-down's shape maps the share of it still ahead, f (1 -> 0), to the scale: linear f, cosine (1 - cos(pi f)) / 2
    (above linear in the first half, below in the second), sqrt 1 - sqrt(1 - f) (below linear throughout: it drops
    fastest at the start of the warm-down and flattens near 0)."""
    scale = min(1.0, (step + 1) / hp.lr_warmup_steps) if hp.lr_warmup_steps else 1.0
    if hp.warmdown_frac > 0:
        left = min(1.0, (1.0 - training_progress(step, elapsed_ms, hp)) / hp.warmdown_frac)
    elif hp.warmdown_iters > 0:
        left = min(1.0, max(hp.iterations - step, 0) / hp.warmdown_iters)
        if hp.max_wallclock_seconds > 0 and step > 0:
            step_ms = elapsed_ms / step
            remaining_ms = max(hp.max_wallclock_seconds * 1000 - elapsed_ms, 0.0)
            left = min(left, remaining_ms / (hp.warmdown_iters * step_ms))
    else:
        return scale
    if hp.warmdown_shape == "cosine":
        shaped = 0.5 * (1 - math.cos(math.pi * left))
    elif hp.warmdown_shape == "sqrt":
        shaped = 1 - math.sqrt(1 - left)
    else:
        shaped = left
    return scale * max(shaped, hp.min_lr)


class WeightAverage:
    """EMA_DECAY > 0: an exponential moving average of every parameter (fp32), updated after each optimizer step. The
    final evaluation and checkpoint use it; training itself, and the periodic validation curve, use the raw weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = list(model.parameters())
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, average in zip(self.params, self.average):
            p.copy_(average)

    def state_dict(self) -> list[torch.Tensor]:
        return self.average

    def load_state_dict(self, average: list[torch.Tensor]) -> None:
        for mine, saved in zip(self.average, average, strict=True):
            mine.copy_(saved)


def recurrence_on(step: int, elapsed_ms: float, hp: Hyperparameters) -> bool:
    """Depth recurrence runs from RECUR_START_FRAC of training on (without RECUR_LAYERS nothing repeats: always on)."""
    return not hp.recur_layers or training_progress(step, elapsed_ms, hp) >= hp.recur_start_frac


def set_learning_rates(optimizers, step: int, elapsed_ms: float, hp: Hyperparameters) -> None:
    scale = learning_rate_scale(step, elapsed_ms, hp)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
    if hp.muon_momentum_warmup_steps:
        frac = min(step / hp.muon_momentum_warmup_steps, 1.0)
        momentum = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    else:
        momentum = hp.muon_momentum
    for group in optimizers.matrices.param_groups:
        group["momentum"] = momentum


# ----------------------------------------------------------------------------------------------------------------------
# 6. Training loop


class StopRequested:
    """Remembers a SIGTERM so the loop can finish its step, write a checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class GradientReducer:
    """Sums gradients over ranks while the backward pass still runs. The parameters are cut into buckets of about
    `bucket_mb` MB in reverse order (the order backward produces their gradients). During the last micro-batch's
    backward, a bucket's all-reduce starts, asynchronously, as soon as every gradient in it is final; finish() waits for
    them before the optimizers step. Earlier micro-batches only accumulate locally. One process: nothing to do."""

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0):
        self.enabled = is_distributed() and dist.get_world_size() > 1
        self.buckets: list[list[nn.Parameter]] = []
        self.armed, self.pending, self.in_flight = False, [], []
        if not self.enabled:
            return
        size = 0
        for p in reversed(list(model.parameters())):
            if not self.buckets or size + p.numel() * p.element_size() > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self._gradient_ready)

    def arm(self) -> None:
        """The next backward is the step's last: reduce each bucket as it completes."""
        if self.enabled:
            self.armed, self.pending, self.in_flight = True, [len(b) for b in self.buckets], []

    def _gradient_ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        bucket = self.bucket_of[id(p)]
        self.pending[bucket] -= 1
        if self.pending[bucket] == 0:
            self._start(bucket)

    def _start(self, bucket: int) -> None:
        params = self.buckets[bucket]
        for p in params:  # a parameter no forward used (an empty skip_weights with NUM_LAYERS=1) has no gradient yet
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        self.in_flight.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        if not self.enabled:
            return
        for bucket, left in enumerate(self.pending):
            if left:  # a parameter the forward pass did not use got no gradient this step: reduce its bucket now
                self._start(bucket)
        for bucket, flat, work in self.in_flight:
            work.wait()
            params = self.buckets[bucket]
            torch._foreach_copy_([p.grad for p in params],
                                 [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)])
        self.armed, self.in_flight = False, []


def forward_backward(model_fn, batches: list[MicroBatch], hp: Hyperparameters, device: torch.device,
                     reducer: GradientReducer) -> torch.Tensor:
    """Accumulate this rank's gradients for one step; returns [sum of token losses, number of scored tokens].

    Each micro-batch's loss is divided by the global number of micro-batch tokens, and gradients are summed over
    ranks, so the update is the same for any number of processes."""
    micro_tokens = hp.train_batch_tokens // hp.train_micro_batches
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        inputs, targets, cu_seqlens = to_device(batch, device)
        losses = model_fn(inputs, targets, cu_seqlens, hp.train_seq_len)
        if i == len(batches) - 1:
            reducer.arm()  # gradients become final during this backward: their all-reduce overlaps the rest of it
        (losses.sum() / (micro_tokens * hp.train_micro_batches)).backward()
        totals[0] += losses.detach().sum().double()
        totals[1] += (targets != IGNORE_INDEX).sum()
    return totals


def optimizer_step(model: GPT, optimizers, hp: Hyperparameters, reducer: GradientReducer) -> None:
    reducer.finish()
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=False)


def compile_warmup(model, model_fn, optimizers, reducer, loader, hp, device, log) -> None:
    """Run WARMUP_STEPS real steps so torch.compile and the kernels' autotuning happen before the clock starts, then
    put the weights, the optimizer state and the loader back as they were. With depth recurrence switched on during
    training, WARMUP_STEPS more with the layers looping, so that the switch compiles nothing."""
    if hp.warmup_steps == 0:
        return
    model_state = copy.deepcopy(model.state_dict())
    optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader_state = loader.state_dict()
    looping = model.looping
    graphs = (False, True) if not looping else (True,)
    start = time.perf_counter()
    for graph_looping in graphs:
        model.looping = graph_looping
        for _ in range(hp.warmup_steps):
            forward_backward(model_fn, loader.next_step(), hp, device, reducer)
            optimizer_step(model, optimizers, hp, reducer)
    model.looping = looping
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, optimizer_states):
        opt.load_state_dict(state)
    loader.load_state_dict(loader_state)
    model.zero_grad(set_to_none=False)
    log(f"compile_warmup steps:{hp.warmup_steps * len(graphs)} time:{1000 * (time.perf_counter() - start):.0f}ms "
        f"(not counted)")


@dataclass
class TrainingData:
    tokenizer_sha256: str
    val: ValidationSet
    loader: PrefetchingLoader


def load_data(hp: Hyperparameters, env: DistributedEnv, log) -> TrainingData:
    sp = load_tokenizer(hp.tokenizer_path)
    tokenizer_sha256 = sha256_file(hp.tokenizer_path)
    tables = build_byte_tables(sp, hp.vocab_size, hp.tokenizer_path)
    train_stream = TokenStream(split_pattern(hp.data_path, "train"), hp.vocab_size)
    val = ValidationSet.load(hp.data_path, hp.vocab_size, tables, hp.val_max_docs)
    log(f"tokenizer: {hp.tokenizer_path} sha256:{tokenizer_sha256} pieces:{sp.vocab_size()}")
    log(f"train_data: shards:{len(train_stream.files)} documents:{train_stream.num_docs} tokens:{train_stream.num_tokens}")
    log(f"val_data: documents:{val.num_docs} tokens:{int(val.token_counts.sum())} bytes:{int(val.byte_counts.sum())}")
    loader = DocumentLoader(train_stream, loader_config(hp), env.rank, env.world_size)
    return TrainingData(tokenizer_sha256, val, PrefetchingLoader(loader, pin_memory=env.device.type == "cuda"))


def loader_config(hp: Hyperparameters) -> LoaderConfig:
    return LoaderConfig(seq_len=hp.train_seq_len, batch_tokens=hp.train_batch_tokens,
                        micro_batches=hp.train_micro_batches, seed=hp.seed, shuffle=hp.doc_shuffle,
                        max_segments=hp.train_max_segments)


def resume_run(hp, model, optimizers, loader, tokenizer_sha256, device, log) -> tuple[int, float, list | None]:
    """Load RESUME's weights, optimizer and loader state and RNG states; returns (step, training ms, its EMA)."""
    state = load_checkpoint(hp.resume, device)
    if "optimizers" not in state:
        raise DataError(f"{hp.resume}: not a resumable checkpoint (no optimizer state); use CHECKPOINT_EVERY")
    check_resume_settings(state, hp, tokenizer_sha256)
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    loader.load_state_dict(state["loader"])
    restore_rng_states(state["rng"])
    log(f"resumed_from: {hp.resume} step:{state['step']} train_time:{state['train_time_ms']:.0f}ms")
    return state["step"], state["train_time_ms"], state.get("ema")


def train(hp: Hyperparameters, env: DistributedEnv, model_kernels: Kernels, log) -> int:
    """The whole run: data, model, optimizers, the timed loop, final evaluation and checkpoint. Returns an exit code."""
    device = env.device
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    random.seed(hp.seed)
    data = load_data(hp, env, log)
    loader, val = data.loader, data.val
    model = build_model(ModelConfig.from_hyperparameters(hp), model_kernels).to(device)
    optimizers = build_optimizers(model, hp)
    micro_tokens = hp.train_batch_tokens // hp.train_micro_batches
    log(f"model_params:{sum(p.numel() for p in model.parameters())} world_size:{env.world_size} "
        f"grad_accum:{hp.train_micro_batches // env.world_size} micro_batch_tokens:{micro_tokens}")
    if hp.gist_tokens:
        import gist

        log(f"gist: tokens:{hp.gist_tokens} segment:{hp.gist_segment} attention:{model_kernels.attention.name} "
            f"micro_batch_slots:{gist.laid_out_length(micro_tokens, hp.gist_tokens, hp.gist_segment)} (raw tokens "
            f"plus gist slots)")
    step, train_ms, resumed_average = 0, 0.0, None
    if hp.resume:
        step, train_ms, resumed_average = resume_run(hp, model, optimizers, loader, data.tokenizer_sha256, device, log)

    model.looping = recurrence_on(step, train_ms, hp)
    model_fn = torch.compile(model, dynamic=False, fullgraph=True) if hp.compile else model  # a graph break is an error
    reducer = GradientReducer(model)
    compile_warmup(model, model_fn, optimizers, reducer, loader, hp, device, log)
    graphs_after_warmup = compile_counts()[0] if hp.warmup_steps else None  # without warm-up: after the first step
    weight_average = WeightAverage(model, hp.ema_decay) if hp.ema_decay else None  # after the undone warm-up steps
    if weight_average and resumed_average is not None:
        weight_average.load_state_dict(resumed_average)

    # the *gptq* codecs: the calibration's forward passes, in training steps (a forward costs less than a step)
    calibration_share = (hp.artifact_calibration_batches / (hp.train_micro_batches // env.world_size)
                         if any(map(needs_calibration, artifact_codecs(hp))) else 0.0)
    stop_signal = StopRequested()
    stop_signal.install()
    last_checkpoint = hp.resume or None
    stop_at, first_step, first_ms = hp.iterations, step, train_ms
    elapsed_ms = train_ms  # training time so far, as all ranks agree on it (updated by every step's all-reduce)
    synchronize(device)
    t0 = time.perf_counter()
    while True:
        last_step = step >= stop_at
        if last_step or (hp.val_loss_every and step % hp.val_loss_every == 0 and step > first_step):
            synchronize(device)
            # the clock stops while validating; from here on every rank holds the slowest rank's time
            train_ms = slowest_rank_ms(train_ms + 1000 * (time.perf_counter() - t0), device)
            if last_step:
                break  # the final evaluation below also gives the curve's last point
            log(validation_line(step, hp, evaluate(model, val, hp.eval_spec("flat", hp.train_seq_len)), train_ms))
            synchronize(device)
            t0 = time.perf_counter()

        # The schedule reads the elapsed time that every rank agreed on at the end of the last step, never a rank's own
        # clock: ranks start their clocks at different moments, and copies that take different learning rates drift.
        if not model.looping and recurrence_on(step, elapsed_ms, hp):
            model.looping = True
            log(f"recurrence: on at step:{step} progress:{training_progress(step, elapsed_ms, hp):.3f} "
                f"layers:{' '.join(map(str, model.loop_order))}")
        set_learning_rates(optimizers, step, elapsed_ms, hp)
        totals = forward_backward(model_fn, loader.next_step(), hp, device, reducer)
        optimizer_step(model, optimizers, hp, reducer)
        if weight_average:
            weight_average.update()
        step += 1
        if graphs_after_warmup is None:
            graphs_after_warmup = compile_counts()[0]

        # One small all-reduce per step (the step's only host sync) carries the loss, SIGTERM, and each rank's clock in
        # its own slot; the slowest clock is the elapsed time of all.
        clocks = torch.zeros(env.world_size, device=device, dtype=torch.float64)
        clocks[env.rank] = train_ms + 1000 * (time.perf_counter() - t0)
        sigterm = torch.tensor([float(stop_signal.requested)], device=device, dtype=torch.float64)
        reduced = sum_over_processes(torch.cat([totals, sigterm, clocks])).tolist()
        (loss_sum, loss_count, sigterm), elapsed_ms = reduced[:3], max(reduced[3:])
        # GPTQ's calibration runs after the last step and counts as training time: stop early enough to fit it
        reserve_ms = calibration_share * (elapsed_ms - first_ms) / max(step - first_step, 1)
        time_up = hp.max_wallclock_seconds > 0 and elapsed_ms + reserve_ms >= 1000 * hp.max_wallclock_seconds
        train_loss = loss_sum / max(loss_count, 1)
        if not math.isfinite(train_loss):
            log(f"error: step {step}: train loss is {train_loss}; stopping. Last good checkpoint: {last_checkpoint}")
            return 1
        if step % hp.train_log_every == 0 or step <= 10:
            tokens_per_s = (step - first_step) * hp.train_batch_tokens / max((elapsed_ms - first_ms) / 1000, 1e-9)
            log(f"step:{step}/{hp.iterations} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms tokens_per_s:{tokens_per_s:.0f}")
        if (hp.checkpoint_every and step % hp.checkpoint_every == 0) or sigterm:
            last_checkpoint = save_resumable_checkpoint(model, optimizers, loader, step, elapsed_ms, hp,
                                                        data.tokenizer_sha256, env, weight_average)
            log(f"checkpoint: {last_checkpoint} (resumable, step {step})")
        if sigterm:
            log(f"stopped by SIGTERM at step {step}; resume with RESUME={last_checkpoint}")
            return 143
        if time_up and step < stop_at:
            log(f"stopping_early: wallclock_cap train_time:{elapsed_ms:.0f}ms step:{step}/{hp.iterations}")
            stop_at = step  # the next pass of the loop runs the last validation and ends

    graphs, graph_breaks = compile_counts()
    log(f"compile_stats: recompiles:{graphs - (graphs_after_warmup or graphs)} graph_breaks:{graph_breaks} "
        f"graphs:{graphs}")
    log(f"loader: merged_micro_batches:{loader.loader.merged_batches} max_segments:{loader.loader.max_segments}")
    model.looping = True  # the final model is the whole model: its repeated layers loop
    if weight_average:
        weight_average.copy_to_model()
        log(f"ema: decay:{hp.ema_decay} the final evaluation, checkpoint and artifact use the averaged weights")
    hessians, train_ms = calibrate_artifact(model, loader, hp, env, train_ms, log)  # with the clock running
    return finish(model, val, hp, env, data.tokenizer_sha256, hessians, step, train_ms, log)


def finish(model, val: ValidationSet, hp: Hyperparameters, env, tokenizer_sha256: str, hessians, step: int,
           train_ms: float, log) -> int:
    """The final evaluation (timer stopped), the checkpoint, the artifact and its round trip, the last lines."""
    modes = hp.eval_modes.split(",")
    results = [evaluate(model, val, hp.eval_spec(mode)) for mode in modes]
    if hp.val_loss_every:  # the last point of the periodic validation curve (flat windows of TRAIN_SEQ_LEN)
        same = "flat" in modes and hp.eval_window == hp.train_seq_len
        curve = results[modes.index("flat")] if same else evaluate(model, val, hp.eval_spec("flat", hp.train_seq_len))
        log(validation_line(step, hp, curve, train_ms))
    for result in results:
        log(f"final_eval mode:{result.mode} {window_text(hp, result.mode)} val_loss:{result.loss:.8f} "
            f"val_bpb:{result.bpb:.8f} docs:{val.num_docs} tokens:{result.total_tokens} bytes:{result.total_bytes} "
            f"eval_time:{1000 * result.seconds:.0f}ms")
    path = save_final_checkpoint(model, hp, tokenizer_sha256, step, results[-1], env)
    log(f"checkpoint: {path}")
    total_bytes = 0
    if hp.artifact != "none":  # the headline becomes the score of the model read back from the artifact
        roundtrip, total_bytes, codec = export_artifact(model, hp, tokenizer_sha256, hessians, env, log)
        results = [evaluate(roundtrip, val, hp.eval_spec(mode)) for mode in modes]
        for result in results:
            log(f"final_roundtrip codec:{codec} mode:{result.mode} {window_text(hp, result.mode)} "
                f"val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f} eval_time:{1000 * result.seconds:.0f}ms")
    log(f"peak_memory: {peak_memory_mib(env.device):.0f}MiB")
    log(f"final val_loss:{results[-1].loss:.8f} val_bpb:{results[-1].bpb:.8f} mode:{results[-1].mode} steps:{step} "
        f"train_time:{train_ms:.0f}ms")
    if total_bytes > hp.artifact_limit_bytes:
        log(f"error: artifact {os.path.join(hp.checkpoint_dir, hp.run_id)}.ptz: {total_bytes} bytes (code + model) is "
            f"more than ARTIFACT_LIMIT_BYTES={hp.artifact_limit_bytes}")
        return 1
    return 0


def window_text(hp: Hyperparameters, mode: str) -> str:
    return f"window:{hp.eval_window} stride:{hp.eval_stride if mode == 'strided' else hp.eval_window}"


def validation_line(step: int, hp: Hyperparameters, result: EvalResult, train_ms: float) -> str:
    return (f"step:{step}/{hp.iterations} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; this is the process RSS


# ----------------------------------------------------------------------------------------------------------------------
# 7. Evaluation
#
# eval_ttt.py: evaluate(model, val, EvalSpec) scores every validation document on its own (a scored token only ever
# sees earlier tokens of its own document), shared out over the processes. The final evaluation runs EVAL_MODES with
# EVAL_WINDOW and EVAL_STRIDE (Hyperparameters.eval_spec); the periodic curve flat windows of TRAIN_SEQ_LEN.


# ----------------------------------------------------------------------------------------------------------------------
# 8. Checkpoints, the artifact, logging and main


def checkpoint_metadata(hp: Hyperparameters, tokenizer_sha256: str) -> dict:
    return {
        "hyperparameters": dataclasses.asdict(hp),
        "model_config": dataclasses.asdict(ModelConfig.from_hyperparameters(hp)),
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_path": hp.tokenizer_path,
        "data_path": hp.data_path,
    }


def save_final_checkpoint(model: GPT, hp, tokenizer_sha256, step, result: EvalResult, env) -> str:
    path = os.path.join(hp.checkpoint_dir, f"{hp.run_id}.pt")
    if env.is_main:
        checkpoint = {"kind": "final", "model": model.state_dict(), "step": step, "val_bpb": result.bpb,
                      "val_mode": result.mode, **checkpoint_metadata(hp, tokenizer_sha256)}
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
    return path


def save_resumable_checkpoint(model, optimizers, loader, step, train_ms, hp, tokenizer_sha256, env,
                              weight_average=None) -> str:
    path = os.path.join(hp.checkpoint_dir, f"{hp.run_id}_step{step}.pt")
    if env.is_main:
        checkpoint = {"kind": "resumable", "model": model.state_dict(),
                      "optimizers": [opt.state_dict() for opt in optimizers], "loader": loader.state_dict(),
                      "step": step, "train_time_ms": train_ms, "rng": rng_states(),
                      **checkpoint_metadata(hp, tokenizer_sha256)}
        if weight_average:
            checkpoint["ema"] = weight_average.state_dict()
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
    if is_distributed():
        dist.barrier()
    return path


# What a resumed run must share with the run that saved the checkpoint, or its losses would not be those of one
# uninterrupted run: the model's shape, the seed, the document order and the batch layout, the data. The schedule
# (ITERATIONS, WARMDOWN_ITERS, MAX_WALLCLOCK_SECONDS, learning rates) may change.
RESUME_FIXED = tuple(f.name for f in dataclasses.fields(ModelConfig)) + (
    "seed", "doc_shuffle", "train_seq_len", "train_batch_tokens", "train_micro_batches", "train_max_segments")


def check_resume_settings(state: dict, hp: Hyperparameters, tokenizer_sha256: str) -> None:
    """One line naming the first setting that differs from the checkpoint's (the training data itself is checked by
    DocumentLoader.load_state_dict)."""
    saved = {**state.get("hyperparameters", {}), "tokenizer_sha256": state.get("tokenizer_sha256")}
    here = {**{name: getattr(hp, name) for name in RESUME_FIXED}, "tokenizer_sha256": tokenizer_sha256}
    for name, value in here.items():
        if saved.get(name) is not None and saved[name] != value:
            what = name.upper() if name in RESUME_FIXED else "the tokenizer's sha256"
            raise ConfigError(f"RESUME={hp.resume}: {what} is {value!r} here but {saved[name]!r} in the checkpoint; "
                              "it cannot change in the middle of a run")


def artifact_codecs(hp: Hyperparameters) -> list[str]:
    """The codecs the export may write: ARTIFACT, or ARTIFACT_CANDIDATES for auto; none without an artifact."""
    if hp.artifact == "none":
        return []
    return hp.artifact_candidates.split(",") if hp.artifact == "auto" else [hp.artifact]


def calibration_names(state_dict: dict, codecs, small_numel: int) -> list[str]:
    """Every matrix whose Hessian one of these codecs needs (the tied embedding's included), sorted."""
    return sorted({name for codec in codecs if needs_calibration(codec)
                   for name in hessian_names(state_dict, codec, small_numel)})


def calibrate_artifact(model: GPT, loader, hp: Hyperparameters, env, train_ms: float, log) -> tuple[dict | None, float]:
    """The *gptq* codecs: GPTQ's Hessians for every codec the export may write, timed and counted as training time;
    (None, train_ms) when none needs them."""
    names = calibration_names(model.state_dict(), artifact_codecs(hp), hp.artifact_small_numel)
    if not names:
        return None, train_ms
    start = time.perf_counter()
    hessians = gptq_hessians(model, loader, hp, env.device, names)
    synchronize(env.device)
    calibration_ms = slowest_rank_ms(1000 * (time.perf_counter() - start), env.device)
    log(f"artifact_calibration: batches:{hp.artifact_calibration_batches * env.world_size} "
        f"time:{calibration_ms:.0f}ms train_time:{train_ms + calibration_ms:.0f}ms (counted as training time)")
    return hessians, train_ms + calibration_ms


@torch.no_grad()
def gptq_hessians(model: GPT, loader, hp: Hyperparameters, device: torch.device, names: list[str]
                  ) -> dict[str, torch.Tensor]:
    """X^T X of the inputs of the named matrices (the tied embedding's: of the head's input), over the next
    ARTIFACT_CALIBRATION_BATCHES training micro-batches of this process (never validation data), summed over
    processes. Computed on an unfused twin of the model: a fused relu2_linear reads mlp.fc.weight without calling the
    layer, so its inputs would go unseen."""
    twin = build_model(model.config, dataclasses.replace(model.kernels, fused=frozenset())).to(device)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    batches = []
    while len(batches) < hp.artifact_calibration_batches:
        batches += loader.next_step()

    def forward(net, batch):
        inputs, targets, cu_seqlens = to_device(batch, device)
        net(inputs, targets, cu_seqlens, hp.train_seq_len)

    hessians = collect_hessians(twin, batches[:hp.artifact_calibration_batches], forward, names)
    for hessian in hessians.values():
        sum_over_processes(hessian)
    return hessians


def export_artifact(model: GPT, hp: Hyperparameters, tokenizer_sha256: str, hessians, env, log
                    ) -> tuple[GPT, int, str]:
    """Write CHECKPOINT_DIR/<RUN_ID>.ptz (rank 0) in the chosen codec, and with ARTIFACT_CODE=bundle the code as it
    runs, <RUN_ID>.pyz; log the sizes; return the model read back from the file (every rank reads it: the round trip
    is through the bytes that would be submitted), the total bytes and the codec."""
    path, bundle_path = (os.path.join(hp.checkpoint_dir, f"{hp.run_id}.{ext}") for ext in ("ptz", "pyz"))
    files = payload_contents(hp)
    raw_code_bytes = sum(map(len, files.values()))
    bundled = hp.artifact_code == "bundle"
    if env.is_main:
        if bundled:  # written first: the codec's choice needs its size
            write_atomic(bundle_path, bundle_bytes(files))
        code_bytes = os.path.getsize(bundle_path) if bundled else raw_code_bytes
        meta = {**checkpoint_metadata(hp, tokenizer_sha256), "run_id": hp.run_id}
        write_atomic(path, encode_fitting(model.state_dict(), hp, meta, hessians, code_bytes, log))
    if is_distributed():
        dist.barrier()
    state = load_checkpoint(path, model.tok_emb.weight.device)
    model_bytes = os.path.getsize(path)
    code_bytes = os.path.getsize(bundle_path) if bundled else raw_code_bytes
    total = model_bytes + code_bytes
    log(f"artifact: codec:{state['codec']} model_bytes:{model_bytes} code_bytes:{code_bytes} total_bytes:{total} "
        f"limit:{hp.artifact_limit_bytes} code:{hp.artifact_code} raw_code_bytes:{raw_code_bytes} "
        f"files:{','.join([path] + ([bundle_path] if bundled else []) + list(files))}")
    roundtrip = build_model(model.config, model.kernels).to(model.tok_emb.weight.device)  # same shape and kernels
    roundtrip.load_state_dict(state["model"])
    return roundtrip, total, state["codec"]


def encode_fitting(state_dict, hp: Hyperparameters, meta: dict, hessians, code_bytes: int, log) -> bytes:
    """The artifact's bytes in ARTIFACT's codec; for auto, in the first of ARTIFACT_CANDIDATES whose total is at most
    ARTIFACT_LIMIT_BYTES - ARTIFACT_MARGIN_BYTES, else in the last."""
    codecs = artifact_codecs(hp)
    room = hp.artifact_limit_bytes - (hp.artifact_margin_bytes if hp.artifact == "auto" else 0)
    for codec in codecs:
        start = time.perf_counter()
        data = encode_artifact(state_dict, codec, {**meta, "codec": codec}, hessians,
                               small_numel=hp.artifact_small_numel)
        fits = len(data) + code_bytes <= room
        log(f"artifact_encode: codec:{codec} time:{1000 * (time.perf_counter() - start):.0f}ms "
            f"model_bytes:{len(data)} total_bytes:{len(data) + code_bytes} "
            + ("fits" if fits else f"over:{len(data) + code_bytes - room}") + f" room:{room}")
        if fits or codec == codecs[-1]:
            return data


def load_checkpoint(path: str, device) -> dict:
    """A checkpoint (.pt) or an artifact (.ptz: the quantized model and the same metadata), as one dict."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found")
    if path.endswith(".ptz"):
        try:
            state_dict, meta = read_artifact(path)
        except ValueError as e:
            raise DataError(str(e)) from None
        return {**meta, "kind": "artifact", "model": state_dict}
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise DataError(f"{path}: not a train_gpt.py checkpoint (no model or model_config)")
    return state


def load_model(path: str, device, fused: frozenset = frozenset(), attn_backend: str = "reference") -> tuple[GPT, dict]:
    """The model of a checkpoint or artifact, with these kernels, and the checkpoint's metadata."""
    state = load_checkpoint(path, device)
    config = ModelConfig(**state["model_config"])
    model = build_model(config, choose_kernels(fused, attn_backend, device, gist=config.gist_tokens > 0)).to(device)
    model.load_state_dict(state["model"])
    return model, state


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def payload_files(hp: ModelConfig | None = None) -> list[Path]:
    """PAYLOAD, and the experiment files hp switches on, as paths."""
    names = list(PAYLOAD) + [name for name, switch in EXPERIMENT_PAYLOAD.items() if hp and getattr(hp, switch)]
    return [ROOT / name for name in names]


def payload_contents(hp: ModelConfig | None = None) -> dict[str, bytes]:
    """payload_files' bytes by repository path ("/"-separated), in order: the code the artifact counts."""
    return {f.relative_to(ROOT).as_posix(): f.read_bytes() for f in payload_files(hp)}


def embedded_source(files: list[Path]) -> str:
    """`#### file NAME bytes=N sha256=H`, then exactly N bytes of the file, then `#### end NAME`."""
    parts = []
    for path in files:
        data = path.read_bytes()
        name = path.relative_to(ROOT).as_posix()
        parts.append(f"#### file {name} bytes={len(data)} sha256={hashlib.sha256(data).hexdigest()}\n"
                     f"{data.decode('utf-8')}\n#### end {name}\n")
    return "".join(parts)


def versions_line() -> str:
    import sentencepiece as spm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    cuda = torch.version.cuda if torch.cuda.is_available() else "none"
    return (f"versions: python:{platform.python_version()} torch:{torch.__version__} triton:{triton_version} "
            f"cuda:{cuda} numpy:{np.__version__} sentencepiece:{spm.__version__}")


def gpu_line(world_size: int) -> str:
    """The devices this run uses: on each node, processes 0..n-1 take cuda:0..n-1 of the devices CUDA_VISIBLE_DEVICES
    lets it see (nvidia-smi would list every GPU of the machine, used or not)."""
    if not torch.cuda.is_available():
        return (f"gpus: none (cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads per process)")
    visible = torch.cuda.device_count()
    used = min(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), visible)
    names = [torch.cuda.get_device_name(i) for i in range(used)]
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"gpus: {used} x {names[0]}" + ("" if len(set(names)) <= 1 else f" {names}")
            + f" (per node; cuda:0-{used - 1} of {visible} visible" + (f", CUDA_VISIBLE_DEVICES={mask})" if mask else ")"))


class Logger:
    """Rank 0 prints each line and appends it to LOG_DIR/<RUN_ID>.txt; other ranks stay quiet. A new run never
    overwrites a log: an existing one is an error (two runs with one RUN_ID would erase each other's evidence), unless
    the run resumes (append=True), which continues it."""

    def __init__(self, path: str | None, append: bool = False):
        self.path = path
        self.continues = bool(path) and append and os.path.isfile(path)
        if path and not self.continues:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                open(path, "x").close()
            except FileExistsError:
                raise ConfigError(f"{path}: a log of RUN_ID {Path(path).stem!r} exists already; choose another RUN_ID "
                                  f"(or RESUME= a checkpoint of that run to continue it)") from None

    def raw(self, text: str) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)

    def __call__(self, line: str) -> None:
        if self.path:
            print(line, flush=True)
            self.raw(line + "\n")


def main() -> int:
    try:
        hp = Hyperparameters.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = setup_distributed()
    log, finished = Logger(None), False
    try:
        hp.run_id = rank0_string(hp.run_id)  # every rank names its files after rank 0's RUN_ID
        log = Logger(os.path.join(hp.log_dir, f"{hp.run_id}.txt") if env.is_main else None, append=bool(hp.resume))
        gist = hp.gist_tokens > 0
        model_kernels = choose_kernels(parse_fused_ops(hp.fused), hp.attn_backend, env.device, hp.compile, gist)
        if log.continues:  # the log already starts with the code; the resumed run's lines follow the earlier ones
            log(f"resumed_log: {hp.resume}")
        else:
            log.raw(embedded_source(payload_files(hp)))
        log(versions_line())
        log(gpu_line(env.world_size))
        log("env_overrides: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in Hyperparameters.env_overrides().items()))
        for f in dataclasses.fields(hp):
            log(f"hparam {f.name}={getattr(hp, f.name)}")
        log(attention_line(model_kernels, gist))
        log(f"fused_ops: {','.join(sorted(model_kernels.fused)) or 'none'}")
        status = train(hp, env, model_kernels, log)
        finished = True
        return status
    except (ConfigError, DataError, BackendError) as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
            log.raw(f"error: {e}\n")
        return 2
    finally:
        leave_process_group(finished)


if __name__ == "__main__":
    sys.exit(main())

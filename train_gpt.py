"""
train_gpt.py: the record script. Trains a small GPT on packed, shuffled documents and scores it in bits per byte.

Read it top to bottom, in data-flow order:
  1. hyperparameters (environment variables, validated before any work)
  2. distributed setup (torchrun: NCCL on CUDA, gloo on CPU; or one plain process)
  3. data: token shards, the document index, the shuffled varlen document loader, bytes per token
  4. model: GPT with RMSNorm, rotary q/k, grouped-query varlen attention, relu^2 MLP, U-Net skips, tied embeddings
  5. optimizers: Muon for matrices (work shared across ranks), Adam for embeddings and scalars
  6. training loop
  7. evaluation: per-document flat and strided bits per byte
  8. checkpoints and logging, and main()

Imports only the standard library, torch, numpy, sentencepiece and `kernels`.
Run: `python train_gpt.py` (one process) or `torchrun --nproc_per_node=N train_gpt.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.attention import (REFERENCE_GIST, REFERENCE_VARLEN, VARLEN_BACKENDS, BackendError, VarlenAttention,
                               gist_layout, sdpa_causal, segment_ids, select_gist_attention, select_varlen_attention)
from kernels.artifact import CODECS as ARTIFACT_CODECS
from kernels.artifact import collect_hessians, encode_artifact, quantization_plan, read_artifact
from kernels.newton_schulz import NS_COEFFICIENTS

# ----------------------------------------------------------------------------------------------------------------------
# 1. Hyperparameters
#
# Every field can be set by the environment variable of the same name in upper case (parameter-golf's names where they
# exist). Bad values stop the run with one line naming the variable, before any work is done.


class ConfigError(ValueError):
    """A hyperparameter has a value the script cannot run with."""


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
    # gist tokens (experiment switch, section 4 "Gist tokens"): after every GIST_SEGMENT raw tokens of a document piece
    # but the last, GIST_TOKENS learned slots; later segments see those slots instead of the raw tokens. 0: off.
    gist_tokens: int = 0
    gist_segment: int = 128

    @classmethod
    def from_hyperparameters(cls, hp: ModelConfig) -> ModelConfig:
        return cls(**{f.name: getattr(hp, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Hyperparameters(ModelConfig):
    """Everything a run is configured by: the model's shape (above) and the rest (below)."""

    # data
    data_path: str = "data/datasets/fineweb10B_sp1024"  # folder with *_train_*.bin and *_val_*.bin shards
    tokenizer_path: str = ""  # SentencePiece model; empty means DATA_PATH/tokenizer.model
    run_id: str = ""  # names the log and checkpoint files; empty means a timestamp
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
    max_wallclock_seconds: float = 600.0  # 0 means no cap
    # optimizers
    tied_embed_lr: float = 0.05
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
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
    # the size-limited artifact (track_10min_16mb): none | int8_zlib | int6_lzma | int6_gptq_lzma (kernels/artifact.py)
    artifact: str = "none"
    artifact_limit_bytes: int = 16_000_000  # code bytes + compressed model bytes; a larger artifact fails the run
    artifact_calibration_batches: int = 8  # int6_gptq_lzma: training micro-batches per process that calibrate GPTQ
    # speed
    compile: bool = True
    fused: str = "auto"  # 0 | 1 | auto | comma-separated kernel names (see kernels/__init__.py)
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
                values[name.lower()] = _parse_env_value(raw.strip(), kind)
            except ValueError:
                raise ConfigError(f"{name}={raw.strip()!r}: expected {kind.__name__}") from None
        hp = cls(**values)
        hp.validate()
        hp._resolve_defaults()
        return hp

    @classmethod
    def env_overrides(cls, environ=os.environ) -> dict[str, str]:
        """The environment variables a run reads, as set: {NAME: raw value}. Logged as the `env_overrides:` line, from
        which tools/record.py rebuilds a record's command."""
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
        need(self.artifact in ("none",) + ARTIFACT_CODECS, "artifact", f"must be none or one of {', '.join(ARTIFACT_CODECS)}")
        need(self.artifact_limit_bytes > 0, "artifact_limit_bytes", "must be a positive integer")
        need(self.artifact_calibration_batches > 0, "artifact_calibration_batches", "must be a positive integer")
        head_dim = self.model_dim // self.num_heads
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, "rope_dims",
             f"must be an even number in [0, {head_dim}] (the head dimension; 0 means all)")
        need(self.model_dim % self.num_heads == 0, "model_dim", f"must be divisible by NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, "model_dim", "head dimension must be even for rotary")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide NUM_HEADS={self.num_heads}")
        need(self.train_batch_tokens % self.train_micro_batches == 0, "train_batch_tokens",
             f"must be divisible by TRAIN_MICRO_BATCHES={self.train_micro_batches}")
        modes = self.eval_modes.split(",")
        need(all(m in ("flat", "strided") for m in modes) and len(modes) > 0, "eval_modes",
             "must be a comma-separated list of flat, strided")
        window = self.eval_window or self.train_seq_len
        need(self.eval_stride <= window, "eval_stride", f"must be <= the evaluation window {window}")
        need(self.attn_backend in ("auto",) + VARLEN_BACKENDS, "attn_backend",
             f"must be auto or one of {', '.join(VARLEN_BACKENDS)}")
        parse_fused_ops(self.fused)  # raises ConfigError on an unknown kernel name
        need(self.gist_tokens == 0 or self.attn_backend in ("auto", "reference"), "attn_backend",
             "cannot express the gist attention mask (GIST_TOKENS > 0); use auto (flex_attention on CUDA, the "
             "dense-mask reference on CPUs) or reference")
        need(self.gist_tokens == 0 or self.gist_segment < self.train_seq_len, "gist_segment",
             f"must be shorter than TRAIN_SEQ_LEN={self.train_seq_len}: slots go between the segments of a piece of at "
             f"most TRAIN_SEQ_LEN tokens, so with one segment per piece no gist slot would ever be trained")

    def _resolve_defaults(self) -> None:
        if not self.tokenizer_path:
            self.tokenizer_path = os.path.join(self.data_path, "tokenizer.model")
        if not self.run_id:
            self.run_id = time.strftime("%Y%m%d_%H%M%S")
        if not self.eval_window:
            self.eval_window = self.train_seq_len
        if not self.eval_stride:
            self.eval_stride = default_eval_stride(self.eval_window)


def default_eval_stride(window: int) -> int:
    """The strided evaluation's stride when none is given: half the window (each scored token sees at least W/2 of
    context). The one definition; eval_ttt.py uses it too."""
    return max(1, window // 2)


def _parse_env_value(raw: str, kind: type):
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        return int(raw.replace("_", ""))
    if kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    return raw


def parse_fused_ops(spec: str) -> frozenset[str]:
    """FUSED=0: plain torch everywhere; 1: every kernel; auto: the kernels measured faster than torch.compile on an
    H100 (kernels.DEFAULT_ON); or a comma-separated list of kernel names."""
    spec = spec.strip().lower()
    if spec in ("0", "", "none", "off", "false"):
        return frozenset()
    if spec in ("1", "all", "on", "true"):
        return frozenset(kernels.OPS)
    if spec == "auto":
        return frozenset(name for name, on in kernels.DEFAULT_ON.items() if on)
    names = frozenset(s.strip() for s in spec.split(",") if s.strip())
    unknown = sorted(names - set(kernels.OPS))
    if unknown:
        raise ConfigError(f"FUSED={spec!r}: unknown kernel {unknown[0]!r}; known: {', '.join(sorted(kernels.OPS))}")
    return names



# ----------------------------------------------------------------------------------------------------------------------
# 2. Distributed setup


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """Whether this process is one of several (a process group is up)."""
    return dist.is_available() and dist.is_initialized()


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
# Shard file: 256 little-endian int32 header ([0] magic 20240520, [1] version 1, [2] number of tokens), then that many
# little-endian uint16 tokens, nothing else (the format of modded-nanogpt and parameter-golf). Every document starts with
# BOS; documents are found by BOS positions and may continue from one shard into the next.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1
IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data. The message starts with the file it is about."""


def load_shard(path) -> np.ndarray:
    """Memory-map the tokens of one shard after checking magic, version and the exact file size."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DataError(f"{path}: shard file not found") from None
    if size < SHARD_HEADER_BYTES:
        what = "empty" if size == 0 else f"only {size} bytes"
        raise DataError(f"{path}: file is {what}, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: wrong magic number {header[0]} (a token shard starts with {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (this reader knows version {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes"
                        f" ({'truncated' if size < expected else 'trailing data'})")
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[position])} at position {position} is >= vocab size {vocab_size}")


def scan_shard(tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """(positions of BOS, largest token id) of one shard: the slow and obvious pass over every token."""
    return np.flatnonzero(np.asarray(tokens) == BOS_ID).astype(np.int64), int(tokens.max()) if len(tokens) else -1


def shard_index(path: str, tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """scan_shard's answer, cached beside the shard in PATH.index.npz and reused while the shard's size and mtime are
    unchanged: 80 FineWeb shards (16 GB) open in well under a second instead of a full read. A folder we cannot write
    to just goes without the cache."""
    cache = f"{path}.index.npz"
    stat = os.stat(path)
    key = np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    try:
        with np.load(cache) as saved:
            if np.array_equal(saved["key"], key):
                return saved["bos"], int(saved["max_id"])
    except (OSError, KeyError, ValueError):
        pass  # no cache yet, or an unreadable one: scan
    bos, max_id = scan_shard(tokens)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: np.savez would add ".npz" to the name
            np.savez(f, key=key, bos=bos, max_id=np.array(max_id))

    with contextlib.suppress(OSError):
        write_atomic(cache, save)
    return bos, max_id


class TokenStream:
    """All shards of one split as one virtual, memory-mapped token array, with the index of its documents."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise DataError(f"{pattern}: no shard files match")
        self.shards, bos_positions = [], []
        for path in self.files:
            tokens = load_shard(path)
            bos, max_id = shard_index(path, tokens)
            if max_id >= vocab_size:
                check_token_ids(tokens, vocab_size, path)  # names the first bad position
            self.shards.append(tokens)
            bos_positions.append(bos)
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.shard_offsets[-1])
        if self.num_tokens == 0:
            raise DataError(f"{pattern}: the shards hold no tokens")
        first_shard = int(np.flatnonzero(lengths)[0])  # earlier shards may be empty
        first = int(self.shards[first_shard][0])
        if first != BOS_ID:
            raise DataError(f"{self.files[first_shard]}: first token is {first}, not BOS ({BOS_ID}); documents must "
                            "start with BOS")
        self.doc_starts = np.concatenate([bos + off for bos, off in zip(bos_positions, self.shard_offsets)])
        self.doc_lengths = np.diff(np.append(self.doc_starts, self.num_tokens))

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the virtual array, as int32 (a copy)."""
        return self.gather(np.array([start]), np.array([stop - start]))

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The ranges [start, start + length) of the virtual array, concatenated, as int32, in one vectorised pass
        (a Python loop over ranges is too slow for short documents)."""
        ends = np.cumsum(lengths)
        index = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        if len(self.shards) == 1:
            return self.shards[0][index].astype(np.int32)
        shard_of = np.searchsorted(self.shard_offsets, index, side="right") - 1
        out = np.empty(len(index), dtype=np.int32)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self.shards[shard][index[mask] - self.shard_offsets[shard]]
        return out

    def document(self, index: int) -> np.ndarray:
        start = int(self.doc_starts[index])
        return self.read(start, start + int(self.doc_lengths[index]))


def split_pattern(data_path: str, split: str) -> str:
    return os.path.join(data_path, f"*_{split}_*.bin")


def segment_boundaries(doc_starts_in_slice: np.ndarray, length: int, max_piece: int) -> np.ndarray:
    """cu_seqlens for a slice of `length` tokens: a segment starts at 0, at every document start, and every `max_piece`
    tokens inside a document (long documents are cut into pieces of at most TRAIN_SEQ_LEN)."""
    starts = np.union1d([0], doc_starts_in_slice).astype(np.int64)
    ends = np.append(starts[1:], length)
    pieces = -(-(ends - starts) // max_piece)  # ceil division
    first_piece = np.cumsum(pieces) - pieces
    piece_index = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
    piece_starts = np.repeat(starts, pieces) + piece_index * max_piece
    return np.append(piece_starts, length).astype(np.int32)


def fit_segments(cu_seqlens: np.ndarray, targets: np.ndarray, max_segments: int) -> np.ndarray:
    """cu_seqlens with exactly `max_segments` segments, so that the compiled step sees one shape for the whole run.

    Fewer segments: padded with zero-length ones. More (a micro-batch of unusually many short documents): the segments
    from index max_segments - 1 on are merged into one, and the targets of every token after the first of them are
    ignored in place (a merged token could see another document, so it must not be trained on). Returns the new
    cu_seqlens; `targets` is changed in place."""
    length = int(cu_seqlens[-1])
    if len(cu_seqlens) - 1 > max_segments:
        targets[int(cu_seqlens[max_segments]):] = IGNORE_INDEX
        cu_seqlens = np.append(cu_seqlens[:max_segments], length)
    return np.pad(cu_seqlens, (0, max_segments + 1 - len(cu_seqlens)), constant_values=length).astype(np.int32)


def default_max_segments(micro_tokens: int) -> int:
    """Segments per micro-batch the compiled step is built for: room for a mean segment of 64 tokens (FineWeb's
    documents average ~1,300 tokens), at least 64. Zero-length padding segments cost flash attention nothing."""
    return max(64, micro_tokens // 64)


# Gist tokens (GIST_TOKENS=k > 0, GIST_SEGMENT=L): every document piece is read in segments of L raw tokens, and after
# each segment but the last come k gist slots. A slot's input id is vocab_size + its slot index (0..k-1), which picks a
# row of the model's gist embedding; its target is IGNORE_INDEX, so a segment's last raw token still predicts the next
# segment's first raw token. The layout is periodic from each piece's start (L raw, k gists, L raw, ...), so the model
# recovers every token's segment and kind from cu_seqlens alone (gist_layout in section 4).


def gist_piece_lengths(raw_lengths: np.ndarray, gist_tokens: int, gist_segment: int) -> np.ndarray:
    """Tokens of each piece once its gist slots are in: k after every full segment of L that more tokens follow."""
    raw_lengths = np.asarray(raw_lengths, dtype=np.int64)
    return raw_lengths + gist_tokens * np.maximum(-(-raw_lengths // gist_segment) - 1, 0)


def gist_micro_batch_length(raw_tokens: int, gist_tokens: int, gist_segment: int) -> int:
    """The fixed length of a micro-batch of `raw_tokens` raw tokens with gist slots: pieces of n_i raw tokens add
    k * floor((n_i - 1) / L) slots each, and the sum of those floors is at most floor((raw_tokens - 1) / L)."""
    return raw_tokens + gist_tokens * ((raw_tokens - 1) // gist_segment)


def insert_gist_slots(inputs: np.ndarray, targets: np.ndarray, cu_seqlens: np.ndarray, gist_tokens: int,
                      gist_segment: int, vocab_size: int, length: int):
    """(inputs, targets, cu_seqlens) of the pieces with gist slots inserted, padded to `length` tokens.

    Raw tokens keep their order and targets; slot s has input vocab_size + s and an ignored target. The padding (input
    0, targets ignored) extends the last piece: it comes after every real token, so causal attention keeps it unseen."""
    raw_lengths = np.diff(cu_seqlens.astype(np.int64))
    lengths = gist_piece_lengths(raw_lengths, gist_tokens, gist_segment)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    if total > length:
        raise ValueError(f"{total} tokens with gist slots do not fit a micro-batch of {length}")
    in_period = (np.arange(total) - np.repeat(starts[:-1], lengths)) % (gist_segment + gist_tokens)
    is_gist = in_period >= gist_segment
    new_inputs = np.zeros(length, dtype=inputs.dtype)
    new_targets = np.full(length, IGNORE_INDEX, dtype=targets.dtype)
    new_inputs[:total][~is_gist] = inputs
    new_inputs[:total][is_gist] = vocab_size + in_period[is_gist] - gist_segment
    new_targets[:total][~is_gist] = targets
    starts[-1] = length
    return new_inputs, new_targets, starts.astype(np.int32)


@dataclass
class MicroBatch:
    inputs: np.ndarray | torch.Tensor  # int32 [L]
    targets: np.ndarray | torch.Tensor  # int64 [L]; IGNORE_INDEX where the target would be the next document's BOS
    cu_seqlens: np.ndarray | torch.Tensor  # int32, exactly max_segments + 1 entries
    merged: bool = False  # it had more segments than max_segments (see fit_segments)


@dataclass(frozen=True)
class LoaderConfig:
    """What DocumentLoader serves: steps of batch_tokens tokens cut into micro_batches equal slices, documents cut
    into pieces of at most seq_len tokens and shuffled by seed (shuffle=False: file order), micro-batches of exactly
    max_segments pieces (0: default_max_segments), and, with gist_tokens > 0, gist slots (ids from vocab_size on)."""

    seq_len: int
    batch_tokens: int
    micro_batches: int
    seed: int
    shuffle: bool = True
    max_segments: int = 0
    gist_tokens: int = 0
    gist_segment: int = 128
    vocab_size: int = 0

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> LoaderConfig:
        return cls(hp.train_seq_len, hp.train_batch_tokens, hp.train_micro_batches, hp.seed, hp.doc_shuffle,
                   hp.train_max_segments, hp.gist_tokens, hp.gist_segment, hp.vocab_size)


class DocumentLoader:
    """Shuffled documents, packed back to back, served as fixed-size varlen micro-batches.

    Epoch e is the documents in the order of a permutation drawn from (seed, e), concatenated; the epochs follow one
    another as one endless stream. Step s covers the next TRAIN_BATCH_TOKENS tokens of that stream, cut into
    TRAIN_MICRO_BATCHES equal slices; rank r takes slices r, r + world_size, ... Everything depends only on the seed and
    the stream position, so every rank agrees and a restart from a saved position continues exactly."""

    def __init__(self, stream: TokenStream, config: LoaderConfig, rank: int = 0, world_size: int = 1):
        if config.micro_batches % world_size:
            raise ConfigError(f"TRAIN_MICRO_BATCHES={config.micro_batches}: must be divisible by the world size "
                              f"{world_size}")
        self.stream, self.config, self.rank, self.world_size = stream, config, rank, world_size
        self.seq_len, self.micro_batches, self.seed, self.shuffle = (config.seq_len, config.micro_batches, config.seed,
                                                                     config.shuffle)
        self.micro_tokens = config.batch_tokens // config.micro_batches
        self.max_segments = config.max_segments or default_max_segments(self.micro_tokens)
        self.merged_batches = 0  # micro-batches that had more segments than max_segments (see fit_segments)
        self.position = 0  # tokens of the endless stream consumed so far
        # With gist slots a micro-batch still takes micro_tokens raw tokens of the stream (so every GIST_TOKENS setting
        # trains on the same tokens) and is padded to one fixed length that fits the most slots it can hold.
        self.batch_length = (gist_micro_batch_length(self.micro_tokens, config.gist_tokens, config.gist_segment)
                             if config.gist_tokens else self.micro_tokens)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.stream.num_docs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.stream.num_docs)

    def _epoch(self, epoch: int):
        """(document order, start of each document in epoch coordinates, with the epoch length appended)."""
        if epoch not in self._epochs:
            order = self.epoch_order(epoch)
            starts = np.concatenate([[0], np.cumsum(self.stream.doc_lengths[order])])
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of the endless stream and the offsets (within them) where documents start."""
        tokens, doc_offsets, done = [], [], 0
        n = self.stream.num_tokens
        while start + done < stop:  # more than once only when the range runs into the next epoch
            epoch, offset = divmod(start + done, n)
            order, starts = self._epoch(epoch)
            end = min(n, offset + stop - start - done)
            first = int(np.searchsorted(starts, offset, side="right")) - 1
            last = int(np.searchsorted(starts, end, side="left"))
            doc_begin, doc_end = starts[first:last], starts[first + 1:last + 1]
            lo, hi = np.maximum(offset, doc_begin), np.minimum(end, doc_end)
            tokens.append(self.stream.gather(self.stream.doc_starts[order[first:last]] + lo - doc_begin, hi - lo))
            doc_offsets.append(done + doc_begin[lo == doc_begin] - offset)
            done += end - offset
        return np.concatenate(tokens), np.concatenate(doc_offsets).astype(np.int64)

    def micro_batch(self, start: int) -> MicroBatch:
        tokens, doc_offsets = self.read(start, start + self.micro_tokens + 1)
        inputs, targets = tokens[:-1], tokens[1:].astype(np.int64)
        targets[targets == BOS_ID] = IGNORE_INDEX  # never predict across a document boundary
        cu = segment_boundaries(doc_offsets[doc_offsets < self.micro_tokens], self.micro_tokens, self.seq_len)
        if self.config.gist_tokens:
            inputs, targets, cu = insert_gist_slots(inputs, targets, cu, self.config.gist_tokens,
                                                    self.config.gist_segment, self.config.vocab_size, self.batch_length)
        merged = len(cu) - 1 > self.max_segments
        return MicroBatch(inputs, targets, fit_segments(cu, targets, self.max_segments), merged)

    @property
    def step_tokens(self) -> int:
        return self.micro_batches * self.micro_tokens

    def step_batches(self, position: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global step that starts at stream position `position` (no state changes)."""
        return [self.micro_batch(position + j * self.micro_tokens)
                for j in range(self.rank, self.micro_batches, self.world_size)]

    def consume(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        """Advance past one step's batches."""
        self.position += self.step_tokens
        self.merged_batches += sum(b.merged for b in batches)
        return batches

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global step."""
        return self.consume(self.step_batches(self.position))

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "merged_batches": self.merged_batches, "documents": self.stream.num_docs,
                "tokens": self.stream.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        # a position only means something in the stream it was taken in: the same documents, seed and order
        here = {"seed": self.seed, "shuffle": self.shuffle, "documents": self.stream.num_docs,
                "tokens": self.stream.num_tokens}
        for name, value in here.items():
            if name in state and state[name] != value:
                raise ConfigError(f"the saved loader position belongs to a stream with {name} {state[name]!r}, this "
                                  f"one has {value!r} (training data: {self.stream.files[0]}...)")
        self.position = int(state["position"])
        self.merged_batches = int(state.get("merged_batches", 0))


class PrefetchingLoader:
    """A DocumentLoader whose next step is built in a background thread while the current step runs on the device, as
    tensors (in pinned memory on CUDA, so the copy to the GPU does not wait for the host). Only the main thread moves
    the loader's position, one step per next_step(), so the batches, their order and resume are exactly the loader's;
    a prefetched step for any other position (after load_state_dict) is dropped."""

    def __init__(self, loader: DocumentLoader, device: torch.device):
        import concurrent.futures

        self.loader, self.pin = loader, device.type == "cuda"
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self.ahead = None  # (stream position, future of that step's batches)

    def _build(self, position: int) -> list[MicroBatch]:
        def tensor(array):
            t = torch.from_numpy(array)
            return t.pin_memory() if self.pin else t

        return [MicroBatch(tensor(b.inputs), tensor(b.targets), tensor(b.cu_seqlens), b.merged)
                for b in self.loader.step_batches(position)]

    def _prefetch(self, position: int):
        if self.ahead is None or self.ahead[0] != position:
            self.ahead = (position, self.worker.submit(self._build, position))
        return self.ahead[1]

    def next_step(self) -> list[MicroBatch]:
        batches = self._prefetch(self.loader.position).result()
        self.loader.consume(batches)
        self._prefetch(self.loader.position)  # the step after: built while this one runs
        return batches

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


# Bytes per token. BPB = (sum of per-token losses in nats) / ln 2 / (bytes those tokens stand for). The bytes of a token
# come from lookup tables built from the SentencePiece model; together they reproduce len(sp.decode(ids).encode()) for
# every document exactly (tests/test_bpb.py checks it on every validation document).


@dataclass
class ByteTables:
    base_bytes: np.ndarray  # int64 [V]: UTF-8 bytes of the piece without its leading "▁"; byte pieces 1; control 0
    leading_space: np.ndarray  # bool [V]: the piece starts with "▁", which decodes to one space byte
    is_boundary: np.ndarray  # bool [V]: control and unknown pieces (BOS, EOS, PAD, UNK)
    strips_first_space: bool  # the decoder drops the "▁" of a text's first piece (tokenizers with a dummy prefix)

    def count(self, prev_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Bytes of each token in `ids`, given the token before it."""
        space_counts = self.leading_space[ids]
        if self.strips_first_space:
            space_counts = space_counts & ~self.is_boundary[prev_ids]
        return self.base_bytes[ids] + space_counts


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteTables:
    if sp.vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {sp.vocab_size()} pieces, more than VOCAB_SIZE={vocab_size}")
    base = np.zeros(vocab_size, dtype=np.int64)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)  # ids past the tokenizer's vocabulary never occur; count them as 0
    for token in range(sp.vocab_size()):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        boundary[token] = False
        if sp.is_byte(token):
            base[token] = 1
            continue
        piece = sp.id_to_piece(token)
        if piece.startswith("\u2581"):
            space[token] = True
            piece = piece[1:]
        base[token] = len(piece.replace("\u2581", " ").encode("utf-8"))  # an inner "▁" (e.g. "▁of▁the") is one space
    # Whether the decoder strips the space of a first "▁piece" depends on the tokenizer's normaliser (dummy prefix);
    # ask the decoder itself, with a piece like "▁the" (not "▁▁"), rather than parse its protobuf.
    probe = next((t for t in range(sp.vocab_size()) if space[t] and len(sp.id_to_piece(t)) > 1
                  and sp.id_to_piece(t)[1] != "\u2581"), None)
    strips = probe is not None and not sp.decode([probe]).startswith(" ")
    return ByteTables(base, space, boundary, strips)


def document_bytes(tables: ByteTables, doc: np.ndarray) -> int:
    """Bytes of a document (its tokens after the BOS)."""
    return int(tables.count(doc[:-1], doc[1:]).sum())


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / math.log(2) / max(total_bytes, 1)


def sha256_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found (set TOKENIZER_PATH or prepare the data first)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError with long messages
        raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------------------------
# 4. Model
#
# Input is either a batch of rows [B, T] (each row one causal sequence starting at position 0), or one packed row
# [1, N] with `cu_seqlens`: segment i is tokens cu_seqlens[i]:cu_seqlens[i+1]; a token attends only inside its segment
# and positions restart at 0 in each segment. Every fused kernel has its plain-torch twin right here (FUSED=0); the
# attention backends and their references are in kernels/attention.py.


@dataclass(frozen=True)
class Kernels:
    """How the model computes what has a fast path, chosen once (main(), eval_ttt.py, a test) and held by the model:
    the fused Triton ops it uses (FUSED) and its attention functions (ATTN_BACKEND). The default is plain torch."""

    fused: frozenset = frozenset()
    attention: VarlenAttention = REFERENCE_VARLEN
    gist_attention: object = REFERENCE_GIST  # kernels.attention.ReferenceGistAttention or FlexGistAttention


def choose_kernels(fused: frozenset, attn_backend: str, gist_tokens: int, device: torch.device,
                   compiling: bool = False) -> Kernels:
    """The fused ops (parse_fused_ops) and ATTN_BACKEND resolved for this device; a model with gist slots needs a
    gist attention instead of a varlen one."""
    device = torch.device(device)
    if gist_tokens:
        return Kernels(fused, gist_attention=select_gist_attention(attn_backend, device, compiling))
    return Kernels(fused, attention=select_varlen_attention(attn_backend, device, compiling))


def attention_name(model_kernels: Kernels, gist_tokens: int) -> str:
    return f"gist_{model_kernels.gist_attention.name}" if gist_tokens else model_kernels.attention.name


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, fused: frozenset):
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
        return self.proj(attend(q, k.to(v.dtype), v).reshape(B, T, -1))


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
    def __init__(self, config: ModelConfig, fused: frozenset):
        super().__init__()
        self.fused = fused
        self.attn = CausalSelfAttention(config, fused)
        self.mlp = MLP(config, fused)
        self.attn_scale = nn.Parameter(torch.ones(config.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(config.model_dim))
        # each block reads a learned mix of the residual stream and the initial embedding
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(config.model_dim), torch.zeros(config.model_dim))))

    def forward(self, x, x0, cos, sin, attend):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x, self.fused), cos, sin, attend)
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x, self.fused))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, model_kernels: Kernels = Kernels()):
        super().__init__()
        self.config, self.kernels = config, model_kernels
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=config.tied_embed_init_std)
        self.rotary = Rotary(config.model_dim // config.num_heads, config.rope_base, config.rope_dims)
        self.blocks = nn.ModuleList(Block(config, model_kernels.fused) for _ in range(config.num_layers))
        # U-Net: the first half of the blocks (encoder) hands its outputs, last first, to the second half (decoder)
        self.num_encoder_layers = config.num_layers // 2
        self.num_skips = min(self.num_encoder_layers, config.num_layers - self.num_encoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, config.model_dim))
        if config.gist_tokens:  # one learned embedding per gist slot index, shared by all segments
            self.gist_emb = nn.Embedding(config.gist_tokens, config.model_dim)
            nn.init.normal_(self.gist_emb.weight, std=config.tied_embed_init_std)

    def positions(self, input_ids, cu_seqlens):
        B, T = input_ids.shape
        if cu_seqlens is None:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        index = torch.arange(T, device=input_ids.device)
        return (index - cu_seqlens.to(torch.int64)[segment_ids(cu_seqlens, T)]).unsqueeze(0)

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=0):
        if self.config.gist_tokens:
            return self.gist_hidden_states(input_ids, cu_seqlens)
        cos, sin = self.rotary(self.positions(input_ids, cu_seqlens))
        return self.run_blocks(self.tok_emb(input_ids), cos, sin, self.attention_for(cu_seqlens, max_seqlen))

    def attention_for(self, cu_seqlens, max_seqlen):
        """The causal attention function the blocks call for this input: q [B, T, Hq, D], k/v [B, T, Hkv, D] ->
        [B, T, Hq, D]; rows of plain causal SDPA, or the varlen backend over one packed row."""
        if cu_seqlens is None:
            return lambda q, k, v: sdpa_causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        attention = self.kernels.attention
        return lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens, max_seqlen).unsqueeze(0)

    def run_blocks(self, embedded, cos, sin, attend):
        fused = self.kernels.fused
        x = x0 = rms_norm(embedded, fused)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            x = block(x, x0, cos, sin, attend)
            if i < self.num_encoder_layers:
                skips.append(x)
        return rms_norm(x, fused)

    def embed_with_gists(self, input_ids):
        """Token embeddings, with ids >= vocab_size taken as gist slots (id - vocab_size indexes gist_emb)."""
        vocab = self.config.vocab_size
        is_gist = (input_ids >= vocab).unsqueeze(-1)
        tokens = self.tok_emb(input_ids.clamp(max=vocab - 1))
        gists = self.gist_emb((input_ids - vocab).clamp(0, self.config.gist_tokens - 1))
        return torch.where(is_gist, gists.to(tokens.dtype), tokens)

    def gist_hidden_states(self, input_ids, cu_seqlens=None):
        """hidden_states of a gist model. The input is laid out as the loader lays it out (insert_gist_slots): per
        piece of cu_seqlens, or per row of a [B, T] batch, L raw tokens, k gist slots, L raw tokens, ..."""
        B, T = input_ids.shape
        if cu_seqlens is None:  # rows: each row is one piece of one packed sequence
            cu_seqlens = torch.arange(0, B * T + 1, T, device=input_ids.device, dtype=torch.int32)
            input_ids = input_ids.reshape(1, B * T)
        n = input_ids.size(1)
        attention = self.kernels.gist_attention
        layout = attention.layout(gist_layout(cu_seqlens, n, self.config.gist_tokens, self.config.gist_segment), n)
        cos, sin = self.rotary(layout.positions[None])
        x = self.run_blocks(self.embed_with_gists(input_ids), cos, sin,
                            lambda q, k, v: attention(q[0], k[0], v[0], layout).unsqueeze(0))
        return x.reshape(B, T, -1)

    def head(self, x):
        """The tied lm_head's raw logits, before the softcap."""
        return F.linear(x, self.tok_emb.weight.to(x.dtype))

    def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen=0):
        """The per-token losses [B, T] in nats (fp32), 0 where the target is IGNORE_INDEX."""
        x = self.hidden_states(input_ids, cu_seqlens, max_seqlen)
        flat_x, flat_targets = x.flatten(0, 1), target_ids.flatten()
        if self.training:
            return self.token_losses(flat_x, flat_targets).view_as(target_ids)
        # Evaluation windows carry context positions whose targets are ignored (half of a strided window, most of a
        # TTT window): the lm_head, the largest matmul of a small model, runs only where a target is scored.
        scored = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=x.device)
        losses[scored] = self.token_losses(flat_x[scored], flat_targets[scored])
        return losses.view_as(target_ids)

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


# ----------------------------------------------------------------------------------------------------------------------
# 5. Optimizers


def orthogonalize_batched(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz quintic iteration (Muon) on a stack of same-shape matrices G [k, m, n] at once: for each, an
    approximately orthogonal matrix with its singular vectors. A few batched matmuls per step instead of a few per
    matrix; tests hold it to kernels/newton_schulz.py's reference, one matrix at a time (the fused Triton kernel, FUSED
    newton_schulz, is that reference's twin). bf16 on GPUs, as Muon."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(torch.bfloat16 if G.is_cuda else G.dtype)
    X = X / (X.norm(dim=(1, 2), keepdim=True) + eps)
    transposed = X.size(1) > X.size(2)
    if transposed:
        X = X.mT
    for _ in range(steps):
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
                 compile_step: bool = False, fused_newton_schulz: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.fused_newton_schulz = fused_newton_schulz
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
                    ortho = [kernels.fused_newton_schulz(directions[i], group["backend_steps"]) for i in mine]
                else:
                    ortho = self.orthogonalize_batched(torch.stack([directions[i] for i in mine]),
                                                       group["backend_steps"])
                scale = max(1.0, rows / cols) ** 0.5  # the same RMS update for tall matrices
                for i, g in zip(mine, ortho):
                    updates[offsets[i]: offsets[i + 1]] = (g.float() * scale).flatten()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            torch._foreach_add_(params, [updates[offsets[i]: offsets[i + 1]].view_as(p).to(p.dtype)
                                         for i, p in enumerate(params)], alpha=-group["lr"])


def optimizer_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Which optimizer trains each parameter, decided by what the parameter is, not by its number of dimensions:
    Muon orthogonalises the weight matrices of the blocks' linear layers; the embeddings (tokens, gist slots) and
    every control tensor (gains, scales, the 2 x width `resid_mix`, skip weights) go to Adam, as in parameter-golf."""
    linear_weights = {id(m.weight) for m in model.blocks.modules() if isinstance(m, CastedLinear)}
    groups = {"embedding": [], "matrices": [], "scalars": []}
    for name, p in model.named_parameters():
        if p is model.tok_emb.weight or name == "gist_emb.weight":
            groups["embedding"].append((name, p))
        elif id(p) in linear_weights:
            groups["matrices"].append((name, p))
        else:
            groups["scalars"].append((name, p))
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

    def adam_for(group: str, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": [p for _, p in groups[group]], "lr": lr, "base_lr": lr}], **adam)

    muon = Muon([p for _, p in groups["matrices"]], lr=hp.matrix_lr, momentum=hp.muon_momentum,
                backend_steps=hp.muon_backend_steps, compile_step=hp.compile and on_cuda,
                fused_newton_schulz="newton_schulz" in model.kernels.fused)
    muon.param_groups[0]["base_lr"] = hp.matrix_lr
    optimizers = Optimizers(adam_for("embedding", hp.tied_embed_lr), muon, adam_for("scalars", hp.scalar_lr))
    assert sum(len(g["params"]) for o in optimizers for g in o.param_groups) == len(list(model.parameters()))
    return optimizers


WARMDOWN_SHAPES = ("linear", "cosine", "sqrt")


def learning_rate_scale(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """Linear warm-up, then constant, then a warm-down to 0 over the last WARMDOWN_ITERS steps. With a wall-clock cap
    the warm-down starts when the time left, at the measured step time, is WARMDOWN_ITERS steps. The warm-down's
    shape maps the share of it still ahead, f (1 -> 0), to the scale: linear f, cosine (1 - cos(pi f)) / 2 (above
    linear in the first half, below in the second), sqrt 1 - sqrt(1 - f) (below linear throughout: it drops fastest at
    the start of the warm-down and flattens near 0)."""
    scale = min(1.0, (step + 1) / hp.lr_warmup_steps) if hp.lr_warmup_steps else 1.0
    if hp.warmdown_iters <= 0:
        return scale
    left = min(1.0, max(hp.iterations - step, 0) / hp.warmdown_iters)
    if hp.max_wallclock_seconds > 0 and step > 0:
        step_ms = elapsed_ms / step
        remaining_ms = max(hp.max_wallclock_seconds * 1000 - elapsed_ms, 0.0)
        left = min(left, remaining_ms / (hp.warmdown_iters * step_ms))
    if hp.warmdown_shape == "cosine":
        return scale * 0.5 * (1 - math.cos(math.pi * left))
    if hp.warmdown_shape == "sqrt":
        return scale * (1 - math.sqrt(1 - left))
    return scale * left


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


def autocast_context(device: torch.device):
    # bf16 matmuls on GPUs; plain fp32 on CPUs, where bf16 is slow and tests want tight tolerances
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)


def to_device(batch: MicroBatch, device: torch.device):
    def move(array):  # tensors from PrefetchingLoader are already pinned on CUDA: the copy is asynchronous
        tensor = torch.as_tensor(array)
        return tensor.to(device, non_blocking=tensor.is_pinned())

    return move(batch.inputs)[None], move(batch.targets)[None], move(batch.cu_seqlens)


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
        with autocast_context(device):
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
    put the weights, the optimizer state and the loader back as they were."""
    if hp.warmup_steps == 0:
        return
    model_state = copy.deepcopy(model.state_dict())
    optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader_state = loader.state_dict()
    start = time.perf_counter()
    for _ in range(hp.warmup_steps):
        forward_backward(model_fn, loader.next_step(), hp, device, reducer)
        optimizer_step(model, optimizers, hp, reducer)
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, optimizer_states):
        opt.load_state_dict(state)
    loader.load_state_dict(loader_state)
    model.zero_grad(set_to_none=False)
    log(f"compile_warmup steps:{hp.warmup_steps} time:{1000 * (time.perf_counter() - start):.0f}ms (not counted)")


def compile_counts() -> tuple[int, int]:
    """(graphs compiled so far, graph breaks so far) in this process, from Dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def train(hp: Hyperparameters, env: DistributedEnv, model_kernels: Kernels, log) -> int:
    """The whole run: data, model, optimizers, the timed loop, final evaluation and checkpoint. Returns an exit code."""
    device = env.device
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    random.seed(hp.seed)

    sp = load_tokenizer(hp.tokenizer_path)
    tokenizer_sha256 = sha256_of_file(hp.tokenizer_path)
    tables = build_byte_tables(sp, hp.vocab_size)
    train_stream = TokenStream(split_pattern(hp.data_path, "train"), hp.vocab_size)
    val = ValidationSet.load(hp.data_path, hp.vocab_size, tables, hp.val_max_docs)
    log(f"tokenizer: {hp.tokenizer_path} sha256:{tokenizer_sha256} pieces:{sp.vocab_size()}")
    log(f"train_data: shards:{len(train_stream.files)} documents:{train_stream.num_docs} tokens:{train_stream.num_tokens}")
    log(f"val_data: documents:{val.num_docs} tokens:{int(val.token_counts.sum())} bytes:{int(val.byte_counts.sum())}")

    document_loader = DocumentLoader(train_stream, LoaderConfig.from_hyperparameters(hp), env.rank, env.world_size)
    loader = PrefetchingLoader(document_loader, device)
    model = GPT(ModelConfig.from_hyperparameters(hp), model_kernels).to(device)
    optimizers = build_optimizers(model, hp)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model_params:{num_params} world_size:{env.world_size} grad_accum:{hp.train_micro_batches // env.world_size} "
        f"micro_batch_tokens:{document_loader.micro_tokens}")
    if hp.gist_tokens:
        log(f"gist: tokens:{hp.gist_tokens} segment:{hp.gist_segment} attention:{model_kernels.gist_attention.name} "
            f"micro_batch_slots:{document_loader.batch_length} (raw tokens plus gist slots and padding)")

    step, train_ms = 0, 0.0
    resumed_average = None
    if hp.resume:
        state = load_checkpoint(hp.resume, device)
        if "optimizers" not in state:
            raise DataError(f"{hp.resume}: not a resumable checkpoint (no optimizer state); use CHECKPOINT_EVERY")
        check_resume_settings(state, hp, tokenizer_sha256)
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        loader.load_state_dict(state["loader"])
        resumed_average = state.get("ema")
        step, train_ms = state["step"], state["train_time_ms"]
        restore_rng_states(state["rng"])
        log(f"resumed_from: {hp.resume} step:{step} train_time:{train_ms:.0f}ms")

    model_fn = torch.compile(model, dynamic=False, fullgraph=True) if hp.compile else model  # a graph break is an error
    reducer = GradientReducer(model)
    compile_warmup(model, model_fn, optimizers, reducer, loader, hp, device, log)
    graphs_after_warmup = compile_counts()[0] if hp.warmup_steps else None  # without warm-up: after the first step
    weight_average = WeightAverage(model, hp.ema_decay) if hp.ema_decay else None  # after the undone warm-up steps
    if weight_average and resumed_average is not None:
        weight_average.load_state_dict(resumed_average)

    # int6_gptq_lzma: the calibration's forward passes, in training steps (a forward costs less than a step: generous)
    calibration_share = (hp.artifact_calibration_batches / (hp.train_micro_batches // env.world_size)
                         if hp.artifact == "int6_gptq_lzma" else 0.0)
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
            result = evaluate(model, val, "flat", hp.train_seq_len, hp.eval_batch_tokens, env)
            log(validation_line(step, hp, result, train_ms))
            synchronize(device)
            t0 = time.perf_counter()

        # The schedule reads the elapsed time that every rank agreed on at the end of the last step, never a rank's own
        # clock: ranks start their clocks at different moments, and copies that take different learning rates drift.
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
        reduced = all_reduce_sum(torch.cat([totals, torch.tensor([float(stop_signal.requested)], device=device,
                                                                 dtype=torch.float64), clocks])).tolist()
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
            last_checkpoint = save_resumable_checkpoint(model, optimizers, loader, step, elapsed_ms, hp, tokenizer_sha256,
                                                        env, weight_average)
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
    log(f"loader: merged_micro_batches:{document_loader.merged_batches} max_segments:{document_loader.max_segments}")

    if weight_average:
        weight_average.copy_to_model()
        log(f"ema: decay:{hp.ema_decay} the final evaluation, checkpoint and artifact use the averaged weights")
    hessians = None
    if hp.artifact == "int6_gptq_lzma":  # on training batches, with the clock running
        start = time.perf_counter()
        hessians = gptq_hessians(model, loader, hp, device)
        synchronize(device)
        calibration_ms = slowest_rank_ms(1000 * (time.perf_counter() - start), device)
        train_ms += calibration_ms
        log(f"artifact_calibration: batches:{hp.artifact_calibration_batches * env.world_size} "
            f"time:{calibration_ms:.0f}ms train_time:{train_ms:.0f}ms (counted as training time)")
    # final evaluation, with the timer stopped
    strides = {"flat": hp.eval_window, "strided": hp.eval_stride}
    results = {mode: evaluate(model, val, mode, hp.eval_window, hp.eval_batch_tokens, env, stride=hp.eval_stride)
               for mode in hp.eval_modes.split(",")}
    if hp.val_loss_every:  # the last point of the periodic validation curve (flat windows of TRAIN_SEQ_LEN)
        same = "flat" in results and hp.eval_window == hp.train_seq_len
        curve = results["flat"] if same else evaluate(model, val, "flat", hp.train_seq_len, hp.eval_batch_tokens, env)
        log(validation_line(step, hp, curve, train_ms))
    for mode, result in results.items():
        log(f"final_eval mode:{mode} window:{hp.eval_window} stride:{strides[mode]} val_loss:{result.loss:.8f} "
            f"val_bpb:{result.bpb:.8f} docs:{val.num_docs} tokens:{result.total_tokens} bytes:{result.total_bytes} "
            f"eval_time:{1000 * result.seconds:.0f}ms")
    results = list(results.values())
    path = save_final_checkpoint(model, hp, tokenizer_sha256, step, results[-1], env)
    log(f"checkpoint: {path}")
    total_bytes = 0
    if hp.artifact != "none":  # the headline becomes the score of the model read back from the artifact
        roundtrip, total_bytes = export_artifact(model, hp, tokenizer_sha256, hessians, env, log)
        results = [evaluate(roundtrip, val, mode, hp.eval_window, hp.eval_batch_tokens, env, stride=hp.eval_stride)
                   for mode in hp.eval_modes.split(",")]
        for result in results:
            log(f"final_roundtrip codec:{hp.artifact} mode:{result.mode} window:{hp.eval_window} "
                f"stride:{strides[result.mode]} val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f} "
                f"eval_time:{1000 * result.seconds:.0f}ms")
    log(f"peak_memory: {peak_memory_mib(device):.0f}MiB")
    log(f"final val_loss:{results[-1].loss:.8f} val_bpb:{results[-1].bpb:.8f} mode:{results[-1].mode} steps:{step} "
        f"train_time:{train_ms:.0f}ms")
    if total_bytes > hp.artifact_limit_bytes:
        log(f"error: artifact {os.path.join(hp.checkpoint_dir, hp.run_id)}.ptz: {total_bytes} bytes (code + model) is "
            f"more than ARTIFACT_LIMIT_BYTES={hp.artifact_limit_bytes}")
        return 1
    return 0


def validation_line(step: int, hp: Hyperparameters, result: EvalResult, train_ms: float) -> str:
    return (f"step:{step}/{hp.iterations} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; this is the process RSS


# ----------------------------------------------------------------------------------------------------------------------
# 7. Evaluation
#
# Every score is per document: a scored token only ever sees earlier tokens of its own document. Both modes turn the
# documents into windows (doc, start, end, score_from): inputs are the document's tokens start..end-1, and the targets of
# positions score_from..end-1 are scored. Windows of many documents are packed into one varlen forward pass.
#   flat:    the validation documents concatenated and cut into contiguous windows of W tokens (older leaderboards);
#            a window boundary cuts a document's context.
#   strided: per document, the first W tokens, then S tokens at a time, each with the W - S tokens before it as context.


@dataclass
class ValidationSet:
    stream: TokenStream
    doc_ids: np.ndarray  # indices into the validation split, in order
    token_counts: np.ndarray  # scored tokens per document (all but the BOS)
    byte_counts: np.ndarray  # bytes those tokens stand for

    @classmethod
    def load(cls, data_path: str, vocab_size: int, tables: ByteTables, max_docs: int = 0) -> ValidationSet:
        stream = TokenStream(split_pattern(data_path, "val"), vocab_size)
        doc_ids = np.arange(stream.num_docs if not max_docs else min(max_docs, stream.num_docs))
        byte_counts = np.array([document_bytes(tables, stream.document(i)) for i in doc_ids], dtype=np.int64)
        return cls(stream, doc_ids, stream.doc_lengths[doc_ids] - 1, byte_counts)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def document(self, k: int) -> np.ndarray:
        """Tokens of the k-th selected document, BOS first."""
        return self.stream.document(int(self.doc_ids[k]))


def strided_windows(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, score_from) over a document's prediction positions 0..num_targets-1: the first `window`, then
    `stride` at a time, each with the `window - stride` positions before them as context (so stride == window gives
    non-overlapping windows from the document's start)."""
    end = min(window, num_targets)
    windows = [(0, end, 0)]
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        windows.append((max(0, end - (window - stride)), new_end, end))
        end = new_end
    return windows


def flat_windows(token_counts: np.ndarray, window: int) -> list[tuple[int, int, int, int]]:
    """(doc, start, end, score_from) pieces of the concatenated documents cut every `window` tokens."""
    items, position = [], 0
    for doc, count in enumerate(token_counts.tolist()):
        start = 0
        while start < count:
            end = min(count, start + window - (position + start) % window)
            items.append((doc, start, end, start))
            start = end
        position += count
    return items


def evaluation_windows(val: ValidationSet, mode: str, window: int, stride: int = 0):
    if mode == "flat":
        return flat_windows(val.token_counts, window)
    if mode == "strided":
        if not 0 < stride <= window:
            raise ConfigError(f"strided evaluation: stride {stride} must be in 1..{window} (the window)")
        return [(doc, *w) for doc, n in enumerate(val.token_counts.tolist()) for w in strided_windows(n, window, stride)]
    raise ConfigError(f"evaluation mode {mode!r}: must be flat or strided")


def assign_documents(lengths, world_size: int) -> list[list[int]]:
    """Deterministic length-balanced assignment of documents to ranks (longest first, to the least-loaded rank, ties to
    the lowest rank). Every rank computes the same answer; no coordination needed."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for doc in sorted(range(len(lengths)), key=lambda d: (-int(lengths[d]), d)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(doc)
        loads[rank] += int(lengths[doc])
    return [sorted(s) for s in shares]


def pack_windows(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group windows (by index) into batches of at most batch_tokens tokens, longest first (first-fit decreasing)."""
    batches, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                batches[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            batches.append([i])
            room.append(batch_tokens - lengths[i])
    return batches


@torch.no_grad()
def score_windows(model: GPT, val: ValidationSet, windows, batch_tokens: int, device: torch.device):
    """Per-token losses (nats) of the scored positions, as {doc: float64 array over the document's targets}."""
    docs = {doc: val.document(doc) for doc in sorted({w[0] for w in windows})}
    losses = {doc: np.full(len(tokens) - 1, np.nan) for doc, tokens in docs.items()}
    lengths = [end - start for _, start, end, _ in windows]
    gist_tokens, gist_segment, vocab_size = model.config.gist_tokens, model.config.gist_segment, model.config.vocab_size
    was_training = model.training
    model.eval()
    batch_tokens = max(batch_tokens, max(lengths, default=1))
    # A compiled gist attention (flex on CUDA) is built for one shape: every batch is padded to the most tokens a
    # batch of batch_tokens raw tokens can have with its slots, so the evaluation compiles once, not once per batch.
    fixed_gist_length = (gist_micro_batch_length(batch_tokens, gist_tokens, gist_segment)
                         if gist_tokens and model.kernels.gist_attention.fixed_shapes else 0)
    for batch in pack_windows(lengths, batch_tokens):
        inputs = np.concatenate([docs[windows[i][0]][windows[i][1]: windows[i][2]] for i in batch])
        targets = np.concatenate([docs[windows[i][0]][windows[i][1] + 1: windows[i][2] + 1] for i in batch])
        cu_seqlens = np.concatenate([[0], np.cumsum([lengths[i] for i in batch])]).astype(np.int32)
        model_inputs, model_targets, model_cu = inputs, targets.astype(np.int64), cu_seqlens
        if gist_tokens:  # each window is a piece of its own, read in segments with gist slots after them
            length = fixed_gist_length or int(gist_piece_lengths(np.diff(cu_seqlens), gist_tokens, gist_segment).sum())
            model_inputs, model_targets, model_cu = insert_gist_slots(inputs, model_targets, cu_seqlens, gist_tokens,
                                                                      gist_segment, vocab_size, length)
        with autocast_context(device):
            token_losses = model(torch.from_numpy(model_inputs).to(device)[None],
                                 torch.from_numpy(model_targets).to(device)[None],
                                 torch.from_numpy(model_cu).to(device), max(lengths[i] for i in batch))
        token_losses = token_losses[0].double().cpu().numpy()
        if gist_tokens:
            token_losses = token_losses[model_inputs < vocab_size][: len(inputs)]  # raw tokens in order, no padding
        for i, offset in zip(batch, cu_seqlens[:-1].tolist()):
            doc, start, end, score_from = windows[i]
            losses[doc][score_from:end] = token_losses[offset + score_from - start: offset + end - start]
    model.train(was_training)
    return losses


@dataclass
class EvalResult:
    mode: str
    doc_nats: np.ndarray  # per selected document
    doc_tokens: np.ndarray
    doc_bytes: np.ndarray
    seconds: float
    token_losses: dict | None = None  # {doc: per-token losses}, this rank's documents only

    @property
    def total_tokens(self) -> int:
        return int(self.doc_tokens.sum())

    @property
    def total_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    @property
    def loss(self) -> float:
        return float(self.doc_nats.sum() / max(self.total_tokens, 1))

    @property
    def bpb(self) -> float:
        return bits_per_byte(float(self.doc_nats.sum()), self.total_bytes)


def evaluate(model: GPT, val: ValidationSet, mode: str, window: int, batch_tokens: int,
             env: DistributedEnv | None = None, stride: int = 0, keep_token_losses: bool = False) -> EvalResult:
    """Score every selected validation document (strided mode needs the stride); documents are shared out over the
    ranks and the sums all-reduced."""
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    device = next(model.parameters()).device
    start_time = time.perf_counter()
    mine = set(assign_documents(val.token_counts, world)[rank])
    windows = [w for w in evaluation_windows(val, mode, window, stride) if w[0] in mine]
    losses = score_windows(model, val, windows, batch_tokens, device)
    return gather_result(mode, val, losses, start_time, device, keep_token_losses)


def gather_result(mode: str, val: ValidationSet, losses: dict, start_time: float, device,
                  keep_token_losses: bool = False) -> EvalResult:
    """Sum this rank's per-token losses per document, all-reduce the sums over ranks, and time the evaluation."""
    doc_nats = torch.zeros(val.num_docs, dtype=torch.float64, device=device)
    for doc, values in losses.items():
        assert not np.isnan(values).any(), f"document {doc}: a token was not scored"
        doc_nats[doc] = float(values.sum())
    all_reduce_sum(doc_nats)
    synchronize(device)
    return EvalResult(mode, doc_nats.cpu().numpy(), val.token_counts.copy(), val.byte_counts.copy(),
                      time.perf_counter() - start_time, losses if keep_token_losses else None)


# ----------------------------------------------------------------------------------------------------------------------
# 8. Checkpoints, logging and main


def write_atomic(path: str, content) -> None:
    """Write `content` (bytes, or a function that writes the file under the temporary name it is given) to a temporary
    file beside `path` (the folder is created if missing), then rename it: a crash never leaves half a file under the
    real name, and a failure leaves no temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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


@torch.no_grad()
def gptq_hessians(model: GPT, loader, hp: Hyperparameters, device: torch.device) -> dict[str, torch.Tensor]:
    """X^T X of the inputs of every matrix GPTQ quantizes, over the next ARTIFACT_CALIBRATION_BATCHES training
    micro-batches of this process (never validation data), summed over processes. Computed on an unfused twin of the
    model: a fused relu2_linear reads mlp.fc.weight without calling the layer, so its inputs would go unseen."""
    twin = GPT(model.config, Kernels(attention=model.kernels.attention,
                                     gist_attention=model.kernels.gist_attention)).to(device)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    names = [name for name, how in quantization_plan(model.state_dict(), hp.artifact).items() if how == "int6_gptq"]
    batches = []
    while len(batches) < hp.artifact_calibration_batches:
        batches += loader.next_step()

    def forward(net, batch):
        inputs, targets, cu_seqlens = to_device(batch, device)
        with autocast_context(device):
            net(inputs, targets, cu_seqlens, hp.train_seq_len)

    hessians = collect_hessians(twin, batches[:hp.artifact_calibration_batches], forward, names)
    for hessian in hessians.values():
        all_reduce_sum(hessian)
    return hessians


def export_artifact(model: GPT, hp: Hyperparameters, tokenizer_sha256: str, hessians, env, log) -> tuple[GPT, int]:
    """Write CHECKPOINT_DIR/<RUN_ID>.ptz (rank 0), log its size with the record's code, and return the model read
    back from the file (every rank reads it: the round trip is through the bytes that would be submitted) and the
    total bytes."""
    path = os.path.join(hp.checkpoint_dir, f"{hp.run_id}.ptz")
    if env.is_main:
        start = time.perf_counter()
        meta = {**checkpoint_metadata(hp, tokenizer_sha256), "codec": hp.artifact, "run_id": hp.run_id}
        write_atomic(path, encode_artifact(model.state_dict(), hp.artifact, meta, hessians))
        log(f"artifact_encode: codec:{hp.artifact} time:{1000 * (time.perf_counter() - start):.0f}ms")
    if is_distributed():
        dist.barrier()
    root = Path(__file__).resolve().parent
    code = record_source_files()
    model_bytes, code_bytes = os.path.getsize(path), sum(f.stat().st_size for f in code)
    total = model_bytes + code_bytes
    log(f"artifact: codec:{hp.artifact} model_bytes:{model_bytes} code_bytes:{code_bytes} total_bytes:{total} "
        f"limit:{hp.artifact_limit_bytes} files:{path}," + ",".join(f.relative_to(root).as_posix() for f in code))
    device = model.tok_emb.weight.device
    roundtrip = GPT(model.config, model.kernels).to(device)  # same shape and kernels, weights from the file
    roundtrip.load_state_dict(load_checkpoint(path, device)["model"])
    return roundtrip, total


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
    """The model of a checkpoint (final or resumable), with these kernels, and the checkpoint's metadata."""
    state = load_checkpoint(path, device)
    config = ModelConfig(**state["model_config"])
    model = GPT(config, choose_kernels(fused, attn_backend, config.gist_tokens, device)).to(device)
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


def record_source_files() -> list[Path]:
    """The code a run depends on, embedded in its log so a record can be checked byte for byte."""
    here = Path(__file__).resolve().parent
    files = [Path(__file__).resolve()] + sorted((here / "kernels").glob("*.py"))
    if (here / "eval_ttt.py").is_file():
        files.append(here / "eval_ttt.py")
    return files


def embedded_source(files: list[Path], root: Path) -> str:
    """`#### file NAME bytes=N sha256=H`, then exactly N bytes of the file, then `#### end NAME`."""
    parts = []
    for path in files:
        data = path.read_bytes()
        name = path.relative_to(root).as_posix()
        parts.append(f"#### file {name} bytes={len(data)} sha256={hashlib.sha256(data).hexdigest()}\n"
                     f"{data.decode('utf-8')}\n#### end {name}\n")
    return "".join(parts)


def versions_line() -> str:
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
    """Rank 0 prints each line and appends it to logs/<RUN_ID>.txt; other ranks stay quiet. A new run starts the file
    afresh; a resumed run (append=True) continues it, so the steps before the interruption stay in the record."""

    def __init__(self, path: str | None, append: bool = False):
        self.path = path
        self.continues = bool(path) and append and os.path.isfile(path)
        if path and not self.continues:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            open(path, "w").close()

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
    hp.run_id = rank0_string(hp.run_id)  # a timestamp RUN_ID can differ by a second between ranks
    log = Logger(os.path.join(hp.log_dir, f"{hp.run_id}.txt") if env.is_main else None, append=bool(hp.resume))
    try:
        model_kernels = choose_kernels(parse_fused_ops(hp.fused), hp.attn_backend, hp.gist_tokens, env.device,
                                       compiling=hp.compile)
        if log.continues:  # the log already starts with the code; the resumed run's lines follow the earlier ones
            log(f"resumed_log: {hp.resume}")
        else:
            log.raw(embedded_source(record_source_files(), Path(__file__).resolve().parent))
        log(versions_line())
        log(gpu_line(env.world_size))
        log("env_overrides: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in Hyperparameters.env_overrides().items()))
        for f in dataclasses.fields(hp):
            log(f"hparam {f.name}={getattr(hp, f.name)}")
        log(f"attention_backend: {attention_name(model_kernels, hp.gist_tokens)}")
        log(f"fused_ops: {','.join(sorted(model_kernels.fused)) or 'none'}")
        return train(hp, env, model_kernels, log)
    except (ConfigError, DataError, BackendError) as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
            log.raw(f"error: {e}\n")
        return 2
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

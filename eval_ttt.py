"""
eval_ttt.py: bits per byte of a trained model, document by document, with test-time training (TTT).

    result = evaluate(model, val, EvalSpec(mode="ttt", window=256, chunk=64))    # an EvalResult: .bpb, .loss, ...

Modes (all but phased per document: no scored token ever sees another document):
  flat     the validation documents concatenated and cut into contiguous windows of W tokens (older leaderboards);
           a window boundary cuts a document's context
  strided  per document, the first W tokens, then S tokens at a time, each with the W - S tokens before it
  ttt      per-document LoRA adapters, reset for every document. The document is cut into chunks of C tokens; each chunk
           is first scored with the current adapters (with up to W tokens of input ending at the chunk's end), then the
           adapters take one Adam step on that chunk's loss. A chunk's score depends only on the tokens before it.
           (With warm_a, a slot keeps its A from document to document: that reads other documents, cross-document.)
  phased   CROSS-DOCUMENT, score-first (parameter-golf's phased TTT): ttt, plus global adaptation at the thresholds
           phase_docs of the scoring order (longest document first): once the first t documents are scored, every
           process pauses and all the model's weights take SGD steps (momentum, clipping, cosine lr) over those t
           documents, then TTT goes on with fresh adapters. A score depends only on what comes before it in the
           scoring order: the tokens before it in its document, and the documents scored before it.
  gist     for a model trained with gist tokens (gist.py): each document in pieces of W tokens, read segment by
           segment with exactly the training mask

Command line (a checkpoint .pt or an artifact .ptz of train_gpt.py):
  python eval_ttt.py --checkpoint checkpoints/RUN.pt --mode ttt --out results.json --dump-token-losses losses.npy
  torchrun --nproc_per_node=8 eval_ttt.py --checkpoint RUN.ptz --mode strided --window 1024 --stride 512
  python eval_ttt.py --checkpoint RUN.ptz --mode phased --phase-docs 833,1666,2500 --check-causality --max-docs 8

The model is any object with train_gpt.GPT's public methods: forward(input_ids, target_ids, cu_seqlens, max_seqlen,
head_correction) -> per-token losses, adaptable_linears(), set_rope_ntk_alpha(alpha), fixed_shapes, config, kernels
(and for gist mode gist_document_losses and gist_context_slots). This module never imports train_gpt (train_gpt imports it for its final evaluation): the
command line is handed train_gpt, which builds the model from the checkpoint, by the script's entry point.

TTT batching: each process takes its documents, longest first, and runs them in a batch of doc_batch slots, one
document per slot: every step scores and trains chunk j_s of the document in slot s, as one [slots, <= W] forward and
backward. Each slot has its own adapter weights A [slots, r, in] and B [slots, out, r] (B = 0 at the start, A the same
seeded random matrix for every document) and its own Adam moments and step count. A finished slot is refilled at once,
so the batch stays full; per-slot step counts make a slot's trajectory the same whatever its batch-mates. Rows are
padded at their end, where causal attention keeps the real tokens blind to the padding. Which slot runs which document
is arithmetic on the lengths (lane_queues). A cross-document evaluation (phased, warm_a) deals its doc_batch slots over
the processes (slot s to process s mod world size), so its scores do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.files import sha256_file, write_atomic
from data.loader import (IGNORE_INDEX, ConfigError, DataError, ValidationSet, bits_per_byte, build_byte_tables,
                         load_tokenizer)
from kernels.attention import BackendError

MODES = ("flat", "strided", "ttt", "phased", "gist")
TTT_MODES = ("ttt", "phased")  # the modes that train adapters
# lora_targets names -> the projections adapters attach to (per block; "head" is the tied lm_head)
TARGET_GROUPS = {"q": ("attn.q",), "k": ("attn.k",), "v": ("attn.v",), "o": ("attn.o",), "fc": ("mlp.fc",),
                 "proj": ("mlp.proj",), "mlp": ("mlp.fc", "mlp.proj"), "attn": ("attn.q", "attn.k", "attn.v", "attn.o"),
                 "head": ()}
ALL_TARGETS = ("q", "k", "v", "o", "mlp", "head")


# ----------------------------------------------------------------------------------------------------------------------
# What to evaluate, and the result


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation's settings, checked when made; the command line's defaults are these. stride 0 and chunk 0 follow
    the window (W/2 and W/4) and are resolved when the spec is made."""

    mode: str = "strided"  # flat | strided | ttt | phased | gist
    window: int = 1024  # tokens of input per window (strided, flat), per chunk's window (ttt), per piece (gist)
    stride: int = 0  # strided: tokens scored per window after the first
    batch_tokens: int = 65_536  # flat, strided, phased's global steps: tokens per forward pass
    chunk: int = 0  # ttt: tokens scored, then trained on, per step
    lora_rank: int = 16
    lora_lr: float = 0.005  # Adam learning rate of the adapters
    lora_targets: tuple[str, ...] = ALL_TARGETS
    doc_batch: int = 16  # ttt: documents per forward and backward (phased, warm_a: over all processes together)
    seed: int = 0  # ttt: of the adapters' shared initial A matrices
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # ttt: AdamW's decoupled weight decay of the adapters (0: Adam)
    lora_alpha: float = 0.0  # ttt: the adapters' output times lora_alpha / lora_rank (0: times 1)
    warm_a: bool = False  # ttt: a slot's next document starts from its trained A (B, Adam reset): cross-document
    virtual_layers: bool = False  # ttt: an adapter per virtual layer (each call of a block depth recurrence repeats)
    phase_docs: tuple[int, ...] = ()  # phased: global SGD once this many documents of the scoring order are scored
    global_lr: float = 1e-3  # phased: SGD learning rate at a phase's first chunk, cosine over its chunks (cosine_lr)
    global_momentum: float = 0.9
    global_clip: float = 1.0  # phased: gradient norm clipped to this (0: no clipping)
    global_chunk: int = 32_768  # phased: tokens per SGD step
    rope_ntk_alpha: float = 1.0  # NTK-aware RoPE scaling for windows longer than training

    def __post_init__(self):
        if not self.stride:
            object.__setattr__(self, "stride", default_stride(self.window))
        if not self.chunk:
            object.__setattr__(self, "chunk", max(1, self.window // 4))
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets))
        object.__setattr__(self, "phase_docs", parse_phase_docs(self.phase_docs))

        def need(condition: bool, name: str, problem: str) -> None:
            if not condition:
                raise SpecError(name, getattr(self, name), problem)

        need(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        for name in ("window", "batch_tokens", "lora_rank", "doc_batch", "global_chunk"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(0 < self.stride <= self.window, "stride", f"must be in 1..window ({self.window})")
        need(self.chunk > 0, "chunk", "must be a positive integer")
        need(self.mode not in TTT_MODES or self.chunk <= self.window, "chunk", f"must be <= the window ({self.window})")
        for name in ("lora_lr", "weight_decay", "lora_alpha", "global_lr", "global_clip"):
            need(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), name, "must be a finite number >= 0")
        need(0 <= self.global_momentum < 1, "global_momentum", "must be in [0, 1)")
        need(self.mode != "phased" or bool(self.phase_docs), "phase_docs", "phased mode needs at least one threshold")
        need(self.rope_ntk_alpha > 0 and math.isfinite(self.rope_ntk_alpha), "rope_ntk_alpha", "must be > 0")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")

    def settings(self) -> dict:
        """The settings that decide this mode's scores (the others are left out), for results files and logs."""
        ttt = ("window", "chunk", "lora_rank", "lora_lr", "lora_targets", "doc_batch", "seed", "beta1", "beta2", "eps",
               "weight_decay", "lora_alpha", "warm_a", "virtual_layers")
        names = {"flat": ("window", "batch_tokens"), "strided": ("window", "stride", "batch_tokens"), "ttt": ttt,
                 "phased": ttt + ("phase_docs", "global_lr", "global_momentum", "global_clip", "global_chunk",
                                  "batch_tokens"),
                 "gist": ("window",)}[self.mode]
        values = {name: getattr(self, name) for name in ("mode",) + names + ("rope_ntk_alpha",)}
        for name in ("lora_targets", "phase_docs"):
            if name in values:
                values[name] = ",".join(map(str, values[name]))
        return {**values, "documents": self.documents}

    @property
    def documents(self) -> str:
        """per-document: no score sees another document; cross-document: a score may depend on the documents scored
        before it (phased mode's global steps, warm A carried from a slot's earlier documents)."""
        cross = self.mode == "phased" or (self.mode == "ttt" and self.warm_a)
        return "cross-document" if cross else "per-document"


class SpecError(ConfigError):
    """An EvalSpec setting the evaluation cannot run with."""

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{name} {value}: {problem}")


def default_stride(window: int) -> int:
    """The strided evaluation's stride when none is given: half the window (each scored token sees at least W/2)."""
    return max(1, window // 2)


def parse_targets(spec) -> tuple[str, ...]:
    """LoRA targets from a comma-separated string or a sequence of names; "all" is every projection and the head."""
    names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    if names == ("all",):
        names = ALL_TARGETS
    unknown = [n for n in names if n not in TARGET_GROUPS]
    if not names or unknown:
        problem = f"unknown LoRA target {unknown[0]!r}" if unknown else "no LoRA target given"
        raise SpecError("lora_targets", ",".join(names), f"{problem}; known: {', '.join(TARGET_GROUPS)}, all")
    return names


def parse_phase_docs(spec) -> tuple[int, ...]:
    """Phase thresholds (documents scored) from "833,1666,2500" or a sequence of ints: positive, increasing."""
    try:
        values = tuple(int(v) for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip())
    except ValueError:
        raise SpecError("phase_docs", spec, "must be comma-separated integers") from None
    if any(v <= 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise SpecError("phase_docs", ",".join(map(str, values)), "must be positive and increasing")
    return values


@dataclass
class EvalResult:
    mode: str
    doc_nats: np.ndarray  # per selected document
    doc_tokens: np.ndarray
    doc_bytes: np.ndarray
    seconds: float
    token_losses: dict | None = None  # {doc: per-token losses}, this process's documents only
    phases: list | None = None  # phased: one {docs, tokens, steps, seconds} per global adaptation

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


def evaluate(model, data: ValidationSet, spec: EvalSpec, *, process: tuple[int, int] | None = None,
             keep_token_losses: bool = False, progress=None) -> EvalResult:
    """Score every selected document of `data` as `spec` says. The documents are shared out over the processes
    (process = (rank, world size); default: torch.distributed's, or one process), and the per-document sums
    all-reduced, so every process returns the whole result; token_losses hold this process's documents only."""
    rank, world = process or ((dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1))
    if spec.mode in TTT_MODES and model.config.gist_tokens:
        raise SpecError("mode", spec.mode, "not implemented for gist models (use gist, strided or flat)")
    if spec.mode == "gist" and not model.config.gist_tokens:
        raise SpecError("mode", "gist", "the checkpoint's model has no gist tokens (trained with GIST_TOKENS=0)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.set_rope_ntk_alpha(spec.rope_ntk_alpha)
    synchronize(device)
    start = time.perf_counter()
    phases = None
    try:
        if spec.mode in TTT_MODES:
            losses, phases = ttt_losses(model, data, spec, (rank, world), progress)
        else:
            mine = assign_documents(data.token_counts, world)[rank]
            if spec.mode == "gist":
                losses = {d: model.gist_document_losses(data.document(d), spec.window) for d in mine}
            else:
                windows = [w for w in evaluation_windows(data, spec) if w[0] in set(mine)]
                losses = window_losses(model, data, windows, spec.batch_tokens)
    finally:
        model.set_rope_ntk_alpha(1.0)
        model.train(was_training)
    doc_nats = torch.zeros(data.num_docs, dtype=torch.float64, device=device)
    for doc, values in losses.items():
        if np.isnan(values).any():
            raise RuntimeError(f"document {doc}: a token was not scored ({spec.mode} evaluation)")
        doc_nats[doc] = float(values.sum())
    sum_over_processes(doc_nats)
    synchronize(device)
    return EvalResult(spec.mode, doc_nats.cpu().numpy(), data.token_counts.copy(), data.byte_counts.copy(),
                      time.perf_counter() - start, losses if keep_token_losses else None, phases)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def assign_documents(lengths, world_size: int) -> list[list[int]]:
    """Deterministic length-balanced assignment of documents to processes (longest first, to the least-loaded one,
    ties to the lowest rank). Every process computes the same answer; no coordination needed."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for doc in sorted(range(len(lengths)), key=lambda d: (-int(lengths[d]), d)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(doc)
        loads[rank] += int(lengths[doc])
    return [sorted(s) for s in shares]


# ----------------------------------------------------------------------------------------------------------------------
# flat and strided: windows (doc, start, end, score_from) packed into varlen forward passes. A window's inputs are the
# document's tokens start..end-1; the targets of positions score_from..end-1 are scored.


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


def evaluation_windows(data: ValidationSet, spec: EvalSpec) -> list[tuple[int, int, int, int]]:
    if spec.mode == "flat":
        return flat_windows(data.token_counts, spec.window)
    return [(doc, *w) for doc, n in enumerate(data.token_counts.tolist())
            for w in strided_windows(n, spec.window, spec.stride)]


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


def packed_forwards(model, docs: dict[int, np.ndarray], windows, batch_tokens: int):
    """Per batch of windows (doc, start, end, score_from) (pack_windows): (the batch's window indices, their offsets in
    the packed row, the per-token losses [tokens] of one varlen forward) where a window's inputs are its document's
    tokens start..end-1 and its targets start+1..end (window_losses keeps those from score_from on). A model whose
    attention is compiled for one shape (fixed_shapes) gets every batch padded to batch_tokens tokens, with a segment
    of its own whose targets are ignored."""
    lengths = [end - start for _, start, end, _ in windows]
    device = next(model.parameters()).device
    batch_tokens = max(batch_tokens, max(lengths, default=1))
    pad = model.fixed_shapes
    for batch in pack_windows(lengths, batch_tokens):
        inputs = np.concatenate([docs[windows[i][0]][windows[i][1]: windows[i][2]] for i in batch])
        targets = np.concatenate([docs[windows[i][0]][windows[i][1] + 1: windows[i][2] + 1] for i in batch])
        cu_seqlens = np.concatenate([[0], np.cumsum([lengths[i] for i in batch])]).astype(np.int32)
        real = len(inputs)
        if pad and real < batch_tokens:
            inputs = np.concatenate([inputs, np.zeros(batch_tokens - real, dtype=inputs.dtype)])
            targets = np.concatenate([targets, np.full(batch_tokens - real, IGNORE_INDEX, dtype=targets.dtype)])
            cu_seqlens = np.append(cu_seqlens, batch_tokens).astype(np.int32)
        token_losses = model(torch.from_numpy(inputs.astype(np.int64)).to(device)[None],
                             torch.from_numpy(targets.astype(np.int64)).to(device)[None],
                             torch.from_numpy(cu_seqlens).to(device), max(lengths[i] for i in batch))
        yield batch, cu_seqlens[:-1].tolist(), token_losses[0]


@torch.no_grad()
def window_losses(model, data: ValidationSet, windows, batch_tokens: int) -> dict[int, np.ndarray]:
    """Per-token losses (nats) of the scored positions, as {doc: float64 array over the document's targets}."""
    docs = {doc: data.document(doc) for doc in sorted({w[0] for w in windows})}
    losses = {doc: np.full(len(tokens) - 1, np.nan) for doc, tokens in docs.items()}
    for batch, offsets, token_losses in packed_forwards(model, docs, windows, batch_tokens):
        token_losses = token_losses.double().cpu().numpy()
        for i, offset in zip(batch, offsets):
            doc, start, end, score_from = windows[i]
            losses[doc][score_from:end] = token_losses[offset + score_from - start: offset + end - start]
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# ttt: batched per-document LoRA, score first, then one Adam step


def linear_calls(model) -> dict[str, int]:
    """How many times one forward calls each adaptable projection: once per virtual layer of its block (depth
    recurrence runs a block several times). Counted on a two-token input."""
    layers = model.adaptable_linears()
    calls = dict.fromkeys(layers, 0)
    handles = [layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
               for name, layer in layers.items()]
    try:
        with torch.no_grad():
            ids = torch.ones(1, 2, dtype=torch.int64, device=next(model.parameters()).device)
            model(ids, ids)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def adapter_name(projection: str, call: int) -> str:
    """The adapter of a projection's call-th call in a forward, when every virtual layer has its own."""
    return f"{projection}@{call}" if call else projection


def lora_shapes(model, targets, virtual_layers: bool = False) -> dict[str, tuple[int, int]]:
    """{adapter name: (in_features, out_features)} of the projections the adapters cover ("head": the tied head); with
    virtual_layers, one adapter per call of the projection in a forward (adapter_name)."""
    suffixes = {s for t in targets for s in TARGET_GROUPS[t]}
    calls = linear_calls(model) if virtual_layers else {}
    shapes = {}
    for name, module in model.adaptable_linears().items():
        if name.split(".", 2)[2] in suffixes:
            out_features, in_features = module.weight.shape
            for call in range(calls.get(name, 1)):
                shapes[adapter_name(name, call)] = (in_features, out_features)
    if "head" in targets:
        shapes["head"] = (model.config.model_dim, model.config.vocab_size)
    return shapes


# A fused kernel that computes a projection without calling its layer, so a forward hook never sees it.
BYPASSES_HOOKS = frozenset({"relu2_linear"})


def ttt_fused_ops(fused: frozenset) -> frozenset:
    """The fused ops a TTT model can use: all but those that bypass the adapters' hooks."""
    return fused - BYPASSES_HOOKS


@contextlib.contextmanager
def adapted(model, lora: BatchedLoRA):
    """The model with lora.delta(name, x) added to the output of each adapted projection (forward hooks on the model's
    linear layers: the model knows nothing of adapters). One forward per use: the count of each projection's calls
    (which virtual layer is running) starts at zero."""
    bypassing = sorted(model.kernels.fused & BYPASSES_HOOKS)
    if bypassing:
        raise ConfigError(f"TTT adapters need a model without the fused ops {', '.join(bypassing)} (they bypass the "
                          "adapted layers); load it with ttt_fused_ops()")
    layers = model.adaptable_linears()
    lora.calls = dict.fromkeys(lora.projections, 0)
    handles = [layers[name].register_forward_hook(lambda module, args, out, name=name: out + lora.delta(
        name, args[0]).to(out.dtype)) for name in lora.projections]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def initial_lora_a(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The A matrix every document starts from, [rank, in] per projection (B starts at zero, so the adapted model starts
    as the model). The same for every document: it depends on the seed and the shapes only."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            for name, (fan_in, _) in sorted(shapes.items())}


class BatchedLoRA:
    """Per-slot LoRA adapters and AdamW state for a batch of documents.

    delta_s(x) = scale * (x @ A_s^T) @ B_s^T for slot s, A [slots, r, in], B [slots, out, r], scale = lora_alpha / r
    (1 without lora_alpha). AdamW (as torch.optim.AdamW: decoupled weight decay, Adam without it) keeps its moments
    and its step count per slot."""

    def __init__(self, shapes, spec: EvalSpec, slots: int, device: torch.device):
        self.spec, self.slots = spec, slots
        self.names = tuple(sorted(shapes))  # the adapters
        self.projections = tuple(sorted({n.split("@")[0] for n in self.names} - {"head"}))  # the layers they adapt
        self.per_call = spec.virtual_layers
        self.scale = spec.lora_alpha / spec.lora_rank if spec.lora_alpha else 1.0
        self.calls = dict.fromkeys(self.projections, 0)
        self.a0 = {n: a.to(device) for n, a in initial_lora_a(shapes, spec.lora_rank, spec.seed).items()}
        self.params: dict[str, torch.Tensor] = {}
        for name, (fan_in, fan_out) in shapes.items():
            self.params[f"{name}.A"] = self.a0[name].expand(slots, -1, -1).clone()
            self.params[f"{name}.B"] = torch.zeros(slots, fan_out, spec.lora_rank, device=device)
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.steps = torch.zeros(slots, dtype=torch.float64)
        self.live: dict[str, torch.Tensor] = {}  # the current step's slots' weights, requiring grad

    def reset(self, slot: int) -> None:
        """A fresh adapter for a new document: B = 0, no AdamW history, and A = A0 (warm_a: A as the slot's last
        document left it)."""
        for key, p in self.params.items():
            if key.endswith(".B"):
                p[slot].zero_()
            elif not self.spec.warm_a:
                p[slot] = self.a0[key[:-2]]
            self.exp_avg[key][slot].zero_()
            self.exp_avg_sq[key][slot].zero_()
        self.steps[slot] = 0

    def select(self, slots: torch.Tensor) -> None:
        """Use the adapters of these slots (in this order) for the next forward: row i of the batch is slot slots[i]."""
        self.index = slots
        self.live = {k: p[slots].requires_grad_(True) for k, p in self.params.items()}

    def delta(self, projection: str, x: torch.Tensor) -> torch.Tensor:
        """The adapters' output for x [rows, T, in] of this call of projection `projection` -> [rows, T, out]."""
        call = self.calls[projection]
        self.calls[projection] = call + 1
        name = adapter_name(projection, call) if self.per_call else projection
        a, b = self.live[f"{name}.A"], self.live[f"{name}.B"]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype)) * self.scale

    def head_delta(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The head adapters' output [n, V] for the scored positions only: x [n, D], rows [n] the batch row of each
        (ascending). Each row's positions are laid out in a [rows, most, D] block for two batched matmuls."""
        a, b = self.live["head.A"], self.live["head.B"]
        first = torch.searchsorted(rows, torch.arange(a.size(0), device=rows.device))
        column = torch.arange(len(rows), device=rows.device) - first[rows]
        block = x.new_zeros(a.size(0), int(column.max()) + 1 if len(rows) else 0, x.size(1))
        block[rows, column] = x
        out = torch.bmm(torch.bmm(block, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype))
        return out[rows, column] * self.scale

    def step(self, loss: torch.Tensor, rows: list[int]) -> None:
        """One AdamW step, for the selected slots at positions `rows`, on `loss` (a sum of per-slot losses, so each
        slot gets the gradient of its own loss only)."""
        keys = list(self.live)
        grads = torch.autograd.grad(loss, [self.live[k] for k in keys])
        spec = self.spec
        rows_t = torch.tensor(rows, device=self.index.device)
        index, cpu_index = self.index[rows_t], self.index[rows_t].cpu()
        self.steps[cpu_index] += 1
        steps = self.steps[cpu_index].to(index.device)
        bias1 = (1 - spec.beta1 ** steps).float().view(-1, 1, 1)
        bias2_sqrt = (1 - spec.beta2 ** steps).sqrt().float().view(-1, 1, 1)
        decay = 1 - spec.lora_lr * spec.weight_decay
        with torch.no_grad():
            for key, grad in zip(keys, grads):
                grad = grad[rows_t]
                m = self.exp_avg[key][index].lerp_(grad, 1 - spec.beta1)
                v = self.exp_avg_sq[key][index].mul_(spec.beta2).addcmul_(grad, grad, value=1 - spec.beta2)
                update = (spec.lora_lr / bias1) * m / (v.sqrt() / bias2_sqrt + spec.eps)
                self.params[key][index] = self.live[key].detach()[rows_t] * decay - update
                self.exp_avg[key][index] = m
                self.exp_avg_sq[key][index] = v
        self.live = {}


def adapted_losses(model, lora: BatchedLoRA, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per-token losses [rows, T] of the model with the selected slots' adapters (one row per slot)."""
    head = None
    if "head" in lora.names:
        length = input_ids.size(1)
        head = lambda x, index: lora.head_delta(x, torch.div(index, length, rounding_mode="floor"))  # noqa: E731
    with adapted(model, lora):
        return model(input_ids, target_ids, head_correction=head)


def chunk_window(num_targets: int, chunk_index: int, spec: EvalSpec) -> tuple[int, int, int]:
    """(start, end, score_from) of chunk `chunk_index` over a document's prediction positions: inputs start..end-1, the
    targets of positions score_from..end-1 (the chunk) are scored, with the W - C positions before the chunk as context
    (as strided scoring with stride C)."""
    score_from = chunk_index * spec.chunk
    end = min(score_from + spec.chunk, num_targets)
    return max(0, score_from - (spec.window - spec.chunk)), end, score_from


def scoring_order(data: ValidationSet, spec: EvalSpec) -> list[int]:
    """The documents in the order they are scored: TTT longest first (ties by index), the other modes by index."""
    if spec.mode not in TTT_MODES:
        return list(range(data.num_docs))
    return sorted(range(data.num_docs), key=lambda d: (-int(data.token_counts[d]), d))


def lane_queues(lengths: list[int], slots: int, chunk: int) -> list[list[int]]:
    """Which documents (by position in `lengths`, the scoring order) each slot runs, in turn: a document takes
    ceil(n / chunk) steps, and the next one goes to the slot that is free first (ties to the lowest), as the batched
    loop refills its slots. Arithmetic on the lengths only, so every process computes the same."""
    free_at, queues = [0] * slots, [[] for _ in range(slots)]
    for position, n in enumerate(lengths):
        slot = min(range(slots), key=lambda s: (free_at[s], s))
        queues[slot].append(position)
        free_at[slot] += -(-n // chunk)
    return [q for q in queues if q]


def ttt_losses(model, data: ValidationSet, spec: EvalSpec, process: tuple[int, int] = (0, 1),
               progress=None) -> tuple[dict[int, np.ndarray], list | None]:
    """Per-token losses of this process's documents under chunked LoRA test-time training, and (phased) what each
    global adaptation did. Per document (ttt): each process takes its share of the documents (assign_documents) and
    doc_batch slots of its own. Cross-document (phased, warm_a): the documents in scoring order, cut at the phase
    thresholds; each part runs in doc_batch slots dealt over the processes, then (but after the last part) the
    model takes its global steps on every document scored so far. The model's weights are restored at the end."""
    rank, world = process
    counts = data.token_counts
    order = [d for d in scoring_order(data, spec) if counts[d] > 0]
    if spec.documents == "per-document":
        mine = set(assign_documents(counts, world)[rank])
        parts, deal = [[d for d in order if d in mine]], slice(None)
    else:
        bounds = [0] + [t for t in spec.phase_docs if t < len(order) and spec.mode == "phased"] + [len(order)]
        parts, deal = [order[a:b] for a, b in zip(bounds, bounds[1:])], slice(rank, None, world)
    losses = {d: np.zeros(0) for d in range(data.num_docs) if counts[d] == 0}  # run_slots adds the others
    requires_grad = [p.requires_grad for p in model.parameters()]
    saved = [p.detach().clone() for p in model.parameters()] if spec.mode == "phased" else []
    model.requires_grad_(False)
    phases, scored = [], 0
    try:
        for part in parts:
            if scored:  # every process has scored its share of order[:scored]
                phases.append(global_adaptation(model, data, order[:scored], spec, process))
                if progress:
                    progress(f"phased phase:{len(phases)} after_docs:{scored} tokens:{phases[-1]['tokens']} "
                             f"steps:{phases[-1]['steps']} time:{phases[-1]['seconds']:.1f}s (cross-document)")
            queues = lane_queues([int(counts[d]) for d in part], spec.doc_batch, spec.chunk)[deal]
            run_slots(model, data, [[part[i] for i in q] for q in queues], spec, losses, progress)
            scored += len(part)
    finally:
        with torch.no_grad():
            for p, value in zip(model.parameters(), saved):
                p.copy_(value)
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return losses, (phases if spec.mode == "phased" else None)


def run_slots(model, data: ValidationSet, queues: list[list[int]], spec: EvalSpec, losses: dict, progress=None) -> None:
    """Score and train on the documents of queues[s] one after another in slot s, all slots batched: every step scores
    chunk j_s of the document in slot s, then takes one AdamW step on each chunk but a document's last; a slot whose
    document ends gets its next document (B = 0, AdamW reset) at the next step. Fills losses[doc]."""
    if not queues:
        return
    device = next(model.parameters()).device
    counts = data.token_counts
    slots = len(queues)
    lora = BatchedLoRA(lora_shapes(model, spec.lora_targets, spec.virtual_layers), spec, slots, device)
    pending = [list(q) for q in queues]
    slot_doc: list[int | None] = [None] * slots
    slot_tokens: list[np.ndarray | None] = [None] * slots
    slot_chunk = [0] * slots
    start_time = last_report = time.perf_counter()
    done_docs, total_docs = 0, sum(map(len, queues))
    while True:
        for s in range(slots):  # refill finished slots
            if slot_doc[s] is None and pending[s]:
                slot_doc[s], slot_chunk[s] = pending[s].pop(0), 0
                slot_tokens[s] = data.document(slot_doc[s])
                losses[slot_doc[s]] = np.full(int(counts[slot_doc[s]]), np.nan)
                lora.reset(s)
        active = [s for s in range(slots) if slot_doc[s] is not None]
        if not active:
            break
        rows = [chunk_window(int(counts[slot_doc[s]]), slot_chunk[s], spec) for s in active]
        length = max(end - start for start, end, _ in rows)
        inputs = np.zeros((len(active), length), dtype=np.int64)  # padded at the end of each row
        targets = np.full((len(active), length), IGNORE_INDEX, dtype=np.int64)
        for i, (s, (start, end, score_from)) in enumerate(zip(active, rows)):
            tokens = slot_tokens[s]
            inputs[i, : end - start] = tokens[start:end]
            targets[i, score_from - start: end - start] = tokens[score_from + 1: end + 1]
        lora.select(torch.tensor(active, device=device))
        with torch.enable_grad():
            token_losses = adapted_losses(model, lora, torch.from_numpy(inputs).to(device),
                                          torch.from_numpy(targets).to(device))
        # the score of each chunk, taken before any training on it
        scored = token_losses.detach().double().cpu().numpy()
        train_rows = []
        for i, (s, (start, end, score_from)) in enumerate(zip(active, rows)):
            losses[slot_doc[s]][score_from:end] = scored[i, score_from - start: end - start]
            if end < counts[slot_doc[s]]:
                train_rows.append(i)  # no step after a document's last chunk
        if train_rows:
            scored_count = torch.from_numpy(targets != IGNORE_INDEX).sum(1).clamp(min=1).to(device)
            per_row = token_losses.sum(dim=1) / scored_count
            lora.step(per_row[train_rows].sum(), train_rows)
        for s, (start, end, score_from) in zip(active, rows):
            slot_chunk[s] += 1
            if end >= counts[slot_doc[s]]:
                slot_doc[s] = slot_tokens[s] = None
                done_docs += 1
        if progress and time.perf_counter() - last_report > 60:
            last_report = time.perf_counter()
            progress(f"{spec.mode} docs:{done_docs}/{total_docs} elapsed:{last_report - start_time:.0f}s")


# ----------------------------------------------------------------------------------------------------------------------
# phased: global adaptation of every weight on the documents scored so far (cross-document)


def global_chunks(counts, docs: list[int], chunk_tokens: int, window: int) -> list[list[tuple[int, int, int, int]]]:
    """The documents' prediction positions back to back, cut every chunk_tokens positions (one SGD step each); within
    a chunk, each document's positions in windows (doc, start, end, start) of at most `window`, with no context from
    before the chunk."""
    chunks, current, room = [], [], chunk_tokens
    for doc in docs:
        start, n = 0, int(counts[doc])
        while start < n:
            end = min(n, start + room, start + window)
            current.append((doc, start, end, start))
            room -= end - start
            start = end
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_tokens
    return chunks + ([current] if current else [])


def cosine_lr(base: float, step: int, steps: int) -> float:
    """Step `step` of `steps`: from base down (cosine) towards 0, every step > 0."""
    return base * 0.5 * (1 + math.cos(math.pi * step / steps))


def global_adaptation(model, data: ValidationSet, docs: list[int], spec: EvalSpec,
                      process: tuple[int, int] = (0, 1)) -> dict:
    """One phase: every weight of the model, torch.optim.SGD (global_momentum, fresh for the phase) with the gradient
    norm clipped to global_clip, one step per chunk of global_chunk tokens of `docs` (documents already scored), the
    learning rate cosine over the chunks (cosine_lr). A step's gradient is that of the chunk's mean token loss: each
    process computes its share of the chunk's windows, and the sums are added up over the processes, so every process
    takes the same step. One epoch."""
    start_time = time.perf_counter()
    rank, world = process
    params = list(model.parameters())
    chunks = global_chunks(data.token_counts, docs, spec.global_chunk, spec.window)
    tokens = {doc: data.document(doc) for doc in docs}
    optimizer = torch.optim.SGD(params, lr=spec.global_lr, momentum=spec.global_momentum)
    model.requires_grad_(True)
    try:
        for step, windows in enumerate(chunks):
            for p in params:
                p.grad = torch.zeros_like(p)
            with torch.enable_grad():
                for _, _, token_losses in packed_forwards(model, tokens, windows[rank::world], spec.batch_tokens):
                    token_losses.sum().backward()
            count = sum(end - start for _, start, end, _ in windows)
            for p in params:
                sum_over_processes(p.grad).div_(count)
            if spec.global_clip:
                torch.nn.utils.clip_grad_norm_(params, spec.global_clip)
            optimizer.param_groups[0]["lr"] = cosine_lr(spec.global_lr, step, len(chunks))
            optimizer.step()
    finally:
        model.requires_grad_(False)
        for p in params:
            p.grad = None
    return {"docs": len(docs), "tokens": int(sum(int(data.token_counts[d]) for d in docs)), "steps": len(chunks),
            "seconds": time.perf_counter() - start_time}


# ----------------------------------------------------------------------------------------------------------------------
# The causality audit: every score depends only on what comes before it in the scoring order


@dataclass
class TailPerturbed(ValidationSet):
    """The same documents, some of them with other tokens (the same lengths and byte counts)."""

    replaced: dict = dataclasses.field(default_factory=dict)  # {document: its tokens}

    def document(self, k: int) -> np.ndarray:
        return self.replaced[k] if k in self.replaced else super().document(k)


def perturb_tail(data: ValidationSet, spec: EvalSpec, vocab_size: int, seed: int = 0) -> tuple[TailPerturbed, int, int]:
    """(data with random tokens from a cut on, the cut's document, the cut c): the cut is in the middle document of the
    scoring order (of those with 2 scored tokens or more), in the middle of its middle chunk (other modes: of the
    document), so that a chunk is cut in two; the tokens after position c there, and every token but the BOS of each
    document after it in the order, are replaced. Scores at positions < c of that document, and every score of the
    documents before it, see only unchanged tokens."""
    order = [d for d in scoring_order(data, spec) if data.token_counts[d] >= 2]
    if not order:
        raise DataError("--check-causality: no document with 2 scored tokens or more")
    position = len(order) // 2
    doc, n = order[position], int(data.token_counts[order[position]])
    if spec.mode in TTT_MODES:
        cut = (-(-n // spec.chunk) // 2) * spec.chunk + spec.chunk // 2
    else:
        cut = n // 2
    cut = min(max(cut, 1), n - 1)
    rng = np.random.default_rng(seed)
    replaced = {}
    for d, first in [(doc, cut + 1)] + [(d, 1) for d in order[position + 1:]]:
        tokens = data.document(d).copy()
        tokens[first:] = rng.integers(4, vocab_size, len(tokens) - first)  # no BOS, pad, eos or unk
        replaced[d] = tokens
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(ValidationSet)}
    return TailPerturbed(**fields, replaced=replaced), doc, cut


def check_causality(model, data: ValidationSet, spec: EvalSpec, process: tuple[int, int] | None = None,
                    seed: int = 0) -> tuple[bool, str]:
    """Score data twice, the second time with its tail perturbed (perturb_tail), and compare every score before the
    cut, bit for bit: (True, an `ok` line) or (False, the first score in scoring order that changed)."""
    device = next(model.parameters()).device
    first = evaluate(model, data, spec, process=process, keep_token_losses=True)
    perturbed, cut_doc, cut = perturb_tail(data, spec, model.config.vocab_size, seed)
    second = evaluate(model, perturbed, spec, process=process, keep_token_losses=True)
    before, after = gather_token_losses(first, data, device), gather_token_losses(second, perturbed, device)
    offsets = np.concatenate([[0], np.cumsum(data.token_counts)]).astype(np.int64)
    order = scoring_order(data, spec)
    compared, changed_later = 0, 0
    for d in order:
        a, b = before[offsets[d]: offsets[d + 1]], after[offsets[d]: offsets[d + 1]]
        if d in perturbed.replaced and d != cut_doc:
            changed_later += int((a != b).any())
            continue
        limit = cut if d == cut_doc else len(a)
        moved = np.flatnonzero(a[:limit] != b[:limit])
        if len(moved):
            i = int(moved[0])
            return False, (f"causality CHANGED: mode:{spec.mode} doc:{int(data.doc_ids[d])} position:{i} (the score "
                           f"of its token {i + 1}) {a[i]!r} -> {b[i]!r} after perturbing doc:"
                           f"{int(data.doc_ids[cut_doc])} from position {cut} on and the "
                           f"{len(perturbed.replaced) - 1} documents after it in the scoring order")
        compared += limit
        changed_later += int(d == cut_doc and (a[cut:] != b[cut:]).any())
    return True, (f"causality ok: mode:{spec.mode} documents:{spec.documents} docs:{data.num_docs} "
                  f"identical_scores:{compared} perturbed_from doc:{int(data.doc_ids[cut_doc])} position:{cut} "
                  f"perturbed_docs_changed:{changed_later}/{len(perturbed.replaced)}")


# ----------------------------------------------------------------------------------------------------------------------
# What a result reports


def context_slots_per_token(model, data: ValidationSet, spec: EvalSpec) -> float:
    """The mean number of key/value slots a scored token attends to (itself included): raw tokens of its window for
    flat, strided, ttt and phased; in gist mode what the model reads (gist_context_slots)."""
    counts = data.token_counts.tolist()
    if spec.mode == "gist":
        return model.gist_context_slots(counts, spec.window)
    if spec.mode in TTT_MODES:
        windows = [chunk_window(n, c, spec) for n in counts for c in range(-(-n // spec.chunk))]
    else:
        windows = [w[1:] for w in evaluation_windows(data, spec)]
    # a window (start, end, score_from) scores positions score_from..end-1; position p attends to p - start + 1 slots
    total = sum((end - score_from) * (score_from - start + 1 + end - start) / 2 for start, end, score_from in windows)
    return total / max(sum(counts), 1)


def results_dict(spec: EvalSpec, result: EvalResult, data: ValidationSet, setup: dict,
                 context_slots: float | None = None, setup_seconds: float | None = None) -> dict:
    """A results file: the configuration (setup and spec), the totals, whether a score may depend on other documents,
    the evaluation's time and (setup_seconds) the time before it, phased mode's global steps, and every document's
    tokens, bytes and nats."""
    tokens, num_bytes = result.total_tokens, result.total_bytes
    out = {"config": {**setup, **spec.settings()}, "bpb": result.bpb, "loss": result.loss, "tokens": tokens,
           "bytes": num_bytes, "documents": spec.documents, "context_slots_per_token": context_slots,
           "seconds": result.seconds, "setup_seconds": setup_seconds,
           "tokens_per_s": tokens / max(result.seconds, 1e-9),
           "docs": [{"id": int(data.doc_ids[k]), "tokens": int(result.doc_tokens[k]),
                     "bytes": int(result.doc_bytes[k]), "nats": float(result.doc_nats[k])}
                    for k in range(data.num_docs)]}
    if result.phases is not None:
        out["phases"] = result.phases
    return out


def summary_line(spec: EvalSpec, result: EvalResult, data: ValidationSet, model_config=None,
                 setup_seconds: float | None = None) -> str:
    knobs = {key: value for key, value in spec.settings().items()
             if key not in ("mode", "rope_ntk_alpha", "seed", "eps", "batch_tokens", "documents")}
    if spec.mode == "gist" and model_config is not None:
        knobs = {"gist_tokens": model_config.gist_tokens, "gist_segment": model_config.gist_segment, **knobs}
    text = " ".join(f"{k}:{v:g}" if isinstance(v, float) else f"{k}:{v}" for k, v in knobs.items())
    phases = "" if result.phases is None else f" phases_at:{','.join(str(p['docs']) for p in result.phases) or '-'}"
    setup = "" if setup_seconds is None else f" setup:{setup_seconds:.2f}s"
    return (f"eval mode:{spec.mode} {text} rope_ntk_alpha:{spec.rope_ntk_alpha:g} val_loss:{result.loss:.6f} "
            f"val_bpb:{result.bpb:.6f} docs:{data.num_docs} tokens:{result.total_tokens} bytes:{result.total_bytes} "
            f"time:{result.seconds:.2f}s tokens_per_s:{result.total_tokens / max(result.seconds, 1e-9):.0f}"
            f"{setup}{phases} documents:{spec.documents}")


def gather_token_losses(result: EvalResult, data: ValidationSet, device) -> np.ndarray:
    """All documents' per-token losses, in document order, on every process (each fills its own documents; summing
    zeros is exact)."""
    offsets = np.concatenate([[0], np.cumsum(data.token_counts)]).astype(np.int64)
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    for doc, values in result.token_losses.items():
        flat[offsets[doc]: offsets[doc + 1]] = torch.from_numpy(values)
    if is_distributed():
        flat = sum_over_processes(flat.to(device)).cpu()
    return flat.numpy()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def progress_to_stderr(line: str) -> None:
    """Every process's progress lines, to stderr, for long runs."""
    rank = os.environ.get("RANK", "0")
    print(f"rank:{rank} {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """A bad command-line argument; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# command-line option -> EvalSpec field, for the options that set one
SPEC_OPTIONS = {"mode": "mode", "window": "window", "stride": "stride", "batch_tokens": "batch_tokens",
                "chunk": "chunk", "lora_rank": "lora_rank", "lora_lr": "lora_lr", "lora_targets": "lora_targets",
                "doc_batch": "doc_batch", "seed": "seed", "rope_ntk_alpha": "rope_ntk_alpha", "beta1": "beta1",
                "beta2": "beta2", "weight_decay": "weight_decay", "lora_alpha": "lora_alpha", "warm_a": "warm_a",
                "virtual_layers": "virtual_layers", "phase_docs": "phase_docs", "global_lr": "global_lr",
                "global_momentum": "global_momentum", "global_clip": "global_clip", "global_chunk": "global_chunk"}


def parse_flag(text: str) -> bool:
    """An on/off value (an option's, an environment variable's): 1/0, true/false, yes/no, on/off, in any case."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


def add_spec_options(p: argparse.ArgumentParser) -> None:
    """The options that make an EvalSpec; their defaults are EvalSpec's (None: the checkpoint's, or follows the
    window)."""
    d = EvalSpec()
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="phased: ttt plus global SGD at --phase-docs (CROSS-DOCUMENT, score-first); gist: for models "
                        "trained with GIST_TOKENS > 0, segment by segment with cached gist slots")
    p.add_argument("--window", type=int, help="tokens of input per window or chunk (default: the checkpoint's "
                                               "EVAL_WINDOW); gist: per piece (default: its TRAIN_SEQ_LEN)")
    p.add_argument("--stride", type=int, help="strided: tokens scored per window after the first (default: window/2)")
    p.add_argument("--batch-tokens", type=int, help="flat/strided: tokens per forward (default: the checkpoint's)")
    p.add_argument("--chunk", type=int, help="ttt: tokens scored, then trained on, per step (default: window/4)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help="ttt: AdamW learning rate of the adapters")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                   help="ttt: adapters' output times alpha/rank (0: times 1; the frontier: 144)")
    p.add_argument("--beta1", type=float, default=d.beta1, help="ttt: AdamW beta1 (the frontier: 0)")
    p.add_argument("--beta2", type=float, default=d.beta2, help="ttt: AdamW beta2 (the frontier: 0.99)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="ttt: AdamW decoupled weight decay of the adapters (the frontier: 0.5)")
    p.add_argument("--warm-a", type=parse_flag, default=d.warm_a,
                   help="ttt: 1: a slot's next document starts from the A its last one trained (B and AdamW reset); "
                        "reads other documents: CROSS-DOCUMENT")
    p.add_argument("--virtual-layers", type=parse_flag, default=d.virtual_layers,
                   help="ttt: 1: an adapter per virtual layer (each call of a block that depth recurrence repeats)")
    p.add_argument("--lora-targets", default=",".join(d.lora_targets),
                   help="comma-separated: q,k,v,o,fc,proj (mlp = fc,proj; attn = q,k,v,o),head, or all")
    p.add_argument("--doc-batch", type=int, default=d.doc_batch, help="ttt: documents per forward/backward")
    p.add_argument("--seed", type=int, default=d.seed, help="ttt: seed of the adapters' initial A matrices")
    p.add_argument("--rope-ntk-alpha", type=float, default=d.rope_ntk_alpha,
                   help="NTK-aware RoPE scaling for long windows")
    p.add_argument("--phase-docs", default=d.phase_docs,
                   help="phased: increasing document counts of the scoring order (longest first) after which all "
                        "weights take global SGD steps on the documents scored so far (the frontier: 833,1666,2500)")
    p.add_argument("--global-lr", type=float, default=d.global_lr, help="phased: SGD lr, cosine over the chunks")
    p.add_argument("--global-momentum", type=float, default=d.global_momentum)
    p.add_argument("--global-clip", type=float, default=d.global_clip, help="phased: gradient norm clip (0: none)")
    p.add_argument("--global-chunk", type=int, default=d.global_chunk, help="phased: tokens per SGD step")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eval_ttt.py", description="BPB evaluation (flat, strided, LoRA TTT, phased TTT, gist) of a "
                                                "train_gpt.py checkpoint or artifact.")
    p.add_argument("--checkpoint", required=True, help="a train_gpt.py checkpoint (.pt) or artifact (.ptz)")
    p.add_argument("--data", help="folder with *_val_*.bin shards (default: the checkpoint's DATA_PATH)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's; its sha256 must match)")
    add_spec_options(p)
    p.add_argument("--max-docs", type=int, default=0, help="only the first N validation documents (0: all)")
    p.add_argument("--attn-backend", default="auto", help="auto | fa3 | fa2 | torch_varlen | masked_sdpa | reference")
    p.add_argument("--fused", default="0", help="train_gpt's FUSED setting (ttt: relu2_linear stays off)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--dump-token-losses", help="write per-token losses (nats, float32 .npy) in the order of `docs`")
    p.add_argument("--check-causality", action="store_true",
                   help="score --max-docs documents (default 8) twice, the second time with random tokens from the "
                        "middle of a chunk of the middle document of the scoring order on; print ok, or the first "
                        "earlier score that changed (exit status 1)")
    return p


def spec_from_options(options: dict, mode: str, hyperparameters: dict) -> EvalSpec:
    """The EvalSpec of command-line values ({field: value}, None where not given): an unset window is the checkpoint's
    EVAL_WINDOW (gist: its TRAIN_SEQ_LEN, where training cut documents into pieces), an unset batch size the
    checkpoint's EVAL_BATCH_TOKENS; stride and chunk follow the window. A bad value: UsageError naming the option."""
    values = {field: value for field, value in options.items() if value is not None}
    values["mode"] = mode
    if "window" not in values:
        eval_window = None if mode == "gist" else hyperparameters.get("eval_window")
        values["window"] = int(eval_window or hyperparameters.get("train_seq_len") or 1024)
    values.setdefault("batch_tokens", int(hyperparameters.get("eval_batch_tokens") or EvalSpec.batch_tokens))
    try:
        return EvalSpec(**values)
    except SpecError as e:
        raise UsageError(f"--{e.name.replace('_', '-')} {e.value}: {e.problem}") from None


def resolve(path: str, root: str) -> str:
    """A relative path from the checkpoint is relative to where training ran: try here, then beside this file."""
    if os.path.isabs(path) or os.path.exists(path) or not os.path.exists(os.path.join(root, path)):
        return path
    return os.path.join(root, path)


@dataclass
class Loaded:
    """A checkpoint's model and validation set, ready to score, and what every results file records about them."""
    model: object
    data: ValidationSet
    setup: dict  # checkpoint, tokenizer and data with their sha256, world size, device, kernels, torch version
    hyperparameters: dict  # the checkpoint's training settings, which unset options default to


def load(args, env, trainer) -> Loaded:
    """The checkpoint's model (built by trainer.load_model with the kernels asked for), then the tokenizer (its sha256
    must be the checkpoint's) and the validation set."""
    try:
        fused = trainer.parse_fused_ops(args.fused)
    except ValueError as e:
        raise UsageError(f"--fused {args.fused}: {e}") from None
    if args.mode in TTT_MODES:
        fused = ttt_fused_ops(fused)
    model, state = trainer.load_model(args.checkpoint, env.device, fused, args.attn_backend)
    hyperparameters = state.get("hyperparameters", {})
    root = os.path.dirname(os.path.abspath(__file__))
    data_path = args.data or resolve(state.get("data_path") or hyperparameters.get("data_path", ""), root)
    tokenizer_path = args.tokenizer or resolve(state.get("tokenizer_path")
                                               or os.path.join(data_path, "tokenizer.model"), root)
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"{tokenizer_path}: tokenizer file not found (give --tokenizer)")
    tokenizer_sha256 = sha256_file(tokenizer_path)
    expected = state.get("tokenizer_sha256")
    if expected and tokenizer_sha256 != expected:
        raise DataError(f"{tokenizer_path}: sha256 {tokenizer_sha256[:16]}... differs from the tokenizer the "
                        f"checkpoint was trained with ({expected[:16]}...)")
    vocab_size = model.config.vocab_size
    tables = build_byte_tables(load_tokenizer(tokenizer_path), vocab_size, tokenizer_path)
    data = ValidationSet.load(data_path, vocab_size, tables, args.max_docs)
    kernels = model.kernels
    setup = {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_sha256": sha256_file(args.checkpoint),
             "code_sha256": sha256_file(__file__), "tokenizer": os.path.abspath(tokenizer_path),
             "tokenizer_sha256": tokenizer_sha256, "data": os.path.abspath(data_path), "num_docs": data.num_docs,
             "max_docs": args.max_docs, "world_size": env.world_size, "device": device_name(env.device),
             "attention_backend": kernels.eval_attention.name, "fused_ops": sorted(kernels.fused),
             "torch": torch.__version__, "gist_tokens": model.config.gist_tokens,
             "gist_segment": model.config.gist_segment}
    return Loaded(model, data, setup, hyperparameters)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line(command) -> int:
    """`command()`'s exit status, as a command line: a bad argument or input is one `error:` line (under torchrun from
    process 0 only) and exit status 2; a process group that was set up is torn down in any case."""
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 reports
    finished = False
    try:
        status = command()
        finished = True
        return status
    except (UsageError, ConfigError, DataError, BackendError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        leave_process_group(finished)


def leave_process_group(finished: bool) -> None:
    """Tear down the process group, if there is one: after a barrier when this process finished its work, so that no
    process tears it down while another is still in a collective (gloo may then abort that one)."""
    if is_distributed():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from Dynamo's counters; (0, 0) without importing Dynamo
    into a process that never compiled."""
    if "torch._dynamo" not in sys.modules:
        return 0, 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def main(argv=None, trainer=None) -> int:
    """The command line. trainer: the module that defines the model (train_gpt), for setup_distributed,
    parse_fused_ops and load_model."""
    return command_line(lambda: run(build_parser().parse_args(None if argv is None else [str(a) for a in argv]),
                                    trainer))


def run(args, trainer) -> int:
    started = time.perf_counter()
    if args.max_docs < 0:
        raise UsageError(f"--max-docs {args.max_docs}: must be >= 0 (0: all documents)")
    if args.check_causality and not args.max_docs:
        args.max_docs = 8
    env = trainer.setup_distributed()
    graphs_before, breaks_before = compile_counts()
    loaded = load(args, env, trainer)
    spec = spec_from_options({field: getattr(args, option) for option, field in SPEC_OPTIONS.items()
                              if option != "mode"}, args.mode, loaded.hyperparameters)
    process = (env.rank, env.world_size)
    setup_seconds = time.perf_counter() - started  # process group, checkpoint (dequantized), tokenizer, data
    try:
        if args.check_causality:
            ok, message = check_causality(loaded.model, loaded.data, spec, process)
            if env.is_main:
                print(message, flush=True)
            return 0 if ok else 1
        result = evaluate(loaded.model, loaded.data, spec, process=process,
                          keep_token_losses=bool(args.dump_token_losses), progress=progress_to_stderr)
    except SpecError as e:  # a mode this checkpoint's model cannot be scored in: name the option
        raise UsageError(f"--{e.name.replace('_', '-')} {e.value}: {e.problem}") from None
    out = results_dict(spec, result, loaded.data, loaded.setup, context_slots_per_token(loaded.model, loaded.data,
                                                                                         spec), setup_seconds)
    # graphs compiled while scoring: a compiled attention (flex for a gist model on CUDA) must compile once, not once
    # per batch (evaluation pads its batches to one length for it)
    graphs, graph_breaks = compile_counts()
    out["compile"] = {"graphs": graphs - graphs_before, "graph_breaks": graph_breaks - breaks_before}
    losses = gather_token_losses(result, loaded.data, env.device) if args.dump_token_losses else None
    if env.is_main:
        if args.out:
            write_atomic(args.out, (json.dumps(out, indent=1) + "\n").encode())
        if losses is not None:
            write_atomic(args.dump_token_losses, npy_bytes(losses.astype(np.float32)))
        print(summary_line(spec, result, loaded.data, loaded.model.config, setup_seconds), flush=True)
    return 0


if __name__ == "__main__":
    import eval_ttt  # this file as the module train_gpt imports, so that the two share one copy of its classes
    import train_gpt  # the model's definition: distributed setup, kernels, checkpoints

    sys.exit(eval_ttt.main(trainer=train_gpt))

"""
eval_ttt.py: per-document bits-per-byte evaluation of a train_gpt.py checkpoint, with test-time training (TTT).

Modes (every one of them per document: no scored token ever sees another document):
  flat     contiguous windows of the concatenated validation documents (train_gpt.evaluate)
  strided  per document, the first W tokens, then S tokens at a time with the W - S tokens before them
           (train_gpt.evaluate)
  ttt      per-document LoRA adapters, reset for every document. The document is cut into chunks of C tokens; each chunk
           is first scored with the current adapters (with up to W tokens of input ending at the chunk's end, like
           strided), then the adapters take one Adam step on that chunk's loss. So a chunk's score depends only on the
           tokens before it in its own document.
  gist     for a model trained with gist tokens (GIST_TOKENS=k, GIST_SEGMENT=L): each document is cut into pieces of W
           tokens (default: the checkpoint's TRAIN_SEQ_LEN, where training cuts documents into pieces), and each
           piece is read segment by segment, L raw tokens at a time, with exactly the training mask: segment j sees its
           own raw tokens and the gist slots of the piece's segments 0..j-1, whose keys and values are computed once,
           with their segment, and cached. A W longer than the document reads it whole (more slots, further back, than
           training ever showed the model).

Usage:
  python eval_ttt.py --checkpoint checkpoints/run.pt --mode ttt --out results.json --dump-token-losses losses.npy
  torchrun --nproc_per_node=8 eval_ttt.py --checkpoint ... --mode strided --window 1024 --stride 512

The model, the byte tables, BPB, the windows and the strided scorer all come from train_gpt.py; this file adds the
batched per-document LoRA TTT loop, the command line for one configuration, the results file and the token-loss dump.
Sweeps over a grid of these settings, with their CSV and plots, are tools/sweep.py, which calls the functions here.

TTT batching: each process takes its documents (train_gpt.assign_documents), longest first, and runs them in a batch of
--doc-batch slots, one document per slot: every step scores and trains chunk j_s of the document in slot s, as one
[slots, <= W] forward and backward. Each slot has its own adapter weights A [slots, r, in] and B [slots, out, r] (B = 0
at the start, A the same seeded random matrix for every document) and its own Adam moments and step count. When a
document ends, its slot is reset and refilled with the next document at once (rather than waiting for the batch's
longest document), so the batch stays full; per-slot Adam step counts make a slot's trajectory the same whether its
document started together with its batch-mates or not. Rows are padded at their end, where causal attention keeps the
real tokens blind to the padding, so a document's scores do not depend on its batch-mates (up to float rounding of
differently shaped matrix products).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import train_gpt as tg
from kernels.attention import repeat_kv

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------------
# LoRA test-time training

# --lora-targets names -> the names of the projections adapters attach to (per block, plus the tied lm_head)
TARGET_GROUPS = {"q": ("attn.q",), "k": ("attn.k",), "v": ("attn.v",), "o": ("attn.o",), "fc": ("mlp.fc",),
                 "proj": ("mlp.proj",), "mlp": ("mlp.fc", "mlp.proj"), "attn": ("attn.q", "attn.k", "attn.v", "attn.o"),
                 "head": ()}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class TTTConfig:
    window: int = 256  # tokens of input per scored chunk, the chunk included
    chunk: int = 64  # tokens scored, then trained on, per step
    lora_rank: int = 16
    lora_lr: float = 0.005
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "head")
    doc_batch: int = 16  # documents (slots) per forward/backward
    seed: int = 0  # of the shared initial A matrices
    beta1: float = ADAM_BETAS[0]
    beta2: float = ADAM_BETAS[1]
    eps: float = ADAM_EPS


def parse_targets(spec: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if spec.strip() == "all":
        names = ("q", "k", "v", "o", "mlp", "head")
    unknown = [n for n in names if n not in TARGET_GROUPS]
    if not names or unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}" if unknown else "no LoRA target given")
    return names


def projections(model: tg.GPT) -> dict[str, torch.nn.Module]:
    """{projection name: the model's linear layer} for every projection an adapter can cover."""
    modules = {}
    for i, block in enumerate(model.blocks):
        for suffix, module in {"attn.q": block.attn.c_q, "attn.k": block.attn.c_k, "attn.v": block.attn.c_v,
                               "attn.o": block.attn.proj, "mlp.fc": block.mlp.fc, "mlp.proj": block.mlp.proj}.items():
            modules[f"blocks.{i}.{suffix}"] = module
    return modules


def lora_shapes(model: tg.GPT, targets) -> dict[str, tuple[int, int]]:
    """{projection name: (in_features, out_features)} of the projections the adapters cover."""
    suffixes = {s for t in targets for s in TARGET_GROUPS[t]}
    shapes = {}
    for name, module in projections(model).items():
        if name.split(".", 2)[2] in suffixes:
            out_features, in_features = module.weight.shape
            shapes[name] = (in_features, out_features)
    if "head" in targets:
        vocab, dim = model.tok_emb.weight.shape
        shapes["head"] = (dim, vocab)
    return shapes


# Fused kernels that compute a projection or the head without calling the layer, so a forward hook never sees them.
BYPASS_HOOKS = frozenset({"relu2_linear", "linear_softcap_cross_entropy"})


def ttt_fused_ops(fused: frozenset) -> frozenset:
    """The fused ops a TTT model can use: all but those that bypass the adapters' hooks."""
    return fused - BYPASS_HOOKS


@contextlib.contextmanager
def adapted(model: tg.GPT, lora, names):
    """The model with `lora(name, x)` added to the output of each projection in `names` (forward hooks on the linear
    layers: the trainer's model knows nothing of adapters). Fused kernels that would bypass a hooked layer or the
    head must be off in the model (ttt_fused_ops)."""
    def add_delta(name):
        return lambda module, args, out: out + lora(name, args[0]).to(out.dtype)

    bypassing = sorted(model.kernels.fused & BYPASS_HOOKS)
    if bypassing:
        raise tg.ConfigError(f"TTT adapters need a model without the fused ops {', '.join(bypassing)} (they bypass the "
                             "hooked layers); load it with ttt_fused_ops()")
    layers = projections(model)
    handles = [layers[name].register_forward_hook(add_delta(name)) for name in names if name != "head"]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def adapted_losses(model: tg.GPT, lora, names, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per-token losses [B, T] (fp32 nats, 0 where the target is ignored) of the model with adapters on `names` (the
    head's included): as GPT.forward in eval mode, the lm_head runs only where a target is scored."""
    with adapted(model, lora, names):
        x = model.hidden_states(input_ids)
        flat_x, flat_targets = x.flatten(0, 1), target_ids.flatten()
        scored = (flat_targets != tg.IGNORE_INDEX).nonzero().squeeze(1)
        raw = model.head(flat_x[scored])
        if "head" in names:
            raw = raw + lora("head", x).flatten(0, 1)[scored].to(raw.dtype)
    losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=x.device)
    losses[scored] = model.softcap_losses(raw, flat_targets[scored])
    return losses.view_as(target_ids)


def initial_lora_a(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The A matrix every document starts from, [rank, in] per projection (B starts at zero, so the adapted model starts
    as the model). The same for every document: it depends on the seed and the shapes only."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            for name, (fan_in, _) in sorted(shapes.items())}


class BatchedLoRA:
    """Per-slot LoRA adapters and Adam state for a batch of documents, and the `lora(name, x)` callable that gives the
    delta of projection `name` for the slots of the current step (see `adapted`).

    delta_s(x) = (x @ A_s^T) @ B_s^T for slot s, A [slots, r, in], B [slots, out, r]. Adam (as torch.optim.Adam, without
    weight decay) keeps its moments and its step count per slot."""

    def __init__(self, shapes, cfg: TTTConfig, slots: int, device: torch.device):
        self.cfg, self.slots = cfg, slots
        self.names = tuple(sorted(shapes))  # the projections covered
        self.a0 = {n: a.to(device) for n, a in initial_lora_a(shapes, cfg.lora_rank, cfg.seed).items()}
        self.params: dict[str, torch.Tensor] = {}
        for name, (fan_in, fan_out) in shapes.items():
            self.params[f"{name}.A"] = self.a0[name].expand(slots, -1, -1).clone()
            self.params[f"{name}.B"] = torch.zeros(slots, fan_out, cfg.lora_rank, device=device)
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.steps = torch.zeros(slots, dtype=torch.float64)
        self.live: dict[str, torch.Tensor] = {}  # the current step's slots' weights, requiring grad

    def reset(self, slot: int) -> None:
        """A fresh adapter for a new document: A = A0, B = 0, no Adam history."""
        for key, p in self.params.items():
            if key.endswith(".A"):
                p[slot] = self.a0[key[:-2]]
            else:
                p[slot].zero_()
            self.exp_avg[key][slot].zero_()
            self.exp_avg_sq[key][slot].zero_()
        self.steps[slot] = 0

    def select(self, slots: torch.Tensor) -> None:
        """Use the adapters of these slots (in this order) for the next forward: row i of the batch is slot slots[i]."""
        self.index = slots
        self.live = {k: p[slots].requires_grad_(True) for k, p in self.params.items()}

    def __call__(self, name: str, x: torch.Tensor):
        a = self.live.get(f"{name}.A")
        if a is None:
            return None
        b = self.live[f"{name}.B"]
        shape = x.shape
        x = x.reshape(a.size(0), -1, shape[-1])  # the head gets its input flattened to [rows * T, dim]
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype))
        return delta.reshape(*shape[:-1], delta.size(-1))

    def step(self, loss: torch.Tensor, rows: list[int]) -> None:
        """One Adam step, for the selected slots at positions `rows`, on `loss` (a sum of per-slot losses, so each slot
        gets the gradient of its own loss only)."""
        keys = list(self.live)
        grads = torch.autograd.grad(loss, [self.live[k] for k in keys])
        cfg = self.cfg
        rows_t = torch.tensor(rows, device=self.index.device)
        index, cpu_index = self.index[rows_t], self.index[rows_t].cpu()
        self.steps[cpu_index] += 1
        steps = self.steps[cpu_index].to(index.device)
        bias1 = (1 - cfg.beta1 ** steps).float().view(-1, 1, 1)
        bias2_sqrt = (1 - cfg.beta2 ** steps).sqrt().float().view(-1, 1, 1)
        with torch.no_grad():
            for key, grad in zip(keys, grads):
                grad = grad[rows_t]
                m = self.exp_avg[key][index].lerp_(grad, 1 - cfg.beta1)
                v = self.exp_avg_sq[key][index].mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
                update = (cfg.lora_lr / bias1) * m / (v.sqrt() / bias2_sqrt + cfg.eps)
                self.params[key][index] = self.live[key].detach()[rows_t] - update
                self.exp_avg[key][index] = m
                self.exp_avg_sq[key][index] = v
        self.live = {}


def chunk_window(num_targets: int, chunk_index: int, cfg: TTTConfig) -> tuple[int, int, int]:
    """(start, end, score_from) of chunk `chunk_index` over a document's prediction positions: inputs start..end-1, the
    targets of positions score_from..end-1 (the chunk) are scored, with the W - C positions before the chunk as context
    (as strided scoring with stride C)."""
    score_from = chunk_index * cfg.chunk
    end = min(score_from + cfg.chunk, num_targets)
    return max(0, score_from - (cfg.window - cfg.chunk)), end, score_from


def ttt_evaluate(model: tg.GPT, val: tg.ValidationSet, cfg: TTTConfig, env: tg.DistributedEnv | None = None,
                 keep_token_losses: bool = False, progress=None) -> tg.EvalResult:
    """Score every selected document with chunked LoRA test-time training; documents are shared out over the ranks by
    train_gpt.assign_documents and the per-document sums all-reduced."""
    if cfg.chunk > cfg.window:
        raise tg.ConfigError(f"--chunk {cfg.chunk}: must be <= the window {cfg.window}")
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    device = next(model.parameters()).device
    tg.synchronize(device)
    start_time = time.perf_counter()
    counts = val.token_counts
    mine = tg.assign_documents(counts, world)[rank]
    queue = [d for d in sorted(mine, key=lambda d: (-int(counts[d]), d)) if counts[d] > 0]  # longest first
    losses = {d: np.full(int(counts[d]), np.nan) for d in mine}
    slots = max(1, min(cfg.doc_batch, len(queue)))
    lora = BatchedLoRA(lora_shapes(model, cfg.lora_targets), cfg, slots, device)
    slot_doc: list[int | None] = [None] * slots
    slot_tokens: list[np.ndarray | None] = [None] * slots
    slot_chunk = [0] * slots
    was_training = model.training
    model.eval()
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    last_report, done_docs = time.perf_counter(), 0
    try:
        while True:
            for s in range(slots):  # refill finished slots
                if slot_doc[s] is None and queue:
                    slot_doc[s], slot_chunk[s] = queue.pop(0), 0
                    slot_tokens[s] = val.document(slot_doc[s])
                    lora.reset(s)
            active = [s for s in range(slots) if slot_doc[s] is not None]
            if not active:
                break
            rows = [chunk_window(int(counts[slot_doc[s]]), slot_chunk[s], cfg) for s in active]
            length = max(end - start for start, end, _ in rows)
            inputs = np.zeros((len(active), length), dtype=np.int64)  # padded at the end of each row
            targets = np.full((len(active), length), tg.IGNORE_INDEX, dtype=np.int64)
            for i, (s, (start, end, score_from)) in enumerate(zip(active, rows)):
                tokens = slot_tokens[s]
                inputs[i, : end - start] = tokens[start:end]
                targets[i, score_from - start: end - start] = tokens[score_from + 1: end + 1]
            lora.select(torch.tensor(active, device=device))
            with torch.enable_grad(), tg.autocast_context(device):
                token_losses = adapted_losses(model, lora, lora.names, torch.from_numpy(inputs).to(device),
                                              torch.from_numpy(targets).to(device))
            # the score of each chunk, taken before any training on it
            scored = token_losses.detach().double().cpu().numpy()
            train_rows = []
            for i, (s, (start, end, score_from)) in enumerate(zip(active, rows)):
                losses[slot_doc[s]][score_from:end] = scored[i, score_from - start: end - start]
                if end < counts[slot_doc[s]]:
                    train_rows.append(i)  # no step after a document's last chunk
            if train_rows:
                per_row = token_losses.sum(dim=1) / torch.from_numpy(targets != tg.IGNORE_INDEX).sum(1).clamp(min=1).to(
                    device)
                lora.step(per_row[train_rows].sum(), train_rows)
            for s, (start, end, score_from) in zip(active, rows):
                slot_chunk[s] += 1
                if end >= counts[slot_doc[s]]:
                    slot_doc[s] = slot_tokens[s] = None
                    done_docs += 1
            if progress and time.perf_counter() - last_report > 60:
                last_report = time.perf_counter()
                progress(f"ttt rank:{rank} docs:{done_docs}/{len(mine)} elapsed:{last_report - start_time:.0f}s")
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return tg.gather_result("ttt", val, losses, start_time, device, keep_token_losses)


# ----------------------------------------------------------------------------------------------------------------------
# Gist mode: segment by segment, with the gist slots' keys and values cached


class GistCache:
    """The attention of one segment's forward in gist mode (the model's `gist_attend`), over the cached gist keys and
    values of the document's earlier segments, all visible, then the segment itself, causally (its raw tokens, then
    its k gist slots). The segment's own gist keys and values (after rotary, as attention sees them) join the cache
    for the next segments: segment j's forward is over L + k tokens, never over the earlier raw tokens."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # per layer [1, cached slots, Hkv, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.layer, self.new_gists = 0, 0

    def next_segment(self, new_gists: int) -> None:
        """The next forward is one segment whose last `new_gists` tokens are gist slots to cache."""
        self.layer, self.new_gists = 0, new_gists

    def __call__(self, q, k, v):
        """q [1, T, Hq, D], k/v [1, T, Hkv, D] of this segment, at the next layer -> [1, T, Hq, D]."""
        layer = self.layer
        self.layer += 1
        past = 0 if self.keys[layer] is None else self.keys[layer].size(1)
        keys = k if past == 0 else torch.cat([self.keys[layer], k], dim=1)
        values = v if past == 0 else torch.cat([self.values[layer], v], dim=1)
        t = q.size(1)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device)
        mask[:, past:] = torch.tril(mask[:, past:])
        q_heads, k_heads, v_heads = (x[0].transpose(0, 1) for x in (q, keys, values))
        k_heads, v_heads = repeat_kv(q_heads, k_heads, v_heads, 0)
        y = torch.nn.functional.scaled_dot_product_attention(q_heads, k_heads, v_heads, attn_mask=mask)
        if self.new_gists:  # cached: the earlier slots, then this segment's
            gist_k, gist_v = k[:, -self.new_gists:], v[:, -self.new_gists:]
            self.keys[layer] = gist_k if past == 0 else torch.cat([self.keys[layer], gist_k], dim=1)
            self.values[layer] = gist_v if past == 0 else torch.cat([self.values[layer], gist_v], dim=1)
        return y.transpose(0, 1)[None]


@torch.no_grad()
def gist_document_losses(model: tg.GPT, doc: np.ndarray, window: int = 0) -> np.ndarray:
    """Per-token losses (nats) of one document (BOS first) in gist mode: one forward of at most L + k tokens per
    segment. Raw tokens have their raw index as rotary position, the slots after segment j position (j + 1) * L, as in
    training (train_gpt.gist_layout). window > 0: the document is cut into pieces of `window` tokens, as training cuts
    it at TRAIN_SEQ_LEN, and each piece is read on its own (its first segment sees no slot); 0: one piece."""
    n = len(doc) - 1
    if 0 < window < n:
        return np.concatenate([gist_document_losses(model, doc[start: start + window + 1])
                               for start in range(0, n, window)])
    k, seg, vocab = model.config.gist_tokens, model.config.gist_segment, model.config.vocab_size
    device = next(model.parameters()).device
    cache = GistCache(len(model.blocks))
    losses = []
    for start in range(0, n, seg):
        end = min(start + seg, n)
        gists = k if end < n else 0  # no gist slots after the last segment
        ids = np.concatenate([doc[start:end], vocab + np.arange(gists)]).astype(np.int64)
        positions = np.concatenate([np.arange(start, end), np.full(gists, start + seg)])
        cache.next_segment(gists)
        with tg.autocast_context(device):
            cos, sin = model.rotary(torch.from_numpy(positions).to(device)[None])
            x = model.run_blocks(model.embed_with_gists(torch.from_numpy(ids).to(device)[None]), cos, sin, cache)
            targets = torch.from_numpy(doc[start + 1: end + 1].astype(np.int64)).to(device)
            losses.append(model.token_losses(x[0, : end - start], targets).double().cpu().numpy())
    return np.concatenate(losses) if losses else np.zeros(0)


def gist_evaluate(model: tg.GPT, val: tg.ValidationSet, env: tg.DistributedEnv | None = None,
                  keep_token_losses: bool = False, window: int = 0) -> tg.EvalResult:
    """Score every selected document in gist mode, in pieces of `window` tokens (0: whole documents; see
    gist_document_losses); documents are shared out over the ranks as for the other modes."""
    if not model.config.gist_tokens:
        raise tg.ConfigError("--mode gist: the checkpoint's model has no gist tokens (trained with GIST_TOKENS=0)")
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    device = next(model.parameters()).device
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        mine = tg.assign_documents(val.token_counts, world)[rank]
        losses = {d: gist_document_losses(model, val.document(d), window) for d in mine}
    finally:
        model.train(was_training)
    return tg.gather_result("gist", val, losses, start_time, device, keep_token_losses)


def context_slots_per_token(args, model: tg.GPT, val: tg.ValidationSet) -> float:
    """The mean number of key/value slots a scored token attends to (itself included): raw tokens of its window for
    flat, strided and ttt; in gist mode its segment's raw tokens up to itself plus the gist slots of its piece's earlier
    segments."""
    counts = val.token_counts.tolist()
    if args.mode == "gist":
        k, seg = model.config.gist_tokens, model.config.gist_segment
        index = np.arange(max(counts, default=0)) % args.window  # the position in its piece
        slots = index % seg + 1 + (index // seg) * k  # of the token predicting from position `index`
        return sum(int(slots[:n].sum()) for n in counts) / max(sum(counts), 1)
    if args.mode == "flat":
        windows = [w[1:] for w in tg.flat_windows(val.token_counts, args.window)]
    elif args.mode == "strided":
        windows = [w for n in counts for w in tg.strided_windows(n, args.window, args.stride)]
    else:
        cfg = TTTConfig(window=args.window, chunk=args.chunk)
        windows = [chunk_window(n, c, cfg) for n in counts for c in range(-(-n // cfg.chunk))]
    # a window (start, end, score_from) scores positions score_from..end-1; position p attends to p - start + 1 slots
    total = sum((end - score_from) * (score_from - start + 1 + end - start) / 2 for start, end, score_from in windows)
    return total / max(sum(counts), 1)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """A bad command-line argument; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eval_ttt.py", description="Per-document BPB evaluation (flat, strided, LoRA TTT) of a "
                                                "train_gpt.py checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a train_gpt.py checkpoint (.pt)")
    p.add_argument("--data", help="folder with *_val_*.bin shards (default: the checkpoint's DATA_PATH)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's; its sha256 must match)")
    p.add_argument("--mode", choices=("flat", "strided", "ttt", "gist"), default="strided",
                   help="gist: for checkpoints trained with GIST_TOKENS > 0, segment by segment with cached gist "
                        "slots, in pieces of --window tokens")
    p.add_argument("--window", type=int, help="tokens of input per window or chunk (default: the checkpoint's "
                                               "EVAL_WINDOW); gist: per piece (default: its TRAIN_SEQ_LEN)")
    p.add_argument("--stride", type=int, help="strided: tokens scored per window after the first (default: window/2)")
    p.add_argument("--chunk", type=int, help="ttt: tokens scored, then trained on, per step (default: window/4)")
    p.add_argument("--lora-rank", type=int, default=TTTConfig.lora_rank)
    p.add_argument("--lora-lr", type=float, default=TTTConfig.lora_lr, help="ttt: Adam learning rate of the adapters")
    p.add_argument("--lora-targets", default=",".join(TTTConfig.lora_targets),
                   help="comma-separated: q,k,v,o,fc,proj (mlp = fc,proj; attn = q,k,v,o),head, or all")
    p.add_argument("--doc-batch", type=int, default=TTTConfig.doc_batch, help="ttt: documents per forward/backward")
    p.add_argument("--seed", type=int, default=TTTConfig.seed, help="ttt: seed of the adapters' initial A matrices")
    p.add_argument("--max-docs", type=int, default=0, help="only the first N validation documents (0: all)")
    p.add_argument("--batch-tokens", type=int, help="flat/strided: tokens per forward (default: the checkpoint's)")
    p.add_argument("--rope-ntk-alpha", type=float, default=1.0, help="NTK-aware RoPE scaling for long windows")
    p.add_argument("--attn-backend", default="auto", help=" | ".join(("auto",) + tg.VARLEN_BACKENDS))
    p.add_argument("--fused", default="auto", help="train_gpt FUSED setting (kernels; LoRA projections use torch)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--dump-token-losses", help="write per-token losses (nats, float32 .npy) in the order of `docs`")
    return p


def check_args(args) -> None:
    """One clear line for each bad value, before any work."""
    def need(condition, option, problem):
        if not condition:
            raise UsageError(f"--{option} {getattr(args, option.replace('-', '_'))}: {problem}")

    need(args.window > 0, "window", "must be a positive integer")
    need(0 < args.stride <= args.window, "stride", f"must be in 1..window ({args.window})")
    need(args.chunk > 0, "chunk", "must be a positive integer")
    need(args.mode != "ttt" or args.chunk <= args.window, "chunk", f"must be <= the window ({args.window})")
    need(args.lora_rank > 0, "lora-rank", "must be a positive integer")
    need(args.lora_lr >= 0 and math.isfinite(args.lora_lr), "lora-lr", "must be a finite number >= 0")
    need(args.doc_batch > 0, "doc-batch", "must be a positive integer")
    need(args.max_docs >= 0, "max-docs", "must be >= 0 (0: all documents)")
    need(args.batch_tokens > 0, "batch-tokens", "must be a positive integer")
    need(args.rope_ntk_alpha > 0 and math.isfinite(args.rope_ntk_alpha), "rope-ntk-alpha", "must be > 0")
    try:
        parse_targets(args.lora_targets)
    except ValueError as e:
        raise UsageError(f"--lora-targets {args.lora_targets!r}: {e}; known: {', '.join(TARGET_GROUPS)}, all") from None


def resolve(path: str) -> str:
    """A relative path from the checkpoint is relative to where training ran: try here, then the repository root."""
    if os.path.isabs(path) or os.path.exists(path) or not (ROOT / path).exists():
        return path
    return str(ROOT / path)


# ----------------------------------------------------------------------------------------------------------------------
# Running one configuration, results and outputs


def run_config(args, model, val, env, keep_token_losses: bool, progress=None) -> tg.EvalResult:
    model.rotary.set_ntk_alpha(args.rope_ntk_alpha)
    try:
        if args.mode == "gist":
            return gist_evaluate(model, val, env, keep_token_losses, window=args.window)
        if model.config.gist_tokens and args.mode == "ttt":
            raise tg.ConfigError("--mode ttt: not implemented for gist models (use gist, strided or flat)")
        if args.mode == "ttt":
            cfg = TTTConfig(window=args.window, chunk=args.chunk, lora_rank=args.lora_rank, lora_lr=args.lora_lr,
                            lora_targets=parse_targets(args.lora_targets), doc_batch=args.doc_batch, seed=args.seed)
            return ttt_evaluate(model, val, cfg, env, keep_token_losses, progress=progress)
        return tg.evaluate(model, val, args.mode, args.window, args.batch_tokens, env, stride=args.stride,
                           keep_token_losses=keep_token_losses)
    finally:
        model.rotary.set_ntk_alpha(1.0)


def config_dict(args, setup: dict) -> dict:
    ttt = args.mode == "ttt"
    return {**setup, "mode": args.mode, "window": args.window,
            "stride": args.stride if args.mode == "strided" else None,
            "chunk": args.chunk if ttt else None, "lora_rank": args.lora_rank if ttt else None,
            "lora_lr": args.lora_lr if ttt else None,
            "lora_targets": ",".join(parse_targets(args.lora_targets)) if ttt else None,
            "doc_batch": args.doc_batch if ttt else None, "seed": args.seed if ttt else None,
            "adam_betas": list(ADAM_BETAS) if ttt else None, "adam_eps": ADAM_EPS if ttt else None,
            "batch_tokens": None if ttt else args.batch_tokens,
            "rope_ntk_alpha": args.rope_ntk_alpha, "max_docs": args.max_docs}


def results_dict(config: dict, result: tg.EvalResult, val: tg.ValidationSet,
                 context_slots: float | None = None) -> dict:
    """context_slots: the mean number of key/value slots a scored token attends to (context_slots_per_token)."""
    tokens, num_bytes = result.total_tokens, result.total_bytes
    return {"config": config, "bpb": result.bpb, "loss": result.loss, "tokens": tokens, "bytes": num_bytes,
            "context_slots_per_token": context_slots,
            "seconds": result.seconds, "tokens_per_s": tokens / max(result.seconds, 1e-9),
            "docs": [{"id": int(val.doc_ids[k]), "tokens": int(result.doc_tokens[k]), "bytes": int(result.doc_bytes[k]),
                      "nats": float(result.doc_nats[k])} for k in range(val.num_docs)]}


def gather_token_losses(result: tg.EvalResult, val: tg.ValidationSet, device) -> np.ndarray:
    """All documents' per-token losses, in document order, on every rank (each rank fills its own documents; summing
    zeros is exact)."""
    offsets = np.concatenate([[0], np.cumsum(val.token_counts)]).astype(np.int64)
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    for doc, values in result.token_losses.items():
        flat[offsets[doc]: offsets[doc + 1]] = torch.from_numpy(values).float()
    if dist.is_available() and dist.is_initialized():
        flat = tg.all_reduce_sum(flat.to(device)).cpu()
    return flat.numpy()


def summary_line(args, result: tg.EvalResult, val, model_config: tg.ModelConfig | None = None) -> str:
    if args.mode == "ttt":
        knobs = (f"window:{args.window} chunk:{args.chunk} lora_rank:{args.lora_rank} lora_lr:{args.lora_lr:g} "
                 f"lora_targets:{','.join(parse_targets(args.lora_targets))} doc_batch:{args.doc_batch}")
    elif args.mode == "strided":
        knobs = f"window:{args.window} stride:{args.stride}"
    elif args.mode == "gist":
        knobs = (f"gist_tokens:{model_config.gist_tokens} gist_segment:{model_config.gist_segment} "
                 f"window:{args.window}")
    else:
        knobs = f"window:{args.window}"
    return (f"eval mode:{args.mode} {knobs} rope_ntk_alpha:{args.rope_ntk_alpha:g} val_loss:{result.loss:.6f} "
            f"val_bpb:{result.bpb:.6f} docs:{val.num_docs} tokens:{result.total_tokens} bytes:{result.total_bytes} "
            f"time:{result.seconds:.2f}s tokens_per_s:{result.total_tokens / max(result.seconds, 1e-9):.0f}")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def progress_to_stderr(line: str) -> None:
    """Every process's progress lines, to stderr, for long runs."""
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint and its validation set


@dataclass
class Loaded:
    """A checkpoint's model and validation set, ready to score, and what every results file records about them."""
    model: tg.GPT
    val: tg.ValidationSet
    setup: dict  # checkpoint, tokenizer and data with their sha256, world size, device, kernels, torch version
    hyperparameters: dict  # the checkpoint's training settings, which options left unset default to


def fill_defaults(args, hyperparameters: dict) -> None:
    """Options left unset take the checkpoint's settings; the stride and the chunk follow the window."""
    if args.window is None:  # gist mode: the pieces training cut documents into
        eval_window = None if args.mode == "gist" else hyperparameters.get("eval_window")
        args.window = int(eval_window or hyperparameters.get("train_seq_len") or 1024)
    if args.stride is None:
        args.stride = tg.default_eval_stride(args.window)
    if args.chunk is None:
        args.chunk = max(1, args.window // 4)
    if args.batch_tokens is None:
        args.batch_tokens = int(hyperparameters.get("eval_batch_tokens") or 65536)


def load(args, env: tg.DistributedEnv) -> Loaded:
    """The kernels and attention backend asked for, the checkpoint's model, then `args`' unset options filled in from
    the checkpoint (in place) and checked before any data is read, then the tokenizer (its sha256 must be the
    checkpoint's) and the validation set."""
    fused = tg.parse_fused_ops(args.fused)
    if args.mode == "ttt":
        fused = ttt_fused_ops(fused)
    # a gist model's flat and strided windows go through the gist mask too
    model, state = tg.load_model(args.checkpoint, env.device, fused, args.attn_backend)
    backend = tg.attention_name(model.kernels, model.config.gist_tokens)
    hyperparameters = state.get("hyperparameters", {})
    fill_defaults(args, hyperparameters)
    check_args(args)
    data_path = args.data or resolve(state.get("data_path") or hyperparameters.get("data_path", ""))
    tokenizer_path = args.tokenizer or resolve(state.get("tokenizer_path")
                                               or os.path.join(data_path, "tokenizer.model"))
    if not os.path.isfile(tokenizer_path):
        raise tg.DataError(f"{tokenizer_path}: tokenizer file not found (give --tokenizer)")
    tokenizer_sha256 = tg.sha256_of_file(tokenizer_path)
    expected = state.get("tokenizer_sha256")
    if expected and tokenizer_sha256 != expected:
        raise tg.DataError(f"{tokenizer_path}: sha256 {tokenizer_sha256[:16]}... differs from the tokenizer the "
                           f"checkpoint was trained with ({expected[:16]}...)")
    sp = tg.load_tokenizer(tokenizer_path)
    vocab_size = model.config.vocab_size
    tables = tg.build_byte_tables(sp, vocab_size)
    val = tg.ValidationSet.load(data_path, vocab_size, tables, args.max_docs)
    setup = {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_sha256": tg.sha256_of_file(args.checkpoint),
             "code_sha256": tg.sha256_of_file(__file__), "tokenizer": os.path.abspath(tokenizer_path),
             "tokenizer_sha256": tokenizer_sha256, "data": os.path.abspath(data_path), "num_docs": val.num_docs,
             "world_size": env.world_size, "device": _device_name(env.device), "attention_backend": backend,
             "fused_ops": sorted(model.kernels.fused), "torch": torch.__version__,
             "gist_tokens": model.config.gist_tokens, "gist_segment": model.config.gist_segment}
    return Loaded(model, val, setup, hyperparameters)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------------------------
# main

MOVED_TO_SWEEP = ("--sweep", "--sweep-out")  # sweeps became tools/sweep.py: say so instead of "unrecognized arguments"


def main(argv=None) -> int:
    return command_line(lambda: run(parse_args(argv), tg.setup_distributed()))


def parse_args(argv=None) -> argparse.Namespace:
    """The options of one configuration; the sweep options, which moved to tools/sweep.py, are an error that says so."""
    arguments = sys.argv[1:] if argv is None else [str(a) for a in argv]
    moved = next((a.split("=", 1)[0] for a in arguments if a.split("=", 1)[0] in MOVED_TO_SWEEP), None)
    if moved:
        raise UsageError(f"{moved}: sweeps are run by tools/sweep.py, with the same options "
                         f"(python tools/sweep.py --checkpoint ... --sweep chunk=32,64,128 --sweep-out DIR)")
    return build_parser().parse_args(arguments)


def command_line(command) -> int:
    """`command()`'s exit status, as a command line: a bad argument or input is one `error:` line (under torchrun from
    process 0 only) and exit status 2; a process group that was set up is torn down in any case."""
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 reports
    try:
        return command()
    except (UsageError, tg.ConfigError, tg.DataError, tg.BackendError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def compile_counts() -> tuple[int, int]:
    """train_gpt.compile_counts, without importing Dynamo into a process that never compiled (importing it is not free,
    and an evaluation that compiles nothing, as every CPU one, has nothing to count)."""
    return tg.compile_counts() if "torch._dynamo" in sys.modules else (0, 0)


def run(args, env: tg.DistributedEnv) -> int:
    graphs_before, breaks_before = compile_counts()
    loaded = load(args, env)
    result = run_config(args, loaded.model, loaded.val, env, keep_token_losses=bool(args.dump_token_losses),
                        progress=progress_to_stderr)
    out = results_dict(config_dict(args, loaded.setup), result, loaded.val,
                       context_slots_per_token(args, loaded.model, loaded.val))
    # graphs compiled while scoring: a compiled attention (flex for a gist model on CUDA) must compile once, not once
    # per batch (evaluation pads its batches to one length for it)
    graphs, graph_breaks = compile_counts()
    out["compile"] = {"graphs": graphs - graphs_before, "graph_breaks": graph_breaks - breaks_before}
    losses = gather_token_losses(result, loaded.val, env.device) if args.dump_token_losses else None
    if env.is_main:
        if args.out:
            tg.write_atomic(args.out, (json.dumps(out, indent=1) + "\n").encode())
        if losses is not None:
            tg.write_atomic(args.dump_token_losses, npy_bytes(losses.astype(np.float32)))
        print(summary_line(args, result, loaded.val, loaded.model.config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

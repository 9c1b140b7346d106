"""Gist tokens, an experiment (GIST_TOKENS=k > 0, GIST_SEGMENT=L).

Every document piece is read in segments of L raw tokens, and after each segment but the last come k learned gist
slots. A segment sees its own raw tokens and the gist slots of its piece's earlier segments, never their raw tokens
(the mask is kernels/attention.py's gist attention). Gist slots are never scored and count no bytes.

The gist model takes what the plain model takes (raw tokens packed by cu_seqlens, or rows) and returns the raw tokens'
losses: it lays the slots out itself, on the device, so the loader, the training loop and the evaluation windows know
nothing of gists. A piece of n raw tokens becomes L raw, k slots, L raw, k slots, ..., its last segment with no slots
after it. Slot s has input id vocab_size + s (a row of gist_emb) and no target; rotary positions: a raw token keeps
its index in the piece, the slots after segment j all take position (j + 1) * L.

train_gpt.py imports this module only for a model with gist tokens, so only such a run carries it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.loader import IGNORE_INDEX
from kernels.attention import gist_layout, repeat_kv, segment_ids

# ----------------------------------------------------------------------------------------------------------------------
# The slot layout


def piece_lengths(raw_lengths: np.ndarray, gist_tokens: int, gist_segment: int) -> np.ndarray:
    """Tokens of each piece once its slots are in: k after every full segment of L that more tokens follow."""
    raw_lengths = np.asarray(raw_lengths, dtype=np.int64)
    return raw_lengths + gist_tokens * np.maximum(-(-raw_lengths // gist_segment) - 1, 0)


def laid_out_length(raw_tokens: int, gist_tokens: int, gist_segment: int) -> int:
    """The fixed length of `raw_tokens` raw tokens with their slots, however they are cut into pieces: pieces of n_i
    raw tokens add k * floor((n_i - 1) / L) slots each, and the sum of those floors is at most floor((N - 1) / L)."""
    return raw_tokens + gist_tokens * ((raw_tokens - 1) // gist_segment)


def insert_slots(inputs: np.ndarray, targets: np.ndarray, cu_seqlens: np.ndarray, gist_tokens: int,
                 gist_segment: int, vocab_size: int, length: int):
    """(inputs, targets, cu_seqlens) of the pieces with their slots inserted, padded to `length` tokens: the layout
    written with numpy, the reference that lay_out is held to.

    Raw tokens keep their order and targets; slot s has input vocab_size + s and an ignored target. The padding (input
    0, targets ignored) extends the last piece: it comes after every real token, so causal attention keeps it unseen."""
    raw_lengths = np.diff(cu_seqlens.astype(np.int64))
    lengths = piece_lengths(raw_lengths, gist_tokens, gist_segment)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    if total > length:
        raise ValueError(f"{total} tokens with gist slots do not fit in {length}")
    in_period = (np.arange(total) - np.repeat(starts[:-1], lengths)) % (gist_segment + gist_tokens)
    is_gist = in_period >= gist_segment
    new_inputs = np.zeros(length, dtype=inputs.dtype)
    new_targets = np.full(length, IGNORE_INDEX, dtype=targets.dtype)
    new_inputs[:total][~is_gist] = inputs
    new_inputs[:total][is_gist] = vocab_size + in_period[is_gist] - gist_segment
    new_targets[:total][~is_gist] = targets
    starts[-1] = length
    return new_inputs, new_targets, starts.astype(np.int32)


class SlotLayout(NamedTuple):
    input_ids: torch.Tensor  # [M]: raw tokens, slots and padding
    target_ids: torch.Tensor  # [M]: the raw tokens' targets, IGNORE_INDEX elsewhere
    cu_seqlens: torch.Tensor  # int32 [pieces + 1], the last piece extended over the padding
    raw_positions: torch.Tensor  # int64 [N]: where each raw token went


def lay_out(input_ids: torch.Tensor, target_ids: torch.Tensor, cu_seqlens: torch.Tensor, gist_tokens: int,
            gist_segment: int, vocab_size: int) -> SlotLayout:
    """insert_slots on the device, for N raw tokens (flat) and their pieces; always laid_out_length(N) tokens long, so
    a compiled step sees one shape."""
    n = input_ids.numel()
    length = laid_out_length(n, gist_tokens, gist_segment)
    device = input_ids.device
    cu = cu_seqlens.to(torch.int64)
    raw_lengths = cu[1:] - cu[:-1]
    slots = gist_tokens * (torch.div(raw_lengths + gist_segment - 1, gist_segment, rounding_mode="floor") - 1).clamp(
        min=0)
    slots_before = torch.cumsum(slots, 0) - slots
    piece = segment_ids(cu_seqlens, n)
    index = torch.arange(n, device=device)
    offset = index - cu[piece]
    raw_positions = index + slots_before[piece] + gist_tokens * torch.div(offset, gist_segment, rounding_mode="floor")
    new_cu = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(raw_lengths + slots, 0)])
    total = new_cu[-1]
    new_cu = torch.cat([new_cu[:-1], torch.full((1,), length, dtype=torch.int64, device=device)])
    position = torch.arange(length, device=device)
    new_piece = segment_ids(new_cu, length)
    in_period = (position - new_cu[new_piece]) % (gist_segment + gist_tokens)
    is_slot = (in_period >= gist_segment) & (position < total)
    ids = torch.zeros(length, dtype=input_ids.dtype, device=device).scatter(0, raw_positions, input_ids.reshape(-1))
    ids = torch.where(is_slot, vocab_size + in_period - gist_segment, ids).to(input_ids.dtype)
    targets = torch.full((length,), IGNORE_INDEX, dtype=target_ids.dtype, device=device).scatter(
        0, raw_positions, target_ids.reshape(-1))
    return SlotLayout(ids, targets, new_cu.to(torch.int32), raw_positions)


# ----------------------------------------------------------------------------------------------------------------------
# The model


@functools.cache
def with_gist_tokens(base: type) -> type:
    """The model class `base` (train_gpt's GPT) with gist tokens mixed in."""
    return type("GistGPT", (GistTokens, base), {"__doc__": "GPT with gist tokens (gist.py)."})


class GistTokens:
    """The gist embedding, the slot layout and the gist attention, over the plain model's embedding, blocks and head.
    The model's kernels carry a gist attention (kernels.attention.select_gist_attention) instead of a varlen one."""

    def __init__(self, config, model_kernels):
        if not hasattr(model_kernels.attention, "layout"):
            raise ValueError(f"GIST_TOKENS={config.gist_tokens}: the model's attention "
                             f"{model_kernels.attention.name!r} is not a gist attention (build its kernels with "
                             f"choose_kernels(..., gist=True))")
        super().__init__(config, model_kernels)
        self.gist_emb = nn.Embedding(config.gist_tokens, config.model_dim)  # one row per slot index
        nn.init.normal_(self.gist_emb.weight, std=config.tied_embed_init_std)

    @property
    def fixed_shapes(self) -> bool:
        """Whether the attention is compiled for one shape (flex): evaluation then pads its batches to one length."""
        return self.kernels.attention.fixed_shapes

    def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen=0, head_correction=None):
        """The raw tokens' losses [B, T], as the plain model's forward."""
        if head_correction is not None:
            raise ValueError("a gist model takes no head correction (test-time training is not implemented for it)")
        B, T = input_ids.shape
        if cu_seqlens is None:  # rows: each row one piece
            cu_seqlens = torch.arange(0, B * T + 1, T, device=input_ids.device, dtype=torch.int32)
        config = self.config
        slots = lay_out(input_ids.reshape(-1), target_ids.reshape(-1), cu_seqlens, config.gist_tokens,
                        config.gist_segment, config.vocab_size)
        with self.precision():
            x = self.hidden_states_with_slots(slots.input_ids, slots.cu_seqlens)
            losses = self.losses(x, slots.target_ids[None])[0]
        return losses[slots.raw_positions].view(B, T)

    def hidden_states_with_slots(self, input_ids, cu_seqlens):
        """Final hidden states [1, M, D] of laid-out tokens (lay_out's input_ids and cu_seqlens)."""
        n = input_ids.numel()
        attention = self.kernels.attention
        layout = attention.layout(gist_layout(cu_seqlens, n, self.config.gist_tokens, self.config.gist_segment), n)
        cos, sin = self.rotary(layout.positions[None])
        return self.run_blocks(self.embed_with_slots(input_ids[None]), cos, sin,
                               lambda q, k, v: attention(q[0], k[0], v[0], layout).unsqueeze(0))

    def embed_with_slots(self, input_ids):
        """Token embeddings, with ids >= vocab_size taken as slots (id - vocab_size indexes gist_emb)."""
        vocab = self.config.vocab_size
        is_gist = (input_ids >= vocab).unsqueeze(-1)
        tokens = self.tok_emb(input_ids.clamp(max=vocab - 1))
        gists = self.gist_emb((input_ids - vocab).clamp(0, self.config.gist_tokens - 1))
        return torch.where(is_gist, gists.to(tokens.dtype), tokens)

    # ------------------------------------------------------------------------------------------------------------------
    # Reading a document segment by segment (eval_ttt.py --mode gist)

    @torch.no_grad()
    def gist_document_losses(self, doc: np.ndarray, window: int = 0) -> np.ndarray:
        """Per-token losses (nats) of one document (BOS first), one forward of at most L + k tokens per segment, over
        the cached keys and values of the earlier segments' slots: exactly the training mask, and never a forward over
        earlier raw tokens. window > 0: the document is cut into pieces of `window` tokens, as training cuts it at
        TRAIN_SEQ_LEN, and each piece is read on its own (its first segment sees no slot); 0: one piece."""
        n = len(doc) - 1
        if 0 < window < n:
            return np.concatenate([self.gist_document_losses(doc[start: start + window + 1])
                                   for start in range(0, n, window)])
        k, seg, vocab = self.config.gist_tokens, self.config.gist_segment, self.config.vocab_size
        device = self.tok_emb.weight.device
        cache = GistCache(len(self.blocks))
        losses = []
        for start in range(0, n, seg):
            end = min(start + seg, n)
            gists = k if end < n else 0  # no slots after the last segment
            ids = np.concatenate([doc[start:end], vocab + np.arange(gists)]).astype(np.int64)
            positions = np.concatenate([np.arange(start, end), np.full(gists, start + seg)])
            cache.next_segment(gists)
            with self.precision():
                cos, sin = self.rotary(torch.from_numpy(positions).to(device)[None])
                x = self.run_blocks(self.embed_with_slots(torch.from_numpy(ids).to(device)[None]), cos, sin, cache)
                targets = torch.from_numpy(doc[start + 1: end + 1].astype(np.int64)).to(device)
                losses.append(self.token_losses(x[0, : end - start], targets).double().cpu().numpy())
        return np.concatenate(losses) if losses else np.zeros(0)

    def gist_context_slots(self, token_counts, window: int) -> float:
        """The mean number of key/value slots a scored token attends to in gist mode (itself included): its segment's
        raw tokens up to itself plus the slots of its piece's earlier segments."""
        k, seg = self.config.gist_tokens, self.config.gist_segment
        counts = [int(c) for c in token_counts]
        index = np.arange(max(counts, default=0)) % window  # the position in its piece
        slots = index % seg + 1 + (index // seg) * k
        return sum(int(slots[:n].sum()) for n in counts) / max(sum(counts), 1)


class GistCache:
    """The attention of one segment's forward in gist mode, over the cached gist keys and values of the document's
    earlier segments, all visible, then the segment itself, causally (its raw tokens, then its k slots). The segment's
    own slot keys and values (after rotary, as attention sees them) join the cache for the next segments."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # per layer [1, cached slots, Hkv, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.layer, self.new_gists = 0, 0

    def next_segment(self, new_gists: int) -> None:
        """The next forward is one segment whose last `new_gists` tokens are slots to cache."""
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
        y = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, attn_mask=mask)
        if self.new_gists:  # cached: the earlier slots, then this segment's
            gist_k, gist_v = k[:, -self.new_gists:], v[:, -self.new_gists:]
            self.keys[layer] = gist_k if past == 0 else torch.cat([self.keys[layer], gist_k], dim=1)
            self.values[layer] = gist_v if past == 0 else torch.cat([self.values[layer], gist_v], dim=1)
        return y.transpose(0, 1)[None]

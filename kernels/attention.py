"""Attention for packed documents: every varlen backend and the gist attention, each fast path beside its reference.

Varlen attention takes packed q [N, Hq, D], k and v [N, Hkv, D] (grouped-query heads), int32 cu_seqlens and an upper
bound on segment length, and returns [N, Hq, D] with causal attention inside each segment:
  fa3, fa2, torch_varlen: flash kernels, CUDA only (ATTN_BACKEND=auto on CUDA tries them in this order);
  masked_sdpa: one SDPA over all N tokens with a block-diagonal causal mask built on the device (no host sync, so it
               compiles into one graph); O(N^2) memory, so for CPUs and small batches (auto on a CPU when compiling);
  reference:   slow and obvious, a Python loop over the segments; what the tests compare every other backend with.

Gist attention (GIST_TOKENS > 0; FlashAttention cannot express its mask): the dense per-piece mask with plain SDPA (the
reference; CPUs) and flex_attention with a block mask built from the same per-token ids (CUDA). Within one piece, token
i sees token j iff j <= i and (j is a gist slot or j is in i's segment): a raw token sees its own segment's raw tokens
up to itself and the gist slots of earlier segments; a gist slot sees its segment's raw tokens, the slots before it in
its segment (and itself), and the slots of earlier segments. Raw tokens of earlier segments are reachable only through
the gists. Rotary positions: a raw token has its raw index in the piece (as without gists); the k slots after segment
j all take position (j + 1) * L, the position right after the segment's last raw token.

The choice is made once, by select_varlen_attention / select_gist_attention, and handed to the model as a value.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

VARLEN_BACKENDS = ("fa3", "fa2", "torch_varlen", "masked_sdpa", "reference")
FLASH_INSTALL_HINT = ("install flash attention (`pip install flash-attn --no-build-isolation`, or FA3's "
                      "flash_attn_interface from the hopper/ folder of Dao-AILab/flash-attention) or use torch >= 2.10 "
                      "for torch_varlen; ATTN_BACKEND=masked_sdpa or reference run anywhere, slowly")


class BackendError(ValueError):
    """The attention backend asked for cannot run here; the message says why and what to use instead."""


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces


def repeat_kv(q, k, v, heads_dim: int):
    """Repeat grouped key/value heads to the query heads (SDPA's own GQA path is slow on CPUs)."""
    repeat = q.size(heads_dim) // k.size(heads_dim)
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, heads_dim), v.repeat_interleave(repeat, heads_dim)


def sdpa_causal(q, k, v):
    """Causal SDPA on [B, H, T, D] with grouped-query heads. On CPUs SDPA's GQA path falls back to a slow kernel
    (~5x here), so the key/value heads are repeated instead."""
    if k.size(1) == q.size(1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, *repeat_kv(q, k, v, 1), is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The segment of every token, computed on the device (zero-length padding segments hold no token)."""
    index = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens.to(torch.int64), index, right=True) - 1


# ----------------------------------------------------------------------------------------------------------------------
# Varlen backends


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen):
    """Slow and obvious: a loop over the segments, plain causal SDPA on each."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q_seg, k_seg, v_seg = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out[start:end] = sdpa_causal(q_seg, k_seg, v_seg)[0].transpose(0, 1)
    return out


def varlen_attention_masked(q, k, v, cu_seqlens, max_seqlen):
    """All N tokens in one SDPA call; token i attends to token j iff both are in one segment and j <= i."""
    n = q.size(0)
    segment = segment_ids(cu_seqlens, n)
    index = torch.arange(n, device=q.device)
    mask = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
    k, v = repeat_kv(q, k, v, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def _flash_backend(module_name: str):
    module = __import__(module_name)
    fn = module.flash_attn_varlen_func

    def attention(q, k, v, cu_seqlens, max_seqlen):
        # by keyword: FA3 builds of early 2025 take seqused_q/k right after cu_seqlens_q/k, so positional max_seqlen
        # would land there
        out = fn(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                 max_seqlen_k=max_seqlen, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the logsumexp

    return attention


def _torch_varlen_backend():
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    gqa = "enable_gqa" in parameters

    def attention(q, k, v, cu_seqlens, max_seqlen):
        if not gqa:
            k, v = repeat_kv(q, k, v, 1)
        extra = {"enable_gqa": True} if gqa and k.size(1) != q.size(1) else {}
        if "window_size" in parameters:  # torch >= 2.11: causal is a (-1, 0) window
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0), **extra)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=True, **extra)  # 2.10

    return attention


def load_varlen_backend(name: str, device: torch.device):
    """The backend's function, or None if it cannot run here."""
    if name == "reference":
        return varlen_attention_reference
    if name == "masked_sdpa":
        return varlen_attention_masked
    if name not in VARLEN_BACKENDS:
        raise BackendError(f"ATTN_BACKEND={name!r}: unknown backend")
    if device.type != "cuda":
        return None  # flash kernels and torch's varlen_attn are CUDA-only
    try:
        if name == "fa3":
            return _flash_backend("flash_attn_interface")
        if name == "fa2":
            return _flash_backend("flash_attn")
        return _torch_varlen_backend()
    except (ImportError, AttributeError):
        return None


def auto_backend_chain(device: torch.device, compiling: bool) -> tuple[str, ...]:
    """What ATTN_BACKEND=auto tries. On CUDA only the flash kernels: the other two would put a 65k x 65k mask or a
    host sync per layer on every step, so a missing flash kernel is an error, not a silent slow run. On a CPU the
    segment loop is fastest eagerly, and the masked SDPA is the one that compiles without a graph break."""
    if device.type == "cuda":
        return ("fa3", "fa2", "torch_varlen")
    return ("masked_sdpa",) if compiling else ("reference",)


class VarlenAttention(NamedTuple):
    """A chosen varlen backend: its name and function. Called as attention(q, k, v, cu_seqlens, max_seqlen)."""

    name: str
    function: Callable

    def __call__(self, q, k, v, cu_seqlens, max_seqlen):
        return self.function(q, k, v, cu_seqlens, max_seqlen)


REFERENCE_VARLEN = VarlenAttention("reference", varlen_attention_reference)


def select_varlen_attention(requested: str, device: torch.device, compiling: bool = False) -> VarlenAttention:
    """The first backend of the chain that loads here (or the one requested)."""
    for name in (auto_backend_chain(device, compiling) if requested == "auto" else (requested,)):
        function = load_varlen_backend(name, device)
        if function is not None:
            return VarlenAttention(name, function)
    if device.type == "cuda":
        raise BackendError(f"ATTN_BACKEND={requested!r}: no flash attention kernel loads on this CUDA machine; "
                           f"{FLASH_INSTALL_HINT}")
    raise BackendError(f"ATTN_BACKEND={requested!r}: not available on {device.type} (CUDA-only)")


# ----------------------------------------------------------------------------------------------------------------------
# Gist attention


class GistLayout(NamedTuple):
    """Per-token ids of a packed gist input of N tokens, computed on the device from cu_seqlens."""

    cu_seqlens: torch.Tensor  # int32 [pieces + 1]
    piece: torch.Tensor  # int64 [N]: which piece (document, or part of one) the token is in
    segment: torch.Tensor  # int64 [N]: which segment of its piece
    is_gist: torch.Tensor  # bool [N]
    positions: torch.Tensor  # int64 [N]: rotary positions
    block_mask: object = None  # flex_attention's BlockMask on CUDA, None for the reference


def gist_layout(cu_seqlens: torch.Tensor, num_tokens: int, gist_tokens: int, gist_segment: int) -> GistLayout:
    piece = segment_ids(cu_seqlens, num_tokens)
    offset = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[piece]
    segment, in_period = offset // (gist_segment + gist_tokens), offset % (gist_segment + gist_tokens)
    positions = segment * gist_segment + in_period.clamp(max=gist_segment)
    return GistLayout(cu_seqlens, piece, segment, in_period >= gist_segment, positions)


def gist_mask(layout: GistLayout, rows: slice = slice(None)) -> torch.Tensor:
    """bool [n, n] over the tokens `rows`: which token (column) each token (row) attends to."""
    piece, segment, is_gist = layout.piece[rows], layout.segment[rows], layout.is_gist[rows]
    index = torch.arange(len(piece), device=piece.device)
    return ((piece[:, None] == piece[None, :]) & (index[None, :] <= index[:, None])
            & (is_gist[None, :] | (segment[:, None] == segment[None, :])))


def gist_attention_reference(q, k, v, layout: GistLayout):
    """Slow and obvious: for each piece, its dense gist mask and plain SDPA. q [N, Hq, D], k/v [N, Hkv, D]."""
    out = torch.empty_like(q)
    bounds = layout.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            rows = slice(start, end)
            q_piece, k_piece, v_piece = (t[rows].transpose(0, 1) for t in (q, k, v))
            k_piece, v_piece = repeat_kv(q_piece, k_piece, v_piece, 0)
            out[rows] = F.scaled_dot_product_attention(q_piece, k_piece, v_piece,
                                                       attn_mask=gist_mask(layout, rows)).transpose(0, 1)
    return out


def gist_block_mask(layout: GistLayout, num_tokens: int):
    """flex_attention's block mask of the gist mask (the same rule as gist_mask, one token pair at a time)."""
    from torch.nn.attention.flex_attention import create_block_mask

    piece, segment, is_gist = layout.piece, layout.segment, layout.is_gist

    def mask_mod(b, h, q_idx, kv_idx):
        return ((piece[q_idx] == piece[kv_idx]) & (kv_idx <= q_idx)
                & (is_gist[kv_idx] | (segment[q_idx] == segment[kv_idx])))

    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=piece.device)


class FlexGistAttention:
    """flex_attention over all N tokens with the layout's block mask, compiled once (eager flex materialises N x N).
    It is compiled for fixed shapes, so callers keep N fixed: training batches have one length, and evaluation pads
    its batches to one length (fixed_shapes tells them to)."""

    name = "flex"
    fixed_shapes = True

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        self.flex_attention = torch.compile(flex_attention, dynamic=False)

    def layout(self, layout: GistLayout, num_tokens: int) -> GistLayout:
        return layout._replace(block_mask=gist_block_mask(layout, num_tokens))

    def __call__(self, q, k, v, layout: GistLayout):
        out = self.flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                  block_mask=layout.block_mask, enable_gqa=k.size(1) != q.size(1))
        return out[0].transpose(0, 1)


class ReferenceGistAttention:
    """The dense per-piece mask (CPUs; the reference the flex path is tested against)."""

    name = "reference"
    fixed_shapes = False

    def layout(self, layout: GistLayout, num_tokens: int) -> GistLayout:
        return layout

    def __call__(self, q, k, v, layout: GistLayout):
        return gist_attention_reference(q, k, v, layout)


REFERENCE_GIST = ReferenceGistAttention()


def select_gist_attention(requested: str, device: torch.device, compiling: bool = False):
    """flex on CUDA for ATTN_BACKEND=auto, else the reference."""
    if requested not in ("auto", "reference"):
        raise BackendError(f"ATTN_BACKEND={requested!r}: cannot express the gist attention mask (GIST_TOKENS > 0); "
                           f"use auto or reference")
    if requested == "auto" and device.type == "cuda":
        return FlexGistAttention()
    if compiling:
        raise BackendError("COMPILE=1: the gist reference attention (a loop over pieces) does not compile into one "
                           "graph; use COMPILE=0 on CPUs (on CUDA, ATTN_BACKEND=auto uses flex_attention)")
    return REFERENCE_GIST

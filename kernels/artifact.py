"""Codecs of the size-limited artifact (track_10min_16mb): a trained model's state dict as a few megabytes, read back
into the same names, shapes and dtypes.

    data = encode_artifact(model.state_dict(), "int6_lzma", meta)     # bytes: the .ptz file
    state_dict, meta = decode_artifact(data)                           # ValueError if damaged or not an artifact

Codecs (CODECS):
  int8_zlib       parameter-golf's baseline scheme: per-row symmetric int8 (scale = the row's max |w| / 127, so no value
                  is clipped and every value is within half a step of its row's scale), zlib level 9;
  int6_lzma       per-row int6, values in [-31, 31], the clip of each row chosen among a few quantiles of |w| to
                  minimise the row's squared error; packed 4 values in 3 bytes; lzma preset 9;
  int6_gptq_lzma  int6 with GPTQ's error-compensating rounding: column by column, each column's rounding error is
                  spread over the columns not yet rounded through the inverse Hessian H = X^T X of the layer's inputs X
                  (collect_hessians, on training batches), so that X W^T moves as little as it can. Per row, the clip
                  with the least error on the calibration activations wins; plain rounding is one of the candidates,
                  so no row does worse than int6_lzma's on them. The embedding (no Hessian) is rounded as in int6_lzma.

Which tensors are quantized (quantization_plan): floating-point matrices with at least MIN_QUANTIZED_DIM rows and
columns; every other tensor (norm gains, attn/mlp scales, q_gain, resid_mix [2, D], skip_weights [L/2, D], small gist
embeddings, integers) is kept exactly, in its own dtype. Under the int6 codecs the names in INT8_IN_INT6_CODECS (the
tied embedding) stay int8: the tied embedding is both the input table and the output head, so its error reaches every
token twice, and parameter-golf's records measured its precision to matter more than that of any block matrix; at the
baseline shape int8 instead of int6 costs it about 0.13 MB raw (1024 x 512 x 2 bits).

Format: the file is one zlib (int8_zlib) or xz (int6 codecs) stream of a torch.save archive of
    {"format": FORMAT, "codec": codec, "meta": json.dumps(meta, sort_keys=True), "tensors": {name: entry}}
in the state dict's order, where entry is one of
    {"kind": "keep", "data": tensor}
    {"kind": "int8", "dtype": "float32", "q": int8 [rows, cols], "scale": float16 [rows]}
    {"kind": "int6", "dtype": "float32", "shape": [rows, cols], "packed": uint8 [3 * ceil(rows * cols / 4)],
     "scale": float16 [rows]}
and a quantized matrix decodes to q * scale[:, None] (exact in float32), cast to dtype. Nothing in the payload depends
on anything but the tensors, the codec and meta (torch.save, zlib and lzma are deterministic), so the same weights give
the same bytes. decode_artifact loads with torch.load(weights_only=True): a file cannot run code when read.

Each fast path has a slow, obvious twin that the tests hold it to: gptq_quantize beside gptq_reference (the textbook
one-column-at-a-time update of W and of the inverse Hessian), unpack_int6 beside unpack_int6_reference (bit by bit).
Only the standard library, torch and numpy are imported: a record embeds kernels/ and runs alone.
"""

import bz2
import hashlib
import importlib
import io
import json
import lzma
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

LEGACY_CODECS = ("int8_zlib", "int6_lzma", "int6_gptq_lzma")
# The frontier's codecs (parameter-golf, April 2026): a base "sdclip" and composable flags, in this order
FRONTIER_CODECS = tuple(f"sdclip{gptq}{lqer}{grouped}" for gptq in ("", "_gptq") for lqer in ("", "_lqer")
                        for grouped in ("", "_grouped"))
CODECS = LEGACY_CODECS + FRONTIER_CODECS
FORMAT = "kernels.artifact/1"
GROUPED_FORMAT = "kernels.artifact.grouped/1"

# A matrix is quantized per row when it has at least this many rows and columns. The float16 scale then costs at most
# 16 bits per 64 values, and the model's control tensors (resid_mix has 2 rows, skip_weights num_layers / 2) stay
# exact at any width, while every weight matrix of run.sh's CPU model (the smallest: c_k, 64 x 128) is quantized.
MIN_QUANTIZED_DIM = 64
INT8_IN_INT6_CODECS = ("tok_emb.weight",)
INT8_MAX, INT6_MAX = 127, 31
# Candidate clips of a row for the int6 codecs, as quantiles of its |w| (1.0: the maximum, nothing clipped). Rows are
# 512 to 1024 values wide at the baseline shape, so 0.99 clips the ~5-10 largest.
INT6_CLIP_QUANTILES = (1.0, 0.9999, 0.999, 0.995, 0.99)
GPTQ_DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean: H stays invertible and the updates moderate
GPTQ_BLOCK = 128  # columns per lazy batch of the fast GPTQ
ZLIB_LEVEL, LZMA_PRESET = 9, 9
ZLIB_MAGIC, XZ_MAGIC = b"\x78", b"\xfd7zXZ\x00"


# ----------------------------------------------------------------------------------------------------------------------
# Per-row scales and plain rounding


def float16_scale(step: Tensor) -> Tensor:
    """Each row's quantization step as float16, rounded up rather than to nearest (so that value / scale never exceeds
    the largest level and nothing meant to fit is clipped); 1 for an all-zero row."""
    if not torch.isfinite(step).all() or step.max() > torch.finfo(torch.float16).max:
        raise ValueError("a weight row is too large (or not finite) for a float16 scale")
    scale = step.to(torch.float16)
    rounded_down = scale.float() < step
    # positive float16 values order like their bit patterns, so + 1 on the bits is the next float16 up
    scale = torch.where(rounded_down, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    return torch.where(step > 0, scale, torch.ones_like(scale))


def round_to_grid(w: Tensor, scale: Tensor, max_level: int) -> Tensor:
    """round(w / scale) per row, clamped to [-max_level, max_level]; in w's (float) dtype."""
    return torch.round(w / scale.to(w.dtype)[:, None]).clamp_(-max_level, max_level)


def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 with scale max|row| / 127: every value is within half a step of its row's scale."""
    w = w.float()
    scale = float16_scale(w.abs().amax(dim=1) / INT8_MAX)
    return round_to_grid(w, scale, INT8_MAX).to(torch.int8), scale


def row_quantiles(w: Tensor, quantiles: Iterable[float]) -> Tensor:
    """[len(quantiles), rows]: the quantiles of each row's |w| (linear interpolation, as torch.quantile, which refuses
    inputs above 16M values)."""
    ranked = w.abs().sort(dim=1).values
    cols = ranked.size(1)
    out = []
    for q in quantiles:
        position = q * (cols - 1)
        below = int(position)
        above = min(below + 1, cols - 1)
        out.append(ranked[:, below] + (position - below) * (ranked[:, above] - ranked[:, below]))
    return torch.stack(out)


def int6_clip_candidates(w: Tensor) -> Tensor:
    """[len(INT6_CLIP_QUANTILES), rows] float16 scales, one per candidate clip of each row."""
    return float16_scale(row_quantiles(w.float(), INT6_CLIP_QUANTILES) / INT6_MAX)


def quantize_int6_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int6 in [-31, 31]: for each row, the candidate clip whose rounding has the least squared error (the
    first of equals, so the maximum wins ties)."""
    w = w.float()
    best_q, best_scale, best_error = None, None, None
    for scale in int6_clip_candidates(w):
        q = round_to_grid(w, scale, INT6_MAX)
        error = (w - q * scale.float()[:, None]).square().sum(dim=1)
        if best_q is None:
            best_q, best_scale, best_error = q, scale, error
            continue
        better = error < best_error
        best_q = torch.where(better[:, None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(error, best_error)
    return best_q.to(torch.int8), best_scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    # q has at most 7 significant bits and a float16 scale 11, so the float32 product is exact
    return (q.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ


def damped_hessian(hessian: Tensor, damping: float = GPTQ_DAMPING) -> Tensor:
    """H + damping x mean(diag H) x I, in float64 (the identity if H is all zero: nothing to compensate)."""
    H = hessian.double().clone()
    mean_diagonal = H.diagonal().mean()
    if not mean_diagonal > 0:
        return torch.eye(H.size(0), dtype=torch.float64, device=H.device)
    H.diagonal().add_(damping * mean_diagonal)
    return H


def act_order(hessian: Tensor) -> Tensor:
    """Columns by decreasing H diagonal (the inputs with the most energy first, while the most columns are left to
    absorb their error); a stable sort, so equal diagonals keep their order."""
    return torch.sort(hessian.diagonal(), descending=True, stable=True).indices


def gptq_quantize(w: Tensor, hessian: Tensor, scale: Tensor, max_level: int = INT6_MAX,
                  damping: float = GPTQ_DAMPING, block: int = GPTQ_BLOCK) -> Tensor:
    """GPTQ rounding of w [rows, cols] to integers in [-max_level, max_level] with the given per-row scales; float64.

    Fast form (Frantar et al. 2023): after column j is rounded, the remaining problem's inverse Hessian is that of the
    previous one with row and column j eliminated, and its row j is row j of the upper Cholesky factor U of H^-1 times
    U[j, j]. So U, computed once, gives every step's update. Inside a block of columns the updates are applied one
    column at a time; to the columns after the block, once per block (one matmul)."""
    order = act_order(hessian)
    H = damped_hessian(hessian, damping)[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # transposed, so that a column of w is a contiguous row of Wt (several times faster on CPUs)
    Wt = w.double().T[order].contiguous()
    s = scale.double()
    Qt = torch.zeros_like(Wt)
    cols = Wt.size(0)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = torch.zeros(end - start, Wt.size(1), dtype=torch.float64, device=Wt.device)
        for j in range(start, end):
            Qt[j] = torch.round(Wt[j] / s).clamp_(-max_level, max_level)
            errors[j - start] = (Wt[j] - Qt[j] * s) / U[j, j]
            Wt[j + 1:end].addr_(U[j, j + 1:end], errors[j - start], alpha=-1)
        Wt[end:].addmm_(U[start:end, end:].T, errors, alpha=-1)
    Q = Qt.T
    return Q[:, torch.argsort(order)]


def gptq_reference(w: Tensor, hessian: Tensor, scale: Tensor, max_level: int = INT6_MAX,
                   damping: float = GPTQ_DAMPING) -> Tensor:
    """The slow, obvious GPTQ: columns in act order, one at a time. Round column j; move the columns not yet rounded
    by the optimal-brain-surgeon update -error_j / Hinv[j, j] x Hinv[j, :]; then remove j from the problem by Gaussian
    elimination of row and column j of Hinv."""
    order = torch.sort(hessian.diagonal(), descending=True, stable=True).indices
    H = hessian.double()[order][:, order]
    identity = torch.eye(len(H), dtype=torch.float64, device=H.device)
    mean_diagonal = H.diagonal().mean()
    Hinv = torch.linalg.inv(H + damping * mean_diagonal * identity if mean_diagonal > 0 else identity)
    W = w.double()[:, order].clone()
    s = scale.double()
    Q = torch.zeros_like(W)
    for j in range(W.size(1)):
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s), -max_level, max_level)
        error = W[:, j] - Q[:, j] * s
        W -= torch.outer(error / Hinv[j, j], Hinv[j, :])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q[:, torch.argsort(order)]


def output_error(w: Tensor, reconstruction: Tensor, hessian: Tensor) -> Tensor:
    """Per row, the squared error of the layer's outputs on the calibration inputs: sum over inputs x of
    (x . (w - reconstruction))^2 = e H e^T, e the row's error."""
    e = (w.double() - reconstruction.double())
    return ((e @ hessian.double()) * e).sum(dim=1)


def quantize_int6_gptq(w: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int6 by GPTQ. Candidates for each row: GPTQ at each clip of INT6_CLIP_QUANTILES, and plain rounding at
    quantize_int6_rows' clip; the row keeps the one with the least output error on the calibration inputs (rows are
    independent in GPTQ, so all candidates run as one stacked matrix)."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} for a matrix of {cols} columns")
    w = w.float()
    hessian = hessian.to(w.device)
    candidate_scales = int6_clip_candidates(w)  # [k, rows]
    k = candidate_scales.size(0)
    stacked = gptq_quantize(w.repeat(k, 1), hessian, candidate_scales.reshape(-1)).view(k, rows, cols)
    plain_q, plain_scale = quantize_int6_rows(w)
    candidates_q = torch.cat((stacked, plain_q.double()[None]))
    candidates_scale = torch.cat((candidate_scales, plain_scale[None]))
    errors = torch.stack([output_error(w, q * s.double()[:, None], hessian)
                          for q, s in zip(candidates_q, candidates_scale)])
    best = errors.argmin(dim=0)  # the first of equals
    rows_index = torch.arange(rows, device=w.device)
    return candidates_q[best, rows_index].to(torch.int8), candidates_scale[best, rows_index]


# A tied head has no nn.Linear to hook: its input is the output of a method of the model (train_gpt.GPT.hidden_states:
# the final norm's output, [B, T, D]), and its Hessian is that output's X^T X.
TIED_HEAD_INPUTS = {"tok_emb.weight": "hidden_states"}


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable, forward: Callable, names: Iterable[str],
                     tied_head_inputs: dict[str, str] = TIED_HEAD_INPUTS) -> dict[str, Tensor]:
    """H = sum of x x^T over every input row x of each named Linear layer (by its weight's state-dict name, e.g.
    "blocks.0.attn.c_q.weight"), float64 on the layer's device, while forward(model, batch) runs each batch (forward
    pre-hooks, so any nn.Linear subclass works). Feed it training batches, never validation ones. Sums, not means: GPTQ
    does not care about H's scale, and ranks' sums all-reduce into the whole calibration set's. A layer whose forward
    never ran (a fused op that reads .weight directly, e.g. kernels' relu2_linear for mlp.fc) is an error."""
    layers, tied = {}, {}
    for name in names:
        if name in tied_head_inputs and callable(getattr(model, tied_head_inputs[name], None)):
            tied[name] = tied_head_inputs[name]
            continue
        module_name, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise ValueError(f"collect_hessians: {name} is not the weight of an nn.Linear of the model")
        layers[name] = module
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
                for name, m in layers.items()}
    rows_seen = dict.fromkeys([*layers, *tied], 0)

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if name not in hessians:
            hessians[name] = torch.zeros(x.size(1), x.size(1), dtype=torch.float64, device=x.device)
        hessians[name].addmm_(x.T, x)
        rows_seen[name] += x.size(0)

    def accumulator(name):
        def hook(module, args):
            add(name, args[0])
        return hook

    def wrapped(name, method):
        def capture(*args, **kwargs):
            out = method(*args, **kwargs)
            add(name, out)
            return out
        return capture

    handles = [module.register_forward_pre_hook(accumulator(name)) for name, module in layers.items()]
    for name, method_name in tied.items():  # an instance attribute shadows the method while the batches run
        setattr(model, method_name, wrapped(name, getattr(model, method_name)))
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for method_name in tied.values():
            if method_name in vars(model):
                delattr(model, method_name)
    unseen = [name for name, rows in rows_seen.items() if rows == 0]
    if unseen:
        raise ValueError(f"collect_hessians: no input reached {', '.join(unseen)} (no batches, or the model does not "
                         "call these modules: a fused op that reads .weight directly bypasses the hook)")
    return hessians


# ----------------------------------------------------------------------------------------------------------------------
# int6 bit packing: value i is bits 6i .. 6i+5 of the little-endian bit stream, stored as q + 32 (1 .. 63)


def pack_int6(q: np.ndarray) -> np.ndarray:
    """int values in [-31, 31] -> uint8 [3 * ceil(n / 4)], 4 values in 3 bytes (padded with zeros)."""
    v = q.reshape(-1).astype(np.int32)
    if v.size and (v.min() < -INT6_MAX or v.max() > INT6_MAX):
        raise ValueError(f"pack_int6: values outside [-{INT6_MAX}, {INT6_MAX}]")
    v = np.concatenate((v, np.zeros(-v.size % 4, dtype=np.int32))) + 32
    groups = v.reshape(-1, 4).astype(np.uint32)
    word = groups[:, 0] | groups[:, 1] << 6 | groups[:, 2] << 12 | groups[:, 3] << 18
    return np.stack((word & 255, word >> 8 & 255, word >> 16), axis=1).astype(np.uint8).reshape(-1)


def unpack_int6(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` values of a pack_int6 stream, as int8."""
    b = packed.reshape(-1, 3).astype(np.uint32)
    word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16
    v = np.stack([word >> shift & 63 for shift in (0, 6, 12, 18)], axis=1).reshape(-1)[:count]
    return (v.astype(np.int16) - 32).astype(np.int8)


def unpack_int6_reference(packed: bytes, count: int) -> list[int]:
    """unpack_int6, bit by bit from the definition."""
    values = []
    for i in range(count):
        value = 0
        for bit in range(6):
            position = 6 * i + bit
            value |= (packed[position // 8] >> (position % 8) & 1) << bit
        values.append(value - 32)
    return values


def packed_int6_bytes(count: int) -> int:
    return 3 * -(-count // 4)


# ----------------------------------------------------------------------------------------------------------------------
# The frontier codecs: SDClip scales, int7 embeddings, GPTQ on the tied embedding, small tensors in float16, LQER


@dataclass(frozen=True)
class CodecOptions:
    sdclip: bool  # the frontier's plan (SDClip scales, int7 embedding, float16 small tensors, int8 gates)
    gptq: bool
    lqer: bool
    grouped: bool


def codec_options(codec: str) -> CodecOptions:
    if codec not in CODECS:
        raise ValueError(f"unknown artifact codec {codec!r} (one of {', '.join(CODECS)})")
    return CodecOptions(codec.startswith("sdclip"), "gptq" in codec, "_lqer" in codec, codec.endswith("_grouped"))


# SDClip (parameter-golf 2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2): a row's step is k std(row) / max_level,
# with k by tensor family; the values beyond k standard deviations are clipped to the largest level.
SDCLIP_SIGMAS = {"embedding": 14.0, "attention": 13.0, "mlp": 11.5, "other": 12.85}
SDCLIP_BITS = {"embedding": 7, "attention": 6, "mlp": 6, "other": 6}
SMALL_TENSOR_NUMEL = 65_536  # float tensors of at most this many values are stored as float16 (not quantized)
FLOAT16_MAX = 65504.0
LQER_TOP_K, LQER_RANK, LQER_GROUP = 3, 4, 64  # matrices corrected, rank of the correction, B's values per scale
LQER_A_LEVELS, LQER_B_LEVELS = (-2, 1), (-8, 7)  # A int2 (one scale per matrix), B int4 (one scale per group)


def tensor_family(name: str) -> str:
    if "tok_emb" in name:
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def max_level(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def sdclip_scale(w: Tensor, sigmas: float, level: int) -> Tensor:
    """Per-row float16 step k std(row) / level (std with Bessel's correction; rounded up as float16_scale does)."""
    return float16_scale(sigmas * w.float().std(dim=1) / level)


def quantize_sdclip(w: Tensor, sigmas: float, bits: int, hessian: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(int8 values in [-L, L], float16 scales) at SDClip's scales; L = 2^(bits-1) - 1. With a Hessian: GPTQ at those
    scales, and per row the least output error on the calibration inputs of GPTQ and plain rounding (the first of
    equals: GPTQ), so that no row does worse than plain rounding at the same scale."""
    w = w.float()
    level = max_level(bits)
    scale = sdclip_scale(w, sigmas, level)
    plain = round_to_grid(w, scale, level)
    if hessian is None:
        return plain.to(torch.int8), scale
    if hessian.shape != (w.size(1), w.size(1)):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} for a matrix of {w.size(1)} columns")
    hessian = hessian.to(w.device)
    gptq = gptq_quantize(w, hessian, scale, level)
    s = scale.double()[:, None]
    better_plain = output_error(w, plain.double() * s, hessian) < output_error(w, gptq * s, hessian)
    return torch.where(better_plain[:, None], plain.double(), gptq).to(torch.int8), scale


def quantize_lqer(A: Tensor, B: Tensor, group: int = LQER_GROUP) -> dict:
    """A [rows, r] as int2 in [-2, 1] with one float16 scale (|A|max / 1.5); B [r, cols] flattened, int4 in [-8, 7]
    with one float16 scale per `group` values (|group|max / 7.5; the last group may be shorter)."""
    a_low, a_high = LQER_A_LEVELS
    b_low, b_high = LQER_B_LEVELS
    a_scale = float16_scale(A.abs().max().reshape(1).float() / 1.5)
    qa = torch.round(A.double() / a_scale.double()).clamp_(a_low, a_high).to(torch.int8)
    flat = B.double().reshape(-1)
    padded = torch.cat((flat, flat.new_zeros(-flat.numel() % group))).view(-1, group)
    b_scale = float16_scale(padded.abs().amax(dim=1).float() / 7.5)
    qb = torch.round(padded / b_scale.double()[:, None]).clamp_(b_low, b_high).reshape(-1)[:flat.numel()]
    return {"a": qa, "a_scale": a_scale, "b": qb.to(torch.int8).view(B.shape), "b_scale": b_scale, "group": group}


def lqer_correction(lqer: dict) -> Tensor:
    """The correction A B [rows, cols], float64, summed over the rank one outer product at a time (a fixed order: the
    same bits on every machine and thread count)."""
    A = lqer["a"].double() * lqer["a_scale"].double()
    r, cols = lqer["b"].shape
    step = lqer["b_scale"].double().repeat_interleave(lqer["group"])[:r * cols].view(r, cols)
    B = lqer["b"].double() * step
    out = torch.zeros(A.size(0), cols, dtype=torch.float64, device=A.device)
    for k in range(r):
        out += torch.outer(A[:, k], B[k])
    return out


def lqer_correction_reference(lqer: dict) -> list[list[float]]:
    """lqer_correction element by element, from the definition (slow; for the tests)."""
    qa, qb = lqer["a"].tolist(), lqer["b"].tolist()
    a_scale, b_scale, group = float(lqer["a_scale"][0]), lqer["b_scale"].tolist(), lqer["group"]
    r, cols = len(qb), len(qb[0])
    return [[sum(qa[i][k] * a_scale * (qb[k][j] * b_scale[(k * cols + j) // group]) for k in range(r))
             for j in range(cols)] for i in range(len(qa))]


def dequantize_q(entry: dict, dtype: torch.dtype) -> Tensor:
    """A "q" entry's matrix: q x scale (exact in float32), plus the LQER correction (in float64) when there is one."""
    if "lqer" not in entry:
        return dequantize_rows(entry["q"], entry["scale"], dtype)
    base = entry["q"].double() * entry["scale"].double()[:, None]
    return (base + lqer_correction(entry["lqer"])).to(dtype)


def lqer_factors(error: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-r approximation of the error, as U_r S_r [rows, r] and V_r^T [r, cols] (float64 SVD)."""
    U, S, Vh = torch.linalg.svd(error.double(), full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] * S[:r], Vh[:r]


def add_lqer(entries: dict, state_dict: dict, hessians: dict | None, top_k: int = LQER_TOP_K,
             rank: int = LQER_RANK) -> list[str]:
    """LQER: for the top_k quantized matrices with the largest ||W - Wq||_F (ties: state-dict order), a rank-r
    correction of the error, kept only if it lowers both the Frobenius error and, with a Hessian, the output error on
    the calibration inputs. Returns the names corrected."""
    errors = []
    for index, (name, entry) in enumerate(entries.items()):
        if entry["kind"] == "q":
            e = state_dict[name].double() - dequantize_q(entry, torch.float64)
            errors.append((-e.norm().item(), index, name, e))
    corrected = []
    for _, _, name, e in sorted(errors, key=lambda item: item[:2])[:top_k]:
        lqer = quantize_lqer(*lqer_factors(e, rank))
        residual = e - lqer_correction(lqer)
        better = residual.norm() < e.norm()
        hessian = (hessians or {}).get(name)
        if better and hessian is not None:
            H = hessian.double().to(e.device)
            better = ((residual @ H) * residual).sum() <= ((e @ H) * e).sum()
        if better:
            entries[name]["lqer"] = lqer
            corrected.append(name)
    return corrected


def to_float16(name: str, t: Tensor) -> Tensor:
    t = t.detach()
    if not torch.isfinite(t).all() or (t.numel() and t.abs().max() > FLOAT16_MAX):
        raise ValueError(f"tensor {name}: values beyond float16's range (or not finite)")
    return t.cpu().to(torch.float16).contiguous()


def frontier_plan(state_dict: dict[str, Tensor], options: CodecOptions,
                  small_numel: int = SMALL_TENSOR_NUMEL) -> dict[str, str]:
    plan = {}
    for name, t in state_dict.items():
        if not t.is_floating_point():
            plan[name] = "keep"
        elif t.ndim == 2 and "gate" in name:
            plan[name] = "int8"
        elif t.ndim == 2 and t.numel() > small_numel and min(t.shape) >= MIN_QUANTIZED_DIM:
            family = tensor_family(name)
            plan[name] = f"int{SDCLIP_BITS[family]}_sdclip" + ("_gptq" if options.gptq else "")
        else:
            plan[name] = "fp16"
    return plan


def frontier_entry(name: str, t: Tensor, how: str, hessian: Tensor | None) -> dict:
    if how == "keep":
        return {"kind": "keep", "data": t.detach().cpu().clone().contiguous()}
    if how == "fp16":
        return {"kind": "fp16", "dtype": dtype_name(t.dtype), "data": to_float16(name, t)}
    if how == "int8":
        q, scale = quantize_int8_rows(t.detach())
        return {"kind": "q", "dtype": dtype_name(t.dtype), "bits": 8, "q": q.cpu(), "scale": scale.cpu()}
    family = tensor_family(name)
    q, scale = quantize_sdclip(t.detach(), SDCLIP_SIGMAS[family], SDCLIP_BITS[family],
                               hessian if how.endswith("_gptq") else None)
    return {"kind": "q", "dtype": dtype_name(t.dtype), "bits": SDCLIP_BITS[family], "q": q.cpu(), "scale": scale.cpu()}


def needs_calibration(codec: str) -> bool:
    """Whether the codec needs GPTQ's Hessians (calibrate_artifact in train_gpt.py)."""
    return codec in CODECS and "gptq" in codec


def hessian_names(state_dict: dict[str, Tensor], codec: str, small_numel: int = SMALL_TENSOR_NUMEL) -> list[str]:
    """The state-dict names whose Hessians the codec needs (collect_hessians' names; the tied embedding's comes from
    the input of the tied head, TIED_HEAD_INPUTS)."""
    return [name for name, how in quantization_plan(state_dict, codec, small_numel=small_numel).items()
            if how.endswith("gptq")]


# ----------------------------------------------------------------------------------------------------------------------
# Grouped compression: every array of the entries goes into a group by role (one group per block matrix family across
# the layers, one for the embedding, scales, float16 tensors, LQER factors, kept tensors, row orders), each laid out
# as rows, columns (transposed) or reordered rows (the order stored), and each group through the smallest of the
# compressors installed; the layout and compressor of every group are recorded in the file.
#
# File: GROUPED_MAGIC, a little-endian uint32 n, n bytes of zlib-compressed JSON header
#     {"format": GROUPED_FORMAT, "codec": codec, "meta": meta_json,
#      "groups": [{"name", "compressor", "bytes", "raw_bytes", "sha256"}],            (of the raw group bytes)
#      "tensors": [[name, {fields without arrays, "arrays": {field: [group, offset, dtype, shape, layout]}}]]}
# then the groups' compressed streams one after another, and nothing else.

GROUPED_MAGIC = b"KAGRP\x00\x01\n"
COMPRESSOR_ORDER = ("lzma", "zlib", "bz2", "brotli", "zstd")  # ties go to the earlier
COMPRESSOR_PACKAGES = {"brotli": "brotli", "zstd": "zstandard"}
LAYOUTS = ("rows", "columns", "sorted_rows")
SORT_LIMIT = 2 ** 30  # reordering rows costs rows^2 x cols operations: only matrices up to this


def _optional_module(compressor: str):
    try:
        return importlib.import_module(COMPRESSOR_PACKAGES[compressor])
    except ImportError:
        return None


def available_compressors() -> tuple[str, ...]:
    """The compressors this machine can run: lzma, zlib and bz2 always (standard library), brotli and zstd when their
    PyPI packages (brotli, zstandard) are installed."""
    return tuple(c for c in COMPRESSOR_ORDER if c not in COMPRESSOR_PACKAGES or _optional_module(c) is not None)


def compress_with(compressor: str, raw: bytes) -> bytes:
    if compressor == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    if compressor == "zlib":
        return zlib.compress(raw, 9)
    if compressor == "bz2":
        return bz2.compress(raw, 9)
    module = _optional_module(compressor) if compressor in COMPRESSOR_PACKAGES else None
    if module is None:
        raise ValueError(f"compressor {compressor!r} is not available here (one of {', '.join(available_compressors())}"
                         + (f"; pip install {COMPRESSOR_PACKAGES[compressor]}" if compressor in COMPRESSOR_PACKAGES
                            else "") + ")")
    if compressor == "brotli":
        return module.compress(raw, quality=11, lgwin=24)
    return module.ZstdCompressor(level=22, write_checksum=True).compress(raw)


def decompress_with(compressor: str, data: bytes, size: int) -> bytes:
    """The group's raw bytes; ValueError (one line) if the compressor is unknown, not installed, or the data damaged."""
    if compressor not in COMPRESSOR_ORDER:
        raise ValueError(f"unknown compressor {compressor!r}")
    module = None
    if compressor in COMPRESSOR_PACKAGES:
        module = _optional_module(compressor)
        if module is None:
            raise ValueError(f"it was compressed with {compressor}, which is not installed here "
                             f"(pip install {COMPRESSOR_PACKAGES[compressor]})")
    try:
        if compressor == "lzma":
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        if compressor == "zlib":
            return zlib.decompress(data)
        if compressor == "bz2":
            return bz2.decompress(data)
        if compressor == "brotli":
            return module.decompress(data)
        return module.ZstdDecompressor().decompress(data, max_output_size=size)
    except Exception as e:  # each library has its own error class
        raise ValueError(f"its {compressor} stream does not decompress ({type(e).__name__})") from None


def similarity_order(q: np.ndarray) -> np.ndarray:
    """A greedy nearest-neighbour chain of the rows (L1 distance): start at row 0, then always the closest row not yet
    taken (the lowest index of equals). int32 [rows]."""
    rows = q.shape[0]
    x = q.astype(np.int32)
    taken = np.zeros(rows, dtype=bool)
    order = np.empty(rows, dtype=np.int32)
    current = 0
    for i in range(rows):
        order[i] = current
        taken[current] = True
        if i + 1 == rows:
            break
        distance = np.abs(x - x[current]).sum(axis=1)
        distance[taken] = np.iinfo(np.int64).max
        current = int(np.argmin(distance))
    return order


def similarity_order_reference(q: np.ndarray) -> list[int]:
    """similarity_order row by row in plain Python (slow; for the tests)."""
    rows = [list(map(int, r)) for r in q]
    order, left = [0], set(range(1, len(rows)))
    while left:
        last = rows[order[-1]]
        best = min(left, key=lambda j: (sum(abs(a - b) for a, b in zip(rows[j], last)), j))
        order.append(best)
        left.remove(best)
    return order


def array_group(name: str, field: str, entry: dict) -> str:
    """The group of one array of an entry, by role: the layers' copies of a matrix share a group."""
    role = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
    if entry["kind"] == "keep":
        return "keep"
    if entry["kind"] == "fp16":
        return "float16"
    if field == "q":
        return f"{role}.q"
    if field == "scale":
        return "scales"
    return "lqer"


def entry_arrays(entry: dict) -> dict[str, Tensor]:
    arrays = {k: v for k, v in entry.items() if isinstance(v, Tensor)}
    arrays.update({f"lqer.{k}": v for k, v in entry.get("lqer", {}).items() if isinstance(v, Tensor)})
    return arrays


def tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def layout_candidates(group: str, arrays: list[Tensor]) -> dict[str, tuple[bytes, list]]:
    """{layout: (the group's raw bytes, per array its row order or None)} of the layouts worth trying."""
    candidates = {"rows": (b"".join(tensor_bytes(a) for a in arrays), [None] * len(arrays))}
    if group.endswith(".q") and all(a.ndim == 2 for a in arrays):
        candidates["columns"] = (b"".join(tensor_bytes(a.T) for a in arrays), [None] * len(arrays))
        if all(a.size(0) ** 2 * a.size(1) <= SORT_LIMIT for a in arrays):
            orders = [similarity_order(a.numpy()) for a in arrays]
            candidates["sorted_rows"] = (b"".join(tensor_bytes(a[torch.from_numpy(o).long()])
                                                  for a, o in zip(arrays, orders)), orders)
    return candidates


def encode_grouped(codec: str, meta_json: str, entries: dict[str, dict],
                   compressors: Iterable[str] | None = None) -> bytes:
    compressors = tuple(compressors) if compressors is not None else available_compressors()
    if not compressors:
        raise ValueError("no compressor to choose from")
    for c in compressors:
        if c not in available_compressors():
            compress_with(c, b"")  # the one clear error
    members: dict[str, list[tuple[str, str, Tensor]]] = {}
    for name, entry in entries.items():
        for field, t in entry_arrays(entry).items():
            members.setdefault(array_group(name, field, entry), []).append((name, field, t))
    described = [[name, {k: v for k, v in entry.items() if not isinstance(v, (Tensor, dict))} | {"arrays": {}}]
                 for name, entry in entries.items()]
    by_name = {name: d for name, d in described}
    for name, entry in entries.items():
        if "lqer" in entry:
            by_name[name]["lqer_group"] = entry["lqer"]["group"]
    groups, streams = [], []
    orders_raw = []  # the row orders, a group of their own (int32)
    for group, items in members.items():
        arrays = [t for _, _, t in items]
        candidates = layout_candidates(group, arrays)
        # the layout by the size under a fast compressor, then every compressor on that layout
        layout = min(candidates, key=lambda k: (len(zlib.compress(candidates[k][0], 6)), LAYOUTS.index(k)))
        raw, orders = candidates[layout]
        offset = 0
        for (name, field, t), order in zip(items, orders):
            shape = list(t.shape)
            record = [group, offset, dtype_name(t.dtype), shape, layout]
            if order is not None:
                record.append(len(b"".join(orders_raw)))
                orders_raw.append(order.astype("<i4").tobytes())
            by_name[name]["arrays"][field] = record
            offset += t.numel() * t.element_size()
        groups.append((group, raw))
    if orders_raw:
        groups.append(("row_orders", b"".join(orders_raw)))
    for group, raw in groups:
        compressed = {c: compress_with(c, raw) for c in compressors}
        best = min(compressors, key=lambda c: (len(compressed[c]), COMPRESSOR_ORDER.index(c)))
        streams.append(({"name": group, "compressor": best, "bytes": len(compressed[best]), "raw_bytes": len(raw),
                         "sha256": hashlib.sha256(raw).hexdigest()}, compressed[best]))
    header = {"format": GROUPED_FORMAT, "codec": codec, "meta": meta_json,
              "groups": [m for m, _ in streams], "tensors": described}
    header_bytes = zlib.compress(json.dumps(header, sort_keys=True, allow_nan=False).encode(), 9)
    return GROUPED_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(d for _, d in streams)


def decode_grouped(data: bytes) -> tuple[str, str, dict[str, dict]]:
    """(codec, meta_json, entries) of encode_grouped's bytes; ValueError (one line) if damaged."""
    if len(data) < len(GROUPED_MAGIC) + 4:
        raise ValueError("damaged artifact: its grouped header is truncated")
    (size,) = struct.unpack_from("<I", data, len(GROUPED_MAGIC))
    start = len(GROUPED_MAGIC) + 4
    try:
        header = json.loads(zlib.decompress(data[start:start + size]))
    except (zlib.error, ValueError) as e:
        raise ValueError(f"damaged artifact: its grouped header does not read ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != GROUPED_FORMAT:
        raise ValueError(f"not an artifact of this format (expected {GROUPED_FORMAT!r})")
    try:
        offset, raws = start + size, {}
        expected = offset + sum(g["bytes"] for g in header["groups"])
        if len(data) != expected:
            raise ValueError(f"{len(data)} bytes where its header accounts for {expected} "
                             f"({'truncated' if len(data) < expected else 'bytes after the end'})")
        for g in header["groups"]:
            try:
                raw = decompress_with(g["compressor"], data[offset:offset + g["bytes"]], g["raw_bytes"])
            except ValueError as e:
                raise ValueError(f"group {g['name']}: {e}") from None
            if len(raw) != g["raw_bytes"] or hashlib.sha256(raw).hexdigest() != g["sha256"]:
                raise ValueError(f"group {g['name']}: its bytes do not match their sha256")
            raws[g["name"]] = raw
            offset += g["bytes"]
        entries = {}
        for name, described in header["tensors"]:
            entry = {k: v for k, v in described.items() if k not in ("arrays", "lqer_group")}
            lqer = {}
            for field, record in described["arrays"].items():
                group, start_byte, dtype, shape, layout = record[:5]
                torch_dtype = getattr(torch, dtype)
                count = math.prod(shape)
                itemsize = torch.empty((), dtype=torch_dtype).element_size()
                chunk = raws[group][start_byte:start_byte + count * itemsize]
                if len(chunk) != count * itemsize:
                    raise ValueError(f"tensor {name}: {field} runs past the end of group {group}")
                flat = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(torch_dtype) if count else \
                    torch.empty(0, dtype=torch_dtype)
                if layout == "columns":
                    t = flat.view(shape[::-1]).T.contiguous()
                elif layout == "sorted_rows":
                    order_bytes = raws["row_orders"][record[5]:record[5] + 4 * shape[0]]
                    order = torch.from_numpy(np.frombuffer(order_bytes, dtype="<i4").astype(np.int64))
                    if sorted(order.tolist()) != list(range(shape[0])):
                        raise ValueError(f"tensor {name}: its row order is not a permutation")
                    t = torch.empty(shape, dtype=torch_dtype)
                    t[order] = flat.view(shape)
                elif layout == "rows":
                    t = flat.view(shape)
                else:
                    raise ValueError(f"tensor {name}: unknown layout {layout!r}")
                if field.startswith("lqer."):
                    lqer[field.removeprefix("lqer.")] = t
                else:
                    entry[field] = t
            if lqer:
                entry["lqer"] = {**lqer, "group": described["lqer_group"]}
            entries[name] = entry
    except ValueError as e:
        raise ValueError(f"damaged artifact: {e}") from None
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as e:
        raise ValueError(f"damaged artifact: malformed grouped header ({type(e).__name__}: {e})") from None
    return header["codec"], header["meta"], entries


# ----------------------------------------------------------------------------------------------------------------------
# The artifact


def quantization_plan(state_dict: dict[str, Tensor], codec: str,
                      int8_names: Iterable[str] = INT8_IN_INT6_CODECS,
                      small_numel: int = SMALL_TENSOR_NUMEL) -> dict[str, str]:
    """How each tensor is stored. The first codecs: "keep" (exactly), "int8", "int6" (plain rounding) or "int6_gptq".
    The sdclip codecs: "keep" (non-float tensors), "fp16" (float tensors of at most small_numel values, and any float
    tensor that is not a matrix of at least MIN_QUANTIZED_DIM rows and columns), "int8" (gates: 2-D with "gate" in the
    name, per row as int8_zlib), "int7_sdclip" (the embedding), "int6_sdclip" (the other matrices), each with
    "_gptq" under a gptq codec."""
    options = codec_options(codec)
    if options.sdclip:
        return frontier_plan(state_dict, options, small_numel)
    int8_names = set(int8_names)
    plan = {}
    for name, t in state_dict.items():
        if not (t.is_floating_point() and t.ndim == 2 and min(t.shape) >= MIN_QUANTIZED_DIM):
            plan[name] = "keep"
        elif codec == "int8_zlib" or name in int8_names:
            plan[name] = "int8"
        else:
            plan[name] = "int6" if codec == "int6_lzma" else "int6_gptq"
    return plan


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_entry(t: Tensor, how: str, hessian: Tensor | None) -> dict:
    if how == "keep":  # a copy of its own: torch.save writes a view's whole storage
        return {"kind": "keep", "data": t.detach().cpu().clone().contiguous()}
    if how == "int8":
        q, scale = quantize_int8_rows(t.detach())
        return {"kind": "int8", "dtype": dtype_name(t.dtype), "q": q.cpu(), "scale": scale.cpu()}
    q, scale = quantize_int6_rows(t.detach()) if how == "int6" else quantize_int6_gptq(t.detach(), hessian)
    return {"kind": "int6", "dtype": dtype_name(t.dtype), "shape": list(t.shape),
            "packed": torch.from_numpy(pack_int6(q.cpu().numpy())), "scale": scale.cpu()}


def encode_artifact(state_dict: dict[str, Tensor], codec: str, meta: dict,
                    hessians: dict[str, Tensor] | None = None,
                    int8_names: Iterable[str] = INT8_IN_INT6_CODECS, small_numel: int = SMALL_TENSOR_NUMEL,
                    compressors: Iterable[str] | None = None) -> bytes:
    """The artifact's bytes (module docstring: format). meta: a small JSON-able dict (model config, run id, ...) that
    decode_artifact returns. hessians: for int6_gptq_lzma and the sdclip_gptq codecs, collect_hessians' output for
    every matrix of hessian_names(state_dict, codec). Quantization runs on the tensors' device (a GPU's is much faster
    for GPTQ); the same inputs on the same device give the same bytes. small_numel (sdclip codecs): float tensors of
    at most this many values are stored as float16. compressors (grouped codecs): those to choose from for each group
    (default: every one installed, available_compressors())."""
    if codec_options(codec).sdclip:
        return encode_frontier(state_dict, codec, meta, hessians, small_numel, compressors)
    plan = quantization_plan(state_dict, codec, int8_names)
    if codec == "int6_gptq_lzma":
        missing = [name for name, how in plan.items() if how == "int6_gptq" and name not in (hessians or {})]
        if missing:
            raise ValueError(f"int6_gptq_lzma needs a Hessian for every int6 matrix; missing: {', '.join(missing)}")
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"artifact meta must be JSON-able ({e})") from None
    tensors = {name: encode_entry(state_dict[name], how, (hessians or {}).get(name)) for name, how in plan.items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "codec": codec, "meta": meta_json, "tensors": tensors}, buffer)
    raw = buffer.getvalue()
    return zlib.compress(raw, ZLIB_LEVEL) if codec == "int8_zlib" else lzma.compress(raw, preset=LZMA_PRESET)


def meta_to_json(meta: dict) -> str:
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"artifact meta must be JSON-able ({e})") from None


def encode_frontier(state_dict: dict[str, Tensor], codec: str, meta: dict, hessians: dict[str, Tensor] | None,
                    small_numel: int, compressors: Iterable[str] | None) -> bytes:
    options = codec_options(codec)
    plan = quantization_plan(state_dict, codec, small_numel=small_numel)
    if options.gptq:
        missing = [name for name, how in plan.items() if how.endswith("_gptq") and name not in (hessians or {})]
        if missing:
            raise ValueError(f"{codec} needs a Hessian for every GPTQ matrix; missing: {', '.join(missing)}")
    meta_json = meta_to_json(meta)
    entries = {name: frontier_entry(name, state_dict[name], how, (hessians or {}).get(name))
               for name, how in plan.items()}
    if options.lqer:
        add_lqer(entries, {name: t.detach().cpu() for name, t in state_dict.items()},
                 {name: h.cpu() for name, h in (hessians or {}).items()} if options.gptq else None)
    if options.grouped:
        return encode_grouped(codec, meta_json, entries, compressors)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "codec": codec, "meta": meta_json, "tensors": entries}, buffer)
    return lzma.compress(buffer.getvalue(), preset=LZMA_PRESET)


def decompress(data: bytes) -> tuple[bytes, str]:
    """The payload and its stream kind ("zlib" or "xz"); the whole input must be exactly one complete stream."""
    if data.startswith(XZ_MAGIC):
        kind, decompressor, error = "xz", lzma.LZMADecompressor(lzma.FORMAT_XZ), lzma.LZMAError
    elif data.startswith(ZLIB_MAGIC):
        kind, decompressor, error = "zlib", zlib.decompressobj(), zlib.error
    else:
        raise ValueError(f"not an artifact: neither a zlib nor an xz stream (starts with {bytes(data[:6])!r})")
    try:
        raw = decompressor.decompress(data)
    except error as e:
        raise ValueError(f"damaged artifact: its {kind} stream does not decompress ({e})") from None
    if not decompressor.eof:
        raise ValueError(f"damaged artifact: its {kind} stream is truncated")
    if decompressor.unused_data:
        raise ValueError(f"damaged artifact: {len(decompressor.unused_data)} bytes after the end of its {kind} stream")
    return raw, kind


def decode_entry(name: str, entry: dict) -> Tensor:
    kind = entry["kind"]
    if kind == "keep":
        if not isinstance(entry["data"], Tensor):
            raise ValueError(f"tensor {name}: no data")
        return entry["data"]
    dtype = getattr(torch, entry["dtype"])
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"tensor {name}: dtype {entry['dtype']!r}")
    scale = entry.get("scale")
    if kind == "int8":
        q = entry["q"]
        if q.dtype != torch.int8 or q.ndim != 2 or scale.shape != (q.size(0),):
            raise ValueError(f"tensor {name}: int8 values {tuple(q.shape)} and scales {tuple(scale.shape)}")
        return dequantize_rows(q, scale, dtype)
    if kind == "int6":
        rows, cols = entry["shape"]
        packed = entry["packed"]
        if packed.dtype != torch.uint8 or packed.numel() != packed_int6_bytes(rows * cols) or scale.shape != (rows,):
            raise ValueError(f"tensor {name}: {packed.numel()} packed bytes and {tuple(scale.shape)} scales for "
                             f"shape {[rows, cols]}")
        q = torch.from_numpy(unpack_int6(packed.numpy(), rows * cols)).view(rows, cols)
        return dequantize_rows(q, scale, dtype)
    if kind == "fp16":
        data = entry["data"]
        if not isinstance(data, Tensor) or data.dtype != torch.float16:
            raise ValueError(f"tensor {name}: float16 data expected")
        return data.to(dtype)
    if kind == "q":
        q, bits = entry["q"], entry["bits"]
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"tensor {name}: {bits!r} bits")
        if q.dtype != torch.int8 or q.ndim != 2 or scale.dtype != torch.float16 or scale.shape != (q.size(0),):
            raise ValueError(f"tensor {name}: int{bits} values {tuple(q.shape)} and scales {tuple(scale.shape)}")
        if q.numel() and q.abs().max() > max_level(bits):
            raise ValueError(f"tensor {name}: values outside int{bits}'s range")
        if "lqer" in entry:
            check_lqer(name, entry["lqer"], q.shape)
        return dequantize_q(entry, dtype)
    raise ValueError(f"tensor {name}: unknown kind {kind!r}")


def check_lqer(name: str, lqer: dict, shape) -> None:
    a, b, group = lqer["a"], lqer["b"], lqer["group"]
    rows, cols = shape
    ok = (a.dtype == b.dtype == torch.int8 and a.ndim == b.ndim == 2 and a.size(0) == rows and b.size(1) == cols
          and a.size(1) == b.size(0) and isinstance(group, int) and group > 0
          and lqer["a_scale"].shape == (1,) and lqer["b_scale"].shape == (-(-b.numel() // group),)
          and (a.numel() == 0 or LQER_A_LEVELS[0] <= a.min() and a.max() <= LQER_A_LEVELS[1])
          and (b.numel() == 0 or LQER_B_LEVELS[0] <= b.min() and b.max() <= LQER_B_LEVELS[1]))
    if not ok:
        raise ValueError(f"tensor {name}: a malformed LQER correction")


def decode_artifact(data: bytes) -> tuple[dict[str, Tensor], dict]:
    """(state dict in the original names, shapes and dtypes, meta) of encode_artifact's bytes. Anything else, damaged
    or truncated: ValueError with one line saying what is wrong (the caller adds the file's name)."""
    if bytes(data[:len(GROUPED_MAGIC)]) == GROUPED_MAGIC:
        codec, meta_json, entries = decode_grouped(bytes(data))
        if codec not in CODECS or not codec_options(codec).grouped:
            raise ValueError(f"damaged artifact: codec {codec!r} in a grouped file")
        return decode_payload({"codec": codec, "meta": meta_json, "tensors": entries})
    raw, stream = decompress(data)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"damaged artifact: its payload is not a torch.save archive ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not an artifact of this format (expected {FORMAT!r})")
    codec = payload.get("codec")
    if codec not in CODECS or (stream == "zlib") != (codec == "int8_zlib") or codec_options(codec).grouped:
        raise ValueError(f"damaged artifact: codec {codec!r} in a {stream} stream")
    return decode_payload(payload)


def decode_payload(payload: dict) -> tuple[dict[str, Tensor], dict]:
    try:
        meta = json.loads(payload["meta"])
        state_dict = {name: decode_entry(name, entry) for name, entry in payload["tensors"].items()}
    except ValueError as e:
        raise ValueError(f"damaged artifact: {e}") from None
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"damaged artifact: malformed payload ({type(e).__name__}: {e})") from None
    return state_dict, meta


def read_artifact(path: str) -> tuple[dict[str, Tensor], dict]:
    """decode_artifact of a file; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_artifact(data)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None

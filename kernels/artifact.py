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

import io
import json
import lzma
import zlib
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

CODECS = ("int8_zlib", "int6_lzma", "int6_gptq_lzma")
FORMAT = "kernels.artifact/1"

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


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable, forward: Callable, names: Iterable[str]) -> dict[str, Tensor]:
    """H = sum of x x^T over every input row x of each named Linear layer (by its weight's state-dict name, e.g.
    "blocks.0.attn.c_q.weight"), float64 on the layer's device, while forward(model, batch) runs each batch (forward
    pre-hooks, so any nn.Linear subclass works). Feed it training batches, never validation ones. Sums, not means: GPTQ
    does not care about H's scale, and ranks' sums all-reduce into the whole calibration set's. A layer whose forward
    never ran (a fused op that reads .weight directly, e.g. kernels' relu2_linear for mlp.fc) is an error."""
    layers = {}
    for name in names:
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
    rows_seen = dict.fromkeys(layers, 0)

    def accumulator(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).double()
            hessians[name].addmm_(x.T, x)
            rows_seen[name] += x.size(0)
        return hook

    handles = [module.register_forward_pre_hook(accumulator(name)) for name, module in layers.items()]
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
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
# The artifact


def quantization_plan(state_dict: dict[str, Tensor], codec: str,
                      int8_names: Iterable[str] = INT8_IN_INT6_CODECS) -> dict[str, str]:
    """How each tensor is stored: "keep" (exactly), "int8", "int6" (plain rounding) or "int6_gptq"."""
    if codec not in CODECS:
        raise ValueError(f"unknown artifact codec {codec!r} (one of {', '.join(CODECS)})")
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
                    int8_names: Iterable[str] = INT8_IN_INT6_CODECS) -> bytes:
    """The artifact's bytes (module docstring: format). meta: a small JSON-able dict (model config, run id, ...) that
    decode_artifact returns. hessians: for int6_gptq_lzma, collect_hessians' output for every int6 matrix. Quantization
    runs on the tensors' device (a GPU's is much faster for GPTQ); the same inputs on the same device give the same
    bytes."""
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
    scale = entry["scale"]
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
    raise ValueError(f"tensor {name}: unknown kind {kind!r}")


def decode_artifact(data: bytes) -> tuple[dict[str, Tensor], dict]:
    """(state dict in the original names, shapes and dtypes, meta) of encode_artifact's bytes. Anything else, damaged
    or truncated: ValueError with one line saying what is wrong (the caller adds the file's name)."""
    raw, stream = decompress(data)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"damaged artifact: its payload is not a torch.save archive ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not an artifact of this format (expected {FORMAT!r})")
    codec = payload.get("codec")
    if codec not in CODECS or (stream == "zlib") != (codec == "int8_zlib"):
        raise ValueError(f"damaged artifact: codec {codec!r} in a {stream} stream")
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

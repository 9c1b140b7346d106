"""RMSNorm of every query/key head (over Dh, no weight) followed by the rotary embedding, in one pass.

Rotary convention ("half split", the one the model uses): with n = rms_norm(x), n1 = n[..., :Dh/2], n2 = n[..., Dh/2:],
    out = cat(n1 * cos + n2 * sin, -n1 * sin + n2 * cos)
cos/sin are [T, Dh/2], one row per packed token (positions restart at every document, so the caller gathers rows).

Backward saves only the inputs (q, k, cos, sin) and recomputes 1/rms and n from them in the same pass that applies
the inverse rotation to the incoming gradient and the RMSNorm backward. cos/sin receive no gradient.
"""

import torch

from kernels import _common
from kernels._common import tl, triton

TILE_ELEMENTS = 2048  # rows (token, head) per program * Dh/2


def reference(q, k, cos, sin, eps: float | None = None):
    def norm_and_rotate(x):
        layer_eps = torch.finfo(x.dtype).eps if eps is None else eps
        xf = x if x.dtype == torch.float64 else x.float()
        n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + layer_eps)
        n1, n2 = n.chunk(2, dim=-1)
        c = cos[:, None, :].to(n.dtype)
        s = sin[:, None, :].to(n.dtype)
        return torch.cat((n1 * c + n2 * s, -n1 * s + n2 * c), dim=-1).to(x.dtype)

    return norm_and_rotate(q), norm_and_rotate(k)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# A [T, H, Dh] tensor is seen as T*H rows of Dh; a program handles BLOCK_ROWS rows, each as two halves of Dh/2.


@triton.jit
def _rms_rotary_forward_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, n_heads, half_dim,
    stride_xt, stride_xh, stride_xd, stride_ct, stride_st, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    token = rows // n_heads
    head = rows % n_heads
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (rows[:, None] < n_rows) & (d < half_dim)

    x_first = x_ptr + (token * stride_xt + head * stride_xh)[:, None] + d * stride_xd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half_dim * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token[:, None] * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token[:, None] * stride_st + d, mask=mask, other=0.0).to(tl.float32)

    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half_dim) + eps)
    n1 = x1 * rstd[:, None]
    n2 = x2 * rstd[:, None]

    # output is contiguous [T, H, Dh]: row r starts at r * Dh
    out_first = out_ptr + rows[:, None] * (2 * half_dim) + d
    dtype = out_ptr.dtype.element_ty
    tl.store(out_first, (n1 * cos + n2 * sin).to(dtype), mask=mask)
    tl.store(out_first + half_dim, (n2 * cos - n1 * sin).to(dtype), mask=mask)


@triton.jit
def _rms_rotary_backward_kernel(
    x_ptr, cos_ptr, sin_ptr, grad_out_ptr, grad_x_ptr, n_rows, n_heads, half_dim,
    stride_xt, stride_xh, stride_xd, stride_ct, stride_st, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    token = rows // n_heads
    head = rows % n_heads
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (rows[:, None] < n_rows) & (d < half_dim)

    x_first = x_ptr + (token * stride_xt + head * stride_xh)[:, None] + d * stride_xd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half_dim * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token[:, None] * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token[:, None] * stride_st + d, mask=mask, other=0.0).to(tl.float32)
    # grad_out and grad_x are contiguous [T, H, Dh]
    contiguous_first = rows[:, None] * (2 * half_dim) + d
    g1 = tl.load(grad_out_ptr + contiguous_first, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(grad_out_ptr + contiguous_first + half_dim, mask=mask, other=0.0).to(tl.float32)

    # back through the rotation (its transpose): gradient wrt the normalised halves n1, n2
    gn1 = g1 * cos - g2 * sin
    gn2 = g1 * sin + g2 * cos
    # back through the RMSNorm: dx = rstd * gn - x * rstd^3 * sum(gn * x) / Dh
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half_dim) + eps)
    coef = rstd * rstd * rstd * (tl.sum(gn1 * x1, axis=1) + tl.sum(gn2 * x2, axis=1)) / (2 * half_dim)
    dx1 = rstd[:, None] * gn1 - x1 * coef[:, None]
    dx2 = rstd[:, None] * gn2 - x2 * coef[:, None]
    dtype = grad_x_ptr.dtype.element_ty
    tl.store(grad_x_ptr + contiguous_first, dx1.to(dtype), mask=mask)
    tl.store(grad_x_ptr + contiguous_first + half_dim, dx2.to(dtype), mask=mask)


def _launch_config(n_rows: int, half_dim: int):
    block_half = triton.next_power_of_2(half_dim)
    block_rows = max(1, min(TILE_ELEMENTS // block_half, triton.next_power_of_2(n_rows)))
    return (triton.cdiv(n_rows, block_rows),), dict(BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, num_warps=4)


def _strides(x, cos, sin):
    return (*x.stride(), cos.stride(0), sin.stride(0))


def _forward(x, cos, sin, eps):
    n_tokens, n_heads, head_dim = x.shape
    out = _common.empty_output((n_tokens, n_heads, head_dim), x.dtype, x.device)
    n_rows = n_tokens * n_heads
    if n_rows:
        grid, meta = _launch_config(n_rows, head_dim // 2)
        _rms_rotary_forward_kernel[grid](
            x, cos, sin, out, n_rows, n_heads, head_dim // 2, *_strides(x, cos, sin), eps, **meta
        )
    return out


def _backward(x, cos, sin, grad_out, eps):
    n_tokens, n_heads, head_dim = x.shape
    grad_out = grad_out.contiguous()
    grad_x = _common.empty_output((n_tokens, n_heads, head_dim), x.dtype, x.device)
    n_rows = n_tokens * n_heads
    if n_rows:
        grid, meta = _launch_config(n_rows, head_dim // 2)
        _rms_rotary_backward_kernel[grid](
            x, cos, sin, grad_out, grad_x, n_rows, n_heads, head_dim // 2, *_strides(x, cos, sin), eps, **meta
        )
    return grad_x


# --------------------------------------------------------------------------------------------------------------
# Registered ops (see _common.LIBRARY) and their autograd


@torch.library.custom_op(_common.op_name("rotary_qk_forward"), mutates_args=())
def rotary_qk_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps_q: float, eps_k: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (rope(rms_norm(q)), rope(rms_norm(k))) for q [T, Hq, Dh], k [T, Hk, Dh] of any strides."""
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return _forward(q, cos, sin, eps_q), _forward(k, cos, sin, eps_k)


@rotary_qk_forward.register_fake
def _(q, k, cos, sin, eps_q, eps_k):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op(_common.op_name("rotary_qk_backward"), mutates_args=())
def rotary_qk_backward(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, grad_out: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Gradient w.r.t. x (q or k) of rope(rms_norm(x)); contiguous, x's shape and dtype."""
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return _backward(x, cos, sin, grad_out, eps)


@rotary_qk_backward.register_fake
def _(x, cos, sin, grad_out, eps):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, eps_q, eps_k = inputs
    ctx.save_for_backward(q, k, cos, sin)
    ctx.eps = (eps_q, eps_k)


def _backward_rule(ctx, grad_q_out, grad_k_out):
    q, k, cos, sin = ctx.saved_tensors
    eps_q, eps_k = ctx.eps
    grad_q = rotary_qk_backward(q, cos, sin, grad_q_out, eps_q) if ctx.needs_input_grad[0] else None
    grad_k = rotary_qk_backward(k, cos, sin, grad_k_out, eps_k) if ctx.needs_input_grad[1] else None
    return grad_q, grad_k, None, None, None, None


rotary_qk_forward.register_autograd(_backward_rule, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public op


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float | None = None):
    """(rope(rms_norm(q)), rope(rms_norm(k))) for q [T, Hq, Dh], k [T, Hk, Dh], cos/sin [T, Dh/2].

    eps None = torch.finfo(dtype).eps, as F.rms_norm. Returns contiguous tensors of the shapes and dtypes of q, k.
    """
    head_dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"expected q [T, Hq, Dh], k [T, Hk, Dh] with even Dh, got {tuple(q.shape)}, {tuple(k.shape)}")
    if cos.shape != (q.shape[0], head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"expected cos/sin of shape {(q.shape[0], head_dim // 2)}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if not _common.use_triton(q):
        return reference(q, k, cos, sin, eps)
    eps_q = torch.finfo(q.dtype).eps if eps is None else eps
    eps_k = torch.finfo(k.dtype).eps if eps is None else eps
    return rotary_qk_forward(q, k, cos, sin, float(eps_q), float(eps_k))

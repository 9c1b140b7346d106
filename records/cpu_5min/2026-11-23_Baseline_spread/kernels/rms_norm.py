"""RMSNorm over the last dimension, without a learnable weight: y = x / sqrt(mean(x^2) + eps).

One program normalises a tile of BLOCK_ROWS rows. Rows up to MAX_BLOCK_COLS wide are held in registers whole
(one read of x, one write of y); wider rows are walked in blocks twice (sum of squares, then scale).
Backward saves only x and recomputes the per-row 1/rms from it (the row is read anyway), using
    dx = rstd * g - x * rstd^3 * sum(g * x) / D.
"""

import torch

from kernels import _common
from kernels._common import tl, triton

MAX_BLOCK_COLS = 8192  # widest row kept whole in registers; tests lower it to exercise the two-pass path
TILE_ELEMENTS = 4096  # BLOCK_ROWS * BLOCK_COLS per program, so narrow rows are batched several per program


def reference(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows[:, None] < n_rows
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    x_rows = x_ptr + rows[:, None] * x_row_stride
    y_rows = y_ptr + rows[:, None] * y_row_stride
    if SINGLE_PASS:
        mask = row_in & (cols < n_cols)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(y_rows + cols, (x * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_in & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_in & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_rows + start + cols, (x * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    x_ptr, grad_y_ptr, grad_x_ptr, n_rows, n_cols, x_row_stride, grad_y_row_stride, grad_x_row_stride, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows[:, None] < n_rows
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    x_rows = x_ptr + rows[:, None] * x_row_stride
    grad_y_rows = grad_y_ptr + rows[:, None] * grad_y_row_stride
    grad_x_rows = grad_x_ptr + rows[:, None] * grad_x_row_stride
    if SINGLE_PASS:
        mask = row_in & (cols < n_cols)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_y_rows + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        coef = rstd * rstd * rstd * tl.sum(g * x, axis=1) / n_cols
        grad_x = rstd[:, None] * g - x * coef[:, None]
        tl.store(grad_x_rows + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        sum_gx = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_in & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_y_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
            sum_gx += tl.sum(g * x, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        coef = rstd * rstd * rstd * sum_gx / n_cols
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_in & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_y_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad_x = rstd[:, None] * g - x * coef[:, None]
            tl.store(grad_x_rows + start + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_rows: int, n_cols: int):
    block_cols = min(triton.next_power_of_2(n_cols), MAX_BLOCK_COLS)
    block_rows = max(1, min(TILE_ELEMENTS // block_cols, triton.next_power_of_2(n_rows)))
    num_warps = 4 if block_rows * block_cols <= 4096 else 8
    grid = (triton.cdiv(n_rows, block_rows),)
    meta = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, SINGLE_PASS=n_cols <= block_cols, num_warps=num_warps)
    return grid, meta


def _forward(x2d, eps):
    n_rows, n_cols = x2d.shape
    y = _common.empty_output((n_rows, n_cols), x2d.dtype, x2d.device)
    if n_rows:
        grid, meta = _launch_config(n_rows, n_cols)
        _rms_norm_forward_kernel[grid](x2d, y, n_rows, n_cols, x2d.stride(0), y.stride(0), eps, **meta)
    return y


def _backward(x2d, grad_y, eps):
    n_rows, n_cols = x2d.shape
    grad_x = _common.empty_output((n_rows, n_cols), x2d.dtype, x2d.device)
    if n_rows:
        grid, meta = _launch_config(n_rows, n_cols)
        _rms_norm_backward_kernel[grid](
            x2d, grad_y, grad_x, n_rows, n_cols, x2d.stride(0), grad_y.stride(0), grad_x.stride(0), eps, **meta
        )
    return grad_x


# --------------------------------------------------------------------------------------------------------------
# Registered ops (see _common.LIBRARY) and their autograd


@torch.library.custom_op(_common.op_name("rms_norm_forward"), mutates_args=())
def rms_norm_forward(x2d: torch.Tensor, eps: float) -> torch.Tensor:
    """y [N, D] (contiguous, x's dtype) for x2d [N, D] with unit column stride."""
    return _forward(x2d, eps)


@rms_norm_forward.register_fake
def _(x2d, eps):
    return x2d.new_empty(x2d.shape)


@torch.library.custom_op(_common.op_name("rms_norm_backward"), mutates_args=())
def rms_norm_backward(x2d: torch.Tensor, grad_y: torch.Tensor, eps: float) -> torch.Tensor:
    if grad_y.stride(-1) != 1:
        grad_y = grad_y.contiguous()
    return _backward(x2d, grad_y, eps)


@rms_norm_backward.register_fake
def _(x2d, grad_y, eps):
    return x2d.new_empty(x2d.shape)


def _setup_context(ctx, inputs, output):
    x2d, eps = inputs
    ctx.save_for_backward(x2d)
    ctx.eps = eps


def _backward_rule(ctx, grad_y):
    (x2d,) = ctx.saved_tensors
    return rms_norm_backward(x2d, grad_y, ctx.eps), None


rms_norm_forward.register_autograd(_backward_rule, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public op


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (any shape, any width); eps None = torch.finfo(x.dtype).eps as F.rms_norm."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if not _common.use_triton(x):
        return reference(x, eps)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return rms_norm_forward(x2d, float(eps)).view(x.shape)

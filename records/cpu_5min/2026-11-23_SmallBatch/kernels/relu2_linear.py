"""relu(x @ w.T) ** 2: the MLP up-projection with its squared-ReLU activation in the matmul epilogue.

The pre-activation is NOT stored. Backward needs 2 * relu(pre), and relu(pre) = sqrt(out) where out = relu(pre)^2 is
the op's output, which autograd keeps anyway because it is the input of the next matmul (the down-projection).
So the derivative costs no extra memory and no extra write of [N, H]. It is also no less precise than storing pre in
the same dtype: sqrt halves the relative rounding error of out. (Values of |pre| below ~1e-19 square to 0 and get a
zero derivative instead of ~1e-19, which does not matter.)
"""

import torch

from kernels import _common
from kernels._common import tl, triton

# Tile sizes used under the interpreter (CPU); on CUDA the autotuner picks among _CUDA_CONFIGS.
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w.T).square()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _relu2_matmul_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # out[M, N] = relu(x[M, K] @ w[N, K]^T) ** 2, one BLOCK_M x BLOCK_N tile per program.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M consecutive row-tiles sweep the columns together, so their x rows stay in L2.
    tiles_per_group = GROUP_M * tiles_n
    first_tile_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows

    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N], a tile of w^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_in = k_start + ks < K
        x_tile = tl.load(x_ptrs, mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_in[:, None] & (cols[None, :] < N), other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = tl.maximum(acc, 0.0)
    out = (acc * acc).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _relu2_grad_kernel(grad_out_ptr, out_ptr, grad_pre_ptr, n_elements, BLOCK: tl.constexpr):
    # grad_pre = grad_out * d(relu(pre)^2)/d pre = grad_out * 2 * relu(pre) = grad_out * 2 * sqrt(out)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n_elements
    grad_out = tl.load(grad_out_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    grad_pre = 2.0 * grad_out * tl.sqrt(out)
    tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=in_range)


_CUDA_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
]


# Built once, at import: one autotuner, so its cache of best configs lives as long as the process. The key is the
# feature sizes only (Triton adds the dtypes of the tensor arguments itself). Not the row count M: it changes with
# every varlen evaluation batch, and each new M would re-run the timing of all configs in the middle of a run.
AUTOTUNE_KEY = ["N", "K"]
relu2_matmul_autotuned = triton.autotune(configs=_CUDA_CONFIGS, key=AUTOTUNE_KEY)(_relu2_matmul_kernel)


def _forward(x, w, out=None):
    """Launch out[M, N] = relu(x @ w.T) ** 2."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = _common.empty_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    args = (x, w, out, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    precision = _common.dot_precision(x.dtype)
    if _common.KERNELS_INTERPRETED:
        blocks = INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"]),)
        _relu2_matmul_kernel[grid](*args, **blocks, DOT_PRECISION=precision)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        relu2_matmul_autotuned[grid](*args, DOT_PRECISION=precision)
    return out


def _grad_pre(grad_out, out):
    grad_out = grad_out.contiguous()
    grad_pre = _common.empty_output(out.shape, out.dtype, out.device)
    n_elements = out.numel()
    if n_elements:
        block = 1024
        _relu2_grad_kernel[(triton.cdiv(n_elements, block),)](grad_out, out, grad_pre, n_elements, BLOCK=block)
    return grad_pre


# --------------------------------------------------------------------------------------------------------------
# Registered ops (see _common.LIBRARY) and their autograd


@torch.library.custom_op(_common.op_name("relu2_linear_forward"), mutates_args=())
def relu2_linear_forward(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x2d @ w.T) ** 2, [M, N] contiguous in x's dtype, for x2d [M, K], w [N, K]."""
    return _forward(x2d, w)


@relu2_linear_forward.register_fake
def _(x2d, w):
    return x2d.new_empty((x2d.shape[0], w.shape[0]))


@torch.library.custom_op(_common.op_name("relu2_grad_pre"), mutates_args=())
def relu2_grad_pre(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad_out * 2 * sqrt(out): the gradient w.r.t. the pre-activation, from the op's output."""
    return _grad_pre(grad_out, out)


@relu2_grad_pre.register_fake
def _(grad_out, out):
    return out.new_empty(out.shape)


def _setup_context(ctx, inputs, output):
    x2d, w = inputs
    ctx.save_for_backward(x2d, w, output)


def _backward_rule(ctx, grad_out):
    x2d, w, out = ctx.saved_tensors
    grad_pre = relu2_grad_pre(grad_out, out)
    grad_x = grad_pre @ w if ctx.needs_input_grad[0] else None
    grad_w = grad_pre.T @ x2d if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


relu2_linear_forward.register_autograd(_backward_rule, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public op


def relu2_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x @ w.T) ** 2 for x [N, D], w [H, D] -> [N, H] in x's dtype. Leading dims of x beyond N are allowed."""
    if not _common.use_triton(x):
        return reference(x, w)
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must have the same dtype, got {x.dtype} and {w.dtype}")
    out = relu2_linear_forward(x.reshape(-1, x.shape[-1]), w)
    return out.view(*x.shape[:-1], w.shape[0])

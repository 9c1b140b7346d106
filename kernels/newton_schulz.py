"""Newton-Schulz orthogonalisation (the quintic iteration of Muon) on a symmetric-product Triton kernel.

    X = G / (||G||_F + eps); transpose if rows > cols (so X X^T is the smaller Gram matrix)
    repeat: A = X X^T;  B = b A + c A A;  X = a X + B X;   (a, b, c) = (3.4445, -4.7750, 2.0315)

or, Polar Express (Amsel et al. 2025), the same step with coefficients tuned for each iteration (POLAR_EXPRESS):
iteration i uses coefficients[i], the last tuple again past the end of the list.

X X^T is symmetric, so the kernel computes only the tiles on and below the diagonal and writes each off-diagonal tile
twice (as itself and mirrored). A is symmetric too, so A A = A A^T and b A + c A A is the same kernel with A as input
and "b * A" added in its epilogue. Work dtype: bf16 on CUDA (as Muon), fp32 otherwise (fp64 for fp64 input, which
the tests use as the reference). No autograd: it runs on gradients.
"""

import torch

from kernels import _common
from kernels._common import tl, triton

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
NS_SCHEDULES = {"quintic": (NS_COEFFICIENTS,), "polar_express": POLAR_EXPRESS}  # MUON_NS


def coefficients_at(schedule: tuple, step: int) -> tuple[float, float, float]:
    """(a, b, c) of iteration `step` (from 0) of a schedule of per-iteration tuples; past its end, the last tuple."""
    return schedule[min(step, len(schedule) - 1)]
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_K=16)


def _work_dtype(G: torch.Tensor) -> torch.dtype:
    if G.is_cuda:
        return torch.bfloat16
    return torch.float64 if G.dtype == torch.float64 else torch.float32


def reference(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, schedule: tuple = (NS_COEFFICIENTS,)) -> torch.Tensor:
    X = G.to(_work_dtype(G))
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for step in range(steps):
        a, b, c = coefficients_at(schedule, step)
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _sym_matmul_kernel(
    x_ptr, add_ptr, out_ptr, M, K,
    stride_xm, stride_xk, stride_am, stride_an, stride_om, stride_on, alpha, beta,
    HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # out[M, M] = alpha * x @ x^T (+ beta * add, where add must be symmetric). Program (i, j) computes tile (i, j)
    # for j <= i only; programs above the diagonal do nothing.
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    if tile_j <= tile_i:
        rows_i = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = tile_j * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        xi_ptrs = x_ptr + rows_i[:, None] * stride_xm + ks[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
        xj_t_ptrs = x_ptr + rows_j[None, :] * stride_xm + ks[:, None] * stride_xk  # [BLOCK_K, BLOCK_M], x_j^T

        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_in = k_start + ks < K
            xi = tl.load(xi_ptrs, mask=(rows_i[:, None] < M) & k_in[None, :], other=0.0)
            xj_t = tl.load(xj_t_ptrs, mask=k_in[:, None] & (rows_j[None, :] < M), other=0.0)
            acc = tl.dot(xi, xj_t, acc, input_precision=DOT_PRECISION)
            xi_ptrs += BLOCK_K * stride_xk
            xj_t_ptrs += BLOCK_K * stride_xk

        mask = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        result = alpha * acc
        if HAS_ADD:
            add = tl.load(add_ptr + rows_i[:, None] * stride_am + rows_j[None, :] * stride_an, mask=mask, other=0.0)
            result += beta * add.to(tl.float32)
        result = result.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on, result, mask=mask)
        if tile_j < tile_i:
            # the mirrored tile (j, i): element (row_i, row_j) of this tile goes to (row_j, row_i)
            tl.store(out_ptr + rows_j[None, :] * stride_om + rows_i[:, None] * stride_on, result, mask=mask)


_CUDA_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=warps, num_stages=stages)
    for bm, bk, warps, stages in [
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
    ]
]


# Built once, at import. M and K are the shapes of the parameter matrices, fixed for a run.
sym_matmul_autotuned = triton.autotune(configs=_CUDA_CONFIGS, key=["M", "K", "HAS_ADD"])(_sym_matmul_kernel)


@torch.library.custom_op(_common.op_name("sym_matmul"), mutates_args=())
def sym_matmul(x: torch.Tensor, alpha: float = 1.0, add: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """alpha * x @ x.T (+ beta * add, add symmetric [M, M]) with the Triton kernel; x [M, K] -> [M, M] contiguous.
    A registered op (see _common.LIBRARY), so a compiled optimizer step traces it; no autograd (it runs on gradients).
    """
    M, K = x.shape
    out = _common.empty_output((M, M), x.dtype, x.device)
    if M == 0:
        return out
    has_add = add is not None
    add_arg = add if has_add else out  # never read when HAS_ADD is False
    args = (x, add_arg, out, M, K, *x.stride(), *add_arg.stride(), *out.stride(), float(alpha), float(beta))
    precision = _common.dot_precision(x.dtype)
    if _common.KERNELS_INTERPRETED:
        block_m = INTERPRETER_BLOCKS["BLOCK_M"]
        grid = (triton.cdiv(M, block_m), triton.cdiv(M, block_m))
        _sym_matmul_kernel[grid](*args, HAS_ADD=has_add, **INTERPRETER_BLOCKS, DOT_PRECISION=precision)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        sym_matmul_autotuned[grid](*args, HAS_ADD=has_add, DOT_PRECISION=precision)
    return out


@sym_matmul.register_fake
def _(x, alpha=1.0, add=None, beta=0.0):
    return x.new_empty((x.shape[0], x.shape[0]))


# --------------------------------------------------------------------------------------------------------------
# Public op


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  schedule: tuple = (NS_COEFFICIENTS,)) -> torch.Tensor:
    """Approximately orthogonalise the matrix G (the update direction of Muon); returns G's shape and dtype.
    schedule: the (a, b, c) of each iteration (NS_SCHEDULES)."""
    if G.dim() != 2:
        raise ValueError(f"newton_schulz expects a matrix, got shape {tuple(G.shape)}")
    if not _common.use_triton(G):
        return reference(G, steps, eps, schedule)
    X = G.to(_work_dtype(G))
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for step in range(steps):
        a, b, c = coefficients_at(schedule, step)
        A = sym_matmul(X)  # X X^T
        B = sym_matmul(A, alpha=c, add=A, beta=b)  # b A + c A A^T, and A A^T = A A since A is symmetric
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    if transposed:
        X = X.T
    return X.to(G.dtype)

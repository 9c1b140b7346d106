"""Cross-entropy on soft-capped logits, per token, and its chunked fusion with the (tied) output projection.

    z    = softcap * tanh(logits / softcap)        (softcap <= 0: z = logits)
    loss = logsumexp(z) - z[target]                (0 where target == -100)

The Triton kernels read each row of logits in blocks of columns with an online logsumexp, so no fp32 copy of the
logits is ever made. Backward saves only logits, targets and the per-row logsumexp (one fp32 per token), recomputes
z and softmax(z) from them, and writes grad_logits in the dtype of the logits.

`linear_softcap_cross_entropy` goes one step further and never holds the [N, V] logits at all: it walks the tokens
in chunks, computing each chunk's logits with a matmul, the loss with the kernels above, and is done with them.
"""

import torch
import torch.nn.functional as F

from kernels import _common
from kernels._common import tl, triton

IGNORE_INDEX = -100
# Columns per block of the row loop. 4096 fp32 values fit in registers comfortably; vocabularies up to that size are
# handled in a single block. Tests lower it to exercise the multi-block path.
MAX_BLOCK_V = 4096
DEFAULT_CHUNK_SIZE = 8192


# --------------------------------------------------------------------------------------------------------------
# Reference (plain torch)


def reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-token loss [N] in fp32 (fp64 for fp64 logits)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")


def linear_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """The unfused computation: full logits, then the loss."""
    return reference(x @ weight.T, targets, softcap)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only, so no overflow for any x. (libdevice tanh does not run in the interpreter.)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _ce_forward_kernel(
    logits_ptr, logits_row_stride, targets_ptr, loss_ptr, lse_ptr, n_cols, softcap,
    IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_V)

    # Online logsumexp: running max m and running sum s of exp(z - m) over the blocks seen so far.
    m = -float("inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        in_row = start + cols < n_cols
        x = tl.load(row_logits_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        z = tl.where(in_row, x, -float("inf"))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
    lse = m + tl.log(s)

    target = tl.load(targets_ptr + row)
    ignored = target == IGNORE
    x_target = tl.load(row_logits_ptr + tl.where(ignored, 0, target)).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_target))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_backward_kernel(
    logits_ptr, logits_row_stride, targets_ptr, lse_ptr, grad_loss_ptr, grad_loss_stride,
    grad_logits_ptr, grad_logits_row_stride, n_cols, softcap,
    IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # grad_logits may alias logits (the chunked linear op does this): each block is read before it is written.
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    row_grad_ptr = grad_logits_ptr + row * grad_logits_row_stride
    cols = tl.arange(0, BLOCK_V)

    target = tl.load(targets_ptr + row)
    ignored = target == IGNORE
    grad_loss = tl.load(grad_loss_ptr + row * grad_loss_stride).to(tl.float32)
    grad_loss = tl.where(ignored, 0.0, grad_loss)
    lse = tl.load(lse_ptr + row)

    for start in range(0, n_cols, BLOCK_V):
        offsets = start + cols
        in_row = offsets < n_cols
        x = tl.load(row_logits_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            z = softcap * t
            dz_dx = 1.0 - t * t
        else:
            z = x
            dz_dx = 1.0
        # d loss / d z = softmax(z) - onehot(target)
        grad_z = tl.exp(z - lse) - tl.where(offsets == target, 1.0, 0.0)
        grad_x = grad_loss * grad_z * dz_dx
        tl.store(row_grad_ptr + offsets, grad_x.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _launch_config(n_cols: int):
    block_v = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    num_warps = 4 if block_v <= 1024 else 8
    return block_v, num_warps


def _forward(logits, targets, softcap, loss=None, lse=None):
    """Launch the forward kernel. Returns (loss [N] fp32, lse [N] fp32); loss/lse may be preallocated outputs."""
    n_rows, n_cols = logits.shape
    if loss is None:
        loss = _common.empty_output((n_rows,), torch.float32, logits.device)
    if lse is None:
        lse = _common.empty_output((n_rows,), torch.float32, logits.device)
    if n_rows == 0:
        return loss, lse
    block_v, num_warps = _launch_config(n_cols)
    _ce_forward_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, lse, n_cols, float(softcap),
        IGNORE=IGNORE_INDEX, HAS_SOFTCAP=softcap > 0, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss, lse


def _backward(logits, targets, lse, grad_loss, softcap, grad_logits=None):
    """Launch the backward kernel. grad_logits may be preallocated, and may be `logits` itself (in place)."""
    n_rows, n_cols = logits.shape
    if grad_logits is None:
        grad_logits = _common.empty_output((n_rows, n_cols), logits.dtype, logits.device)
    if n_rows == 0:
        return grad_logits
    block_v, num_warps = _launch_config(n_cols)
    _ce_backward_kernel[(n_rows,)](
        logits, logits.stride(0), targets, lse, grad_loss, grad_loss.stride(0),
        grad_logits, grad_logits.stride(0), n_cols, float(softcap),
        IGNORE=IGNORE_INDEX, HAS_SOFTCAP=softcap > 0, BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad_logits


# --------------------------------------------------------------------------------------------------------------
# Autograd


class SoftcapCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, softcap):
        loss, lse = _forward(logits, targets, softcap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.softcap = softcap
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = _backward(logits, targets, lse, grad_loss, ctx.softcap)
        return grad_logits, None, None


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def _add_matmul_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator (fp32) += a @ b. 16-bit chunk products are rounded once each, then summed in fp32, so the
    weight gradient does not lose precision chunk after chunk."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
    else:
        accumulator += (a @ b).float()


class LinearSoftcapCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses of softcap-CE(x @ weight.T) without the [N, V] logits: only [chunk, V] at a time.

    Forward keeps per token only the logsumexp. Backward recomputes each chunk's logits (one extra matmul), turns
    them into grad_logits in place with the real per-token grad_output, then takes grad_x and grad_weight from it.
    Computing the gradients already in forward and scaling them in backward (as fused-CE libraries do for a scalar
    loss) would be wrong here: this op returns per-token losses, and grad_weight = sum_n g_n * dlogits_n^T x_n cannot
    be rescaled afterwards unless every g_n is the same, which is not known before backward.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_size):
        n_tokens = x.shape[0]
        loss = _common.empty_output((n_tokens,), torch.float32, x.device)
        lse = _common.empty_output((n_tokens,), torch.float32, x.device)
        for rows in _chunks(n_tokens, chunk_size):
            logits = x[rows] @ weight.T
            _forward(logits, targets[rows], softcap, loss=loss[rows], lse=lse[rows])
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.softcap = softcap
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse = ctx.saved_tensors
        want_grad_x, want_grad_weight = ctx.needs_input_grad[:2]
        grad_x = _common.empty_output(x.shape, x.dtype, x.device) if want_grad_x else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_weight else None
        for rows in _chunks(x.shape[0], ctx.chunk_size):
            logits = x[rows] @ weight.T
            grad_logits = _backward(logits, targets[rows], lse[rows], grad_loss[rows], ctx.softcap, grad_logits=logits)
            if want_grad_x:
                torch.mm(grad_logits, weight, out=grad_x[rows])
            if want_grad_weight:
                _add_matmul_fp32(grad_weight, grad_logits.T, x[rows])
        if want_grad_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Public ops


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-token loss [N] (fp32) of logits [N, V] (bf16/fp32) against targets [N] (int64, -100 = ignore)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if not _common.use_triton(logits):
        return reference(logits, targets, softcap)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return SoftcapCrossEntropyFunction.apply(logits, targets.contiguous(), float(softcap))


def linear_softcap_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token loss [N] (fp32) of softcap-CE(x @ weight.T, targets) for x [N, D], weight [V, D], without ever
    holding the [N, V] logits (at most [chunk_size, V])."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"expected x [N, D], weight [V, D], targets [N], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    if not _common.use_triton(x):
        return linear_reference(x, weight, targets, softcap)
    return LinearSoftcapCrossEntropyFunction.apply(x, weight, targets.contiguous(), float(softcap), int(chunk_size))

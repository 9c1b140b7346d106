"""Cross-entropy on soft-capped logits, per token, and its chunked fusion with the (tied) output projection.

    z    = softcap * tanh(logits / softcap)        (softcap <= 0: z = logits)
    loss = logsumexp(z) - z[target]                (0 where target == -100)

The Triton kernels read each row of logits in blocks of columns with an online logsumexp, so no fp32 copy of the
logits is ever made. Backward saves only logits, targets and the per-row logsumexp (one fp32 per token), recomputes
z and softmax(z) from them, and writes grad_logits in the dtype of the logits.

`linear_softcap_cross_entropy` goes one step further and never holds the [N, V] logits at all: it walks the tokens
in chunks, computing each chunk's logits with a matmul, the loss with the kernels above, and is done with them.
Its matmuls run in the activations' dtype but accumulate and keep their results in fp32: each chunk's logits, and the
weight gradient summed over the chunks, are never rounded to 16 bits. It takes the fp32 (tied embedding) weight itself
and returns an fp32 gradient to it.
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
    """The unfused computation, as the model's plain path does it: full logits in x's dtype (the weight cast to it, so
    an fp32 weight gets an fp32 gradient through the cast), then the loss."""
    return reference(x @ weight.to(x.dtype).T, targets, softcap)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only, so no overflow for any x. (libdevice tanh does not run in the interpreter.)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _tanh_derivative(x):
    # 1 - tanh(x)^2 as 4e / (1 + e)^2, e = exp(-2|x|): 1 - t*t cancels where |t| is near 1 (a large logit under the cap)
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


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
            z = softcap * _tanh(x / softcap)
            dz_dx = _tanh_derivative(x / softcap)
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
# Registered ops (see _common.LIBRARY) and their autograd: softcap_cross_entropy


@torch.library.custom_op(_common.op_name("softcap_ce_forward"), mutates_args=())
def softcap_ce_forward(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, logsumexp [N] fp32) for logits [N, V] with unit column stride."""
    return _forward(logits, targets, softcap)


@softcap_ce_forward.register_fake
def _(logits, targets, softcap):
    n_rows = logits.shape[0]
    return logits.new_empty((n_rows,), dtype=torch.float32), logits.new_empty((n_rows,), dtype=torch.float32)


@torch.library.custom_op(_common.op_name("softcap_ce_backward"), mutates_args=())
def softcap_ce_backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, softcap: float,
) -> torch.Tensor:
    """grad_logits [N, V], contiguous, in the logits' dtype."""
    return _backward(logits, targets, lse, grad_loss, softcap)


@softcap_ce_backward.register_fake
def _(logits, targets, lse, grad_loss, softcap):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, targets, softcap = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, lse)
    ctx.softcap = softcap


def _ce_backward_rule(ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return softcap_ce_backward(logits, targets, lse, grad_loss, ctx.softcap), None, None


softcap_ce_forward.register_autograd(_ce_backward_rule, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Registered ops and autograd: linear_softcap_cross_entropy
#
# Per-token losses of softcap-CE(x @ weight.T) without the [N, V] logits: only [chunk, V] at a time.
# Forward keeps per token only the logsumexp. Backward recomputes each chunk's logits (one extra matmul), turns them
# into grad_logits in place with the real per-token grad_output, then takes grad_x and grad_weight from it.
# Computing the gradients already in forward and scaling them in backward (as fused-CE libraries do for a scalar
# loss) would be wrong here: this op returns per-token losses, and grad_weight = sum_n g_n * dlogits_n^T x_n cannot
# be rescaled afterwards unless every g_n is the same, which is not known before backward.

# torch.mm(a, b, out_dtype=torch.float32) for 16-bit a, b exists on CUDA since torch 2.8 (not on CPUs).
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 16-bit a, b as an fp32 result that was never rounded to 16 bits (fp32/fp64 inputs: plain a @ b).
    On CUDA one GEMM with fp32 output; elsewhere fp32 copies (16-bit values are exact in fp32, so the result is the
    same up to summation order)."""
    if a.dtype not in (torch.bfloat16, torch.float16):
        return a @ b
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@torch.library.custom_op(_common.op_name("linear_softcap_ce_forward"), mutates_args=())
def linear_softcap_ce_forward(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, logsumexp [N] fp32) of softcap-CE(x @ weight.T); weight is cast to x's dtype for the matmul,
    whose fp32 result is what the loss kernel reads."""
    n_tokens = x.shape[0]
    loss = _common.empty_output((n_tokens,), torch.float32, x.device)
    lse = _common.empty_output((n_tokens,), torch.float32, x.device)
    with torch.autocast(x.device.type, enabled=False):  # the op sets its matmuls' precision itself
        w = weight.to(x.dtype)
        for rows in _chunks(n_tokens, chunk_size):
            logits = matmul_fp32(x[rows], w.T)
            _forward(logits, targets[rows], softcap, loss=loss[rows], lse=lse[rows])
    return loss, lse


@linear_softcap_ce_forward.register_fake
def _(x, weight, targets, softcap, chunk_size):
    n_tokens = x.shape[0]
    return x.new_empty((n_tokens,), dtype=torch.float32), x.new_empty((n_tokens,), dtype=torch.float32)


def weight_grad_fp32(grad_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_logits.T @ x in fp32 for fp32 grad_logits [n, V] and x [n, D] in its own dtype, fp32-accurate also for
    16-bit x. Rounding grad_logits to bf16 for a bf16 matmul would cost each term up to 2^-8 relative and the sum
    about 2e-3 of its largest entry (as much as rounding the result to bf16), so grad_logits is split into a high and
    a low 16-bit part that together hold it to ~2^-16, and multiplied twice: one more 16-bit matmul of the same size
    instead of a much slower fp32 one."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return grad_logits.T @ x
    high = grad_logits.to(x.dtype)
    low = (grad_logits - high.float()).to(x.dtype)
    return matmul_fp32(high.T, x) + matmul_fp32(low.T, x)


@torch.library.custom_op(_common.op_name("linear_softcap_ce_backward"), mutates_args=())
def linear_softcap_ce_backward(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
    softcap: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x in x's dtype, grad_weight in weight's dtype). grad_weight is summed over the chunks in fp32 from
    fp32-accurate chunk products; an fp32 weight gets that sum as it is, a 16-bit weight gets it rounded once."""
    grad_x = _common.empty_output(x.shape, x.dtype, x.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        w = weight.to(x.dtype)
        for rows in _chunks(x.shape[0], chunk_size):
            logits = matmul_fp32(x[rows], w.T)
            grad_logits = _backward(logits, targets[rows], lse[rows], grad_loss[rows], softcap, grad_logits=logits)
            # grad_x is returned in x's dtype, which rounds it as much as rounding grad_logits to that dtype does:
            # one 16-bit matmul is enough there.
            torch.mm(grad_logits.to(x.dtype), w, out=grad_x[rows])
            grad_weight += weight_grad_fp32(grad_logits, x[rows])
    return grad_x, grad_weight.to(weight.dtype)


@linear_softcap_ce_backward.register_fake
def _(x, weight, targets, lse, grad_loss, softcap, chunk_size):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _linear_setup_context(ctx, inputs, output):
    x, weight, targets, softcap, chunk_size = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(x, weight, targets, lse)
    ctx.softcap = softcap
    ctx.chunk_size = chunk_size


def _linear_backward_rule(ctx, grad_loss, _grad_lse):
    x, weight, targets, lse = ctx.saved_tensors
    grad_x, grad_weight = linear_softcap_ce_backward(x, weight, targets, lse, grad_loss, ctx.softcap, ctx.chunk_size)
    want_grad_x, want_grad_weight = ctx.needs_input_grad[:2]
    return grad_x if want_grad_x else None, grad_weight if want_grad_weight else None, None, None, None


linear_softcap_ce_forward.register_autograd(_linear_backward_rule, setup_context=_linear_setup_context)


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
    loss, _ = softcap_ce_forward(logits, targets.contiguous(), float(softcap))
    return loss


def linear_softcap_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token loss [N] (fp32) of softcap-CE(x @ weight.T, targets) for x [N, D], weight [V, D], without ever
    holding the [N, V] logits (at most [chunk_size, V]).

    weight has x's dtype, or is fp32 for 16-bit x: pass the fp32 tied embedding itself; the matmuls then run in x's
    dtype and its gradient arrives in fp32, summed over the chunks in fp32."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"expected x [N, D], weight [V, D], targets [N], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    fp32_weight_for_16_bit_x = weight.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
    if weight.dtype != x.dtype and not fp32_weight_for_16_bit_x:
        raise TypeError(f"weight must have x's dtype, or be fp32 for 16-bit x; got x {x.dtype}, weight {weight.dtype}")
    if not _common.use_triton(x):
        return linear_reference(x, weight, targets, softcap)
    loss, _ = linear_softcap_ce_forward(x, weight, targets.contiguous(), float(softcap), int(chunk_size))
    return loss

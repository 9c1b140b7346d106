"""Tests of kernels/: every op's forward and input gradients against a float64 reference.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set below before
triton or kernels is imported, because @triton.jit picks interpreted or compiled kernels when it runs). With a GPU
the same tests run the compiled kernels on CUDA tensors, and the CUDA-only tests add bf16 matmuls and larger shapes.

Shapes are small and ragged (not powers of two, not multiples of the block sizes). Every buffer a kernel fills is
allocated NaN-poisoned (see `poison_outputs`), so an element a kernel forgets to write fails the comparison.

Tolerances: max |error| / max |expected| <= 2e-5 for fp32 and 1e-2 for bf16. bf16 matmuls (GPU only) must stay
within 2x the error of the eager bf16 computation, both measured against float64.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # (does not import triton)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Only without a GPU: with one, interpreted kernels would replace the compiled ones for the CUDA tests too.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import _common  # noqa: E402

# Each module is named after its op (kernels.rms_norm is the function), so modules are reached through importlib.
ce_module = importlib.import_module("kernels.softcap_cross_entropy")
relu2_module = importlib.import_module("kernels.relu2_linear")
rms_module = importlib.import_module("kernels.rms_norm")
rotary_module = importlib.import_module("kernels.rotary_qk")
ns_module = importlib.import_module("kernels.newton_schulz")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FP32_TOL = 2e-5
BF16_TOL = 1e-2
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
REPO_ROOT = Path(__file__).resolve().parent.parent

needs_triton = pytest.mark.skipif(
    not kernels.triton_available(DEVICE), reason="Triton cannot run here (no CUDA and TRITON_INTERPRET is not 1)"
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_common, "empty_output", nan_filled)


def randn(*shape, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def on_device(tensor, dtype):
    """A leaf copy of a float64 CPU tensor on DEVICE in dtype, requiring grad."""
    return tensor.to(device=DEVICE, dtype=dtype).requires_grad_(True)


def as_reference_input(tensor):
    """The float64 CPU leaf holding exactly the values the op saw (after rounding to its dtype)."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).requires_grad_(True)


def max_rel_error(actual, expected):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values (an output element left unwritten?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol, what):
    error = max_rel_error(actual, expected)
    assert error <= tol, f"{what}: max error {error:.2e} of max |expected|, tolerance {tol:.0e}"


def run_backward(outputs, upstream):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = upstream if isinstance(upstream, tuple) else (upstream,)
    torch.autograd.backward(outputs, [g.to(device=o.device, dtype=o.dtype) for o, g in zip(outputs, upstream)])


# --------------------------------------------------------------------------------------------------------------
# Package surface and dispatch


def test_exports_and_defaults():
    names = {"softcap_cross_entropy", "linear_softcap_cross_entropy", "relu2_linear", "rms_norm", "rotary_qk",
             "newton_schulz"}
    assert set(kernels.OPS) == names
    assert set(kernels.DEFAULT_ON) == names
    assert set(kernels.REFERENCES) == names
    assert not any(kernels.DEFAULT_ON.values()), "no op is measured faster than torch.compile on an H100 yet"
    for name, op in kernels.OPS.items():
        assert getattr(kernels, name) is op


def test_triton_path_is_exercised():
    if HAS_CUDA:
        assert kernels.triton_available("cuda")
    elif _common.HAS_TRITON and _common.interpreter_requested():
        assert _common.KERNELS_INTERPRETED, (
            "kernels was imported before TRITON_INTERPRET=1 was set, so its Triton kernels cannot run on CPU: "
            "set TRITON_INTERPRET=1 before any test imports kernels (e.g. at the top of tests/conftest.py)"
        )
        assert kernels.triton_available("cpu")


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.triton_available("cpu")
    sentinel = torch.zeros(3)
    monkeypatch.setattr(rms_module, "reference", lambda x, eps=None: sentinel)
    assert kernels.rms_norm(torch.randn(3, 5)) is sentinel


# --------------------------------------------------------------------------------------------------------------
# softcap_cross_entropy


def ce_inputs(n_tokens=37, vocab=101, scale=3.0, seed=0):
    logits = randn(n_tokens, vocab, scale=scale, seed=seed)
    targets = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed + 1))
    targets[2::9] = ce_module.IGNORE_INDEX
    return logits, targets


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["no_cap", "cap15"])
@pytest.mark.parametrize("max_block_v", [4096, 32], ids=["one_block", "blocks_of_32"])
def test_softcap_cross_entropy(dtype, softcap, max_block_v, monkeypatch):
    monkeypatch.setattr(ce_module, "MAX_BLOCK_V", max_block_v)
    logits64, targets = ce_inputs()
    # rows padded to a wider allocation: the kernels must use the row stride, not the row length
    padded = torch.zeros(logits64.shape[0], logits64.shape[1] + 7, dtype=dtype, device=DEVICE)
    padded[:, : logits64.shape[1]] = logits64.to(dtype)
    logits = padded[:, : logits64.shape[1]].detach().requires_grad_(True)
    upstream = randn(logits64.shape[0], seed=5)  # per-token weights, not all equal

    loss = kernels.softcap_cross_entropy(logits, targets.to(DEVICE), softcap)
    run_backward(loss, upstream)
    logits_ref = as_reference_input(logits)
    loss_ref = ce_module.reference(logits_ref, targets, softcap)
    run_backward(loss_ref, upstream)

    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(logits.grad, logits_ref.grad, TOL[dtype], "grad logits")
    ignored = (targets == ce_module.IGNORE_INDEX).to(DEVICE)
    assert (loss[ignored] == 0).all() and (logits.grad[ignored] == 0).all()


@needs_triton
@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["no_cap", "cap30"])
def test_softcap_cross_entropy_huge_logits(softcap):
    logits64, targets = ce_inputs(n_tokens=9, vocab=50)
    logits64 = logits64 / logits64.abs().max() * 1e4  # up to 1e4 in magnitude: exp would overflow without max-shift
    logits = on_device(logits64, torch.float32)
    loss = kernels.softcap_cross_entropy(logits, targets.to(DEVICE), softcap)
    loss.sum().backward()
    logits_ref = as_reference_input(logits)
    loss_ref = ce_module.reference(logits_ref, targets, softcap)
    loss_ref.sum().backward()
    assert_close(loss, loss_ref, FP32_TOL, "loss")
    assert_close(logits.grad, logits_ref.grad, FP32_TOL, "grad logits")


@needs_triton
def test_softcap_cross_entropy_all_ignored():
    logits64, targets = ce_inputs(n_tokens=5, vocab=20)
    targets[:] = ce_module.IGNORE_INDEX
    logits = on_device(logits64, torch.float32)
    loss = kernels.softcap_cross_entropy(logits, targets.to(DEVICE), 15.0)
    loss.sum().backward()
    assert (loss == 0).all() and (logits.grad == 0).all()


@needs_triton
@pytest.mark.parametrize("chunk_size", [13, 10, 64], ids=["divides_N", "does_not_divide_N", "larger_than_N"])
def test_linear_softcap_cross_entropy(chunk_size):
    n_tokens, width, vocab, softcap = 39, 48, 101, 15.0
    x64 = randn(n_tokens, width, seed=1)
    weight64 = randn(vocab, width, scale=width**-0.5 * 3, seed=2)
    targets = ce_inputs(n_tokens, vocab)[1]
    upstream = randn(n_tokens, seed=3)

    x, weight = on_device(x64, torch.float32), on_device(weight64, torch.float32)
    loss = kernels.linear_softcap_cross_entropy(x, weight, targets.to(DEVICE), softcap, chunk_size=chunk_size)
    run_backward(loss, upstream)

    x_unfused, weight_unfused = on_device(x64, torch.float32), on_device(weight64, torch.float32)
    loss_unfused = kernels.softcap_cross_entropy(x_unfused @ weight_unfused.T, targets.to(DEVICE), softcap)
    run_backward(loss_unfused, upstream)

    x_ref, weight_ref = as_reference_input(x64), as_reference_input(weight64)
    loss_ref = ce_module.linear_reference(x_ref, weight_ref, targets, softcap)
    run_backward(loss_ref, upstream)

    for actual, unfused, expected, what in [
        (loss, loss_unfused, loss_ref, "loss"),
        (x.grad, x_unfused.grad, x_ref.grad, "grad x"),
        (weight.grad, weight_unfused.grad, weight_ref.grad, "grad weight"),
    ]:
        assert_close(actual, unfused, FP32_TOL, f"{what} vs unfused op")
        assert_close(actual, expected, FP32_TOL, f"{what} vs float64 reference")


# --------------------------------------------------------------------------------------------------------------
# relu2_linear (tl.dot: fp32 only under the interpreter, bf16 in the CUDA tests)


@needs_triton
def test_relu2_linear():
    x64, w64 = randn(37, 48, seed=1), randn(70, 48, scale=48**-0.5, seed=2)
    upstream = randn(37, 70, seed=3)
    x, w = on_device(x64, torch.float32), on_device(w64, torch.float32)
    out = kernels.relu2_linear(x, w)
    run_backward(out, upstream)
    x_ref, w_ref = as_reference_input(x), as_reference_input(w)
    out_ref = relu2_module.reference(x_ref, w_ref)
    run_backward(out_ref, upstream)
    assert (out_ref == 0).any() and (out_ref > 0).any()  # both sides of the ReLU are exercised
    assert_close(out, out_ref, FP32_TOL, "out")
    assert_close(x.grad, x_ref.grad, FP32_TOL, "grad x")
    assert_close(w.grad, w_ref.grad, FP32_TOL, "grad w")


@needs_triton
def test_relu2_linear_leading_dims():
    x = randn(3, 5, 24, seed=4).float().to(DEVICE)
    w = randn(40, 24, seed=5).float().to(DEVICE)
    out = kernels.relu2_linear(x, w)
    assert out.shape == (3, 5, 40)
    assert_close(out, relu2_module.reference(x.double(), w.double()), FP32_TOL, "out")


# --------------------------------------------------------------------------------------------------------------
# rms_norm


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_block_cols", [8192, 32], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("eps", [None, 1e-5], ids=["eps_default", "eps_1e-5"])
def test_rms_norm(dtype, max_block_cols, eps, monkeypatch):
    monkeypatch.setattr(rms_module, "MAX_BLOCK_COLS", max_block_cols)
    x64 = randn(5, 7, 70, seed=1)  # 35 rows of width 70
    upstream = randn(5, 7, 70, seed=2)
    x = on_device(x64, dtype)
    out = kernels.rms_norm(x, eps)
    run_backward(out, upstream)
    x_ref = as_reference_input(x)
    out_ref = rms_module.reference(x_ref, torch.finfo(dtype).eps if eps is None else eps)
    run_backward(out_ref, upstream)
    assert out.shape == x.shape and out.dtype == dtype and x.grad.dtype == dtype
    assert_close(out, out_ref, TOL[dtype], "out")
    assert_close(x.grad, x_ref.grad, TOL[dtype], "grad x")


# --------------------------------------------------------------------------------------------------------------
# rotary_qk


def rotary_tables(n_tokens, half_dim, seed=7):
    # positions restart per document: any per-token angles will do
    angles = torch.rand(n_tokens, half_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    return angles.cos(), angles.sin()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [12, 64])
def test_rotary_qk(dtype, head_dim):
    n_tokens, q_heads, kv_heads = 13, 6, 2  # GQA: fewer kv heads
    # q and k are views into one packed qkv projection, as in the model (non-contiguous token stride)
    qkv64 = randn(n_tokens, (q_heads + 2 * kv_heads) * head_dim, seed=1)
    qkv = qkv64.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    q = qkv[:, : q_heads * head_dim].view(n_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(n_tokens, kv_heads, head_dim)
    cos64, sin64 = rotary_tables(n_tokens, head_dim // 2)
    upstream = (randn(n_tokens, q_heads, head_dim, seed=2), randn(n_tokens, kv_heads, head_dim, seed=3))

    q_out, k_out = kernels.rotary_qk(q, k, cos64.float().to(DEVICE), sin64.float().to(DEVICE))
    run_backward((q_out, k_out), upstream)

    qkv_ref = as_reference_input(qkv)
    q_ref = qkv_ref[:, : q_heads * head_dim].view(n_tokens, q_heads, head_dim)
    k_ref = qkv_ref[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(n_tokens, kv_heads, head_dim)
    eps = torch.finfo(dtype).eps
    q_out_ref, k_out_ref = rotary_module.reference(q_ref, k_ref, cos64.float().double(), sin64.float().double(), eps)
    run_backward((q_out_ref, k_out_ref), upstream)

    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    assert_close(q_out, q_out_ref, TOL[dtype], "q out")
    assert_close(k_out, k_out_ref, TOL[dtype], "k out")
    assert_close(qkv.grad, qkv_ref.grad, TOL[dtype], "grad q and k")


@needs_triton
def test_rotary_qk_half_split_convention():
    # A quarter turn (cos 0, sin 1) maps the normalised halves (n1, n2) to (n2, -n1).
    n_tokens, heads, head_dim = 3, 2, 8
    q = randn(n_tokens, heads, head_dim, seed=1).float().to(DEVICE)
    cos = torch.zeros(n_tokens, head_dim // 2, device=DEVICE)
    sin = torch.ones(n_tokens, head_dim // 2, device=DEVICE)
    q_out, _ = kernels.rotary_qk(q, q, cos, sin)
    n = q.double() * torch.rsqrt(q.double().square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    n1, n2 = n[..., : head_dim // 2], n[..., head_dim // 2 :]
    assert_close(q_out, torch.cat((n2, -n1), dim=-1), FP32_TOL, "quarter turn")


# --------------------------------------------------------------------------------------------------------------
# newton_schulz


@needs_triton
@pytest.mark.parametrize("with_add", [False, True], ids=["x_xt", "x_xt_plus_add"])
def test_sym_matmul(with_add):
    x = randn(37, 21, seed=1)
    add = randn(37, 37, seed=2)
    add = add + add.T  # symmetric
    out = ns_module.sym_matmul(x.float().to(DEVICE), alpha=0.7, add=add.float().to(DEVICE) if with_add else None,
                               beta=-1.3)
    expected = 0.7 * x @ x.T + (-1.3 * add if with_add else 0)
    assert_close(out, expected, FP32_TOL, "sym_matmul")


@needs_triton
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall_transposed"])
def test_newton_schulz(shape):
    G64 = randn(*shape, seed=3)
    G = G64.float().to(DEVICE)
    out = kernels.newton_schulz(G, steps=5)
    expected = ns_module.reference(G.double().cpu(), steps=5)  # same coefficients, in float64
    assert out.shape == G.shape and out.dtype == G.dtype
    if HAS_CUDA:  # the CUDA path works in bf16, as Muon does
        eager_bf16 = ns_module.reference(G, steps=5)
        assert max_rel_error(out, expected) <= 2 * max_rel_error(eager_bf16, expected) + 1e-3
    else:
        assert_close(out, expected, FP32_TOL, "newton_schulz")
    # the point of the iteration: singular values pushed towards 1 (roughly [0.7, 1.2] for these coefficients)
    singular_values = torch.linalg.svdvals(out.double().cpu())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


# --------------------------------------------------------------------------------------------------------------
# Compiled kernels: without a GPU, at least check that every kernel compiles for an H100


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests run the compiled kernels")
@pytest.mark.skipif(not _common.HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_h100():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench_kernels.py"), "--compile-check", "--quick"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# CUDA only: bf16 matmul kernels and larger shapes


def assert_no_worse_than_eager(actual, eager, expected, what, slack=2.0):
    """bf16 results: error vs float64 within `slack` x the eager bf16 computation's error (plus a hair)."""
    error, eager_error = max_rel_error(actual, expected), max_rel_error(eager, expected)
    assert error <= slack * eager_error + 1e-3, f"{what}: error {error:.2e}, eager bf16 {eager_error:.2e}"


def reference_grads(reference, inputs64, upstream):
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs64]
    out = reference(*leaves)
    run_backward(out, upstream)
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_softcap_cross_entropy_large(dtype, softcap):
    logits64, targets = ce_inputs(n_tokens=4099, vocab=1024 + 7, scale=4.0)
    upstream = randn(4099, seed=9)
    logits = on_device(logits64, dtype)
    loss = kernels.softcap_cross_entropy(logits, targets.cuda(), softcap)
    run_backward(loss, upstream)
    loss_ref, (grad_ref,) = reference_grads(lambda z: ce_module.reference(z, targets, softcap), [logits], upstream)
    assert_close(loss, loss_ref, TOL[dtype], "loss")
    assert_close(logits.grad, grad_ref, TOL[dtype], "grad logits")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("chunk_size", [1024, 1000])
def test_cuda_linear_softcap_cross_entropy_bf16(chunk_size):
    n_tokens, width, vocab, softcap = 4000, 512, 1024, 15.0
    x64, weight64 = randn(n_tokens, width, seed=1), randn(vocab, width, scale=width**-0.5 * 3, seed=2)
    targets = ce_inputs(n_tokens, vocab)[1]
    upstream = randn(n_tokens, seed=3)
    x, weight = on_device(x64, torch.bfloat16), on_device(weight64, torch.bfloat16)
    loss = kernels.linear_softcap_cross_entropy(x, weight, targets.cuda(), softcap, chunk_size=chunk_size)
    run_backward(loss, upstream)
    x_eager, weight_eager = on_device(x64, torch.bfloat16), on_device(weight64, torch.bfloat16)
    loss_eager = ce_module.linear_reference(x_eager, weight_eager, targets.cuda(), softcap)
    run_backward(loss_eager, upstream)
    loss_ref, (grad_x_ref, grad_weight_ref) = reference_grads(
        lambda a, b: ce_module.linear_reference(a, b, targets, softcap), [x, weight], upstream)
    assert_no_worse_than_eager(loss, loss_eager, loss_ref, "loss")
    assert_no_worse_than_eager(x.grad, x_eager.grad, grad_x_ref, "grad x")
    assert_no_worse_than_eager(weight.grad, weight_eager.grad, grad_weight_ref, "grad weight")


@pytest.mark.cuda
@requires_cuda
def test_cuda_relu2_linear_bf16():
    x64, w64 = randn(1000, 512, seed=1), randn(1024 + 3, 512, scale=512**-0.5, seed=2)
    upstream = randn(1000, 1024 + 3, seed=3)
    x, w = on_device(x64, torch.bfloat16), on_device(w64, torch.bfloat16)
    out = kernels.relu2_linear(x, w)
    run_backward(out, upstream)
    x_eager, w_eager = on_device(x64, torch.bfloat16), on_device(w64, torch.bfloat16)
    out_eager = relu2_module.reference(x_eager, w_eager)
    run_backward(out_eager, upstream)
    out_ref, (grad_x_ref, grad_w_ref) = reference_grads(relu2_module.reference, [x, w], upstream)
    assert_no_worse_than_eager(out, out_eager, out_ref, "out")
    assert_no_worse_than_eager(x.grad, x_eager.grad, grad_x_ref, "grad x")
    assert_no_worse_than_eager(w.grad, w_eager.grad, grad_w_ref, "grad w")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("width", [512, 768 + 5])
def test_cuda_rms_norm_bf16_large(width):
    x64, upstream = randn(4096 + 3, width, seed=1), randn(4096 + 3, width, seed=2)
    x = on_device(x64, torch.bfloat16)
    out = kernels.rms_norm(x)
    run_backward(out, upstream)
    eps = torch.finfo(torch.bfloat16).eps
    out_ref, (grad_ref,) = reference_grads(lambda t: rms_module.reference(t, eps), [x], upstream)
    assert_close(out, out_ref, BF16_TOL, "out")
    assert_close(x.grad, grad_ref, BF16_TOL, "grad x")


@pytest.mark.cuda
@requires_cuda
def test_cuda_rotary_qk_bf16_large():
    n_tokens, q_heads, kv_heads, head_dim = 2048 + 5, 8, 4, 64
    q64, k64 = randn(n_tokens, q_heads, head_dim, seed=1), randn(n_tokens, kv_heads, head_dim, seed=2)
    cos64, sin64 = rotary_tables(n_tokens, head_dim // 2)
    upstream = (randn(n_tokens, q_heads, head_dim, seed=3), randn(n_tokens, kv_heads, head_dim, seed=4))
    q, k = on_device(q64, torch.bfloat16), on_device(k64, torch.bfloat16)
    cos, sin = cos64.float().cuda(), sin64.float().cuda()
    outs = kernels.rotary_qk(q, k, cos, sin)
    run_backward(outs, upstream)
    eps = torch.finfo(torch.bfloat16).eps
    outs_ref, (grad_q_ref, grad_k_ref) = reference_grads(
        lambda a, b: rotary_module.reference(a, b, cos.double().cpu(), sin.double().cpu(), eps), [q, k], upstream)
    for actual, expected, what in [(outs[0], outs_ref[0], "q out"), (outs[1], outs_ref[1], "k out"),
                                   (q.grad, grad_q_ref, "grad q"), (k.grad, grad_k_ref, "grad k")]:
        assert_close(actual, expected, BF16_TOL, what)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", [(512, 512), (1024, 512), (300, 700)])
def test_cuda_newton_schulz_bf16(shape):
    G = randn(*shape, seed=5).float().cuda()
    out = kernels.newton_schulz(G)
    expected = ns_module.reference(G.double().cpu())
    assert_no_worse_than_eager(out, ns_module.reference(G), expected, "newton_schulz")

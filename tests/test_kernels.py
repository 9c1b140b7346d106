"""Tests of kernels/: every op's forward and input gradients against a float64 reference.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set below before
triton or kernels is imported, because @triton.jit picks interpreted or compiled kernels when it runs). With a GPU
the same tests run the compiled kernels on CUDA tensors, and the CUDA-only tests add bf16 matmuls and larger shapes.

Shapes are small and ragged (not powers of two, not multiples of the block sizes). Every buffer a kernel fills is
allocated NaN-poisoned (see `poison_outputs`), so an element a kernel forgets to write fails the comparison.

Tolerances: max |error| / max |expected| <= 2e-5 for fp32 and 1e-2 for bf16. bf16 matmuls (GPU only) must stay
within 2x the error of the eager bf16 computation, both measured against float64.
"""

import os
import re
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

ce_module = kernels.softcap_cross_entropy
relu2_module = kernels.relu2_linear
rms_module = kernels.rms_norm
rotary_module = kernels.rotary_qk
ns_module = kernels.newton_schulz

def fast_first(values: list) -> list:
    """Parameters of which only the first runs in the fast loop (`./test.sh -m "not slow"`); the whole suite runs all."""
    return [values[0]] + [pytest.param(v, marks=pytest.mark.slow) for v in values[1:]]


DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FP32_TOL = 2e-5
BF16_TOL = 1e-2
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
REPO_ROOT = Path(__file__).resolve().parent.parent

needs_triton = pytest.mark.skipif(
    not kernels.triton_available(DEVICE),
    reason=_common.interpreter_unusable_reason() or "Triton cannot run here (no CUDA and TRITON_INTERPRET is not 1)",
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


def test_exports_and_defaults_match_the_readme():
    """The op names, their fused_<op> exports (`kernels.<op>` stays the module), and the README's kernels table: one
    row per op, each off by default (FUSED=0 is the default)."""
    names = {"softcap_cross_entropy", "linear_softcap_cross_entropy", "relu2_linear", "rms_norm", "rotary_qk",
             "newton_schulz"}
    assert set(kernels.OPS) == set(kernels.REFERENCES) == names
    for name, op in kernels.OPS.items():
        assert getattr(kernels, f"fused_{name}") is op
    for module in names - {"linear_softcap_cross_entropy"}:  # (that op lives in softcap_cross_entropy.py)
        assert callable(getattr(kernels, module).reference)  # kernels.<op> is the module, not shadowed by its op
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = {m.group(1): m.group(2) == "on" for m in re.finditer(r"^\| `(\w+)` \|.*\| (on|off) \|$", readme, re.M)}
    assert table == dict.fromkeys(names, False)


def test_triton_path_is_exercised():
    if not (HAS_CUDA or _common.HAS_TRITON):
        pytest.skip("Triton is not installed: every op runs its reference")
    if HAS_CUDA:
        assert kernels.triton_available("cuda")
    else:
        if _common.interpreter_unusable_reason():
            pytest.skip(_common.interpreter_unusable_reason())
        assert _common.interpreter_requested(), "tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA"
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
    assert kernels.fused_rms_norm(torch.randn(3, 5)) is sentinel


# --------------------------------------------------------------------------------------------------------------
# softcap_cross_entropy


def ce_inputs(n_tokens=37, vocab=101, scale=3.0, seed=0):
    logits = randn(n_tokens, vocab, scale=scale, seed=seed)
    targets = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed + 1))
    targets[2::9] = ce_module.IGNORE_INDEX
    return logits, targets


@needs_triton
@pytest.mark.parametrize("dtype", fast_first([torch.float32, torch.bfloat16]), ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", fast_first([15.0, 0.0]), ids=["cap15", "no_cap"])
@pytest.mark.parametrize("max_block_v", fast_first([32, 4096]), ids=["blocks_of_32", "one_block"])
def test_softcap_cross_entropy(dtype, softcap, max_block_v, monkeypatch):
    monkeypatch.setattr(ce_module, "MAX_BLOCK_V", max_block_v)
    logits64, targets = ce_inputs()
    # rows padded to a wider allocation: the kernels must use the row stride, not the row length
    padded = torch.zeros(logits64.shape[0], logits64.shape[1] + 7, dtype=dtype, device=DEVICE)
    padded[:, : logits64.shape[1]] = logits64.to(dtype)
    logits = padded[:, : logits64.shape[1]].detach().requires_grad_(True)
    upstream = randn(logits64.shape[0], seed=5)  # per-token weights, not all equal

    loss = kernels.fused_softcap_cross_entropy(logits, targets.to(DEVICE), softcap)
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
    loss = kernels.fused_softcap_cross_entropy(logits, targets.to(DEVICE), softcap)
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
    loss = kernels.fused_softcap_cross_entropy(logits, targets.to(DEVICE), 15.0)
    loss.sum().backward()
    assert (loss == 0).all() and (logits.grad == 0).all()


@needs_triton
@pytest.mark.parametrize("chunk_size", fast_first([10, 13, 64]), ids=["does_not_divide_N", "divides_N", "larger_than_N"])
def test_linear_softcap_cross_entropy(chunk_size):
    n_tokens, width, vocab, softcap = 39, 48, 101, 15.0
    x64 = randn(n_tokens, width, seed=1)
    weight64 = randn(vocab, width, scale=width**-0.5 * 3, seed=2)
    targets = ce_inputs(n_tokens, vocab)[1]
    upstream = randn(n_tokens, seed=3)

    x, weight = on_device(x64, torch.float32), on_device(weight64, torch.float32)
    loss = kernels.fused_linear_softcap_cross_entropy(x, weight, targets.to(DEVICE), softcap, chunk_size=chunk_size)
    run_backward(loss, upstream)

    x_unfused, weight_unfused = on_device(x64, torch.float32), on_device(weight64, torch.float32)
    loss_unfused = kernels.fused_softcap_cross_entropy(x_unfused @ weight_unfused.T, targets.to(DEVICE), softcap)
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


@needs_triton
def test_linear_softcap_cross_entropy_fp32_weight_bf16_x():
    """bf16 activations and the fp32 tied embedding itself: logits and the weight gradient are accumulated in fp32
    (nothing rounded to bf16 on the way), and the gradient arrives in fp32.

    Measured before this was fixed, when each chunk's logits and weight-gradient product were rounded to bf16 (and the
    caller passed the weight cast to bf16): max error / max |expected| vs float64 of 1.0e-3 for the loss and 5.5e-3
    for grad weight at these shapes (1.2e-3 and 6.6e-3 at 1024 tokens, vocab 512, width 64, chunks of 128); the
    unfused bf16 computation has 1.0e-3 and 4.0e-3. Now: 8.5e-8 and 3.3e-6 (1.1e-7 and 5.0e-6 at the larger shape).
    grad x is returned in bf16, so it keeps a bf16 rounding (3.3e-3, the same as the unfused bf16 computation).
    """
    n_tokens, width, vocab, softcap, chunk_size = 97, 40, 203, 15.0, 16  # 7 chunks, the last one partial
    x64 = randn(n_tokens, width, seed=1).to(torch.bfloat16).double()
    # Weight values exactly representable in bf16: the op's internal cast to x's dtype then loses nothing, and float64
    # on the same values is the exact answer for the weight the op sees.
    weight64 = randn(vocab, width, scale=width**-0.5 * 3, seed=2).to(torch.bfloat16).double()
    targets = ce_inputs(n_tokens, vocab)[1]
    upstream = randn(n_tokens, seed=3)

    x, weight = on_device(x64, torch.bfloat16), on_device(weight64, torch.float32)
    loss = kernels.fused_linear_softcap_cross_entropy(x, weight, targets.to(DEVICE), softcap, chunk_size=chunk_size)
    run_backward(loss, upstream)
    x_ref, weight_ref = as_reference_input(x64), as_reference_input(weight64)
    loss_ref = ce_module.linear_reference(x_ref, weight_ref, targets, softcap)
    run_backward(loss_ref, upstream)

    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close(loss, loss_ref, FP32_TOL, "loss")
    assert_close(weight.grad, weight_ref.grad, FP32_TOL, "grad weight")
    assert_close(x.grad, x_ref.grad, BF16_TOL, "grad x (bf16)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_weight_grad_fp32(dtype):
    """grad_logits.T @ x for fp32 grad_logits and 16-bit x, from high and low 16-bit parts: fp32-accurate, where one
    16-bit rounding of grad_logits (what a plain 16-bit matmul needs) is visibly off."""
    grad_logits = randn(300, 50, seed=1).float().to(DEVICE)
    x = randn(300, 20, seed=2).to(device=DEVICE, dtype=dtype)
    expected = grad_logits.double().T @ x.double()
    assert_close(ce_module.weight_grad_fp32(grad_logits, x), expected, 1e-5, "high + low parts")
    rounded_once = ce_module.matmul_fp32(grad_logits.to(dtype).T, x)
    # measured on CPU: rounded once 1.3e-3 (bf16), 1.9e-4 (fp16); split 2.4e-6, 2.6e-7
    assert max_rel_error(rounded_once, expected) > 1e-4


@needs_triton
def test_linear_softcap_cross_entropy_dtype_rules():
    x = torch.zeros(4, 8, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError):  # a 16-bit weight for fp32 activations would silently lose precision
        kernels.fused_linear_softcap_cross_entropy(x, torch.zeros(5, 8, device=DEVICE, dtype=torch.bfloat16), targets, 15.0)
    with pytest.raises(ValueError):
        kernels.fused_linear_softcap_cross_entropy(x, torch.zeros(5, 7, device=DEVICE), targets, 15.0)


# --------------------------------------------------------------------------------------------------------------
# relu2_linear (tl.dot: fp32 only under the interpreter, bf16 in the CUDA tests)


@needs_triton
def test_relu2_linear():
    x64, w64 = randn(37, 48, seed=1), randn(70, 48, scale=48**-0.5, seed=2)
    upstream = randn(37, 70, seed=3)
    x, w = on_device(x64, torch.float32), on_device(w64, torch.float32)
    out = kernels.fused_relu2_linear(x, w)
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
    out = kernels.fused_relu2_linear(x, w)
    assert out.shape == (3, 5, 40)
    assert_close(out, relu2_module.reference(x.double(), w.double()), FP32_TOL, "out")


# --------------------------------------------------------------------------------------------------------------
# rms_norm


@needs_triton
@pytest.mark.parametrize("dtype", fast_first([torch.float32, torch.bfloat16]), ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_block_cols", [8192, 32], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("eps", fast_first([None, 1e-5]), ids=["eps_default", "eps_1e-5"])
def test_rms_norm(dtype, max_block_cols, eps, monkeypatch):
    monkeypatch.setattr(rms_module, "MAX_BLOCK_COLS", max_block_cols)
    x64 = randn(5, 7, 70, seed=1)  # 35 rows of width 70
    upstream = randn(5, 7, 70, seed=2)
    x = on_device(x64, dtype)
    out = kernels.fused_rms_norm(x, eps)
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
@pytest.mark.parametrize("dtype", fast_first([torch.float32, torch.bfloat16]), ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", fast_first([12, 64]))
def test_rotary_qk(dtype, head_dim):
    n_tokens, q_heads, kv_heads = 13, 6, 2  # GQA: fewer kv heads
    # q and k are views into one packed qkv projection, as in the model (non-contiguous token stride)
    qkv64 = randn(n_tokens, (q_heads + 2 * kv_heads) * head_dim, seed=1)
    qkv = qkv64.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    q = qkv[:, : q_heads * head_dim].view(n_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(n_tokens, kv_heads, head_dim)
    cos64, sin64 = rotary_tables(n_tokens, head_dim // 2)
    upstream = (randn(n_tokens, q_heads, head_dim, seed=2), randn(n_tokens, kv_heads, head_dim, seed=3))

    q_out, k_out = kernels.fused_rotary_qk(q, k, cos64.float().to(DEVICE), sin64.float().to(DEVICE))
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
    q_out, _ = kernels.fused_rotary_qk(q, q, cos, sin)
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
    out = kernels.fused_newton_schulz(G, steps=5)
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
# Registered ops and torch.compile
#
# Every Triton launch sits inside a torch.library custom op (torch.ops.kernels.*) with a fake implementation and a
# registered backward, so torch.compile(fullgraph=True) traces the public ops without a graph break. On CPU the
# compiled graph calls the same ops, which run the interpreted kernels; the compile tests there use the aot_eager
# backend (Dynamo + AOTAutograd, the parts that trace the ops; Inductor costs ~20 s per graph on 2 cores) and the CUDA
# tests use Inductor.


def op_case(name, device, dtype):
    """Inputs of public op `name` at small ragged shapes: (args, kwargs, leaves), leaves being the inputs whose
    gradients are compared (none for newton_schulz, which has no autograd)."""

    def leaf(t, leaf_dtype=dtype):
        return t.to(device=device, dtype=leaf_dtype).requires_grad_(True)

    if name == "softcap_cross_entropy":
        logits64, targets = ce_inputs()
        logits = leaf(logits64)
        return (logits, targets.to(device), 15.0), {}, [logits]
    if name == "linear_softcap_cross_entropy":
        x, weight = leaf(randn(39, 48, seed=1)), leaf(randn(101, 48, scale=48**-0.5 * 3, seed=2), torch.float32)
        return (x, weight, ce_inputs(39, 101)[1].to(device), 15.0), dict(chunk_size=16), [x, weight]
    if name == "relu2_linear":
        x, w = leaf(randn(3, 13, 48, seed=1)), leaf(randn(70, 48, scale=48**-0.5, seed=2))
        return (x, w), {}, [x, w]
    if name == "rms_norm":
        x = leaf(randn(5, 7, 70, seed=1))
        return (x,), {}, [x]
    if name == "rotary_qk":
        n_tokens, q_heads, kv_heads, head_dim = 13, 6, 2, 12
        qkv = leaf(randn(n_tokens, (q_heads + 2 * kv_heads) * head_dim, seed=1))
        q = qkv[:, : q_heads * head_dim].view(n_tokens, q_heads, head_dim)
        k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(n_tokens, kv_heads, head_dim)
        cos, sin = (t.to(device=device, dtype=torch.float32) for t in rotary_tables(n_tokens, head_dim // 2))
        return (q, k, cos, sin), {}, [qkv]
    if name == "newton_schulz":
        return (randn(24, 40, seed=3).to(device=device, dtype=torch.float32),), {}, []
    raise KeyError(name)


def run_op(fn, args, kwargs, leaves):
    """(outputs, gradients of the leaves under a fixed random upstream gradient)."""
    outputs = fn(*args, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if not leaves:
        return outputs, ()
    upstream = [randn(*o.shape, seed=11 + i).to(device=o.device, dtype=o.dtype) for i, o in enumerate(outputs)]
    return outputs, torch.autograd.grad(outputs, leaves, upstream)


def compile_and_run(name, args, kwargs, leaves, backend):
    """Run public op `name` under torch.compile(fullgraph=True): (outputs, gradients, traced kernel op names),
    asserting one graph and no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # fresh caches: each test sees its own trace
    counters.clear()
    recorder = CompileCounterWithBackend(backend)
    outputs, grads = run_op(torch.compile(kernels.OPS[name], fullgraph=True, backend=recorder), args, kwargs, leaves)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert recorder.frame_count == 1, f"{recorder.frame_count} graphs"
    kernel_ops = {str(node.target) for graph in recorder.graphs for node in graph.graph.nodes
                  if getattr(node.target, "namespace", None) == _common.LIBRARY}
    return outputs, grads, kernel_ops


# Inductor fuses newton_schulz's elementwise steps between the Triton matmuls and keeps them in fp32 where eager rounds
# each to bf16; five iterations amplify that rounding (2.2e-2 measured on an H200, torch 2.11).
COMPILED_TOL = {("newton_schulz", torch.bfloat16): 4e-2}


def check_compiled_matches_eager(name, dtype, backend):
    args, kwargs, leaves = op_case(name, DEVICE, dtype)
    eager_outputs, eager_grads = run_op(kernels.OPS[name], args, kwargs, leaves)
    outputs, grads, kernel_ops = compile_and_run(name, args, kwargs, leaves, backend)
    assert kernel_ops, "the compiled graph holds no kernels op: the Triton path was not traced"
    for i, (actual, expected) in enumerate(zip(outputs + grads, eager_outputs + eager_grads, strict=True)):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, COMPILED_TOL.get((name, dtype), TOL[dtype]),
                     f"{name}: output/gradient {i}, compiled vs eager")


@needs_triton
@pytest.mark.parametrize("name", fast_first(["rms_norm", *sorted(set(kernels.OPS) - {"rms_norm"})]))
def test_compiled_op_matches_eager(name):
    check_compiled_matches_eager(name, torch.float32, backend="aot_eager")


@pytest.mark.parametrize("name", fast_first(["rms_norm", *sorted(set(kernels.OPS) - {"rms_norm"})]))
def test_compiled_op_on_cpu_without_triton_is_the_reference(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the dispatch reads it at call time (and so at trace time)
    args, kwargs, leaves = op_case(name, "cpu", torch.float32)
    outputs, grads, kernel_ops = compile_and_run(name, args, kwargs, leaves, backend="aot_eager")
    assert not kernel_ops
    reference_outputs, reference_grads = run_op(kernels.OPS[name], args, kwargs, leaves)  # eager: the reference
    for actual, expected in zip(outputs + grads, reference_outputs + reference_grads, strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", sorted(kernels.OPS))
def test_registered_ops_fake_shapes_match_reference(name, monkeypatch):
    """The fake implementations (what Dynamo and AOTAutograd trace with; meta tensors run them) give every output and
    gradient of the Triton path the shape, dtype and device of the reference's, in bf16 as on a GPU."""
    monkeypatch.setattr(_common, "use_triton", lambda tensor: True)  # the CUDA dispatch, on meta tensors
    outputs, grads = run_op(kernels.OPS[name], *op_case(name, "meta", torch.bfloat16))
    monkeypatch.setattr(_common, "use_triton", lambda tensor: False)
    reference_outputs, reference_grads = run_op(kernels.OPS[name], *op_case(name, "meta", torch.bfloat16))
    for actual, expected in zip(outputs + grads, reference_outputs + reference_grads, strict=True):
        assert (actual.shape, actual.dtype, actual.device) == (expected.shape, expected.dtype, expected.device)


def registered_op_cases():
    """(op, example args) for every torch.library op the kernels register, at small shapes, fp32 (the interpreter)."""
    eps = 1e-6
    x2d, grad_2d = randn(9, 70, seed=1).float(), randn(9, 70, seed=2).float()
    q, k, grad_q = randn(5, 3, 8, seed=3).float(), randn(5, 1, 8, seed=4).float(), randn(5, 3, 8, seed=5).float()
    cos, sin = (t.float() for t in rotary_tables(5, 4))
    x, w, grad_out = randn(9, 24, seed=6).float(), randn(20, 24, seed=7).float(), randn(9, 20, seed=8).float()
    logits, targets = (t.float() if t.is_floating_point() else t for t in ce_inputs(9, 30))
    lse, grad_loss = logits.logsumexp(-1), randn(9, seed=9).float()
    weight, x16 = randn(30, 16, seed=10).float(), randn(9, 16, seed=11).float()
    add = randn(9, 9, seed=12).float()
    return {
        "rms_norm_forward": (rms_module.rms_norm_forward, (x2d.requires_grad_(), eps)),
        "rms_norm_backward": (rms_module.rms_norm_backward, (x2d.detach(), grad_2d, eps)),
        "rotary_qk_forward": (rotary_module.rotary_qk_forward, (q.clone().requires_grad_(), k.requires_grad_(),
                                                                cos, sin, eps, eps)),
        "rotary_qk_backward": (rotary_module.rotary_qk_backward, (q, cos, sin, grad_q, eps)),
        "relu2_linear_forward": (relu2_module.relu2_linear_forward, (x.clone().requires_grad_(),
                                                                     w.clone().requires_grad_())),
        "relu2_grad_pre": (relu2_module.relu2_grad_pre, (grad_out, relu2_module.reference(x, w))),
        "softcap_ce_forward": (ce_module.softcap_ce_forward, (logits.clone().requires_grad_(), targets, 15.0)),
        "softcap_ce_backward": (ce_module.softcap_ce_backward, (logits, targets, lse, grad_loss, 15.0)),
        "linear_softcap_ce_forward": (ce_module.linear_softcap_ce_forward,
                                      (x16.clone().requires_grad_(), weight.clone().requires_grad_(), targets, 15.0, 4)),
        "linear_softcap_ce_backward": (ce_module.linear_softcap_ce_backward,
                                       (x16, weight, targets, lse, grad_loss, 15.0, 4)),
        "linear_softcap_ce_forward_bf16_x_fp32_weight": (ce_module.linear_softcap_ce_forward, (
            x16.bfloat16().requires_grad_(), weight.clone().requires_grad_(), targets, 15.0, 4)),
        "linear_softcap_ce_backward_bf16_x_fp32_weight": (ce_module.linear_softcap_ce_backward,
                                                          (x16.bfloat16(), weight, targets, lse, grad_loss, 15.0, 4)),
        "sym_matmul": (ns_module.sym_matmul, (x16, 0.7, add + add.T, -1.3)),
        "sym_matmul_without_add": (ns_module.sym_matmul, (x16, 1.0, None, 0.0)),
    }


@needs_triton
@pytest.mark.parametrize("case", fast_first(sorted(registered_op_cases())))
def test_registered_op_opcheck(case):
    """torch.library.opcheck: schema, autograd registration, fake implementation against the real one, and tracing
    with dynamic shapes (as varlen batches would be compiled)."""
    op, args = registered_op_cases()[case]
    # on a GPU machine the Triton path takes CUDA tensors only (the cases are built on the CPU, for the interpreter)
    args = tuple(a.detach().to(DEVICE).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not _common.HAS_TRITON, reason="Triton is not installed")
def test_autotuners_built_at_import_and_keyed_without_row_count():
    from triton.runtime.autotuner import Autotuner

    # The row count M of relu2_linear changes with every varlen evaluation batch: keyed on it, every new batch would
    # re-time all configs. (Triton adds the argument dtypes to the key itself.)
    assert isinstance(relu2_module.relu2_matmul_autotuned, Autotuner)
    assert sorted(relu2_module.relu2_matmul_autotuned.keys) == ["K", "N"]
    assert isinstance(ns_module.sym_matmul_autotuned, Autotuner)


# --------------------------------------------------------------------------------------------------------------
# Compiled kernels: without a GPU, at least check that every kernel compiles for an H100


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests run the compiled kernels")
@pytest.mark.skipif(not _common.HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_h100():
    result = subprocess.run(
        [sys.executable, "-m", "speedrun", "bench", "kernels", "--compile-check", "--quick"],
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
    loss = kernels.fused_softcap_cross_entropy(logits, targets.cuda(), softcap)
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
    loss = kernels.fused_linear_softcap_cross_entropy(x, weight, targets.cuda(), softcap, chunk_size=chunk_size)
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
def test_cuda_linear_softcap_cross_entropy_fp32_weight_large():
    """The model's call at a realistic size: bf16 x, the fp32 tied weight; fp32 accuracy for the loss and grad W
    (torch.mm with out_dtype=float32 on CUDA)."""
    n_tokens, width, vocab, softcap, chunk_size = 4000, 512, 1024, 15.0, 1000
    x64 = randn(n_tokens, width, seed=1).to(torch.bfloat16).double()
    weight64 = randn(vocab, width, scale=width**-0.5 * 3, seed=2).to(torch.bfloat16).double()  # exact in bf16
    targets = ce_inputs(n_tokens, vocab)[1]
    upstream = randn(n_tokens, seed=3)
    x, weight = on_device(x64, torch.bfloat16), on_device(weight64, torch.float32)
    loss = kernels.fused_linear_softcap_cross_entropy(x, weight, targets.cuda(), softcap, chunk_size=chunk_size)
    run_backward(loss, upstream)
    loss_ref, (grad_x_ref, grad_weight_ref) = reference_grads(
        lambda a, b: ce_module.linear_reference(a, b, targets, softcap), [x64, weight64], upstream)
    assert weight.grad.dtype == torch.float32
    assert_close(loss, loss_ref, FP32_TOL, "loss")
    assert_close(weight.grad, grad_weight_ref, FP32_TOL, "grad weight")
    assert_close(x.grad, grad_x_ref, BF16_TOL, "grad x (bf16)")


@pytest.mark.cuda
@requires_cuda
def test_cuda_relu2_linear_bf16():
    x64, w64 = randn(1000, 512, seed=1), randn(1024 + 3, 512, scale=512**-0.5, seed=2)
    upstream = randn(1000, 1024 + 3, seed=3)
    x, w = on_device(x64, torch.bfloat16), on_device(w64, torch.bfloat16)
    out = kernels.fused_relu2_linear(x, w)
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
    out = kernels.fused_rms_norm(x)
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
    outs = kernels.fused_rotary_qk(q, k, cos, sin)
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
    out = kernels.fused_newton_schulz(G)
    expected = ns_module.reference(G.double().cpu())
    assert_no_worse_than_eager(out, ns_module.reference(G), expected, "newton_schulz")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", sorted(kernels.OPS))
def test_cuda_compiled_op_matches_eager_bf16(name):
    """Each op under torch.compile(fullgraph=True) with Inductor: one graph, no break, the kernels op in it, forward
    and backward equal to eager."""
    check_compiled_matches_eager(name, torch.bfloat16, backend="inductor")


@pytest.mark.cuda
@requires_cuda
def test_cuda_relu2_linear_autotunes_once_for_any_row_count():
    tuner = relu2_module.relu2_matmul_autotuned
    tuner.cache.clear()
    w = randn(1024 + 3, 512, scale=512**-0.5, seed=2).to(device="cuda", dtype=torch.bfloat16)
    for rows in (1000, 1537, 64, 4099):  # e.g. varlen evaluation batches
        x = randn(rows, 512, seed=rows).to(device="cuda", dtype=torch.bfloat16)
        out = kernels.fused_relu2_linear(x, w)
        assert_no_worse_than_eager(out, relu2_module.reference(x, w), relu2_module.reference(x.double(), w.double()),
                                   f"out, {rows} rows")
    assert len(tuner.cache) == 1, f"autotuned {len(tuner.cache)} times: {list(tuner.cache)}"


@pytest.mark.parametrize("triton_version, numpy_version, usable", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.5.0", False), ("3.6.0", "2.3.0", False), ("3.6.0", "2.2.6", True),
    ("3.9.0", "2.4.6", True), ("3.7.0+git1234", "2.4.0", True), ("3.5.1", "1.26.4", True)])
def test_interpreter_rule_names_the_broken_version_pairs(monkeypatch, triton_version, numpy_version, usable):
    """Triton 3.6's interpreter with numpy >= 2.3 fails on every kernel that loops over a runtime bound (measured
    2026-12-01: torch 2.11 / Triton 3.6 / numpy 2.4.6, InterpreterError in the cross-entropy and sym_matmul kernels;
    numpy 2.2.6 and Triton 3.9 pass): there the interpreter tests skip with the reason, never pass silently."""
    import numpy

    if not _common.HAS_TRITON:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(_common.triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = _common.interpreter_unusable_reason()
    assert (reason is None) == usable
    if not usable:
        assert triton_version in reason and numpy_version in reason
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not kernels.triton_available("cpu")  # the ops take their references instead

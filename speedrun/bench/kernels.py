"""Benchmark the Triton ops of kernels/ against their eager and torch.compile'd references.

    speedrun bench kernels                  # needs a CUDA GPU; prints one markdown table
    speedrun bench kernels --compile-check  # no GPU needed: compiles every Triton kernel for an H100 (sm_90)
    speedrun bench kernels --compile-check --quick   # one variant of each kernel (used by the tests)

Shapes are the default model's: 65,536 tokens x width 512, vocabulary 1024, MLP hidden 1024, 8 query heads and
4 kv heads of 64, Newton-Schulz on 512x512 and 1024x512. Each row times forward + backward (Newton-Schulz: forward
only) with triton.testing.do_bench (median), and reports the Triton op's achieved bandwidth (memory-bound ops) or
throughput (matmul ops) against the H100 ceilings measured on one: 3.0 TB/s copy, 800 TFLOP/s bf16.
An op goes on by default (kernels.DEFAULT_ON) only if its Triton column beats its torch.compile column here.
"""

import argparse
import os
import sys
import time

# Timings of interpreted kernels mean nothing, and the compile check needs real (not interpreted) kernels.
os.environ["TRITON_INTERPRET"] = "0"

import torch

import kernels

H100_COPY_BYTES_PER_S = 3.0e12
H100_BF16_FLOP_PER_S = 800e12

TOKENS, WIDTH, VOCAB, MLP_HIDDEN = 65536, 512, 1024, 1024
Q_HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
SOFTCAP = 15.0  # a typical logit softcap; the cost does not depend on its value
NS_SHAPES = [(512, 512), (1024, 512)]


# --------------------------------------------------------------------------------------------------------------
# Benchmark cases: each builds its inputs and returns (label, run(op) -> callable, work, unit), where work is the
# minimum bytes moved (unit "GB/s") or the useful FLOPs (unit "TFLOP/s") of one forward + backward.


def _fwd_bwd(op, inputs, *args, **kwargs):
    """A closure running forward + backward of op(*inputs, *args) w.r.t. the float inputs that require grad."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = op(*inputs, *args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.grad(outs, leaves, grads)

    return run


def _cases(device):
    bf16 = dict(device=device, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, **bf16) * scale).requires_grad_(grad)

    targets = torch.randint(0, VOCAB, (TOKENS,), device=device, generator=g)

    logits = randn(TOKENS, VOCAB, scale=4.0)
    yield ("softcap_cross_entropy", f"[{TOKENS}, {VOCAB}]",
           lambda op: _fwd_bwd(op, (logits, targets), SOFTCAP),
           3 * TOKENS * VOCAB * 2, "GB/s")  # read logits twice, write grad_logits

    x = randn(TOKENS, WIDTH)
    # fp32, as the model passes its tied embedding: the fused op casts it for its bf16 matmuls and returns an fp32
    # gradient; the reference casts it too (x @ W.to(bf16).T).
    lm_head = (torch.randn(VOCAB, WIDTH, generator=g, device=device) * WIDTH**-0.5).requires_grad_(True)
    yield ("linear_softcap_cross_entropy", f"x [{TOKENS}, {WIDTH}] bf16, W [{VOCAB}, {WIDTH}] fp32",
           lambda op: _fwd_bwd(op, (x, lm_head, targets), SOFTCAP),
           6 * TOKENS * WIDTH * VOCAB, "TFLOP/s")  # logits, grad_x, grad_W (the fused op also recomputes the
    # logits and runs grad_W as two bf16 matmuls, high and low part, for an fp32-accurate gradient: 10 in all)

    w_up = randn(MLP_HIDDEN, WIDTH, scale=WIDTH**-0.5)
    yield ("relu2_linear", f"x [{TOKENS}, {WIDTH}], w [{MLP_HIDDEN}, {WIDTH}]",
           lambda op: _fwd_bwd(op, (x, w_up)),
           6 * TOKENS * WIDTH * MLP_HIDDEN, "TFLOP/s")

    yield ("rms_norm", f"[{TOKENS}, {WIDTH}]",
           lambda op: _fwd_bwd(op, (x,)),
           5 * TOKENS * WIDTH * 2, "GB/s")  # fwd: read x, write y; bwd: read x and grad_y, write grad_x

    q = randn(TOKENS, Q_HEADS, HEAD_DIM)
    k = randn(TOKENS, KV_HEADS, HEAD_DIM)
    angles = torch.rand(TOKENS, HEAD_DIM // 2, device=device, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    qk_bytes = TOKENS * (Q_HEADS + KV_HEADS) * HEAD_DIM * 2
    yield ("rotary_qk", f"q [{TOKENS}, {Q_HEADS}, {HEAD_DIM}], k [{TOKENS}, {KV_HEADS}, {HEAD_DIM}]",
           lambda op: _fwd_bwd(op, (q, k, cos, sin)),
           5 * qk_bytes + 2 * 2 * cos.numel() * 4, "GB/s")  # like rms_norm, plus cos/sin read in fwd and bwd

    for rows, cols in NS_SHAPES:
        grad = torch.randn(rows, cols, device=device, generator=g)
        m, n = min(rows, cols), max(rows, cols)
        yield ("newton_schulz", f"[{rows}, {cols}], 5 steps",
               lambda op, grad=grad: (lambda: op(grad)),
               5 * (4 * m * m * n + 2 * m**3), "TFLOP/s")  # per step: X X^T, A A, B X


def benchmark():
    from triton.testing import do_bench

    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; forward+backward, median ms (triton.testing.do_bench); "
          "speedup = compile ms / Triton ms (> 1: Triton faster)\n")
    print("| op | shape | Triton ms | eager ms | compile ms | speedup vs compile | Triton achieved |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    compiled_references = {}
    for name, shape, make_run, work, unit in _cases(device):
        reference = kernels.REFERENCES[name]
        if name not in compiled_references:
            compiled_references[name] = torch.compile(reference, dynamic=False)
        ms = {}
        for label, op in (("triton", kernels.OPS[name]), ("eager", reference), ("compile", compiled_references[name])):
            ms[label] = do_bench(make_run(op), return_mode="median")
        achieved = work / (ms["triton"] * 1e-3)
        if unit == "GB/s":
            rate = f"{achieved / 1e9:,.0f} GB/s ({achieved / H100_COPY_BYTES_PER_S:.0%} of 3.0 TB/s)"
        else:
            rate = f"{achieved / 1e12:,.0f} TFLOP/s ({achieved / H100_BF16_FLOP_PER_S:.0%} of 800)"
        print(f"| {name} | {shape} | {ms['triton']:.3f} | {ms['eager']:.3f} | {ms['compile']:.3f} "
              f"| {ms['compile'] / ms['triton']:.2f}x | {rate} |")


# --------------------------------------------------------------------------------------------------------------
# Compile check: every kernel, ahead of time, for an H100, without a GPU (Triton ships ptxas).


def _kernel_specs():
    """(kernel, example argument values by name, constexprs, options): pointers are given by dtype."""
    sce, r2, rn, rq, ns = (kernels.softcap_cross_entropy, kernels.relu2_linear, kernels.rms_norm, kernels.rotary_qk,
                           kernels.newton_schulz)
    bf16, fp32, i64 = torch.bfloat16, torch.float32, torch.int64

    for has_softcap in (True, False):
        ce = dict(IGNORE=-100, HAS_SOFTCAP=has_softcap, BLOCK_V=1024)
        yield sce._ce_forward_kernel, dict(
            logits_ptr=bf16, logits_row_stride=VOCAB, targets_ptr=i64, loss_ptr=fp32, lse_ptr=fp32,
            n_cols=VOCAB, softcap=SOFTCAP), ce, dict(num_warps=4)
        yield sce._ce_backward_kernel, dict(
            logits_ptr=bf16, logits_row_stride=VOCAB, targets_ptr=i64, lse_ptr=fp32, grad_loss_ptr=fp32,
            grad_loss_stride=1, grad_logits_ptr=bf16, grad_logits_row_stride=VOCAB, n_cols=VOCAB,
            softcap=SOFTCAP), ce, dict(num_warps=4)

    for config in r2._CUDA_CONFIGS:
        yield r2._relu2_matmul_kernel, dict(
            x_ptr=bf16, w_ptr=bf16, out_ptr=bf16, M=TOKENS, N=MLP_HIDDEN, K=WIDTH, stride_xm=WIDTH, stride_xk=1,
            stride_wn=WIDTH, stride_wk=1, stride_om=MLP_HIDDEN, stride_on=1), \
            dict(config.kwargs, DOT_PRECISION="tf32"), dict(num_warps=config.num_warps, num_stages=config.num_stages)
    yield r2._relu2_grad_kernel, dict(grad_out_ptr=bf16, out_ptr=bf16, grad_pre_ptr=bf16, n_elements=TOKENS * WIDTH), \
        dict(BLOCK=1024), dict(num_warps=4)

    for block_cols, single_pass in ((512, True), (256, False)):
        meta = dict(BLOCK_ROWS=8, BLOCK_COLS=block_cols, SINGLE_PASS=single_pass)
        yield rn._rms_norm_forward_kernel, dict(
            x_ptr=bf16, y_ptr=bf16, n_rows=TOKENS, n_cols=WIDTH, x_row_stride=WIDTH, y_row_stride=WIDTH, eps=1e-6), \
            meta, dict(num_warps=4)
        yield rn._rms_norm_backward_kernel, dict(
            x_ptr=bf16, grad_y_ptr=bf16, grad_x_ptr=bf16, n_rows=TOKENS, n_cols=WIDTH, x_row_stride=WIDTH,
            grad_y_row_stride=WIDTH, grad_x_row_stride=WIDTH, eps=1e-6), meta, dict(num_warps=4)

    rotary_args = dict(
        x_ptr=bf16, cos_ptr=fp32, sin_ptr=fp32, n_rows=TOKENS * Q_HEADS, n_heads=Q_HEADS, half_dim=HEAD_DIM // 2,
        stride_xt=Q_HEADS * HEAD_DIM, stride_xh=HEAD_DIM, stride_xd=1, stride_ct=HEAD_DIM // 2,
        stride_st=HEAD_DIM // 2, eps=1e-6)
    rotary_meta = dict(BLOCK_ROWS=64, BLOCK_HALF=HEAD_DIM // 2)
    yield rq._rms_rotary_forward_kernel, dict(rotary_args, out_ptr=bf16), rotary_meta, dict(num_warps=4)
    yield rq._rms_rotary_backward_kernel, dict(rotary_args, grad_out_ptr=bf16, grad_x_ptr=bf16), rotary_meta, \
        dict(num_warps=4)

    for config in ns._CUDA_CONFIGS:
        for has_add in (False, True):
            yield ns._sym_matmul_kernel, dict(
                x_ptr=bf16, add_ptr=bf16, out_ptr=bf16, M=512, K=1024, stride_xm=1024, stride_xk=1, stride_am=512,
                stride_an=1, stride_om=512, stride_on=1, alpha=1.0, beta=1.0), \
                dict(config.kwargs, HAS_ADD=has_add, DOT_PRECISION="tf32"), \
                dict(num_warps=config.num_warps, num_stages=config.num_stages)


def _type_name(value) -> str:
    if isinstance(value, torch.dtype):
        return "*" + {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}[value]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_check(arch: int, quick: bool = False) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    seen = set()
    for kernel, values, constexprs, options in _kernel_specs():
        if quick and kernel.__name__ in seen:
            continue  # --quick: one variant of each kernel
        seen.add(kernel.__name__)
        signature = {name: "constexpr" if name in constexprs else _type_name(values[name]) for name in kernel.arg_names}
        label = f"{kernel.__name__} {constexprs} {options}"
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            print(f"ok    {time.perf_counter() - start:5.1f}s  {label}")
        except Exception as error:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  {label}\n      {type(error).__name__}: {error}")
    print(f"{'all kernels compile' if not failures else f'{failures} kernel(s) failed'} for sm_{arch}")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="speedrun bench kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-check", action="store_true", help="compile every kernel for a GPU; no GPU needed")
    parser.add_argument("--quick", action="store_true", help="--compile-check only one variant of each kernel")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-check (90 = H100)")
    args = parser.parse_args(argv)
    if not kernels._common.HAS_TRITON:
        print("Triton is not installed: nothing to benchmark or compile.")
        return 0
    if args.compile_check:
        return compile_check(args.arch, quick=args.quick)
    if not torch.cuda.is_available():
        print("This benchmark needs a CUDA GPU (none found); nothing measured. "
              "(`--compile-check` checks that the kernels compile for an H100 without one.)")
        return 0
    benchmark()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plumbing shared by the op files: optional Triton import, the dispatch rule, output allocation, op registration.

Triton is optional: without it (e.g. a macOS laptop, where there are no Triton wheels) every op falls back to its
plain-torch reference, and the kernel definitions still import because `triton`/`tl` are then harmless stubs.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _TritonStub:
        """Stands in for `triton` and `triton.language` so that `@triton.jit` definitions and `tl.constexpr`
        annotations still evaluate at import time. Launching a kernel is never attempted without Triton."""

        constexpr = None

        def jit(self, fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        def autotune(self, *args, **kwargs):
            return lambda f: f

        def Config(self, *args, **kwargs):
            return None

    triton = _TritonStub()
    tl = _TritonStub()


def interpreter_requested() -> bool:
    """TRITON_INTERPRET as set right now (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_unusable_reason() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels with the installed versions, or None when it can. Triton
    3.6's interpreter turns a size-1 array into a Python int where a kernel loops over a runtime bound
    (`range(0, n_cols, BLOCK)`), which numpy >= 2.3 refuses (TypeError: only 0-dimensional arrays can be converted
    to Python scalars); Triton 3.9 with numpy 2.4 and Triton 3.6 with numpy 2.2 both work. Compiled kernels on a GPU
    never use the interpreter."""
    if not HAS_TRITON:
        return None
    import numpy

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {numpy.__version__} "
                "(needs Triton >= 3.7 or numpy < 2.3); the ops fall back to their references on CPUs")
    return None


# @triton.jit decides between compiled and interpreted kernels when it runs, i.e. when the op modules are imported.
# CPU tensors can only go through Triton if the kernels were built for the interpreter.
KERNELS_INTERPRETED = HAS_TRITON and interpreter_requested()


def triton_available(device) -> bool:
    """Whether the Triton path of the ops can run on `device` (a torch.device or a string such as "cuda:0")."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return KERNELS_INTERPRETED and interpreter_requested() and interpreter_unusable_reason() is None
    return False


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatch rule of every public op: Triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1."""
    return triton_available(tensor.device)


def empty_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fully overwrites is allocated here, so tests can poison them all (fill with NaN) by
    replacing this one function, and an element a kernel forgets to write cannot pass unnoticed."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee", not tf32) so fp32 results match fp32 references; for 16-bit
    operands the setting has no effect."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Every Triton launch happens inside a `torch.library.custom_op` named LIBRARY::<name> (torch.ops.kernels.<name>), with
# a fake implementation that gives shapes/dtypes without running anything and, for ops with gradients, a registered
# backward made of further custom ops. torch.compile(fullgraph=True) then traces the public ops without a graph break:
# Dynamo and AOTAutograd see one opaque node per op, and the compiled graph calls exactly the Python launch code that
# the eager tests run. (`torch.library.triton_op` would let Inductor re-generate the launches itself; opaque ops keep
# one launch path for eager, compiled, CUDA and the interpreter, and work under Inductor on CPU tensors too.)
LIBRARY = "kernels"


def op_name(name: str) -> str:
    return f"{LIBRARY}::{name}"

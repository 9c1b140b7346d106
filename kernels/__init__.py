"""Fused Triton ops for train_gpt.py. Each op file holds a plain-torch `reference`, the Triton kernels, their
registration as torch.library custom ops (torch.ops.kernels.*, with fake implementations and registered backwards, so
torch.compile(fullgraph=True) traces every op without a graph break), and the public function, which runs Triton on
CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and the reference otherwise. See kernels/README.md."""

import importlib

from kernels._common import triton_available
from kernels.newton_schulz import newton_schulz
from kernels.relu2_linear import relu2_linear
from kernels.rms_norm import rms_norm
from kernels.rotary_qk import rotary_qk
from kernels.softcap_cross_entropy import linear_softcap_cross_entropy, softcap_cross_entropy

OPS = {
    "softcap_cross_entropy": softcap_cross_entropy,
    "linear_softcap_cross_entropy": linear_softcap_cross_entropy,
    "relu2_linear": relu2_linear,
    "rms_norm": rms_norm,
    "rotary_qk": rotary_qk,
    "newton_schulz": newton_schulz,
}

# Plain-torch reference of each op. (Each module is named after its op, so `kernels.rms_norm` is the function;
# reach a module itself with importlib.import_module("kernels.rms_norm").)
_MODULES = {name: importlib.import_module(f"kernels.{name}") for name in OPS if name != "linear_softcap_cross_entropy"}
REFERENCES = {name: module.reference for name, module in _MODULES.items()}
REFERENCES["linear_softcap_cross_entropy"] = _MODULES["softcap_cross_entropy"].linear_reference

# An op is on by default only once tools/bench_kernels.py has measured it faster than torch.compile of its
# reference on an H100. Nothing has been measured on a GPU yet, so every op is off.
DEFAULT_ON = {
    "softcap_cross_entropy": False,
    "linear_softcap_cross_entropy": False,
    "relu2_linear": False,
    "rms_norm": False,
    "rotary_qk": False,
    "newton_schulz": False,
}

__all__ = ["OPS", "REFERENCES", "DEFAULT_ON", "triton_available", *OPS]

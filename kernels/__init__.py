"""Fused Triton ops for train_gpt.py. Each op file holds a plain-torch `reference`, the Triton kernels, their
registration as torch.library custom ops (torch.ops.kernels.*, with fake implementations and registered backwards, so
torch.compile(fullgraph=True) traces every op without a graph break), and the public function, which runs Triton on
CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and the reference otherwise. train_gpt.py uses none of them
unless FUSED names them (FUSED=1: all). See kernels/README.md."""

import kernels.newton_schulz
import kernels.relu2_linear
import kernels.rms_norm
import kernels.rotary_qk
import kernels.softcap_cross_entropy
from kernels._common import triton_available

# The public ops are exported as fused_<op>, so that `kernels.<op>` stays the op's module (with its `reference`).
fused_softcap_cross_entropy = kernels.softcap_cross_entropy.softcap_cross_entropy
fused_linear_softcap_cross_entropy = kernels.softcap_cross_entropy.linear_softcap_cross_entropy
fused_relu2_linear = kernels.relu2_linear.relu2_linear
fused_rms_norm = kernels.rms_norm.rms_norm
fused_rotary_qk = kernels.rotary_qk.rotary_qk
fused_newton_schulz = kernels.newton_schulz.newton_schulz

OPS = {
    "softcap_cross_entropy": fused_softcap_cross_entropy,
    "linear_softcap_cross_entropy": fused_linear_softcap_cross_entropy,
    "relu2_linear": fused_relu2_linear,
    "rms_norm": fused_rms_norm,
    "rotary_qk": fused_rotary_qk,
    "newton_schulz": fused_newton_schulz,
}

# The plain-torch reference of each op.
REFERENCES = {
    "softcap_cross_entropy": kernels.softcap_cross_entropy.reference,
    "linear_softcap_cross_entropy": kernels.softcap_cross_entropy.linear_reference,
    "relu2_linear": kernels.relu2_linear.reference,
    "rms_norm": kernels.rms_norm.reference,
    "rotary_qk": kernels.rotary_qk.reference,
    "newton_schulz": kernels.newton_schulz.reference,
}

__all__ = ["OPS", "REFERENCES", "triton_available", *(f"fused_{name}" for name in OPS)]

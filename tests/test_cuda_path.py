"""What the CUDA path needs, shown on a CPU (issue 10): attention gets one dtype under torch >= 2.12's autocast policy,
backends are called the way their sources define them, compiled training never recompiles after warm-up, the loader and
the optimizers keep the host off the critical path, and every rank makes the same update."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_eval_modes import small_dir, tiny_model, val  # noqa: F401  (shared fixtures: a small validation set)

import eval_ttt
import train_gpt as tg

# ----------------------------------------------------------------------------------------------------------------------
# 1. one dtype reaches attention, whatever the norm returns


@pytest.fixture
def cuda_autocast_policy(monkeypatch):
    """Emulate CUDA bf16 autocast of torch >= 2.12 on the CPU: matmuls in bf16, and rms_norm on autocast's fp32 list
    (a bf16 input comes back fp32). Records the dtypes every attention call receives."""
    seen = []
    plain_rms_norm = F.rms_norm

    def fp32_rms_norm(x, *args, **kwargs):
        return plain_rms_norm(x.float() if x.dtype == torch.bfloat16 else x, *args, **kwargs)

    def recording_attention(q, k, v, cu_seqlens, max_seqlen):
        seen.append((q.dtype, k.dtype, v.dtype))
        return tg.varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen)

    def recording_rows(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return plain_sdpa(q, k, v)

    plain_sdpa = tg.sdpa_causal
    monkeypatch.setattr(F, "rms_norm", fp32_rms_norm)
    monkeypatch.setattr(tg, "_varlen_attention", recording_attention)
    monkeypatch.setattr(tg, "sdpa_causal", recording_rows)
    monkeypatch.setattr(tg, "autocast_context",
                        lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    return seen


def test_policy_emulation_really_returns_fp32(cuda_autocast_policy):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert F.rms_norm(x, (8,)).dtype == torch.float32  # otherwise the tests below prove nothing


def assert_one_dtype(seen):
    assert seen, "attention was never called"
    assert all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), sorted(set(seen))


def test_training_forward_hands_attention_one_dtype(cuda_autocast_policy):
    model = tiny_model().train().requires_grad_(True)
    ids = torch.randint(4, 64, (1, 40))
    with tg.autocast_context(ids.device):
        losses = model(ids, torch.roll(ids, -1, 1), torch.tensor([0, 12, 40], dtype=torch.int32), 40)
    losses.sum().backward()
    assert_one_dtype(cuda_autocast_policy)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_evaluate_hands_attention_one_dtype(cuda_autocast_policy, val):  # noqa: F811
    result = tg.evaluate(tiny_model(), val, "strided", 64, 32, 512)
    assert_one_dtype(cuda_autocast_policy)
    assert np.isfinite(result.bpb)


def test_ttt_hands_attention_one_dtype(cuda_autocast_policy, val):  # noqa: F811
    cfg = eval_ttt.TTTConfig(window=64, chunk=16, lora_rank=4, doc_batch=3)
    result = eval_ttt.ttt_evaluate(tiny_model(), val, cfg)
    assert_one_dtype(cuda_autocast_policy)
    assert np.isfinite(result.bpb)

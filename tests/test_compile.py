"""The one deliberate torch.compile test on CPU (compiling costs tens of seconds on 2 cores; every other CPU test runs
eagerly). GPU runs compile the model by default, with its bf16 autocast inside its forward (GPT.precision), so the
model code must trace without graph breaks, autocast included. And the attention a run trains and evaluates with:
ATTN_BACKEND=masked_sdpa trains with the masked SDPA (the one that compiles) and evaluates with the reference, and
its log says so."""

import dataclasses
import os
import re
import signal

import pytest
import torch

import train_gpt as tg
from kernels import attention as attn


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_compiled_model_matches_eager_forward_and_backward(autocast):
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2),
                   tg.Kernels(autocast=autocast))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 64, (2, 24))
    targets = torch.roll(ids, -1, 1)
    tolerance = dict(rtol=1e-5, atol=1e-5) if autocast is None else dict(rtol=2e-2, atol=2e-2)

    eager_losses = model(ids, targets)
    eager_losses.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # fullgraph: a graph break is an error
    compiled_losses = compiled(ids, targets)
    compiled_losses.sum().backward()
    assert compiled_losses.dtype == torch.float32
    torch.testing.assert_close(compiled_losses, eager_losses, **tolerance)
    for name, grad in eager_grads.items():
        if autocast is None:
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
        else:  # bf16 matmuls: compare against the gradient's own scale
            error = (dict(model.named_parameters())[name].grad - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
            assert error <= 3e-2, f"gradient of {name}: {error:.1e}"


# ----------------------------------------------------------------------------------------------------------------------
# masked_sdpa trains, the reference evaluates; the log names both


def test_masked_sdpa_trains_with_itself_and_evaluates_with_the_reference():
    """choose_kernels(ATTN_BACKEND=masked_sdpa): training attention masked_sdpa, evaluation attention the reference;
    the model calls kernels.attention in training mode and kernels.eval_attention in eval mode."""
    chosen = tg.choose_kernels(frozenset(), "masked_sdpa", "cpu", compiling=True)
    assert (chosen.attention.name, chosen.eval_attention.name) == ("masked_sdpa", "reference")
    assert tg.attention_line(chosen, gist=False) == "attention_backend: masked_sdpa evaluation:reference"
    plain = tg.choose_kernels(frozenset(), "reference", "cpu")
    assert tg.attention_line(plain, gist=False) == "attention_backend: reference"
    assert tg.attention_line(tg.choose_kernels(frozenset(), "auto", "cpu", compiling=True), gist=False) == \
        "attention_backend: masked_sdpa evaluation:reference"

    calls = []

    def spy(name, backend):
        def attention(q, k, v, cu_seqlens, max_seqlen):
            calls.append(name)
            return backend(q, k, v, cu_seqlens, max_seqlen)
        return attn.VarlenAttention(name, attention)

    model_kernels = dataclasses.replace(chosen, attention=spy("masked_sdpa", chosen.attention),
                                        eval_attention=spy("reference", chosen.eval_attention))
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1),
                   model_kernels)
    ids = torch.randint(4, 64, (1, 30))
    cu = torch.tensor([0, 9, 30, 30], dtype=torch.int32)
    train_losses = model.train()(ids, torch.roll(ids, -1, 1), cu, 21)
    assert calls == ["masked_sdpa"] * 2  # one call per block
    calls.clear()
    with torch.no_grad():
        eval_losses = model.eval()(ids, torch.roll(ids, -1, 1), cu, 21)
    assert calls == ["reference"] * 2
    torch.testing.assert_close(eval_losses, train_losses.detach(), rtol=1e-5, atol=1e-5)  # the same attention


def run_main(monkeypatch, env: dict) -> int:
    """train_gpt.main() in this process with exactly these settings (no other run setting from the environment)."""
    for name in tg.Hyperparameters.env_overrides():
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        return tg.main()
    finally:
        signal.signal(signal.SIGTERM, handler)


TINY_RUN = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64",
            "TRAIN_BATCH_TOKENS": "256", "TRAIN_MICRO_BATCHES": "2", "ITERATIONS": "2", "WARMUP_STEPS": "0",
            "WARMDOWN_ITERS": "1", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "VAL_MAX_DOCS": "2",
            "EVAL_MODES": "flat", "EVAL_BATCH_TOKENS": "1024", "COMPILE": "0", "TRAIN_LOG_EVERY": "1"}


def test_a_masked_sdpa_run_logs_what_ran(sample_data, tmp_path, monkeypatch):
    """A run with ATTN_BACKEND=masked_sdpa: every training step runs masked_sdpa, every evaluation forward the
    reference, and the log's attention_backend line says exactly that."""
    phase = {"evaluating": False}
    calls = {"masked_sdpa": set(), "reference": set()}
    plain_masked, plain_evaluate = attn.varlen_attention_masked, tg.evaluate

    def masked(*args):
        calls["masked_sdpa"].add(phase["evaluating"])
        return plain_masked(*args)

    def reference(*args):
        calls["reference"].add(phase["evaluating"])
        return attn.varlen_attention_reference(*args)

    def evaluate(*args, **kwargs):
        phase["evaluating"] = True
        try:
            return plain_evaluate(*args, **kwargs)
        finally:
            phase["evaluating"] = False

    monkeypatch.setattr(attn, "varlen_attention_masked", masked)  # what load_varlen_backend("masked_sdpa") returns
    monkeypatch.setattr(tg, "REFERENCE_VARLEN", attn.VarlenAttention("reference", reference))
    monkeypatch.setattr(tg, "evaluate", evaluate)
    code = run_main(monkeypatch, {**TINY_RUN, "DATA_PATH": str(sample_data), "RUN_ID": "masked",
                                  "LOG_DIR": str(tmp_path), "CHECKPOINT_DIR": str(tmp_path),
                                  "ATTN_BACKEND": "masked_sdpa"})
    assert code == 0
    log = (tmp_path / "masked.txt").read_text()
    assert re.findall(r"^attention_backend: .*$", log, re.M) == ["attention_backend: masked_sdpa evaluation:reference"]
    assert calls == {"masked_sdpa": {False}, "reference": {True}}  # training: masked only; evaluation: reference only
    assert re.search(r"^final_eval mode:flat .* val_bpb:[0-9.]+ ", log, re.M)

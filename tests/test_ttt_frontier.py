"""eval_ttt.py's frontier TTT (parameter-golf #1855): AdamW with beta1 = 0 and decoupled weight decay against
torch.optim.AdamW, the alpha / r scale, the resets at a document boundary (B zero, A warm or A0, AdamW state cleared),
an adapter per virtual layer of a looped model, the whole batched loop against slow_lane (which also pins that a
document's last chunk is never trained on), phased mode (global SGD at its thresholds, against a slow loop with
torch.optim.SGD and clip_grad_norm_; the weights given back), the causality audit (every mode passes, the illegal
variants are caught, on the command line too), labels and bad arguments, and 1 vs 2 processes."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import eval_ttt
import train_gpt as tg
from data.loader import IGNORE_INDEX
from eval_ttt import EvalSpec
from kernels.artifact import encode_artifact
from test_eval_modes import model, one_thread, small_dir, tiny_model, val  # noqa: F401  (the same fixtures)
from test_eval_ttt import checkpoint, one_and_two_processes, run_cli, slow_lane  # noqa: F401
from test_gist import gist_model

CPU = torch.device("cpu")
FRONTIER = EvalSpec(mode="ttt", window=64, chunk=16, lora_rank=4, lora_lr=0.005, lora_alpha=8.0, beta1=0.0, beta2=0.99,
                    weight_decay=0.5, warm_a=True, virtual_layers=True, doc_batch=2,
                    lora_targets=("q", "k", "v", "o", "mlp", "head"))
PHASED = dataclasses.replace(FRONTIER, mode="phased", phase_docs=(2, 4, 100), global_lr=0.05, global_chunk=256,
                             global_clip=0.5, batch_tokens=300)


@pytest.fixture(scope="module")
def looped() -> tg.GPT:
    """The tiny model with depth recurrence: block 1 runs three times (virtual layers 0 1 1 1)."""
    net = tiny_model(1, recur_layers="1", recur_loops=2)
    assert net.loop_order == (0, 1, 1, 1)
    return net


def losses_of(model, val, spec: EvalSpec, process=None) -> dict:
    return eval_ttt.evaluate(model, val, spec, process=process, keep_token_losses=True).token_losses


# ----------------------------------------------------------------------------------------------------------------------
# formulas


@pytest.mark.parametrize("beta1, weight_decay, lr", [(0.0, 0.5, 0.01), (0.9, 0.1, 0.003), (0.0, 0.0, 0.02)])
def test_adamw_step_is_torch_adamw_per_slot(beta1, weight_decay, lr):
    """BatchedLoRA.step on fresh random gradients: each slot moves as its own torch.optim.AdamW would (decoupled
    weight decay p *= 1 - lr * wd, bias correction by the slot's own step count; beta1 = 0: no first moment)."""
    spec = EvalSpec(mode="ttt", window=8, chunk=4, lora_rank=3, lora_lr=lr, beta1=beta1, beta2=0.99,
                    weight_decay=weight_decay)
    lora = eval_ttt.BatchedLoRA({"x": (5, 4)}, spec, 3, CPU)
    generator = torch.Generator().manual_seed(1)
    for p in lora.params.values():
        p.copy_(torch.randn(p.shape, generator=generator))
    reference = [{k: p[s].clone().requires_grad_() for k, p in lora.params.items()} for s in range(3)]
    optimizers = [torch.optim.AdamW(list(r.values()), lr=lr, betas=(beta1, 0.99), eps=spec.eps,
                                    weight_decay=weight_decay) for r in reference]
    for step, slots in enumerate([[0, 1, 2], [2, 0], [1, 2], [2]]):  # slots step unevenly
        grads = {k: torch.randn((len(slots), *p.shape[1:]), generator=generator) for k, p in lora.params.items()}
        lora.select(torch.tensor(slots))
        lora.step(sum((lora.live[k] * g).sum() for k, g in grads.items()), list(range(len(slots))))
        for i, s in enumerate(slots):
            for k, p in reference[s].items():
                p.grad = grads[k][i].clone()
            optimizers[s].step()
        for s in range(3):
            for k, p in reference[s].items():
                torch.testing.assert_close(lora.params[k][s], p.detach(), rtol=1e-6, atol=1e-6)


def test_adapters_output_alpha_over_rank(model):
    shapes = eval_ttt.lora_shapes(model, ("q", "head"))
    x = torch.randn(2, 5, model.config.model_dim)
    outputs = {}
    for alpha in (0.0, 8.0, 144.0):
        lora = eval_ttt.BatchedLoRA(shapes, dataclasses.replace(FRONTIER, lora_alpha=alpha, virtual_layers=False),
                                    2, CPU)
        generator = torch.Generator().manual_seed(0)
        for key, p in lora.params.items():
            p.copy_(torch.randn(p.shape, generator=generator))
        lora.select(torch.tensor([1, 0]))
        a, b = lora.live["blocks.0.attn.q.A"], lora.live["blocks.0.attn.q.B"]
        plain = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        lora.calls = {"blocks.0.attn.q": 0}
        outputs[alpha] = lora.delta("blocks.0.attn.q", x)
        rows = torch.tensor([0, 0, 1])
        head = lora.head_delta(x[rows, [0, 3, 2]], rows)
        ha, hb = lora.live["head.A"], lora.live["head.B"]
        scale = alpha / 4 if alpha else 1.0
        torch.testing.assert_close(head, torch.stack([x[r, c] @ ha[r].T @ hb[r].T for r, c in
                                                      zip(rows.tolist(), [0, 3, 2])]) * scale,
                                   rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(outputs[alpha], plain * scale, rtol=1e-5, atol=1e-4)
    assert torch.equal(outputs[0.0], plain.detach())  # no alpha: the plain product, bit for bit


@pytest.mark.parametrize("warm_a", [False, True])
def test_a_new_document_zeroes_b_and_adamw_and_keeps_a_only_when_warm(model, warm_a):
    spec = dataclasses.replace(FRONTIER, warm_a=warm_a, virtual_layers=False)
    lora = eval_ttt.BatchedLoRA(eval_ttt.lora_shapes(model, ("q", "head")), spec, 2, CPU)
    for _ in range(2):  # two steps of both slots on random gradients
        lora.select(torch.tensor([0, 1]))
        lora.step(sum((p * torch.randn(p.shape)).sum() for p in lora.live.values()), [0, 1])
    before = {k: p.clone() for k, p in lora.params.items()}
    lora.reset(1)
    for key, p in lora.params.items():
        assert torch.equal(p[0], before[key][0])  # the other slot is untouched
        assert lora.exp_avg[key][1].abs().sum() == 0 and lora.exp_avg_sq[key][1].abs().sum() == 0
        assert lora.exp_avg_sq[key][0].abs().sum() > 0
        if key.endswith(".B"):
            assert p[1].abs().sum() == 0 and before[key][1].abs().sum() > 0
        else:
            assert not torch.equal(before[key][1], lora.a0[key[:-2]])  # A did train
            assert torch.equal(p[1], before[key][1] if warm_a else lora.a0[key[:-2]])
    assert lora.steps.tolist() == [2, 0]


# ----------------------------------------------------------------------------------------------------------------------
# an adapter per virtual layer


def test_each_virtual_layer_has_its_own_adapter(looped):
    shared = eval_ttt.lora_shapes(looped, ("q",))
    own = eval_ttt.lora_shapes(looped, ("q",), virtual_layers=True)
    assert sorted(shared) == ["blocks.0.attn.q", "blocks.1.attn.q"]
    assert sorted(own) == ["blocks.0.attn.q", "blocks.1.attn.q", "blocks.1.attn.q@1", "blocks.1.attn.q@2"]
    spec = EvalSpec(mode="ttt", window=32, chunk=8, lora_rank=4, lora_targets=("q",), virtual_layers=True)
    tokens = torch.randint(4, 1024, (1, 24), generator=torch.Generator().manual_seed(0))
    base = looped(tokens, tokens)
    layer = looped.adaptable_linears()["blocks.1.attn.q"]
    outputs = {}
    for call, name in enumerate(["blocks.1.attn.q", "blocks.1.attn.q@1", "blocks.1.attn.q@2"]):
        lora = eval_ttt.BatchedLoRA(own, spec, 1, CPU)
        lora.params[f"{name}.B"].normal_(0, 0.5)  # only this virtual layer's adapter does anything
        lora.select(torch.tensor([0]))
        outputs[name] = eval_ttt.adapted_losses(looped, lora, tokens, tokens).detach()
        # the same adapter added by hand on the call-th call of block 1's q projection only
        a, b = lora.live[f"{name}.A"].detach()[0], lora.live[f"{name}.B"].detach()[0]
        seen = []

        def on_call(module, args, out, call=call, a=a, b=b):
            seen.append(None)
            return out + args[0] @ a.T @ b.T if len(seen) - 1 == call else out

        handle = layer.register_forward_hook(on_call)
        try:
            expected = looped(tokens, tokens)
        finally:
            handle.remove()
        assert len(seen) == 3
        torch.testing.assert_close(outputs[name], expected, rtol=1e-5, atol=1e-5)
    names = list(outputs)
    for i, first in enumerate(names):
        assert (outputs[first] - base).abs().mean() > 1e-3
        for second in names[i + 1:]:
            assert (outputs[first] - outputs[second]).abs().mean() > 1e-3, (first, second)


def test_frontier_ttt_matches_slow_lanes(looped, val):
    """The batched loop with every frontier setting (AdamW beta1 0 with weight decay, alpha / r, warm A, an adapter per
    virtual layer, on a looped model) scores each slot's documents as slow_lane does with the same documents in the
    same order (lane_queues over the scoring order). Warm A carries what a document's chunks trained into the next
    document, so slow_lane's "no step on the last chunk" is checked here too. (beta1 = 0 makes a step nearly the sign
    of the gradient, so the rounding differences of batched fp32 grow step by step: up to 4.5e-4 nats here at lr
    0.005; at lr 0.02 they grow chaotically over a slot's third document. A step on a last chunk, a shared virtual
    layer or a cold A move scores by 1e-2 and more.)"""
    losses = losses_of(looped, val, FRONTIER)
    order = eval_ttt.scoring_order(val, FRONTIER)
    queues = eval_ttt.lane_queues([int(val.token_counts[d]) for d in order], FRONTIER.doc_batch, FRONTIER.chunk)
    assert [len(q) for q in queues] == [3, 3]
    cold = losses_of(looped, val, dataclasses.replace(FRONTIER, warm_a=False))
    for queue in queues:
        docs = [order[i] for i in queue]
        for d, expected in zip(docs, slow_lane(looped, [val.document(d) for d in docs], FRONTIER)):
            np.testing.assert_allclose(losses[d], expected, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(losses[docs[0]], cold[docs[0]])  # a slot's first document starts from A0
        assert np.abs(losses[docs[1]] - cold[docs[1]]).mean() > 1e-3  # the next ones start from a trained A
    assert EvalSpec(mode="ttt").documents == "per-document" and FRONTIER.documents == "cross-document"


def test_virtual_layers_change_nothing_without_recurrence(model, val):
    """A model without depth recurrence calls each projection once: one adapter each, the same scores bit for bit."""
    spec = dataclasses.replace(FRONTIER, warm_a=False, virtual_layers=False)
    plain = losses_of(model, val.subset([0, 3]), spec)
    per_layer = losses_of(model, val.subset([0, 3]), dataclasses.replace(spec, virtual_layers=True))
    for k in plain:
        np.testing.assert_array_equal(plain[k], per_layer[k])


# ----------------------------------------------------------------------------------------------------------------------
# phased: global adaptation at the thresholds


def test_cosine_lr_over_the_chunks():
    assert [eval_ttt.cosine_lr(1e-3, c, 4) for c in range(4)] == pytest.approx(
        [1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 0.5e-3, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert eval_ttt.cosine_lr(1e-3, 0, 1) == 1e-3  # a phase of one chunk takes its step at the full rate


def slow_global_sgd(net: tg.GPT, val, docs: list[int], spec: EvalSpec) -> None:
    """The obvious loop: the documents' (input, target) pairs back to back, every global_chunk of them one step of
    torch.optim.SGD (momentum) at lr * (1 + cos(pi * step / steps)) / 2 on their mean loss, the gradient clipped by
    clip_grad_norm_; each document's pairs within a chunk read in windows of at most W from the chunk's start, one
    forward per window."""
    pairs = [(d, i) for d in docs for i in range(int(val.token_counts[d]))]
    chunks = [pairs[i: i + spec.global_chunk] for i in range(0, len(pairs), spec.global_chunk)]
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=spec.global_lr, momentum=spec.global_momentum)
    net.requires_grad_(True)
    for step, chunk in enumerate(chunks):
        optimizer.zero_grad()
        loss = 0.0
        for d in dict.fromkeys(d for d, _ in chunk):
            positions = [i for e, i in chunk if e == d]
            tokens = torch.from_numpy(val.document(d).astype(np.int64))
            for lo in range(positions[0], positions[-1] + 1, spec.window):
                hi = min(lo + spec.window, positions[-1] + 1)
                loss = loss + net(tokens[lo:hi][None], tokens[lo + 1: hi + 1][None]).sum()
        (loss / len(chunk)).backward()
        torch.nn.utils.clip_grad_norm_(params, spec.global_clip)
        for group in optimizer.param_groups:
            group["lr"] = spec.global_lr * 0.5 * (1 + math.cos(math.pi * step / len(chunks)))
        optimizer.step()
    net.requires_grad_(False)


def test_global_adaptation_is_sgd_with_momentum_clipping_and_cosine(val):
    docs = [4, 0, 2]  # 409 + 320 + 255 tokens: 4 chunks of 256 (windows of 64 cut at chunk boundaries)
    fast, slow = tiny_model(3), tiny_model(3)
    before = [p.clone() for p in fast.parameters()]
    info = eval_ttt.global_adaptation(fast, val, docs, PHASED)
    slow_global_sgd(slow, val, docs, PHASED)
    assert info["steps"] == 4 and info["tokens"] == 984 and info["docs"] == 3
    moved = 0.0
    for p, q, b in zip(fast.parameters(), slow.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((p - b).abs().max()))
    assert moved > 1e-3 and not any(p.requires_grad or p.grad is not None for p in fast.parameters())


def test_phases_run_at_their_thresholds_on_the_documents_scored_so_far(looped, val, monkeypatch):
    """phase_docs (2, 4, 100) over 6 documents: the slots run order[:2], then global steps on order[:2], then
    order[2:4], steps on order[:4], then the rest (100 is past the end: no phase). The model's weights are given back
    after the evaluation."""
    events = []
    run_slots, global_adaptation = eval_ttt.run_slots, eval_ttt.global_adaptation
    monkeypatch.setattr(eval_ttt, "run_slots", lambda model, data, queues, *a: events.append(
        ("score", sorted(d for q in queues for d in q))) or run_slots(model, data, queues, *a))
    monkeypatch.setattr(eval_ttt, "global_adaptation", lambda model, data, docs, *a: events.append(
        ("train", list(docs))) or global_adaptation(model, data, docs, *a))
    before = [p.clone() for p in looped.parameters()]
    result = eval_ttt.evaluate(looped, val, PHASED, keep_token_losses=True)
    order = eval_ttt.scoring_order(val, PHASED)
    assert order == [4, 0, 2, 1, 5, 3]
    assert events == [("score", sorted(order[:2])), ("train", order[:2]), ("score", sorted(order[2:4])),
                      ("train", order[:4]), ("score", sorted(order[4:]))]
    assert [p["docs"] for p in result.phases] == [2, 4]
    assert all(torch.equal(p, b) for p, b in zip(looped.parameters(), before))
    # before the first phase, the scores are those of global steps that change nothing (lr 0; the same slots: bit for
    # bit); after it, they differ
    still = losses_of(looped, val, dataclasses.replace(PHASED, global_lr=0.0))
    for d in order[:2]:
        np.testing.assert_array_equal(result.token_losses[d], still[d])
    for d in order[2:]:
        assert np.abs(result.token_losses[d] - still[d]).mean() > 1e-3


def test_after_a_phase_ttt_starts_fresh_on_the_adapted_weights(model, val):
    """Phased (cold A) scores of the documents after the first threshold are ttt's scores of the model adapted on the
    documents before it."""
    spec = dataclasses.replace(PHASED, warm_a=False, phase_docs=(3,))
    phased = losses_of(model, val, spec)
    order = eval_ttt.scoring_order(val, spec)
    adapted = copy.deepcopy(model)
    eval_ttt.global_adaptation(adapted, val, order[:3], spec)
    later = losses_of(adapted, val.subset(order[3:]), dataclasses.replace(spec, mode="ttt"))
    for i, d in enumerate(order[3:]):
        np.testing.assert_allclose(phased[d], later[i], rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------------
# the causality audit


CAUSAL_SPECS = {
    "flat": EvalSpec(mode="flat", window=48, batch_tokens=4096),
    "strided": EvalSpec(mode="strided", window=64, stride=16, batch_tokens=4096),
    "ttt": EvalSpec(mode="ttt", window=64, chunk=16, lora_rank=4, lora_lr=0.05, doc_batch=4),
    "ttt_frontier": FRONTIER,
    "phased": PHASED,
}


@pytest.mark.parametrize("name", list(CAUSAL_SPECS))
def test_every_mode_passes_the_causality_check(looped, val, name):
    ok, message = eval_ttt.check_causality(looped, val, CAUSAL_SPECS[name])
    assert ok, message
    assert message.startswith(f"causality ok: mode:{CAUSAL_SPECS[name].mode} ")
    assert "perturbed_docs_changed:3/3" in message  # the cut document and the two after it did change


def test_gist_mode_passes_the_causality_check(val):
    ok, message = eval_ttt.check_causality(gist_model(), val, EvalSpec(mode="gist", window=64))
    assert ok, message


def train_then_score(monkeypatch) -> None:
    """The illegal variant: every chunk is first trained on (one step on its own loss), then scored."""
    adapted_losses = eval_ttt.adapted_losses

    def illegal(model, lora, inputs, targets):
        with torch.enable_grad():
            losses = adapted_losses(model, lora, inputs, targets)
            per_row = losses.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)
            lora.step(per_row.sum(), list(range(len(inputs))))
        lora.select(lora.index)
        return adapted_losses(model, lora, inputs, targets)

    monkeypatch.setattr(eval_ttt, "adapted_losses", illegal)


@pytest.mark.parametrize("name", ["ttt", "ttt_frontier", "phased"])
def test_training_on_a_chunk_before_scoring_it_is_caught(looped, val, monkeypatch, name):
    spec = CAUSAL_SPECS[name]
    perturbed, cut_doc, cut = eval_ttt.perturb_tail(val, spec, 1024)
    train_then_score(monkeypatch)
    ok, message = eval_ttt.check_causality(looped, val, spec)
    assert not ok and message.startswith(f"causality CHANGED: mode:{spec.mode} doc:{cut_doc} position:")
    position = int(message.split("position:")[1].split()[0])
    assert cut // spec.chunk * spec.chunk <= position < cut  # in the cut chunk, before the cut


def test_global_steps_on_unscored_documents_are_caught(looped, val, monkeypatch):
    global_adaptation = eval_ttt.global_adaptation
    monkeypatch.setattr(eval_ttt, "global_adaptation", lambda model, data, docs, spec, process: global_adaptation(
        model, data, eval_ttt.scoring_order(data, spec), spec, process))  # every document, scored or not
    ok, message = eval_ttt.check_causality(looped, val, PHASED)
    order = eval_ttt.scoring_order(val, PHASED)
    assert not ok and f" doc:{order[2]} position:0 " in message  # the first document after the first phase


def test_check_causality_command_on_a_checkpoint_and_an_artifact(model, checkpoint, tmp_path, capsys, monkeypatch):
    state = torch.load(checkpoint, weights_only=False)
    meta = {key: state[key] for key in ("hyperparameters", "model_config", "tokenizer_sha256", "tokenizer_path",
                                        "data_path")}
    artifact = tmp_path / "tiny.ptz"
    artifact.write_bytes(encode_artifact(model.state_dict(), "int8_zlib", meta))
    argv = ["--mode", "phased", "--window", "64", "--chunk", "16", "--lora-rank", "4", "--doc-batch", "2",
            "--phase-docs", "2,4", "--global-chunk", "256", "--warm-a", "1", "--check-causality"]
    for path in (checkpoint, artifact):
        code, stdout, err = run_cli(capsys, "--checkpoint", path, *argv)
        assert code == 0, err
        assert stdout.startswith("causality ok: mode:phased documents:cross-document docs:6 "), stdout
    train_then_score(monkeypatch)
    code, stdout, err = run_cli(capsys, "--checkpoint", artifact, *argv)
    assert code == 1 and stdout.startswith("causality CHANGED: mode:phased doc:"), stdout


# ----------------------------------------------------------------------------------------------------------------------
# labels, bad arguments, processes


PHASED_ARGS = ["--mode", "phased", "--window", "64", "--chunk", "16", "--lora-rank", "4", "--lora-lr", "0.005",
               "--lora-alpha", "8", "--beta1", "0", "--beta2", "0.99", "--weight-decay", "0.5", "--warm-a", "1",
               "--virtual-layers", "1", "--doc-batch", "2", "--phase-docs", "2,4,100", "--global-lr", "0.05",
               "--global-chunk", "256", "--global-clip", "0.5", "--batch-tokens", "300"]


def test_phased_results_say_cross_document(model, checkpoint, val, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "--checkpoint", checkpoint, *PHASED_ARGS, "--out", tmp_path / "r.json")
    assert code == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["documents"] == results["config"]["documents"] == "cross-document"
    assert results["config"]["phase_docs"] == "2,4,100" and results["config"]["warm_a"] is True
    order = eval_ttt.scoring_order(val, PHASED)
    steps = [-(-sum(int(val.token_counts[d]) for d in order[:t]) // 256) for t in (2, 4)]
    assert [(p["docs"], p["steps"]) for p in results["phases"]] == [(2, steps[0]), (4, steps[1])]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("eval mode:phased ") and " phases_at:2,4 " in line
    assert line.endswith(" documents:cross-document") and "per-document" not in line
    assert "phased phase:1 after_docs:2 " in err and "(cross-document)" in err
    expected = eval_ttt.evaluate(model, val, PHASED)
    assert results["bpb"] == pytest.approx(expected.bpb, rel=1e-6)


@pytest.mark.slow
def test_phased_two_processes_score_like_one(checkpoint, tmp_path, capsys):
    """Phased with warm A and an adapter per virtual layer under 2 gloo processes: the slots dealt over the processes,
    the global steps' gradients summed over them; the same per-document results as one process."""
    one, two, one_losses, two_losses = one_and_two_processes(checkpoint, PHASED_ARGS, tmp_path, capsys)
    assert two["documents"] == "cross-document"
    assert [p["docs"] for p in two["phases"]] == [p["docs"] for p in one["phases"]] == [2, 4]
    np.testing.assert_allclose([d["nats"] for d in two["docs"]], [d["nats"] for d in one["docs"]], rtol=1e-5)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-4, atol=1e-5)

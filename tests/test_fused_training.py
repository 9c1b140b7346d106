"""A training step of a tiny model with every kernel (FUSED=1; Triton's interpreter on CPU) gives the loss and
gradients of the plain-torch model (FUSED=0), and compiles with fullgraph=True into one graph that calls the kernels.
FUSED is 0 (plain torch) unless a run names kernels; there is no automatic choice (FUSED=auto is an error)."""

import dataclasses

import pytest
import torch

import kernels
import train_gpt as tg
from data.loader import BOS_ID, IGNORE_INDEX
from kernels import _common
from test_compile import TINY_RUN, run_main


def with_fused(model: tg.GPT, fused_ops) -> tg.GPT:
    """The same weights in a model that uses the kernels `fused_ops` (the choice is the model's, made when it is
    built)."""
    model_kernels = dataclasses.replace(model.kernels, fused=frozenset(fused_ops))
    twin = tg.GPT(model.config, model_kernels).to(next(model.parameters()).device)
    twin.load_state_dict(model.state_dict())
    return twin


def loss_and_grads(model, ids, targets, cu_seqlens):
    model.zero_grad(set_to_none=True)
    losses = model(ids, targets, cu_seqlens, 32)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# the frontier's switches (PRESET=pg1855's, the recurrence and lanes placed for 2 layers), around the fused kernels
FRONTIER = dict(xsa_layers="all", smear_gate=True, sparse_attn_gate=True, ln_scale=True, skip_gates=True,
                parallel_start_layer=1, recur_layers="0-0", qk_gain_init=5.0, rope_dims=8)


@pytest.mark.slow
@pytest.mark.parametrize("fused, switches", [(sorted(kernels.OPS), {}), (["softcap_cross_entropy", "rms_norm"], {}),
                                             (sorted(kernels.OPS), FRONTIER)], ids=["all", "two", "all-frontier"])
def test_fused_training_step_matches_plain(fused, switches):
    if not kernels.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip(_common.interpreter_unusable_reason() or "Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    config = tg.ModelConfig(vocab_size=72, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, **switches)
    model = tg.GPT(config)
    with torch.no_grad():  # random weights everywhere (zero-initialised projections would hide the attention path)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 72, (1, 45))
    ids[0, [0, 19, 30]] = BOS_ID
    targets = torch.roll(ids, -1, 1)
    targets[targets == BOS_ID] = IGNORE_INDEX
    cu_seqlens = torch.tensor([0, 19, 30, 45, 45], dtype=torch.int32)

    plain_losses, plain_grads = loss_and_grads(model, ids, targets, cu_seqlens)
    fused_losses, fused_grads = loss_and_grads(with_fused(model, fused), ids, targets, cu_seqlens)
    torch.testing.assert_close(fused_losses, plain_losses, rtol=1e-4, atol=1e-5)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")

    # the optimizer's orthogonalisation: fused Newton-Schulz equals the plain iteration
    G = plain_grads["blocks.0.mlp.fc.weight"]
    plain_update = kernels.REFERENCES["newton_schulz"](G, 5)
    torch.testing.assert_close(kernels.fused_newton_schulz(G, 5), plain_update, rtol=1e-3, atol=1e-4)


def fused_step(model, forward, ids, targets):
    """Per-token losses and parameter gradients of one step of a model with every kernel on (its own bf16 autocast
    on CUDA, as in training: no autocast around it)."""
    model.zero_grad(set_to_none=True)
    losses = forward(ids, targets)
    losses.sum().backward()
    return losses.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_compiled_fused_model(device, backend, tolerance):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = tg.ModelConfig(vocab_size=72, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    autocast = torch.bfloat16 if device.type == "cuda" else None  # what choose_kernels gives on this device
    model = tg.GPT(config, tg.Kernels(frozenset(kernels.OPS), autocast=autocast)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 72, (2, 24), device=device)
    targets = torch.roll(ids, -1, 1)
    targets[0, :5] = IGNORE_INDEX

    eager_losses, eager_grads = fused_step(model, model, ids, targets)
    torch._dynamo.reset()
    counters.clear()
    recorder = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=recorder)
    compiled_losses, compiled_grads = fused_step(model, compiled, ids, targets)

    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert recorder.frame_count == 1, f"{recorder.frame_count} graphs"
    traced = {str(node.target) for graph in recorder.graphs for node in graph.graph.nodes}
    for op in ["rms_norm_forward", "rotary_qk_forward", "relu2_linear_forward", "linear_softcap_ce_forward"]:
        assert f"kernels.{op}.default" in traced, f"{op} is not in the compiled graph"
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=tolerance, atol=tolerance)
    for name, grad in eager_grads.items():
        error = ((compiled_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)).item()
        assert error <= tolerance, f"gradient of {name}: compiled vs eager max error {error:.1e} of max |eager|"


@pytest.mark.slow
def test_compiled_fused_model_is_one_graph_and_matches_eager():
    """CPU: the interpreted kernels inside a graph that Dynamo and AOTAutograd trace (aot_eager backend)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernels.triton_available(device):
        pytest.skip(_common.interpreter_unusable_reason() or "Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    check_compiled_fused_model(device, backend="aot_eager", tolerance=1e-4 if device.type == "cpu" else 3e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_fused_model_is_one_graph_and_matches_eager():
    """CUDA, bf16 autocast, Inductor: as train_gpt.py compiles the model."""
    check_compiled_fused_model(torch.device("cuda"), backend="inductor", tolerance=3e-2)


# ----------------------------------------------------------------------------------------------------------------------
# FUSED: 0 by default, named kernels, and no "auto"


def test_fused_defaults_to_plain_torch():
    hp = tg.Hyperparameters.from_env({})
    assert hp.fused == "0" and tg.parse_fused_ops(hp.fused) == frozenset()
    assert tg.choose_kernels(tg.parse_fused_ops(hp.fused), "auto", "cpu").fused == frozenset()
    assert tg.parse_fused_ops("1") == frozenset(kernels.OPS)
    assert tg.parse_fused_ops("rms_norm, rotary_qk") == {"rms_norm", "rotary_qk"}


@pytest.mark.parametrize("value", ["auto", "AUTO", "rms_norm,auto"])
def test_fused_auto_is_an_error_naming_fused(value):
    with pytest.raises(ValueError, match="unknown kernel 'auto'"):
        tg.parse_fused_ops(value)
    with pytest.raises(tg.ConfigError) as info:
        tg.Hyperparameters.from_env({"FUSED": value})
    message = str(info.value)
    assert message.startswith(f"FUSED={value!r}: unknown kernel 'auto'") and "\n" not in message
    assert all(name in message for name in kernels.OPS)  # it lists what FUSED can name


def test_fused_auto_stops_a_run_with_one_line(tmp_path, monkeypatch, capsys):
    """train_gpt.main with FUSED=auto: exit code 2 and one line on stderr naming FUSED, before any log is written."""
    code = run_main(monkeypatch, {**TINY_RUN, "FUSED": "auto", "RUN_ID": "auto", "LOG_DIR": str(tmp_path),
                                  "DATA_PATH": str(tmp_path / "absent")})
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [f"error: FUSED='auto': unknown kernel 'auto'; known: "
                                         f"{', '.join(sorted(kernels.OPS))} (or 0, 1)"]
    assert captured.out == "" and not (tmp_path / "auto.txt").exists()

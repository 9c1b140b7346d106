"""The leaderboard's frontier techniques (parameter-golf #1855 and the records it builds on), each a switch of
train_gpt.py: every formula against a plain one written here, on fresh random inputs; the model with every switch on
keeps each document to itself and never reads a later token; PRESET=pg1855 is the record's logged configuration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from data.loader import ConfigError
from kernels import newton_schulz as ns
from test_cuda_path import (assert_muon_equals_slow_loop, assert_one_dtype, cuda_autocast_policy,  # noqa: F401
                             cuda_kernels)  # (cuda_autocast_policy is a fixture)

FRONTIER = dict(vocab_size=96, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4,
                mlp_act="leaky_relu2", rope_dims=4, qk_gain_init=5.0, xsa_layers="all", smear_gate=True,
                sparse_attn_gate=True, ln_scale=True, skip_gates=True, parallel_start_layer=3, recur_layers="1-2",
                recur_loops=2, orthogonal_init=True)


def frontier_model(seed: int = 0, **changes) -> tg.GPT:
    """A tiny model with every frontier switch on and every weight random (the zero-initialised gates, lambdas and
    projections of a fresh model would hide the paths these tests look at)."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig(**{**FRONTIER, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# the model's pieces, each against its formula


def test_xsa_removes_each_heads_own_value_direction():
    gen = torch.Generator().manual_seed(1)
    B, T, Hq, Hkv, D = 2, 5, 6, 2, 8
    y, v = torch.randn(B, T, Hq, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen)
    out = tg.exclude_own_value(y, v)
    for h in range(Hq):
        own = v[:, :, h // (Hq // Hkv)]  # query heads 0-2 share value head 0, 3-5 value head 1
        unit = own / own.norm(dim=-1, keepdim=True)
        expected = y[:, :, h] - (y[:, :, h] * unit).sum(-1, keepdim=True) * unit
        torch.testing.assert_close(out[:, :, h], expected)
        assert (out[:, :, h] * own).sum(-1).abs().max() < 1e-5  # orthogonal to the token's own value


def test_smear_gate_adds_the_gated_previous_token_except_at_segment_starts():
    gen = torch.Generator().manual_seed(2)
    smear = tg.SmearGate()
    x = torch.randn(1, 9, 16, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three segments packed in one row
    assert torch.equal(smear(x, positions), x)  # lambda 0 at start: the identity
    with torch.no_grad():
        smear.weight.copy_(torch.randn(12, generator=gen))
        smear.strength.fill_(0.7)
    out = smear(x, positions)
    for t in range(9):
        gate = 0.7 * torch.sigmoid(x[0, t, :12] @ smear.weight)
        expected = x[0, t] + gate * x[0, t - 1] if positions[0, t] > 0 else x[0, t]
        torch.testing.assert_close(out[0, t], expected)


def test_sparse_output_gate_is_half_at_start_then_its_formula():
    gen = torch.Generator().manual_seed(3)
    gate = tg.SparseOutputGate(num_heads=4, scale=0.5)
    y, x = torch.randn(2, 5, 4, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    torch.testing.assert_close(gate(y, x), 0.5 * y)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(4, 12, generator=gen))
    out = gate(y, x)
    for h in range(4):
        expected = y[:, :, h] * torch.sigmoid(0.5 * x[..., :12] @ gate.weight[h]).unsqueeze(-1)
        torch.testing.assert_close(out[:, :, h], expected)


def test_ln_scale_divides_each_blocks_normed_input_by_sqrt_of_its_depth():
    model = frontier_model()
    x = torch.randn(2, 3, 32)
    for i, block in enumerate(model.blocks):
        assert block.norm_scale == pytest.approx(1 / math.sqrt(i + 1))
        torch.testing.assert_close(block.norm(x), F.rms_norm(x, (32,)) / math.sqrt(i + 1))
    assert all(block.norm_scale == 1.0 for block in frontier_model(ln_scale=False).blocks)


def test_skip_gates_mix_the_stream_and_the_weighted_skip():
    model = tg.GPT(tg.ModelConfig(**FRONTIER))
    x, skip = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(model.merge_skip(x, skip, 0), 0.5 * x + 0.5 * skip)  # g = 0, w = 1 at start
    model = frontier_model()
    g, w = torch.sigmoid(model.skip_gates[1]), model.skip_weights[1]
    torch.testing.assert_close(model.merge_skip(x, skip, 1), g * x + (1 - g) * w * skip)
    plain = frontier_model(skip_gates=False)
    assert plain.skip_gates is None
    torch.testing.assert_close(plain.merge_skip(x, skip, 1), x + plain.skip_weights[1] * skip)


def test_parallel_block_reads_two_lanes_and_writes_both():
    model = frontier_model()
    block = model.blocks[3]
    assert block.parallel and not model.blocks[2].parallel
    fresh = tg.ParallelBlock(tg.ModelConfig(**FRONTIER), frozenset(), 3)
    assert torch.equal(fresh.lane_gain, torch.full((2,), 1.1)) and torch.equal(fresh.lane_post, torch.ones(2, 2))
    gen = torch.Generator().manual_seed(4)
    lane0, lane1, x0 = (torch.randn(2, 6, 32, generator=gen) for _ in range(3))
    cos, sin = model.rotary(torch.arange(6).expand(2, 6))
    attend = model.attention_for(None, 0)
    out0, out1 = block(lane0, lane1, x0, cos, sin, attend)
    a = block.attn_scale * block.attn(block.norm(block.resid_mix[0] * lane0 + block.resid_mix[1] * x0), cos, sin,
                                      attend)
    m = block.mlp_scale * block.mlp(block.norm(lane1))
    r, P = block.lane_gain, block.lane_post
    torch.testing.assert_close(out0, r[0] * lane0 + P[0, 0] * a + P[1, 0] * m)
    torch.testing.assert_close(out1, r[1] * lane1 + P[0, 1] * a + P[1, 1] * m)


def test_depth_recurrence_runs_the_records_order():
    record = tg.ModelConfig(num_layers=11, recur_layers="3-5", recur_loops=2)
    plain, looped = tg.layer_orders(record)
    assert plain == tuple(range(11))
    assert looped == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)  # 17 virtual layers from 11
    assert tg.layer_orders(tg.ModelConfig(num_layers=4))[1] == (0, 1, 2, 3)
    # the U-Net pairs the looped order's halves: 8 encoder layers hand their outputs to the first 8 of 9 decoder layers
    assert tg.GPT(tg.ModelConfig(**{**FRONTIER, "num_layers": 11, "recur_layers": "3-5",
                                    "parallel_start_layer": 8})).num_skips == 8


def test_recurrence_switch_changes_which_layers_run():
    model = frontier_model().eval()
    ids = torch.randint(0, 96, (1, 12))
    calls = []
    hooks = [b.register_forward_hook(lambda mod, args, out, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.looping = False
        model.hidden_states(ids)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        model.looping = True
        model.hidden_states(ids)
        assert calls == [0, 1, 2, 1, 2, 1, 2, 3]
    for hook in hooks:
        hook.remove()


def plain_hidden_states(model: tg.GPT, ids: torch.Tensor, order: tuple) -> torch.Tensor:
    """The frontier model's forward written out for rows [B, T]: SmearGate token by token, the norm, the blocks in
    `order` with U-Net skips through their gates, lanes from the first parallel block (both start as the stream; the
    skips go into lane 0), and the mean of the lanes at the end."""
    B, T = ids.shape
    e = model.tok_emb(ids)
    smeared = [e[:, 0]]
    for t in range(1, T):
        gate = model.smear.strength * torch.sigmoid(e[:, t, :12] @ model.smear.weight)
        smeared.append(e[:, t] + gate.unsqueeze(-1) * e[:, t - 1])
    x = x0 = F.rms_norm(torch.stack(smeared, 1), (e.size(-1),))
    cos, sin = model.rotary(torch.arange(T).expand(B, T))
    attend = model.attention_for(None, 0)
    half, skips, lanes = len(order) // 2, [], None
    for j, i in enumerate(order):
        block = model.blocks[i]
        if block.parallel and lanes is None:
            lanes = [x, x]
        if j >= half and skips:
            g = torch.sigmoid(model.skip_gates[j - half])
            merged = g * (lanes[0] if lanes else x) + (1 - g) * model.skip_weights[j - half] * skips.pop()
            if lanes:
                lanes[0] = merged
            else:
                x = merged
        if block.parallel:
            lanes = list(block(lanes[0], lanes[1], x0, cos, sin, attend))
        else:
            x = block(x, x0, cos, sin, attend)
        if j < half:
            skips.append(x)
    return F.rms_norm((lanes[0] + lanes[1]) / 2 if lanes else x, (e.size(-1),))


@pytest.mark.parametrize("looping", [False, True])
def test_frontier_model_is_its_plain_forward(looping):
    model = frontier_model(7).eval()
    model.looping = looping
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = plain_hidden_states(model, ids, model.loop_order if looping else model.plain_order)
        torch.testing.assert_close(model.hidden_states(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("looping", [False, True])
def test_frontier_model_keeps_documents_apart_and_never_reads_ahead(looping):
    """Every switch on (SmearGate at a document start, the lanes, the recurrence included): in a packed row a
    segment's hidden states do not depend on another segment, and no position depends on a later token."""
    model = frontier_model().eval()
    model.looping = looping
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (1, 30), generator=gen)
    cu = torch.tensor([0, 11, 23, 30], dtype=torch.int32)
    with torch.no_grad():
        base = model.hidden_states(ids, cu, 12)
        other = ids.clone()
        other[0, :11] = torch.randint(0, 96, (11,), generator=gen)  # a different first document
        changed = model.hidden_states(other, cu, 12)
        assert torch.equal(changed[0, 11:], base[0, 11:])
        assert not torch.allclose(changed[0, :11], base[0, :11])
        later = ids.clone()
        later[0, 17] = (ids[0, 17] + 1) % 96  # a later token of the second document
        changed = model.hidden_states(later, cu, 12)
        assert torch.equal(changed[0, :17], base[0, :17]) and torch.equal(changed[0, 23:], base[0, 23:])
        assert not torch.allclose(changed[0, 17:23], base[0, 17:23])


def test_orthogonal_init_gives_orthogonal_q_k_v_and_mlp_in():
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig(**FRONTIER))
    for linear in (model.blocks[0].attn.c_q, model.blocks[1].attn.c_v, model.blocks[2].mlp.fc):
        W = linear.weight
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.blocks[0].attn.proj.weight) == 0  # output projections still start at zero


# ----------------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def test_polar_express_coefficients_are_the_records():
    assert ns.POLAR_EXPRESS == ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                                (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                                (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                                (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                                (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
    assert ns.NS_SCHEDULES["quintic"] == ((3.4445, -4.7750, 2.0315),)


@pytest.mark.parametrize("steps", [3, 5, 7])
def test_polar_express_iteration_uses_each_steps_coefficients(steps):
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    X = G / (G.norm() + 1e-7)
    for i in range(steps):
        a, b, c = ns.POLAR_EXPRESS[min(i, 4)]  # past the list: its last tuple again
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(ns.reference(G, steps, schedule=ns.POLAR_EXPRESS), X)
    batched = tg.orthogonalize_batched(torch.stack([G, 2 * G]), steps, schedule=ns.POLAR_EXPRESS)
    torch.testing.assert_close(batched[0], X)
    torch.testing.assert_close(batched[1], X)  # scale-free: the input is normalised first


def slow_frontier_muon(params, grads, buffers, lr, momentum, wd, schedule):
    """Nesterov momentum, each row of the update to unit norm (MuonEq-R), orthogonalised, decoupled weight decay."""
    for p, g, buf in zip(params, grads, buffers):
        buf.mul_(momentum).add_(g)
        direction = g + momentum * buf
        direction = direction / direction.norm(dim=1, keepdim=True)
        update = ns.reference(direction, 5, schedule=schedule) * max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.mul_(1 - lr * wd).sub_(lr * update)


def test_muon_with_row_norm_weight_decay_and_polar_express_equals_the_slow_loop():
    assert_muon_equals_slow_loop(dict(lr=0.02, momentum=0.9, backend_steps=5, weight_decay=0.1, row_norm=True,
                                      schedule=ns.POLAR_EXPRESS),
                                 lambda p, g, buf: slow_frontier_muon(p, g, buf, 0.02, 0.9, 0.1, ns.POLAR_EXPRESS),
                                 [(32, 16), (16, 32), (32, 16), (8, 24)], seed=6)


def test_adam_groups_decay_only_when_asked():
    model = frontier_model()
    plain = tg.build_optimizers(model, tg.Hyperparameters())
    assert type(plain.embedding) is torch.optim.Adam and type(plain.scalars) is torch.optim.Adam
    decayed = tg.build_optimizers(model, tg.Hyperparameters(embed_wd=0.085, scalar_wd=0.02, muon_wd=0.095))
    assert type(decayed.embedding) is torch.optim.AdamW and decayed.embedding.param_groups[0]["weight_decay"] == 0.085
    assert decayed.scalars.param_groups[0]["weight_decay"] == 0.02
    assert decayed.matrices.param_groups[0]["weight_decay"] == 0.095
    groups = dict(tg.optimizer_groups(model))
    scalar_names = {name for name, _ in groups["scalars"]}
    assert {"smear.weight", "smear.strength", "skip_gates", "blocks.3.lane_gain", "blocks.3.lane_post",
            "blocks.0.attn.output_gate.weight"} <= scalar_names


def test_fractional_warmdown_falls_linearly_to_the_floor():
    hp = tg.Hyperparameters(iterations=100, max_wallclock_seconds=0, warmdown_frac=0.85, min_lr=0.1)
    scale = [tg.learning_rate_scale(step, 0.0, hp) for step in range(101)]
    assert scale[:16] == [1.0] * 16  # the first 15 % at full rate
    for step in (20, 50, 90):
        assert scale[step] == pytest.approx((1 - step / 100) / 0.85)
    assert scale[92:] == [0.1] * 9  # the floor from 91.5 % on
    capped = tg.Hyperparameters(iterations=1000, max_wallclock_seconds=100, warmdown_frac=0.85, min_lr=0.1)
    assert tg.learning_rate_scale(10, 60_000.0, capped) == pytest.approx(0.4 / 0.85)  # the clock is ahead
    assert tg.learning_rate_scale(10, 60_000.0, tg.Hyperparameters(iterations=1000, max_wallclock_seconds=100,
                                                                   warmdown_iters=0)) == 1.0


def test_recurrence_switches_on_at_its_fraction():
    hp = tg.Hyperparameters(iterations=100, max_wallclock_seconds=0, recur_layers="1-2", recur_start_frac=0.35,
                            num_layers=4)
    assert [tg.recurrence_on(s, 0.0, hp) for s in (0, 34, 35, 99)] == [False, False, True, True]
    assert tg.recurrence_on(0, 0.0, tg.Hyperparameters())  # nothing repeats: the model is always whole


# ----------------------------------------------------------------------------------------------------------------------
# PRESET=pg1855


# The record's run as its logs print it (train_seed42.log; seeds 0 and 1234 print the same), by the record's names,
# and our name for each where it differs. A record line that is about the artifact, test-time training or the data's
# tokenizer belongs to those parts, not to this table.
RECORD_LOG = {
    "vocab_size": 8192, "num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 4.0,
    "logit_softcap": 30.0, "rope_base": 10000.0, "rope_dims": 16, "qk_gain_init": 5.0, "tied_embed_init_std": 0.005,
    "xsa_last_n": 11, "smear_gate_enabled": True, "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5,
    "ln_scale": True, "skip_gates_enabled": True, "parallel_start_layer": 8, "loop_start": 3, "loop_end": 5,
    "num_loops": 2, "enable_looping_at": 0.35, "train_seq_len": 2048, "train_batch_tokens": 786432,
    "iterations": 20000, "warmup_steps": 20, "warmdown_frac": 0.85, "min_lr": 0.1, "max_wallclock_seconds": 600.0,
    "tied_embed_lr": 0.03, "matrix_lr": 0.026, "scalar_lr": 0.02, "muon_momentum": 0.97,
    "muon_momentum_warmup_start": 0.92, "muon_momentum_warmup_steps": 1500, "muon_backend_steps": 5,
    "muon_row_normalize": True, "muon_wd": 0.095, "embed_wd": 0.085, "adam_wd": 0.02, "beta1": 0.9, "beta2": 0.99,
    "adam_eps": 1e-08, "grad_clip_norm": 0.3, "ema_decay": 0.9965, "val_loss_every": 0, "train_log_every": 500,
}
OUR_NAMES = {"xsa_last_n": "xsa_layers", "smear_gate_enabled": "smear_gate", "sparse_attn_gate_enabled":
             "sparse_attn_gate", "skip_gates_enabled": "skip_gates", "enable_looping_at": "recur_start_frac",
             "num_loops": "recur_loops", "muon_row_normalize": "muon_row_norm", "adam_wd": "scalar_wd"}


def test_preset_is_the_records_logged_configuration():
    hp = tg.Hyperparameters.from_env({"PRESET": "pg1855"})
    for name, value in RECORD_LOG.items():
        if name in ("xsa_last_n", "loop_start", "loop_end"):
            continue
        assert getattr(hp, OUR_NAMES.get(name, name)) == value, name
    assert tg.parse_layer_set(hp.xsa_layers, hp.num_layers) == tuple(range(11 - RECORD_LOG["xsa_last_n"], 11))
    assert hp.recur_layers == f"{RECORD_LOG['loop_start']}-{RECORD_LOG['loop_end']}"
    # what the record's code fixes rather than logs: Polar Express, LeakyReLU(0.5)^2, orthogonal q/k/v/MLP-in init,
    # no learning-rate warm-up (its WARMUP_STEPS are compile steps, undone, as ours)
    assert (hp.muon_ns, hp.mlp_act, hp.orthogonal_init, hp.lr_warmup_steps) == ("polar_express", "leaky_relu2",
                                                                                True, 0)
    # the shape it builds: the record's log prints model_params:35945671, of which our model has all but the two
    # parallel-lane tensors' rows for layers 0-7 (the record allocates 11 rows and uses the last 3)
    model = tg.GPT(tg.ModelConfig.from_hyperparameters(hp))
    assert sum(p.numel() for p in model.parameters()) == 35_945_671 - 8 * (4 + 2)


def test_preset_at_another_depth_scales_its_layers_and_explicit_values_win():
    hp = tg.Hyperparameters.from_env({"PRESET": "pg1855", "NUM_LAYERS": "4", "MODEL_DIM": "128", "VOCAB_SIZE": "1024",
                                      "MATRIX_LR": "0.05"})
    assert (hp.num_layers, hp.model_dim, hp.vocab_size, hp.matrix_lr) == (4, 128, 1024, 0.05)
    assert (hp.xsa_layers, hp.recur_layers, hp.parallel_start_layer) == ("all", "1-2", 3)  # round(i * 4 / 11)
    assert tg.layer_orders(tg.ModelConfig.from_hyperparameters(hp))[1] == (0, 1, 2, 1, 2, 1, 2, 3)
    assert tg.Hyperparameters.from_env({"PRESET": "pg1855", "NUM_LAYERS": "2"}).parallel_start_layer == 1
    explicit = tg.Hyperparameters.from_env({"PRESET": "pg1855", "NUM_LAYERS": "6", "RECUR_LAYERS": "",
                                            "PARALLEL_START_LAYER": "0"})
    assert (explicit.recur_layers, explicit.parallel_start_layer) == ("", 0)
    assert tg.Hyperparameters.from_env({}).preset == "" and not tg.Hyperparameters().smear_gate


@pytest.mark.parametrize("env, message", [
    ({"PRESET": "pg9999"}, "PRESET='pg9999': unknown; known: pg1855"),
    ({"XSA_LAYERS": "2-9"}, "XSA_LAYERS='2-9': '2-9' is not a range of layers in 0..8"),
    ({"RECUR_LAYERS": "1,3"}, "RECUR_LAYERS='1,3': must be one range of consecutive layers"),
    ({"PARALLEL_START_LAYER": "9"}, "PARALLEL_START_LAYER=9: must be in 0..8"),
    ({"MUON_NS": "cubic"}, "MUON_NS='cubic': must be one of quintic, polar_express"),
    ({"GIST_TOKENS": "2", "SMEAR_GATE": "1"}, "SMEAR_GATE=True: cannot be combined with GIST_TOKENS > 0"),
])
def test_bad_frontier_settings_are_one_clear_error(env, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        tg.Hyperparameters.from_env(env)


# ----------------------------------------------------------------------------------------------------------------------
# the fast paths with the switches on


def test_fused_newton_schulz_runs_polar_express():
    import kernels

    if not kernels.triton_available(torch.device("cpu")):
        pytest.skip("Triton cannot run here (TRITON_INTERPRET unset)")
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(kernels.fused_newton_schulz(G, 5, schedule=ns.POLAR_EXPRESS),
                               ns.reference(G, 5, schedule=ns.POLAR_EXPRESS), rtol=1e-3, atol=1e-4)


def test_frontier_training_forward_hands_attention_one_dtype(cuda_autocast_policy):
    """Under the CUDA path's bf16 autocast (emulated as in test_cuda_path), XSA, the gates, the lanes and the
    recurrence keep the one dtype flash attention needs."""
    plain = frontier_model()
    model = tg.GPT(plain.config, cuda_kernels())
    model.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 96, (1, 40))
    losses = model.train()(ids, torch.roll(ids, -1, 1), torch.tensor([0, 12, 40], dtype=torch.int32), 40)
    losses.sum().backward()
    assert_one_dtype(cuda_autocast_policy)
    assert len(cuda_autocast_policy) == 2 * len(model.loop_order)  # one call per segment per virtual layer
    assert torch.isfinite(losses).all()

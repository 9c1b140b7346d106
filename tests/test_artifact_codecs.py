"""Tests of the frontier codecs of kernels/artifact.py (the sdclip family: SDClip scales, int7 embedding, float16 small
tensors, int8 gates, GPTQ on the tied embedding, LQER, grouped compression).

Per codec: every tensor within its stated bound (SDClip: half a step, or the clip beyond k standard deviations; GPTQ:
no row's calibration error above plain rounding's at the same scale; float16: float16 rounding; LQER: never a larger
error than without it), the same bytes twice and from a fresh process, a damaged file one ValueError line. The fast
paths are held to slow references: the LQER correction element by element, the row order row by row, and the
grouped file to the one-stream file (the same tensors bit for bit)."""

import io
import json
import lzma
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from kernels import artifact as A

ROOT = Path(__file__).resolve().parent.parent
META = {"run_id": "codecs", "note": "ünï"}
CONFIG = tg.ModelConfig(vocab_size=256, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2)
FAST = ("lzma", "zlib")  # the compressors the grouped tests offer (every one installed is slower)
SMALL = 0  # small_numel for the tests' small model: quantize every matrix of at least 64 x 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_and_state(seed: int = 0):
    torch.manual_seed(seed)
    model = tg.GPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.blocks[0].mlp.proj.weight[3, 7] = 3.0  # an outlier beyond SDClip's clip (11.5 std of its row)
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["blocks.0.attn.gate.weight"] = torch.randn(4, 128) * 0.1  # a gate (the plan's int8 rows)
    return model, state


def batches(seed: int = 1, count: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 65), generator=g) for _ in range(count)]


def hessians_of(model, state, codec):
    names = [n for n in A.hessian_names(state, codec, SMALL) if n in model.state_dict()]
    hessians = A.collect_hessians(model, batches(), lambda m, b: m(b[:, :-1], b[:, 1:]), names)
    x = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)).double()
    hessians["blocks.0.attn.gate.weight"] = x.T @ x  # (the test's gate has no layer; never used: gates are int8)
    return hessians


@pytest.fixture(scope="module")
def setup():
    model, state = model_and_state()
    return model, state, hessians_of(model, state, "sdclip_gptq")


def encode(codec, state, hessians, **kw):
    return A.encode_artifact(state, codec, META, hessians if "gptq" in codec else None, small_numel=SMALL, **kw)


def stored_entries(data: bytes) -> dict:
    if data.startswith(A.GROUPED_MAGIC):
        return A.decode_grouped(data)[2]
    return torch.load(io.BytesIO(lzma.decompress(data)), weights_only=True)["tensors"]


# ----------------------------------------------------------------------------------------------------------------------
# The plan and the bounds


def test_plan_follows_the_frontier(setup):
    _, state, _ = setup
    plan = A.quantization_plan(state, "sdclip_gptq", small_numel=SMALL)
    assert plan["tok_emb.weight"] == "int7_sdclip_gptq" and plan["blocks.0.mlp.fc.weight"] == "int6_sdclip_gptq"
    assert plan["blocks.0.attn.gate.weight"] == "int8" and plan["skip_weights"] == "fp16"
    assert plan["blocks.0.attn.q_gain"] == "fp16" and plan["blocks.0.resid_mix"] == "fp16"
    # the default threshold (65,536 values) keeps every matrix of this small model (at most 256 x 128) in float16
    default = A.quantization_plan(state, "sdclip")
    assert set(default.values()) == {"fp16", "int8"}
    assert A.quantization_plan({"w": torch.zeros(257, 256)}, "sdclip") == {"w": "int6_sdclip"}
    assert A.hessian_names(state, "sdclip") == [] and "tok_emb.weight" in A.hessian_names(state, "sdclip_gptq", SMALL)
    assert A.needs_calibration("sdclip_gptq_lqer_grouped") and not A.needs_calibration("sdclip_lqer")
    assert A.needs_calibration("int6_gptq_lzma") and not A.needs_calibration("int6_lzma")


@pytest.mark.parametrize("codec", ["sdclip", "sdclip_gptq"])
def test_every_tensor_within_its_bound(setup, codec):
    _, state, hessians = setup
    data = encode(codec, state, hessians)
    decoded, meta = A.decode_artifact(data)
    entries = stored_entries(data)
    assert meta == META and list(decoded) == list(state)
    plan = A.quantization_plan(state, codec, small_numel=SMALL)
    for name, w in state.items():
        how, got, entry = plan[name], decoded[name], entries[name]
        assert got.dtype == w.dtype and got.shape == w.shape, name
        if how == "fp16":
            assert torch.equal(got, w.half().to(w.dtype)), name
            assert ((got - w).abs() <= w.abs() * 2 ** -11 + 2 ** -25).all(), name
            continue
        q, scale = entry["q"].long(), entry["scale"].float()
        assert torch.equal(got, q.float() * scale[:, None]), name  # exact q x scale in float32
        if how == "int8":
            assert q.abs().max() <= 127 and ((got - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all(), name
            continue
        family = A.tensor_family(name)
        bits, level = A.SDCLIP_BITS[family], A.max_level(A.SDCLIP_BITS[family])
        assert entry["bits"] == bits == (7 if name == "tok_emb.weight" else 6) and q.abs().max() <= level
        # SDClip's scale: k std(row) / level, rounded up to float16
        std_step = A.SDCLIP_SIGMAS[family] * w.float().std(dim=1) / level
        assert torch.equal(entry["scale"], A.float16_scale(std_step)), name
        assert (scale >= std_step).all() and (scale <= std_step * (1 + 2 ** -10)).all()
        plain = torch.round(w / scale[:, None]).clamp(-level, level) * scale[:, None]
        if how.endswith("gptq"):  # on the grid; per row, no worse on the calibration inputs than plain rounding
            h = hessians[name]
            assert (A.output_error(w, got, h) <= A.output_error(w, plain, h) * (1 + 1e-9)).all(), name
        else:  # half a step, or the clip for the values beyond it
            bound = torch.maximum(scale[:, None] / 2, w.abs() - level * scale[:, None])
            assert ((w - got).abs() <= bound * (1 + 1e-6)).all(), name
            assert torch.equal(got, plain), name
    clip = A.max_level(6) * entries["blocks.0.mlp.proj.weight"]["scale"][3].float()
    assert 1.0 < clip < 3.0 and decoded["blocks.0.mlp.proj.weight"][3, 7] <= clip  # the outlier was clipped


def test_gptq_beats_plain_rounding_on_the_calibration_inputs(setup):
    model, state, hessians = setup
    plain, _ = A.decode_artifact(encode("sdclip", state, hessians))
    gptq, _ = A.decode_artifact(encode("sdclip_gptq", state, hessians))
    for name in ("tok_emb.weight", "blocks.1.mlp.proj.weight"):
        h = hessians[name]
        assert A.output_error(state[name], gptq[name], h).sum() < 0.9 * A.output_error(state[name], plain[name], h).sum()


def test_tied_embedding_hessian_is_that_of_the_final_hidden_states(setup):
    model, _, _ = setup
    hessians = A.collect_hessians(model, batches(), lambda m, b: m(b[:, :-1], b[:, 1:]),
                                  ["tok_emb.weight", "blocks.0.attn.c_q.weight"])
    with torch.no_grad():
        x = torch.cat([model.hidden_states(b[:, :-1]).reshape(-1, 128) for b in batches()]).double()
    torch.testing.assert_close(hessians["tok_emb.weight"], x.T @ x)
    assert "hidden_states" not in vars(model)  # the method is the class's again


def test_float16_range_is_refused():
    with pytest.raises(ValueError, match="gain: values beyond float16's range"):
        A.encode_artifact({"gain": torch.tensor([1e6, 1.0])}, "sdclip", {})


# ----------------------------------------------------------------------------------------------------------------------
# LQER


def test_lqer_correction_matches_the_reference_and_its_levels():
    g = torch.Generator().manual_seed(3)
    A_, B_ = torch.randn(70, 3, generator=g), torch.randn(3, 50, generator=g)  # 150 values: a short last group
    lqer = A.quantize_lqer(A_, B_, group=64)
    assert lqer["a"].min() >= -2 and lqer["a"].max() <= 1 and lqer["b"].min() >= -8 and lqer["b"].max() <= 7
    assert lqer["a_scale"].shape == (1,) and lqer["b_scale"].shape == (3,)
    fast = A.lqer_correction(lqer)
    assert torch.allclose(fast, torch.tensor(A.lqer_correction_reference(lqer), dtype=torch.float64), rtol=0,
                          atol=1e-12)
    assert (fast - A_.double() @ B_.double()).norm() < 0.6 * (A_.double() @ B_.double()).norm()


@pytest.mark.parametrize("codec", ["sdclip_lqer", "sdclip_gptq_lqer"])
def test_lqer_corrects_the_largest_errors_and_never_worsens_them(setup, codec):
    _, state, hessians = setup
    base_codec = codec.replace("_lqer", "")
    base, _ = A.decode_artifact(encode(base_codec, state, hessians))
    data = encode(codec, state, hessians)
    corrected, _ = A.decode_artifact(data)
    entries = stored_entries(data)
    with_lqer = [n for n, e in entries.items() if "lqer" in e]
    assert 1 <= len(with_lqer) <= A.LQER_TOP_K
    errors = {n: (state[n] - base[n]).double().norm().item() for n, e in entries.items() if e["kind"] == "q"
              and e["bits"] < 8}
    top = sorted(errors, key=lambda n: -errors[n])[:A.LQER_TOP_K]
    assert set(with_lqer) <= set(top)
    for name, t in corrected.items():
        if name not in with_lqer:
            assert torch.equal(t, base[name]), name  # the rest as without LQER
            continue
        before, after = (state[name] - base[name]).double(), (state[name] - t).double()
        assert after.norm() < before.norm(), name
        if "gptq" in codec:
            h = hessians[name]
            assert ((after @ h) * after).sum() <= ((before @ h) * before).sum()
        e = entries[name]
        expected = (e["q"].double() * e["scale"].double()[:, None] + A.lqer_correction(e["lqer"])).float()
        assert torch.equal(t, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Grouped compression


@pytest.mark.parametrize("codec", ["sdclip_grouped", "sdclip_gptq_lqer_grouped"])
def test_grouped_file_holds_the_same_tensors_as_one_stream(setup, codec):
    _, state, hessians = setup
    one_stream, _ = A.decode_artifact(encode(codec.removesuffix("_grouped"), state, hessians))
    data = encode(codec, state, hessians, compressors=FAST)
    grouped, meta = A.decode_artifact(data)
    assert meta == META and list(grouped) == list(one_stream)
    for name, t in one_stream.items():
        assert grouped[name].dtype == t.dtype and torch.equal(grouped[name], t), name
    (size,) = struct.unpack_from("<I", data, len(A.GROUPED_MAGIC))
    header = json.loads(zlib.decompress(data[len(A.GROUPED_MAGIC) + 4:len(A.GROUPED_MAGIC) + 4 + size]))
    names = [g["name"] for g in header["groups"]]
    assert "blocks.*.mlp.fc.weight.q" in names and "scales" in names and "float16" in names
    assert {g["compressor"] for g in header["groups"]} <= set(FAST)  # the choice, recorded
    layouts = {r[4] for _, d in header["tensors"] for r in d["arrays"].values()}
    assert layouts <= set(A.LAYOUTS)
    # each group took the smallest of the compressors offered
    offset = len(A.GROUPED_MAGIC) + 4 + size
    for g in header["groups"]:
        raw = A.decompress_with(g["compressor"], data[offset:offset + g["bytes"]], g["raw_bytes"])
        assert g["bytes"] == min(len(A.compress_with(c, raw)) for c in FAST)
        offset += g["bytes"]


def test_row_order_matches_the_reference_and_every_layout_round_trips():
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-3, 4, (23, 9), generator=g, dtype=torch.int8)
    q[5] = q[0]  # equal rows: the lowest index first
    assert A.similarity_order(q.numpy()).tolist() == A.similarity_order_reference(q.numpy())
    for layout in A.LAYOUTS:
        raw, orders = A.layout_candidates("blocks.*.x.q", [q])[layout]
        entries = {"x": {"kind": "q", "dtype": "float32", "bits": 3, "q": q, "scale": torch.ones(23).half()}}
        data = A.encode_grouped("sdclip_grouped", "{}", entries, ("zlib",))
        assert torch.equal(A.decode_grouped(data)[2]["x"]["q"], q)
        if orders[0] is not None:
            assert raw == q[torch.from_numpy(orders[0]).long()].numpy().tobytes()


def test_optional_compressors_detected_and_refused_with_one_line(setup, monkeypatch):
    _, state, hessians = setup
    small = {"tok_emb.weight": state["tok_emb.weight"], "gain": torch.ones(4)}
    installed = A.available_compressors()
    assert installed[:3] == ("lzma", "zlib", "bz2")  # the standard library's, always
    for optional in ("brotli", "zstd"):
        if optional in installed:  # a file one of them compressed reads back
            data = A.encode_artifact(small, "sdclip_grouped", {}, compressors=(optional,))
            assert torch.equal(A.decode_artifact(data)[0]["gain"], small["gain"])
    real = A._optional_module
    monkeypatch.setattr(A, "_optional_module", lambda name: None)
    assert A.available_compressors() == ("lzma", "zlib", "bz2")  # skipped in the choice
    with pytest.raises(ValueError, match=r"compressor 'brotli' is not available here .*pip install brotli\)$"):
        A.encode_artifact(small, "sdclip_grouped", {}, compressors=("brotli",))
    if "brotli" in installed:
        monkeypatch.setattr(A, "_optional_module", real)
        data = A.encode_artifact(small, "sdclip_grouped", {}, compressors=("brotli",))
        monkeypatch.setattr(A, "_optional_module", lambda name: None)
        with pytest.raises(ValueError, match=r"compressed with brotli, which is not installed here") as e:
            A.decode_artifact(data)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism and damage


FILES = ("sdclip", "sdclip_gptq", "sdclip_gptq_lqer", "sdclip_gptq_lqer_grouped")  # every option at least once


@pytest.fixture(scope="module")
def frontier_files(setup):
    _, state, hessians = setup
    return {codec: encode(codec, state, hessians, **({"compressors": FAST} if "grouped" in codec else {}))
            for codec in FILES}


def test_same_bytes_twice_and_from_a_fresh_process(setup, frontier_files, tmp_path):
    _, state, hessians = setup
    assert encode("sdclip_gptq_lqer_grouped", state, hessians, compressors=FAST) == \
        frontier_files["sdclip_gptq_lqer_grouped"]
    torch.save({"state": state, "hessians": hessians}, tmp_path / "inputs.pt")
    script = ("import sys, torch\n"
              "from kernels import artifact as A\n"
              "x = torch.load(sys.argv[1], weights_only=True)\n"
              f"for codec in {FILES}:\n"
              f"    kw = {{'compressors': {FAST}}} if 'grouped' in codec else {{}}\n"
              "    h = x['hessians'] if 'gptq' in codec else None\n"
              "    data = A.encode_artifact(x['state'], codec, {'run_id': 'codecs', 'note': 'ünï'}, h, small_numel=0,"
              " **kw)\n"
              "    open(sys.argv[2] + codec, 'wb').write(data)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "x_")], check=True,
                   cwd=ROOT, env=env, timeout=120)
    for codec, data in frontier_files.items():  # (the child with torch's default threads, this process with one)
        assert (tmp_path / f"x_{codec}").read_bytes() == data, codec


@pytest.mark.parametrize("codec", ["sdclip_gptq_lqer", "sdclip_gptq_lqer_grouped"])
def test_damaged_files_are_one_error_line_naming_the_file(frontier_files, codec, tmp_path):
    data = frontier_files[codec]
    flipped = bytearray(data)
    flipped[len(data) * 2 // 3] ^= 0x10
    header_flipped = bytearray(data)
    header_flipped[len(A.GROUPED_MAGIC) + 6] ^= 0x01
    cases = {"truncated": data[:-1], "trailing": data + b"x", "one byte changed": bytes(flipped),
             "header byte changed": bytes(header_flipped), "only the start": data[:11]}
    for what, bad in cases.items():
        path = tmp_path / f"{what}.ptz"
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"^{path}: (damaged artifact|not an artifact)") as e:
            A.read_artifact(str(path))
        assert "\n" not in str(e.value), what


def test_a_decoded_model_loads_strictly_and_predicts_nearly_as_well(setup, frontier_files):
    model, state, _ = setup
    batch = batches(seed=9, count=1)[0]
    with torch.no_grad():
        base = model(batch[:, :-1], batch[:, 1:]).mean().item()
    for codec, data in frontier_files.items():
        decoded, _ = A.decode_artifact(data)
        decoded.pop("blocks.0.attn.gate.weight")
        restored = tg.GPT(CONFIG)
        restored.load_state_dict(decoded, strict=True)
        with torch.no_grad():
            loss = restored.eval()(batch[:, :-1], batch[:, 1:]).mean().item()
        assert abs(loss - base) < 0.05, codec

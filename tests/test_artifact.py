"""Tests of kernels/artifact.py, the codecs of the size-limited artifact, and of train_gpt.py's way to it
(calibrate_artifact, gptq_hessians, export_artifact) with the record's code bytes (PAYLOAD, payload_files).

Per codec: the round trip of random and trained tensors stays within the codec's bound (int8: half a step of each row's
scale; int6: half a step, or the clip for the values beyond it; GPTQ: no row's error on the calibration inputs above
plain rounding's), kept tensors come back bit for bit, the same weights give the same bytes, the reported size is
the file's size, and a damaged file is one ValueError. The fast paths are held to their slow twins: GPTQ to
gptq_reference on a small layer, int6 unpacking to the bit-by-bit reference.

"Trained" tensors come from a 2-layer, width-128 GPT trained for a few Adam steps on a synthetic sequence (a module
fixture, ~2 s): its projection matrices are no longer zero and its rows have unequal scales and outliers.
"""

import ast
import dataclasses
import hashlib
import io
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from data import loader as data_loader
from data.files import write_atomic
from data.shards import write_shard
from kernels import artifact as A
from kernels import bundle

ROOT = Path(__file__).resolve().parent.parent
META = {"model_config": {"num_layers": 2, "model_dim": 128}, "run_id": "test", "note": "ünïcode"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are small tensors and many small ops: on the shared 2-core machines two threads per op made the trained
    fixture 20x slower than one (measured: 25 s against 1.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def payload_of(data: bytes) -> dict:
    """The torch.save payload inside an artifact, read independently of decode_artifact."""
    raw = lzma.decompress(data) if data.startswith(A.XZ_MAGIC) else zlib.decompress(data)
    return torch.load(io.BytesIO(raw), weights_only=True)


def stored_quantized(data: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values [rows, cols], float32 scales [rows]) of a quantized matrix, straight from the payload."""
    entry = payload_of(data)["tensors"][name]
    if entry["kind"] == "int8":
        return entry["q"].long(), entry["scale"].float()
    rows, cols = entry["shape"]
    q = torch.tensor(A.unpack_int6_reference(entry["packed"].numpy().tobytes(), rows * cols)).view(rows, cols)
    return q, entry["scale"].float()


def random_matrices(seed: int) -> dict[str, torch.Tensor]:
    """Matrices whose rows span many scales: a zero row, rows whose float16 scale is subnormal, an outlier row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 80, generator=g) * torch.logspace(-6, 1, 96)[:, None]
    w[3] = 0
    w[7, 5] *= 40
    b = torch.rand(64, 200, generator=g) - 0.5
    return {"a.weight": w, "b.weight": b, "tall.weight": torch.randn(300, 64, generator=g)}


def small_tensors() -> dict[str, torch.Tensor]:
    """What the plan keeps: 1-D gains, a [2, D] resid_mix, a [3, D] skip_weights, a [64, 63] matrix, other dtypes."""
    g = torch.Generator().manual_seed(5)
    return {"gain": torch.randn(80, generator=g), "resid_mix": torch.randn(2, 512, generator=g),
            "skip_weights": torch.randn(3, 512, generator=g), "narrow.weight": torch.randn(64, 63, generator=g),
            "gain_bf16": torch.randn(80, generator=g).bfloat16(), "scalar": torch.tensor(0.3),
            "counts": torch.arange(10), "flags": torch.tensor([True, False])}


def mixed_tensors() -> dict[str, torch.Tensor]:
    return {**random_matrices(1), **small_tensors()}


def calibration_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated inputs with unequal energies, as a layer sees them (independent ones leave GPTQ little to do)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return (torch.randn(rows, cols, generator=g) @ mixing) * torch.rand(cols, generator=g).add(0.2)


def hessians_for(state_dict: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for name, how in A.quantization_plan(state_dict, "int6_gptq_lzma").items():
        if how == "int6_gptq":
            x = calibration_inputs(512, state_dict[name].size(1), seed).double()
            out[name] = x.T @ x
    return out


def encode(state_dict: dict, codec: str) -> bytes:
    hessians = hessians_for(state_dict) if codec == "int6_gptq_lzma" else None
    return A.encode_artifact(state_dict, codec, META, hessians)


# ----------------------------------------------------------------------------------------------------------------------
# A trained model


def synthetic_batch(g: torch.Generator, batch: int = 4, length: int = 64, vocab: int = 256) -> torch.Tensor:
    """Sequences of a noisy affine recurrence: learnable structure, so a few steps move every weight."""
    x = torch.empty(batch, length + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(length):
        noise = torch.randint(0, 4, (batch,), generator=g)
        x[:, t + 1] = (x[:, t] * 5 + 3 + noise * (noise == 0)) % vocab
    return x


CONFIG = tg.ModelConfig(vocab_size=256, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2)


def model_loss(model: tg.GPT, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return model(batch[:, :-1], batch[:, 1:]).mean().item()


@pytest.fixture(scope="module")
def trained():
    """(model, its state dict, calibration batches, a held-out batch) of a tiny GPT after 30 Adam steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = tg.GPT(CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        batch = synthetic_batch(g)
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    calibration = [synthetic_batch(g)[:, :-1] for _ in range(2)]
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}, calibration, synthetic_batch(g)


@pytest.fixture(scope="module")
def trained_hessians(trained):
    model, state_dict, calibration, _ = trained
    names = [n for n, how in A.quantization_plan(state_dict, "int6_gptq_lzma").items() if how == "int6_gptq"]
    return A.collect_hessians(model, calibration, lambda m, batch: m(batch[:, :-1], batch[:, 1:]), names)


# ----------------------------------------------------------------------------------------------------------------------
# int6 packing


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 102])
def test_int6_packing_round_trips_and_matches_bit_by_bit_reference(count):
    g = torch.Generator().manual_seed(count)
    q = torch.randint(-31, 32, (count,), generator=g).numpy()
    packed = A.pack_int6(q)
    assert packed.dtype == np.uint8 and packed.size == A.packed_int6_bytes(count) == 3 * ((count + 3) // 4)
    assert A.unpack_int6(packed, count).tolist() == q.tolist()
    assert A.unpack_int6_reference(packed.tobytes(), count) == q.tolist()
    # any bytes at all: the fast unpacking reads them as the reference does
    noise = torch.randint(0, 256, (A.packed_int6_bytes(count),), generator=g, dtype=torch.uint8).numpy()
    assert A.unpack_int6(noise, count).tolist() == A.unpack_int6_reference(noise.tobytes(), count)


def test_int6_packing_refuses_values_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        A.pack_int6(np.array([0, 32]))


# ----------------------------------------------------------------------------------------------------------------------
# Bounds of the round trip


def check_int8_bound(original: dict, decoded: dict, data: bytes, names) -> None:
    for name in names:
        w = original[name].float()
        q, scale = stored_quantized(data, name)
        assert q.abs().max() <= 127
        err = (w - decoded[name].float()).abs()
        assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all(), name  # half a step of each row's scale
        row_max = w.abs().amax(dim=1)
        normal = row_max / 127 >= 2 ** -14  # float16 normal range: the scale is rounded up by under 2^-10
        assert (scale[normal] <= row_max[normal] / 127 * (1 + 2 ** -10)).all(), name


def check_int6_bound(original: dict, decoded: dict, data: bytes, names) -> None:
    for name in names:
        w = original[name].float()
        q, scale = stored_quantized(data, name)
        assert q.abs().max() <= 31
        w_hat = decoded[name].float()
        assert torch.equal(w_hat, q.float() * scale[:, None])
        # within half a step, except the values beyond the row's clip (31 steps), which move to the clip
        bound = torch.maximum(scale[:, None] / 2, w.abs() - 31 * scale[:, None])
        assert ((w - w_hat).abs() <= bound * (1 + 1e-6)).all(), name
        # the chosen clip is never worse than clipping nothing (the maximum is one of the candidates)
        max_scale = A.float16_scale(w.abs().amax(dim=1) / 31).float()
        plain = A.round_to_grid(w, max_scale, 31) * max_scale[:, None]
        assert ((w - w_hat).square().sum(1) <= (w - plain).square().sum(1) * (1 + 1e-6)).all(), name


@pytest.mark.parametrize("codec", A.LEGACY_CODECS)
def test_random_matrices_round_trip_within_bound(codec):
    state_dict = random_matrices(0)
    data = encode(state_dict, codec)
    decoded, meta = A.decode_artifact(data)
    assert meta == META
    assert list(decoded) == list(state_dict)
    for name, w in state_dict.items():
        assert decoded[name].dtype == w.dtype and decoded[name].shape == w.shape
    assert (decoded["a.weight"][3] == 0).all()
    if codec == "int8_zlib":
        check_int8_bound(state_dict, decoded, data, state_dict)
    elif codec == "int6_lzma":
        check_int6_bound(state_dict, decoded, data, state_dict)
    else:
        check_gptq_bound(state_dict, decoded, data, hessians_for(state_dict))


def check_gptq_bound(original: dict, decoded: dict, data: bytes, hessians: dict) -> None:
    """GPTQ moves values by more than half a step on purpose; its bound is on the outputs: per row, the error on the
    calibration inputs is at most plain rounding's (int6_lzma's), and every value is on the row's int6 grid."""
    for name, hessian in hessians.items():
        w = original[name].float()
        q, scale = stored_quantized(data, name)
        assert q.abs().max() <= 31 and torch.equal(decoded[name].float(), q.float() * scale[:, None])
        plain_q, plain_scale = A.quantize_int6_rows(w)
        plain = A.output_error(w, A.dequantize_rows(plain_q, plain_scale, torch.float32), hessian)
        gptq = A.output_error(w, decoded[name], hessian)
        assert (gptq <= plain * (1 + 1e-9)).all(), name


@pytest.mark.parametrize("codec", A.LEGACY_CODECS)
def test_trained_model_round_trip_within_bound(codec, trained, trained_hessians):
    model, state_dict, _, held_out = trained
    hessians = trained_hessians if codec == "int6_gptq_lzma" else None
    data = A.encode_artifact(state_dict, codec, META, hessians)
    decoded, meta = A.decode_artifact(data)
    plan = A.quantization_plan(state_dict, codec)
    assert plan["tok_emb.weight"] == "int8" and plan["blocks.0.attn.c_k.weight"] != "keep"  # c_k: 64 x 128
    assert plan["blocks.0.resid_mix"] == plan["skip_weights"] == plan["blocks.0.attn.q_gain"] == "keep"
    int8 = [n for n, how in plan.items() if how == "int8"]
    int6 = [n for n, how in plan.items() if how.startswith("int6")]
    check_int8_bound(state_dict, decoded, data, int8)
    if codec == "int6_lzma":
        check_int6_bound(state_dict, decoded, data, int6)
    if codec == "int6_gptq_lzma":
        check_gptq_bound(state_dict, decoded, data, hessians)
    for name, how in plan.items():
        if how == "keep":
            assert torch.equal(decoded[name], state_dict[name]) and decoded[name].dtype == state_dict[name].dtype
    # the decoded state dict is the model's: it loads strictly, and the model still predicts nearly as well
    restored = tg.GPT(CONFIG)
    restored.load_state_dict(decoded, strict=True)
    restored.eval()
    assert abs(model_loss(restored, held_out) - model_loss(model, held_out)) < 0.005  # measured: 2e-4 at most


# ----------------------------------------------------------------------------------------------------------------------
# Exactness, determinism, sizes


@pytest.mark.parametrize("codec", A.LEGACY_CODECS)
def test_kept_tensors_come_back_exactly_in_their_dtype(codec):
    state_dict = {**small_tensors(), "big.weight": torch.randn(64, 64).bfloat16()}
    data = encode(state_dict, codec)
    decoded, _ = A.decode_artifact(data)
    plan = A.quantization_plan(state_dict, codec)
    assert plan["big.weight"] != "keep" and decoded["big.weight"].dtype == torch.bfloat16
    for name, t in small_tensors().items():
        assert plan[name] == "keep"
        assert decoded[name].dtype == t.dtype and decoded[name].shape == t.shape and torch.equal(decoded[name], t), name


@pytest.mark.parametrize("codec", A.LEGACY_CODECS)
def test_same_weights_same_bytes(codec):
    state_dict = mixed_tensors()
    data = encode(state_dict, codec)
    # the same values in new storage (and a view into a larger one) give the same bytes
    copies = {name: t.clone() for name, t in state_dict.items()}
    big = torch.zeros(1000)
    big[100:180] = state_dict["gain"]
    copies["gain"] = big[100:180]
    assert encode(copies, codec) == data
    changed = dict(copies, gain=copies["gain"].clone())
    changed["gain"][0] += 1
    assert encode(changed, codec) != data


def test_reported_size_is_the_file_size(tmp_path):
    state_dict = random_matrices(2)
    for codec in A.LEGACY_CODECS:
        data = encode(state_dict, codec)
        path = tmp_path / f"model_{codec}.ptz"
        write_atomic(str(path), data)  # as train_gpt.py writes the .ptz
        assert len(data) == os.path.getsize(path) == len(path.read_bytes())
        decoded, meta = A.read_artifact(str(path))
        assert meta == META and torch.equal(decoded["b.weight"], A.decode_artifact(data)[0]["b.weight"])
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary files were renamed


@pytest.mark.slow
def test_same_bytes_in_a_fresh_process(tmp_path):
    script = ("import sys\n"
              "import test_artifact as t\n"
              "for codec in t.A.LEGACY_CODECS:\n"
              "    open(sys.argv[1] + codec, 'wb').write(t.encode(t.mixed_tensors(), codec))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "x_")], check=True, cwd=ROOT, env=env)
    for codec in A.LEGACY_CODECS:  # (the child runs with torch's default thread count, this process with one)
        assert (tmp_path / f"x_{codec}").read_bytes() == encode(mixed_tensors(), codec)


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ


def test_gptq_matches_the_reference_on_a_small_layer():
    """Blocks of 32 over 72 columns (the last block partial), a dead input (always zero), unequal row scales."""
    g = torch.Generator().manual_seed(3)
    x = calibration_inputs(400, 72, seed=3)
    x[:, 10] = 0
    hessian = x.double().T @ x.double()
    w = torch.randn(40, 72, generator=g) * torch.rand(40, 1, generator=g).add(0.1)
    scale = A.int6_clip_candidates(w)[2]
    fast = A.gptq_quantize(w, hessian, scale, block=32)
    slow = A.gptq_reference(w, hessian, scale)
    assert torch.equal(fast, slow)
    assert fast.abs().max() <= 31 and torch.equal(fast, fast.round())
    # one block, and blocks of one column, are the same algorithm
    assert torch.equal(A.gptq_quantize(w, hessian, scale, block=72), slow)
    assert torch.equal(A.gptq_quantize(w, hessian, scale, block=1), slow)


def test_gptq_reconstructs_calibration_outputs_better_than_rounding():
    g = torch.Generator().manual_seed(4)
    x = calibration_inputs(1000, 96, seed=4)
    w = torch.randn(64, 96, generator=g) * 0.05
    hessian = x.double().T @ x.double()

    def output_error(w_hat):
        return (x.double() @ (w.double() - w_hat.double()).T).square().sum().item()

    # the same scales, rounded plainly and by GPTQ
    scale = A.int6_clip_candidates(w)[0]
    plain = A.round_to_grid(w, scale, 31) * scale.float()[:, None]
    gptq = A.gptq_quantize(w, hessian, scale) * scale.double()[:, None]
    assert output_error(gptq) < 0.7 * output_error(plain)
    # the codecs: int6_gptq_lzma against int6_lzma
    state_dict = {"layer.weight": w}
    decoded_gptq, _ = A.decode_artifact(A.encode_artifact(state_dict, "int6_gptq_lzma", {}, {"layer.weight": hessian}))
    decoded_plain, _ = A.decode_artifact(A.encode_artifact(state_dict, "int6_lzma", {}))
    assert output_error(decoded_gptq["layer.weight"]) < 0.7 * output_error(decoded_plain["layer.weight"])


def test_gptq_codec_needs_every_hessian():
    state_dict = random_matrices(0)
    hessians = hessians_for(state_dict)
    del hessians["b.weight"]
    with pytest.raises(ValueError, match="missing: b.weight"):
        A.encode_artifact(state_dict, "int6_gptq_lzma", {}, hessians)
    with pytest.raises(ValueError, match="missing: a.weight, b.weight, tall.weight"):
        A.encode_artifact(state_dict, "int6_gptq_lzma", {})


def test_collect_hessians_sums_the_inputs_of_each_linear_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(tg.CastedLinear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6))
    batches = [torch.randn(3, 5, 12), torch.randn(2, 7, 12)]
    hessians = A.collect_hessians(model, batches, lambda m, b: m(b), ["0.weight", "2.weight"])
    x0 = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    with torch.no_grad():
        x2 = torch.relu(model[0](x0.float())).double()
    assert hessians["0.weight"].dtype == torch.float64
    torch.testing.assert_close(hessians["0.weight"], x0.T @ x0)
    torch.testing.assert_close(hessians["2.weight"], x2.T @ x2)
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks  # hooks removed
    with pytest.raises(ValueError, match="1.weight is not the weight of an nn.Linear"):
        A.collect_hessians(model, batches, lambda m, b: m(b), ["1.weight"])
    with pytest.raises(ValueError, match="no input reached 2.weight"):
        A.collect_hessians(model, batches, lambda m, b: m[0](b), ["0.weight", "2.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def artifacts():
    state_dict = {**random_matrices(0), **small_tensors()}
    return {codec: encode(state_dict, codec) for codec in A.LEGACY_CODECS}


@pytest.mark.parametrize("codec", A.LEGACY_CODECS)
def test_damaged_artifacts_are_one_value_error(codec, artifacts):
    data = artifacts[codec]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    torch_save_of_other = io.BytesIO()
    torch.save({"model": torch.zeros(3)}, torch_save_of_other)
    wrong_stream = (lzma.compress if codec == "int8_zlib" else zlib.compress)(
        (lzma.decompress if codec != "int8_zlib" else zlib.decompress)(data))
    cases = {
        "empty": (b"", "not an artifact"),
        "a checkpoint": (b"PK\x03\x04" + bytes(100), "not an artifact"),
        "truncated to the header": (data[:10], "truncated|does not decompress"),
        "truncated by one byte": (data[:-1], "truncated|does not decompress"),
        "one byte changed": (bytes(flipped), "damaged artifact"),
        "trailing bytes": (data + b"junk", "bytes after the end"),
        "zlib of other bytes": (zlib.compress(b"hello" * 10, 9), "not a torch.save archive"),
        "another torch.save": (zlib.compress(torch_save_of_other.getvalue(), 9), "not an artifact of this format"),
        "the other compressor": (wrong_stream, "codec"),
    }
    for what, (bad, message) in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            A.decode_artifact(bad)
        assert "\n" not in str(e.value), what


def test_damaged_tensor_entry_is_named(tmp_path):
    state_dict = random_matrices(0)
    raw = lzma.decompress(encode(state_dict, "int6_lzma"))
    payload = torch.load(io.BytesIO(raw), weights_only=True)
    payload["tensors"]["b.weight"]["packed"] = payload["tensors"]["b.weight"]["packed"][:-3]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = tmp_path / "bad.ptz"
    path.write_bytes(lzma.compress(buffer.getvalue()))
    with pytest.raises(ValueError, match=r"bad.ptz: damaged artifact: tensor b.weight: 9597 packed bytes"):
        A.read_artifact(str(path))
    with pytest.raises(ValueError, match="missing.ptz: .*No such file"):
        A.read_artifact(str(tmp_path / "missing.ptz"))


def test_bad_arguments_are_clear_errors():
    state_dict = random_matrices(0)
    with pytest.raises(ValueError, match="unknown artifact codec 'int4'"):
        A.encode_artifact(state_dict, "int4", {})
    with pytest.raises(ValueError, match="meta must be JSON-able"):
        A.encode_artifact(state_dict, "int8_zlib", {"config": object()})
    with pytest.raises(ValueError, match="too large"):
        A.encode_artifact({"x.weight": torch.full((64, 64), 1e8)}, "int8_zlib", {})
    assert json.loads(payload_of(A.encode_artifact({}, "int8_zlib", META))["meta"]) == META


# ----------------------------------------------------------------------------------------------------------------------
# train_gpt.py: calibration, export and the round trip; the record's code bytes

RUN_ENV = {"VOCAB_SIZE": "256", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "4",
           "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "128", "TRAIN_MICRO_BATCHES": "2", "COMPILE": "0",
           "ARTIFACT_CALIBRATION_BATCHES": "3"}  # width 64: every block matrix is quantized


def run_hp(tmp_path, **env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**RUN_ENV, "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "RUN_ID": "art",
                                        "DATA_PATH": str(tmp_path / "data"), **env})


CPU = tg.DistributedEnv(rank=0, world_size=1, device=torch.device("cpu"))


def random_model(hp: tg.Hyperparameters, fused: frozenset = frozenset(), seed: int = 0) -> tg.GPT:
    """build_model's model of hp with the kernels a CPU run chooses, every weight random (zero-initialised projections
    would quantize to nothing)."""
    torch.manual_seed(seed)
    model_kernels = tg.choose_kernels(fused, "auto", "cpu", gist=hp.gist_tokens > 0)
    model = tg.build_model(tg.ModelConfig.from_hyperparameters(hp), model_kernels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def token_stream(tmp_path_factory) -> data_loader.TokenStream:
    rng = np.random.default_rng(4)
    docs = [np.concatenate([[data_loader.BOS_ID], rng.integers(4, 256, int(n))]) for n in rng.integers(5, 90, 60)]
    directory = tmp_path_factory.mktemp("calibration")
    write_shard(directory / "c_train_000000.bin", np.concatenate(docs))
    return data_loader.TokenStream(str(directory / "c_train_*.bin"), 256)


def training_loader(stream, hp) -> data_loader.PrefetchingLoader:
    config = data_loader.LoaderConfig(seq_len=hp.train_seq_len, batch_tokens=hp.train_batch_tokens,
                                      micro_batches=hp.train_micro_batches, seed=hp.seed)
    return data_loader.PrefetchingLoader(data_loader.DocumentLoader(stream, config), pin_memory=False)


def hessians_by_hand(model: tg.GPT, batches, hp, names) -> dict[str, torch.Tensor]:
    """X^T X of the inputs of each named layer, captured by forward hooks on a plain (unfused) model; the tied
    embedding's: of the final hidden states, the head's input, computed by a second forward."""
    layers = dict(model.named_modules())
    sums = {name: 0 for name in names}
    handles = []
    for name in names:
        if name == "tok_emb.weight":
            continue
        def hook(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x
        handles.append(layers[name.removesuffix(".weight")].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(torch.as_tensor(b.inputs)[None].long(), torch.as_tensor(b.targets)[None],
                      torch.as_tensor(b.cu_seqlens), hp.train_seq_len)
    finally:
        for h in handles:
            h.remove()
    if "tok_emb.weight" in names:
        with torch.no_grad():
            for b in batches:
                x = model.hidden_states(torch.as_tensor(b.inputs)[None].long(), torch.as_tensor(b.cu_seqlens),
                                        hp.train_seq_len).reshape(-1, hp.model_dim).double()
                sums["tok_emb.weight"] = sums["tok_emb.weight"] + x.T @ x
    return sums


CALIBRATED = {"int6_gptq_lzma": dict(ARTIFACT="int6_gptq_lzma"),
              # the sdclip matrices are those above ARTIFACT_SMALL_NUMEL values: here every block matrix, and the
              # tied embedding, whose Hessian is of the head's input
              "sdclip_gptq": dict(ARTIFACT="sdclip_gptq", ARTIFACT_SMALL_NUMEL="0"),
              # auto: the Hessians of every candidate that needs them
              "auto": dict(ARTIFACT="auto", ARTIFACT_CANDIDATES="int8_zlib,int6_gptq_lzma,sdclip_gptq_lqer",
                           ARTIFACT_SMALL_NUMEL="0")}


@pytest.mark.parametrize("fused, codec", [(frozenset(), "int6_gptq_lzma"), (frozenset({"relu2_linear"}), "int6_gptq_lzma"),
                                          (frozenset(), "sdclip_gptq"), (frozenset({"relu2_linear"}), "auto")],
                         ids=["plain", "fused-relu2", "sdclip_gptq", "auto-fused-relu2"])
def test_calibration_hessians_are_those_of_the_next_training_batches(tmp_path, token_stream, fused, codec):
    """calibrate_artifact: the Hessians of every GPTQ matrix of the codecs the export may write, over this process's
    next ARTIFACT_CALIBRATION_BATCHES training micro-batches (never the ones before), also for a model whose fused
    relu2_linear never calls mlp.fc; the time is logged and added to the training time."""
    hp = run_hp(tmp_path, FUSED=",".join(fused) or "0", **CALIBRATED[codec])
    model = random_model(hp, fused)
    assert model.kernels.fused == fused
    loader = training_loader(token_stream, hp)
    loader.next_step()  # a training step before: calibration takes the batches after it
    lines = []
    hessians, train_ms = tg.calibrate_artifact(model, loader, hp, CPU, 1000.0, lines.append)

    reference_loader = training_loader(token_stream, hp)
    reference_loader.next_step()
    batches = reference_loader.next_step() + reference_loader.next_step()  # 2 micro-batches a step
    names = [n for n, how in A.quantization_plan(model.state_dict(), "int6_gptq_lzma").items() if how == "int6_gptq"]
    assert "blocks.0.mlp.fc.weight" in names and len(names) == 2 * 6
    if codec != "int6_gptq_lzma":
        names.append("tok_emb.weight")
    plain = random_model(hp)
    expected = hessians_by_hand(plain, batches[:3], hp, names)
    assert sorted(hessians) == sorted(names)
    for name in names:
        torch.testing.assert_close(hessians[name], expected[name], rtol=1e-9, atol=1e-9, msg=name)
    assert loader.loader.position == reference_loader.loader.position  # it consumed two more steps
    assert len(lines) == 1
    fields = re.fullmatch(r"artifact_calibration: batches:3 time:(\d+)ms train_time:(\d+)ms "
                          r"\(counted as training time\)", lines[0])
    assert fields, lines[0]
    assert train_ms >= 1000.0 and abs(train_ms - 1000.0 - float(fields.group(1))) <= 1
    assert int(fields.group(2)) == round(train_ms)


@pytest.mark.parametrize("codec", ["int8_zlib", "int6_lzma", "sdclip_lqer_grouped", "sdclip_gptq"])
def test_calibration_is_nothing_for_other_codecs(tmp_path, token_stream, codec):
    """No calibration without a GPTQ codec, nor for sdclip_gptq when every matrix is at most ARTIFACT_SMALL_NUMEL
    values (all float16: nothing for GPTQ to quantize)."""
    hp = run_hp(tmp_path, ARTIFACT=codec)
    if codec == "sdclip_gptq":
        assert A.hessian_names(random_model(hp).state_dict(), codec, hp.artifact_small_numel) == []
    loader = training_loader(token_stream, hp)
    lines = []
    assert tg.calibrate_artifact(random_model(hp), loader, hp, CPU, 1234.5, lines.append) == (None, 1234.5)
    assert lines == [] and loader.loader.position == 0  # no batch drawn


def artifact_fields(line: str) -> dict:
    assert line.startswith("artifact: "), line
    return dict(field.split(":", 1) for field in line.removeprefix("artifact: ").split())


@pytest.mark.parametrize("codec, gist_tokens", [("int8_zlib", 0), ("int6_lzma", 0), ("int6_gptq_lzma", 0),
                                                ("int8_zlib", 2)])
def test_export_writes_the_artifact_counts_the_payload_and_round_trips(tmp_path, token_stream, codec, gist_tokens):
    """export_artifact: CHECKPOINT_DIR/RUN_ID.ptz holds the encoded weights; the artifact line's code bytes are the sizes
    of payload_files(hp) (with gist.py for a gist model), its total the two together; the model it returns is
    build_model's (same class, same kernels) with the weights read back from the file."""
    hp = run_hp(tmp_path, ARTIFACT=codec, GIST_TOKENS=str(gist_tokens), GIST_SEGMENT="8")
    model = random_model(hp)
    hessians = None
    if codec == "int6_gptq_lzma":
        hessians, _ = tg.calibrate_artifact(model, training_loader(token_stream, hp), hp, CPU, 0.0, print)
    lines = []
    roundtrip, total, written = tg.export_artifact(model, hp, "f" * 64, hessians, CPU, lines.append)

    path = tmp_path / "ckpt" / "art.ptz"
    assert lines[0].startswith(f"artifact_encode: codec:{codec} time:")
    fields = artifact_fields(lines[-1])
    code = tg.payload_files(hp)
    assert (ROOT / "gist.py" in code) == bool(gist_tokens)
    assert fields["codec"] == codec == written and int(fields["model_bytes"]) == path.stat().st_size
    assert int(fields["code_bytes"]) == int(fields["raw_code_bytes"]) == sum(f.stat().st_size for f in code)
    assert fields["code"] == "raw" and not (tmp_path / "ckpt" / "art.pyz").exists()
    assert int(fields["total_bytes"]) == total == path.stat().st_size + int(fields["code_bytes"])
    assert fields["limit"] == str(hp.artifact_limit_bytes)
    assert fields["files"].split(",") == [str(path)] + [f.relative_to(ROOT).as_posix() for f in code]

    decoded, meta = A.read_artifact(str(path))
    assert meta["codec"] == codec and meta["run_id"] == "art" and meta["tokenizer_sha256"] == "f" * 64
    assert meta["model_config"] == dataclasses.asdict(model.config)
    assert type(roundtrip) is type(model) and roundtrip.kernels == model.kernels
    assert (type(model) is tg.GPT) == (not gist_tokens) and isinstance(model, tg.GPT)
    for name, t in roundtrip.state_dict().items():
        assert torch.equal(t, decoded[name]), name
    ids = torch.randint(4, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(ids, torch.roll(ids, -1, 1)), roundtrip.eval()(ids, torch.roll(ids, -1, 1))
    assert (after - before).abs().mean() < 0.05 * before.mean()  # close to the exported model, not equal
    assert not torch.equal(after, before)


def test_export_with_bundled_code_counts_the_bundle_it_writes(tmp_path):
    """ARTIFACT_CODE=bundle: RUN_ID.pyz beside the artifact is the bundle of payload_files (kernels/bundle.py among
    them), its size is the line's code_bytes (raw_code_bytes the files' sizes), and the files list names it."""
    hp = run_hp(tmp_path, ARTIFACT="int8_zlib", ARTIFACT_CODE="bundle")
    lines = []
    _, total, codec = tg.export_artifact(random_model(hp), hp, "f" * 64, None, CPU, lines.append)
    fields = artifact_fields(lines[-1])
    code = tg.payload_files(hp)
    names = [f.relative_to(ROOT).as_posix() for f in code]
    ptz, pyz = tmp_path / "ckpt" / "art.ptz", tmp_path / "ckpt" / "art.pyz"
    assert "kernels/bundle.py" in names and codec == "int8_zlib"
    assert pyz.read_bytes() == bundle.build_bundle(ROOT, names)
    assert bundle.read_bundle(str(pyz)) == {name: (ROOT / name).read_bytes() for name in names}
    assert fields["code"] == "bundle" and int(fields["code_bytes"]) == pyz.stat().st_size
    assert int(fields["raw_code_bytes"]) == sum(f.stat().st_size for f in code) > 3 * pyz.stat().st_size
    assert total == int(fields["total_bytes"]) == ptz.stat().st_size + pyz.stat().st_size
    assert fields["files"].split(",") == [str(ptz), str(pyz)] + names


def test_auto_keeps_the_first_candidate_whose_total_fits_with_the_margin(tmp_path):
    """ARTIFACT=auto tries ARTIFACT_CANDIDATES in order and writes the first whose total is at most the limit less
    ARTIFACT_MARGIN_BYTES; when none fits, the last one (the run then fails on the limit)."""
    model = random_model(run_hp(tmp_path))
    code_bytes, margin = sum(f.stat().st_size for f in tg.payload_files()), 1000

    def export(limit):
        hp = run_hp(tmp_path, ARTIFACT="auto", ARTIFACT_CANDIDATES="int8_zlib,int6_lzma",
                    ARTIFACT_LIMIT_BYTES=str(limit), ARTIFACT_MARGIN_BYTES=str(margin))
        lines = []
        _, total, codec = tg.export_artifact(model, hp, "f" * 64, None, CPU, lines.append)
        tried = [re.match(r"artifact_encode: codec:(\S+) time:\d+ms model_bytes:(\d+) total_bytes:(\d+) "
                          r"(fits|over:\d+) room:(\d+)$", line).groups() for line in lines[:-1]]
        assert codec == artifact_fields(lines[-1])["codec"] == tried[-1][0] == A.read_artifact(
            str(tmp_path / "ckpt" / "art.ptz"))[1]["codec"]
        assert [t[0] for t in tried] == ["int8_zlib", "int6_lzma"][:len(tried)] and total == int(tried[-1][2])
        for _, model_bytes, line_total, verdict, room in tried:
            assert int(room) == limit - margin and int(line_total) == int(model_bytes) + code_bytes
            over = int(line_total) - int(room)
            assert verdict == ("fits" if over <= 0 else f"over:{over}")
        return codec, {t[0]: int(t[2]) for t in tried}

    codec, totals = export(code_bytes + 10)  # nothing fits: both tried, the last one written
    assert codec == "int6_lzma" and totals["int6_lzma"] < totals["int8_zlib"]
    # (the limit is in the metadata, so a total moves by a byte or so with it)
    assert export(totals["int8_zlib"] + margin + 100)[0] == "int8_zlib"
    codec, tried = export(totals["int8_zlib"] + margin // 2)  # under the limit, but not with the margin
    assert codec == "int6_lzma" and list(tried) == ["int8_zlib", "int6_lzma"]


def test_artifact_settings_are_checked_in_one_line(tmp_path):
    bad = {"ARTIFACT": ("sdclip_int4", "must be none, auto or one of"),
           "ARTIFACT_CANDIDATES": ("int8_zlib,int8_zlib", "must be distinct codecs"),
           "ARTIFACT_CODE": ("zip", "must be raw or bundle"),
           "ARTIFACT_MARGIN_BYTES": ("-1", "must be >= 0"),
           "ARTIFACT_SMALL_NUMEL": ("-1", "must be >= 0")}
    for name, (value, message) in bad.items():
        with pytest.raises(tg.ConfigError, match=rf"^{name}=.*{message}") as e:
            run_hp(tmp_path, **{name: value})
        assert "\n" not in str(e.value)
    with pytest.raises(tg.ConfigError, match="^ARTIFACT_MARGIN_BYTES=16000000: .*with ARTIFACT=auto less than"):
        run_hp(tmp_path, ARTIFACT="auto", ARTIFACT_MARGIN_BYTES="16000000")
    assert run_hp(tmp_path, ARTIFACT="int8_zlib", ARTIFACT_LIMIT_BYTES="1000").artifact_margin_bytes == 100_000


# The record's own modules, as import statements name them: everything reachable from train_gpt.py and eval_ttt.py.

def module_files(name: str) -> list[str]:
    """The repository files that importing module `name` runs: each package's __init__.py on the way, then the module
    (nothing for a module from outside the repository)."""
    parts, found = name.split("."), []
    for i in range(1, len(parts) + 1):
        path = ROOT.joinpath(*parts[:i])
        if (path / "__init__.py").is_file():
            found.append(f"{'/'.join(parts[:i])}/__init__.py")
        elif path.with_suffix(".py").is_file():
            found.append(f"{'/'.join(parts[:i])}.py")
        else:
            break
    return found


def imports_of(relative: str) -> dict[str, bool]:
    """{repository file: imported at module level} for every import statement of a repository file (anywhere in it:
    function-level imports count too; module level means not inside a function or class body)."""
    tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"))
    package = relative.rsplit("/", 1)[0].replace("/", ".") if "/" in relative else ""
    top_level = set()
    for node in tree.body:  # module level, including inside top-level if / try
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                else ():
            top_level.add(id(inner))
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            for path in module_files(name):
                found[path] = found.get(path, False) or id(node) in top_level
    return found


def payload_closure(starts) -> dict[str, bool]:
    """{file: reached through module-level imports only} over the transitive imports of `starts`."""
    reached = {start: True for start in starts}
    todo = list(starts)
    while todo:
        current = todo.pop()
        for path, module_level in imports_of(current).items():
            always = reached[current] and module_level
            if path not in reached or (always and not reached[path]):  # new, or newly reached at module level
                reached[path] = always
                todo.append(path)
    return reached


def test_payload_is_exactly_what_train_gpt_and_eval_ttt_import():
    """PAYLOAD (the code bytes of every artifact, embedded in every log) is exactly the repository files that
    train_gpt.py and eval_ttt.py import, transitively; gist.py, reached only through an import inside a function, is
    EXPERIMENT_PAYLOAD's, switched on by its hyperparameter."""
    reached = payload_closure(["train_gpt.py", "eval_ttt.py"])
    assert len(tg.PAYLOAD) == len(set(tg.PAYLOAD))
    assert set(reached) == set(tg.PAYLOAD) | set(tg.EXPERIMENT_PAYLOAD)
    experiment = {path for path, always in reached.items() if path in tg.EXPERIMENT_PAYLOAD}
    assert experiment == set(tg.EXPERIMENT_PAYLOAD) and not any(reached[p] for p in experiment)
    fields = {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    assert set(tg.EXPERIMENT_PAYLOAD.values()) <= fields
    assert [p.relative_to(ROOT).as_posix() for p in tg.payload_files()] == list(tg.PAYLOAD)
    assert [p.relative_to(ROOT).as_posix() for p in tg.payload_files(run_hp(Path("/tmp"), GIST_TOKENS="2", GIST_SEGMENT="8"))] == \
        list(tg.PAYLOAD) + ["gist.py"]


def test_gist_is_imported_only_for_a_gist_model():
    script = ("import sys, train_gpt as tg\n"
              "tg.build_model(tg.ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1))\n"
              "assert 'gist' not in sys.modules, 'gist imported without gist tokens'\n"
              "tg.build_model(tg.ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, gist_tokens=2,"
              " gist_segment=8), tg.choose_kernels(frozenset(), 'reference', 'cpu', gist=True))\n"
              "assert 'gist' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def embedded_files(log: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file a log embeds: `#### file NAME bytes=N sha256=H`, N bytes, `#### end NAME`, in
    order; every header's size and sha256 checked against the bytes that follow it."""
    files, offset = [], 0
    header = re.compile(rb"#### file (\S+) bytes=(\d+) sha256=([0-9a-f]{64})\n")
    while (match := header.match(log, offset)) is not None:
        name, size = match.group(1).decode(), int(match.group(2))
        data = log[match.end(): match.end() + size]
        assert hashlib.sha256(data).hexdigest() == match.group(3).decode(), name
        end = match.end() + size
        assert log[end: end + len(f"\n#### end {name}\n")] == f"\n#### end {name}\n".encode(), name
        files.append((name, data))
        offset = end + len(f"\n#### end {name}\n")
    assert b"#### file" not in log[offset:]
    return files


@pytest.mark.parametrize("gist_tokens", [0, 2])
def test_the_log_embeds_exactly_the_payload_files(tmp_path, monkeypatch, capsys, gist_tokens):
    """train_gpt.main writes payload_files(hp) into the log, byte for byte, and nothing else (a run stopped at its data,
    here a missing tokenizer: the code comes first)."""
    for name in tg.Hyperparameters.env_overrides():
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    env = {**RUN_ENV, "DATA_PATH": str(tmp_path / "absent"), "RUN_ID": "embed", "LOG_DIR": str(tmp_path),
           "GIST_TOKENS": str(gist_tokens), "GIST_SEGMENT": "8"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert tg.main() == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert "tokenizer file not found" in capsys.readouterr().err
    hp = tg.Hyperparameters.from_env(env)
    embedded = embedded_files((tmp_path / "embed.txt").read_bytes())
    assert [(name, data) for name, data in embedded] == \
        [(p.relative_to(ROOT).as_posix(), p.read_bytes()) for p in tg.payload_files(hp)]
    assert ("gist.py" in dict(embedded)) == bool(gist_tokens)

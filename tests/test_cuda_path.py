"""What the CUDA path needs, shown on a CPU (issue 10): attention gets one dtype under torch >= 2.12's autocast policy,
backends are called the way their sources define them, compiled training never recompiles after warm-up, the loader and
the optimizers keep the host off the critical path, and every rank makes the same update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_eval_modes import TINY, small_dir, tiny_model, val  # noqa: F401  (shared fixtures: a small validation set)

import eval_ttt
import kernels
import train_gpt as tg
from data import loader as data_loader
from eval_ttt import EvalSpec
from kernels import attention as attn

NEWTON_SCHULZ = kernels.REFERENCES["newton_schulz"]  # one matrix at a time, as Muon's definition reads

# ----------------------------------------------------------------------------------------------------------------------
# 1. one dtype reaches attention, whatever the norm returns


def cuda_kernels(**changes) -> tg.Kernels:
    """The kernels choose_kernels picks for a CPU, with the CUDA path's autocast dtype: the model then runs its matmuls
    in bf16 under its own autocast (GPT.precision), as on a GPU."""
    return dataclasses.replace(tg.choose_kernels(frozenset(), "auto", "cpu"), autocast=torch.bfloat16, **changes)


def bf16_tiny_model(seed: int = 0) -> tg.GPT:
    """tiny_model's weights in a model that holds the CUDA path's bf16 autocast."""
    plain = tiny_model(seed)
    model = tg.build_model(plain.config, cuda_kernels())
    model.load_state_dict(plain.state_dict())
    return model.requires_grad_(False).eval()


def test_kernels_hold_the_autocast_dtype():
    """choose_kernels: bf16 autocast on CUDA, none (fp32) on a CPU; the model's precision() is that autocast."""
    assert tg.choose_kernels(frozenset(), "reference", "cuda").autocast == torch.bfloat16
    assert tg.choose_kernels(frozenset(), "auto", "cpu").autocast is None and tg.Kernels().autocast is None
    with tiny_model().precision():
        assert not torch.is_autocast_enabled("cpu")
    with bf16_tiny_model().precision():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_model_autocast_equals_autocast_around_a_plain_model(packed):
    """A model holding bf16 autocast computes exactly what the fp32 model computes inside torch.autocast (what the
    training step used to wrap around it), losses and gradients, on fresh random inputs."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 1024, (1 if packed else 2, 40), generator=gen)
    targets = torch.roll(ids, -1, 1)
    cu = torch.tensor([0, 11, 29, 40], dtype=torch.int32) if packed else None
    plain, held = tiny_model(3).train().requires_grad_(True), bf16_tiny_model(3).train().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(ids, targets, cu, 40)
    expected.sum().backward()
    losses = held(ids, targets, cu, 40)
    losses.sum().backward()
    assert losses.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")  # autocast ends with forward
    torch.testing.assert_close(losses, expected, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), held.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # and it is bf16 arithmetic: the fp32 model differs
        assert not torch.equal(plain.eval()(ids, targets, cu, 40), held.eval()(ids, targets, cu, 40))


@pytest.fixture
def cuda_autocast_policy(monkeypatch):
    """Emulate CUDA bf16 autocast of torch >= 2.12 on the CPU, with a model that holds bf16 autocast (cuda_kernels):
    matmuls in bf16, and rms_norm on autocast's fp32 list (a bf16 input comes back fp32). Records the dtypes every
    attention call receives."""
    seen = []
    plain_rms_norm = F.rms_norm

    def fp32_rms_norm(x, *args, **kwargs):
        return plain_rms_norm(x.float() if x.dtype == torch.bfloat16 else x, *args, **kwargs)

    def recording_sdpa(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return plain_sdpa(q, k, v)

    # the reference varlen backend (the model's default) runs SDPA per segment; rows call it directly
    plain_sdpa = attn.sdpa_causal
    monkeypatch.setattr(F, "rms_norm", fp32_rms_norm)
    monkeypatch.setattr(attn, "sdpa_causal", recording_sdpa)
    monkeypatch.setattr(tg, "sdpa_causal", recording_sdpa)
    return seen


def test_policy_emulation_really_returns_fp32(cuda_autocast_policy):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert F.rms_norm(x, (8,)).dtype == torch.float32  # otherwise the tests below prove nothing


def assert_one_dtype(seen):
    assert seen, "attention was never called"
    assert all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), sorted(set(seen))


def test_training_forward_hands_attention_one_dtype(cuda_autocast_policy):
    model = bf16_tiny_model().train().requires_grad_(True)
    ids = torch.randint(4, 64, (1, 40))
    losses = model(ids, torch.roll(ids, -1, 1), torch.tensor([0, 12, 40], dtype=torch.int32), 40)  # no autocast here
    losses.sum().backward()
    assert_one_dtype(cuda_autocast_policy)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_evaluate_hands_attention_one_dtype(cuda_autocast_policy, val):  # noqa: F811
    result = eval_ttt.evaluate(bf16_tiny_model(), val, EvalSpec(mode="strided", window=64, stride=32, batch_tokens=512))
    assert_one_dtype(cuda_autocast_policy)
    assert np.isfinite(result.bpb)


@pytest.mark.slow
def test_ttt_hands_attention_one_dtype(cuda_autocast_policy, val):  # noqa: F811
    spec = EvalSpec(mode="ttt", window=64, chunk=16, lora_rank=4, doc_batch=3)
    result = eval_ttt.evaluate(bf16_tiny_model(), val, spec)
    assert_one_dtype(cuda_autocast_policy)
    assert np.isfinite(result.bpb)


# ----------------------------------------------------------------------------------------------------------------------
# 2. attention backends, called the way their sources define them


def random_packed(lengths, heads=4, kv_heads=2, head_dim=8, seed=0, pad_to=None):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(n, heads, head_dim, generator=gen)
    k, v = (torch.randn(n, kv_heads, head_dim, generator=gen) for _ in range(2))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    if pad_to:
        cu = np.pad(cu, (0, pad_to - len(cu)), constant_values=n)  # zero-length padding segments, as the loader adds
    return q, k, v, torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("lengths", [(5,), (1, 7, 3), (16, 1, 1, 9), (4, 0, 6)])
def test_masked_sdpa_equals_the_reference(lengths):
    q, k, v, cu = random_packed(lengths, seed=len(lengths), pad_to=8)
    expected = attn.varlen_attention_reference(q, k, v, cu, max(lengths))
    torch.testing.assert_close(attn.varlen_attention_masked(q, k, v, cu, max(lengths)), expected, rtol=1e-5, atol=1e-5)


def test_flash_backends_get_keyword_arguments(monkeypatch):
    """FA3 builds of early 2025 take (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, ...):
    passed positionally, max_seqlen would land in seqused. A fake module accepts keywords only."""
    import sys
    import types

    calls = []

    def flash_attn_varlen_func(q, k, v, *positional, **keywords):
        assert not positional, f"positional arguments after q, k, v: {positional}"
        calls.append(sorted(keywords))
        return attn.varlen_attention_reference(q, k, v, keywords["cu_seqlens_q"], keywords["max_seqlen_q"]), None

    for module in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
        q, k, v, cu = random_packed((3, 6))
        out = attn._flash_backend(module)(q, k, v, cu, 6)
        torch.testing.assert_close(out, attn.varlen_attention_reference(q, k, v, cu, 6))
    assert calls == [["causal", "cu_seqlens_k", "cu_seqlens_q", "max_seqlen_k", "max_seqlen_q"]] * 2


def test_auto_never_falls_back_to_a_slow_backend_on_cuda(monkeypatch):
    monkeypatch.setattr(attn, "load_varlen_backend", lambda name, device: None if name in ("fa3", "fa2", "torch_varlen")
                        else attn.varlen_attention_reference)
    with pytest.raises(attn.BackendError, match="no flash attention kernel.*pip install flash-attn"):
        attn.select_varlen_attention("auto", torch.device("cuda"))
    # asked for by name, the slow backends still run
    assert attn.select_varlen_attention("reference", torch.device("cuda")).name == "reference"


def test_auto_on_cpu_compiles_with_the_masked_backend():
    assert attn.select_varlen_attention("auto", torch.device("cpu"), compiling=True).name == "masked_sdpa"
    assert attn.select_varlen_attention("auto", torch.device("cpu"), compiling=False).name == "reference"


# ----------------------------------------------------------------------------------------------------------------------
# 3. compiled training: one graph, no recompiles after warm-up


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, sample_data):
    """One-paragraph and very long documents in one training split (the sample's tokenizer and validation shard)."""
    import shutil

    from data.shards import write_shard

    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    lengths = [int(rng.integers(3, 40)) if rng.random() < 0.95 else int(rng.integers(500, 1500)) for _ in range(600)]
    docs = [np.concatenate([[data_loader.BOS_ID], rng.integers(4, 1024, size=n)]) for n in lengths]
    write_shard(str(out / "mixed_train_000000.bin"), np.concatenate(docs))
    shutil.copyfile(sample_data / "tokenizer.model", out / "tokenizer.model")
    val = data_loader.TokenStream(data_loader.split_pattern(str(sample_data), "val"), 1024)
    write_shard(str(out / "mixed_val_000000.bin"), np.concatenate([val.document(k)[:200] for k in range(3)]))
    return out


# the frontier preset at this size: depth recurrence switches on at step 15 of 30, after both graphs were compiled
FRONTIER_RUN = {"PRESET": "pg1855", "VOCAB_SIZE": "1024", "RECUR_START_FRAC": "0.5", "MLP_MULT": "2"}


@pytest.mark.slow
@pytest.mark.parametrize("frontier", [False, True], ids=["baseline", "pg1855"])
def test_compiled_training_never_recompiles(mixed_corpus, tmp_path, frontier):
    """COMPILE=1 (fullgraph) on a CPU for 30 steps over short and long documents, with a segment cap low enough that
    some micro-batches overflow it: the step compiles once (the frontier's twice: with and without its repeated
    layers, both in the warm-up), with no graph break and no recompile afterwards."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "DATA_PATH": str(mixed_corpus), "RUN_ID": "compiled", "LOG_DIR": str(tmp_path),
           "CHECKPOINT_DIR": str(tmp_path), "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2",
           "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "512", "TRAIN_MICRO_BATCHES": "2",
           "TRAIN_MAX_SEGMENTS": "8", "ITERATIONS": "30", "WARMUP_STEPS": "2", "WARMDOWN_ITERS": "10",
           "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "EVAL_MODES": "flat", "EVAL_BATCH_TOKENS": "1024",
           "COMPILE": "1", "TRAIN_LOG_EVERY": "10", "OMP_NUM_THREADS": "1", **(FRONTIER_RUN if frontier else {})}
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "compiled.txt").read_text()
    # masked_sdpa trains compiled; evaluation runs eagerly with the reference, and the log names both
    assert re.search(r"^attention_backend: masked_sdpa evaluation:reference$", log, re.M)
    stats = re.search(r"^compile_stats: recompiles:(\d+) graph_breaks:(\d+) graphs:(\d+)$", log, re.M)
    assert stats, "no compile_stats line"
    recompiles, graph_breaks, graphs = map(int, stats.groups())
    assert (recompiles, graph_breaks) == (0, 0) and graphs >= 1
    if frontier:
        # at 2 layers the preset's RECUR_LAYERS is 1-1: layer 1 runs three times
        assert re.search(r"^recurrence: on at step:15 progress:0.500 layers:0 1 1 1$", log, re.M)
        assert "compile_warmup steps:4 " in log and graphs >= 2
    merged = int(re.search(r"^loader: merged_micro_batches:(\d+)", log, re.M).group(1))
    assert merged > 0  # the merge path ran inside the compiled step too
    assert re.search(r"^final val_loss:[0-9.]+ ", log, re.M)


# ----------------------------------------------------------------------------------------------------------------------
# 5. every rank makes the same update


@pytest.mark.slow
@pytest.mark.parametrize("slow_rank", [1, 0])
def test_ranks_stay_identical_when_one_starts_late(sample_data, tmp_path, slow_rank):
    """A wall-clock cap puts the warm-down on the clock from the first step. One rank starts its clock 1.5 s late; if a
    rank read its own clock, its learning rate (and so its weights) would differ from the other's. The time the log
    reports is the slowest rank's: with rank 0 late, rank 0's own clock is the shorter one."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "DATA_PATH": str(sample_data), "RUN_ID": "", "LOG_DIR": str(tmp_path),
           "CHECKPOINT_DIR": str(tmp_path), "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
           "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "512", "TRAIN_MICRO_BATCHES": "2", "ITERATIONS": "1000",
           "WARMDOWN_ITERS": "1000", "MAX_WALLCLOCK_SECONDS": "4", "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0",
           "VAL_MAX_DOCS": "2", "EVAL_MODES": "flat", "EVAL_BATCH_TOKENS": "1024", "COMPILE": "0",
           "TRAIN_LOG_EVERY": "1000", "OMP_NUM_THREADS": "1", "SLOW_RANK": str(slow_rank), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "helpers" / "slow_rank_train.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped_ms = int(re.search(r"stopping_early: wallclock_cap train_time:(\d+)ms", proc.stdout).group(1))
    reported_ms = int(re.search(r"^final val_loss:.* train_time:(\d+)ms", proc.stdout, re.M).group(1))
    assert reported_ms >= stopped_ms  # the agreed (slowest) clock at the last step, never rank 0's own shorter one
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    logs = list(tmp_path.glob("*.txt"))
    assert len(logs) == 1  # one RUN_ID, rank 0's, on both ranks (rank 1 would have named its checkpoint differently)
    assert len(list(tmp_path.glob("*.pt"))) == 3  # rank0.pt, rank1.pt and the one final checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# 4. Muon: batched by shape, foreach momentum, one all-reduce


@pytest.mark.parametrize("shape", [(3, 48, 32), (2, 32, 48), (4, 16, 16), (1, 7, 5)])
def test_batched_newton_schulz_equals_one_matrix_at_a_time(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    batched = tg.orthogonalize_batched(G, 5)
    for i in range(shape[0]):
        torch.testing.assert_close(batched[i], NEWTON_SCHULZ(G[i], 5), rtol=1e-5, atol=1e-5)


def slow_muon_step(params, grads, buffers, lr, momentum, steps):
    """Muon written out one matrix at a time, as its definition reads."""
    for p, g, buf in zip(params, grads, buffers):
        buf.mul_(momentum).add_(g)
        direction = g + momentum * buf
        update = NEWTON_SCHULZ(direction, steps) * max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.sub_(lr * update)


def assert_muon_equals_slow_loop(muon_options: dict, slow_step, shapes, seed: int) -> None:
    """Three steps of tg.Muon(params, **muon_options) on fresh random gradients give what slow_step(params, grads,
    momentum_buffers) gives on a copy of the parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    copies = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in copies]
    muon = tg.Muon(params, **muon_options)
    for _ in range(3):
        grads = [torch.randn(*s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
        with torch.no_grad():
            slow_step(copies, grads, buffers)
    for p, expected in zip(params, copies):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_step_equals_the_slow_loop():
    assert_muon_equals_slow_loop(dict(lr=0.02, momentum=0.9, backend_steps=5),
                                 lambda p, g, buf: slow_muon_step(p, g, buf, 0.02, 0.9, 5),
                                 [(32, 16), (16, 32), (32, 16), (16, 16), (32, 16), (8, 24)], seed=3)


# ----------------------------------------------------------------------------------------------------------------------
# 4. the loader works ahead in a thread, and changes nothing


@pytest.fixture
def small_stream(tmp_path):
    from data.shards import write_shard

    rng = np.random.default_rng(1)
    docs = [np.concatenate([[data_loader.BOS_ID], rng.integers(4, 50, size=int(n))])
            for n in rng.integers(1, 120, size=80)]
    write_shard(str(tmp_path / "s_train_000000.bin"), np.concatenate(docs))
    return data_loader.TokenStream(str(tmp_path / "s_train_*.bin"), 64)


def test_prefetching_loader_serves_exactly_the_plain_loader(small_stream):
    def loader():
        config = data_loader.LoaderConfig(seq_len=16, batch_tokens=4 * 64, micro_batches=4, seed=3, max_segments=4)
        return data_loader.DocumentLoader(small_stream, config, 1, 2)

    plain, prefetching = loader(), data_loader.PrefetchingLoader(loader(), pin_memory=False)
    for step in range(12):
        if step == 5:  # a restart from a saved position (as warm-up undo and resume do) drops the prefetched step
            state = plain.state_dict()
            plain.next_step(), prefetching.next_step()
            plain.load_state_dict(state), prefetching.load_state_dict(state)
        for a, b in zip(plain.next_step(), prefetching.next_step(), strict=True):
            assert isinstance(b.inputs, torch.Tensor)
            for field in ("inputs", "targets", "cu_seqlens"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field).numpy())
    assert prefetching.loader.position == plain.position
    assert prefetching.loader.merged_batches == plain.merged_batches > 0


def test_shard_index_is_cached_and_invalidated_when_the_shard_changes(tmp_path, monkeypatch):
    from data.shards import write_shard

    rng = np.random.default_rng(2)
    path = tmp_path / "c_train_000000.bin"
    tokens = np.concatenate([[data_loader.BOS_ID], rng.integers(2, 60, size=500)])
    tokens[rng.integers(1, 500, size=20)] = data_loader.BOS_ID
    write_shard(str(path), tokens)
    first = data_loader.TokenStream(str(tmp_path / "c_train_*.bin"), 64)
    assert (tmp_path / "c_train_000000.bin.index.npz").is_file()
    np.testing.assert_array_equal(first.doc_starts, np.flatnonzero(tokens == data_loader.BOS_ID))

    def no_scan(tokens):
        raise AssertionError("scanned although the cache is valid")

    monkeypatch.setattr(data_loader, "scan_shard", no_scan)
    np.testing.assert_array_equal(data_loader.TokenStream(str(tmp_path / "c_train_*.bin"), 64).doc_starts,
                                  first.doc_starts)
    monkeypatch.undo()

    changed = tokens.copy()
    changed[250] = 63  # a new token id and no new BOS: only a re-scan finds the id >= vocab
    write_shard(str(path), changed)
    import os
    os.utime(path, ns=(1, 1))  # a different mtime, as any rewrite gives
    with pytest.raises(data_loader.DataError, match="token id 63 at position 250"):
        data_loader.TokenStream(str(tmp_path / "c_train_*.bin"), 63)


# ----------------------------------------------------------------------------------------------------------------------
# 4. gradients are reduced in buckets while the backward pass runs


def reducer_model(num_layers: int) -> tg.GPT:
    """tiny_model's shape with `num_layers` blocks: with 1 there are no U-Net skips, so `skip_weights` is empty and no
    forward pass ever gives it a gradient."""
    torch.manual_seed(0)
    model = tiny_model() if num_layers == 2 else tg.GPT(tg.ModelConfig(vocab_size=1024, **{**TINY, "num_layers": 1}))
    return model.train().requires_grad_(True)


def _reducer_worker(rank: int, init_file: str, out_dir: str, num_layers: int = 2) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = reducer_model(num_layers)
    reducer = tg.GradientReducer(model, bucket_mb=0.01)  # ~10 kB buckets: many of them
    inputs = [torch.randint(4, 1000, (1, 40), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    # two micro-batches on each rank: only the last one's backward reduces
    for i, ids in enumerate(inputs):
        if i == 1:
            reducer.arm()
        model(ids + rank, torch.roll(ids + rank, -1, 1)).sum().backward()
    started_during_backward = len(reducer.in_flight)
    reducer.finish()
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "buckets": len(reducer.buckets),
                "started_during_backward": started_during_backward}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_layers", [2, 1])
def test_gradient_buckets_reduce_during_backward_to_the_plain_sum(tmp_path, num_layers):
    """With 1 layer, skip_weights gets no gradient on any step: its bucket is reduced in finish() (as zeros) instead
    of crashing on a missing gradient."""
    import torch.multiprocessing as mp

    mp.spawn(_reducer_worker, args=(str(tmp_path / "init"), str(tmp_path), num_layers), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["buckets"] > 3
    if num_layers == 2:
        assert results[0]["started_during_backward"] == results[0]["buckets"]  # every bucket left from inside backward
    else:
        assert results[0]["grads"]["skip_weights"].shape == (0, TINY["model_dim"])
    model = reducer_model(num_layers)
    for rank in range(2):  # the plain sum: both ranks' micro-batches in one process
        for r in range(2):
            ids = torch.randint(4, 1000, (1, 40), generator=torch.Generator().manual_seed(r)) + rank
            model(ids, torch.roll(ids, -1, 1)).sum().backward()
    for name, p in model.named_parameters():
        for result in results:
            plain = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(result["grads"][name], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_never_waits_on_the_host(small_stream):
    """forward_backward + optimizer_step (everything of a step but its one all-reduce of the loss) issue no
    synchronising CUDA call: torch's sync debug mode turns any into an error."""
    device = torch.device("cuda")
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
                                      "VOCAB_SIZE": "64", "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "256",
                                      "TRAIN_MICRO_BATCHES": "2", "COMPILE": "0"})
    model_kernels = tg.choose_kernels(frozenset(), "auto", device)
    assert model_kernels.autocast == torch.bfloat16  # the model runs its own bf16 autocast: the step wraps none
    model = tg.build_model(tg.ModelConfig.from_hyperparameters(hp), model_kernels).to(device)
    optimizers = tg.build_optimizers(model, hp)
    reducer = tg.GradientReducer(model)
    config = data_loader.LoaderConfig(seq_len=16, batch_tokens=256, micro_batches=2, seed=1)
    loader = data_loader.PrefetchingLoader(data_loader.DocumentLoader(small_stream, config, 0, 1), pin_memory=True)
    tg.forward_backward(model, loader.next_step(), hp, device, reducer)  # first step: allocations, lazy init
    tg.optimizer_step(model, optimizers, hp, reducer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tg.forward_backward(model, loader.next_step(), hp, device, reducer)
            tg.optimizer_step(model, optimizers, hp, reducer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------------
# 6. the log names the devices the run uses


@pytest.mark.parametrize("local_world, mask", [(1, None), (2, "3,5"), (4, None)])
def test_gpus_line_lists_the_devices_the_run_uses(monkeypatch, local_world, mask):
    """8 GPUs on the machine (what nvidia-smi would list), CUDA_VISIBLE_DEVICES exposing some of them, and a run of
    `local_world` processes: the line names the run's devices, not the machine's."""
    import subprocess

    visible = 2 if mask else 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nvidia-smi lists the machine, not the run"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    if mask:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    line = tg.gpu_line(world_size=local_world)
    used = min(local_world, visible)
    assert line.startswith(f"gpus: {used} x NVIDIA H200 (per node; cuda:0-{used - 1} of {visible} visible")
    assert (f"CUDA_VISIBLE_DEVICES={mask}" in line) == bool(mask)

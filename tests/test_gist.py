"""Gist tokens (GIST_TOKENS=k, GIST_SEGMENT=L, issue 12; gist.py): the layout (numpy's insert_slots and the device's
lay_out) and the mask against a brute-force construction from the definition, the reference attention against one
dense masked SDPA, no leak around the gists, causality and per-document independence of the training forward (raw
tokens in, the model lays out its slots), the loader's micro-batches laid out in one shape, eval_ttt.py's gist mode
with cached gist keys/values against one full masked forward, and GIST_TOKENS=0 being the plain model.

The definition (issue 12): a raw token of segment j attends causally to the raw tokens of segment j and to all gist
slots of earlier segments of its document; a gist slot of segment j attends to segment j's raw tokens, to the gist slots
before it in segment j (and itself), and to the gist slots of earlier segments. Nothing crosses documents."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import eval_ttt
import gist
import train_gpt as tg
from data.loader import BOS_ID, IGNORE_INDEX, DocumentLoader, LoaderConfig, TokenStream
from eval_ttt import EvalSpec
from kernels import attention as attn
from test_eval_modes import TINY, load_val, save_checkpoint, write_val_shard
from test_eval_modes import one_thread, small_dir, val  # noqa: F401  (the shared fixtures)

VOCAB = 1024


# ----------------------------------------------------------------------------------------------------------------------
# the brute-force construction, straight from the definition


def brute_force_tokens(raw_lengths, k: int, seg: int) -> list[tuple]:
    """(document, segment, kind, slot, raw index) of every token of the documents laid out one after another: each
    segment's raw tokens, then, unless it is its document's last segment, k gist slots."""
    tokens = []
    for doc, n in enumerate(raw_lengths):
        num_segments = -(-n // seg)
        for j in range(num_segments):
            tokens += [(doc, j, "raw", None, r) for r in range(j * seg, min((j + 1) * seg, n))]
            if j < num_segments - 1:
                tokens += [(doc, j, "gist", s, None) for s in range(k)]
    return tokens


def brute_force_mask(tokens) -> np.ndarray:
    n = len(tokens)
    mask = np.zeros((n, n), dtype=bool)
    for a, (doc_q, seg_q, kind_q, slot_q, raw_q) in enumerate(tokens):
        for b, (doc_k, seg_k, kind_k, slot_k, raw_k) in enumerate(tokens):
            if doc_q != doc_k:
                continue
            earlier_gist = kind_k == "gist" and seg_k < seg_q
            if kind_q == "raw":
                mask[a, b] = (kind_k == "raw" and seg_k == seg_q and raw_k <= raw_q) or earlier_gist
            else:
                mask[a, b] = ((kind_k == "raw" and seg_k == seg_q) or earlier_gist
                              or (kind_k == "gist" and seg_k == seg_q and slot_k <= slot_q))
    return mask


def random_documents(rng, seg: int, count: int) -> list[int]:
    """Raw lengths: some shorter than one segment, some exactly whole segments, some ragged."""
    return [int(rng.choice([rng.integers(1, seg + 1), seg * rng.integers(1, 4), rng.integers(1, 5 * seg)]))
            for _ in range(count)]


def test_layout_and_mask_match_the_definition():
    rng = np.random.default_rng(0)
    for trial in range(40):
        k, seg = int(rng.integers(1, 5)), int(rng.integers(1, 8))
        lengths = random_documents(rng, seg, int(rng.integers(1, 5)))
        tokens = brute_force_tokens(lengths, k, seg)
        raw = rng.integers(4, VOCAB, sum(lengths)).astype(np.int32)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        inputs, targets, gist_cu = gist.insert_slots(raw, raw.astype(np.int64), cu, k, seg, VOCAB, len(tokens))
        # ids: raw tokens in order, slot s as VOCAB + s; targets only on raw tokens
        expected = np.array([VOCAB + t[3] if t[2] == "gist" else -1 for t in tokens])
        is_raw = expected < 0
        expected[is_raw] = raw
        np.testing.assert_array_equal(inputs, expected)
        np.testing.assert_array_equal(targets[is_raw], raw)
        assert (targets[~is_raw] == IGNORE_INDEX).all()
        # the device's layout of the same pieces: the same tokens (then padding up to its one fixed length)
        laid = gist.lay_out(torch.from_numpy(raw), torch.from_numpy(raw.astype(np.int64)), torch.from_numpy(cu), k,
                            seg, VOCAB)
        assert len(laid.input_ids) == gist.laid_out_length(len(raw), k, seg) >= len(tokens)
        np.testing.assert_array_equal(laid.input_ids[:len(tokens)].numpy(), expected)
        np.testing.assert_array_equal(laid.raw_positions.numpy(), np.flatnonzero(is_raw))
        layout = attn.gist_layout(torch.from_numpy(gist_cu), len(tokens), k, seg)
        np.testing.assert_array_equal(layout.is_gist.numpy(), ~is_raw)
        # rotary positions: a raw token its raw index, the slots after segment j (j + 1) * L
        positions = [t[4] if t[2] == "raw" else (t[1] + 1) * seg for t in tokens]
        assert layout.positions.tolist() == positions
        np.testing.assert_array_equal(attn.gist_mask(layout).numpy(), brute_force_mask(tokens), err_msg=f"trial {trial}")


def test_laid_out_length_holds_any_pieces():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k, seg = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        lengths = rng.integers(1, 300, int(rng.integers(1, 12)))
        bound = gist.laid_out_length(int(lengths.sum()), k, seg)
        assert gist.piece_lengths(lengths, k, seg).sum() <= bound
        assert gist.piece_lengths(np.array([lengths.sum()]), k, seg)[0] == bound  # one piece: exactly the bound


def test_loader_micro_batches_are_laid_out_in_one_shape(tmp_path):
    """The loader knows nothing of gists; the model lays out each of its micro-batches (zero-length padding pieces
    included) in one length, the raw tokens and targets in order, the slots where the layout says."""
    from data.shards import write_shard

    rng = np.random.default_rng(2)
    docs = [np.concatenate([[BOS_ID], rng.integers(4, 50, size=int(n))]) for n in rng.integers(1, 90, size=37)]
    write_shard(str(tmp_path / "syn_train_000000.bin"), np.concatenate(docs))
    stream = TokenStream(str(tmp_path / "syn_train_*.bin"), 64)
    loader = DocumentLoader(stream, LoaderConfig(seq_len=40, batch_tokens=4 * 60, micro_batches=4, seed=3,
                                                 max_segments=12), 0, 1)
    length = gist.laid_out_length(60, 3, 16)
    assert length == 60 + 3 * (59 // 16)
    for _ in range(20):
        for batch in loader.next_step():
            laid = gist.lay_out(torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets),
                                torch.from_numpy(batch.cu_seqlens), 3, 16, 64)
            assert len(laid.input_ids) == length and len(laid.cu_seqlens) == len(batch.cu_seqlens)
            reference = gist.insert_slots(batch.inputs, batch.targets, batch.cu_seqlens, 3, 16, 64, length)
            for got, want in zip(laid[:3], reference):
                np.testing.assert_array_equal(got.numpy(), want)
            raw_positions = laid.raw_positions.numpy()
            np.testing.assert_array_equal(laid.input_ids.numpy()[raw_positions], batch.inputs)
            np.testing.assert_array_equal(laid.target_ids.numpy()[raw_positions], batch.targets)
            assert (np.delete(laid.target_ids.numpy(), raw_positions) == IGNORE_INDEX).all()
            # the gist slots sit where the attention's layout says they do
            layout = attn.gist_layout(laid.cu_seqlens, length, 3, 16)
            last = raw_positions[-1] + 1
            np.testing.assert_array_equal(layout.is_gist.numpy()[:last], laid.input_ids.numpy()[:last] >= 64)


# ----------------------------------------------------------------------------------------------------------------------
# the model with gists


GIST_KERNELS = tg.choose_kernels(frozenset(), "reference", "cpu", gist=True)


def gist_model(k: int = 3, seg: int = 16, seed: int = 0, model_kernels: tg.Kernels = GIST_KERNELS) -> tg.GPT:
    """A tiny gist model whose every weight is random and non-zero (as test_eval_modes.tiny_model)."""
    torch.manual_seed(seed)
    model = tg.build_model(tg.ModelConfig(vocab_size=VOCAB, gist_tokens=k, gist_segment=seg, **TINY), model_kernels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                embedding = name in ("tok_emb.weight", "gist_emb.weight")
                p.normal_(0.0, 0.3 if embedding else 1.0 / p.shape[1] ** 0.5)
    model.requires_grad_(False)
    return model.eval()


def packed(docs: list[np.ndarray]):
    """(raw inputs, targets, cu_seqlens) of the documents packed back to back as pieces, one per document."""
    raw = np.concatenate([d[:-1] for d in docs]).astype(np.int64)
    targets = np.concatenate([d[1:] for d in docs]).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum([len(d) - 1 for d in docs])]).astype(np.int32)
    return raw, targets, cu


def packed_losses(model: tg.GPT, docs: list[np.ndarray], device="cpu") -> list[np.ndarray]:
    """Per-document raw-token losses of one training-style forward over the documents packed as pieces (raw tokens
    in: the model lays out the slots)."""
    raw, targets, cu = packed(docs)
    with torch.no_grad():
        losses = model(torch.from_numpy(raw).to(device)[None], torch.from_numpy(targets).to(device)[None],
                       torch.from_numpy(cu).to(device), int(np.diff(cu).max()))[0].double().cpu().numpy()
    return np.split(losses, cu[1:-1])


def laid_out_losses(model: tg.GPT, docs: list[np.ndarray]) -> list[np.ndarray]:
    """The same from the numpy layout (insert_slots) run through the model's laid-out path (hidden_states_with_slots,
    losses), the raw tokens' losses picked where insert_slots put them."""
    k, seg = model.config.gist_tokens, model.config.gist_segment
    raw, targets, cu = packed(docs)
    length = int(gist.piece_lengths(np.diff(cu), k, seg).sum())
    inputs, laid_targets, gist_cu = gist.insert_slots(raw, targets, cu, k, seg, VOCAB, length)
    with torch.no_grad():
        x = model.hidden_states_with_slots(torch.from_numpy(inputs), torch.from_numpy(gist_cu))
        losses = model.losses(x, torch.from_numpy(laid_targets)[None])[0].double().numpy()
    return np.split(losses[inputs < VOCAB], cu[1:-1])


def random_docs(rng, lengths) -> list[np.ndarray]:
    return [np.concatenate([[BOS_ID], rng.integers(4, VOCAB, n - 1)]) for n in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_on_raw_tokens_is_the_numpy_layouts_forward(seed):
    """The model's own slot layout (lay_out, on the device) gives the losses of the numpy reference layout, in
    training mode and in evaluation mode."""
    rng = np.random.default_rng(seed)
    k, seg = int(rng.integers(1, 5)), int(rng.integers(3, 12))
    model = gist_model(k, seg, seed=seed)
    docs = random_docs(rng, rng.integers(2, 6 * seg, int(rng.integers(1, 6))).tolist())
    for training in (False, True):
        model.train(training)
        for got, want in zip(packed_losses(model, docs), laid_out_losses(model, docs)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    model.eval()


def test_reference_attention_is_one_dense_masked_sdpa():
    rng = np.random.default_rng(3)
    for k, seg in ((1, 3), (4, 5), (2, 16)):
        lengths = random_documents(rng, seg, 4)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(gist.piece_lengths(np.array(lengths), k, seg))]))
        n = int(cu[-1])
        layout = attn.gist_layout(cu.to(torch.int32), n, k, seg)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        q, key, v = (torch.randn(n, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), key.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
            attn_mask=attn.gist_mask(layout)).transpose(0, 1)
        torch.testing.assert_close(attn.gist_attention_reference(q, key, v, layout), dense, rtol=1e-10, atol=1e-10)


def test_no_leak_around_the_gists():
    """Segment j sees earlier segments only through the gist slots. Zeroing the slots' values alone would not cut that
    path (the slots' keys still move the softmax's normaliser), so the hook zeroes their keys and values: then the
    losses of segment j do not change when raw tokens of earlier segments are replaced; with the slots intact they do."""
    k, seg = 3, 16
    model = gist_model(k, seg)
    rng = np.random.default_rng(4)
    doc = random_docs(rng, [70])[0]  # 69 raw inputs: segments 0..4
    changed = doc.copy()
    changed[1:2 * seg] = rng.integers(4, VOCAB, 2 * seg - 1)  # raw inputs of segments 0 and 1 (not BOS)
    raw_length = len(doc) - 1
    is_gist = torch.from_numpy(gist.insert_slots(doc[:-1].astype(np.int32), doc[1:].astype(np.int64),
                                                 np.array([0, raw_length], dtype=np.int32), k, seg, VOCAB,
                                                 gist.laid_out_length(raw_length, k, seg))[0] >= VOCAB)

    def zero_gists(module, args, out):
        return out.masked_fill(is_gist[None, :, None], 0.0)

    # the losses of segments 2.. are those of positions 2L.. (their inputs), which see no changed token directly
    original, replaced = packed_losses(model, [doc])[0], packed_losses(model, [changed])[0]
    assert not np.allclose(original[2 * seg:], replaced[2 * seg:], atol=1e-4)  # through the gists, they do see them
    handles = [layer.register_forward_hook(zero_gists) for name, layer in model.adaptable_linears().items()
               if name.endswith((".attn.k", ".attn.v"))]
    assert len(handles) == 2 * len(model.blocks)
    try:
        original, replaced = packed_losses(model, [doc])[0], packed_losses(model, [changed])[0]
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(original[2 * seg:], replaced[2 * seg:], rtol=0, atol=1e-6)
    assert not np.allclose(original[:2 * seg - 1], replaced[:2 * seg - 1], atol=1e-4)  # (the test can see changes)


def test_training_forward_is_causal():
    model = gist_model(4, 8)
    rng = np.random.default_rng(5)
    doc = random_docs(rng, [61])[0]
    for t in (5, 8, 23, 40):  # inside a segment, at a segment's end, ...
        changed = doc.copy()
        changed[t + 1:] = rng.integers(4, VOCAB, len(doc) - t - 1)
        before, after = packed_losses(model, [doc])[0], packed_losses(model, [changed])[0]
        np.testing.assert_array_equal(before[:t], after[:t])  # losses[i] predicts token i + 1
        assert not np.allclose(before[t:], after[t:])


def test_packed_documents_do_not_see_each_other():
    model = gist_model(2, 8)
    docs = random_docs(np.random.default_rng(6), [30, 5, 17, 41, 9])
    together = packed_losses(model, docs)
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(packed_losses(model, [doc])[0], together[i], rtol=1e-5, atol=1e-6)
    order = [3, 0, 4, 1, 2]
    for i, losses in zip(order, packed_losses(model, [docs[i] for i in order])):
        np.testing.assert_allclose(losses, together[i], rtol=1e-5, atol=1e-6)
    # rows (no cu_seqlens): each row one piece, as packed
    rows = torch.from_numpy(np.stack([docs[0], docs[0][::-1].copy()]).astype(np.int64))
    with torch.no_grad():
        batched = model(rows[:, :-1], rows[:, 1:])
    assert batched.shape == (2, len(docs[0]) - 1)
    np.testing.assert_allclose(batched[0].double().numpy(), together[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1].double().numpy(), packed_losses(model, [docs[0][::-1].copy()])[0], rtol=1e-5,
                               atol=1e-6)


def test_gradient_reaches_the_gist_embeddings():
    model = gist_model(3, 8).train().requires_grad_(True)
    raw, targets, cu = packed(random_docs(np.random.default_rng(7), [40, 20]))
    assert cu.tolist() == [0, 39, 58]
    model(torch.from_numpy(raw)[None], torch.from_numpy(targets)[None], torch.from_numpy(cu), 39).sum().backward()
    assert model.gist_emb.weight.grad.abs().sum(1).gt(0).all()  # every slot index is used and learns
    assert ("gist_emb.weight", model.gist_emb.weight) in tg.optimizer_groups(model)["embedding"]


# ----------------------------------------------------------------------------------------------------------------------
# GIST_TOKENS=0 is the plain model


def pre_gist_forward(model: tg.GPT, ids, targets, cu_seqlens, max_seqlen):
    """GPT.forward's training losses as written before gist tokens existed (the embedding, the block loop with its
    U-Net skips, the head), on the model's own modules."""
    cos, sin = model.rotary(model.positions(ids, cu_seqlens))
    x = x0 = tg.rms_norm(model.tok_emb(ids), frozenset())
    skips, encoder_layers = [], len(model.blocks) // 2
    for i, block in enumerate(model.blocks):
        if i >= encoder_layers and skips:
            x = x + model.skip_weights[i - encoder_layers].to(x.dtype) * skips.pop()
        x = block(x, x0, cos, sin, lambda q, k, v: attn.varlen_attention_reference(q[0], k[0], v[0], cu_seqlens,
                                                                                   max_seqlen)[None])
        if i < encoder_layers:
            skips.append(x)
    x = tg.rms_norm(x, frozenset())
    return model.token_losses(x.flatten(0, 1), targets.flatten()).view_as(targets)


def test_gist_tokens_zero_is_the_plain_model_bit_for_bit():
    torch.manual_seed(0)
    plain = tg.build_model(tg.ModelConfig(vocab_size=VOCAB, **TINY))
    assert type(plain) is tg.GPT and not hasattr(plain, "gist_emb")
    assert all("gist" not in name for name in plain.state_dict())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    plain.train()
    docs = random_docs(np.random.default_rng(8), [50, 12, 33])
    ids = torch.from_numpy(np.concatenate([d[:-1] for d in docs]).astype(np.int64))[None]
    targets = torch.from_numpy(np.concatenate([d[1:] for d in docs]).astype(np.int64))[None]
    cu = torch.tensor([0, 49, 60, 92], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(plain(ids, targets, cu, 64), pre_gist_forward(plain, ids, targets, cu, 64))
    hp = tg.Hyperparameters.from_env({})
    assert (hp.gist_tokens, hp.gist_segment) == (0, 128)


# ----------------------------------------------------------------------------------------------------------------------
# configuration


def test_bad_gist_settings_are_one_clear_error():
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND='fa3': cannot express the gist attention mask"):
        tg.Hyperparameters.from_env({"GIST_TOKENS": "4", "ATTN_BACKEND": "fa3"})
    with pytest.raises(tg.ConfigError, match="GIST_SEGMENT"):
        tg.Hyperparameters.from_env({"GIST_TOKENS": "4", "GIST_SEGMENT": "0"})
    with pytest.raises(tg.ConfigError, match="GIST_TOKENS"):
        tg.Hyperparameters.from_env({"GIST_TOKENS": "-1"})
    with pytest.raises(attn.BackendError, match="COMPILE=1"):
        attn.select_gist_attention("auto", torch.device("cpu"), compiling=True)
    assert attn.select_gist_attention("auto", torch.device("cpu")).name == "reference"
    config = tg.ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64, gist_tokens=2,
                            gist_segment=8)
    with pytest.raises(ValueError, match="GIST_TOKENS=2: the model's attention 'reference' is not a gist attention"):
        tg.build_model(config)  # the default kernels: a plain varlen attention


# ----------------------------------------------------------------------------------------------------------------------
# eval_ttt.py --mode gist


@pytest.fixture(scope="module")
def model() -> tg.GPT:
    return gist_model(k=4, seg=32)


def full_forward_losses(model, val) -> dict:
    """Every document in one masked forward (a strided window longer than any document)."""
    spec = EvalSpec(mode="strided", window=1024, stride=512, batch_tokens=4096)
    return eval_ttt.evaluate(model, val, spec, keep_token_losses=True).token_losses


def gist_evaluate(model, val, window: int = 4096, process=None):
    """eval_ttt's gist mode; the default window is longer than any document (each read as one piece)."""
    return eval_ttt.evaluate(model, val, EvalSpec(mode="gist", window=window), process=process,
                             keep_token_losses=True)


def test_cached_gist_mode_is_one_full_masked_forward(model, val):
    cached = gist_evaluate(model, val)
    full = full_forward_losses(model, val)
    for k in range(val.num_docs):
        np.testing.assert_allclose(cached.token_losses[k], full[k], rtol=1e-5, atol=1e-5)
    assert cached.total_tokens == int(val.token_counts.sum()) and cached.total_bytes == int(val.byte_counts.sum())


def test_cached_segments_never_run_over_earlier_raw_tokens(model, val):
    """Each segment's forward holds at most L + k tokens of its own and k slots per earlier segment."""
    seen = []
    original = gist.GistCache.__call__

    def spy(self, q, k, v):
        past = 0 if self.keys[self.layer] is None else self.keys[self.layer].size(1)
        seen.append((q.size(1), past))
        return original(self, q, k, v)

    gist.GistCache.__call__ = spy
    try:
        model.gist_document_losses(val.document(4))  # 409 targets: 13 segments of 32
    finally:
        gist.GistCache.__call__ = original
    per_segment = seen[::len(model.blocks)]
    assert [t for t, _ in per_segment] == [36] * 12 + [409 - 12 * 32]
    assert [past for _, past in per_segment] == [4 * j for j in range(13)]


def test_gist_mode_is_causal(model, val, small_dir, tmp_path):
    import shutil

    doc = val.document(4)
    for t in (40, 63, 150):
        changed = doc.copy()
        changed[t + 1:] = np.random.default_rng(t).integers(4, VOCAB, len(doc) - t - 1)
        write_val_shard(tmp_path, [doc, changed])
        shutil.copyfile(small_dir / "tokenizer.model", tmp_path / "tokenizer.model")
        losses = gist_evaluate(model, load_val(tmp_path)).token_losses
        np.testing.assert_array_equal(losses[0][:t], losses[1][:t])
        assert not np.allclose(losses[0][t:], losses[1][t:])


def test_gist_mode_documents_do_not_depend_on_other_documents(model, val):
    together = gist_evaluate(model, val).token_losses
    for k in range(val.num_docs):
        alone = gist_evaluate(model, val.subset([k])).token_losses[0]
        np.testing.assert_array_equal(alone, together[k])
    order = [3, 0, 5, 1, 4, 2]
    reordered = gist_evaluate(model, val.subset(order)).token_losses
    for i, k in enumerate(order):
        np.testing.assert_array_equal(reordered[i], together[k])
    # and two ranks' shares (as under torchrun) score each document as one process does
    shares = []
    for rank in (0, 1):
        mine = gist_evaluate(model, val, process=(rank, 2)).token_losses
        shares.append(sorted(mine))
        for k, losses in mine.items():
            np.testing.assert_array_equal(losses, together[k])
    assert sorted(shares[0] + shares[1]) == list(range(val.num_docs)) and all(shares)


def test_cli_gist_mode_results_and_context(model, val, small_dir, tmp_path, capsys):
    checkpoint = save_checkpoint(model, small_dir, tmp_path / "gist.pt")
    rebuilt, state = tg.load_model(str(checkpoint), torch.device("cpu"))
    assert (state["model_config"]["gist_tokens"], state["model_config"]["gist_segment"]) == (4, 32)
    assert torch.equal(rebuilt.gist_emb.weight, model.gist_emb.weight)
    out = tmp_path / "gist.json"
    assert eval_ttt.main(["--checkpoint", checkpoint, "--mode", "gist", "--out", out], trainer=tg) == 0
    results = json.loads(out.read_text())
    expected = gist_evaluate(model, val, window=64)  # the checkpoint's TRAIN_SEQ_LEN (issue 23)
    assert results["bpb"] == pytest.approx(expected.bpb, rel=1e-9)
    assert results["config"]["gist_tokens"] == 4 and results["config"]["gist_segment"] == 32
    assert results["compile"] == {"graphs": 0, "graph_breaks": 0}  # eager on CPUs (flex compiles once on CUDA)
    # context per scored token, counted one token at a time: its segment's raw tokens up to itself, 4 slots per
    # earlier segment of its piece of 64
    counts = val.token_counts.tolist()
    slots = [p % 32 + 1 + 4 * (p % 64 // 32) for n in counts for p in range(n)]
    assert results["context_slots_per_token"] == pytest.approx(np.mean(slots))
    assert "eval mode:gist gist_tokens:4 gist_segment:32" in capsys.readouterr().out
    # strided W = S = 32 holds each token's own window only
    assert eval_ttt.main(["--checkpoint", checkpoint, "--mode", "strided", "--window", "32", "--stride", "32",
                          "--out", out], trainer=tg) == 0
    assert json.loads(out.read_text())["context_slots_per_token"] == pytest.approx(
        np.mean([p % 32 + 1 for n in counts for p in range(n)]))


def mode_errors(model, small_dir, tmp_path, capsys) -> dict[str, list[str]]:
    """{mode: stderr lines} of eval_ttt.py run on the model's checkpoint in a mode it cannot be scored in."""
    from test_eval_modes import tiny_model

    plain = save_checkpoint(tiny_model(), small_dir, tmp_path / "plain.pt")
    with_gists = save_checkpoint(model, small_dir, tmp_path / "gist.pt")
    errors = {}
    for mode, checkpoint in (("gist", plain), ("ttt", with_gists)):
        assert eval_ttt.main(["--checkpoint", checkpoint, "--mode", mode], trainer=tg) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        errors[mode] = captured.err.strip().splitlines()
    return errors


def test_a_mode_the_checkpoint_cannot_do_is_one_line(model, small_dir, tmp_path, capsys):
    errors = mode_errors(model, small_dir, tmp_path, capsys)
    assert len(errors["gist"]) == 1 and errors["gist"][0].startswith("error: ")
    assert errors["gist"][0].endswith("gist: the checkpoint's model has no gist tokens (trained with GIST_TOKENS=0)")
    assert len(errors["ttt"]) == 1 and errors["ttt"][0].startswith("error: ")
    assert errors["ttt"][0].endswith("ttt: not implemented for gist models (use gist, strided or flat)")


def test_a_mode_the_checkpoint_cannot_do_names_the_option(model, small_dir, tmp_path, capsys):
    errors = mode_errors(model, small_dir, tmp_path, capsys)
    assert errors["gist"] == ["error: --mode gist: the checkpoint's model has no gist tokens (trained with "
                              "GIST_TOKENS=0)"]
    assert errors["ttt"] == ["error: --mode ttt: not implemented for gist models (use gist, strided or flat)"]


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: flex_attention against the reference


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_attention_matches_the_reference_on_cuda():
    device = torch.device("cuda")
    rng = np.random.default_rng(9)
    for k, seg in ((4, 128), (16, 128), (3, 40)):
        lengths = random_documents(rng, seg, 6)
        cu = np.concatenate([[0], np.cumsum(gist.piece_lengths(np.array(lengths), k, seg))]).astype(np.int32)
        n = int(cu[-1])
        layout = attn.gist_layout(torch.from_numpy(cu).to(device), n, k, seg)
        layout = layout._replace(block_mask=attn.gist_block_mask(layout, n))
        gen = torch.Generator(device=device).manual_seed(k)
        q, key, v = (torch.randn(n, h, 64, generator=gen, device=device, dtype=torch.bfloat16) for h in (8, 4, 4))
        flex = attn.FlexGistAttention()(q, key, v, layout)
        reference = attn.gist_attention_reference(q.float(), key.float(), v.float(), layout)
        torch.testing.assert_close(flex.float(), reference, rtol=2e-2, atol=2e-2)
    # and a whole gist model's losses, flex against the reference (raw tokens in: each lays out its slots), in fp32
    # and under the bf16 autocast CUDA models run with
    flex_kernels = tg.choose_kernels(frozenset(), "auto", device, gist=True)
    assert flex_kernels.attention.name == "flex" and flex_kernels.autocast == torch.bfloat16
    docs = random_docs(rng, [300, 45, 129])
    for autocast, tolerance in ((None, 1e-3), (torch.bfloat16, 3e-2)):
        kernels = dataclasses.replace(flex_kernels, autocast=autocast)
        reference_kernels = dataclasses.replace(kernels, attention=attn.REFERENCE_GIST,
                                                eval_attention=attn.REFERENCE_GIST)
        flex = packed_losses(gist_model(4, 32, model_kernels=kernels).to(device), docs, device)
        reference = packed_losses(gist_model(4, 32, model_kernels=reference_kernels).to(device), docs, device)
        for a, b in zip(flex, reference):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------------------------------------------------
# a real training run with gists (train_gpt.py as a process), and its checkpoint scored in gist mode


@pytest.mark.slow
def test_training_run_with_gists_logs_and_checkpoints_k_and_l(sample_data, tmp_path, capsys):
    from test_train import final_weights, run_training

    log, losses = run_training(tmp_path, sample_data, "gist", GIST_TOKENS="2", GIST_SEGMENT="16")
    assert "hparam gist_tokens=2" in log and "hparam gist_segment=16" in log
    assert "attention_backend: gist_reference" in log and "gist: tokens:2 segment:16" in log
    assert all(np.isfinite(v) for v in losses.values()) and len(losses) > 1
    state = torch.load(tmp_path / "ckpt" / "gist.pt", weights_only=False)
    assert (state["model_config"]["gist_tokens"], state["model_config"]["gist_segment"]) == (2, 16)
    assert final_weights(tmp_path, "gist")["gist_emb.weight"].shape[0] == 2
    assert eval_ttt.main(["--checkpoint", tmp_path / "ckpt" / "gist.pt", "--mode", "gist", "--max-docs", "2"],
                         trainer=tg) == 0
    assert "eval mode:gist gist_tokens:2 gist_segment:16" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# a compiled gist attention sees one shape in evaluation (issue 19)


class RecordingFixedShapeAttention(attn.ReferenceGistAttention):
    """The reference gist attention, declared fixed-shape as the compiled flex one is, recording every N it gets."""

    fixed_shapes = True

    def __init__(self):
        self.lengths = []

    def __call__(self, q, k, v, layout):
        self.lengths.append(q.size(0))
        return super().__call__(q, k, v, layout)


def test_fixed_shape_gist_attention_gets_one_length_in_evaluation(model, val):
    """flex_attention is compiled with dynamic=False: a new length per evaluation batch would recompile it until
    Dynamo's limit, then fall back to eager flex, which materialises N x N scores. Evaluation pads every batch to one
    length for such a backend, and the padding changes no score."""
    recording = RecordingFixedShapeAttention()
    fixed = gist_model(k=4, seg=32, model_kernels=tg.Kernels(frozenset(), recording, recording))
    assert fixed.fixed_shapes and not model.fixed_shapes
    fixed.load_state_dict(model.state_dict())
    few = val.subset(range(6))
    for mode, window, stride in (("strided", 96, 48), ("flat", 64, 64)):
        recording.lengths.clear()
        spec = EvalSpec(mode=mode, window=window, stride=stride, batch_tokens=256)
        padded = eval_ttt.evaluate(fixed, few, spec, keep_token_losses=True)
        plain = eval_ttt.evaluate(model, few, spec, keep_token_losses=True)
        assert len(recording.lengths) > 3 * len(fixed.blocks)  # several batches, one call per layer each
        assert set(recording.lengths) == {gist.laid_out_length(256, 4, 32)}
        for doc in plain.token_losses:
            np.testing.assert_allclose(padded.token_losses[doc], plain.token_losses[doc], rtol=1e-6, atol=1e-6)

"""Issue 23: training and eval_ttt.py --mode gist read a document in the same layout.

Training (DocumentLoader) cuts every document into pieces of at most TRAIN_SEQ_LEN raw tokens (segment_boundaries) and
lays out each piece on its own: segment 0 starts at the piece's first token, raw tokens take their index in the piece as
rotary position, a raw token sees the gist slots of its piece's earlier segments only. So in training a token never
sees more than k * ((TRAIN_SEQ_LEN - 1) // L) slots, nor a slot further back than TRAIN_SEQ_LEN. Gist mode used to read
every document as one piece: beyond the first TRAIN_SEQ_LEN tokens each segment saw k slots per earlier segment of the
whole document, a layout training never produced (on the issue's checkpoints that cost more than the slots gave: worse
than no context at all). Gist mode now reads documents in pieces of --window tokens, by default the checkpoint's
TRAIN_SEQ_LEN.

The heart is a token-by-token comparison of one training forward (the loader's micro-batch, the model in training mode)
with gist mode, on a tiny random model whose every weight matters. And the layout the model makes on the device
(gist.lay_out) is the numpy reference (gist.insert_slots), on random pieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_ttt
import gist
import train_gpt as tg
from data.loader import BOS_ID, IGNORE_INDEX, DocumentLoader, LoaderConfig, TokenStream
from eval_ttt import EvalSpec
from test_eval_modes import TINY, load_val, save_checkpoint, write_val_shard
from test_eval_modes import one_thread, small_dir  # noqa: F401  (the shared fixtures)

VOCAB = 1024


def gist_model(k: int, seg: int, seed: int = 0) -> tg.GPT:
    """A tiny gist model whose every weight is random and non-zero (zero-initialised projections would make the
    slots invisible and the comparison vacuous)."""
    torch.manual_seed(seed)
    model = tg.build_model(tg.ModelConfig(vocab_size=VOCAB, gist_tokens=k, gist_segment=seg, **TINY),
                           tg.choose_kernels(frozenset(), "reference", "cpu", gist=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                embedding = name in ("tok_emb.weight", "gist_emb.weight")
                p.normal_(0.0, 0.3 if embedding else 1.0 / p.shape[1] ** 0.5)
    return model.requires_grad_(False)


def documents(lengths, seed: int = 0) -> list[np.ndarray]:
    """Documents of these lengths (BOS included), BOS then random non-control tokens."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS_ID], rng.integers(4, VOCAB, n - 1)]).astype(np.int64) for n in lengths]


def training_losses(model: tg.GPT, docs: list[np.ndarray], seq_len: int, directory: Path) -> list[np.ndarray]:
    """Each document's per-token losses (nats; loss i predicts token i + 1) from one training forward: the documents
    as a train shard, one micro-batch of the loader (unshuffled, so it starts at the first document's BOS) holding
    them all, the model in training mode (raw tokens in: it lays out the slots), exactly as
    train_gpt.forward_backward calls it."""
    from data.shards import write_shard

    write_shard(str(directory / "syn_train_000000.bin"), np.concatenate(docs))
    stream = TokenStream(str(directory / "syn_train_*.bin"), VOCAB)
    total = sum(len(d) for d in docs)
    loader = DocumentLoader(stream, LoaderConfig(seq_len=seq_len, batch_tokens=total, micro_batches=1, seed=0,
                                                 shuffle=False))
    (batch,) = loader.next_step()
    model.train()
    with torch.no_grad():
        raw = model(torch.from_numpy(batch.inputs).long()[None], torch.from_numpy(batch.targets)[None],
                    torch.from_numpy(batch.cu_seqlens), seq_len)[0].double().numpy()
    assert len(raw) == total
    starts = np.cumsum([0] + [len(d) for d in docs])
    return [raw[s: e - 1] for s, e in zip(starts[:-1], starts[1:])]  # the last token's target is the next BOS


# documents shorter than one piece, exactly one piece (33 tokens: 32 inputs), several whole pieces, ragged tails
LENGTHS = [100, 33, 65, 7, 97, 200, 41]


@pytest.mark.parametrize("k, seg, seq_len", [(4, 8, 32), (2, 8, 30), (1, 5, 40), (3, 16, 64)])
def test_gist_mode_scores_each_token_as_the_training_forward_does(tmp_path, k, seg, seq_len):
    model = gist_model(k, seg)
    docs = documents(LENGTHS, seed=k)
    trained = training_losses(model, docs, seq_len, tmp_path)
    model.eval()
    for doc, expected in zip(docs, trained):
        scored = model.gist_document_losses(doc, window=seq_len)
        assert len(scored) == len(doc) - 1
        np.testing.assert_allclose(scored, expected, rtol=1e-5, atol=1e-5)


def test_reading_a_document_whole_is_not_the_training_layout(tmp_path):
    """The old reading (window 0: the whole document as one piece) agrees with training up to TRAIN_SEQ_LEN and not
    after it: the comparison above can see the difference it guards against."""
    k, seg, seq_len = 4, 8, 32
    model = gist_model(k, seg)
    doc = documents([200], seed=1)[0]
    (trained,) = training_losses(model, [doc], seq_len, tmp_path)
    model.eval()
    whole = model.gist_document_losses(doc)
    np.testing.assert_allclose(whole[:seq_len], trained[:seq_len], rtol=1e-5, atol=1e-5)
    assert np.abs(whole[seq_len + seg:] - trained[seq_len + seg:]).min() > 1e-4  # every segment after the first piece's


def test_gist_mode_never_shows_more_slots_than_training(tmp_path):
    """The slots each segment's forward attends to (cached, from earlier segments) never exceed what a training piece
    holds: k per earlier segment of the piece, at most k * ((TRAIN_SEQ_LEN - 1) // L)."""
    k, seg, seq_len = 3, 8, 30
    model = gist_model(k, seg).eval()
    seen = []
    original = gist.GistCache.__call__

    def spy(self, q, key, v):
        seen.append(0 if self.keys[self.layer] is None else self.keys[self.layer].size(1))
        return original(self, q, key, v)

    gist.GistCache.__call__ = spy
    try:
        model.gist_document_losses(documents([301])[0], window=seq_len)
    finally:
        gist.GistCache.__call__ = original
    per_segment = seen[::len(model.blocks)]
    # 300 inputs: 10 pieces of 30, each segments of 8, 8, 8, 6
    assert per_segment == [0, 3, 6, 9] * 10
    assert max(per_segment) == k * ((seq_len - 1) // seg)


def test_gist_mode_in_pieces_is_strided_with_stride_equal_to_the_window(small_dir):
    """Pieces of W read with cached slots are the windows of strided W = S (each window a piece of its own, with its
    slots inserted) scored in one masked forward: the same layout, two implementations."""
    model = gist_model(4, 16).eval()
    val = load_val(small_dir)
    for window in (64, 40):
        pieces = eval_ttt.evaluate(model, val, EvalSpec(mode="gist", window=window), keep_token_losses=True)
        strided = eval_ttt.evaluate(model, val, EvalSpec(mode="strided", window=window, stride=window,
                                                         batch_tokens=4096), keep_token_losses=True)
        for d in range(val.num_docs):
            np.testing.assert_allclose(pieces.token_losses[d], strided.token_losses[d], rtol=1e-5, atol=1e-5)


def test_cli_gist_mode_defaults_to_the_training_pieces(small_dir, tmp_path, capsys):
    """eval_ttt.py --mode gist on a checkpoint trained with TRAIN_SEQ_LEN=64 (and EVAL_WINDOW=128) scores every token
    as the training forward over the same document does; its context count is per piece."""
    k, seg, seq_len = 4, 16, 64
    model = gist_model(k, seg).eval()
    checkpoint = save_checkpoint(model, small_dir, tmp_path / "gist.pt", window=seq_len)
    state = torch.load(checkpoint, weights_only=False)
    state["hyperparameters"]["eval_window"] = 2 * seq_len  # gist mode follows TRAIN_SEQ_LEN, not EVAL_WINDOW
    torch.save(state, checkpoint)
    docs = documents([300, 90, 129], seed=5)
    data = tmp_path / "data"
    write_val_shard(data, docs)
    shutil.copyfile(small_dir / "tokenizer.model", data / "tokenizer.model")
    out, dump = tmp_path / "gist.json", tmp_path / "gist.npy"
    assert eval_ttt.main(["--checkpoint", checkpoint, "--data", data, "--mode", "gist", "--out", out,
                          "--dump-token-losses", dump], trainer=tg) == 0
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    expected = np.concatenate(training_losses(model, docs, seq_len, train_dir))
    np.testing.assert_allclose(np.load(dump), expected, rtol=1e-5, atol=1e-5)
    assert f"eval mode:gist gist_tokens:{k} gist_segment:{seg} window:{seq_len}" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["config"]["window"] == seq_len
    slots = [p % seq_len % seg + 1 + k * (p % seq_len // seg) for d in docs for p in range(len(d) - 1)]
    assert results["context_slots_per_token"] == pytest.approx(np.mean(slots))


def test_a_segment_as_long_as_the_training_pieces_is_one_clear_error():
    """GIST_SEGMENT >= TRAIN_SEQ_LEN: every training piece is one segment, no slot is ever inserted, gist_emb never
    gets a gradient, and gist mode would feed untrained slots to every later segment."""
    for seg in ("128", "200"):
        with pytest.raises(tg.ConfigError, match="GIST_SEGMENT=.*must be shorter than TRAIN_SEQ_LEN=128"):
            tg.Hyperparameters.from_env({"GIST_TOKENS": "4", "GIST_SEGMENT": seg, "TRAIN_SEQ_LEN": "128"})
    assert gist.piece_lengths(np.array([128, 100]), 4, 128).tolist() == [128, 100]  # (no slot in any piece)
    hp = tg.Hyperparameters.from_env({"GIST_TOKENS": "4", "GIST_SEGMENT": "127", "TRAIN_SEQ_LEN": "128"})
    assert hp.gist_segment == 127
    assert tg.Hyperparameters.from_env({"GIST_SEGMENT": "4096"}).gist_tokens == 0  # off: the segment does not matter


# ----------------------------------------------------------------------------------------------------------------------
# the device's layout is the numpy reference


def random_pieces(rng, count: int, seg: int) -> np.ndarray:
    """Raw piece lengths: empty (the loader's padding pieces), shorter than a segment, whole segments, ragged."""
    return np.array([rng.choice([0, int(rng.integers(1, seg + 1)), seg * int(rng.integers(1, 4)),
                                 int(rng.integers(1, 6 * seg))]) for _ in range(count)], dtype=np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_lay_out_is_insert_slots(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(25):
        k, seg = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        lengths = random_pieces(rng, int(rng.integers(1, 9)), seg)
        lengths[int(rng.integers(len(lengths)))] += 1  # at least one token
        n = int(lengths.sum())
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        inputs = rng.integers(0, VOCAB, n).astype(np.int64)
        targets = rng.integers(0, VOCAB, n).astype(np.int64)
        targets[rng.random(n) < 0.1] = IGNORE_INDEX  # (document ends: ignored targets stay where they are)
        length = gist.laid_out_length(n, k, seg)
        laid = gist.lay_out(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(cu), k, seg, VOCAB)
        want_inputs, want_targets, want_cu = gist.insert_slots(inputs, targets, cu, k, seg, VOCAB, length)
        np.testing.assert_array_equal(laid.input_ids.numpy(), want_inputs)
        np.testing.assert_array_equal(laid.target_ids.numpy(), want_targets)
        np.testing.assert_array_equal(laid.cu_seqlens.numpy(), want_cu)
        assert laid.input_ids.dtype == torch.int64 and laid.cu_seqlens.dtype == torch.int32
        # where each raw token went: its own input and target, in order, and never a slot
        positions = laid.raw_positions.numpy()
        assert len(positions) == n and (np.diff(positions) > 0).all()
        np.testing.assert_array_equal(want_inputs[positions], inputs)
        np.testing.assert_array_equal(want_targets[positions], targets)
        # slots and padding: every position that is not a raw token's has an ignored target
        rest = np.setdiff1d(np.arange(length), positions)
        assert (want_targets[rest] == IGNORE_INDEX).all()
        assert int(gist.piece_lengths(lengths, k, seg).sum()) <= length == len(want_inputs)

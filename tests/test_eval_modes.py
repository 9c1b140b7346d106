"""eval_ttt.evaluate's per-document scorer (flat / strided windows, packed varlen forward): strided
windows against full-document and flat-window forwards computed by obvious loops, causality, independence from the other
documents (alone, batched, reordered, 1 vs 2 processes through eval_ttt.py's CLI under torchrun), and byte totals.

The helpers here (a small validation set cut from the bundled sample, a tiny model whose every weight matters, a saved
checkpoint) are shared with tests/test_eval_ttt.py."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_ttt
import train_gpt as tg
from data.files import sha256_file, write_atomic
from data.loader import (SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, TokenStream, ValidationSet,
                         build_byte_tables, load_tokenizer, split_pattern)
from eval_ttt import EvalSpec

ROOT = Path(__file__).resolve().parents[1]

# Documents of the small validation set: the first sample validation documents, cut to these many tokens (BOS included),
# so a test runs in a second while documents still span many windows and chunks.
SMALL_DOC_LENGTHS = (321, 187, 256, 97, 410, 143)
TINY = dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers


def write_val_shard(directory: Path, docs: list[np.ndarray]) -> None:
    """A val shard in train_gpt's format: 256 int32 header (magic, version, count), then uint16 tokens."""
    tokens = np.concatenate(docs).astype("<u2")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "small_val_000000.bin", "wb") as f:
        f.write(header.tobytes() + tokens.tobytes())


def build_small_set(sample_dir: Path, directory: Path) -> Path:
    """`directory` with the sample's tokenizer and a val shard of the first sample validation documents, cut short."""
    if not (directory / "small_val_000000.bin").is_file():
        stream = TokenStream(split_pattern(str(sample_dir), "val"), 1024)
        docs = [stream.document(k)[:n] for k, n in enumerate(SMALL_DOC_LENGTHS)]
        shutil.copyfile(sample_dir / "tokenizer.model", directory.parent / f".{directory.name}.tokenizer")
        write_val_shard(directory, docs)
        os.replace(directory.parent / f".{directory.name}.tokenizer", directory / "tokenizer.model")
    return directory


def load_val(data_dir: Path, max_docs: int = 0) -> ValidationSet:
    tokenizer = str(data_dir / "tokenizer.model")
    return ValidationSet.load(str(data_dir), 1024, build_byte_tables(load_tokenizer(tokenizer), 1024, tokenizer), max_docs)


def tiny_model(seed: int = 0, **config) -> tg.GPT:
    """A tiny GPT whose every weight is random and non-zero (the zero-initialised output projections of a fresh model
    would make every token's loss independent of its context, and the causality tests vacuous); config: ModelConfig
    settings beyond TINY's."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig(vocab_size=1024, **TINY, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3 if name == "tok_emb.weight" else 1.0 / p.shape[1] ** 0.5)
    model.requires_grad_(False)
    return model.eval()


def save_checkpoint(model: tg.GPT, data_dir: Path, path: Path, window: int = 64) -> Path:
    """A final checkpoint as train_gpt.py writes it, trained (as far as its metadata says) on data_dir."""
    fields = {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k in fields}
    hp = tg.Hyperparameters(data_path=str(data_dir), tokenizer_path=str(data_dir / "tokenizer.model"),
                            train_seq_len=window, eval_window=window, eval_stride=window // 2, eval_batch_tokens=2048,
                            **config)
    checkpoint = {"kind": "final", "model": model.state_dict(), "step": 0,
                  **tg.checkpoint_metadata(hp, sha256_file(hp.tokenizer_path))}
    write_atomic(str(path), lambda tmp: torch.save(checkpoint, tmp))
    return path


def doc_losses(model, doc: np.ndarray) -> np.ndarray:
    """Per-token losses of one plain causal forward over a whole (piece of a) document."""
    tokens = torch.from_numpy(doc.astype(np.int64))
    with torch.no_grad():
        return model(tokens[:-1][None], tokens[1:][None])[0].double().numpy()


@contextlib.contextmanager
def one_thread_env():
    """Tiny matrices: one thread is much faster than two on shared cores (and leaves the other core to others).
    OMP_NUM_THREADS=1 keeps eval_ttt.main (through train_gpt.setup_distributed) from choosing its own thread count."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with one_thread_env():
        yield


@pytest.fixture(scope="module")
def small_dir(sample_data, tmp_path_factory) -> Path:
    return build_small_set(sample_data, tmp_path_factory.getbasetemp() / "eval_small")


@pytest.fixture(scope="module")
def val(small_dir) -> ValidationSet:
    return load_val(small_dir)


@pytest.fixture(scope="module")
def model() -> tg.GPT:
    return tiny_model()


def strided(model, val, window, stride, batch_tokens=4096, process=None) -> dict:
    spec = EvalSpec(mode="strided", window=window, stride=stride, batch_tokens=batch_tokens)
    return eval_ttt.evaluate(model, val, spec, process=process, keep_token_losses=True).token_losses


# ----------------------------------------------------------------------------------------------------------------------
# strided windows against obvious loops


def test_strided_with_long_window_is_one_full_document_forward(model, val):
    losses = strided(model, val, window=512, stride=256)
    for k in range(val.num_docs):
        np.testing.assert_allclose(losses[k], doc_losses(model, val.document(k)), rtol=1e-5, atol=1e-5)


def test_stride_equal_to_window_is_flat_windows_of_each_document(model, val):
    window = 64
    losses = strided(model, val, window=window, stride=window)
    for k in range(val.num_docs):
        doc, expected = val.document(k), []
        n = len(doc) - 1
        for start in range(0, n, window):  # non-overlapping windows from the document's start, the last one shorter
            expected.append(doc_losses(model, doc[start: start + window + 1]))
        np.testing.assert_allclose(losses[k], np.concatenate(expected), rtol=1e-5, atol=1e-5)
    # and every strided window really does add context: stride < window changes the losses after the first window
    overlapping = strided(model, val, window=window, stride=16)
    assert not np.allclose(overlapping[0][window:], losses[0][window:], atol=1e-4)


def test_flat_windows_cut_the_concatenated_documents_every_window(model, val):
    """flat: the documents back to back, cut every W tokens; a token sees the tokens of its own document in its own
    window only (a cut ends a document's context, a document start ends a window's)."""
    window = 48
    losses = eval_ttt.evaluate(model, val, EvalSpec(mode="flat", window=window, batch_tokens=4096),
                               keep_token_losses=True).token_losses
    position = 0
    for k in range(val.num_docs):
        doc, expected = val.document(k), []
        n = len(doc) - 1
        start = 0
        while start < n:  # the next cut of the concatenation after this document position
            end = min(n, start + window - (position + start) % window)
            expected.append(doc_losses(model, doc[start: end + 1]))
            start = end
        position += n
        np.testing.assert_allclose(losses[k], np.concatenate(expected), rtol=1e-5, atol=1e-5)


def test_strided_is_causal(model, val, small_dir, tmp_path):
    k, t = 4, 150  # document 4 (410 tokens); replace every token after position t
    doc = val.document(k)
    changed = doc.copy()
    changed[t + 1:] = np.random.default_rng(0).integers(4, 1024, len(doc) - t - 1)
    write_val_shard(tmp_path, [doc, changed])
    shutil.copyfile(small_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    pair = load_val(tmp_path)
    for window, stride in ((64, 16), (64, 64), (128, 48)):
        losses = strided(model, pair, window, stride)
        # losses[i] predicts token i + 1: those up to position t see only unchanged tokens
        np.testing.assert_array_equal(losses[0][:t], losses[1][:t])
        assert not np.allclose(losses[0][t:], losses[1][t:])


def test_strided_document_scores_do_not_depend_on_other_documents(model, val):
    window, stride = 64, 24
    together = strided(model, val, window, stride)
    for k in range(val.num_docs):
        alone = strided(model, val.subset([k]), window, stride)[0]
        np.testing.assert_allclose(alone, together[k], rtol=1e-6, atol=1e-6)
    order = [3, 0, 5, 1, 4, 2]
    reordered = strided(model, val.subset(order), window, stride)
    for i, k in enumerate(order):
        np.testing.assert_allclose(reordered[i], together[k], rtol=1e-6, atol=1e-6)
    # a batch small enough to split the windows differently
    small_batches = strided(model, val, window, stride, batch_tokens=100)
    for k in range(val.num_docs):
        np.testing.assert_allclose(small_batches[k], together[k], rtol=1e-6, atol=1e-6)


def test_byte_totals_are_the_decoded_utf8_lengths(val, small_dir, model, tmp_path):
    sp = load_tokenizer(str(small_dir / "tokenizer.model"))
    decoded = [len(sp.decode(val.document(k)[1:].tolist()).encode("utf-8")) for k in range(val.num_docs)]
    assert val.byte_counts.tolist() == decoded
    checkpoint = save_checkpoint(model, small_dir, tmp_path / "tiny.pt")
    assert eval_ttt.main(["--checkpoint", checkpoint, "--mode", "flat", "--out", tmp_path / "r.json"], trainer=tg) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["bytes"] == sum(decoded) and [d["bytes"] for d in results["docs"]] == decoded
    assert results["tokens"] == sum(SMALL_DOC_LENGTHS) - len(SMALL_DOC_LENGTHS)


# ----------------------------------------------------------------------------------------------------------------------
# 1 vs 2 processes (torchrun, gloo), through eval_ttt.py's command line


@pytest.mark.slow
def test_two_processes_score_like_one(model, small_dir, tmp_path):
    checkpoint = save_checkpoint(model, small_dir, tmp_path / "tiny.pt")
    common = ["--checkpoint", str(checkpoint), "--mode", "strided", "--window", "64", "--stride", "24"]
    assert eval_ttt.main(common + ["--out", str(tmp_path / "one.json"),
                                   "--dump-token-losses", str(tmp_path / "one.npy")], trainer=tg) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "eval_ttt.py"), *common, "--out", str(tmp_path / "two.json"),
                           "--dump-token-losses", str(tmp_path / "two.npy")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval mode:strided") == 1  # only rank 0 prints
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert [(d["id"], d["tokens"], d["bytes"]) for d in two["docs"]] == [(d["id"], d["tokens"], d["bytes"])
                                                                         for d in one["docs"]]
    np.testing.assert_allclose([d["nats"] for d in two["docs"]], [d["nats"] for d in one["docs"]], rtol=1e-6)
    # both ranks had work: the per-token losses came from two processes and still line up
    assert len(eval_ttt.assign_documents(np.array(SMALL_DOC_LENGTHS) - 1, 2)[1]) > 0
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-6)

"""Bytes per token for bits per byte: data.loader.build_byte_tables / document_bytes must give, for every document,
exactly len(sp.decode(ids).encode("utf-8")), for our lossless tokenizer and for parameter-golf-style (nmt_nfkc)
tokenizers, which are not lossless."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data import loader, prepare_corpus

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = ROOT / "data" / "sample" / "peps.jsonl.gz"
VAL_DOCS = 60


@pytest.fixture(scope="module")
def sample_docs() -> list[str]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train(texts, **settings) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    settings.setdefault("max_sentence_length", 1 << 20)  # the default, 4192 bytes, would skip most PEPs
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, minloglevel=2, **settings)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def table_and_decoded_bytes(sp, tables, text):
    ids = np.array([loader.BOS_ID] + sp.encode(text), dtype=np.int64)
    return ids, loader.document_bytes(tables, ids), len(sp.decode(ids.tolist()).encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# The bundled sample with the tokenizer prepare_corpus.py trains (lossless)


@pytest.fixture(scope="module")
def val_and_train_docs(sample_docs, prepared_sample) -> tuple[list[str], list[str]]:
    """The sample's validation and training documents as prepare_corpus.py splits them (--val-select spread; the
    training documents that near-duplicate a validation document, listed in the manifest, dropped)."""
    positions = set(prepare_corpus.validation_positions(len(sample_docs), VAL_DOCS, "spread"))
    dropped = {d["input_document"] for d in prepared_sample[2]["splits"]["train"]["dropped"]}
    return ([d for i, d in enumerate(sample_docs) if i in positions],
            [d for i, d in enumerate(sample_docs) if i not in positions and i not in dropped])


@pytest.fixture(scope="module")
def prepared_sample(sample_data):
    """The sample as run.sh prepares it (tests/conftest.py runs `prepare_corpus.py --input data/sample/peps.jsonl.gz
    --out data/datasets/peps_sp1024_spread --val-docs 60 --val-select spread` once): tokenizer trained on the 630
    other documents."""
    sp = spm.SentencePieceProcessor(model_file=str(sample_data / "tokenizer.model"))
    manifest = json.loads((sample_data / "manifest.json").read_text(encoding="utf-8"))
    return sample_data, sp, manifest


@pytest.fixture(scope="module")
def lossless_sp(prepared_sample):
    return prepared_sample[1]


def test_sample_validation_documents_bytes(val_and_train_docs, prepared_sample):
    """Every validation document, read back from the shards: table bytes == decoded bytes == raw UTF-8 bytes."""
    data_path, sp, manifest = prepared_sample
    assert manifest["tokenizer"]["training"]["normalization_rule_name"] == "identity"
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    assert not tables.strips_first_space
    stream = loader.TokenStream(loader.split_pattern(str(data_path), "val"), 1024)
    assert stream.num_docs == VAL_DOCS
    total = non_ascii = 0
    assert manifest["parameters"]["val_select"] == "spread"
    for i, doc in enumerate(val_and_train_docs[0]):
        ids = stream.document(i)
        table_bytes = loader.document_bytes(tables, ids)
        decoded = sp.decode(ids.tolist())
        raw = len(doc.encode("utf-8"))
        assert table_bytes == len(decoded.encode("utf-8")) == raw, f"validation document {i}"
        assert decoded == doc
        total += table_bytes
        non_ascii += raw != len(doc)
    assert non_ascii > 0  # the check covers multi-byte characters
    assert total == manifest["splits"]["val"]["bytes"] == manifest["splits"]["val"]["decoded_bytes"]
    # the validation set an evaluation scores counts the same bytes, and every token after each BOS
    val = loader.ValidationSet.load(str(data_path), 1024, tables)
    raw_bytes = [len(doc.encode("utf-8")) for doc in val_and_train_docs[0]]
    assert val.byte_counts.tolist() == raw_bytes and val.token_counts.tolist() == (stream.doc_lengths - 1).tolist()
    part = val.subset([5, 2])
    assert part.byte_counts.tolist() == [raw_bytes[5], raw_bytes[2]]
    np.testing.assert_array_equal(part.document(0), stream.document(5))
    assert loader.ValidationSet.load(str(data_path), 1024, tables, max_docs=7).byte_counts.tolist() == raw_bytes[:7]


@pytest.mark.slow
def test_sample_tokenizer_is_the_one_prepare_corpus_trains(val_and_train_docs, prepared_sample):
    """The prepared sample is current and reproducible: training again on its training documents with the settings
    its manifest records gives the same model file, byte for byte."""
    _, sp, manifest = prepared_sample
    settings = manifest["tokenizer"]["training"]
    assert settings == prepare_corpus.trainer_settings(settings["vocab_size"], settings["character_coverage"])
    model = prepare_corpus.train_tokenizer(iter(val_and_train_docs[1]), settings, str(SAMPLE))
    assert hashlib.sha256(model).hexdigest() == manifest["tokenizer"]["sha256"]


def test_sample_stream_counts_match_documents(sample_docs, lossless_sp):
    """Counted token by token over the concatenated validation stream (the way evaluation sees it)."""
    sp = lossless_sp
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    docs = [np.array([loader.BOS_ID] + ids) for ids in sp.encode(sample_docs[:VAL_DOCS])]
    stream = np.concatenate(docs)
    per_token = tables.count(stream[:-1], stream[1:])
    end = 0
    for doc, text in zip(docs, sample_docs[:VAL_DOCS]):
        start, end = end, end + len(doc)
        assert per_token[start:end - 1].sum() == len(text.encode("utf-8"))  # the tokens after this BOS
        assert start == 0 or per_token[start - 1] == 0  # the BOS itself stands for no byte


# ---------------------------------------------------------------------------------------------------------------------
# parameter-golf-style tokenizers (nmt_nfkc): not lossless, byte fallback for characters outside the vocabulary

# Characters that are not in the training text, so they come out as byte-fallback pieces: rare CJK (extension B),
# emoji, Ethiopic, Tibetan, Gothic.
RARE = "𠀋𠮷🦜🪐ሀཀ𐌰"
EDGE_DOCS = [
    "🦜 parrot at the start, then words",          # byte pieces first, then a "▁word" right after them
    "𠀋 rare first character",
    "   three leading spaces and   inner runs   ",  # nmt_nfkc removes extra whitespace
    " ",                                              # only whitespace: no tokens at all
    "ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ, ﬁ ligature, ① circled, ㍿",  # NFKC rewrites these
    "tab\tnew line\nCRLF\r\nform feed\x0c end",
    "the block \u2581 character and \u2581\u2581 twice",
    "zero\u200bwidth space, soft\u00adhyphen, e\u0301 combining",
    "日本語の文章 𠮷野家 🍣 ሀሁሂ ཀཁག 𐌰𐌱",
    "numbers 1234567890 and 3.14159",
    "x 🦜🦜 y 🪐",
    "ends with a rare char 𐌰",
    "\u2581",
    "a",
    "café naïve Ærø — “quotes” … €100",
]


PG_VARIANTS = {
    # parameter-golf's data/download_hf_docs_and_tokenize.py (the settings of fineweb_1024_bpe.model)
    "parameter-golf": dict(normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
                           hard_vocab_limit=False),
    # the same with SentencePiece's default dummy prefix
    "dummy-prefix": dict(normalization_rule_name="nmt_nfkc", character_coverage=0.999),
}


@pytest.fixture(scope="module", params=sorted(PG_VARIANTS))
def pg_sp(request, sample_docs):
    sp = train(sample_docs[VAL_DOCS:300], model_type="bpe", vocab_size=1024, byte_fallback=True, split_digits=True,
               pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2, **PG_VARIANTS[request.param])
    return request.param, sp


def test_pg_tokenizer_bytes_equal_decoded_bytes(sample_docs, pg_sp):
    name, sp = pg_sp
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    assert tables.strips_first_space  # nmt_nfkc removes leading whitespace; the decoder drops a first "▁"
    assert not any(sp.piece_to_id(c) != sp.unk_id() for c in RARE)  # none of them has its own piece
    changed = byte_fallback_docs = 0
    for i, doc in enumerate(sample_docs[:VAL_DOCS] + EDGE_DOCS):
        ids, table_bytes, decoded_bytes = table_and_decoded_bytes(sp, tables, doc)
        assert table_bytes == decoded_bytes, f"{name}: document {i} {doc[:40]!r}"
        changed += sp.decode(ids.tolist()) != doc
        byte_fallback_docs += any(sp.is_byte(int(t)) for t in ids)
    assert changed >= VAL_DOCS  # not lossless: NFKC and whitespace folding change every sample document
    for doc in ("🦜 parrot at the start, then words", "x 🦜🦜 y 🪐", "日本語の文章 𠮷野家 🍣 ሀሁሂ ཀཁག 𐌰𐌱"):
        assert any(sp.is_byte(t) for t in sp.encode(doc)), f"{name}: {doc!r} has no byte-fallback piece"
    assert byte_fallback_docs >= 5


def test_pg_stream_counts_match_documents(sample_docs, pg_sp):
    name, sp = pg_sp
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    texts = EDGE_DOCS + sample_docs[:10]
    docs = [np.array([loader.BOS_ID] + ids) for ids in sp.encode(texts)]
    stream = np.concatenate(docs)
    per_token = tables.count(stream[:-1], stream[1:])
    end = 0
    for doc in docs:
        start, end = end, end + len(doc)
        assert per_token[start:end - 1].sum() == len(sp.decode(doc.tolist()).encode("utf-8")), name


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer settings whose pieces hold "▁" after their first character: SentencePiece trained with
# allow_whitespace_only_pieces=True ("▁▁▁▁", e.g. Llama/Gemma-style tokenizers) or split_by_whitespace=False
# ("▁of▁the"). The decoder turns every such "▁" into one space byte, and so must the tables.


@pytest.mark.parametrize("setting", [{"allow_whitespace_only_pieces": True}, {"split_by_whitespace": False}],
                         ids=["whitespace-only-pieces", "no-split-by-whitespace"])
def test_pieces_with_inner_spaces(sample_docs, setting):
    sp = train(sample_docs[VAL_DOCS:200], model_type="bpe", vocab_size=1024, byte_fallback=True,
               normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
               pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2, **setting)
    if not any("\u2581" in sp.id_to_piece(t)[1:] for t in range(sp.vocab_size())):
        pytest.fail("precondition: the tokenizer has no piece with an inner '▁'")  # a real failure, not the xfail
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    for doc in sample_docs[:10]:
        _, table_bytes, decoded_bytes = table_and_decoded_bytes(sp, tables, doc)
        assert table_bytes == decoded_bytes


# ---------------------------------------------------------------------------------------------------------------------
# bits per byte


def test_bits_per_byte_hand_computed():
    # Three tokens with losses 0.5, 1.0 and 1.5 nats standing for 4 bytes: 3 / ln 2 / 4 = 1.0820212806...
    assert loader.bits_per_byte(3.0, 4) == pytest.approx(1.0820212806667, rel=1e-12)
    # 1 bit per byte: a loss of ln 2 nats for each of 8 one-byte tokens.
    assert loader.bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0, rel=1e-15)


def test_bits_per_byte_uniform_model_on_a_document(lossless_sp):
    """A model that predicts uniformly over 1024 tokens pays 10 bits per token; BPB = 10 x tokens / bytes."""
    sp = lossless_sp
    tables = loader.build_byte_tables(sp, 1024, "tokenizer.model")
    text = "Hello, world: 12 €!"  # 21 UTF-8 bytes (€ is 3)
    ids = np.array([loader.BOS_ID] + sp.encode(text))
    predicted = len(ids) - 1
    nbytes = loader.document_bytes(tables, ids)
    assert nbytes == 21
    bpb = loader.bits_per_byte(predicted * math.log(1024), nbytes)
    assert bpb == pytest.approx(10 * predicted / 21, rel=1e-12)

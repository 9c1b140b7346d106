"""CaseOps (data/caseops.py): exact inversion on every string, the byte sidecar that prepare_corpus --caseops writes,
the loader's use and refusal of sidecars, and parameter-golf's CaseOps layout loading as it is."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data import caseops, loader, prepare_corpus, shards
from data.loader import CASEOPS_ALLCAPS as ALLCAPS, CASEOPS_CAPNEXT as CAPNEXT, CASEOPS_ESCAPE as ESC
from data.loader import CASEOPS_TITLE as TITLE

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "peps.jsonl.gz"


def sample_texts() -> list[str]:
    return [t for t, _ in prepare_corpus.iter_documents(str(SAMPLE), "jsonl.gz")]


# ---------------------------------------------------------------------------------------------------------------------
# The transform


def test_encode_examples():
    assert caseops.encode("The quick brown FOX.") == f"{TITLE}the quick brown {ALLCAPS}fox."
    assert caseops.encode("iPhone A McDonald") == f"i{CAPNEXT}phone {TITLE}a {TITLE}mc{CAPNEXT}donald"
    assert caseops.encode("ÉCOLE naïve") == f"É{ALLCAPS}cole naïve"  # only ASCII letters are words
    assert caseops.encode(f"x{TITLE}y{ESC}") == f"x{ESC}{TITLE}y{ESC}{ESC}"  # operators in the text are escaped
    assert caseops.encode("AB12cD") == f"{ALLCAPS}ab12c{CAPNEXT}d"


def random_strings(rng, count):
    alphabet = list("abcxyzABCXYZ  \n\t.,'-_0123") + list(loader.CASEOPS_OPERATORS) + ["\ue000", "\u2581", "é", "É",
                                                                                      "ß", "ﬁ", "🙂", "\x00", "Ω"]
    for _ in range(count):
        n = int(rng.integers(0, 40))
        picks = []
        for _ in range(n):
            if rng.random() < 0.15:  # any code point outside the surrogates
                c = int(rng.integers(0, 0x110000 - 0x800))
                picks.append(chr(c if c < 0xD800 else c + 0x800))
            else:
                picks.append(alphabet[int(rng.integers(len(alphabet)))])
        yield "".join(picks)


def test_round_trip_on_random_unicode_and_operator_text():
    rng = np.random.default_rng(0)
    for s in random_strings(rng, 4000):
        t = caseops.encode(s)
        assert t == caseops.encode_reference(s), repr(s)
        assert not any("A" <= c <= "Z" for c in t)
        assert caseops.decode(t) == s, repr(s)


def test_decode_refuses_what_encode_cannot_produce():
    for bad in (TITLE, f"{TITLE} x", f"a{TITLE}b", f"{ALLCAPS}a", f"{ALLCAPS}ab{CAPNEXT}c", f"{CAPNEXT}a", "Abc",
                f"{ESC}a", f"ab{ESC}", f"{TITLE}{TITLE}a"):
        with pytest.raises(caseops.CaseOpsError):
            caseops.decode(bad)


def test_every_sample_document_round_trips():
    texts = sample_texts()
    assert len(texts) == 701
    encoded = [caseops.encode(t) for t in texts]
    assert [caseops.decode(t) for t in encoded] == texts
    assert sum(e != t for e, t in zip(encoded, texts)) > 690  # the transform does change the text


# ---------------------------------------------------------------------------------------------------------------------
# prepare_corpus --caseops and the loader


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A CaseOps dataset of 60 sample documents (plus operator characters and a '▁' in the text)."""
    base = tmp_path_factory.mktemp("caseops")
    texts = sample_texts()[:58] + [f"Literal operators {TITLE}{ESC}X and ALL {ESC}{ESC}{ALLCAPS}: FINE.",
                                   "A \u2581 piece marker and McDonald's iPhone."]
    src = base / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = base / "out"
    assert prepare_corpus.main(["--input", str(src), "--out", str(out), "--vocab-size", "512", "--val-docs", "12",
                                "--shard-tokens", "5000", "--caseops", "--decontaminate-share", "0"]) == 0
    positions = prepare_corpus.validation_positions(len(texts), 12, "spread")
    sp = loader.load_tokenizer(str(out / "tokenizer.model"))
    return {"out": out, "val_texts": [texts[p] for p in positions], "texts": texts, "sp": sp,
            "tables": loader.build_byte_tables(sp, 512, str(out / "tokenizer.model"))}


def test_caseops_tokenizer_has_the_operators_as_pieces(caseops_data):
    sp = caseops_data["sp"]
    assert [sp.piece_to_id(c) for c in loader.CASEOPS_OPERATORS] == [4, 5, 6, 7]
    assert caseops_data["tables"].has_caseops and caseops_data["tables"].escape_id == 7
    assert caseops_data["tables"].lossless
    caseops.check_tokenizer(sp, "x")  # no error


def test_sidecar_bytes_equal_the_original_texts_bytes(caseops_data):
    out, val_texts = caseops_data["out"], caseops_data["val_texts"]
    val = loader.ValidationSet.load(str(out), 512, caseops_data["tables"])
    assert val.sidecar and val.num_docs == 12
    assert val.byte_counts.tolist() == [len(t.encode("utf-8")) for t in val_texts]
    # the tables alone count the transformed text: more bytes (3 per operator)
    stream = val.stream
    tables = caseops_data["tables"]
    table_counts = [int(tables.count(d[:-1], d[1:]).sum()) for d in (stream.document(i) for i in range(12))]
    assert all(t > b for t, b in zip(table_counts, val.byte_counts))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["text_transform"] == "lossless_caps_caseops_v1"
    assert manifest["splits"]["val"]["sidecar"]["bytes"] == sum(len(t.encode()) for t in val_texts)
    assert [f["name"] for f in manifest["splits"]["val"]["sidecar"]["files"]] == \
        [f["name"].replace("_val_", "_val_bytes_") for f in manifest["splits"]["val"]["files"]]


def test_bpb_from_the_sidecar_equals_bpb_from_the_original_bytes(caseops_data):
    val = loader.ValidationSet.load(str(caseops_data["out"]), 512, caseops_data["tables"])
    nats = np.random.default_rng(1).random(val.num_docs) * 1000
    for k, text in enumerate(caseops_data["val_texts"]):
        assert loader.bits_per_byte(nats[k], int(val.byte_counts[k])) == \
            loader.bits_per_byte(nats[k], len(text.encode("utf-8")))


def test_decoded_and_inverted_documents_equal_the_originals(caseops_data):
    sp, val_texts = caseops_data["sp"], caseops_data["val_texts"]
    stream = loader.TokenStream(loader.split_pattern(str(caseops_data["out"]), "val"), 512)
    assert not any(loader.is_sidecar(f) for f in stream.files)
    for k, text in enumerate(val_texts):
        decoded = caseops.decode(sp.decode(stream.document(k)[1:].tolist()))
        assert decoded == text.replace("\u2581", " ")  # '▁' decodes to a space, as without CaseOps


def test_fast_token_bytes_equal_the_reference(caseops_data):
    sp, tables = caseops_data["sp"], caseops_data["tables"]
    for text in caseops_data["texts"][:20] + caseops_data["texts"][-2:]:
        ids = np.array([loader.BOS_ID] + sp.encode(caseops.encode(text)))
        fast = loader.token_original_bytes(tables, ids)
        assert fast[0] == 0
        assert fast[1:].tolist() == caseops.token_original_bytes_reference(sp, ids[1:])
        ops = loader.acting_operators(tables, ids)
        assert (fast[ops] == 0).all()
    # an escaped operator counts its 3 bytes, the ESCAPE in front of it 0
    ids = np.array([loader.BOS_ID] + sp.encode(caseops.encode(f"{TITLE}{ESC}")))
    assert ids[1:].tolist() == [7, 4, 7, 7]
    assert loader.token_original_bytes(tables, ids).tolist() == [0, 0, 3, 0, 3]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_sidecar(path: Path, change) -> None:
    counts = loader.load_shard(str(path)).astype(np.int64)
    shards.write_shard(path, change(counts))


def error_of(out: Path, tables) -> str:
    with pytest.raises(loader.DataError) as e:
        loader.ValidationSet.load(str(out), 512, tables)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_sidecar_that_disagrees_with_its_tokens_is_refused(caseops_data, tmp_path):
    tables = caseops_data["tables"]
    sidecar = sorted(caseops_data["out"].glob("*_val_bytes_*.bin"))
    assert len(sidecar) >= 2  # small shards: documents run across sidecar files too
    base = caseops_data["out"]

    out = copy_dataset(base, tmp_path / "off_by_one")
    stream = loader.TokenStream(loader.split_pattern(str(out), "val"), 512)
    k = stream.num_docs // 2
    start = int(stream.doc_starts[k])
    doc = stream.document(k)
    at = start + int(np.flatnonzero(~caseops_data["tables"].operator[doc] & (doc != loader.BOS_ID))[0])  # a word
    j = int(np.searchsorted(stream.shard_offsets, start, side="right")) - 1
    assert j >= 1 and at < stream.shard_offsets[j + 1]  # a document that starts in a later sidecar file
    name = sidecar[j].name

    def plus_one(c):
        c[at - stream.shard_offsets[j]] += 1
        return c
    rewrite_sidecar(out / name, plus_one)
    message = error_of(out, tables)
    assert message.startswith(str(out / name)) and f"validation document {k} counts" in message

    out = copy_dataset(base, tmp_path / "short")
    rewrite_sidecar(out / name, lambda c: c[:-1])
    assert error_of(out, tables).startswith(str(out / name)) and "byte entries" in error_of(out, tables)

    out = copy_dataset(base, tmp_path / "missing")
    os.remove(out / name)
    assert error_of(out, tables).startswith(str(out / name)) and "missing" in error_of(out, tables)

    out = copy_dataset(base, tmp_path / "orphan")
    shutil.copy(out / name, out / name.replace(name[-10:-4], "000099"))
    assert "without its validation shard" in error_of(out, tables)

    out = copy_dataset(base, tmp_path / "bos")
    tokens = loader.load_shard(str(out / sidecar[0].name.replace("_val_bytes_", "_val_")))

    def bos_counts(c):
        c[int(np.flatnonzero(np.asarray(tokens) == loader.BOS_ID)[1])] = 2
        return c
    rewrite_sidecar(out / sidecar[0].name, bos_counts)
    assert "for a BOS" in error_of(out, tables)

    out = copy_dataset(base, tmp_path / "operator")  # the same sum, but an operator counted 1 byte
    tokens = np.asarray(loader.load_shard(str(out / sidecar[0].name.replace("_val_bytes_", "_val_"))))
    at = int(np.flatnonzero(tokens == 4)[0])

    def move(c):
        c[at] += 1
        c[at + 1] -= 1
        return c
    rewrite_sidecar(out / sidecar[0].name, move)
    assert "is a CaseOps operator but counts 1 bytes" in error_of(out, tables)


def test_prepare_refuses_a_tokenizer_without_operators(tmp_path, caseops_data):
    plain = tmp_path / "plain"
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in caseops_data["texts"][:20]), encoding="utf-8")
    assert prepare_corpus.main(["--input", str(src), "--out", str(plain), "--vocab-size", "400", "--val-docs", "3"]) == 0
    assert not (plain / "peps_val_bytes_000000.bin").exists() and not list(plain.glob("*_val_bytes_*"))
    with pytest.raises(prepare_corpus.PrepareError, match="not a CaseOps tokenizer"):
        args = prepare_corpus.build_parser().parse_args(["--input", str(src), "--out", str(tmp_path / "x"),
                                                         "--tokenizer", str(plain / "tokenizer.model"), "--caseops"])
        prepare_corpus.run(args)


# ---------------------------------------------------------------------------------------------------------------------
# Parameter-golf's CaseOps layout, built small: their tokenizer kind (NFKC, whitespace folded, the operators as
# user-defined pieces at ids 4-7), their folders and names, their sidecar (the original bytes under each piece's surface)


def their_sidecar_counts(sp, text: str, ids: list[int]) -> list[int]:
    """Bytes per token in their format: one entry per token, an operator 0, summing to the original text's UTF-8
    bytes. Their export counts the bytes under each piece's surface (sentencepiece's proto output, which needs
    protobuf, not installed here); this stand-in counts what each piece decodes to and gives the bytes the tokenizer
    folded away (or added) to the document's last non-operator token."""
    counts = caseops.token_original_bytes_reference(sp, ids)
    last = max(i for i, t in enumerate(ids) if sp.id_to_piece(t) not in loader.CASEOPS_OPERATORS)
    counts[last] += len(text.encode("utf-8")) - sum(counts)
    assert counts[last] >= 0
    return counts


def test_parameter_golf_caseops_layout_loads_unchanged(tmp_path):
    texts = sample_texts()[:40] + ["Two  spaces,\n\nnewlines and \ufb01 ligatures: NFKC FOLDS them."]
    root = tmp_path / "data" / "datasets" / "fineweb10B_sp8192_caseops" / "datasets"
    (root / "tokenizers").mkdir(parents=True)
    model = root / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter([caseops.encode(t) for t in texts[:30]]),
                                   model_prefix=str(model)[:-len(".model")], vocab_size=400, model_type="bpe",
                                   normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, byte_fallback=True,
                                   user_defined_symbols=list(loader.CASEOPS_OPERATORS), pad_id=0, bos_id=1, eos_id=2,
                                   unk_id=3, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    data = root / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    data.mkdir(parents=True)
    val_texts = texts[30:]
    tokens, counts = [], []
    for t in val_texts:
        ids = sp.encode(caseops.encode(t))
        c = their_sidecar_counts(sp, t, ids)
        assert len(c) == len(ids)
        tokens += [1] + ids
        counts += [0] + c
    shards.write_shard(data / "fineweb_val_000000.bin", tokens)
    shards.write_shard(data / "fineweb_val_bytes_000000.bin", counts)
    shards.write_shard(data / "fineweb_train_000000.bin", [1] + sp.encode(caseops.encode(texts[0])))

    tables = loader.build_byte_tables(loader.load_tokenizer(str(model)), 8192, str(model))
    assert tables.has_caseops and not tables.lossless  # their kind of tokenizer folds whitespace
    val = loader.ValidationSet.load(str(data), 8192, tables)
    assert val.sidecar and val.num_docs == len(val_texts)
    assert val.byte_counts.tolist() == [len(t.encode("utf-8")) for t in val_texts]
    assert int(val.token_counts.sum()) == len(tokens) - len(val_texts)
    train = loader.TokenStream(loader.split_pattern(str(data), "train"), 8192)
    assert train.num_docs == 1
    # still refused: a sidecar one entry short
    shards.write_shard(data / "fineweb_val_bytes_000000.bin", counts[:-1])
    with pytest.raises(loader.DataError, match="fineweb_val_bytes_000000.bin: .* byte entries"):
        loader.ValidationSet.load(str(data), 8192, tables)


def test_without_a_sidecar_a_caseops_tokenizer_still_counts_the_original_bytes(caseops_data, tmp_path):
    out = copy_dataset(caseops_data["out"], tmp_path / "no_sidecar")
    for f in out.glob("*_val_bytes_*.bin"):
        os.remove(f)
    val = loader.ValidationSet.load(str(out), 512, caseops_data["tables"])
    assert not val.sidecar
    # the tokens of a lossless tokenizer say it all: the same bytes as the sidecar (operators at 0), not 3 per operator
    assert val.byte_counts.tolist() == [len(t.replace("\u2581", " ").encode("utf-8")) for t in caseops_data["val_texts"]]

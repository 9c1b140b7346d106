"""speedrun audit: every fault class of issue 14 planted into a small dataset is caught, the clean dataset passes,
and speedrun verify fails a record whose log disagrees with its dataset's fingerprint.

The datasets are made by data/prepare_corpus.py from a few hundred generated texts (a second or two each) and the
faults planted with data/shards.py's writer."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from data import prepare_corpus, shards
from speedrun.analysis import run_log
from speedrun.audit import audit, fingerprint
from speedrun.records import check as record_check
from speedrun.records import new as record_new

ROOT = Path(__file__).resolve().parents[1]

AUDIT = ["-m", "speedrun", "audit"]
VAL_DOCS = 8
VOCAB = 400


def make_texts(count: int, seed: int) -> list[str]:
    """Documents of made-up words (distinct enough that no two share many 8-token shingles), with the characters
    that matter for bytes: non-ASCII, CRLF, tabs, runs of spaces, digits."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyzéü")
    words = ["".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(600)]
    words += ["naïve", "日本語", "🙂", "12345", "3.14", "\t", "  ", "\r\n"]
    texts = []
    for _ in range(count):
        n = int(rng.integers(40, 160))
        texts.append(" ".join(words[j] for j in rng.integers(0, len(words), n)).strip())
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def prepare(out: Path, src: Path, *extra: str) -> Path:
    args = ["--input", str(src), "--out", str(out), "--val-docs", str(VAL_DOCS), "--shard-tokens", "3000", *extra]
    if hasattr(prepare_corpus, "VAL_SELECT_CHOICES") and "--val-select" not in extra:
        args += ["--val-select", "first"]  # validation document k is input text k
    if "--tokenizer" not in extra:
        args += ["--vocab-size", str(VOCAB)]
    # the leaks these tests plant must reach the shards, as they would from a preparation that does not decontaminate
    args += ["--decontaminate-share", "0"]
    assert prepare_corpus.main(args) == 0
    return out


def run(data: Path, *args, json_out: Path | None = None) -> tuple[int, dict | None, str]:
    argv = [str(data), *map(str, args), "--threads", "2"]
    if json_out is not None:
        argv += ["--json", str(json_out)]
    proc = subprocess.run([sys.executable, *AUDIT, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(json_out.read_text()) if json_out is not None and json_out.exists() else None
    return proc.returncode, report, proc.stdout + proc.stderr


def audit_in_process(data: Path, *args) -> tuple[int, dict]:
    """The audit in this process (faster: no torch import per call); returns (exit status, report)."""
    out = data.parent / f"{data.name}.audit.json"
    code = audit.main([str(data), *map(str, args), "--json", str(out)])
    report = json.loads(out.read_text())
    out.unlink()
    return code, report


def status(report: dict) -> dict[str, str]:
    return {name: c["status"] for name, c in report["checks"].items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    base = tmp_path_factory.mktemp("corpus")
    texts = make_texts(120, seed=0)
    return write_jsonl(base / "texts.jsonl", texts), texts


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus) -> Path:
    return prepare(tmp_path_factory.mktemp("clean") / "data", corpus[0])


@pytest.fixture
def copy_of(clean, tmp_path):
    def make() -> Path:
        dest = tmp_path / "data"
        shutil.copytree(clean, dest, ignore=shutil.ignore_patterns("*.npz"))
        return dest
    return make


def split_docs(data: Path, split: str) -> list[np.ndarray]:
    """The documents of a split, BOS first, read with the project's reader (ids unchecked)."""
    stream = train_gpt.TokenStream(train_gpt.split_pattern(str(data), split), 1 << 16)
    return [stream.document(i) for i in range(stream.num_docs)]


def rewrite(data: Path, split: str, docs: list[np.ndarray]) -> None:
    """Replace a split's shards by one shard holding `docs` (the manifest is left as it was)."""
    for path in data.glob(f"*_{split}_*.bin"):
        path.unlink()
    for path in data.glob(f"*_{split}_*.bin.index.npz"):
        path.unlink()
    shards.write_shard(data / f"x_{split}_000000.bin", np.concatenate(docs) if docs else np.zeros(0, np.uint16))


# ---------------------------------------------------------------------------------------------------------------------
# The clean dataset passes; the constants agree with the project's


def test_constants_agree():
    assert audit.P % 2 == 1 and (audit.P * audit.P_INV) % (1 << 64) == 1


def test_shingles_never_cross_the_given_bos():
    """The document boundary is the BOS id the audit is given (the tokenizer's), not a constant of its own: the same
    tokens with another id as BOS give other shingles."""
    tokens = np.array([7, 4, 5, 6, 7, 8, 9, 4, 5, 6], dtype=np.uint16)
    for bos, shingles in ((7, 4), (4, 3)):  # windows of 3 with no BOS in them, after the first BOS
        index = audit.ShingleIndex(tokens, np.flatnonzero(tokens == bos), 3, bos)
        assert len(index.packed) == shingles


@pytest.mark.slow
def test_clean_dataset_passes(clean, corpus, tmp_path):
    code, report, out = run(clean, "--texts", corpus[0], json_out=tmp_path / "r.json")
    assert code == 0, out
    assert status(report) == {"structure": "ok", "overlap": "ok", "near-overlap": "ok", "bytes": "ok",
                              "convention": "info", "texts": "ok", "completeness": "ok"}
    # one summary line per check, then the result line
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines if not ln.startswith(" ")][-8:] == \
        ["structure", "overlap", "near-overlap", "bytes", "convention", "texts", "completeness", "result"]
    manifest = json.loads((clean / "manifest.json").read_text())
    b = report["checks"]["bytes"]
    assert b["bytes"] == manifest["splits"]["val"]["decoded_bytes"]
    assert b["tokens"] == manifest["splits"]["val"]["tokens"] - VAL_DOCS  # the BOS of each document is not scored
    assert b["tokens_per_byte"] == pytest.approx(b["tokens"] / b["bytes"], rel=1e-12)
    s = report["checks"]["structure"]
    assert (s["val"]["documents"], s["train"]["documents"]) == (VAL_DOCS, 120 - VAL_DOCS)


def test_bytes_equal_decoded_bytes(clean):
    """The per-document byte counts the audit reports are len(sp.decode(ids).encode()) of each document."""
    code, report = audit_in_process(clean, "--shingle", "0")
    sp = spm.SentencePieceProcessor(model_file=str(clean / "tokenizer.model"))
    docs = split_docs(clean, "val")
    want = sum(len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs)
    assert report["checks"]["bytes"]["bytes"] == want and code == 0


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [5, 97])
def test_streaming_does_not_depend_on_chunks(clean, monkeypatch, chunk):
    """Tiny chunks (documents and shingles across every chunk and shard boundary) and threads give the same findings
    as one chunk per shard."""
    _, whole = audit_in_process(clean)
    monkeypatch.setattr(audit, "CHUNK_TOKENS", chunk)
    audit._TABLES.clear()
    _, pieces = audit_in_process(clean)
    audit._TABLES.clear()
    for name in ("structure", "overlap", "near-overlap", "bytes", "convention", "completeness"):
        a, b = dict(whole["checks"][name]), dict(pieces["checks"][name])
        for key in ("exact_hash_seconds", "probe_seconds"):
            a.pop(key, None), b.pop(key, None)
        assert a == b, name


# ---------------------------------------------------------------------------------------------------------------------
# Train/val overlap


def test_validation_documents_copied_into_training(tmp_path, corpus):
    """The preparation leak: validation texts also in the training part of the input (the manifest agrees, only the
    overlap checks can see it)."""
    src, texts = corpus
    leaked = texts + [texts[2], texts[5]]
    data = prepare(tmp_path / "data", write_jsonl(tmp_path / "leak.jsonl", leaked))
    code, report = audit_in_process(data)
    assert code == 1
    assert status(report)["structure"] == "ok" and status(report)["completeness"] == "ok"
    ov = report["checks"]["overlap"]
    n_train = len(leaked) - VAL_DOCS
    assert ov["status"] == "fault"
    assert ov["documents"] == [{"id": 2, "train_ids": [n_train - 2]}, {"id": 5, "train_ids": [n_train - 1]}]
    near = report["checks"]["near-overlap"]
    assert [d["id"] for d in near["documents"]] == [2, 5]
    assert all(d["share"] == 1.0 for d in near["documents"])
    assert [d["train_id"] for d in near["documents"]] == [n_train - 2, n_train - 1]


def test_near_copy_with_a_few_tokens_changed(copy_of):
    data = copy_of()
    val, train = split_docs(data, "val"), split_docs(data, "train")
    changed = val[3].copy()
    for k in (10, len(changed) // 2, len(changed) - 3):  # three tokens changed
        changed[k] = 7 if changed[k] != 7 else 8
    rewrite(data, "train", train + [changed])
    code, report = audit_in_process(data)
    assert code == 1
    assert report["checks"]["overlap"]["status"] == "ok"  # not an exact copy
    near = report["checks"]["near-overlap"]
    assert near["status"] == "fault" and [d["id"] for d in near["documents"]] == [3]
    # three changed tokens spoil at most 3 x 8 of the document's shingles
    windows = len(val[3]) - 1 - 8 + 1
    assert near["documents"][0]["share"] >= (windows - 24) / windows
    assert near["documents"][0]["train_id"] == len(train)
    # the share is exactly that of a plain set computation
    shingles = {tuple(d[i:i + 8].tolist()) for d in train + [changed] for i in range(len(d) - 7)}
    body = val[3][1:].tolist()
    mine = [tuple(body[i:i + 8]) for i in range(len(body) - 7)]
    assert near["documents"][0]["share"] == pytest.approx(sum(s in shingles for s in mine) / len(mine), abs=1e-6)
    # below the threshold: a report, not a fault
    code, report = audit_in_process(data, "--threshold", "0.995")
    assert report["checks"]["near-overlap"]["status"] == "ok"


def test_shingle_sampling_still_finds_the_copy(copy_of):
    data = copy_of()
    val, train = split_docs(data, "val"), split_docs(data, "train")
    rewrite(data, "train", train + [val[6]])
    _, report = audit_in_process(data, "--shingle-sample", "4")
    near = report["checks"]["near-overlap"]
    assert [d["id"] for d in near["documents"]] == [6] and near["documents"][0]["share"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Structure and completeness


def test_truncated_validation_tail(copy_of):
    data = copy_of()
    val = split_docs(data, "val")
    val[-1] = val[-1][:-10]
    rewrite(data, "val", val)
    code, report = audit_in_process(data)
    assert code == 1
    comp = report["checks"]["completeness"]
    assert comp["status"] == "fault" and comp["truncated"] == [{"id": VAL_DOCS - 1}]
    assert f"id {VAL_DOCS - 1}) is truncated: 10 tokens missing" in comp["summary"]


def test_truncated_validation_tail_named_with_texts(copy_of, corpus):
    data = copy_of()
    val = split_docs(data, "val")
    val[-1] = val[-1][:-10]
    rewrite(data, "val", val)
    _, report = audit_in_process(data, "--texts", corpus[0])
    texts = report["checks"]["texts"]
    assert texts["status"] == "fault"
    assert texts["faults"] == [{"id": VAL_DOCS - 1, "problem": f"truncated: {len(val[-1]) - 1} of its text's "
                                                                f"{len(val[-1]) - 1 + 10} tokens"}]


def test_document_without_bos(copy_of, corpus):
    """Validation document 4 loses its BOS: it runs on from document 3 (context leaking from one document into the
    next). The counts catch it; with the texts, document 3 is named as running into 4."""
    data = copy_of()
    val = split_docs(data, "val")
    merged = val[:3] + [np.concatenate([val[3], val[4][1:]])] + val[5:]
    rewrite(data, "val", merged)
    code, report = audit_in_process(data, "--texts", corpus[0])
    assert code == 1
    assert report["checks"]["completeness"]["status"] == "fault"
    assert "1 validation documents missing" in report["checks"]["completeness"]["summary"]
    faults = report["checks"]["texts"]["faults"]
    assert faults[0]["id"] == 3 and "BOS before it is missing" in faults[0]["problem"]


def test_split_that_does_not_start_with_bos(copy_of):
    data = copy_of()
    val = split_docs(data, "val")
    val[0] = val[0][1:]
    rewrite(data, "val", val)
    code, report = audit_in_process(data)
    s = report["checks"]["structure"]
    assert code == 1 and s["status"] == "fault"
    assert s["val"]["tokens_before_first_bos"] == len(val[0])
    assert "before its first BOS" in s["summary"]


def test_empty_document(copy_of):
    data = copy_of()
    val = split_docs(data, "val")
    rewrite(data, "val", val[:2] + [np.array([1], dtype=np.uint16)] + val[2:])
    code, report = audit_in_process(data)
    s = report["checks"]["structure"]
    assert code == 1 and s["val"]["empty_documents"] == [{"id": 2}]


def test_id_beyond_the_vocabulary(copy_of):
    data = copy_of()
    val = split_docs(data, "val")
    val[1] = val[1].copy()
    val[1][5] = VOCAB + 10
    rewrite(data, "val", val)
    code, report = audit_in_process(data)
    s = report["checks"]["structure"]
    assert code == 1 and s["status"] == "fault"
    assert s["val"]["ids_beyond_vocab"] == 1
    assert s["val"]["ids_beyond_vocab_at"] == [{"id": 1, "position": 5, "token": VOCAB + 10}]
    assert "id 1 position 5" in s["summary"]


def test_bad_shard_header(copy_of):
    data = copy_of()
    shard = sorted(data.glob("*_train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[0] = 0  # magic
    shard.write_bytes(bytes(raw))
    code, report = audit_in_process(data)
    s = report["checks"]["structure"]
    assert code == 1 and s["train"]["bad_shards"][0]["file"] == shard.name and "wrong magic" in s["summary"]


def test_parameter_golf_layout(clean, tmp_path):
    """parameter-golf's layout: no manifest in DATA_DIR, datasets/manifest.json one folder up names the dataset with
    its stats (unknown fields ignored)."""
    data = tmp_path / "datasets" / "fineweb10B_sp1024"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("manifest.json", "*.npz"))
    val_tokens = json.loads((clean / "manifest.json").read_text())["splits"]["val"]["tokens"]
    stats = {"files_val": len(list(data.glob("*_val_*.bin"))), "files_train": 99, "docs_val": VAL_DOCS,
             "tokens_val": val_tokens, "docs_train": 10**6, "tokens_train": 10**9, "shiny": "new"}  # of 99 shards
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "stats": stats}], "tokenizers": []}
    (tmp_path / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    code, report = audit_in_process(data, "--shingle", "0")
    assert code == 0 and report["checks"]["completeness"]["status"] == "ok", report["checks"]["completeness"]
    stats["tokens_val"] = val_tokens + 5  # the shards miss 5 tokens of the manifest's count
    (tmp_path / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    code, report = audit_in_process(data, "--shingle", "0")
    assert code == 1 and f"id {VAL_DOCS - 1}) is truncated: 5 tokens missing" in \
        report["checks"]["completeness"]["summary"]


# ---------------------------------------------------------------------------------------------------------------------
# Byte accounting: the lookup-table convention


def convention_bytes(sp, docs) -> int:
    """The lookup-table convention, token by token: a piece's UTF-8 length without its leading "▁", one space byte
    for that "▁" unless the previous token is a boundary, byte pieces 1, control/unknown 0."""
    total = 0
    for doc in docs:
        prev_boundary = True
        for t in doc[1:].tolist():
            if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
                prev_boundary = True
                continue
            if sp.is_byte(t):
                total += 1
            else:
                piece = sp.id_to_piece(t)
                if piece.startswith("\u2581"):
                    total += len(piece[1:].encode("utf-8")) + (0 if prev_boundary else 1)
                else:
                    total += len(piece.encode("utf-8"))
            prev_boundary = False
    return total


def train_tokenizer(texts, path: Path, **settings) -> Path:
    model = io.BytesIO()
    base = dict(model_type="bpe", vocab_size=VOCAB, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                character_coverage=0.9995, num_threads=1, max_sentence_length=1 << 20)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, minloglevel=2,
                                   **{**base, **settings})
    path.write_bytes(model.getvalue())
    return path


def test_convention_exact_on_the_clean_dataset(clean):
    """The lossless tokenizer on documents that never start with whitespace: the convention counts exactly."""
    _, report = audit_in_process(clean, "--shingle", "0")
    conv = report["checks"]["convention"]
    assert conv["difference_bytes"] == 0 and conv["bpb_relative_error"] == 0 and conv["documents"] == []
    assert "(0 bytes off)" in conv["summary"]


def test_convention_miscount_is_reported(tmp_path):
    """A tokenizer with whitespace-only pieces ("▁▁▁▁": the convention counts the inner ones as 3 bytes each), on
    documents that start with a space (the lossless decoder keeps it, the convention drops it after BOS)."""
    texts = [(" " if i % 3 == 0 else "") + t.replace(" ", "    ") for i, t in enumerate(make_texts(80, seed=3))]
    src = write_jsonl(tmp_path / "spaces.jsonl", texts)
    model = train_tokenizer(texts[VAL_DOCS:], tmp_path / "ws.model", normalization_rule_name="identity",
                            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    data = prepare(tmp_path / "data", src, "--tokenizer", str(model))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert any(sp.id_to_piece(t) == "\u2581" * 4 for t in range(sp.vocab_size()))  # precondition
    code, report = audit_in_process(data, "--texts", src)
    assert code == 0  # not a fault of the dataset
    docs = split_docs(data, "val")
    exact = sum(len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs)
    conv = report["checks"]["convention"]
    want = convention_bytes(sp, docs)
    assert want != exact
    assert (conv["bytes"], conv["exact_bytes"], conv["difference_bytes"]) == (want, exact, want - exact)
    assert conv["bpb_relative_error"] == pytest.approx(exact / want - 1, rel=1e-12)
    assert f"{want - exact:+,}" in conv["summary"]


def test_lossy_tokenizer_is_reported_not_failed(tmp_path):
    """parameter-golf's kind of tokenizer (nmt_nfkc, byte fallback): documents do not decode back to their text; the
    texts check says so with examples, the bytes stay exact, the convention's difference is reported."""
    # NFKC rewrites the fullwidth letters everywhere; the rare characters only in validation texts come out as bytes
    texts = [t + " ｆｕｌｌｗｉｄｔｈ ①" + (" 𠀋🦜" if i < VAL_DOCS else "")
             for i, t in enumerate(make_texts(80, seed=4))]
    src = write_jsonl(tmp_path / "nfkc.jsonl", texts)
    model = train_tokenizer(texts[VAL_DOCS:], tmp_path / "pg.model", normalization_rule_name="nmt_nfkc",
                            add_dummy_prefix=False, character_coverage=0.999, split_digits=True)
    data = prepare(tmp_path / "data", src, "--tokenizer", str(model))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    code, report = audit_in_process(data, "--texts", src)
    assert code == 0
    t = report["checks"]["texts"]
    assert t["status"] == "info" and t["lossy_count"] == VAL_DOCS and t["faults"] == []
    assert "lossy tokenizer" in t["summary"] and t["lossy"][0]["text"] != t["lossy"][0]["decoded"]
    assert report["checks"]["bytes"]["status"] == "ok"
    docs = split_docs(data, "val")
    assert any(sp.is_byte(int(x)) for d in docs for x in d)  # byte-fallback pieces are in the data
    assert report["checks"]["convention"]["bytes"] == convention_bytes(sp, docs)


# ---------------------------------------------------------------------------------------------------------------------
# Claims


def claim_log(path: Path, loss: float, bpb: float, docs: int, tokens: int, nbytes: int) -> Path:
    path.write_text(f"hparam val_max_docs=0\n"
                    f"final_eval mode:strided window:128 stride:64 val_loss:{loss:.8f} val_bpb:{bpb:.8f} docs:{docs} "
                    f"tokens:{tokens} bytes:{nbytes} eval_time:1ms\n"
                    f"final val_loss:{loss:.8f} val_bpb:{bpb:.8f} mode:strided steps:3 train_time:10ms\n")
    return path


def test_claims(clean, tmp_path):
    _, report = audit_in_process(clean, "--shingle", "0")
    b = report["checks"]["bytes"]
    tokens, exact = b["tokens"], b["bytes"]
    loss = 3.2101
    right = loss * tokens / math.log(2) / exact
    wrong = loss * tokens / math.log(2) / (exact - 37)  # 37 bytes short: e.g. a miscounted leading space
    ok_log = claim_log(tmp_path / "ok.txt", loss, right, VAL_DOCS, tokens, exact)
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", ok_log)
    assert code == 0 and report["checks"]["claim"]["status"] == "ok"
    bad_log = claim_log(tmp_path / "bad.txt", loss, wrong, VAL_DOCS, tokens, exact - 37)
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", bad_log)
    c = report["checks"]["claim"]
    assert code == 1 and c["status"] == "fault"
    row = c["claims"][0]
    assert row["recomputed_bpb"] == pytest.approx(right, rel=1e-8)
    assert row["difference"] == pytest.approx(wrong - right, rel=1e-5)
    assert row["implied_bytes"] == pytest.approx(exact - 37, abs=0.5)
    assert f"counts {exact - 37:,} bytes, the exact count is {exact:,}" in c["summary"]
    # a log line without byte counts (as other scripts print): the val_bpb alone gives it away
    (tmp_path / "plain.txt").write_text(f"final val_loss:{loss:.4f} val_bpb:{wrong:.4f}\n")
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", tmp_path / "plain.txt")
    assert code == 1 and "implies" in report["checks"]["claim"]["summary"]
    (tmp_path / "plain.txt").write_text(f"final val_loss:{loss:.4f} val_bpb:{right:.4f}\n")
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", tmp_path / "plain.txt")
    assert code == 0  # within the 4 printed decimals


def test_claim_results_json_and_submission(clean, tmp_path):
    val = split_docs(clean, "val")
    sp = spm.SentencePieceProcessor(model_file=str(clean / "tokenizer.model"))
    rows = [{"id": i, "tokens": len(d) - 1, "bytes": len(sp.decode(d[1:].tolist()).encode("utf-8")),
             "nats": 2.5 * (len(d) - 1)} for i, d in enumerate(val)]
    nats, nbytes, tokens = sum(r["nats"] for r in rows), sum(r["bytes"] for r in rows), sum(r["tokens"] for r in rows)
    results = {"config": {}, "bpb": nats / math.log(2) / nbytes, "loss": nats / tokens, "tokens": tokens,
               "bytes": nbytes, "docs": rows}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", tmp_path / "eval.json")
    assert code == 0, report["checks"]["claim"]
    rows[4]["bytes"] += 3
    results.update(bytes=nbytes + 3, bpb=nats / math.log(2) / (nbytes + 3))
    (tmp_path / "eval.json").write_text(json.dumps(results))
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", tmp_path / "eval.json")
    c = report["checks"]["claim"]
    assert code == 1 and "1 rows count other bytes than this dataset (id 4)" in c["summary"]
    sub = {"seeds": [{"seed": s, "val_loss": 2.5, "val_bpb": results["bpb"] if s == 2 else nats / math.log(2) / nbytes}
                     for s in (1, 2)],
           "val_bpb": {}, "evaluation": {"docs": VAL_DOCS, "tokens": tokens, "bytes": nbytes}}
    (tmp_path / "submission.json").write_text(json.dumps(sub))
    code, report = audit_in_process(clean, "--shingle", "0", "--claim", tmp_path / "submission.json")
    c = report["checks"]["claim"]
    assert code == 1 and [r["problems"] != [] for r in c["claims"]] == [False, True]
    assert c["claims"][1]["source"] == "submission.json seed 2"


def golf_log(path: Path) -> Path:
    """A log in parameter-golf's March shape (our numbers): the sliding-window score re-printed as
    final_int8_zlib_roundtrip_exact, then the legal TTT evaluation that the record scores."""
    path.write_text("step:7000/9000 val_loss:1.9300 val_bpb:1.1430 train_time:600000ms step_avg:85.71ms\n"
                    "final_int6_sliding_window_exact val_loss:1.89500000 val_bpb:1.12230000\n"
                    "final_int8_zlib_roundtrip_exact val_loss:1.89500000 val_bpb:1.12230000\n"
                    "legal_ttt val_loss:1.8910 val_bpb:1.1200 eval_time:400000ms\n"
                    "legal_ttt_exact val_loss:1.89100000 val_bpb:1.12000000\n"
                    "ttt_sliding:done val_loss=1.891000 val_bpb=1.120000 elapsed=400.0s\n")
    return path


def test_claim_is_the_scored_line(tmp_path):
    """Not the last line with `final` in it (final_int8_zlib_roundtrip_exact): the last final evaluation."""
    [claim] = audit.parse_claim(str(golf_log(tmp_path / "train_seed42.log")))
    assert (claim.loss, claim.bpb, claim.bpb_decimals) == (1.891, 1.12, 8)
    assert claim.source == "train_seed42.log (legal_ttt_exact)"


def test_claims_without_a_dataset(tmp_path, capsys):
    log = claim_log(tmp_path / "ok.txt", 3.0, 3.0 * 1000 / math.log(2) / 2500, 2, 1000, 2500)
    code = audit.main(["--claim", str(log), "--claim", str(golf_log(tmp_path / "golf.log"))])
    out = capsys.readouterr().out
    assert code == 0 and "claim         info" in out and "dataset       skipped" in out
    assert "0.41054 tokens per byte" in out  # legal_ttt_exact's val_bpb / val_loss x ln 2
    bad = claim_log(tmp_path / "bad.txt", 3.0, 3.0 * 1000 / math.log(2) / 2400, 2, 1000, 2500)  # 100 bytes short
    assert audit.main(["--claim", str(bad), "--json", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checks"]["claim"]["status"] == "fault" and "2,500 bytes give" in report["checks"]["claim"]["summary"]
    results = {"config": {}, "bpb": 1.0, "loss": 2.0, "tokens": 10, "bytes": 20,
               "docs": [{"id": 0, "tokens": 10, "bytes": 20, "nats": 20.0}]}  # bpb should be 20/ln2/20 = 1.4427
    (tmp_path / "eval.json").write_text(json.dumps(results))
    assert audit.main(["--claim", str(tmp_path / "eval.json")]) == 1
    assert "bpb 1.0 != 1.44269504089 recomputed" in capsys.readouterr().out
    assert audit.main([]) == 2 and "give DATA_DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.slow
def test_usage_errors(clean, tmp_path, capsys):
    """Bad usage or unreadable input: exit status 2 and one line `error: ...` on stderr."""
    cases = [
        ([str(tmp_path / "missing")], "not a directory"),
        ([str(tmp_path)], "tokenizer file not found"),
        ([str(clean), "--claim", str(tmp_path / "none.txt")], "cannot read"),
        ([str(clean), "--shingle", "1"], "--shingle 1"),
        ([str(clean), "--bogus"], "unrecognized arguments"),
        ([str(tmp_path), "--tokenizer", str(clean / "tokenizer.model")], "no *_val_*.bin shards"),
        ([str(clean), "--claim", str(tmp_path / "junk.txt")], "no `final val_loss"),
        ([str(clean), "--tokenizer", str(tmp_path / "junk.txt")], "not a SentencePiece model"),
    ]
    (tmp_path / "junk.txt").write_text("no numbers here\n")
    for argv, message in cases:
        try:
            code = audit.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
    proc = subprocess.run([sys.executable, *AUDIT, str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_json_to_stdout(clean):
    proc = subprocess.run([sys.executable, *AUDIT, str(clean), "--json", "-"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["faults"] == 0 and "structure" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The bundled sample


@pytest.mark.slow
def test_bundled_sample(sample_data):
    """The sample as run.sh prepares it is clean on every check, near-overlap included: prepare_corpus.py dropped the
    training documents that near-duplicate a validation document. The largest share it reports is confirmed here with
    plain Python sets of 8-token shingles."""
    code, report = audit_in_process(sample_data, "--texts", ROOT / "data" / "sample" / "peps.jsonl.gz")
    assert code == 0
    assert status(report) == {"structure": "ok", "overlap": "ok", "near-overlap": "ok", "bytes": "ok",
                              "convention": "info", "texts": "ok", "completeness": "ok"}
    assert report["checks"]["convention"]["difference_bytes"] == 0
    shares = report["checks"]["near-overlap"]["shares"]
    top = int(np.argmax(shares))
    val = split_docs(sample_data, "val")
    train = np.concatenate(split_docs(sample_data, "train")).astype("<u2").tobytes()
    seen = {train[i:i + 16] for i in range(0, len(train) - 14, 2)}  # every 8-token window, as 16 bytes
    body = val[top][1:].astype("<u2").tobytes()
    windows = [body[i:i + 16] for i in range(0, len(body) - 14, 2)]
    assert shares[top] == pytest.approx(sum(w in seen for w in windows) / len(windows), abs=1e-6)
    assert 0.2 < shares[top] < 0.5


@pytest.mark.slow
def test_bundled_sample_without_decontamination_is_flagged(sample_data, tmp_path):
    """The same split prepared with --decontaminate-share 0 keeps the PEP revisions (241/314, 8102/8107, ...) on both
    sides of it, and the audit names the validation documents they copy."""
    data = prepare(tmp_path / "raw", ROOT / "data" / "sample" / "peps.jsonl.gz", "--val-docs", "60",
                   "--val-select", "spread", "--tokenizer", str(sample_data / "tokenizer.model"), "--shard-tokens", "100000000")
    code, report = audit_in_process(data)
    near = report["checks"]["near-overlap"]
    assert code == 1 and near["status"] == "fault"
    assert [d["id"] for d in near["documents"]] == [9, 56, 59]
    assert all(d["share"] > 0.5 for d in near["documents"])


# ---------------------------------------------------------------------------------------------------------------------
# speedrun verify: the dataset fingerprint


FIXTURE_LOGS = ROOT / "tests" / "fixtures" / "record_logs"


def retarget_log(src: Path, dest: Path, data: Path, fp: dict, **override) -> Path:
    """A fixture log whose run read `data`: data_path, tokenizer, val_data and train_data lines set to `fp`."""
    raw = src.read_bytes()
    head, sep, text = raw.rpartition(b"\n#### end ")
    cut = text.index(b"\n") + 1
    body = text[cut:].decode()
    values = {**fp, **override}
    lines = []
    for line in body.split("\n"):
        if line.startswith("hparam data_path="):
            line = f"hparam data_path={data}"
        elif line.startswith("hparam tokenizer_path="):
            line = f"hparam tokenizer_path={data / 'tokenizer.model'}"
        elif line.startswith("tokenizer: "):
            line = f"tokenizer: {data / 'tokenizer.model'} sha256:{values['tokenizer_sha256']} pieces:{VOCAB}"
        elif line.startswith("val_data: "):
            line = (f"val_data: documents:{values['val_documents']} tokens:{values['val_tokens']} "
                    f"bytes:{values['val_bytes']}")
        elif line.startswith("train_data: "):
            line = f"train_data: shards:{values['train_shards']} documents:1 tokens:1"
        lines.append(line)
    dest.write_bytes(head + sep + text[:cut] + "\n".join(lines).encode())
    return dest


@pytest.mark.skipif(not (FIXTURE_LOGS / "tiny_seed1.txt").is_file(), reason="no fixture logs")
def test_record_verify_checks_the_dataset_fingerprint(clean, tmp_path, capsys):
    hp = run_log.parse_log(FIXTURE_LOGS / "tiny_seed1.txt").hparams
    fp = fingerprint.fingerprint(str(clean), str(clean / "tokenizer.model"), int(hp["vocab_size"]), int(hp["val_max_docs"]))
    assert fp["val_documents"] == int(hp["val_max_docs"]) and fp["train_shards"] == len(list(clean.glob("*_train_*")))
    logs = [retarget_log(FIXTURE_LOGS / f"tiny_seed{s}.txt", tmp_path / f"tiny_seed{s}.txt", clean, fp)
            for s in (1, 2, 3)]
    assert record_new.main(["--name", "Fp", "--track", "cpu_5min", "--date", "2026-11-23", "--records-dir",
                        str(tmp_path / "records"), *map(str, logs)]) == 0
    folder = tmp_path / "records" / "cpu_5min" / "2026-11-23_Fp"
    failures, summary = record_check.verify_record(folder)
    assert failures == [] and f"dataset {clean} matches the logs" in summary
    # a log that disagrees with the dataset: every seed's log says so (the logs must agree with each other)
    for key, value in (("val_bytes", fp["val_bytes"] + 1), ("train_shards", fp["train_shards"] + 1),
                       ("tokenizer_sha256", "0" * 64)):
        for s in (1, 2, 3):
            retarget_log(FIXTURE_LOGS / f"tiny_seed{s}.txt", folder / f"train_seed{s}.log", clean, fp, **{key: value})
        failures, _ = record_check.verify_record(folder)
        fp_failures = [f for f in failures if "dataset fingerprint" in f]
        assert len(fp_failures) == 3, failures
        word = {"val_bytes": "val_data bytes:", "train_shards": "train_data shards:",
                "tokenizer_sha256": "tokenizer sha256"}[key]
        assert all(word in f for f in fp_failures)
    # the dataset not on this machine: nothing to check
    moved = tmp_path / "moved"
    clean_copy = shutil.copytree(clean, tmp_path / "elsewhere")
    for s in (1, 2, 3):
        retarget_log(FIXTURE_LOGS / f"tiny_seed{s}.txt", folder / f"train_seed{s}.log", clean_copy, fp)
    shutil.move(str(clean_copy), str(moved))
    failures, summary = record_check.verify_record(folder)
    assert failures == [] and "dataset not on this machine" in summary


# ---------------------------------------------------------------------------------------------------------------------
# CaseOps datasets and their byte sidecar (issue 30)


def caseops_texts(count: int, seed: int) -> list[str]:
    """make_texts with capitals (Title, ALL CAPS, mIxed) and, in one text, the operator characters themselves."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for k, text in enumerate(make_texts(count, seed)):
        words = text.split(" ")
        for j in range(len(words)):
            r = rng.random()
            words[j] = words[j].title() if r < 0.2 else words[j].upper() if r < 0.25 else \
                words[j][:1] + words[j][1:].upper() if r < 0.28 else words[j]
        out.append(" ".join(words) + (" \ue001\ue004X \ue002Y" if k == 3 else ""))
    return out


@pytest.fixture(scope="module")
def caseops_clean(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    base = tmp_path_factory.mktemp("caseops")
    texts = caseops_texts(60, seed=3)
    src = write_jsonl(base / "texts.jsonl", texts)
    return prepare(base / "data", src, "--caseops"), src, texts


def test_caseops_dataset_passes_with_its_texts(caseops_clean):
    data, src, texts = caseops_clean
    code, report = audit_in_process(data, "--shingle", "0", "--texts", src)
    assert code == 0, {k: v["summary"] for k, v in report["checks"].items()}
    checks = report["checks"]
    assert checks["sidecar"]["status"] == "ok" and checks["texts"]["status"] == "ok"
    original = sum(len(t.encode("utf-8")) for t in texts[:VAL_DOCS])
    assert checks["sidecar"]["bytes"] == original and checks["sidecar"]["operators"] > 0
    assert checks["bytes"]["bytes"] == original + 3 * checks["sidecar"]["operators"]  # each operator: 3 UTF-8 bytes
    assert checks["completeness"]["bytes"] == original


def planted_sidecar(data: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "planted"
    shutil.copytree(data, out)
    path = sorted(out.glob("*_val_bytes_*.bin"))[0]
    shards.write_shard(path, change(loader_counts(path)))
    return out


def loader_counts(path: Path) -> np.ndarray:
    from data import loader

    return np.array(loader.load_shard(str(path)), dtype=np.int64)


def test_audit_catches_a_sidecar_off_by_one_byte_in_one_document(caseops_clean, tmp_path):
    data, src, _ = caseops_clean
    tokens = loader_counts(sorted(data.glob("*_val_0*.bin"))[0])
    doc2 = int(np.flatnonzero(tokens == 1)[2])  # document 2's BOS

    def plus_one(c):
        c[doc2 + 2] += 1
        return c
    out = planted_sidecar(data, tmp_path, plus_one)
    code, report = audit_in_process(out, "--shingle", "0", "--texts", src)
    checks = report["checks"]
    assert code == 1
    assert checks["sidecar"]["status"] == "fault" and checks["sidecar"]["differs_from_tokens"][0]["id"] == 2
    assert checks["texts"]["status"] == "fault"
    assert [f["id"] for f in checks["texts"]["faults"]] == [2] and "sidecar counts" in checks["texts"]["faults"][0][
        "problem"]


def test_audit_catches_operators_that_count_bytes(caseops_clean, tmp_path):
    data, _, _ = caseops_clean
    tokens = loader_counts(sorted(data.glob("*_val_0*.bin"))[0])
    ops = np.flatnonzero((tokens >= 4) & (tokens <= 6))  # TITLE, ALLCAPS, CAPNEXT

    def three(c):
        c[ops] = 3  # the operators' UTF-8 length: the transformed text's bytes, not the original's
        return c
    code, report = audit_in_process(planted_sidecar(data, tmp_path, three), "--shingle", "0")
    assert code == 1 and report["checks"]["sidecar"]["status"] == "fault"
    assert "operators count bytes" in report["checks"]["sidecar"]["summary"]


def test_a_claim_on_the_transformed_bytes_is_caught(caseops_clean, tmp_path):
    data, _, _ = caseops_clean
    _, report = audit_in_process(data, "--shingle", "0")
    tokens = report["checks"]["bytes"]["tokens"]
    exact, transformed = report["checks"]["sidecar"]["bytes"], report["checks"]["bytes"]["bytes"]
    loss = 2.5
    right = loss * tokens / math.log(2) / exact
    code, report = audit_in_process(data, "--shingle", "0", "--claim",
                                    claim_log(tmp_path / "ok.txt", loss, right, VAL_DOCS, tokens, exact))
    assert code == 0, report["checks"]["claim"]["summary"]
    wrong = loss * tokens / math.log(2) / transformed  # counted on the CaseOps text: a better-looking BPB
    code, report = audit_in_process(data, "--shingle", "0", "--claim",
                                    claim_log(tmp_path / "bad.txt", loss, wrong, VAL_DOCS, tokens, transformed))
    c = report["checks"]["claim"]
    assert code == 1 and c["claims"][0]["implied_bytes"] == pytest.approx(transformed, abs=0.5)
    assert f"the exact count is {exact:,}" in c["summary"]

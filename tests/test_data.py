"""Data pipeline: shard writing and reading, data/prepare_corpus.py, data/download_fineweb.py (with a fake hub)."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data import download_fineweb, files, loader, prepare_corpus, shards

ROOT = Path(__file__).resolve().parents[1]
PREPARE = "data.prepare_corpus"  # the data tools run as modules of the repository (python -m, from its root)
DOWNLOAD = "data.download_fineweb"
OUTPUT_GLOBS = ("*.bin", "manifest.json", "tokenizer.model", ".*.tmp")
VOCAB = 384  # the test corpus needs 311 pieces for its bytes and characters; the rest are merges


def output_files(directory) -> list[str]:
    return sorted(os.path.basename(p) for pattern in OUTPUT_GLOBS for p in glob.glob(os.path.join(directory, pattern)))


def run_cli(module, *args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# A small corpus with the characters that matter: non-ASCII, emoji, CRLF, tabs, runs of spaces, digits.

WORDS = ("the model reads tokens and bytes while a document ends here; "
         "naïve café déjà vu, 日本語の文章, emoji 🙂🚀, numbers 12345 and 3.14159\t(tabs)  double  spaces "
         "<s> </s> <unk> <0x41> <|endoftext|>,").split(" ")  # control-piece names and the separator are plain text


def make_documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n = int(rng.integers(5, 90))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), n)]
        text = " ".join(words)
        if i % 3 == 0:
            text = text.replace(" and ", "\r\n")
        if i % 4 == 1:
            text = "  " + text + "\n\n"
        if i % 5 == 2:
            text = f"# Title {i}\n\n" + text
        docs.append(text)
    return docs


@pytest.fixture(scope="module")
def corpus_docs() -> list[str]:
    return make_documents(48, seed=0)


def write_jsonl(path, docs, gz=False):
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        Path(path).write_text(lines, encoding="utf-8")


def write_txt(path, docs):
    Path(path).write_bytes("\n<|endoftext|>\n".join(docs).encode("utf-8"))


def write_dir(path, docs):
    os.makedirs(path)
    for i, d in enumerate(docs):
        Path(path, f"doc_{i:04d}.txt").write_bytes(d.encode("utf-8"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_docs):
    """One prepare_corpus run that trains its tokenizer (small vocabulary, small shards)."""
    base = tmp_path_factory.mktemp("prepared")
    src = base / "mixed.jsonl"
    write_jsonl(src, corpus_docs)
    out = base / "out"
    code = prepare_corpus.main(["--input", str(src), "--out", str(out), "--vocab-size", str(VOCAB), "--val-docs", "7",
                                "--shard-tokens", "97"])
    assert code == 0
    return {"input": src, "out": out, "docs": corpus_docs}


def spread_positions(documents: int, val_docs: int) -> list[int]:
    """The validation positions of --val-select spread, as data/README.md specifies them: the middle document of each
    of val_docs equal stretches of the corpus, floor((2j + 1) N / 2k)."""
    return [(2 * j + 1) * documents // (2 * val_docs) for j in range(val_docs)]


def expected_split(docs: list[str], val_docs: int, select: str = "spread") -> dict[str, list[str]]:
    """Both splits, each in input order."""
    positions = set(spread_positions(len(docs), val_docs) if select == "spread" else range(val_docs))
    return {"val": [d for i, d in enumerate(docs) if i in positions],
            "train": [d for i, d in enumerate(docs) if i not in positions]}


def read_documents(out, vocab_size=None):
    """Documents of both splits, read back through data.loader.TokenStream and split at BOS."""
    vocab_size = vocab_size or VOCAB
    result = {}
    for split in ("val", "train"):
        stream = loader.TokenStream(loader.split_pattern(str(out), split), vocab_size)
        result[split] = (stream, [stream.document(i) for i in range(stream.num_docs)])
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Shard writer and reader


# data/loader.py holds the shard format and its one reader (load_shard); data/shards.py only writes shards, with the
# loader's constants; data/files.py holds the atomic writer and the sha256 helper every tool and the record use.


def test_one_shard_reader():
    """Every reader of shards goes through data.loader.load_shard: data/shards.py has no reader of its own, and the
    tools' BOS is the loader's."""
    assert not hasattr(shards, "read_shard") and not hasattr(shards, "load_shard")
    assert shards.write_shard and shards.ShardWriter and issubclass(shards.ShardError, loader.DataError)
    assert download_fineweb.load_shard is loader.load_shard  # the downloader checks a shard with the record's reader
    assert prepare_corpus.BOS_ID == loader.BOS_ID  # prepare_corpus starts every document with the loader's BOS


# Known answers: FIPS 180-2 (SHA-256 of "abc" and of one million "a"), and the digest of no bytes.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA256_MILLION_A = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("data, expected", [(b"abc", SHA256_ABC), (b"", SHA256_EMPTY),
                                            (b"a" * 1_000_000, SHA256_MILLION_A)], ids=["abc", "empty", "million-a"])
def test_sha256_file_known_digests(tmp_path, data, expected):
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path) == files.sha256_file(str(path)) == expected


def test_sha256_file_reads_a_large_file_in_chunks(tmp_path, monkeypatch):
    """A file larger than any read buffer (9 MiB + 7 bytes, random bytes) is hashed in pieces, never read whole, and
    its digest is that of all its bytes."""
    data = np.random.default_rng(0).integers(0, 256, 9 * 2**20 + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "large"
    path.write_bytes(data)
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            out = self.f.read(size)
            reads.append(len(out))
            return out

        def readinto(self, buffer):
            n = self.f.readinto(buffer)
            reads.append(n)
            return n

    monkeypatch.setattr(files, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sum(reads) == len(data) and len([n for n in reads if n]) > 1 and max(reads) < len(data)


def test_write_atomic(tmp_path):
    """Bytes or a function writing the temporary file; the folder is created; a failure leaves the old file and no
    temporary file."""
    path = tmp_path / "sub" / "out.bin"
    files.write_atomic(str(path), b"first")
    files.write_atomic(path, lambda tmp: Path(tmp).write_bytes(b"second"))
    assert path.read_bytes() == b"second"

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        files.write_atomic(str(path), fail)
    assert path.read_bytes() == b"second" and os.listdir(path.parent) == ["out.bin"]


@pytest.mark.parametrize("length", [0, 1, 7919])
def test_write_shard_round_trip(tmp_path, length):
    rng = np.random.default_rng(length)
    tokens = rng.integers(0, 65536, length, dtype=np.int64)
    if length:
        tokens[0], tokens[-1] = 0, 65535
    path = tmp_path / f"x_train_{length:06d}.bin"
    shards.write_shard(path, tokens)
    assert path.stat().st_size == 1024 + 2 * length
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, length] and not header[3:].any()
    loaded = loader.load_shard(path)
    assert loaded.dtype == np.uint16 and len(loaded) == length
    np.testing.assert_array_equal(np.asarray(loaded, dtype=np.int64), tokens)
    assert output_files(tmp_path) == [path.name]  # no temporary file left


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_shard_refuses_out_of_range_ids(tmp_path, bad):
    path = tmp_path / "x_train_000000.bin"
    with pytest.raises(shards.ShardError) as info:
        shards.write_shard(path, [1, 5, bad, 7])
    message = str(info.value)
    assert message.startswith(str(path)) and str(bad) in message and "\n" not in message
    assert output_files(tmp_path) == []


def test_write_shard_replaces_atomically(tmp_path):
    path = tmp_path / "x_val_000000.bin"
    shards.write_shard(path, [1, 2, 3])
    shards.write_shard(path, [1, 9])
    np.testing.assert_array_equal(loader.load_shard(path), [1, 9])
    assert output_files(tmp_path) == [path.name]


def test_shard_writer_splits_documents_across_shards(tmp_path):
    writer = shards.ShardWriter(str(tmp_path), "c", "train", max_tokens=10)
    docs = [np.array([1] + list(range(100, 100 + n))) for n in (3, 12, 0, 5)]
    for d in docs:
        writer.write(d)
    paths = writer.commit()
    assert [os.path.basename(p) for p in paths] == ["c_train_000000.bin", "c_train_000001.bin", "c_train_000002.bin"]
    assert [len(loader.load_shard(p)) for p in paths] == [10, 10, 4]
    stream = loader.TokenStream(str(tmp_path / "c_train_*.bin"), 200)
    assert [list(stream.document(i)) for i in range(stream.num_docs)] == [list(d) for d in docs]


def test_shard_writer_abort_leaves_nothing(tmp_path):
    writer = shards.ShardWriter(str(tmp_path), "c", "train", max_tokens=4)
    writer.write(np.arange(1, 11))
    writer.abort()
    assert os.listdir(tmp_path) == []


def _header(magic=20240520, version=1, count=4):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, count
    return header.tobytes()


BAD_SHARDS = {
    "wrong magic": (_header(magic=20240521) + b"\x01\x00" * 4, "wrong magic number 20240521"),
    "wrong version": (_header(version=2) + b"\x01\x00" * 4, "unsupported shard version 2"),
    "truncated body": (_header(count=4) + b"\x01\x00" * 3, "truncated"),
    "trailing data": (_header(count=4) + b"\x01\x00" * 5, "trailing data"),
    "empty file": (b"", "empty"),
    "short header": (_header()[:100], "only 100 bytes"),
    "missing": (None, "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_load_shard_rejects_bad_files(tmp_path, case):
    """data.loader's one reader refuses the file with one line naming it; TokenStream (which reads through it) and
    download_fineweb's check report the same problem."""
    data, expected = BAD_SHARDS[case]
    path = tmp_path / "bad_train_000000.bin"
    if data is not None:
        path.write_bytes(data)
    readers = [lambda: loader.load_shard(path), lambda: loader.load_shard(str(path))]
    if data is not None:  # (a missing file is no glob match for TokenStream: another message)
        readers.append(lambda: loader.TokenStream(str(path), 1024))
    messages = []
    for read in readers:
        with pytest.raises(loader.DataError) as info:
            read()
        message = str(info.value)
        assert message.startswith(str(path) + ": ") and expected in message and "\n" not in message
        messages.append(message)
    assert len(set(messages)) == 1
    assert download_fineweb.check_shard(str(path)) == messages[0].removeprefix(f"{path}: ")  # its log line's problem


def test_token_stream_rejects_ids_beyond_vocab(tmp_path):
    shards.write_shard(tmp_path / "v_train_000000.bin", [1, 5, 6])
    bad = tmp_path / "v_train_000001.bin"
    shards.write_shard(bad, [7, 1, 1023, 1024, 3])
    with pytest.raises(loader.DataError) as info:
        loader.TokenStream(str(tmp_path / "v_train_*.bin"), 1024)
    message = str(info.value)
    assert message.startswith(str(bad) + ": ") and "token id 1024 at position 3" in message and "\n" not in message
    assert loader.TokenStream(str(tmp_path / "v_train_*.bin"), 1025).num_docs == 2


def test_check_token_ids_names_the_first_bad_position():
    tokens = np.array([1, 5, 2000, 7, 1500], dtype=np.uint16)
    with pytest.raises(loader.DataError, match=r"^x.bin: token id 2000 at position 2 is >= vocab size 1024$"):
        loader.check_token_ids(tokens, 1024, "x.bin")
    loader.check_token_ids(tokens, 2001, "x.bin")
    loader.check_token_ids(np.zeros(0, dtype=np.uint16), 1, "x.bin")  # no tokens, nothing to check


def test_load_tokenizer_errors_name_the_file(tmp_path, sample_data):
    missing = tmp_path / "nope.model"
    with pytest.raises(loader.DataError) as info:
        loader.load_tokenizer(str(missing))
    assert str(info.value).startswith(f"{missing}: tokenizer file not found") and "\n" not in str(info.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(loader.DataError) as info:
        loader.load_tokenizer(str(junk))
    assert str(info.value).startswith(f"{junk}: not a SentencePiece model") and "\n" not in str(info.value)
    assert loader.load_tokenizer(str(sample_data / "tokenizer.model")).vocab_size() == 1024


def _training_data(directory: Path, sample_data: Path) -> Path:
    """A folder train_gpt.py could train on: the sample's tokenizer, one train and one val shard of documents."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    shutil.copyfile(sample_data / "tokenizer.model", directory / "tokenizer.model")
    for split in ("train", "val"):
        docs = [np.concatenate([[loader.BOS_ID], rng.integers(4, 1024, int(n))]) for n in rng.integers(5, 60, 20)]
        shards.write_shard(directory / f"t_{split}_000000.bin", np.concatenate(docs))
    return directory


def _wrong_magic(path: Path):
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


TRAIN_GPT_BAD_DATA = {
    # case: (what is done to the data folder, the file the message names, the text it must contain)
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model", "tokenizer file not found"),
    "tokenizer not a model": (lambda d: (d / "tokenizer.model").write_bytes(b"junk"), "tokenizer.model",
                              "not a SentencePiece model"),
    "wrong magic": (lambda d: _wrong_magic(d / "t_train_000000.bin"), "t_train_000000.bin", "wrong magic number"),
    "truncated shard": (lambda d: (d / "t_val_000000.bin").write_bytes((d / "t_val_000000.bin").read_bytes()[:-6]),
                        "t_val_000000.bin", "truncated"),
    "token id >= vocab size": (lambda d: shards.write_shard(d / "t_train_000000.bin", [1, 5, 1024, 9]),
                               "t_train_000000.bin", "token id 1024 at position 2 is >= vocab size 1024"),
    "no train shards": (lambda d: (d / "t_train_000000.bin").unlink(), "*_train_*.bin", "no shard files match"),
    "tokenizer larger than VOCAB_SIZE": (lambda d: None, "tokenizer.model", "more than VOCAB_SIZE=512"),
}
CASE_ENV = {"tokenizer larger than VOCAB_SIZE": {"VOCAB_SIZE": "512"}}


@pytest.mark.parametrize("case", sorted(TRAIN_GPT_BAD_DATA))
def test_train_gpt_reports_bad_data_in_one_line_naming_the_file(tmp_path, sample_data, monkeypatch, capsys, case):
    """train_gpt.main on bad input data: exit code 2 and one line `error: <file>: <problem>` on stderr (and in the log),
    before any model is built."""
    import train_gpt

    damage, named, expected = TRAIN_GPT_BAD_DATA[case]
    data = _training_data(tmp_path / "data", sample_data)
    damage(data)
    for name in train_gpt.Hyperparameters.env_overrides():  # this run's settings only
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.environ.get("OMP_NUM_THREADS", "1")))
    for name, value in {"DATA_PATH": str(data), "RUN_ID": "bad", "LOG_DIR": str(tmp_path / "logs"),
                        "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "COMPILE": "0", "NUM_LAYERS": "1", "MODEL_DIM": "32",
                        "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "64",
                        "TRAIN_MICRO_BATCHES": "1", "ITERATIONS": "1", "WARMUP_STEPS": "0",
                        **CASE_ENV.get(case, {})}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_gpt, "build_model", lambda *a, **k: pytest.fail("a model was built despite bad data"))
    capsys.readouterr()
    assert train_gpt.main() == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {data / named}: ") and expected in err[0], err[0]
    assert (tmp_path / "logs" / "bad.txt").read_text().splitlines()[-1] == err[0]


# ---------------------------------------------------------------------------------------------------------------------
# prepare_corpus: reading the three input kinds


def test_txt_separator_rules(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"A\n<|endoftext|>\nB\r\nsecond line\r\n<|endoftext|>\r\n\n<|endoftext|>\n"
                     b"x <|endoftext|> stays\n <|endoftext|>\n<|endoftext|>\nlast\n")
    docs = [t for t, _ in prepare_corpus.iter_documents(str(path), "txt")]
    assert docs == ["A", "B\r\nsecond line", "x <|endoftext|> stays\n <|endoftext|>", "last\n"]
    all_docs = [t for t, _ in prepare_corpus.iter_all_documents(str(path), "txt")]
    assert all_docs.count("") == 1  # the document between two separators, skipped


def test_directory_input_order_and_hash(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("c.md", "ignored"), (".h.txt", "hidden"),
                       ("e.txt", "")]:
        (d / name).write_text(text, encoding="utf-8")
    (d / "sub").mkdir()
    (d / "sub" / "0.txt").write_text("nested", encoding="utf-8")
    assert [t for t, _ in prepare_corpus.iter_documents(str(d), "dir")] == ["first", "second"]
    listing = "".join(f"{hashlib.sha256(t.encode()).hexdigest()}  {n}\n" for n, t in
                      [("a.txt", "first"), ("b.txt", "second"), ("e.txt", "")])
    assert prepare_corpus.input_sha256(str(d), "dir") == hashlib.sha256(listing.encode()).hexdigest()


def test_default_prefix():
    assert prepare_corpus.default_prefix("data/sample/peps.jsonl.gz") == "peps"
    assert prepare_corpus.default_prefix("/x/my corpus.txt") == "my-corpus"
    assert prepare_corpus.default_prefix("/x/docs/") == "docs"


# ---------------------------------------------------------------------------------------------------------------------
# prepare_corpus: errors. One line `error: <file>: ...` on stderr, exit code 2, nothing written.


def _error_cases(tmp: Path, docs: list[str]):
    (tmp / "no_text.jsonl").write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"body": "x"}) + "\n",
                                       encoding="utf-8")
    (tmp / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    (tmp / "empty_docs.txt").write_text("<|endoftext|>\n<|endoftext|>\n", encoding="utf-8")
    (tmp / "empty_dir").mkdir()
    write_jsonl(tmp / "three.jsonl", docs[:3])
    (tmp / "bad_json.jsonl").write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    (tmp / "bad_utf8.txt").write_bytes(b"fine\nline two \xff\xfe\n")
    (tmp / "surrogate.jsonl").write_text('{"text": "a\\ud800b"}\n', encoding="utf-8")
    (tmp / "not_a_number.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    (tmp / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "abc"}\n' * 50)[:-20])
    (tmp / "corpus.csv").write_text("a,b\n", encoding="utf-8")
    (tmp / "not_a_model.model").write_bytes(b"this is not a protobuf")
    return {
        # name: (arguments, file the message must name, text it must contain)
        "jsonl line without text": (["--input", tmp / "no_text.jsonl"], tmp / "no_text.jsonl", 'line 3: no "text"'),
        "empty jsonl": (["--input", tmp / "empty.jsonl"], tmp / "empty.jsonl", "empty"),
        "txt of empty documents": (["--input", tmp / "empty_docs.txt"], tmp / "empty_docs.txt", "empty"),
        "empty directory": (["--input", tmp / "empty_dir"], tmp / "empty_dir", "empty"),
        "val-docs = documents": (["--input", tmp / "three.jsonl", "--val-docs", "3"], tmp / "three.jsonl",
                                 "only 3 documents"),
        "val-docs > documents": (["--input", tmp / "three.jsonl", "--val-docs", "60"], tmp / "three.jsonl",
                                 "only 3 documents"),
        "missing tokenizer": (["--input", tmp / "three.jsonl", "--val-docs", "1", "--tokenizer", tmp / "nope.model"],
                              tmp / "nope.model", "tokenizer file not found"),
        "tokenizer not a model": (["--input", tmp / "three.jsonl", "--val-docs", "1", "--tokenizer",
                                   tmp / "not_a_model.model"], tmp / "not_a_model.model", "not a SentencePiece"),
        "invalid json": (["--input", tmp / "bad_json.jsonl"], tmp / "bad_json.jsonl", "line 2: not valid JSON"),
        "invalid utf-8": (["--input", tmp / "bad_utf8.txt"], tmp / "bad_utf8.txt", "line 2: not valid UTF-8"),
        "lone surrogate": (["--input", tmp / "surrogate.jsonl"], tmp / "surrogate.jsonl", "surrogate"),
        "text not a string": (["--input", tmp / "not_a_number.jsonl"], tmp / "not_a_number.jsonl", "not a string"),
        "truncated gzip": (["--input", tmp / "broken.jsonl.gz"], tmp / "broken.jsonl.gz", "cannot read"),
        "unsupported input": (["--input", tmp / "corpus.csv"], tmp / "corpus.csv", "unsupported input"),
        "missing input": (["--input", tmp / "absent.jsonl"], tmp / "absent.jsonl", "not found"),
        "vocabulary too large for the corpus": (["--input", tmp / "three.jsonl", "--val-docs", "1", "--vocab-size",
                                                 "5000"], tmp / "three.jsonl", "tokenizer training failed"),
    }


CLI_ERROR_CASES = ["jsonl line without text", "empty jsonl", "txt of empty documents", "empty directory",
                   "val-docs = documents", "val-docs > documents", "missing tokenizer", "tokenizer not a model",
                   "invalid json", "invalid utf-8", "lone surrogate", "text not a string", "truncated gzip",
                   "unsupported input", "missing input", "vocabulary too large for the corpus"]


@pytest.fixture(scope="module")
def error_inputs(tmp_path_factory, corpus_docs):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return tmp, _error_cases(tmp, corpus_docs)


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_prepare_cli_errors(error_inputs, tmp_path, case):
    _, cases = error_inputs
    args, named, expected = cases[case]
    out = tmp_path / "out"
    result = run_cli(PREPARE, *args, "--out", out)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {named}: "), lines[0]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() or output_files(out) == []


def test_prepare_cli_parameter_errors(tmp_path, error_inputs):
    tmp, _ = error_inputs
    for extra, expected in [(["--shard-tokens", "0"], "--shard-tokens"), (["--val-docs", "0"], "--val-docs"),
                            (["--vocab-size", "100"], "--vocab-size"), (["--name", "a/b"], "--name"),
                            (["--tokenizer", "x.model", "--vocab-size", "300"], "not allowed with"),
                            (["--decontaminate-share", "1.5"], "--decontaminate-share"),
                            (["--decontaminate-ngram", "0"], "--decontaminate-ngram")]:
        result = run_cli(PREPARE, "--input", tmp / "three.jsonl", "--out", tmp_path / "o", *extra)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and expected in result.stderr
        assert not (tmp_path / "o").exists()


def test_prepare_refuses_foreign_shards(tmp_path, error_inputs):
    tmp, _ = error_inputs
    out = tmp_path / "out"
    out.mkdir()
    shards.write_shard(out / "other_train_000000.bin", [1, 2])
    result = run_cli(PREPARE, "--input", tmp / "three.jsonl", "--out", out, "--val-docs", "1")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {out}: already holds other_train_000000.bin")
    assert sorted(os.listdir(out)) == ["other_train_000000.bin"]


def test_failure_while_writing_leaves_nothing(tmp_path, prepared, monkeypatch):
    """An error after shards were started (here: the 30th document) removes every temporary file."""
    calls = {"n": 0}
    real_write = shards.ShardWriter.write

    def failing_write(self, tokens):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(28, "No space left on device", str(tmp_path / "out" / "x"))
        return real_write(self, tokens)

    monkeypatch.setattr(shards.ShardWriter, "write", failing_write)
    out = tmp_path / "out"
    code = prepare_corpus.main(["--input", str(prepared["input"]), "--out", str(out), "--val-docs", "7",
                                "--tokenizer", str(prepared["out"] / "tokenizer.model"), "--shard-tokens", "50"])
    assert code == 2 and calls["n"] == 30
    assert not out.exists()  # created by the run, removed again because it stayed empty


# ---------------------------------------------------------------------------------------------------------------------
# prepare_corpus: round trip, manifest, determinism


def test_round_trip_jsonl_with_trained_tokenizer(prepared):
    out, docs = prepared["out"], prepared["docs"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.vocab_size() == VOCAB and sp.bos_id() == 1
    read = read_documents(out)
    expected = expected_split(docs, 7)
    for split in ("val", "train"):
        assert [sp.decode(d[1:].tolist()) for d in read[split][1]] == expected[split]
    for split in ("val", "train"):
        stream, split_docs = read[split]
        assert all(d[0] == 1 and (d[1:] != 1).all() for d in split_docs)  # BOS first, never inside
    # Documents really cross shard boundaries (97-token shards).
    stream = read["train"][0]
    assert len(stream.files) > 3
    boundaries = set(stream.shard_offsets[1:-1].tolist())
    assert any(s < b < s + n for s, n in zip(stream.doc_starts, stream.doc_lengths) for b in boundaries)


def test_manifest(prepared):
    out, docs = prepared["out"], prepared["docs"]
    manifest = json.loads((out / "manifest.json").read_text())
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert manifest["input"]["documents"] == len(docs)
    assert manifest["input"]["sha256"] == files.sha256_file(prepared["input"])
    assert manifest["tokenizer"]["sha256"] == files.sha256_file(out / "tokenizer.model")
    assert manifest["tokenizer"]["vocab_size"] == VOCAB
    training = manifest["tokenizer"]["training"]
    assert training["normalization_rule_name"] == "identity" and training["byte_fallback"] is True
    assert training["add_dummy_prefix"] is False and training["remove_extra_whitespaces"] is False
    assert manifest["format"] == 3 and manifest["parameters"]["val_select"] == "spread"  # the default
    assert manifest["parameters"]["decontaminate"] == {"share": 0.2, "ngram_words": 8}  # the default
    assert manifest["splits"]["train"]["dropped"] == []  # random documents share no long word n-grams
    assert manifest["shard_format"] == {"magic": loader.SHARD_MAGIC, "version": loader.SHARD_VERSION,
                                        "header_int32": loader.SHARD_HEADER_INTS, "token_dtype": "uint16",
                                        "bos_id": loader.BOS_ID, "eos_appended": False}
    read = read_documents(out)
    for split, split_docs in expected_split(docs, 7).items():
        entry = manifest["splits"][split]
        stream = read[split][0]
        assert entry["documents"] == len(split_docs) == stream.num_docs
        assert entry["tokens"] == stream.num_tokens == sum(f["tokens"] for f in entry["files"])
        assert entry["bytes"] == entry["decoded_bytes"] == sum(len(d.encode()) for d in split_docs)
        assert entry["documents_not_round_trip"] == 0
        assert [f["name"] for f in entry["files"]] == [os.path.basename(p) for p in stream.files]
        for f in entry["files"]:
            assert f["sha256"] == files.sha256_file(out / f["name"])
    assert output_files(out) == sorted(["manifest.json", "tokenizer.model"] +
                                       [f["name"] for s in manifest["splits"].values() for f in s["files"]])


@pytest.mark.parametrize("kind", ["txt", "dir", "jsonl.gz"])
def test_round_trip_other_inputs_with_given_tokenizer(tmp_path, prepared, kind):
    docs = prepared["docs"]
    src = {"txt": tmp_path / "c.txt", "dir": tmp_path / "c", "jsonl.gz": tmp_path / "c.jsonl.gz"}[kind]
    {"txt": write_txt, "dir": write_dir, "jsonl.gz": lambda p, d: write_jsonl(p, d, gz=True)}[kind](src, docs)
    model = prepared["out"] / "tokenizer.model"
    out = tmp_path / "out"
    code = prepare_corpus.main(["--input", str(src), "--out", str(out), "--tokenizer", str(model), "--val-docs", "5",
                                "--shard-tokens", "61"])
    assert code == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    read = read_documents(out)
    expected = expected_split(docs, 5)
    assert len(read["val"][1]) == 5
    assert [sp.decode(d[1:].tolist()) for s in ("val", "train") for d in read[s][1]] == \
        expected["val"] + expected["train"]
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["tokenizer"] == "tokenizer.model" and manifest["tokenizer"]["training"] is None
    assert manifest["input"]["kind"] == kind and manifest["parameters"]["name"] == "c"
    tokens = np.concatenate([read["val"][0].read(0, read["val"][0].num_tokens),
                             read["train"][0].read(0, read["train"][0].num_tokens)])
    np.testing.assert_array_equal(tokens, np.concatenate([[1] + sp.encode(d) for d in expected["val"] +
                                                          expected["train"]]))


def test_rerun_replaces_own_shards(tmp_path, prepared):
    """A second run into the same folder with bigger shards removes the first run's extra shards."""
    out = tmp_path / "out"
    model = str(prepared["out"] / "tokenizer.model")
    args = ["--input", str(prepared["input"]), "--out", str(out), "--tokenizer", model, "--val-docs", "7"]
    assert prepare_corpus.main(args + ["--shard-tokens", "50"]) == 0
    assert len(glob.glob(str(out / "mixed_train_*.bin"))) > 5
    assert prepare_corpus.main(args) == 0
    assert output_files(out) == ["manifest.json", "mixed_train_000000.bin", "mixed_val_000000.bin",
                                 "tokenizer.model"]


def test_skip_if_current(tmp_path, prepared, capsys):
    """--skip-if-current leaves an up-to-date folder alone, and prepares again when a parameter, the input, the
    manifest format or a shard differs."""
    out = tmp_path / "out"
    src = tmp_path / "in.jsonl"
    shutil.copy(prepared["input"], src)
    args = ["--input", str(src), "--out", str(out), "--tokenizer", str(prepared["out"] / "tokenizer.model"),
            "--val-docs", "7", "--skip-if-current"]

    def prepare_and_tell(extra=()) -> bool:
        """True when the folder was (re)written."""
        capsys.readouterr()
        assert prepare_corpus.main(args + list(extra)) == 0
        return "up to date" not in capsys.readouterr().out

    assert prepare_and_tell()  # nothing there yet
    assert not prepare_and_tell()
    assert prepare_and_tell(["--val-docs", "6"])  # a parameter
    assert not prepare_and_tell(["--val-docs", "6"])
    assert prepare_and_tell()
    write_jsonl(src, prepared["docs"] + ["one more document"])  # the input
    assert prepare_and_tell()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))  # an older script's output
    assert prepare_and_tell()
    val_shard = out / manifest["splits"]["val"]["files"][0]["name"]
    val_shard.write_bytes(val_shard.read_bytes()[:-2])  # a truncated shard
    assert prepare_and_tell()
    assert not prepare_and_tell()


def test_u2581_is_counted_as_not_round_trip(tmp_path, prepared, capsys):
    src = tmp_path / "odd.jsonl"
    write_jsonl(src, ["plain text", "a \u2581 b", "more plain text", "x"])
    out = tmp_path / "out"
    code = prepare_corpus.main(["--input", str(src), "--out", str(out), "--val-docs", "2", "--tokenizer",
                                str(prepared["out"] / "tokenizer.model")])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert val["documents_not_round_trip"] == 1 and val["bytes"] - val["decoded_bytes"] == 2  # U+2581 -> " "
    assert "warning: 1 of 4 documents do not decode back" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# --val-select: spread (default) or first


@pytest.mark.parametrize("documents,val_docs", [(701, 60), (48, 7), (10, 10), (10, 9), (5, 1), (1000, 3)])
def test_spread_positions_cover_the_whole_corpus(documents, val_docs):
    positions = prepare_corpus.validation_positions(documents, val_docs, "spread")
    assert positions == spread_positions(documents, val_docs)
    assert len(set(positions)) == val_docs and positions == sorted(positions)
    assert 0 <= positions[0] and positions[-1] < documents
    # one position in each of the val_docs equal stretches [floor(j N / k), (j + 1) N / k)
    assert all(j * documents // val_docs <= p and p * val_docs < (j + 1) * documents for j, p in enumerate(positions))
    assert prepare_corpus.validation_positions(documents, val_docs, "first") == list(range(val_docs))
    with pytest.raises(ValueError):
        prepare_corpus.validation_positions(documents, val_docs, "random")


def numbered_documents(count: int) -> list[str]:
    """Documents that say where they are in the corpus (an ordered corpus, like the PEPs sorted by number)."""
    return [f"document {i:03d} of an ordered corpus; " + "words " * (i % 7 + 3) for i in range(count)]


@pytest.mark.parametrize("select", ["spread", "first", None])
def test_val_select(tmp_path, prepared, select):
    """spread takes validation documents from the whole corpus (first and last thirds both), first keeps the old
    behaviour (the head of the corpus); both keep every document exactly once, in input order, and the manifest names
    the choice. No option means spread."""
    docs = numbered_documents(60)
    src = tmp_path / "ordered.jsonl"
    write_jsonl(src, docs)
    out = tmp_path / "out"
    extra = ["--val-select", select] if select else []
    # these templated documents all near-duplicate one another: decontamination would empty the train split
    code = prepare_corpus.main(["--input", str(src), "--out", str(out), "--val-docs", "6", "--decontaminate-share",
                                "0", "--tokenizer", str(prepared["out"] / "tokenizer.model"), *extra])
    assert code == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    read = read_documents(out)
    got = {split: [sp.decode(d[1:].tolist()) for d in read[split][1]] for split in ("val", "train")}
    numbers = [int(text.split()[1]) for text in got["val"]]
    if select == "first":
        assert numbers == [0, 1, 2, 3, 4, 5]
    else:
        assert numbers == [5, 15, 25, 35, 45, 55]
        assert any(n < 20 for n in numbers) and any(n >= 40 for n in numbers)
    assert got == expected_split(docs, 6, select or "spread")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["val_select"] == (select or "spread")
    assert manifest["splits"]["val"]["documents"] == 6 and manifest["splits"]["train"]["documents"] == 54
    assert manifest["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in got["val"])


def long_words(count: int, seed: int) -> list[str]:
    """`count` words drawn from a large vocabulary, so that unrelated texts share no 8-word run."""
    rng = np.random.default_rng(seed)
    return [f"w{j}" for j in rng.integers(0, 1_000_000, count)]


@pytest.mark.parametrize("share", [None, "0"])
def test_decontaminate_drops_near_duplicates_of_validation_documents(tmp_path, prepared, share):
    """Training documents that are revisions of, contain, or are excerpts of a validation document are dropped and
    listed in the manifest; a training document that only shares one phrase with a validation document stays; the
    validation split is the same either way. --decontaminate-share 0 keeps everything."""
    docs = [" ".join(long_words(300, seed)) for seed in range(20)]
    val = expected_split(docs, 4)["val"]  # positions 2, 7, 12, 17
    revision = val[0].split()
    for i in range(0, 300, 40):  # a later revision: every 40th word changed
        revision[i] = "changed"
    docs[0] = " ".join(revision)  # shares ~77% of val[0]'s 8-grams
    docs[5] = " ".join(long_words(200, 100)) + " " + val[1] + " " + " ".join(long_words(200, 101))  # contains val[1]
    docs[9] = " ".join(val[2].split()[100:140])  # an excerpt: 11% of val[2]'s 8-grams, all of its own
    docs[14] = " ".join(long_words(290, 102) + val[3].split()[50:60])  # one 10-word phrase in common: kept
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    out = tmp_path / "out"
    extra = ["--decontaminate-share", share] if share else []
    assert prepare_corpus.main(["--input", str(src), "--out", str(out), "--val-docs", "4",
                                "--tokenizer", str(prepared["out"] / "tokenizer.model"), *extra]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["dropped"]
    if share == "0":
        assert dropped == []
        assert manifest["parameters"]["decontaminate"]["share"] == 0
    else:
        assert [(d["input_document"], d["val_document"]) for d in dropped] == [(0, 0), (5, 1), (9, 2)]
        assert 0.7 < dropped[0]["val_share"] < 0.85 and dropped[1]["val_share"] == 1.0
        assert 0.1 < dropped[2]["val_share"] < 0.15 and dropped[2]["own_share"] == 1.0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    read = read_documents(out)
    got = {split: [sp.decode(d[1:].tolist()) for d in read[split][1]] for split in ("val", "train")}
    expected = expected_split(docs, 4)
    gone = {d["input_document"] for d in dropped}
    assert got["val"] == expected["val"]
    assert got["train"] == [d for i, d in enumerate(docs) if i not in gone and d not in expected["val"]]
    assert manifest["splits"]["train"]["documents"] == 16 - len(gone)
    assert manifest["input"]["documents"] == 20


def test_val_select_counts_non_empty_documents(tmp_path, prepared):
    """Empty documents are skipped before positions are counted, so they cannot shift the split."""
    docs = numbered_documents(12)
    src = tmp_path / "gaps.txt"
    write_txt(src, [d for i, d in enumerate(docs) for d in ([d, ""] if i % 3 == 0 else [d])])
    out = tmp_path / "out"
    assert prepare_corpus.main(["--input", str(src), "--out", str(out), "--val-docs", "3",
                                "--tokenizer", str(prepared["out"] / "tokenizer.model")]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    val = [sp.decode(d[1:].tolist()) for d in read_documents(out)["val"][1]]
    assert val == [docs[2], docs[6], docs[10]]


def test_val_select_rejects_unknown_choice(tmp_path, error_inputs):
    tmp, _ = error_inputs
    result = run_cli(PREPARE, "--input", tmp / "three.jsonl", "--out", tmp_path / "o", "--val-select", "middle")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "--val-select" in result.stderr and "middle" in result.stderr
    assert not (tmp_path / "o").exists()


def test_deterministic_across_processes(tmp_path, corpus_docs):
    src = tmp_path / "d.txt"
    write_txt(src, corpus_docs)
    outs = []
    for i, seed in enumerate(("1", "2")):
        out = tmp_path / f"out{i}"
        result = run_cli(PREPARE, "--input", src, "--out", out, "--vocab-size", "360", "--val-docs", "4",
                         "--shard-tokens", "500", env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        outs.append(out)
    names = sorted(os.listdir(outs[0]))
    assert names == sorted(os.listdir(outs[1])) and len(names) > 4
    assert json.loads((outs[0] / "manifest.json").read_text())["parameters"]["val_select"] == "spread"
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------------------
# download_fineweb with a fake hub (a local folder laid out like the dataset repo)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory, prepared):
    root = tmp_path_factory.mktemp("hub")
    remote = root / "datasets"
    (remote / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)
    (remote / "tokenizers").mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("fineweb_val_000000.bin", 300), ("fineweb_train_000000.bin", 500),
                    ("fineweb_train_000001.bin", 400), ("fineweb_train_000002.bin", 450)]:
        tokens = rng.integers(2, VOCAB, n)
        tokens[::37] = 1
        shards.write_shard(remote / "datasets" / "fineweb10B_sp1024" / name, tokens)
    shutil.copyfile(prepared["out"] / "tokenizer.model", remote / "tokenizers" / "fineweb_1024_bpe.model")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "vocab_size": VOCAB,
                              "stats": {"files_train": 3, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": VOCAB,
                                "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    (remote / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


class FakeHub:
    def __init__(self, root: Path, reachable=True):
        self.root, self.reachable = root, reachable
        self.downloads: list[str] = []
        self.corrupt: set[str] = set()

    def sizes(self, repo_id, revision, paths):
        assert repo_id == "willdepueoai/parameter-golf"
        if not self.reachable:
            raise download_fineweb.HubUnreachable("fake: no network")
        return {p: (self.root / p).stat().st_size for p in paths if (self.root / p).is_file()}

    def download(self, repo_id, revision, remote_path, destination):
        if not self.reachable:
            raise download_fineweb.HubUnreachable("fake: no network")
        self.downloads.append(remote_path)
        data = (self.root / remote_path).read_bytes()
        if remote_path in self.corrupt:
            data = data[:-2]
        Path(destination).write_bytes(data)


@pytest.fixture
def hub(fake_hub, monkeypatch):
    fake = FakeHub(fake_hub)
    monkeypatch.setattr(download_fineweb, "hub_sizes", fake.sizes)
    monkeypatch.setattr(download_fineweb, "hub_download", fake.download)
    return fake


SHARD_DIR = "datasets/datasets/fineweb10B_sp1024"


def test_download_places_files(tmp_path, hub, fake_hub):
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "2"]) == 0
    assert hub.downloads == ["datasets/manifest.json", f"{SHARD_DIR}/fineweb_val_000000.bin",
                             f"{SHARD_DIR}/fineweb_train_000000.bin", f"{SHARD_DIR}/fineweb_train_000001.bin",
                             "datasets/tokenizers/fineweb_1024_bpe.model"]
    data_path = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert sorted(os.listdir(data_path)) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                             "fineweb_val_000000.bin", "tokenizer.model"]
    assert sorted(os.listdir(tmp_path / "tokenizers")) == ["fineweb_1024_bpe.model"]
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin"):
        assert (data_path / name).read_bytes() == (fake_hub / SHARD_DIR / name).read_bytes()
    model = (fake_hub / "datasets" / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()
    assert (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == model
    assert (data_path / "tokenizer.model").read_bytes() == model  # train_gpt's default TOKENIZER_PATH
    assert json.loads((tmp_path / "datasets" / "manifest.json").read_text())["datasets"][0]["stats"]["files_val"] == 1
    assert loader.TokenStream(loader.split_pattern(str(data_path), "train"), VOCAB).num_tokens == 900
    assert not glob.glob(str(tmp_path / "**" / ".*.tmp"), recursive=True)


def test_download_skips_complete_files_and_repairs_bad_ones(tmp_path, hub, fake_hub):
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "3"]) == 0
    hub.downloads.clear()
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "3"]) == 0
    assert hub.downloads == []  # everything complete: nothing fetched again

    data_path = tmp_path / "datasets" / "fineweb10B_sp1024"
    truncated = data_path / "fineweb_train_000001.bin"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    bad_magic = data_path / "fineweb_train_000002.bin"  # right size, wrong header
    bad_magic.write_bytes(b"\0\0\0\0" + bad_magic.read_bytes()[4:])
    tokenizer = tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    tokenizer.write_bytes(tokenizer.read_bytes()[:1000])
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "3"]) == 0
    assert hub.downloads == [f"{SHARD_DIR}/fineweb_train_000001.bin", f"{SHARD_DIR}/fineweb_train_000002.bin",
                             "datasets/tokenizers/fineweb_1024_bpe.model"]
    for path in (truncated, bad_magic):
        assert path.read_bytes() == (fake_hub / SHARD_DIR / path.name).read_bytes()
    assert (data_path / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


def test_download_rejects_a_bad_download(tmp_path, hub, capsys):
    hub.corrupt.add(f"{SHARD_DIR}/fineweb_train_000000.bin")
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: willdepueoai/parameter-golf/datasets/datasets/")
    assert "not usable" in err[0]
    assert not (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()
    assert not glob.glob(str(tmp_path / "**" / ".*.tmp"), recursive=True)


def test_download_too_many_train_shards(tmp_path, hub, capsys):
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --train-shards 4: fineweb10B_sp1024 has only 3 training shards on "
                   "willdepueoai/parameter-golf"]


def test_download_offline_with_complete_files_succeeds(tmp_path, hub, capsys):
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "1"]) == 0
    hub.reachable = False
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "1"]) == 0
    assert "hub unreachable" in capsys.readouterr().out
    assert download_fineweb.main(["--out", str(tmp_path), "--train-shards", "2"]) == 2  # one shard missing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach the Hugging Face hub (")
    assert err[0].endswith("): fake: no network")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "closed-port"])
def test_download_unreachable_hub_real_client(tmp_path, env):
    """The real huggingface_hub client, with no network: one line, exit code 2, nothing written."""
    out = tmp_path / "out"
    result = run_cli(DOWNLOAD, "--out", out, "--train-shards", "1", env=dict(env, HF_HOME=str(tmp_path / "hf")))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face hub ("), result.stderr
    if "HF_ENDPOINT" in env:
        assert lines[0].startswith("error: cannot reach the Hugging Face hub (http://127.0.0.1:9): ")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------------------------------
# Larger vocabularies (issue 30): 4096 and 8192 pieces train, write and load like 1024, CaseOps included


@pytest.mark.parametrize("vocab,extra", [(4096, []), (8192, ["--caseops"])])
def test_larger_vocabularies_train_and_load(tmp_path, vocab, extra):
    texts = [t for t, _ in prepare_corpus.iter_documents(str(ROOT / "data" / "sample" / "peps.jsonl.gz"), "jsonl.gz")]
    src = tmp_path / "peps40.jsonl"
    write_jsonl(src, texts[:40])  # 0.54 MB: enough text for 8192 pieces
    out = tmp_path / "out"
    assert prepare_corpus.main(["--input", str(src), "--out", str(out), "--vocab-size", str(vocab), "--val-docs", "4",
                                *extra]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    sp = loader.load_tokenizer(str(out / "tokenizer.model"))
    assert sp.vocab_size() == vocab == manifest["tokenizer"]["vocab_size"]
    train = loader.TokenStream(loader.split_pattern(str(out), "train"), vocab)
    assert int(max(s.max() for s in train.shards)) >= vocab // 2  # the upper half of the ids is used
    with pytest.raises(loader.DataError, match="is >= vocab size 1024"):
        loader.TokenStream(loader.split_pattern(str(out), "train"), 1024)
    tables = loader.build_byte_tables(sp, vocab, str(out / "tokenizer.model"))
    val = loader.ValidationSet.load(str(out), vocab, tables)
    assert val.sidecar == bool(extra)
    assert int(val.byte_counts.sum()) == manifest["splits"]["val"]["decoded_bytes"] == manifest["splits"]["val"]["bytes"]
    with pytest.raises(loader.DataError, match="more than VOCAB_SIZE=1024"):
        loader.build_byte_tables(sp, 1024, str(out / "tokenizer.model"))


# ---------------------------------------------------------------------------------------------------------------------
# Published variants (issue 30): the CaseOps export with its byte sidecar, from its own repository


def test_variant_names_and_their_repositories(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    assert download_fineweb.dataset_dir_for_variant("sp8192") == "fineweb10B_sp8192"
    assert download_fineweb.dataset_dir_for_variant("sp8192_caseops") == \
        "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert download_fineweb.repo_for_variant("sp4096") == "kevclark/parameter-golf"
    assert download_fineweb.repo_for_variant("sp8192_caseops") == "romeerp/parameter-golf-caseops-v1"
    assert download_fineweb.repo_for_variant("sp1024") == "willdepueoai/parameter-golf"
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/my-export")
    assert download_fineweb.repo_for_variant("sp8192") == "me/my-export"
    with pytest.raises(download_fineweb.DownloadError, match="--variant SP-1024"):
        download_fineweb.dataset_dir_for_variant("SP-1024")


@pytest.fixture(scope="module")
def caseops_hub(tmp_path_factory):
    """A local copy of a CaseOps dataset repository in parameter-golf's layout: one val shard with its sidecar, two
    train shards, the tokenizer, and a manifest whose dataset entry has val_bytes_glob."""
    base = tmp_path_factory.mktemp("caseops_hub")
    texts = [t for t, _ in prepare_corpus.iter_documents(str(ROOT / "data" / "sample" / "peps.jsonl.gz"), "jsonl.gz")]
    write_jsonl(base / "c.jsonl", texts[:24])
    prepared_dir = base / "prepared"
    assert prepare_corpus.main(["--input", str(base / "c.jsonl"), "--out", str(prepared_dir), "--vocab-size", "600",
                                "--val-docs", "4", "--caseops", "--shard-tokens", "40000"]) == 0
    variant = download_fineweb.CASEOPS_VARIANT
    remote = base / "repo" / "datasets"
    (remote / "datasets" / f"fineweb10B_{variant}").mkdir(parents=True)
    (remote / "tokenizers").mkdir()
    names = {"c_val_000000.bin": "fineweb_val_000000.bin", "c_val_bytes_000000.bin": "fineweb_val_bytes_000000.bin",
             "c_train_000000.bin": "fineweb_train_000000.bin", "c_train_000001.bin": "fineweb_train_000001.bin"}
    for ours, theirs in names.items():
        shutil.copyfile(prepared_dir / ours, remote / "datasets" / f"fineweb10B_{variant}" / theirs)
    model = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    shutil.copyfile(prepared_dir / "tokenizer.model", remote / model)
    manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "caseops", "vocab_size": 600,
                              "val_bytes_glob": "fineweb_val_bytes_*.bin",
                              "stats": {"files_train": 2, "files_val": 1}}],
                "tokenizers": [{"name": "caseops", "vocab_size": 600, "model_path": model,
                                "text_transform": "lossless_caps_caseops_v1"}]}
    (remote / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return base / "repo", variant, json.loads((prepared_dir / "manifest.json").read_text())


def test_download_the_caseops_variant_with_its_sidecar(tmp_path, caseops_hub, monkeypatch, capsys):
    root, variant, ours = caseops_hub
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)

    class Hub(FakeHub):
        def sizes(self, repo_id, revision, paths):
            assert repo_id == "romeerp/parameter-golf-caseops-v1"
            return {p: (self.root / p).stat().st_size for p in paths if (self.root / p).is_file()}

    fake = Hub(root)
    monkeypatch.setattr(download_fineweb, "hub_sizes", fake.sizes)
    monkeypatch.setattr(download_fineweb, "hub_download", fake.download)
    assert download_fineweb.main(["--out", str(tmp_path), "--variant", "sp8192_caseops", "--train-shards", "1"]) == 0
    shard_dir = f"datasets/datasets/fineweb10B_{variant}"
    assert f"{shard_dir}/fineweb_val_bytes_000000.bin" in fake.downloads
    data_path = tmp_path / "datasets" / f"fineweb10B_{variant}"
    sp = loader.load_tokenizer(str(data_path / "tokenizer.model"))
    val = loader.ValidationSet.load(str(data_path), 600, loader.build_byte_tables(sp, 600, "t"))
    assert val.sidecar and int(val.byte_counts.sum()) == ours["splits"]["val"]["bytes"]
    # a sidecar that does not fit its shard is refused after the download, naming the file
    bad = root / shard_dir / "fineweb_val_bytes_000000.bin"
    good = bad.read_bytes()
    try:
        shards.write_shard(bad, np.zeros(7, dtype=np.uint16))
        (data_path / "fineweb_val_bytes_000000.bin").unlink()
        capsys.readouterr()
        assert download_fineweb.main(["--out", str(tmp_path), "--variant", "sp8192_caseops", "--train-shards", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and "fineweb_val_bytes_000000.bin: 7 byte entries" in err
    finally:
        bad.write_bytes(good)

"""Turn a local text corpus into token shards for train_gpt.py.

    python -m data.prepare_corpus --input FILE(.jsonl|.jsonl.gz|.txt|dir) --out DIR
        [--tokenizer MODEL | --vocab-size 1024] [--caseops] [--val-docs 60] [--val-select spread|first]
        [--decontaminate-share 0.2] [--decontaminate-ngram 8]
        [--shard-tokens 100000000] [--name PREFIX] [--character-coverage 0.9995] [--skip-if-current]

Input
  .jsonl / .jsonl.gz  one JSON object per line with a string field "text" (other fields are ignored, blank lines too).
  .txt                documents separated by lines that are exactly `<|endoftext|>`; the line break just before such a
                      line belongs to the separator ("A\\n<|endoftext|>\\nB" is the documents "A" and "B").
  directory           every `*.txt` file directly in it (not hidden ones, not subfolders) is one document, in order of
                      file name.
  All text must be UTF-8. Empty documents are skipped (counted in the manifest as input.skipped_empty_documents).

Validation documents (--val-select)
  spread (default)  --val-docs documents evenly spaced over the whole corpus: with N documents and k = --val-docs,
                    document j of the validation split is input document floor((2j + 1) N / 2k), j = 0 .. k-1 (the
                    middle of each of k equal stretches). A local corpus is often in some order (by date, by topic,
                    by file name); taking its head as validation would score a model on one end of that order only.
  first             the first --val-docs documents: for corpora that are already shuffled, such as FineWeb, whose
                    validation set is by convention its first documents.
  Positions count the non-empty documents. The choice is recorded in the manifest (parameters.val_select).

Near-duplicates of validation documents (--decontaminate-share, --decontaminate-ngram)
  A corpus can hold revisions of one text (PEP 241 and PEP 314 are versions of one specification). When one revision
  is a validation document and another trains the model, the validation score measures recall, not prediction. So a
  training document is dropped when, for some validation document V, at least --decontaminate-share (default 0.2) of
  V's word n-grams (n = --decontaminate-ngram, default 8; words split on whitespace) occur in it, or at least
  max(0.5, --decontaminate-share) of its own n-grams occur in V. Dropped documents are neither in the tokenizer's
  training text nor in the shards; the manifest lists each one (splits.train.dropped: its input position, the
  validation document it matches, both shares). 0 turns this off. Validation documents are never changed: the
  validation split is the same set of texts with or without this step. `speedrun audit` checks the result on tokens.

Output (DIR)
  {PREFIX}_val_000000.bin, ...    the --val-docs validation documents (default 60), in input order
  {PREFIX}_train_000000.bin, ...  the other documents (less the dropped near-duplicates), in input order
      shards of at most --shard-tokens tokens (default 100,000,000, like the FineWeb shards); a document may continue
      from one shard into the next. Every document is BOS (id 1) followed by its tokens; no EOS.
  tokenizer.model                 the tokenizer the shards were made with: trained here, or a copy of --tokenizer
                                  (so train_gpt.py's default TOKENIZER_PATH=DATA_PATH/tokenizer.model always works)
  manifest.json                   per split: documents, tokens, bytes (UTF-8 bytes of the documents), decoded_bytes
                                  (bytes of the decoded tokens, the BPB denominator) and the shard files with their
                                  sha256; the tokenizer's sha256 and vocabulary size; the input's sha256 (of the file;
                                  for a directory, of the text `sha256sum *.txt` prints there, names sorted); the
                                  parameters. Files are named without their folders, so the manifest does not depend on
                                  where input and output live.

  PREFIX defaults to the input's name without .jsonl/.gz/.txt (peps.jsonl.gz -> peps); characters other than letters,
  digits, '.', '_' and '-' become '-'. Shards of the same PREFIX already in DIR are replaced (extra old ones removed);
  shards of another prefix in DIR are an error, because train_gpt.py reads every *_train_*.bin of DATA_PATH.

CaseOps (--caseops)
  The tokenizer reads the CaseOps form of each document (data/caseops.py; its operators are user-defined pieces) and
  the validation split gets a byte sidecar, {PREFIX}_val_bytes_000000.bin, ... beside its shards: the shard format with
  one uint16 per token, the bytes of the original text that token stands for (0 for BOS and for an operator), which
  bits per byte then counts (data/loader.py). The manifest's parameters.text_transform names the transform and
  splits.val.sidecar lists the files and their byte total.

The trained tokenizer is a lossless SentencePiece BPE (identity normalisation, byte fallback, no whitespace removal, no
dummy prefix, split digits; ids pad 0, bos 1, eos 2, unk 3), trained on the train split only. The only text it cannot
reproduce is the character U+2581 "▁" itself, which decodes to a space; such documents are counted in the manifest
(splits.*.documents_not_round_trip) and reported in a warning. The same input and parameters give byte-identical
files (the trainer runs with a fixed thread count, recorded in the model).

Every file is written under a temporary name and renamed into place at the end, after everything has been checked;
on an error nothing is left in DIR. Bad input or parameters: one line `error: <file>: <problem>` on stderr, exit
code 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import sys
import time
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from data import caseops
from data.files import remove_quietly, sha256_file, write_temp
from data.loader import (CASEOPS_OPERATORS, SHARD_HEADER_BYTES, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION,
                         DataError, build_byte_tables, token_original_bytes)
from data.shards import ShardError, ShardWriter

BOS_ID = 1
DEFAULT_VAL_DOCS = 60
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VOCAB_SIZE = 1024
# 1.0 would give every character of the train split its own piece: on the sample 239 of 1024 pieces go to rare
# characters (2.12 bytes/token); 0.9995 sends those through byte fallback (2.33 bytes/token, still lossless).
DEFAULT_CHARACTER_COVERAGE = 0.9995
SEPARATOR = b"<|endoftext|>"
TRAIN_THREADS = 4  # fixed, not the machine's core count: sentencepiece records it in the model file
MAX_SENTENCE_BYTES = 1 << 30  # documents are whole "sentences" for the trainer; none may be dropped for length
ENCODE_BATCH_BYTES = 2 << 20  # text per sp.encode call: bounds the memory of the Python id lists
VAL_SELECT_CHOICES = ("spread", "first")
DEFAULT_VAL_SELECT = "spread"
DEFAULT_DECONTAMINATE_SHARE = 0.2
DEFAULT_DECONTAMINATE_NGRAM = 8
# 2: parameters.val_select (format 1 had no such field and always took the first documents); 3: parameters.decontaminate
# and splits.train.dropped
MANIFEST_FORMAT = 3


class PrepareError(Exception):
    """Bad input or parameters: reported as `error: <path>: <problem>`."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


# ---------------------------------------------------------------------------------------------------------------------
# Reading documents


def input_kind(path: str) -> str:
    if os.path.isdir(path):
        return "dir"
    if not os.path.exists(path):
        raise PrepareError(path, "input not found")
    for suffix in (".jsonl.gz", ".jsonl", ".txt"):
        if path.endswith(suffix):
            return suffix[1:]
    raise PrepareError(path, "unsupported input (expected a .jsonl, .jsonl.gz or .txt file,"
                             " or a directory of .txt files)")


def default_prefix(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".gz", ".jsonl", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip(".")
    return name or "corpus"


def directory_files(path: str) -> list[str]:
    names = sorted(e.name for e in os.scandir(path) if e.name.endswith(".txt") and not e.name.startswith(".")
                   and e.is_file())
    return [os.path.join(path, n) for n in names]


def _check_unicode(text: str, path: str, where: str) -> int:
    """UTF-8 length of `text`; JSON can carry lone surrogates (\\ud800), which are not text."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise PrepareError(path, f"{where}: \"text\" holds a lone surrogate (U+{ord(text[e.start]):04X}),"
                                 " not valid Unicode") from None


def _decode_utf8(raw: bytes, path: str, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise PrepareError(path, f"line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _iter_jsonl(path: str, compressed: bool):
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise PrepareError(path, f"line {lineno}: not valid UTF-8 ({e.reason})") from None
                except ValueError as e:
                    raise PrepareError(path, f"line {lineno}: not valid JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(obj, dict):
                    raise PrepareError(path, f"line {lineno}: not a JSON object")
                if "text" not in obj:
                    raise PrepareError(path, f"line {lineno}: no \"text\" field")
                text = obj["text"]
                if not isinstance(text, str):
                    raise PrepareError(path, f"line {lineno}: \"text\" is a {type(text).__name__}, not a string")
                yield text, _check_unicode(text, path, f"line {lineno}")
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(path, f"cannot read: {e}") from None


def _iter_txt(path: str):
    try:
        with open(path, "rb") as f:
            lines, first_line = [], 1
            for lineno, line in enumerate(f, 1):
                if line.rstrip(b"\r\n") == SEPARATOR and line in (SEPARATOR, SEPARATOR + b"\n", SEPARATOR + b"\r\n"):
                    raw = b"".join(lines)
                    raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
                    text = _decode_utf8(raw, path, first_line)
                    yield text, len(raw)
                    lines, first_line = [], lineno + 1
                else:
                    lines.append(line)
            raw = b"".join(lines)
            yield _decode_utf8(raw, path, first_line), len(raw)
    except OSError as e:
        raise PrepareError(path, f"cannot read: {e}") from None


def _iter_dir(path: str):
    for file in directory_files(path):
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise PrepareError(file, f"cannot read: {e}") from None
        yield _decode_utf8(raw, file, 1), len(raw)


def iter_all_documents(path: str, kind: str):
    """(text, UTF-8 bytes) of every document in order, empty ones included."""
    if kind == "dir":
        return _iter_dir(path)
    if kind == "txt":
        return _iter_txt(path)
    return _iter_jsonl(path, compressed=kind == "jsonl.gz")


def iter_documents(path: str, kind: str):
    """(text, UTF-8 bytes) of every non-empty document, in order: the documents of the corpus."""
    return ((text, nbytes) for text, nbytes in iter_all_documents(path, kind) if nbytes)


def input_sha256(path: str, kind: str) -> str:
    """sha256 of the input file; for a directory, of the lines `<sha256>  <name>` of its .txt files in name order
    (what `sha256sum *.txt` prints there)."""
    if kind != "dir":
        return sha256_file(path)
    listing = "".join(f"{sha256_file(f)}  {os.path.basename(f)}\n" for f in directory_files(path))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def validation_positions(documents: int, val_docs: int, select: str) -> list[int]:
    """Input positions (among the non-empty documents, ascending) of the validation split.

    spread: the middle document of each of `val_docs` equal stretches of the corpus, floor((2j + 1) N / 2k). Integer
    arithmetic, so the same counts always give the same positions; consecutive positions differ by at least
    floor(N / k) >= 1, so they are distinct. first: 0 .. k-1."""
    if not 0 < val_docs <= documents:
        raise ValueError(f"need 0 < val_docs <= documents, got {val_docs} and {documents}")
    if select == "first":
        return list(range(val_docs))
    if select == "spread":
        return [(2 * j + 1) * documents // (2 * val_docs) for j in range(val_docs)]
    raise ValueError(f"unknown validation selection {select!r}")


def word_ngram_hashes(text: str, n: int) -> np.ndarray:
    """The distinct hashes of the text's word n-grams (words split on whitespace), as uint64. Deterministic: each word
    is its CRC-32, and an n-gram the polynomial of its n word values (no Python hash(), which is salted per process)."""
    words = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in text.split()), dtype=np.uint64)
    count = len(words) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for i in range(n):  # wraps modulo 2**64, which is what a hash wants
        h = h * np.uint64(1_000_003) + words[i:i + count]
    return np.unique(h)


@dataclass
class DroppedDocument:
    input_document: int  # position among the corpus's non-empty documents
    val_document: int  # index in the validation split of the document it near-duplicates
    val_share: float  # share of that validation document's n-grams found in this document
    own_share: float  # share of this document's n-grams found in that validation document

    def manifest(self) -> dict:
        return {"input_document": self.input_document, "val_document": self.val_document,
                "val_share": round(self.val_share, 6), "own_share": round(self.own_share, 6)}


def near_duplicates_of_validation(read_documents, val_positions: list[int], n: int,
                                  share: float) -> list[DroppedDocument]:
    """The training documents to drop (see "Near-duplicates of validation documents" above), in input order.

    read_documents: a function returning a fresh iterator of the corpus's non-empty (text, nbytes), read twice: once
    for the validation documents' n-grams (all that is held in memory), once streaming the training documents. A
    training document is dropped for the validation document it shares the largest share of n-grams with."""
    val_index = {p: j for j, p in enumerate(val_positions)}
    val_hashes = [np.empty(0, dtype=np.uint64)] * len(val_positions)
    for position, (text, _) in enumerate(read_documents()):
        if position in val_index:
            val_hashes[val_index[position]] = word_ngram_hashes(text, n)
    # one sorted array of every validation n-gram with the validation document it belongs to
    owners = np.concatenate([np.full(len(h), j, dtype=np.int64) for j, h in enumerate(val_hashes)])
    pooled = np.concatenate(val_hashes)
    order = np.argsort(pooled, kind="stable")
    pooled, owners = pooled[order], owners[order]
    val_sizes = np.array([len(h) for h in val_hashes], dtype=np.int64)
    own_floor = max(0.5, share)
    dropped = []
    if len(pooled) == 0:  # no validation document has n words
        return dropped
    for position, (text, _) in enumerate(read_documents()):
        if position in val_index:
            continue
        hashes = word_ngram_hashes(text, n)
        if len(hashes) == 0:
            continue
        lo = np.searchsorted(pooled, hashes, side="left")
        hi = np.searchsorted(pooled, hashes, side="right")
        hit = hi > lo
        if not hit.any():
            continue
        # every (n-gram, validation document) pair the n-grams of this document fall on
        matched = np.concatenate([owners[a:b] for a, b in zip(lo[hit], hi[hit])])
        common = np.bincount(matched, minlength=len(val_sizes))
        val_share = common / np.maximum(val_sizes, 1)
        own_share = common / len(hashes)
        candidates = np.flatnonzero((val_share >= share) | (own_share >= own_floor))
        if len(candidates):
            j = int(candidates[np.argmax(val_share[candidates])])
            dropped.append(DroppedDocument(position, j, float(val_share[j]), float(own_share[j])))
    return dropped


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def trainer_settings(vocab_size: int, character_coverage: float, with_caseops: bool = False) -> dict:
    """The SentencePiece trainer arguments of a lossless BPE (recorded in the manifest); with CaseOps, its four
    operators are user-defined symbols (one piece each, ids 4-7, as in parameter-golf's CaseOps tokenizer)."""
    extra = {"user_defined_symbols": list(CASEOPS_OPERATORS)} if with_caseops else {}
    return dict(**extra,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        byte_fallback=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=character_coverage,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=TRAIN_THREADS,
    )


def _sentencepiece_message(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\w+: \S+\(\d+\) \[[^\]]*\] ", "", text)  # "INTERNAL: src/x.cc(638) [condition] message"
    return text.replace("--character_coverage option", "--character-coverage").replace("vocab_size", "--vocab-size")


def train_tokenizer(texts, settings: dict, input_path: str) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=texts, model_writer=model, minloglevel=2, **settings)
    except PrepareError:
        raise
    except Exception as e:  # sentencepiece raises RuntimeError("INTERNAL: ...") for bad settings or corpora
        raise PrepareError(input_path, f"tokenizer training failed: {_sentencepiece_message(e)}") from None
    return model.getvalue()


def load_tokenizer_file(path: str):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise PrepareError(path, "tokenizer file not found")
    try:
        with open(path, "rb") as f:
            data = f.read()
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        raise PrepareError(path, f"not a SentencePiece model ({_sentencepiece_message(e)})") from None
    if sp.bos_id() != BOS_ID:
        raise PrepareError(path, f"the tokenizer's BOS id is {sp.bos_id()}, but shards need BOS id {BOS_ID}")
    if sp.vocab_size() > 65536:
        raise PrepareError(path, f"the tokenizer has {sp.vocab_size()} pieces; shards hold uint16 ids (at most 65536)")
    return sp, data


# ---------------------------------------------------------------------------------------------------------------------
# Main


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    decoded_bytes: int = 0
    not_round_trip: int = 0
    first_not_round_trip: int | None = None
    files: list = field(default_factory=list)

    def manifest(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "decoded_bytes": self.decoded_bytes, "documents_not_round_trip": self.not_round_trip,
                "files": self.files}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a .jsonl, .jsonl.gz or .txt file, or a directory of .txt files")
    p.add_argument("--out", required=True, help="output directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="use this SentencePiece model instead of training one (copied to DIR)")
    group.add_argument("--vocab-size", type=int, help=f"pieces of the trained tokenizer (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS,
                   help=f"documents in the validation split (default {DEFAULT_VAL_DOCS})")
    p.add_argument("--val-select", choices=VAL_SELECT_CHOICES, default=DEFAULT_VAL_SELECT,
                   help="which documents are validation: 'spread' (default) evenly spaced over the whole corpus, for"
                        " local corpora that are in some order; 'first' the first --val-docs, for corpora that are"
                        " already shuffled (FineWeb)")
    p.add_argument("--decontaminate-share", type=float, default=DEFAULT_DECONTAMINATE_SHARE,
                   help="drop training documents holding at least this share of a validation document's word n-grams"
                        f" (default {DEFAULT_DECONTAMINATE_SHARE}; 0 keeps every document)")
    p.add_argument("--decontaminate-ngram", type=int, default=DEFAULT_DECONTAMINATE_NGRAM,
                   help=f"words per n-gram of that comparison (default {DEFAULT_DECONTAMINATE_NGRAM})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"at most this many tokens per shard (default {DEFAULT_SHARD_TOKENS:_})")
    p.add_argument("--name", help="shard file prefix (default: the input's name, peps.jsonl.gz -> peps)")
    p.add_argument("--skip-if-current", action="store_true",
                   help="do nothing when --out already holds this input prepared with these parameters by this version"
                        " of the script (run.sh and the tests prepare the sample this way)")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps (data/caseops.py): the tokenizer reads the case-transformed text, its operators are"
                        " user-defined pieces, and the validation split gets a byte sidecar of the original text's bytes"
                        " (PREFIX_val_bytes_*.bin), which bits per byte then counts")
    p.add_argument("--character-coverage", type=float, default=None,
                   help=f"SentencePiece character_coverage when training (default {DEFAULT_CHARACTER_COVERAGE}: the"
                        " rarest characters go through byte fallback instead of taking pieces; still lossless)")
    return p


def check_parameters(args) -> None:
    if args.val_docs < 1:
        raise PrepareError("--val-docs", f"must be at least 1, got {args.val_docs}"
                                         " (train_gpt.py evaluates the val split)")
    if not 0.0 <= args.decontaminate_share <= 1.0:
        raise PrepareError("--decontaminate-share", f"must be in [0, 1] (0: off), got {args.decontaminate_share}")
    if args.decontaminate_ngram < 1:
        raise PrepareError("--decontaminate-ngram", f"must be at least 1, got {args.decontaminate_ngram}")
    if args.shard_tokens < 1:
        raise PrepareError("--shard-tokens", f"must be at least 1, got {args.shard_tokens}")
    if args.vocab_size is not None and not 260 < args.vocab_size <= 65536:
        raise PrepareError("--vocab-size", f"must be in (260, 65536] (4 special and 256 byte pieces, uint16 ids),"
                                           f" got {args.vocab_size}")
    if args.tokenizer is not None and args.character_coverage is not None:
        raise PrepareError("--character-coverage", "only applies when a tokenizer is trained (no --tokenizer)")
    if args.character_coverage is None:
        args.character_coverage = DEFAULT_CHARACTER_COVERAGE
    if not 0.0 < args.character_coverage <= 1.0:
        raise PrepareError("--character-coverage", f"must be in (0, 1], got {args.character_coverage}")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise PrepareError("--name", f"{args.name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or"
                                     " digit)")


def check_out_dir(out: str, prefix: str) -> None:
    """Refuse an output folder holding shards that train_gpt.py would read along with ours."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(out, "exists and is not a directory")
    for split, other in (("val", "train"), ("train", "val")):
        ours = f"{prefix}_{split}_000000.bin"
        if fnmatch.fnmatchcase(ours, f"*_{other}_*.bin"):
            raise PrepareError("--name", f"{prefix!r} makes {ours}, which train_gpt.py would also read as {other}"
                                         " data; choose another name")
    if not os.path.isdir(out):
        return
    mine = re.compile(re.escape(prefix) + r"_(train|val|val_bytes)_\d{6}\.bin")
    for name in sorted(os.listdir(out)):
        if (fnmatch.fnmatchcase(name, "*_train_*.bin") or fnmatch.fnmatchcase(name, "*_val_*.bin")) \
                and not mine.fullmatch(name):
            raise PrepareError(out, f"already holds {name}, shards of another corpus that train_gpt.py would read"
                                    f" along with these; remove them or choose another --out")


def manifest_parameters(args, prefix: str) -> dict:
    """The manifest's `parameters`: every choice that shapes the output (after check_parameters)."""
    trained = args.tokenizer is None
    return {"val_docs": args.val_docs, "val_select": args.val_select,
            "decontaminate": {"share": args.decontaminate_share, "ngram_words": args.decontaminate_ngram},
            "shard_tokens": args.shard_tokens, "name": prefix,
            "vocab_size": (args.vocab_size or DEFAULT_VOCAB_SIZE) if trained else None,
            "character_coverage": args.character_coverage if trained else None,
            "tokenizer": None if trained else os.path.basename(args.tokenizer),
            **({"text_transform": caseops.TRANSFORM_NAME} if args.caseops else {})}


def is_current(args, prefix: str, kind: str) -> bool:
    """DIR already holds what this command would write: a manifest of this format, input sha256 and parameters, with
    the tokenizer and every shard it lists present at their sizes (contents are not re-hashed)."""
    try:
        with open(os.path.join(args.out, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if (manifest.get("format") != MANIFEST_FORMAT or manifest.get("parameters") != manifest_parameters(args, prefix)
            or manifest.get("input", {}).get("sha256") != input_sha256(args.input, kind)
            or not os.path.isfile(os.path.join(args.out, "tokenizer.model"))):
        return False
    for split in manifest["splits"].values():
        for entry in split["files"] + split.get("sidecar", {}).get("files", []):
            path = os.path.join(args.out, entry["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != SHARD_HEADER_BYTES + 2 * entry["tokens"]:
                return False
    return True


def run(args) -> dict:
    """Everything but the argument parsing; returns the manifest (None when --skip-if-current found it up to date).
    Raises PrepareError for bad input."""
    check_parameters(args)
    kind = input_kind(args.input)
    prefix = args.name if args.name is not None else default_prefix(args.input)
    if args.skip_if_current and is_current(args, prefix, kind):
        print(f"{args.out} is up to date")
        return None
    given = None
    if args.tokenizer is not None:
        given = load_tokenizer_file(args.tokenizer)  # fail early, before reading a large input
        if args.caseops:
            try:
                caseops.check_tokenizer(given[0], args.tokenizer)
            except DataError as e:
                raise PrepareError(args.tokenizer, str(e).split(": ", 1)[1]) from None
    check_out_dir(args.out, prefix)

    # Pass 1: validate every document and count them before anything is written or trained.
    document_bytes = array("q")  # UTF-8 bytes of each non-empty document (8 bytes per document)
    empty = 0
    for _, nbytes in iter_all_documents(args.input, kind):
        if nbytes == 0:
            empty += 1
            continue
        if nbytes > MAX_SENTENCE_BYTES:
            raise PrepareError(args.input, f"document {len(document_bytes)} has {nbytes} bytes, more than the tokenizer"
                                           f" trainer takes ({MAX_SENTENCE_BYTES})")
        document_bytes.append(nbytes)
    documents = len(document_bytes)
    if documents == 0:
        raise PrepareError(args.input, "the corpus is empty (no non-empty " +
                           (".txt files in the directory)" if kind == "dir" else "documents)"))
    if args.val_docs >= documents:
        raise PrepareError(args.input, f"--val-docs {args.val_docs} leaves no training documents: the corpus has only"
                                       f" {documents} documents (pass a smaller --val-docs)")
    val_positions = frozenset(validation_positions(documents, args.val_docs, args.val_select))
    dropped = []
    if args.decontaminate_share > 0:
        dropped = near_duplicates_of_validation(lambda: iter_documents(args.input, kind), sorted(val_positions),
                                                args.decontaminate_ngram, args.decontaminate_share)
        if len(dropped) + args.val_docs >= documents:
            raise PrepareError(args.input, f"every training document near-duplicates a validation document"
                                           f" ({len(dropped)} dropped); pass a larger --decontaminate-share")
        if dropped:
            print(f"dropping {len(dropped)} training document(s) that near-duplicate validation documents"
                  f" (input positions {', '.join(str(d.input_document) for d in dropped)})", flush=True)
    dropped_positions = frozenset(d.input_document for d in dropped)
    val_bytes = sum(document_bytes[i] for i in val_positions)
    train_bytes = sum(document_bytes) - val_bytes - sum(document_bytes[i] for i in dropped_positions)

    # Pass 2: the tokenizer (trained on the train split only, in input order), still in memory.
    import sentencepiece as spm

    to_model = caseops.encode if args.caseops else (lambda text: text)  # what the tokenizer reads

    if given is not None:
        sp, model_bytes = given
        settings = None
    else:
        settings = trainer_settings(args.vocab_size or DEFAULT_VOCAB_SIZE, args.character_coverage, args.caseops)
        print(f"training a {settings['vocab_size']}-piece BPE tokenizer on"
              f" {documents - args.val_docs - len(dropped)} documents"
              f" ({train_bytes / 1e6:.1f} MB)", flush=True)
        t0 = time.perf_counter()
        train_texts = (to_model(text) for i, (text, _) in enumerate(iter_documents(args.input, kind))
                       if i not in val_positions and i not in dropped_positions)
        model_bytes = train_tokenizer(train_texts, settings, args.input)
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        print(f"trained in {time.perf_counter() - t0:.1f} s", flush=True)

    # Pass 3: encode and write every shard under a temporary name.
    created_out = not os.path.isdir(args.out)
    os.makedirs(args.out, exist_ok=True)
    writers = {split: ShardWriter(args.out, prefix, split, args.shard_tokens) for split in ("val", "train")}
    sidecar = ShardWriter(args.out, prefix, "val_bytes", args.shard_tokens) if args.caseops else None
    tables = build_byte_tables(sp, sp.vocab_size(), args.tokenizer or "the trained tokenizer") if args.caseops else None
    sidecar_bytes = 0
    stats = {"val": SplitStats(), "train": SplitStats()}
    temps: list[tuple[str, str]] = []  # (temporary, final) of the tokenizer and the manifest
    threads = max(1, os.cpu_count() or 1)
    from tqdm import tqdm

    try:
        with tqdm(total=sum(document_bytes), unit="B", unit_scale=True, desc="encoding", file=sys.stderr,
                  disable=None, mininterval=1.0) as bar:
            batch: list[tuple[int, str, int]] = []  # (input position, text, UTF-8 bytes)

            def flush_batch():
                nonlocal sidecar_bytes
                ids_list = sp.encode([to_model(text) for _, text, _ in batch], num_threads=threads)
                decoded = sp.decode(ids_list, num_threads=threads)
                for (position, text, nbytes), ids, back in zip(batch, ids_list, decoded):
                    split = "val" if position in val_positions else "train"
                    doc = np.empty(len(ids) + 1, dtype=np.int64)
                    doc[0] = BOS_ID
                    doc[1:] = ids
                    writers[split].write(doc)
                    s = stats[split]
                    s.documents += 1
                    s.tokens += len(doc)
                    s.bytes += nbytes
                    counts = token_original_bytes(tables, doc) if tables is not None else None
                    if args.caseops:
                        try:
                            back = caseops.decode(back)
                        except caseops.CaseOpsError:
                            back = None  # does not decode to a CaseOps string: counted as not round trip
                    s.decoded_bytes += len(back.encode("utf-8")) if back is not None else int(counts.sum())
                    if split == "val" and sidecar is not None:
                        sidecar.write(counts)
                        sidecar_bytes += int(counts.sum())
                    if back != text:
                        s.not_round_trip += 1
                        if s.first_not_round_trip is None:
                            s.first_not_round_trip = position
                    bar.update(nbytes)
                batch.clear()

            batch_bytes = 0
            index = 0  # input position of the next document
            for text, nbytes in iter_documents(args.input, kind):
                if index in dropped_positions:  # near-duplicates a validation document: not encoded
                    bar.update(nbytes)
                else:
                    batch.append((index, text, nbytes))
                    batch_bytes += nbytes
                if batch_bytes >= ENCODE_BATCH_BYTES:
                    flush_batch()
                    batch_bytes = 0
                index += 1
            if batch:
                flush_batch()
        if index != documents:
            raise PrepareError(args.input, f"changed while being read ({documents} documents, then {index})")

        for split in ("val", "train"):
            for tmp, final, tokens in writers[split].finish():
                stats[split].files.append({"name": os.path.basename(final), "tokens": tokens,
                                           "sha256": sha256_file(tmp)})
        sidecar_files = [{"name": os.path.basename(final), "tokens": tokens, "sha256": sha256_file(tmp)}
                         for tmp, final, tokens in (sidecar.finish() if sidecar is not None else [])]

        tokenizer_path = os.path.join(args.out, "tokenizer.model")
        tokenizer_info = {
            "file": "tokenizer.model",
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "vocab_size": sp.vocab_size(),
            "source": "trained" if given is None else os.path.basename(args.tokenizer),
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
            "training": settings,
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "input": {"name": os.path.basename(os.path.normpath(args.input)), "kind": kind,
                      "sha256": input_sha256(args.input, kind), "documents": documents,
                      "skipped_empty_documents": empty},
            "parameters": manifest_parameters(args, prefix),
            "shard_format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": SHARD_HEADER_INTS,
                             "token_dtype": "uint16",
                             "bos_id": BOS_ID, "eos_appended": False},
            "tokenizer": tokenizer_info,
            "splits": {"val": {**stats["val"].manifest(),
                               **({"sidecar": {"files": sidecar_files, "bytes": sidecar_bytes}} if sidecar else {})},
                       "train": {**stats["train"].manifest(), "dropped": [d.manifest() for d in dropped]}},
            "sentencepiece_version": spm.__version__,
        }
        manifest_text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n"

        # Everything is now in temporary files; rename them into place, the manifest last.
        temps.append((write_temp(tokenizer_path, model_bytes), tokenizer_path))
        manifest_path = os.path.join(args.out, "manifest.json")
        temps.append((write_temp(manifest_path, manifest_text.encode("utf-8")), manifest_path))
        written = set()
        for split in ("val", "train"):
            written.update(os.path.basename(p) for p in writers[split].commit())
        if sidecar is not None:
            written.update(os.path.basename(p) for p in sidecar.commit())
        os.replace(*temps[0])
        stale = re.compile(re.escape(prefix) + r"_(train|val|val_bytes)_\d{6}\.bin")
        for name in sorted(os.listdir(args.out)):
            if stale.fullmatch(name) and name not in written:
                os.remove(os.path.join(args.out, name))
        os.replace(*temps[1])
    except BaseException:
        for writer in list(writers.values()) + ([sidecar] if sidecar is not None else []):
            writer.abort()
        for tmp, _ in temps:
            remove_quietly(tmp)
        if created_out:
            try:
                os.rmdir(args.out)  # only if still empty
            except OSError:
                pass
        raise

    for split in ("val", "train"):
        s = stats[split]
        print(f"{split}: {s.documents} documents, {s.tokens} tokens, {s.bytes} bytes"
              f" ({s.bytes / max(s.tokens - s.documents, 1):.3f} bytes/token), {len(s.files)} shard(s)")
    changed = [(split, stats[split]) for split in ("val", "train") if stats[split].not_round_trip]
    if changed:
        total = sum(s.not_round_trip for _, s in changed)
        first = min(s.first_not_round_trip for _, s in changed)
        print(f"warning: {total} of {documents} documents do not decode back to their exact text with this tokenizer"
              f" (first: document {first}); bits per byte counts the decoded bytes (manifest: decoded_bytes)",
              file=sys.stderr)
    print(f"wrote {args.out}")
    return manifest


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (PrepareError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: the file is in the message
        where = e.filename if e.filename is not None else args.out
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

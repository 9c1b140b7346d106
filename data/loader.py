"""The record's data: token shards, the document stream, the shuffled varlen loader, the validation set and bytes per
token.

Shard file: 256 little-endian int32 header ([0] magic 20240520, [1] version 1, [2] number of tokens), then that many
little-endian uint16 tokens, nothing else (the format of modded-nanogpt and parameter-golf). Every document starts with
BOS; documents are found by BOS positions and may continue from one shard into the next.

BPB = (sum of per-token losses in nats) / ln 2 / (bytes those tokens stand for). A token's bytes come from lookup tables
built from the SentencePiece model (ByteTables); together they reproduce len(sp.decode(ids).encode()) for every
document exactly.

numpy and the standard library only at import time (the data tools that write shards start fast); torch is imported
where tensors are made (PrefetchingLoader) and sentencepiece where a tokenizer is loaded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from data.files import write_atomic

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1
IGNORE_INDEX = -100  # the target of a position that is not trained on or scored
# CaseOps (data/caseops.py, parameter-golf's lossless_caps_caseops_v1): operator characters, pieces of their own in a
# CaseOps tokenizer; an operator stands for 0 bytes of the original text, an escaped one for its 3 UTF-8 bytes.
CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_OPERATORS = CASEOPS_TITLE + CASEOPS_ALLCAPS + CASEOPS_CAPNEXT + CASEOPS_ESCAPE
# a validation split's byte sidecar: one file per token shard, PREFIX_val_bytes_N.bin beside PREFIX_val_N.bin
SIDECAR_NAME = re.compile(r"_val_bytes_\d+\.bin$")


class DataError(ValueError):
    """Bad input data. The message starts with the file it is about."""


class ConfigError(ValueError):
    """A setting has a value the run cannot work with. The message names the variable or option."""


# ----------------------------------------------------------------------------------------------------------------------
# Shards


def load_shard(path) -> np.ndarray:
    """Memory-map the tokens of one shard after checking magic, version and the exact file size."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DataError(f"{path}: shard file not found") from None
    if size < SHARD_HEADER_BYTES:
        what = "empty" if size == 0 else f"only {size} bytes"
        raise DataError(f"{path}: file is {what}, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: wrong magic number {header[0]} (a token shard starts with {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (this reader knows version {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes"
                        f" ({'truncated' if size < expected else 'trailing data'})")
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[position])} at position {position} is >= vocab size {vocab_size}")


def scan_shard(tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """(positions of BOS, largest token id) of one shard: the slow and obvious pass over every token."""
    return np.flatnonzero(np.asarray(tokens) == BOS_ID).astype(np.int64), int(tokens.max()) if len(tokens) else -1


def shard_index(path: str, tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """scan_shard's answer, cached beside the shard in PATH.index.npz and reused while the shard's size and mtime are
    unchanged (80 FineWeb shards open in well under a second instead of a full read). A folder we cannot write to just
    goes without the cache."""
    cache = f"{path}.index.npz"
    stat = os.stat(path)
    key = np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    try:
        with np.load(cache) as saved:
            if np.array_equal(saved["key"], key):
                return saved["bos"], int(saved["max_id"])
    except (OSError, KeyError, ValueError):
        pass  # no cache yet, or an unreadable one: scan
    bos, max_id = scan_shard(tokens)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: np.savez would add ".npz" to the name
            np.savez(f, key=key, bos=bos, max_id=np.array(max_id))

    with contextlib.suppress(OSError):
        write_atomic(cache, save)
    return bos, max_id


def split_pattern(data_path: str, split: str) -> str:
    """The glob of a split's token shards. It also matches the byte sidecars (*_val_bytes_*.bin): use split_files, or
    TokenStream, which leave them out."""
    return os.path.join(data_path, f"*_{split}_*.bin")


def is_sidecar(path: str) -> bool:
    return SIDECAR_NAME.search(os.path.basename(path)) is not None


def split_files(data_path: str, split: str) -> list[str]:
    """The token shards of a split, sorted, without byte sidecars."""
    return sorted(f for f in glob.glob(split_pattern(data_path, split)) if not is_sidecar(f))


class TokenStream:
    """All shards of one split as one virtual, memory-mapped token array, with the index of its documents."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files = sorted(f for f in glob.glob(pattern) if not is_sidecar(f))  # *_val_*.bin also matches sidecars
        if not self.files:
            raise DataError(f"{pattern}: no shard files match")
        self.shards, bos_positions = [], []
        for path in self.files:
            tokens = load_shard(path)
            bos, max_id = shard_index(path, tokens)
            if max_id >= vocab_size:
                check_token_ids(tokens, vocab_size, path)  # names the first bad position
            self.shards.append(tokens)
            bos_positions.append(bos)
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.shard_offsets[-1])
        if self.num_tokens == 0:
            raise DataError(f"{pattern}: the shards hold no tokens")
        first_shard = int(np.flatnonzero(lengths)[0])  # earlier shards may be empty
        first = int(self.shards[first_shard][0])
        if first != BOS_ID:
            raise DataError(f"{self.files[first_shard]}: first token is {first}, not BOS ({BOS_ID}); documents must "
                            "start with BOS")
        self.doc_starts = np.concatenate([bos + off for bos, off in zip(bos_positions, self.shard_offsets)])
        self.doc_lengths = np.diff(np.append(self.doc_starts, self.num_tokens))

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the virtual array, as int32 (a copy)."""
        return self.gather(np.array([start]), np.array([stop - start]))

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The ranges [start, start + length) of the virtual array, concatenated, as int32, in one vectorised pass
        (a Python loop over ranges is too slow for short documents)."""
        ends = np.cumsum(lengths)
        index = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        if len(self.shards) == 1:
            return self.shards[0][index].astype(np.int32)
        shard_of = np.searchsorted(self.shard_offsets, index, side="right") - 1
        out = np.empty(len(index), dtype=np.int32)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self.shards[shard][index[mask] - self.shard_offsets[shard]]
        return out

    def document(self, index: int) -> np.ndarray:
        start = int(self.doc_starts[index])
        return self.read(start, start + int(self.doc_lengths[index]))


# ----------------------------------------------------------------------------------------------------------------------
# Training batches: shuffled documents, packed back to back, cut into varlen segments


def segment_boundaries(doc_starts_in_slice: np.ndarray, length: int, max_piece: int) -> np.ndarray:
    """cu_seqlens for a slice of `length` tokens: a segment starts at 0, at every document start, and every `max_piece`
    tokens inside a document (long documents are cut into pieces of at most TRAIN_SEQ_LEN)."""
    starts = np.union1d([0], doc_starts_in_slice).astype(np.int64)
    ends = np.append(starts[1:], length)
    pieces = -(-(ends - starts) // max_piece)  # ceil division
    first_piece = np.cumsum(pieces) - pieces
    piece_index = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
    piece_starts = np.repeat(starts, pieces) + piece_index * max_piece
    return np.append(piece_starts, length).astype(np.int32)


def fit_segments(cu_seqlens: np.ndarray, targets: np.ndarray, max_segments: int) -> np.ndarray:
    """cu_seqlens with exactly `max_segments` segments, so that the compiled step sees one shape for the whole run.

    Fewer segments: padded with zero-length ones. More (a micro-batch of unusually many short documents): the segments
    from index max_segments - 1 on are merged into one, and the targets of every token after the first of them are
    ignored in place (a merged token could see another document, so it must not be trained on). Returns the new
    cu_seqlens; `targets` is changed in place."""
    length = int(cu_seqlens[-1])
    if len(cu_seqlens) - 1 > max_segments:
        targets[int(cu_seqlens[max_segments]):] = IGNORE_INDEX
        cu_seqlens = np.append(cu_seqlens[:max_segments], length)
    return np.pad(cu_seqlens, (0, max_segments + 1 - len(cu_seqlens)), constant_values=length).astype(np.int32)


def default_max_segments(micro_tokens: int) -> int:
    """Segments per micro-batch the compiled step is built for: room for a mean segment of 64 tokens (FineWeb's
    documents average ~1,300 tokens), at least 64. Zero-length padding segments cost flash attention nothing."""
    return max(64, micro_tokens // 64)


@dataclass
class MicroBatch:
    inputs: np.ndarray  # int32 [L] (a tensor once PrefetchingLoader has built it)
    targets: np.ndarray  # int64 [L]; IGNORE_INDEX where the target would be the next document's BOS
    cu_seqlens: np.ndarray  # int32, exactly max_segments + 1 entries
    merged: bool = False  # it had more segments than max_segments (see fit_segments)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """What DocumentLoader serves: steps of batch_tokens tokens cut into micro_batches equal slices, documents cut
    into pieces of at most seq_len tokens and shuffled by seed (shuffle=False: file order), and micro-batches of
    exactly max_segments pieces (0: default_max_segments)."""

    seq_len: int
    batch_tokens: int
    micro_batches: int
    seed: int
    shuffle: bool = True
    max_segments: int = 0


class DocumentLoader:
    """Shuffled documents, packed back to back, served as fixed-size varlen micro-batches.

    Epoch e is the documents in the order of a permutation drawn from (seed, e), concatenated; the epochs follow one
    another as one endless stream. Step s covers the next batch_tokens tokens of that stream, cut into micro_batches
    equal slices; rank r takes slices r, r + world_size, ... Everything depends only on the seed and the stream
    position, so every rank agrees and a restart from a saved position continues exactly."""

    def __init__(self, stream: TokenStream, config: LoaderConfig, rank: int = 0, world_size: int = 1):
        if config.micro_batches % world_size:
            raise ConfigError(f"TRAIN_MICRO_BATCHES={config.micro_batches}: must be divisible by the world size "
                              f"{world_size}")
        self.stream, self.config, self.rank, self.world_size = stream, config, rank, world_size
        self.seq_len, self.micro_batches, self.seed, self.shuffle = (config.seq_len, config.micro_batches, config.seed,
                                                                     config.shuffle)
        self.micro_tokens = config.batch_tokens // config.micro_batches
        self.max_segments = config.max_segments or default_max_segments(self.micro_tokens)
        self.merged_batches = 0  # micro-batches that had more segments than max_segments (see fit_segments)
        self.position = 0  # tokens of the endless stream consumed so far
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.stream.num_docs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.stream.num_docs)

    def _epoch(self, epoch: int):
        """(document order, start of each document in epoch coordinates, with the epoch length appended)."""
        if epoch not in self._epochs:
            order = self.epoch_order(epoch)
            starts = np.concatenate([[0], np.cumsum(self.stream.doc_lengths[order])])
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of the endless stream and the offsets (within them) where documents start."""
        tokens, doc_offsets, done = [], [], 0
        n = self.stream.num_tokens
        while start + done < stop:  # more than once only when the range runs into the next epoch
            epoch, offset = divmod(start + done, n)
            order, starts = self._epoch(epoch)
            end = min(n, offset + stop - start - done)
            first = int(np.searchsorted(starts, offset, side="right")) - 1
            last = int(np.searchsorted(starts, end, side="left"))
            doc_begin, doc_end = starts[first:last], starts[first + 1:last + 1]
            lo, hi = np.maximum(offset, doc_begin), np.minimum(end, doc_end)
            tokens.append(self.stream.gather(self.stream.doc_starts[order[first:last]] + lo - doc_begin, hi - lo))
            doc_offsets.append(done + doc_begin[lo == doc_begin] - offset)
            done += end - offset
        return np.concatenate(tokens), np.concatenate(doc_offsets).astype(np.int64)

    def micro_batch(self, start: int) -> MicroBatch:
        tokens, doc_offsets = self.read(start, start + self.micro_tokens + 1)
        inputs, targets = tokens[:-1], tokens[1:].astype(np.int64)
        targets[targets == BOS_ID] = IGNORE_INDEX  # never predict across a document boundary
        cu = segment_boundaries(doc_offsets[doc_offsets < self.micro_tokens], self.micro_tokens, self.seq_len)
        merged = len(cu) - 1 > self.max_segments
        return MicroBatch(inputs, targets, fit_segments(cu, targets, self.max_segments), merged)

    @property
    def step_tokens(self) -> int:
        return self.micro_batches * self.micro_tokens

    def step_batches(self, position: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global step that starts at stream position `position` (no state changes)."""
        return [self.micro_batch(position + j * self.micro_tokens)
                for j in range(self.rank, self.micro_batches, self.world_size)]

    def consume(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        """Advance past one step's batches."""
        self.position += self.step_tokens
        self.merged_batches += sum(b.merged for b in batches)
        return batches

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global step."""
        return self.consume(self.step_batches(self.position))

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "merged_batches": self.merged_batches, "documents": self.stream.num_docs,
                "tokens": self.stream.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        # a position only means something in the stream it was taken in: the same documents, seed and order
        here = {"seed": self.seed, "shuffle": self.shuffle, "documents": self.stream.num_docs,
                "tokens": self.stream.num_tokens}
        for name, value in here.items():
            if name in state and state[name] != value:
                raise ConfigError(f"the saved loader position belongs to a stream with {name} {state[name]!r}, "
                                  f"this one has {value!r} (training data: {self.stream.files[0]}...)")
        self.position = int(state["position"])
        self.merged_batches = int(state.get("merged_batches", 0))


class PrefetchingLoader:
    """A DocumentLoader whose next step is built in a background thread while the current step runs on the device, as
    tensors (in pinned memory on CUDA, so the copy to the GPU does not wait for the host). Only the main thread moves
    the loader's position, one step per next_step(), so the batches, their order and resume are exactly the loader's;
    a prefetched step for any other position (after load_state_dict) is dropped."""

    def __init__(self, loader: DocumentLoader, pin_memory: bool):
        self.loader, self.pin = loader, pin_memory
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self.ahead = None  # (stream position, future of that step's batches)

    def _build(self, position: int) -> list[MicroBatch]:
        import torch

        def tensor(array):
            t = torch.from_numpy(array)
            return t.pin_memory() if self.pin else t

        return [MicroBatch(tensor(b.inputs), tensor(b.targets), tensor(b.cu_seqlens), b.merged)
                for b in self.loader.step_batches(position)]

    def _prefetch(self, position: int):
        if self.ahead is None or self.ahead[0] != position:
            self.ahead = (position, self.worker.submit(self._build, position))
        return self.ahead[1]

    def next_step(self) -> list[MicroBatch]:
        batches = self._prefetch(self.loader.position).result()
        self.loader.consume(batches)
        self._prefetch(self.loader.position)  # the step after: built while this one runs
        return batches

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------------
# Bytes per token


@dataclass
class ByteTables:
    base_bytes: np.ndarray  # int64 [V]: UTF-8 bytes of the piece without its leading "▁"; byte pieces 1; control 0
    leading_space: np.ndarray  # bool [V]: the piece starts with "▁", which decodes to one space byte
    is_boundary: np.ndarray  # bool [V]: control and unknown pieces (BOS, EOS, PAD, UNK)
    strips_first_space: bool  # the decoder drops the "▁" of a text's first piece (tokenizers with a dummy prefix)
    operator: np.ndarray | None = None  # bool [V]: the piece is one CaseOps operator character (None: all False)
    escape_id: int = -1  # the piece of CaseOps' ESCAPE operator, -1 when the tokenizer has none
    lossless: bool = True  # decode(encode(text)) == text on a probe of whitespace runs, newlines and NFKC-changed text

    def count(self, prev_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Bytes of each token in `ids`, given the token before it."""
        space_counts = self.leading_space[ids]
        if self.strips_first_space:
            space_counts = space_counts & ~self.is_boundary[prev_ids]
        return self.base_bytes[ids] + space_counts

    @property
    def has_caseops(self) -> bool:
        return self.operator is not None and bool(self.operator.any())


def build_byte_tables(sp, vocab_size: int, tokenizer_path: str) -> ByteTables:
    """The tables of a sentencepiece.SentencePieceProcessor (loaded from tokenizer_path, named in errors) for a model
    with vocab_size embeddings."""
    if sp.vocab_size() > vocab_size:
        raise DataError(f"{tokenizer_path}: tokenizer has {sp.vocab_size()} pieces, more than VOCAB_SIZE={vocab_size}")
    base = np.zeros(vocab_size, dtype=np.int64)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)  # ids past the tokenizer's vocabulary never occur; count them as 0
    for token in range(sp.vocab_size()):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        boundary[token] = False
        if sp.is_byte(token):
            base[token] = 1
            continue
        piece = sp.id_to_piece(token)
        if piece.startswith("\u2581"):
            space[token] = True
            piece = piece[1:]
        base[token] = len(piece.replace("\u2581", " ").encode("utf-8"))  # an inner "▁" (e.g. "▁of▁the") is one space
    # Whether the decoder strips the space of a first "▁piece" depends on the tokenizer's normaliser (dummy prefix);
    # ask the decoder itself, with a piece like "▁the" (not "▁▁"), rather than parse its protobuf.
    probe = next((t for t in range(sp.vocab_size()) if space[t] and len(sp.id_to_piece(t)) > 1
                  and sp.id_to_piece(t)[1] != "\u2581"), None)
    strips = probe is not None and not sp.decode([probe]).startswith(" ")
    operator = np.zeros(vocab_size, dtype=bool)
    for c in CASEOPS_OPERATORS:
        token = sp.piece_to_id(c)
        if not boundary[token] and not sp.is_byte(token) and sp.id_to_piece(token) == c:
            operator[token] = True
    escape = sp.piece_to_id(CASEOPS_ESCAPE)
    lossless = sp.decode(sp.encode(LOSSLESS_PROBE)) == LOSSLESS_PROBE
    return ByteTables(base, space, boundary, strips, operator, int(escape) if operator[escape] else -1, lossless)


# what a normalising tokenizer changes: runs of spaces, newlines, tabs, a leading space, NFKC-folded characters
LOSSLESS_PROBE = " a  b\n\n\tc \u00bd \ufb01 \uff21 x "


def acting_operators(tables: ByteTables, tokens: np.ndarray) -> np.ndarray:
    """bool per token: a CaseOps operator piece that acts as an operator (0 bytes), not the escaped literal after an
    acting ESCAPE (its 3 bytes). `tokens` starts at a document's BOS (an escape never runs across a BOS)."""
    if not tables.has_caseops:
        return np.zeros(len(tokens), dtype=bool)
    tokens = np.asarray(tokens)
    is_op = tables.operator[tokens]
    literal = np.zeros(len(tokens), dtype=bool)
    for p in np.flatnonzero(tokens == tables.escape_id):  # ascending; escapes are rare
        if not literal[p] and p + 1 < len(tokens) and is_op[p + 1]:
            literal[p + 1] = True
    return is_op & ~literal


def token_original_bytes(tables: ByteTables, tokens: np.ndarray) -> np.ndarray:
    """int64 per token of `tokens` (which start at a BOS): the bytes of the original text it stands for: the tables'
    count, with CaseOps operators at 0 (data/caseops.py). For a tokenizer without operators, exactly tables.count.
    The vectorised version of data.caseops.token_original_bytes_reference; a dataset's sidecar must agree with it
    document by document when the tokenizer is lossless."""
    tokens = np.asarray(tokens).astype(np.int64)
    prev = np.concatenate([[BOS_ID], tokens[:-1]])
    counts = tables.count(prev, tokens).astype(np.int64)
    counts[acting_operators(tables, tokens)] = 0
    return counts


def document_bytes(tables: ByteTables, doc: np.ndarray) -> int:
    """Bytes of a document (its tokens after the BOS). With a CaseOps tokenizer, of the original text: the operators
    count 0 (token_original_bytes), else BPB would count the 3 UTF-8 bytes of every operator."""
    if tables.has_caseops:
        return int(token_original_bytes(tables, doc).sum())
    return int(tables.count(doc[:-1], doc[1:]).sum())


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / math.log(2) / max(total_bytes, 1)


def load_tokenizer(path: str):
    """The sentencepiece.SentencePieceProcessor of a model file, or DataError naming the file."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found (set TOKENIZER_PATH or prepare the data first)")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError with long messages
        raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------------------------
# The validation set


@dataclass
class ValidationSet:
    """The validation documents an evaluation scores: the first max_docs of the split (0: all), with the tokens and
    bytes each one counts."""

    stream: TokenStream
    doc_ids: np.ndarray  # indices into the validation split, in order
    token_counts: np.ndarray  # scored tokens per document (all but the BOS)
    byte_counts: np.ndarray  # bytes those tokens stand for

    sidecar: bool = False  # byte_counts come from the split's byte sidecar (*_val_bytes_*.bin)

    @classmethod
    def load(cls, data_path: str, vocab_size: int, tables: ByteTables, max_docs: int = 0) -> ValidationSet:
        """The validation split of data_path. Its bytes: the sidecar's when the folder has one (checked against the
        tokens: see sidecar_document_bytes), else the tables' count of each document."""
        stream = TokenStream(split_pattern(data_path, "val"), vocab_size)
        doc_ids = np.arange(stream.num_docs if not max_docs else min(max_docs, stream.num_docs))
        sidecar = load_sidecar(stream)
        if sidecar is not None:
            byte_counts = sidecar_document_bytes(stream, sidecar, tables)[doc_ids]
        else:
            byte_counts = np.array([document_bytes(tables, stream.document(i)) for i in doc_ids], dtype=np.int64)
        return cls(stream, doc_ids, stream.doc_lengths[doc_ids] - 1, byte_counts, sidecar is not None)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def document(self, k: int) -> np.ndarray:
        """Tokens of the k-th selected document, BOS first."""
        return self.stream.document(int(self.doc_ids[k]))

    def subset(self, ks) -> ValidationSet:
        """The same set restricted to (and ordered as) the selected documents ks."""
        ks = np.asarray(ks, dtype=np.int64)
        return ValidationSet(self.stream, self.doc_ids[ks], self.token_counts[ks], self.byte_counts[ks], self.sidecar)


# ----------------------------------------------------------------------------------------------------------------------
# The byte sidecar of a validation split (parameter-golf's CaseOps format): PREFIX_val_bytes_N.bin beside every
# PREFIX_val_N.bin, the shard format with one uint16 per token: the bytes of the original text that token stands for,
# 0 for a BOS. BPB then counts the sidecar's bytes. Refused (DataError naming the file): a shard without its sidecar or
# a sidecar without its shard, another number of entries than its shard has tokens, a BOS that counts bytes, an acting
# CaseOps operator that counts bytes, and, for a lossless tokenizer, a document whose sum is not what its tokens stand
# for (token_original_bytes). A lossy tokenizer's tokens do not say how many bytes the text had (parameter-golf's
# CaseOps tokenizer folds whitespace and NFKC): there, `speedrun audit --texts` checks the sums against the text.


def sidecar_path(shard_path: str) -> str:
    directory, name = os.path.split(shard_path)
    at = name.rfind("_val_")
    return os.path.join(directory, name[:at] + "_val_bytes_" + name[at + len("_val_"):])


def load_sidecar(stream: TokenStream) -> np.ndarray | None:
    """The sidecar of a validation stream as one array parallel to its virtual token array, or None when the folder
    has no sidecar file."""
    directory = os.path.dirname(stream.files[0])
    present = sorted(f for f in glob.glob(os.path.join(directory, "*_val_bytes_*.bin")) if is_sidecar(f))
    if not present:
        return None
    expected = [sidecar_path(f) for f in stream.files]
    for extra in sorted(set(present) - set(expected)):
        raise DataError(f"{extra}: byte sidecar without its validation shard")
    parts = []
    for shard_path, tokens, path in zip(stream.files, stream.shards, expected):
        if not os.path.exists(path):
            raise DataError(f"{path}: byte sidecar missing for {os.path.basename(shard_path)} (the folder has "
                            f"sidecars for other validation shards)")
        counts = load_shard(path)
        if len(counts) != len(tokens):
            raise DataError(f"{path}: {len(counts)} byte entries, but {os.path.basename(shard_path)} has "
                            f"{len(tokens)} tokens (one entry per token)")
        bos = np.flatnonzero(np.asarray(tokens) == BOS_ID)
        counted = bos[np.asarray(counts)[bos] != 0]
        if len(counted):
            raise DataError(f"{path}: entry {int(counted[0])} counts {int(counts[counted[0]])} bytes for a BOS"
                            " (a BOS counts 0)")
        parts.append(np.asarray(counts))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _sidecar_file_at(stream: TokenStream, position: int) -> str:
    shard = int(np.searchsorted(stream.shard_offsets, position, side="right")) - 1
    return sidecar_path(stream.files[shard])


def sidecar_document_bytes(stream: TokenStream, sidecar: np.ndarray, tables: ByteTables,
                           group_tokens: int = 1 << 22) -> np.ndarray:
    """int64 bytes of every document of the stream, from its sidecar, after checking them against the tokens (see
    above). Documents are taken in groups of about group_tokens tokens, so memory stays bounded."""
    sums = np.zeros(stream.num_docs, dtype=np.int64)
    d = 0
    while d < stream.num_docs:
        e = d + 1
        while e < stream.num_docs and stream.doc_starts[e] - stream.doc_starts[d] < group_tokens:
            e += 1
        start, stop = int(stream.doc_starts[d]), int(stream.doc_starts[e]) if e < stream.num_docs else stream.num_tokens
        tokens = stream.read(start, stop)
        counts = sidecar[start:stop].astype(np.int64)
        local = stream.doc_starts[d:e] - start
        sums[d:e] = np.add.reduceat(counts, local)
        acting = acting_operators(tables, tokens)
        wrong = np.flatnonzero(acting & (counts != 0))
        if len(wrong):
            p = start + int(wrong[0])
            raise DataError(f"{_sidecar_file_at(stream, p)}: token {p} of the split is a CaseOps operator but counts "
                            f"{int(counts[wrong[0]])} bytes (an operator counts 0)")
        if tables.lossless:
            expected = np.add.reduceat(token_original_bytes(tables, tokens), local)
            bad = np.flatnonzero(expected != sums[d:e])
            if len(bad):
                k = d + int(bad[0])
                raise DataError(f"{_sidecar_file_at(stream, int(stream.doc_starts[k]))}: validation document {k} "
                                f"counts {int(sums[k])} bytes in the sidecar, its tokens stand for "
                                f"{int(expected[bad[0]])}")
        d = e
    return sums

#!/usr/bin/env python3
"""
Check a token dataset, and a BPB figure claimed on it, before anyone trusts the number.

  speedrun audit DATA_DIR [--tokenizer T] [--texts ORIGINAL] [--claim LOG_OR_JSON ...] [--json OUT.json]
                        [--vocab-size V] [--shingle N] [--threshold F] [--shingle-sample M] [--threads K]
  speedrun audit --claim LOG_OR_JSON [...] [--json OUT.json]      (no dataset: the checks that need none)

DATA_DIR holds `*_val_*.bin` and `*_train_*.bin` shards (this project's layout and parameter-golf's); the tokenizer
defaults to DATA_DIR/tokenizer.model. Documents are named by their 0-based index in their split, as the `id` of
eval_ttt.py's result rows (documents are the stretches that start with BOS, in shard order).

Checks, one line each in the summary (`ok`, `FAULT`, or `info` for a report that is not a fault):
  structure     every shard has a valid header and size (data.loader.load_shard); every split starts with BOS; no empty
                documents; no id >= the vocabulary; document and token counts, compared with manifest.json
  overlap       validation documents whose token sequence is exactly that of a training document (vectorised 64-bit
                polynomial hashes of every document, streamed over the training shards; candidates confirmed token
                for token)
  near-overlap  per validation document, the share of its N-token shingles (N = --shingle, default 8) that occur
                anywhere in training (an exact index: the validation shingles' hashes in a sorted array behind a
                bitmap filter, probed by every training shingle); a share above --threshold (default 0.5) is a fault
  bytes         per validation document, the project's byte tables (data.loader.build_byte_tables) against
                len(sp.decode(ids).encode("utf-8")); the total, and tokens per byte (val_bpb = val_loss / ln 2 x that)
  convention    the widely copied lookup-table count (a piece's UTF-8 length without its leading "▁", plus one space
                byte unless the previous token is a boundary; byte-fallback pieces one byte) against the exact count,
                in bytes and as the BPB error it causes (info, not a fault)
  sidecar       when the dataset has a byte sidecar (*_val_bytes_*.bin, one uint16 per token: the original text's bytes,
                as prepare_corpus --caseops and parameter-golf's CaseOps export write it): the loader's structural checks
                (data.loader.load_sidecar), every acting CaseOps operator at 0 bytes, per document the sum against the
                bytes its tokens stand for (data.loader.token_original_bytes; a fault only for a lossless tokenizer);
                the claim and completeness checks then count the sidecar's bytes, and --texts checks each document's
                sum against its text's UTF-8 length. A CaseOps tokenizer's documents are decoded and inverse-
                transformed (data/caseops.py) before they are compared with the texts
  texts         with --texts: every decoded validation document equals its original text; a lossy tokenizer (the
                shard tokens are exactly the tokenizer's encoding of the text, which does not decode back) is
                reported with examples, a document that is not the encoding of its text is a fault (truncated,
                running on into the next text, or different)
  completeness  the validation split holds the manifest's documents, tokens and decoded bytes; a truncated final
                document is named
  claim         with --claim: a training log (its scored line, speedrun.analysis.run_log's rule: our `final val_loss:...
                val_bpb:...` line and the matching `final_eval` line; parameter-golf's last final evaluation, e.g.
                legal_ttt_exact, never a step or diagnostic line), eval_ttt.py's results JSON (per-document nats) or
                a record's submission.json; val_bpb recomputed with this dataset's exact bytes, and the difference.
                Without DATA_DIR: val_bpb against the claim's own val_loss, tokens and bytes where it states them
                (eval_ttt.py's rows against their totals), else the tokens per byte it implies

Exit status: 0 when no check finds a fault, 1 when one does, 2 for bad usage or unreadable input (one line
`error: ...` on stderr). A progress bar (tqdm) goes to stderr on long passes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
from data.files import sha256_file
from data import caseops
from data.loader import (BOS_ID, SHARD_HEADER_BYTES, DataError, TokenStream, acting_operators, build_byte_tables,
                         load_shard, load_sidecar, load_tokenizer, split_files, split_pattern, token_original_bytes)
from speedrun.analysis.run_log import printed_decimals, read_run

DEFAULT_SHINGLE = 8
DEFAULT_THRESHOLD = 0.5
CHUNK_TOKENS = 1 << 22  # tokens per streamed piece: bounds the memory of every pass (a few uint64 arrays of this size)
BITMAP_BITS = 31  # the near-overlap filter: at most 2^31 bits (256 MiB), one bit per top-bits prefix of a shingle hash
MAX_LISTED = 2000  # positions kept per kind of structural fault (counts are always complete)
SHOWN = 5  # documents named in a summary line

U64 = np.uint64
MASK64 = (1 << 64) - 1
P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2^64
P_INV = pow(P, -1, 1 << 64)
LENGTH_KEY = U64(0xD6E8FEB86659FD93)
MIX = U64(0xBF58476D1CE4E5B9)


class UsageError(Exception):
    """Bad usage or unreadable input: `error: <message>`, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Hashing: h(t_0..t_{L-1}) = sum t_j P^j mod 2^64. With powers relative to a chunk, a document's hash is its segment
# sum times P^-start, so every document (and every shingle) of a chunk is hashed in a few vectorised passes.


def _powers(base: int, count: int) -> np.ndarray:
    block = 4096
    small = np.empty(block, dtype=U64)
    v = 1
    for i in range(block):
        small[i] = v
        v = (v * base) & MASK64
    step, cur = v, 1
    out = np.empty(-(-count // block) * block, dtype=U64)
    for start in range(0, len(out), block):
        np.multiply(small, U64(cur), out=out[start:start + block])
        cur = (cur * step) & MASK64
    return out[:count]


_TABLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def power_tables(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(P^j, P^-j) for j < count (cached, grown when needed)."""
    have = next((n for n in _TABLES if n >= count), None)
    if have is None:
        _TABLES.clear()
        have = max(count, CHUNK_TOKENS + 64)
        _TABLES[have] = (_powers(P, have), _powers(P_INV, have))
    pw, inv = _TABLES[have]
    return pw[:count], inv[:count]


def doc_key(hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One 64-bit key per document from its token hash and its length."""
    k = hashes ^ (lengths.astype(U64) * LENGTH_KEY)
    k = (k ^ (k >> U64(31))) * MIX
    return k ^ (k >> U64(29))


def shingle_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window tokens[i:i+n] (len(tokens) - n + 1 of them), independent of where the window is."""
    m = len(tokens)
    if m < n:
        return np.zeros(0, dtype=U64)
    pw, inv = power_tables(m + 1)
    prefix = np.empty(m + 1, dtype=U64)
    prefix[0] = 0
    np.multiply(tokens, pw[:m], out=prefix[1:], dtype=U64)
    np.cumsum(prefix[1:], out=prefix[1:])
    out = prefix[n:] - prefix[:-n]
    out *= inv[:m - n + 1]
    # the top bits index the bitmap filter: mix them once (a bijection, so equal windows still give equal values)
    out ^= out >> U64(32)
    out *= MIX
    return out


def sampled(hashes: np.ndarray, every: int) -> np.ndarray:
    """Mask of the hashes kept when indexing about one shingle in `every` (chosen by hash value, the same in both
    splits)."""
    if every <= 1:
        return np.ones(len(hashes), dtype=bool)
    return (hashes & U64(0xFFFFFFFF)) < U64((1 << 32) // every)  # the low 32 bits in the first 1/every of their range


# ---------------------------------------------------------------------------------------------------------------------
# Streaming a split: documents (start, length, key), structural faults, and (train) shingle probes


@dataclass
class SplitScan:
    name: str
    files: list[str] = field(default_factory=list)
    bad_files: list[dict] = field(default_factory=list)  # {"file", "problem"}
    file_tokens: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    orphan_tokens: int = 0  # tokens before the split's first BOS: part of no document
    bad_ids: list[dict] = field(default_factory=list)  # {"id", "position", "token"}
    bad_id_count: int = 0
    empty_docs: list[int] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)  # per chunk, the documents it completes (those kept)
    starts: list[np.ndarray] = field(default_factory=list)  # their global starts
    lengths: list[np.ndarray] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    docs: int = 0
    seconds_exact: float = 0.0
    seconds_near: float = 0.0
    seconds: float = 0.0

    def doc_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, starts, lengths, keys) of the documents kept."""
        def cat(xs, dt):
            return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt)

        return cat(self.ids, np.int64), cat(self.starts, np.int64), cat(self.lengths, np.int64), cat(self.keys, U64)


def open_shards(files: list[str], scan: SplitScan):
    """The readable shards (memory-mapped by data.loader.load_shard); a bad one is a structural fault."""
    out = []
    for path in files:
        try:
            tokens = load_shard(path)
        except DataError as e:
            scan.bad_files.append({"file": os.path.basename(path), "problem": str(e)})
            continue
        scan.files.append(path)
        scan.file_tokens[os.path.basename(path)] = len(tokens)
        out.append(tokens)
    return out


def _chunk_work(t: np.ndarray, tail: np.ndarray, vocab: int, bos: int, probe) -> dict:
    """Everything about one chunk that does not depend on earlier chunks (run in worker threads)."""
    t0 = time.perf_counter()
    m, k = len(t), len(tail)
    out = {}
    if int(t.max()) >= vocab:
        out["bad"] = np.flatnonzero(t >= vocab)
        out["bad_values"] = t[out["bad"]]
    b = np.flatnonzero(t == bos)
    pw, inv = power_tables(m + k + 1)
    x = np.multiply(t, pw[k:k + m], dtype=U64)  # powers relative to the start of tail+chunk
    if len(b) and b[0] == 0:
        seg = np.add.reduceat(x, b)
        head = None
    else:
        seg = np.add.reduceat(x, np.concatenate([[0], b])) if m else np.zeros(1, dtype=U64)
        head, seg = seg[0], seg[1:]
    out["bos"], out["head"] = b, head  # head: sum over the tokens before the first BOS, with powers from tail start
    out["seg"] = seg * inv[b + k]  # each document's (partial) hash, relative to its own start
    out["exact_s"] = time.perf_counter() - t0
    if probe is not None:
        t1 = time.perf_counter()
        out["hits"] = probe(np.concatenate([tail, t]) if k else t)
        out["near_s"] = time.perf_counter() - t1
    return out


def scan_split(shards: list[np.ndarray], scan: SplitScan, vocab: int, bos: int, keep=None, probe=None,
               on_hits=None, shingle: int = 0, threads: int = 1, bar=None) -> SplitScan:
    """Stream a split once, chunk by chunk (worker threads do the per-chunk work, the merge runs in order): documents
    by BOS and their keys, structural faults, and `probe(tokens)` on every chunk with the shingle - 1 tokens before
    it (windows across chunk and shard boundaries are seen), whose hits go to `on_hits(hits, doc_of_window)`.
    `keep(keys)`: a mask of the documents to remember (default: all)."""
    started = time.perf_counter()
    power_tables(CHUNK_TOKENS + max(shingle, 64) + 1)  # grown here, never inside a worker thread
    st = {"pos": 0, "docs": 0, "open_start": None, "open_hash": 0, "open_len": 0}
    keep_tail = shingle - 1 if probe is not None else 0

    def chunks():
        # plain reads, not the memory maps: pages of a mapped 16 GB split would all count as resident
        tail = np.zeros(0, dtype=np.uint16)
        for tokens in shards:
            with open(tokens.filename if isinstance(tokens, np.memmap) else os.devnull, "rb") as f:
                for s in range(0, len(tokens), CHUNK_TOKENS):
                    if isinstance(tokens, np.memmap):
                        f.seek(SHARD_HEADER_BYTES + 2 * s)
                        t = np.fromfile(f, dtype="<u2", count=min(CHUNK_TOKENS, len(tokens) - s))
                    else:
                        t = np.asarray(tokens[s:s + CHUNK_TOKENS])
                    yield t, tail
                    if keep_tail:
                        tail = np.concatenate([tail, t])[-keep_tail:]

    def merge(t_len: int, r: dict, k: int):
        pos, before = st["pos"], st["docs"]  # documents started before this chunk: ids 0..before-1
        b, seg = r["bos"], r["seg"]
        if "bad" in r:
            bad, values = r["bad"], r["bad_values"]
            scan.bad_id_count += len(bad)
            room = max(0, MAX_LISTED - len(scan.bad_ids))
            for p, v in zip(bad[:room].tolist(), values[:room].tolist()):
                j = int(np.searchsorted(b, p, side="right")) - 1
                if j >= 0:
                    doc, at = before + j, p - int(b[j])
                elif st["open_start"] is not None:
                    doc, at = before - 1, pos + p - st["open_start"]
                else:
                    doc, at = None, pos + p  # before the split's first BOS
                scan.bad_ids.append({"id": doc, "position": at, "token": v})
        if r["head"] is not None:
            head_len = int(b[0]) if len(b) else t_len
            if st["open_start"] is None:
                scan.orphan_tokens += head_len
            else:
                shift = pos - k - st["open_start"]  # head's powers start at the tail; the document's at its start
                factor = pow(P, shift, 1 << 64) if shift >= 0 else pow(P_INV, -shift, 1 << 64)
                st["open_hash"] = (st["open_hash"] + int(r["head"]) * factor) & MASK64
                st["open_len"] += head_len
        if "hits" in r and on_hits is not None:
            at, w = r["hits"]
            if len(at):
                on_hits(at, before + np.searchsorted(b, w - k, side="right") - 1)
        if len(b):
            starts, lengths, hashes = pos + b, np.diff(np.append(b, t_len)), seg
            first_id = before
            if st["open_start"] is not None:
                starts = np.concatenate([[st["open_start"]], starts])
                lengths = np.concatenate([[st["open_len"]], lengths])
                hashes = np.concatenate([np.array([st["open_hash"]], dtype=U64), hashes])
                first_id = before - 1
            # the chunk's last document may go on into the next chunk: it stays open
            st["open_start"], st["open_len"], st["open_hash"] = int(starts[-1]), int(lengths[-1]), int(hashes[-1])
            st["docs"] = before + len(b)
            finish(first_id, starts[:-1], lengths[:-1], hashes[:-1])
        st["pos"] = pos + t_len
        if bar is not None:
            bar.update(t_len)

    def finish(first_id, starts, lengths, hashes):
        if not len(starts):
            return
        empty = np.flatnonzero(lengths == 1)
        scan.empty_docs.extend((first_id + empty).tolist())
        keys = doc_key(hashes, lengths)
        mask = keep(keys) if keep is not None else None
        if mask is None:
            scan.ids.append(np.arange(first_id, first_id + len(starts), dtype=np.int64))
            scan.starts.append(starts.astype(np.int64))
            scan.lengths.append(lengths.astype(np.int64))
            scan.keys.append(keys)
        elif mask.any():
            sel = np.flatnonzero(mask)
            scan.ids.append(first_id + sel)
            scan.starts.append(starts[sel].astype(np.int64))
            scan.lengths.append(lengths[sel].astype(np.int64))
            scan.keys.append(keys[sel])

    def consume(n, k, r):
        scan.seconds_exact += r["exact_s"]
        scan.seconds_near += r.get("near_s", 0.0)
        merge(n, r, k)

    if threads <= 1:
        for t, tl in chunks():
            consume(len(t), len(tl), _chunk_work(t, tl, vocab, bos, probe))
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            pending = collections.deque()
            for t, tl in chunks():
                pending.append((len(t), len(tl), pool.submit(_chunk_work, t, tl, vocab, bos, probe)))
                while len(pending) > threads:
                    n, k, fut = pending.popleft()
                    consume(n, k, fut.result())
            while pending:
                n, k, fut = pending.popleft()
                consume(n, k, fut.result())
    if st["open_start"] is not None:
        finish(st["docs"] - 1, np.array([st["open_start"]], dtype=np.int64), np.array([st["open_len"]], dtype=np.int64),
               np.array([st["open_hash"]], dtype=U64))
    scan.tokens = st["pos"]
    scan.docs = st["docs"]
    scan.seconds = time.perf_counter() - started
    return scan


def shard_in_memory(tokens: np.ndarray) -> np.ndarray:
    """A whole shard as an array in memory (read, not mapped)."""
    if isinstance(tokens, np.memmap):
        with open(tokens.filename, "rb") as f:
            f.seek(SHARD_HEADER_BYTES)
            return np.fromfile(f, dtype="<u2", count=len(tokens))
    return np.asarray(tokens)


def read_tokens(shards: list[np.ndarray], start: int, stop: int, offsets: np.ndarray) -> np.ndarray:
    """Tokens [start, stop) of a split's concatenated shards."""
    out, pos = [], start
    while pos < stop:
        s = int(np.searchsorted(offsets, pos, side="right") - 1)
        take = min(stop, int(offsets[s + 1])) - pos
        out.append(np.asarray(shards[s][pos - offsets[s]: pos - offsets[s] + take]))
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------------------------------
# Near overlap: an exact index of the validation shingles


class ShingleIndex:
    """Every validation shingle (a window of n tokens inside one document, BOS excluded) as one sorted uint64: the top
    bits its hash, the low `doc_bits` bits its document. A bitmap of the hashes' top bits filters the training
    shingles first (about 3% of absent ones pass); those that pass are looked up in the sorted array."""

    def __init__(self, val: np.ndarray, doc_starts: np.ndarray, n: int, bos: int, every: int = 1):
        self.n, self.every = n, every
        num_docs = len(doc_starts)
        self.doc_bits = max(1, int(num_docs).bit_length())
        self.doc_mask = U64((1 << self.doc_bits) - 1)
        packed = np.empty(max(len(val) - n + 1, 0), dtype=U64)
        filled = 0
        for s in range(0, len(packed), CHUNK_TOKENS):
            stop = min(len(val), s + CHUNK_TOKENS + n - 1)
            h = shingle_hashes(val[s:stop], n)
            cb = np.zeros(stop - s + 1, dtype=np.int32)
            np.cumsum(val[s:stop] == bos, out=cb[1:])
            ok = (cb[n:n + len(h)] - cb[:len(h)]) == 0  # no BOS inside the window
            ok &= sampled(h, every)
            where = np.flatnonzero(ok)
            doc = np.searchsorted(doc_starts, s + where, side="right") - 1
            where, doc = where[doc >= 0], doc[doc >= 0]  # tokens before the first BOS are in no document
            packed[filled:filled + len(where)] = (h[where] & ~self.doc_mask) | doc.astype(U64)
            filled += len(where)
        self.packed = packed[:filled]  # a view: no copy of the largest array
        self.packed.sort()
        self.per_doc = np.zeros(num_docs, dtype=np.int64)
        for s in range(0, filled, CHUNK_TOKENS):
            self.per_doc += np.bincount((self.packed[s:s + CHUNK_TOKENS] & self.doc_mask).astype(np.int64),
                                        minlength=num_docs)
        self.found = np.zeros(filled, dtype=bool)  # at the first entry of each run of equal hashes
        self.first_train_doc = np.full(filled, -1, dtype=np.int32 if num_docs < 2**31 else np.int64)
        # about 32 bits per indexed value, at most 2^31 bits (256 MiB)
        self.bits = int(min(BITMAP_BITS, max(16, math.ceil(math.log2(max(len(self.packed), 1) * 32)))))
        self.bitmap = np.zeros(1 << (self.bits - 3), dtype=np.uint8)
        for s in range(0, len(self.packed), CHUNK_TOKENS):
            top = self.packed[s:s + CHUNK_TOKENS] >> U64(64 - self.bits)
            byte = (top >> U64(3)).astype(np.int64)
            bit = np.left_shift(np.uint8(1), (top & U64(7)).astype(np.uint8))
            starts = np.concatenate([[0], np.flatnonzero(np.diff(byte)) + 1])  # sorted, so runs of equal bytes
            self.bitmap[byte[starts]] |= np.bitwise_or.reduceat(bit, starts)

    @property
    def size(self) -> int:
        return len(self.packed)

    def probe(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into `packed` of the first entry with the same hash, window start within `tokens`) of every window
        found in the index."""
        h = shingle_hashes(tokens, self.n)
        keep = np.flatnonzero(sampled(h, self.every)) if self.every > 1 else None
        if keep is not None:
            h = h[keep]
        top = h >> U64(64 - self.bits)
        maybe = self.bitmap[top >> U64(3)] >> (top & U64(7)).astype(np.uint8)
        cand = np.flatnonzero(maybe & np.uint8(1))
        if not len(cand) or not len(self.packed):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        values = h[cand] & ~self.doc_mask
        order = np.argsort(values)  # sorted queries: the binary searches stay in cache
        values, cand = values[order], cand[order]
        at = np.searchsorted(self.packed, values)
        at[at == len(self.packed)] = 0
        hit = (self.packed[at] & ~self.doc_mask) == values
        where = cand[hit]
        return at[hit], (keep[where] if keep is not None else where)

    def record(self, at: np.ndarray, train_docs: np.ndarray) -> None:
        """Mark index entries `at` as found in training, in the training documents `train_docs` (merge order)."""
        self.found[at] = True
        fresh = self.first_train_doc[at] < 0
        self.first_train_doc[at[fresh]] = train_docs[fresh]

    def _runs(self, values: np.ndarray):
        """(start, documents, values) per chunk of `packed`, each entry taking the value recorded at the first entry of
        its run of equal hashes (runs may cross chunks)."""
        carry = None
        for s in range(0, len(self.packed), CHUNK_TOKENS):
            chunk = self.packed[s:s + CHUNK_TOKENS]
            hashes = chunk & ~self.doc_mask
            starts = np.empty(len(chunk), dtype=bool)
            starts[0] = s == 0 or hashes[0] != (self.packed[s - 1] & ~self.doc_mask)
            starts[1:] = hashes[1:] != hashes[:-1]
            first = np.maximum.accumulate(np.where(starts, np.arange(len(chunk)), -1))
            local = values[s:s + CHUNK_TOKENS]
            out = np.where(first >= 0, local[np.maximum(first, 0)], carry if carry is not None else local[0])
            carry = out[-1]
            yield (chunk & self.doc_mask).astype(np.int64), out

    def shares(self) -> np.ndarray:
        """Per validation document, the share of its shingles found in training (NaN: no shingle)."""
        hits = np.zeros(len(self.per_doc), dtype=np.float64)
        for docs, found in self._runs(self.found):
            hits += np.bincount(docs, weights=found, minlength=len(self.per_doc))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.per_doc > 0, hits / np.maximum(self.per_doc, 1), np.nan)

    def main_train_docs(self, docs: list[int]) -> dict[int, int | None]:
        """For each validation document, the training document holding most of its shingles found in training."""
        if not docs:
            return {}
        pieces = [(d[np.isin(d, docs)], f[np.isin(d, docs)]) for d, f in self._runs(self.first_train_doc)]
        sel_docs = np.concatenate([p[0] for p in pieces])
        sel_first = np.concatenate([p[1] for p in pieces])
        out = {}
        for d in docs:
            f = sel_first[(sel_docs == d) & (sel_first >= 0)]
            if not len(f):
                out[d] = None
                continue
            values, counts = np.unique(f, return_counts=True)
            out[d] = int(values[np.argmax(counts)])
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Bytes: the project's tables (exact) and the widely copied lookup-table convention


@dataclass
class ConventionTables:
    base_bytes: np.ndarray
    leading_space: np.ndarray
    is_boundary: np.ndarray

    def count(self, prev_ids, ids):
        return self.base_bytes[ids] + (self.leading_space[ids] & ~self.is_boundary[prev_ids])


def convention_tables(sp, exact) -> ConventionTables:
    """The lookup tables of the convention many BPB scripts copy: a piece's UTF-8 length without its leading "▁"
    (any other "▁" counted as its 3 UTF-8 bytes), one space byte for the leading "▁" unless the previous token is a
    boundary (control, unknown, unused); byte-fallback pieces one byte. Built from the project's exact tables
    (data.loader.build_byte_tables), of which it differs in exactly those two rules: an inner "▁" is 1 byte there (it decodes to a space), and the
    leading space is dropped after a boundary only for tokenizers whose decoder strips it."""
    base = exact.base_bytes.copy()
    for token in np.flatnonzero(~exact.is_boundary):
        if not sp.is_byte(int(token)):
            piece = sp.id_to_piece(int(token))
            base[token] += 2 * piece[1 if exact.leading_space[token] else 0:].count("\u2581")  # 3 bytes, not 1
    return ConventionTables(base, exact.leading_space, exact.is_boundary)


def doc_sums(tables, tokens: np.ndarray, starts: np.ndarray, bos: int) -> np.ndarray:
    """Per document [starts[i], starts[i+1]), the sum of tables.count(previous id, id) over its tokens (a BOS counts
    nothing; the token after it follows a boundary), streamed in chunks."""
    n = len(tokens)
    before = np.zeros(len(starts), dtype=np.int64)  # the count of every token before each document's start
    running = 0
    for s in range(0, n, CHUNK_TOKENS):
        e = min(n, s + CHUNK_TOKENS)
        ids = tokens[s:e].astype(np.int64)
        prev = np.empty_like(ids)
        prev[0] = tokens[s - 1] if s else bos
        prev[1:] = ids[:-1]
        cs = np.cumsum(tables.count(prev, ids))
        lo, hi = np.searchsorted(starts, [s, e])
        local = starts[lo:hi] - s
        before[lo:hi] = running + np.where(local > 0, cs[np.maximum(local - 1, 0)], 0)
        running += int(cs[-1])
    return np.diff(np.append(before, running))


# ---------------------------------------------------------------------------------------------------------------------
# Manifests: this project's DATA_DIR/manifest.json, or parameter-golf's datasets/manifest.json one folder up


def read_manifest(data_dir: str) -> tuple[dict | None, str | None, str | None]:
    """(expected counts, path, problem). Unknown fields are ignored."""
    own = os.path.join(data_dir, "manifest.json")
    if os.path.isfile(own):
        try:
            with open(own, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            return None, own, f"unreadable ({e})"
        if not isinstance(m, dict):
            return None, own, "not a JSON object"
        out = {"kind": "project"}
        splits = m.get("splits") if isinstance(m.get("splits"), dict) else {}
        for split in ("val", "train"):
            s = splits.get(split)
            if not isinstance(s, dict):
                continue
            for key in ("documents", "tokens", "decoded_bytes", "bytes", "documents_not_round_trip"):
                if isinstance(s.get(key), int):
                    out[f"{split}_{key}"] = s[key]
            if isinstance(s.get("files"), list):
                files = {f.get("name"): f for f in s["files"] if isinstance(f, dict) and f.get("name")}
                out[f"{split}_files"] = files
        tok = m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {}
        if isinstance(tok.get("sha256"), str):
            out["tokenizer_sha256"] = tok["sha256"]
        if isinstance(tok.get("vocab_size"), int):
            out["vocab_size"] = tok["vocab_size"]
        params = m.get("parameters") if isinstance(m.get("parameters"), dict) else {}
        out["val_selection"] = next((v for k, v in params.items() if "select" in k and isinstance(v, str)), None)
        if isinstance(params.get("val_docs"), int):
            out["val_docs"] = params["val_docs"]
        inp = m.get("input") if isinstance(m.get("input"), dict) else {}
        if isinstance(inp.get("documents"), int):
            out["input_documents"] = inp["documents"]
        return out, own, None
    parent = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "manifest.json")
    if os.path.isfile(parent):
        try:
            with open(parent, encoding="utf-8") as f:
                m = json.load(f)
            entry = next((d for d in m.get("datasets", []) if isinstance(d, dict)
                          and d.get("name") == os.path.basename(os.path.abspath(data_dir))), None)
        except (OSError, ValueError, AttributeError) as e:
            return None, parent, f"unreadable ({e})"
        if entry is None:
            return None, None, None
        stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
        out = {"kind": "parameter-golf"}
        for ours, theirs in (("val_documents", "docs_val"), ("val_tokens", "tokens_val"),
                             ("train_documents", "docs_train"), ("train_tokens", "tokens_train"),
                             ("val_file_count", "files_val"), ("train_file_count_total", "files_train")):
            if isinstance(stats.get(theirs), int):
                out[ours] = stats[theirs]
        return out, parent, None
    return None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Claims


@dataclass
class Claim:
    source: str  # e.g. "train.log", "submission.json seed 2"
    loss: float | None  # mean nats per scored token
    bpb: float
    docs: int | None = None  # the first N validation documents (None: all)
    tokens: int | None = None
    bytes: int | None = None
    loss_decimals: int = 12
    bpb_decimals: int = 12
    rows: list | None = None  # eval_ttt.py per-document rows


def _float_decimals(value: float) -> int:
    """Decimals a submission.json number carries: those of its repr, and at least the 8 that train_gpt.py's logs
    print (2.5 in a JSON file was 2.50000000 in the log)."""
    return min(max(printed_decimals(repr(float(value))), 8), 12)


_KV = re.compile(r"(\w+):(\S+)")


def parse_claim(path: str) -> list[Claim]:
    name = os.path.basename(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    text = data.decode("utf-8", errors="replace")
    if path.endswith(".json") or text.lstrip().startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        return _json_claims(obj, name, path)
    # a training log of any dialect (speedrun.analysis.run_log): its scored line is its last final evaluation (ours: the
    # `final` line; parameter-golf's: the last round trip, sliding window or TTT line, never a step or diagnostic)
    scored = read_run(path).scored
    if scored is None or scored.val_bpb is None:
        raise UsageError(f"{path}: no `final val_loss:... val_bpb:...` line or other final evaluation (a training "
                         "log), and not a results or submission JSON")
    ours = data.startswith(b"#### file ")
    claim = Claim(name if scored.label == "final" else f"{name} ({scored.label})", scored.val_loss, scored.val_bpb,
                  loss_decimals=_float_decimals(scored.val_loss) if ours else printed_decimals(scored.loss_text),
                  bpb_decimals=_float_decimals(scored.val_bpb) if ours else printed_decimals(scored.bpb_text))
    if scored.label != "final":
        return [claim]
    # our `final` line names its mode; that mode's `final_eval` line says what was scored
    mode = dict(_KV.findall([ln for ln in text.split("\n") if ln.startswith("final ")][-1])).get("mode")
    evals = [dict(_KV.findall(ln)) for ln in text.split("\n") if ln.startswith("final_eval ")]
    match = [e for e in evals if e.get("mode") == mode] if mode else []
    hp = dict(re.findall(r"^hparam (\w+)=(\S*)$", text, flags=re.M))
    if match:
        e = match[-1]
        for key in ("docs", "tokens", "bytes"):
            if e.get(key, "").isdigit():
                setattr(claim, key, int(e[key]))
    elif hp.get("val_max_docs", "0").isdigit() and int(hp.get("val_max_docs", "0")) > 0:
        claim.docs = int(hp["val_max_docs"])
    return [claim]


def _json_claims(obj, name: str, path: str) -> list[Claim]:
    if isinstance(obj, list):  # an eval_ttt.py sweep: one results object per configuration
        out = []
        for i, item in enumerate(obj):
            out.extend(_json_claims(item, f"{name}[{i}]", path))
        if not out:
            raise UsageError(f"{path}: an empty list")
        return out
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a results JSON (eval_ttt.py) or a submission.json")
    if isinstance(obj.get("docs"), list) and "bpb" in obj:
        rows = obj["docs"]
        try:
            rows = [{"id": int(r["id"]), "tokens": int(r["tokens"]), "bytes": int(r["bytes"]),
                     "nats": float(r["nats"])} for r in rows]
            bpb = float(obj["bpb"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: a `docs` row lacks id, tokens, bytes or nats") from None
        loss = obj.get("loss")
        return [Claim(name, float(loss) if isinstance(loss, (int, float)) else None, bpb, docs=len(rows),
                      tokens=obj.get("tokens") if isinstance(obj.get("tokens"), int) else None,
                      bytes=obj.get("bytes") if isinstance(obj.get("bytes"), int) else None, rows=rows)]
    if isinstance(obj.get("seeds"), list) and "val_bpb" in obj:
        ev = obj.get("evaluation") if isinstance(obj.get("evaluation"), dict) else {}
        out = []
        for s in obj["seeds"]:
            try:
                loss, bpb = float(s["val_loss"]), float(s["val_bpb"])
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"{path}: a `seeds` entry lacks val_loss or val_bpb") from None
            out.append(Claim(f"{name} seed {s.get('seed')}", loss, bpb,
                             docs=ev.get("docs") if isinstance(ev.get("docs"), int) else None,
                             tokens=ev.get("tokens") if isinstance(ev.get("tokens"), int) else None,
                             bytes=ev.get("bytes") if isinstance(ev.get("bytes"), int) else None,
                             loss_decimals=_float_decimals(loss), bpb_decimals=_float_decimals(bpb)))
        er = obj.get("eval_results")
        if isinstance(er, dict) and all(isinstance(er.get(k), (int, float)) for k in ("bpb", "loss")):
            out.append(Claim(f"{name} eval_results", float(er["loss"]), float(er["bpb"]),
                             docs=er.get("docs") if isinstance(er.get("docs"), int) else None,
                             tokens=er.get("tokens") if isinstance(er.get("tokens"), int) else None,
                             bytes=er.get("bytes") if isinstance(er.get("bytes"), int) else None))
        if not out:
            raise UsageError(f"{path}: no seeds")
        return out
    raise UsageError(f"{path}: not a results JSON of eval_ttt.py (`docs` rows and `bpb`) nor a submission.json "
                     "(`seeds` and `val_bpb`)")


# ---------------------------------------------------------------------------------------------------------------------
# The audit


@dataclass
class Check:
    name: str
    status: str  # ok | fault | info | skipped
    summary: str
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        word = {"ok": "ok", "fault": "FAULT", "info": "info", "skipped": "skipped"}[self.status]
        return f"{self.name:<13} {word}: {self.summary}"


def _ids(ids, total: int | None = None) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:SHOWN])
    more = len(ids) - SHOWN if total is None else total - min(len(ids), SHOWN)
    return shown + (f" and {more} more" if more > 0 else "")


def _snippet(a: str, b: str) -> dict:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 20)
    return {"at_char": i, "text": a[lo:i + 40], "decoded": b[lo:i + 40]}


def fmt(n: int) -> str:
    return f"{n:,}"


class Auditor:
    def __init__(self, args):
        self.args = args
        self.checks: list[Check] = []
        self.timings: dict[str, float] = {}

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    # -- setup ---------------------------------------------------------------------------------------------------------

    def setup(self):
        a = self.args
        self.data_dir = a.data_dir
        if not os.path.isdir(a.data_dir):
            raise UsageError(f"{a.data_dir}: not a directory")
        self.tokenizer_path = a.tokenizer or os.path.join(a.data_dir, "tokenizer.model")
        if a.tokenizer is None and not os.path.isfile(self.tokenizer_path):
            raise UsageError(f"{self.tokenizer_path}: tokenizer file not found (give --tokenizer)")
        try:
            self.sp = load_tokenizer(self.tokenizer_path)
        except DataError as e:
            raise UsageError(str(e)) from None
        self.tokenizer_sha256 = sha256_file(self.tokenizer_path)
        self.bos = BOS_ID
        if self.sp.bos_id() != self.bos:
            raise UsageError(f"{self.tokenizer_path}: the tokenizer's BOS id is {self.sp.bos_id()}, shards need "
                             f"{self.bos}")
        self.vocab = a.vocab_size or self.sp.vocab_size()
        self.val_files = split_files(a.data_dir, "val")  # without the byte sidecars (*_val_bytes_*.bin)
        self.train_files = split_files(a.data_dir, "train")
        if not self.val_files:
            raise UsageError(f"{a.data_dir}: no *_val_*.bin shards")
        self.manifest, self.manifest_path, self.manifest_problem = read_manifest(a.data_dir)
        # exact tables (the project's), sized to every uint16 id: ids past the tokenizer count 0 bytes
        self.tables = build_byte_tables(self.sp, 1 << 16, self.tokenizer_path)
        self.convention = convention_tables(self.sp, self.tables)
        # a CaseOps tokenizer (its operators are pieces): the texts are compared through the transform
        self.caseops = self.tables.has_caseops
        self.sidecar_sums = None  # per validation document, when the dataset has a byte sidecar

    # -- passes --------------------------------------------------------------------------------------------------------

    def run(self) -> list[Check]:
        from tqdm import tqdm

        a = self.args
        self.setup()
        self.val_scan = SplitScan("val")
        val_shards = open_shards(self.val_files, self.val_scan)
        self.train_scan = SplitScan("train")
        train_shards = open_shards(self.train_files, self.train_scan)
        total = sum(len(s) for s in val_shards) + sum(len(s) for s in train_shards)
        with tqdm(total=total, unit="tok", unit_scale=True, desc="audit", file=sys.stderr, disable=None,
                  mininterval=1.0) as bar:
            scan_split(val_shards, self.val_scan, self.vocab, self.bos, threads=a.threads, bar=bar)
            self.val = np.concatenate([shard_in_memory(s) for s in val_shards]) if val_shards else \
                np.zeros(0, dtype=np.uint16)
            _, self.val_starts, self.val_lengths, self.val_keys = self.val_scan.doc_table()
            t0 = time.perf_counter()
            self.index = None
            if a.shingle > 0 and train_shards:
                self.index = ShingleIndex(self.val, self.val_starts, a.shingle, self.bos, a.shingle_sample)
            self.timings["near_index_s"] = time.perf_counter() - t0
            val_keys = np.sort(self.val_keys)

            def keep(keys):  # only training documents whose key is a validation document's are remembered
                at = np.searchsorted(val_keys, keys)
                at[at == len(val_keys)] = 0
                return val_keys[at] == keys if len(val_keys) else np.zeros(len(keys), dtype=bool)

            scan_split(train_shards, self.train_scan, self.vocab, self.bos, keep=keep,
                       probe=self.index.probe if self.index is not None else None,
                       on_hits=self.index.record if self.index is not None else None,
                       shingle=a.shingle, threads=a.threads, bar=bar)
        self.structure()
        self.overlap(train_shards)
        self.near_overlap()
        self.bytes_check()
        self.sidecar_check()
        self.texts_check()
        self.completeness()
        self.claims_check()
        return self.checks

    # -- checks --------------------------------------------------------------------------------------------------------

    def structure(self):
        faults = []
        details: dict = {"vocab_size": self.vocab, "tokenizer_sha256": self.tokenizer_sha256}
        for scan in (self.val_scan, self.train_scan):
            d = {"shards": len(scan.files), "documents": scan.docs, "tokens": scan.tokens,
                 "bad_shards": scan.bad_files, "tokens_before_first_bos": scan.orphan_tokens,
                 "empty_documents": [{"id": i} for i in scan.empty_docs],
                 "ids_beyond_vocab": scan.bad_id_count,
                 "ids_beyond_vocab_at": scan.bad_ids}
            details[scan.name] = d
            for bad in scan.bad_files:
                faults.append(f"{bad['problem']}")
            if scan.orphan_tokens:
                faults.append(f"{scan.name} starts with {fmt(scan.orphan_tokens)} tokens before its first BOS "
                              "(a document without BOS)")
            if scan.empty_docs:
                faults.append(f"{len(scan.empty_docs)} empty {scan.name} documents (id {_ids(scan.empty_docs)})")
            if scan.bad_id_count:
                where = ", ".join(f"id {d['id']} position {d['position']}" for d in scan.bad_ids[:SHOWN])
                faults.append(f"{fmt(scan.bad_id_count)} {scan.name} tokens >= vocab size {self.vocab} ({where}"
                              f"{' ...' if scan.bad_id_count > SHOWN else ''})")
        m = self.manifest
        if self.manifest_problem:
            faults.append(f"{self.manifest_path}: {self.manifest_problem}")
        if m:
            details["manifest"] = self.manifest_path
            # parameter-golf's counts cover all its training shards, of which one may download fewer
            partial = m.get("kind") == "parameter-golf" and m.get("train_file_count_total") != len(self.train_files)
            for scan in (self.val_scan, self.train_scan):
                for key, have in (("documents", scan.docs), ("tokens", scan.tokens)):
                    want = None if partial and scan.name == "train" else m.get(f"{scan.name}_{key}")
                    if want is not None and want != have:
                        faults.append(f"{scan.name} has {fmt(have)} {key}, the manifest says {fmt(want)}")
                files = m.get(f"{scan.name}_files")
                if files is not None:
                    present = {os.path.basename(p) for p in scan.files} | {b["file"] for b in scan.bad_files}
                    for fname in sorted(set(files) - present):
                        faults.append(f"{scan.name} shard {fname} named in the manifest is missing")
                    for fname in sorted(present - set(files)):
                        faults.append(f"{scan.name} shard {fname} is not in the manifest")
                    for fname, have in scan.file_tokens.items():
                        want = files.get(fname, {}).get("tokens")
                        if isinstance(want, int) and want != have:
                            faults.append(f"{fname} has {fmt(have)} tokens, the manifest says {fmt(want)}")
                        elif scan.name == "val" and isinstance(files.get(fname, {}).get("sha256"), str):
                            # the validation shards are small enough to hash: a changed token shows too
                            path = os.path.join(self.data_dir, fname)
                            if sha256_file(path) != files[fname]["sha256"]:
                                faults.append(f"{fname}: sha256 differs from the manifest's")
            if m.get("val_file_count") is not None and m["val_file_count"] != len(self.val_files):
                faults.append(f"{len(self.val_files)} val shards, the manifest says {m['val_file_count']}")
            if m.get("tokenizer_sha256") and m["tokenizer_sha256"] != self.tokenizer_sha256:
                faults.append(f"tokenizer sha256 {self.tokenizer_sha256[:12]}... is not the manifest's "
                              f"{m['tokenizer_sha256'][:12]}...")
        v, t = self.val_scan, self.train_scan
        summary = (f"val {fmt(v.docs)} documents {fmt(v.tokens)} tokens in {len(v.files)} shard(s); train "
                   f"{fmt(t.docs)} documents {fmt(t.tokens)} tokens in {len(t.files)} shard(s)")
        if faults:
            self.add(Check("structure", "fault", "; ".join(faults[:6]) + (f"; {len(faults) - 6} more" if len(faults) > 6
                                                                          else "") + f" ({summary})",
                           {**details, "faults": faults}))
        else:
            extra = ", manifest agrees" if m else ", no manifest"
            self.add(Check("structure", "ok", summary + extra, details))

    def overlap(self, train_shards):
        if not train_shards:
            self.add(Check("overlap", "skipped", "no training shards"))
            return
        t_ids, t_starts, t_lengths, t_keys = self.train_scan.doc_table()  # only those whose key is a val key
        order = np.argsort(self.val_keys, kind="stable")
        sorted_keys = self.val_keys[order]
        at = np.searchsorted(sorted_keys, t_keys)
        at[at == len(sorted_keys)] = 0
        cand = np.flatnonzero(sorted_keys[at] == t_keys) if len(sorted_keys) else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in train_shards])]).astype(np.int64)
        pairs: dict[int, list[int]] = {}
        for ti in cand.tolist():
            key = t_keys[ti]
            lo = int(np.searchsorted(sorted_keys, key, side="left"))
            hi = int(np.searchsorted(sorted_keys, key, side="right"))
            train_doc = read_tokens(train_shards, int(t_starts[ti]), int(t_starts[ti] + t_lengths[ti]), offsets)
            for vi in order[lo:hi].tolist():
                s, n = int(self.val_starts[vi]), int(self.val_lengths[vi])
                if n == len(train_doc) and np.array_equal(self.val[s:s + n], train_doc):
                    pairs.setdefault(vi, []).append(int(t_ids[ti]))
        docs = [{"id": vi, "train_ids": pairs[vi]} for vi in sorted(pairs)]
        secs = self.train_scan.seconds_exact + self.val_scan.seconds_exact
        details = {"documents": docs, "count": len(docs),
                   "exact_hash_seconds": round(secs, 3)}
        if docs:
            shown = ", ".join(f"val {d['id']} = train {d['train_ids'][0]}" for d in docs[:SHOWN])
            self.add(Check("overlap", "fault", f"{len(docs)} of {fmt(len(self.val_keys))} validation documents are "
                                               f"exact copies of training documents ({shown}"
                                               f"{' ...' if len(docs) > SHOWN else ''})", details))
        else:
            self.add(Check("overlap", "ok", f"no validation document is an exact copy of a training document "
                                            f"({fmt(len(self.val_keys))} against {fmt(self.train_scan.docs)})",
                           details))

    def near_overlap(self):
        a = self.args
        if self.index is None:
            self.add(Check("near-overlap", "skipped", "no training shards" if a.shingle > 0 else "--shingle 0"))
            return
        shares = self.index.shares()
        flagged = [int(i) for i in np.flatnonzero(np.nan_to_num(shares, nan=0.0) > a.threshold)]
        main = self.index.main_train_docs(flagged)
        rows = [{"id": i, "share": round(float(shares[i]), 6), "shingles": int(self.index.per_doc[i]),
                 "train_id": main[i]} for i in flagged]
        no_shingle = int(np.isnan(shares).sum())
        with np.errstate(invalid="ignore"):
            mean_share = float(np.nanmean(shares)) if np.isfinite(shares).any() else 0.0
        sampled_note = f", 1 shingle in {a.shingle_sample} indexed" if a.shingle_sample > 1 else ""
        details = {"n": a.shingle, "threshold": a.threshold, "sample_every": a.shingle_sample,
                   "documents": rows, "count": len(rows), "mean_share": mean_share,
                   "documents_without_shingles": no_shingle,
                   "shares": [None if math.isnan(x) else round(float(x), 6) for x in shares],
                   "index_shingles": self.index.size, "probe_seconds": round(self.train_scan.seconds_near, 3)}
        if rows:
            shown = ", ".join(f"val {r['id']}: {r['share']:.0%}" + (f" (train {r['train_id']})"
                                                                     if r["train_id"] is not None else "")
                              for r in sorted(rows, key=lambda r: -r["share"])[:SHOWN])
            self.add(Check("near-overlap", "fault", f"{len(rows)} of {len(shares)} validation documents have more than "
                                                    f"{a.threshold:.0%} of their {a.shingle}-token shingles in "
                                                    f"training ({shown}{' ...' if len(rows) > SHOWN else ''})",
                           details))
        else:
            self.add(Check("near-overlap", "ok", f"no validation document has more than {a.threshold:.0%} of its "
                                                 f"{a.shingle}-token shingles in training (mean share "
                                                 f"{mean_share:.2%}{sampled_note})", details))

    def _doc_tokens(self, i: int) -> np.ndarray:
        s = int(self.val_starts[i])
        return self.val[s:s + int(self.val_lengths[i])]

    def bytes_check(self):
        starts = self.val_starts
        val = self.val
        n = len(starts)
        if n == 0:
            self.add(Check("bytes", "fault", "the validation split has no documents"))
            self.doc_bytes = np.zeros(0, dtype=np.int64)
            self.conv_bytes = np.zeros(0, dtype=np.int64)
            return
        self.doc_bytes = doc_sums(self.tables, val, starts, self.bos)
        self.conv_bytes = doc_sums(self.convention, val, starts, self.bos)
        # decode every document (BOS dropped) and compare with the tables
        decoded_bytes = np.zeros(n, dtype=np.int64)
        undecodable = []
        threads = max(1, os.cpu_count() or 1)
        batch: list[int] = []
        batch_tokens = 0

        def flush():
            lists = [self._doc_tokens(i)[1:].tolist() for i in batch]
            texts = self.sp.decode(lists, num_threads=threads)
            for i, text in zip(batch, texts):
                decoded_bytes[i] = len(text.encode("utf-8"))
            batch.clear()

        from tqdm import tqdm

        with tqdm(total=len(val), unit="tok", unit_scale=True, desc="decode val", file=sys.stderr, disable=None,
                  mininterval=1.0) as bar:
            for i in range(n):
                doc = self._doc_tokens(i)
                if len(doc) and int(doc.max()) >= self.sp.vocab_size():
                    undecodable.append(i)  # an id past the tokenizer (a structural fault): decode would fail
                    continue
                batch.append(i)
                batch_tokens += len(doc)
                if batch_tokens >= (1 << 21):
                    flush()
                    bar.update(batch_tokens)
                    batch_tokens = 0
            if batch:
                flush()
            bar.update(batch_tokens)
        skip = set(undecodable)
        bad = [i for i in range(n) if i not in skip and decoded_bytes[i] != self.doc_bytes[i]]
        total = int(self.doc_bytes.sum())
        scored = int((self.val_lengths - 1).sum())
        per_byte = scored / max(total, 1)
        self.scored_tokens = scored
        details = {"bytes": total, "tokens": scored, "documents": n, "tokens_per_byte": per_byte,
                   "val_bpb_per_val_loss": per_byte / math.log(2),
                   "mismatches": [{"id": i, "tables": int(self.doc_bytes[i]), "decoded": int(decoded_bytes[i])}
                                  for i in bad],
                   "undecodable": [{"id": i} for i in undecodable]}
        self.bytes_details = details
        if bad:
            self.add(Check("bytes", "fault", f"{len(bad)} of {n} documents: the byte tables disagree with "
                                             f"len(decode(ids)) (id {_ids(bad)})", details))
        else:
            extra = f" ({len(undecodable)} with ids beyond the tokenizer not decoded)" if undecodable else ""
            what = (" (of the CaseOps text the tokens decode to; bits per byte counts the original's: the sidecar)"
                    if self.caseops else f"; {per_byte:.6f} tokens/byte: val_bpb = val_loss x {per_byte / math.log(2):.6f}")
            self.add(Check("bytes", "ok", f"{fmt(total)} bytes in {fmt(n)} documents, tables == len(decode) for every "
                                          f"document{extra}{what}", details))
        # the convention
        conv_total = int(self.conv_bytes.sum())
        diff = conv_total - total
        rel = total / conv_total - 1 if conv_total else math.nan  # BPB with conv bytes = exact BPB x (total/conv)
        docs_off = np.flatnonzero(self.conv_bytes != self.doc_bytes).tolist()
        cdetails = {"bytes": conv_total, "exact_bytes": total, "difference_bytes": diff,
                    "bpb_relative_error": rel, "bpb_error_at_1_bpb": rel,
                    "documents": [{"id": i, "convention": int(self.conv_bytes[i]), "exact": int(self.doc_bytes[i])}
                                  for i in docs_off]}
        self.conv_details = cdetails
        if diff == 0:
            self.add(Check("convention", "info", f"the lookup-table convention counts exactly these {fmt(total)} bytes "
                                                 "on this tokenizer and data (0 bytes off)", cdetails))
        else:
            self.add(Check("convention", "info", f"the lookup-table convention counts {fmt(conv_total)} bytes, "
                                                 f"{diff:+,} ({diff / total:+.3%}) in {len(docs_off)} documents (id "
                                                 f"{_ids(docs_off)}): it would report val_bpb x {1 + rel:.6f}, "
                                                 f"{rel:+.6f} per 1.0 of BPB", cdetails))

    def sidecar_check(self):
        """The byte sidecar (*_val_bytes_*.bin), when the dataset has one: its structure (the loader's checks), per
        document acting CaseOps operators at 0 bytes and, for a lossless tokenizer, the sum against what the tokens
        stand for; its sums then are the exact bytes of the claim and completeness checks (texts: against the text)."""
        if not any(glob.glob(os.path.join(self.data_dir, "*_val_bytes_*.bin"))):
            if self.caseops and len(self.val_starts):  # as data.loader.document_bytes counts them then
                derived = np.add.reduceat(token_original_bytes(self.tables, self.val), self.val_starts)
                self.doc_bytes = derived
                self.add(Check("sidecar", "info", f"a CaseOps tokenizer without a byte sidecar: {fmt(int(derived.sum()))}"
                                                  " bytes, what the tokens stand for with every operator at 0 bytes "
                                                  "(the loader's count)", {"bytes": int(derived.sum())}))
            return
        n = len(self.val_starts)
        try:
            sidecar = load_sidecar(TokenStream(split_pattern(self.data_dir, "val"), 1 << 16))
        except DataError as e:
            self.add(Check("sidecar", "fault", str(e)))
            return
        if sidecar is None or len(sidecar) != len(self.val) or n == 0:
            self.add(Check("sidecar", "fault", f"{self.data_dir}: the sidecar files do not cover the validation split"))
            return
        counts = sidecar.astype(np.int64)
        sums = np.add.reduceat(counts, self.val_starts)
        derived = np.add.reduceat(token_original_bytes(self.tables, self.val), self.val_starts)
        acting = acting_operators(self.tables, self.val)
        op_docs = np.unique(np.searchsorted(self.val_starts, np.flatnonzero(acting & (counts != 0)), side="right") - 1)
        off = np.flatnonzero(sums != derived)
        total = int(sums.sum())
        scored = int((self.val_lengths - 1).sum())
        details = {"bytes": total, "tables_bytes": int(self.doc_bytes.sum()), "operators": int(acting.sum()),
                   "tokens_per_byte": scored / max(total, 1), "lossless_tokenizer": self.tables.lossless,
                   "operator_bytes_documents": op_docs.tolist(),
                   "differs_from_tokens": [{"id": int(i), "sidecar": int(sums[i]), "tokens": int(derived[i])}
                                           for i in off[:MAX_LISTED]]}
        self.sidecar_sums = sums
        self.doc_bytes = sums  # the claim and completeness checks count the sidecar's bytes
        if len(op_docs):
            self.add(Check("sidecar", "fault", f"CaseOps operators count bytes in {len(op_docs)} documents (id "
                                               f"{_ids(op_docs.tolist())}): an operator stands for 0 bytes", details))
        elif len(off) and self.tables.lossless:
            self.add(Check("sidecar", "fault", f"{len(off)} of {n} documents: the sidecar's sum differs from the bytes "
                                               f"their tokens stand for (id {_ids(off.tolist())}; e.g. "
                                               f"{int(sums[off[0]])} against {int(derived[off[0]])})", details))
        else:
            lossy = (f"; the tokenizer is lossy, so {len(off)} documents' sums are checked against their texts only"
                     f" (--texts)" if len(off) else "")
            self.add(Check("sidecar", "ok", f"{fmt(total)} bytes in {fmt(n)} documents ({fmt(int(acting.sum()))} "
                                            f"operators at 0 bytes); {scored / max(total, 1):.6f} tokens/byte: val_bpb "
                                            f"= val_loss x {scored / max(total, 1) / math.log(2):.6f}{lossy}", details))

    def to_model(self, text: str) -> str:
        """The text the tokenizer read: CaseOps-encoded for a CaseOps tokenizer."""
        return caseops.encode(text) if self.caseops else text

    def from_model(self, decoded: str) -> str | None:
        """The original text of a decoded document (None: not a CaseOps string)."""
        if not self.caseops:
            return decoded
        try:
            return caseops.decode(decoded)
        except caseops.CaseOpsError:
            return None

    def texts_check(self):
        a = self.args
        if not a.texts:
            return
        from data import prepare_corpus

        n = len(self.val_starts)
        m = self.manifest or {}
        selection = m.get("val_selection") or "first"
        try:
            kind = prepare_corpus.input_kind(a.texts)
            positions = None
            if selection == "first":
                positions = range(n)
            elif hasattr(prepare_corpus, "validation_positions") and m.get("input_documents") and m.get("val_docs"):
                try:
                    positions = prepare_corpus.validation_positions(m["input_documents"], m["val_docs"], selection)
                except ValueError:
                    positions = None
            if positions is None:  # a selection this tool cannot place: find the texts by their encodings
                self._texts_by_content(prepare_corpus.iter_documents(a.texts, kind), selection)
                return
            wanted = {p: k for k, p in enumerate(positions)}
            last = max(positions, default=-1)
            equal, lossy, faults = 0, [], []
            threads = max(1, os.cpu_count() or 1)
            picked: list[tuple[int, str]] = []  # (validation id, text), in order, with one of lookahead
            seen = 0
            for j, (text, _) in enumerate(prepare_corpus.iter_documents(a.texts, kind)):
                seen = j + 1
                if j in wanted:
                    picked.append((wanted[j], text))
                    if len(picked) > 256:
                        equal += self._compare_texts(picked[:-1], picked[-1], lossy, faults, threads, n)
                        picked = picked[-1:]
                if j >= last:
                    break
            equal += self._compare_texts(picked, None, lossy, faults, threads, n)
        except prepare_corpus.PrepareError as e:
            raise UsageError(str(e)) from None
        found_texts = sum(1 for p in positions if p < seen)
        if found_texts < min(n, len(positions)):
            faults.append({"id": found_texts, "problem": f"the input has only {seen} documents"})
        where = f"the first {n} input texts" if selection == "first" else f"their input texts (selection {selection})"
        details = {"input": a.texts, "selection": selection, "equal": equal, "lossy": lossy, "lossy_count": len(lossy),
                   "faults": faults, "input_index": [{"id": k, "input": p} for k, p in enumerate(positions)][:n]}
        if faults:
            shown = "; ".join(f"val {f['id']}: {f['problem']}" for f in faults[:3])
            self.add(Check("texts", "fault", f"{len(faults)} of {n} validation documents are not the encoding of their "
                                             f"input text ({shown}{' ...' if len(faults) > 3 else ''})", details))
        elif lossy:
            ex = lossy[0]
            self.add(Check("texts", "info", f"lossy tokenizer: {len(lossy)} of {n} documents do not decode back to "
                                            f"their text, whose exact encoding they are (e.g. val {ex['id']} at char "
                                            f"{ex['at_char']}: {ex['text'][:30]!r} -> {ex['decoded'][:30]!r}); "
                                            f"{equal} equal", details))
        else:
            self.add(Check("texts", "ok", f"all {n} decoded validation documents equal {where}", details))

    def _compare_texts(self, batch, after, lossy, faults, threads, n) -> int:
        """Compare validation documents with their texts: batch [(id, text)], `after` the (id, text) that follows."""
        equal = 0
        in_val = [(i, t) for i, t in batch if i < n]
        if not in_val:
            return 0
        docs = {i: self._doc_tokens(i) for i, _ in in_val}
        decodable = [i for i, _ in in_val if not len(docs[i]) or int(docs[i].max()) < self.sp.vocab_size()]
        decoded = dict(zip(decodable, (self.from_model(t) for t in
                                       self.sp.decode([docs[i][1:].tolist() for i in decodable], num_threads=threads))))
        following = dict(batch + ([after] if after else []))
        for i, text in in_val:
            if self.sidecar_sums is not None and int(self.sidecar_sums[i]) != len(text.encode("utf-8")):
                faults.append({"id": i, "problem": f"the sidecar counts {int(self.sidecar_sums[i])} bytes, its text "
                                                   f"has {len(text.encode('utf-8'))}"})
                continue
            if i in decoded and decoded[i] == text:
                equal += 1
                continue
            ids = np.asarray(self.sp.encode(self.to_model(text)), dtype=np.int64)
            have = docs[i][1:].astype(np.int64)
            if np.array_equal(ids, have):
                lossy.append({"id": i, **_snippet(text, decoded.get(i) or "")} if len(lossy) < 1000 else {"id": i})
                continue
            if len(have) < len(ids) and np.array_equal(ids[:len(have)], have):
                problem = f"truncated: {len(have)} of its text's {len(ids)} tokens"
            elif len(have) > len(ids) and np.array_equal(have[:len(ids)], ids):
                nxt = following.get(i + 1)
                runs = ""
                if nxt is not None:
                    nxt_ids = np.asarray(self.sp.encode(self.to_model(nxt)), dtype=np.int64)
                    rest = have[len(ids):]
                    if np.array_equal(rest[:len(nxt_ids)], nxt_ids[:len(rest)]):
                        runs = f": those of validation document {i + 1}'s text, so the BOS before it is missing"
                problem = f"runs on past its text by {len(have) - len(ids)} tokens{runs}"
            else:
                k = min(len(ids), len(have))
                differ = int(np.argmax(ids[:k] != have[:k])) if k and (ids[:k] != have[:k]).any() else k
                problem = f"differs from the encoding of its text from token {differ + 1} on"
            faults.append({"id": i, "problem": problem})
        return equal

    def _texts_by_content(self, texts, selection):
        """Validation documents chosen other than as the first N (the manifest names the selection): find each one's
        text by the hash of its encoding."""
        n = len(self.val_starts)
        want = {}
        for i in range(n):
            want.setdefault(int(self.val_keys[i]), []).append(i)
        found: dict[int, int] = {}
        lossy, equal, sidecar_off = [], 0, []
        for j, (text, _) in enumerate(texts):
            ids = np.asarray([self.bos] + self.sp.encode(self.to_model(text)), dtype=np.int64)
            key = int(doc_key(np.array([_plain_hash(ids)], dtype=U64), np.array([len(ids)]))[0])
            for i in want.get(key, []):
                if i not in found and np.array_equal(self._doc_tokens(i), ids):
                    found[i] = j
                    if self.sidecar_sums is not None and int(self.sidecar_sums[i]) != len(text.encode("utf-8")):
                        sidecar_off.append(i)
                    decoded = self.from_model(self.sp.decode(ids[1:].tolist())) or ""
                    if decoded == text:
                        equal += 1
                    else:
                        lossy.append({"id": i, "input": j, **_snippet(text, decoded)})
                    break
        missing = [i for i in range(n) if i not in found]
        details = {"input": self.args.texts, "selection": selection, "equal": equal, "lossy": lossy,
                   "input_index": [{"id": i, "input": found[i]} for i in sorted(found)],
                   "faults": [{"id": i, "problem": "no input text encodes to it"} for i in missing]
                   + [{"id": i, "problem": "the sidecar's sum differs from its text's bytes"} for i in sidecar_off]}
        if sidecar_off:
            self.add(Check("texts", "fault", f"{len(sidecar_off)} of {n} validation documents: the sidecar's sum "
                                             f"differs from the UTF-8 length of its text (id {_ids(sidecar_off)})",
                           details))
        elif missing:
            self.add(Check("texts", "fault", f"{len(missing)} of {n} validation documents are the encoding of no input "
                                             f"text (id {_ids(missing)}; selection {selection})", details))
        elif lossy:
            self.add(Check("texts", "info", f"lossy tokenizer: {len(lossy)} of {n} documents do not decode back to "
                                            f"their text (selection {selection})", details))
        else:
            self.add(Check("texts", "ok", f"all {n} decoded validation documents equal their input texts (selection "
                                          f"{selection}, matched by content)", details))

    def completeness(self):
        m = self.manifest or {}
        n, tokens = len(self.val_starts), self.val_scan.tokens
        want_docs, want_tokens = m.get("val_documents"), m.get("val_tokens")
        want_bytes = m.get("val_decoded_bytes")
        total = int(self.doc_bytes.sum())
        if want_docs is None and want_tokens is None:
            self.add(Check("completeness", "skipped", "no manifest counts to compare the validation split with"))
            return
        faults, named = [], []
        if want_tokens is not None and tokens < want_tokens:
            missing = want_tokens - tokens
            if want_docs is None or n == want_docs:
                named.append(n - 1)
                faults.append(f"the last validation document (id {n - 1}) is truncated: {fmt(missing)} tokens "
                              f"missing")
            else:
                faults.append(f"{fmt(missing)} validation tokens missing ({fmt(tokens)} of {fmt(want_tokens)})")
        elif want_tokens is not None and tokens > want_tokens:
            faults.append(f"{fmt(tokens - want_tokens)} validation tokens more than the manifest's {fmt(want_tokens)}")
        if want_docs is not None and n != want_docs:
            if n < want_docs:
                named.append(n - 1)
                faults.append(f"{want_docs - n} validation documents missing: ids {n}..{want_docs - 1} (the last "
                              f"present, id {n - 1}, may be cut short or merged with a missing one)")
            else:
                faults.append(f"{n - want_docs} validation documents more than the manifest's {want_docs}")
        if want_bytes is not None and not faults and total != want_bytes:
            faults.append(f"{fmt(total)} decoded bytes, the manifest says {fmt(want_bytes)}")
        details = {"documents": n, "tokens": tokens, "bytes": total, "manifest_documents": want_docs,
                   "manifest_tokens": want_tokens, "manifest_decoded_bytes": want_bytes,
                   "truncated": [{"id": i} for i in sorted(set(named)) if i >= 0]}
        if faults:
            self.add(Check("completeness", "fault", "; ".join(faults), details))
        else:
            self.add(Check("completeness", "ok", f"{fmt(n)} documents, {fmt(tokens)} tokens"
                                                 + (f", {fmt(total)} decoded bytes" if want_bytes is not None else "")
                                                 + " = the manifest", details))

    def claims_check(self):
        if not self.args.claim:
            return
        claims = []
        for path in self.args.claim:
            claims.extend(parse_claim(path))
        scored = (self.val_lengths - 1).astype(np.int64)
        rows_out, faults = [], []
        for c in claims:
            r = self._claim(c, scored)
            rows_out.append(r)
            if r["problems"]:
                faults.append(f"{c.source}: " + "; ".join(r["problems"]))
        details = {"claims": rows_out}
        if faults:
            self.add(Check("claim", "fault", " | ".join(faults), details))
        else:
            shown = "; ".join(f"{r['source']}: {r['claimed_bpb']:.6f} = {r['recomputed_bpb']:.6f}"
                              for r in rows_out[:3])
            self.add(Check("claim", "ok", f"{shown}{' ...' if len(rows_out) > 3 else ''} (recomputed with "
                                          f"this dataset's exact bytes)", details))

    def _claim(self, c: Claim, scored: np.ndarray) -> dict:
        problems = []
        n_val = len(scored)
        out = {"source": c.source, "claimed_bpb": c.bpb, "claimed_loss": c.loss}
        if c.rows is not None:
            ids = [r["id"] for r in c.rows]
            outside = [i for i in ids if not 0 <= i < n_val]
            if outside:
                problems.append(f"document ids beyond the {n_val} validation documents ({_ids(outside)})")
                ids = [i for i in ids if 0 <= i < n_val]
            rows = [r for r in c.rows if 0 <= r["id"] < n_val]
            wrong_bytes = [r["id"] for r in rows if r["bytes"] != int(self.doc_bytes[r["id"]])]
            wrong_tokens = [r["id"] for r in rows if r["tokens"] != int(scored[r["id"]])]
            nats = math.fsum(r["nats"] for r in rows)
            exact = int(sum(int(self.doc_bytes[i]) for i in ids))
            claimed_bytes = sum(r["bytes"] for r in rows)
            recomputed = nats / math.log(2) / max(exact, 1)
            tol = 1e-9 * max(abs(c.bpb), 1.0)
            if wrong_bytes:
                problems.append(f"{len(wrong_bytes)} rows count other bytes than this dataset (id {_ids(wrong_bytes)})")
            if wrong_tokens:
                problems.append(f"{len(wrong_tokens)} rows count other tokens (id {_ids(wrong_tokens)})")
            out.update({"documents": len(rows), "tokens": int(sum(int(scored[i]) for i in ids)), "exact_bytes": exact,
                        "claimed_bytes": claimed_bytes})
        else:
            docs = c.docs if c.docs is not None else n_val
            if docs > n_val:
                problems.append(f"scored {docs} documents, the validation split has {n_val}")
                docs = n_val
            tokens = int(scored[:docs].sum())
            exact = int(self.doc_bytes[:docs].sum())
            if c.tokens is not None and c.tokens != tokens:
                problems.append(f"scored {fmt(c.tokens)} tokens, this dataset's first {docs} documents have "
                                f"{fmt(tokens)}")
            if c.bytes is not None and c.bytes != exact:
                problems.append(f"counts {fmt(c.bytes)} bytes, the exact count is {fmt(exact)}")
            if c.loss is None:
                problems.append("no val_loss to recompute from")
                out.update({"recomputed_bpb": None, "difference": None, "problems": problems})
                return out
            used_tokens = c.tokens if c.tokens is not None else tokens
            nats = c.loss * used_tokens
            recomputed = nats / math.log(2) / max(exact, 1)
            # what rounding the printed val_loss and val_bpb to their decimals can account for
            tol = 0.5 * 10 ** -c.bpb_decimals + 0.5 * 10 ** -c.loss_decimals * used_tokens / math.log(2) / max(exact, 1)
            tol = tol * 1.01 + 1e-12
            out.update({"documents": docs, "tokens": tokens, "exact_bytes": exact, "claimed_bytes": c.bytes})
        implied = nats / math.log(2) / c.bpb if c.bpb else None
        diff = c.bpb - recomputed
        out.update({"recomputed_bpb": recomputed, "difference": diff, "tolerance": tol,
                    "implied_bytes": implied})
        if abs(diff) > tol:
            conv = int(self.conv_bytes[:out["documents"]].sum()) if c.rows is None else None
            why = ""
            if implied is not None:
                why = f"; the claimed val_bpb implies {implied:,.0f} bytes"
                if conv is not None and abs(implied - conv) <= max(1.0, 2 * tol * implied / max(c.bpb, 1e-12)):
                    why += " (the lookup-table convention's count)"
            problems.append(f"claims val_bpb {c.bpb:.8g}, {recomputed:.8g} with the exact {fmt(exact)} bytes "
                            f"(difference {diff:+.3g}){why}")
        out["problems"] = problems
        return out


def claims_without_dataset(paths: list[str]) -> list[Check]:
    """The checks of --claim that need no dataset: each claim's val_bpb against its own val_loss, tokens and bytes
    (val_bpb = val_loss x tokens / ln 2 / bytes) where it states them, and eval_ttt.py's per-document rows against
    their totals; a claim that states neither is reported with the tokens per byte its two numbers imply."""
    from speedrun.records.check import eval_problems

    rows_out, faults = [], []
    for path in paths:
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8")) if path.endswith(".json") else None
        except (OSError, ValueError):
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("docs"), list):  # eval_ttt.py results: rows and totals
            problems = eval_problems(obj)
            rows_out.append({"source": os.path.basename(path), "problems": problems})
            faults.extend(f"{os.path.basename(path)}: {p}" for p in problems)
            continue
        for c in parse_claim(path):
            row = {"source": c.source, "claimed_bpb": c.bpb, "claimed_loss": c.loss, "problems": []}
            if c.loss and c.tokens and c.bytes:
                recomputed = c.loss * c.tokens / math.log(2) / c.bytes
                tol = (0.5 * 10 ** -c.bpb_decimals + 0.5 * 10 ** -c.loss_decimals * c.tokens / math.log(2) / c.bytes)
                row["recomputed_bpb"] = recomputed
                if abs(c.bpb - recomputed) > tol * 1.01 + 1e-12:
                    row["problems"].append(f"claims val_bpb {c.bpb:.8g}, its own val_loss, {fmt(c.tokens)} tokens "
                                           f"and {fmt(c.bytes)} bytes give {recomputed:.8g}")
            elif c.loss:
                row["tokens_per_byte"] = c.bpb * math.log(2) / c.loss
            rows_out.append(row)
            faults.extend(f"{c.source}: {p}" for p in row["problems"])
    shown = "; ".join(f"{r['source']}: val_bpb {r['claimed_bpb']:.6f}" + (
        f" = {r['recomputed_bpb']:.6f} from its own tokens and bytes" if "recomputed_bpb" in r else
        f", {r['tokens_per_byte']:.5f} tokens per byte" if "tokens_per_byte" in r else "")
        for r in rows_out[:3] if "claimed_bpb" in r)
    claim = Check("claim", "fault", " | ".join(faults), {"claims": rows_out}) if faults else \
        Check("claim", "info", (shown or f"{len(rows_out)} results files consistent") + " (without the dataset: its "
                               "exact bytes not checked)", {"claims": rows_out})
    return [claim, Check("dataset", "skipped", "no DATA_DIR: structure, overlap, near-overlap, bytes, convention, "
                                               "texts and completeness need the dataset")]


def _plain_hash(ids: np.ndarray) -> int:
    pw, _ = power_tables(len(ids) + 1)
    return int(np.multiply(ids.astype(np.uint16), pw[:len(ids)], dtype=U64).sum(dtype=U64))


# ---------------------------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="speedrun audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?",
                   help="folder with *_val_*.bin and *_train_*.bin shards (without it, only the --claim checks that "
                        "need no dataset run)")
    p.add_argument("--tokenizer", help="SentencePiece model (default DATA_DIR/tokenizer.model)")
    p.add_argument("--texts", help="the original corpus (.jsonl, .jsonl.gz, .txt or a folder of .txt, as "
                                   "data/prepare_corpus.py reads it): validation document k is its k-th document")
    p.add_argument("--claim", action="append", default=[], metavar="LOG_OR_JSON",
                   help="a training log, an eval_ttt.py results JSON or a submission.json (repeatable)")
    p.add_argument("--json", metavar="OUT", help="write the findings as JSON (`-`: stdout, the summary then goes to "
                                                 "stderr)")
    p.add_argument("--vocab-size", type=int, help="ids must be below this (default: the tokenizer's pieces)")
    p.add_argument("--shingle", type=int, default=DEFAULT_SHINGLE,
                   help=f"tokens per shingle for near overlap (default {DEFAULT_SHINGLE}; 0: no near-overlap check)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"a validation document with more than this share of its shingles in training is a fault "
                        f"(default {DEFAULT_THRESHOLD})")
    p.add_argument("--shingle-sample", type=int, default=1, metavar="M",
                   help="index about one shingle in M, chosen by hash value (so the same ones in both splits): M times "
                        "fewer lookups, shares estimated from the sample (default 1: every shingle)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker threads for the streamed passes (default min(2, cores))")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.shingle < 0 or args.shingle == 1:
            raise UsageError(f"--shingle {args.shingle}: must be 0 (off) or at least 2")
        if not 0.0 <= args.threshold <= 1.0:
            raise UsageError(f"--threshold {args.threshold}: must be in [0, 1]")
        if args.shingle_sample < 1:
            raise UsageError(f"--shingle-sample {args.shingle_sample}: must be at least 1")
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be at least 1")
        if args.vocab_size is not None and not 1 < args.vocab_size <= 65536:
            raise UsageError(f"--vocab-size {args.vocab_size}: must be in (1, 65536]")
        for path in args.claim:  # read claims first: a bad one should not cost a whole pass
            parse_claim(path)
        if args.data_dir is None:
            if not args.claim:
                raise UsageError("give DATA_DIR, or --claim for the checks that need no dataset")
            checks = claims_without_dataset(args.claim)
            return _report(args, checks, "no dataset", {"data_dir": None})
        if args.texts and not os.path.exists(args.texts):
            raise UsageError(f"{args.texts}: input not found")
        started = time.perf_counter()
        auditor = Auditor(args)
        checks = auditor.run()
        seconds = time.perf_counter() - started
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total_tokens = auditor.val_scan.tokens + auditor.train_scan.tokens
    return _report(args, checks, f"{fmt(total_tokens)} tokens in {seconds:.1f} s", {
        "data_dir": os.path.abspath(args.data_dir), "tokenizer": os.path.abspath(auditor.tokenizer_path),
        "tokenizer_sha256": auditor.tokenizer_sha256, "vocab_size": auditor.vocab, "seconds": seconds,
        "tokens": total_tokens,
        "timings": {"val_scan_s": auditor.val_scan.seconds, "train_scan_s": auditor.train_scan.seconds,
                    "exact_hash_s": auditor.val_scan.seconds_exact + auditor.train_scan.seconds_exact,
                    "near_probe_s": auditor.train_scan.seconds_near, **auditor.timings}})


def _report(args, checks: list[Check], what: str, about: dict) -> int:
    """The summary (stdout, or stderr when the JSON goes to stdout), the JSON report, and the exit status."""
    faults = [c for c in checks if c.status == "fault"]
    summary_out = sys.stderr if args.json == "-" else sys.stdout
    for c in checks:
        print(c.line(), file=summary_out)
    print(f"{'result':<13} {'FAULT' if faults else 'ok'}: {len(faults)} of {len(checks)} checks found a fault; "
          f"{what}", file=summary_out)
    if args.json:
        report = {**about, "faults": len(faults),
                  "checks": {c.name: {"status": c.status, "summary": c.summary, **c.details} for c in checks}}
        text = json.dumps(report, indent=1, default=_json_default) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).write_text(text, encoding="utf-8")
            except OSError as e:
                print(f"error: {args.json}: cannot write ({e.strerror or e})", file=sys.stderr)
                return 2
    return 1 if faults else 0


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main())

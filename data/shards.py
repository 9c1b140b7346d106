"""Writing token shards (the format and the one reader are data/loader.py's): one shard at once, or a split streamed
into numbered shards. Every file is written to a temporary file in the target directory first and renamed into place,
so a reader never sees a half-written shard.
"""

from __future__ import annotations

import os

import numpy as np

from data.files import open_new, remove_quietly, temp_path_for, write_atomic
from data.loader import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, DataError

MAX_TOKEN_ID = 65535  # tokens are stored as uint16


class ShardError(DataError):
    """A shard cannot be written. The message starts with the file it is about."""


def _header(num_tokens: int) -> bytes:
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, num_tokens
    return header.tobytes()


def as_uint16_tokens(tokens, path) -> np.ndarray:
    """`tokens` as a little-endian uint16 array, or ShardError naming `path` if an id is outside [0, 65535]."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.size == 0:
        return np.zeros(0, dtype="<u2")
    if array.dtype.kind not in "iub":
        raise ShardError(f"{path}: token ids must be integers, got an array of {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = low if low < 0 else high
        position = int(np.argmax(array == bad))
        raise ShardError(f"{path}: token id {bad} at position {position} is outside [0, {MAX_TOKEN_ID}]"
                         " (shards store uint16 tokens)")
    return array.astype("<u2", copy=False)


def write_shard(path, tokens) -> None:
    """Write one shard holding `tokens` (any integer array-like) atomically.

    Raises ShardError naming `path`, before creating any file, if a token id is outside [0, 65535]."""
    path = str(path)
    array = as_uint16_tokens(tokens, path)
    write_atomic(path, _header(len(array)) + array.tobytes())


class ShardWriter:
    """Streams the documents of one split into `{prefix}_{split}_{index:06d}.bin` files of at most `max_tokens` tokens.

    Documents continue from one shard into the next when they do not fit. Every shard goes to a temporary file;
    `commit()` renames them all into place, `abort()` removes them. Nothing is left behind in either case."""

    def __init__(self, directory: str, prefix: str, split: str, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.directory, self.prefix, self.split, self.max_tokens = directory, prefix, split, max_tokens
        self.done: list[tuple[str, str, int]] = []  # (temp path, final path, tokens) of finished shards
        self._file = None
        self._tmp = self._final = None
        self._count = 0
        self.total_tokens = 0

    def name(self, index: int) -> str:
        return f"{self.prefix}_{self.split}_{index:06d}.bin"

    def _open(self) -> None:
        index = len(self.done)
        if index > 999_999:
            raise ShardError(f"{os.path.join(self.directory, self.name(index))}: more than 1,000,000 shards;"
                             " use a larger --shard-tokens")
        self._final = os.path.join(self.directory, self.name(index))
        self._tmp = temp_path_for(self._final)
        self._file = open_new(self._tmp)
        self._file.write(_header(0))
        self._count = 0

    def _close(self) -> None:
        self._file.seek(0)
        self._file.write(_header(self._count))
        self._file.close()
        self._file = None
        self.done.append((self._tmp, self._final, self._count))

    def write(self, tokens) -> None:
        """Append tokens (one document, or any piece of the stream)."""
        target = os.path.join(self.directory, self.name(len(self.done)))
        array = as_uint16_tokens(tokens, target)
        start = 0
        while start < len(array):
            if self._file is None:
                self._open()
            take = min(self.max_tokens - self._count, len(array) - start)
            self._file.write(array[start:start + take].tobytes())
            self._count += take
            self.total_tokens += take
            start += take
            if self._count == self.max_tokens:
                self._close()

    def finish(self) -> list[tuple[str, str, int]]:
        """Close the last shard; returns (temp path, final path, tokens) of every shard, still under temp names."""
        if self._file is not None:
            self._close()
        return self.done

    def commit(self) -> list[str]:
        """Rename the finished shards into place; returns their final paths."""
        self.finish()
        for tmp, final, _ in self.done:
            os.replace(tmp, final)
        return [final for _, final, _ in self.done]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            remove_quietly(self._tmp)
        for tmp, _, _ in self.done:
            remove_quietly(tmp)
        self.done = []

"""Writing files atomically and hashing them: one definition for the record (checkpoints, results, shard index caches)
and for the data tools and the toolkit. Standard library only, so that a command can import it before its
dependencies are installed.
"""

from __future__ import annotations

import hashlib
import os
import secrets


def temp_path_for(path: str) -> str:
    """A fresh temporary name in the directory of `path` (hidden, so no glob for the real files, shards or others,
    matches it)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def open_new(path: str):
    # O_EXCL: never follow or reuse an existing file; mode 0o666 minus the umask, like a normal open().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_temp(path, content) -> str:
    """Create a new temporary file next to `path` (not yet renamed) and return its name. `content` is the bytes, or a
    function that creates the file under the name it is given (writes it, links it, downloads to it). On any error
    the temporary file is removed."""
    tmp = temp_path_for(str(path))
    try:
        if callable(content):
            content(tmp)
        else:
            with open_new(tmp) as f:
                f.write(content)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def write_atomic(path, content) -> None:
    """Write `content` (bytes, or a function creating the file; see write_temp) to `path` through a temporary file in
    the same folder (created if missing) and os.replace: a reader never sees half a file, and a failure leaves
    `path` as it was and no temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = write_temp(path, content)
    try:
        os.replace(tmp, str(path))
    except BaseException:
        remove_quietly(tmp)
        raise


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

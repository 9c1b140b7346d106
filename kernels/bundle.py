"""The record's code as it runs: a self-contained compressed bundle of the payload files that `python BUNDLE [args]`
runs exactly as `python train_gpt.py [args]` runs from the raw files. The 16 MB track can count its bytes as the
record's code bytes.

    data = build_bundle(root, ["train_gpt.py", "eval_ttt.py", ...])   # bytes: the bundle file (deterministic)
    data = bundle_bytes({name: content, ...})                          # the same, from the files' bytes
    files = read_bundle(path)                                         # {name: bytes}; ValueError naming the file

A bundle is a zip archive (Python runs a zip file given as its script: its __main__.py) of two stored members:
  __main__.py  the bootstrap (BOOTSTRAP below, about 1 KB);
  payload.xz   one xz stream (lzma preset 9e) of a JSON index line [[name, size, sha256], ...], a newline, then the
               files' bytes one after another.
The bootstrap extracts the files once into a folder named after the payload's sha256 (in the temporary directory, or
SPEEDRUN_BUNDLE_DIR), checking every size and sha256, then replaces its own process (os.execv) with the same Python,
its same options, running the extracted train_gpt.py (the entry) with the same arguments, in the same working
directory, with the same environment. So the script's files, imports, logs and the code it embeds are those of the
raw files, byte for byte. Several processes (torchrun's ranks) may extract at once: each writes into a folder of its
own and renames it into place; the first rename wins, the others find the folder complete.

Members are stored, not deflated, and every zip field that could vary (times, permissions, system) is fixed: the same
files give the same bytes. Only the standard library is used, in the builder and the bootstrap alike.
"""

import hashlib
import io
import json
import lzma
import zipfile
from pathlib import Path

BUNDLE_FORMAT = "kernels.bundle/1"
ENTRY = "train_gpt.py"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
LZMA_PRESET = 9 | lzma.PRESET_EXTREME

BOOTSTRAP = '''\
# kernels.bundle/1: a compressed copy of a record's payload; `python THIS_FILE [args]` runs its ENTRY as the raw files.
import hashlib, json, lzma, os, sys, tempfile, zipfile
ENTRY = %(entry)r
bundle = os.path.abspath(sys.argv[0])
with zipfile.ZipFile(bundle) as archive:
    blob = archive.read("payload.xz")
digest = hashlib.sha256(blob).hexdigest()
base = os.environ.get("SPEEDRUN_BUNDLE_DIR") or tempfile.gettempdir()
target = os.path.join(base, "speedrun-bundle-" + digest[:24])
if not os.path.isfile(os.path.join(target, ".complete")):
    raw = lzma.decompress(blob)
    index_end = raw.index(b"\\n")
    offset = index_end + 1
    work = tempfile.mkdtemp(prefix=".speedrun-bundle-", dir=base)
    for name, size, sha256 in json.loads(raw[:index_end]):
        data = raw[offset:offset + size]
        offset += size
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            sys.exit(bundle + ": damaged bundle: " + name + " does not match its sha256")
        path = os.path.join(work, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    open(os.path.join(work, ".complete"), "wb").close()
    try:
        os.rename(work, target)
    except OSError:  # another process put it there first
        if not os.path.isfile(os.path.join(target, ".complete")):
            raise
script = os.path.join(target, ENTRY)
options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]  # the interpreter's own options, e.g. -u or -X ...
os.execv(sys.executable, [sys.executable, *options, script, *sys.argv[1:]])
'''


def payload_blob(files: dict[str, bytes]) -> bytes:
    """The uncompressed payload: the JSON index line, a newline, the files' bytes in order."""
    index = [[name, len(data), hashlib.sha256(data).hexdigest()] for name, data in files.items()]
    return json.dumps(index, separators=(",", ":")).encode() + b"\n" + b"".join(files.values())


def _stored(name: str, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info, data


def build_bundle(root, names: list[str], entry: str = ENTRY) -> bytes:
    """The bundle's bytes for the files `names` (paths relative to root, "/"-separated); entry is the script it runs."""
    return bundle_bytes({name: (Path(root) / name).read_bytes() for name in names}, entry)


def bundle_bytes(files: dict[str, bytes], entry: str = ENTRY) -> bytes:
    """The bundle of these files ({name: bytes}, in order), e.g. those a log embeds: its size is the code's count."""
    if entry not in files:
        raise ValueError(f"build_bundle: the entry {entry} is not among the files")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in (("__main__.py", (BOOTSTRAP % {"entry": entry}).encode()),
                           ("payload.xz", lzma.compress(payload_blob(files), preset=LZMA_PRESET))):
            info, data = _stored(name, data)
            archive.writestr(info, data)
    return buffer.getvalue()


def bundle_files(data: bytes) -> dict[str, bytes]:
    """{name: bytes} of a bundle's payload, every size and sha256 checked; ValueError (one line) if damaged."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if archive.namelist() != ["__main__.py", "payload.xz"]:
                raise ValueError(f"not a bundle (members {archive.namelist()})")
            blob = archive.read("payload.xz")
        raw = lzma.decompress(blob)
        index_end = raw.index(b"\n")
        index = json.loads(raw[:index_end])
    except (zipfile.BadZipFile, lzma.LZMAError, ValueError, KeyError, EOFError) as e:
        message = str(e) if str(e).startswith("not a bundle") else f"damaged bundle ({type(e).__name__}: {e})"
        raise ValueError(message.splitlines()[0]) from None
    files, offset = {}, index_end + 1
    for name, size, sha256 in index:
        content = raw[offset:offset + size]
        offset += size
        if len(content) != size or hashlib.sha256(content).hexdigest() != sha256:
            raise ValueError(f"damaged bundle: {name} does not match its sha256")
        files[name] = content
    if offset != len(raw):
        raise ValueError(f"damaged bundle: {len(raw) - offset} bytes after its last file")
    return files


def read_bundle(path: str) -> dict[str, bytes]:
    """bundle_files of a file; errors name the file."""
    try:
        with open(path, "rb") as f:
            return bundle_files(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None

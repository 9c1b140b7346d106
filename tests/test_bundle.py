"""Tests of kernels/bundle.py: the record's payload as one self-contained compressed file that `python BUNDLE` runs as
the raw files run. A tiny training run from the bundle gives the raw script's losses, and its log embeds the payload's
exact bytes; the bundle's bytes are deterministic (also from a fresh process); a damaged bundle is one error line."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import train_gpt as tg
from kernels import bundle as B

ROOT = Path(__file__).resolve().parent.parent
NAMES = [p.relative_to(ROOT).as_posix() for p in tg.payload_files()]
TINY = {"NUM_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64",
        "TRAIN_BATCH_TOKENS": "512", "TRAIN_MICRO_BATCHES": "2", "ITERATIONS": "4", "WARMUP_STEPS": "0",
        "WARMDOWN_ITERS": "2", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
        "VAL_MAX_DOCS": "2", "EVAL_MODES": "flat", "EVAL_BATCH_TOKENS": "4096", "COMPILE": "0", "SEED": "7"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "record.pyz"
    path.write_bytes(B.build_bundle(ROOT, NAMES))
    return path


def test_bundle_holds_exactly_the_payload_and_is_deterministic(bundle, tmp_path):
    data = bundle.read_bytes()
    files = B.read_bundle(str(bundle))
    assert list(files) == NAMES
    for name, content in files.items():
        assert content == (ROOT / name).read_bytes(), name
    assert len(data) < sum(len(c) for c in files.values()) / 2  # compressed
    with zipfile.ZipFile(bundle) as archive:
        assert archive.namelist() == ["__main__.py", "payload.xz"]
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == B.ZIP_TIME for i in archive.infolist())
    script = "import sys; from kernels import bundle as B; sys.stdout.buffer.write(B.build_bundle(sys.argv[1], sys.argv[2:]))"
    child = subprocess.run([sys.executable, "-c", script, str(ROOT), *NAMES], cwd=ROOT, capture_output=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert child.stdout == data == B.build_bundle(ROOT, NAMES)  # the same bytes in a fresh process
    with pytest.raises(ValueError, match="entry train_gpt.py is not among"):
        B.build_bundle(ROOT, ["eval_ttt.py"])


def test_damaged_bundle_is_one_error_line_naming_the_file(bundle, tmp_path):
    data = bundle.read_bytes()
    start = data.index(b"\xfd7zXZ")
    flipped = bytearray(data)
    flipped[start + (len(data) - start) // 2] ^= 0x20
    cases = {"empty": b"", "truncated": data[:len(data) // 2], "one byte changed": bytes(flipped),
             "not a zip": b"print('hi')\n"}
    for what, bad in cases.items():
        path = tmp_path / f"{what}.pyz"
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: (damaged bundle|not a bundle)") as e:
            B.read_bundle(str(path))
        assert "\n" not in str(e.value), what


def test_training_from_the_bundle_is_the_raw_training(bundle, sample_data, tmp_path):
    """The same tiny run twice at once (2 cores): `python train_gpt.py` from the repository and `python record.pyz`
    from the bundle, extracted into a folder of the test's own. Every logged loss is the same, and the bundled run's
    log embeds the payload's exact files."""
    procs = {}
    for kind, script in (("raw", ROOT / "train_gpt.py"), ("bundle", bundle)):
        env = {**os.environ, **TINY, "DATA_PATH": str(sample_data), "RUN_ID": kind, "LOG_DIR": str(tmp_path / "logs"),
               "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "OMP_NUM_THREADS": "1",
               "SPEEDRUN_BUNDLE_DIR": str(tmp_path)}
        procs[kind] = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    logs = {}
    for kind, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        logs[kind] = (tmp_path / "logs" / f"{kind}.txt").read_text()

    def numbers(log):
        return re.findall(r"^(step:\d+/\d+ train_loss:\S+|final val_loss:\S+ val_bpb:\S+)", log, re.M)

    assert len(numbers(logs["raw"])) == 5 and numbers(logs["bundle"]) == numbers(logs["raw"])
    extracted = [p for p in tmp_path.glob("speedrun-bundle-*") if (p / ".complete").is_file()]
    assert len(extracted) == 1
    for name in NAMES:
        content = (ROOT / name).read_text(encoding="utf-8")
        assert f"#### file {name} bytes=" in logs["bundle"] and content in logs["bundle"], name
        assert (extracted[0] / name).read_text(encoding="utf-8") == content

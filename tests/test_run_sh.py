"""run.sh's choices, with nvidia-smi and Python replaced by stand-ins that record what run.sh would start."""

import json
import os
import subprocess

import pytest

import train_gpt as tg
from conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys
if "torch.distributed.run" in sys.argv or "train_gpt.py" in sys.argv:
    keys = ("TRAIN_MICRO_BATCHES", "TRAIN_BATCH_TOKENS", "RUN_ID", "DATA_PATH", "ARTIFACT", "ARTIFACT_CODE")
    with open(os.environ["RECORD"], "w") as f:
        json.dump({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}, f)
elif sys.argv[1:2] in (["-"], ["-c"]):
    sys.stdin.read() if sys.argv[1] == "-" else None  # the bootstrap's checks: nothing is missing
"""


def run_sh(tmp_path, gpus: int, **env) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus)))
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    for f in (smi, python):
        f.chmod(0o755)
    record = tmp_path / "started.json"
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "RECORD": str(record),
               **env}
    for key in ("TRAIN_MICRO_BATCHES", "TRAIN_BATCH_TOKENS", "RUN_ID", "ARTIFACT", "ARTIFACT_CODE"):
        if key not in env:
            run_env.pop(key, None)
    proc = subprocess.run(["bash", str(ROOT / "run.sh")], env=run_env, capture_output=True, text=True, timeout=60)
    return proc, json.loads(record.read_text()) if record.exists() else {}


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_gpu_count_gets_a_batch_it_can_run(tmp_path, gpus):
    proc, started = run_sh(tmp_path, gpus)
    assert proc.returncode == 0, proc.stderr
    assert f"--nproc_per_node={gpus}" in started["argv"]
    micro = int(started["TRAIN_MICRO_BATCHES"] or 8)
    batch = int(started["TRAIN_BATCH_TOKENS"] or 524_288)
    assert micro % gpus == 0 and batch % micro == 0  # what DocumentLoader and Hyperparameters.validate require
    assert 524_288 - micro < batch <= 524_288  # as close to the default batch as the micro-batch count allows
    tg.Hyperparameters.from_env({"TRAIN_MICRO_BATCHES": str(micro), "TRAIN_BATCH_TOKENS": str(batch)})
    if 8 % gpus:
        assert f"run.sh: {gpus} GPUs: TRAIN_MICRO_BATCHES={micro} TRAIN_BATCH_TOKENS={batch}" in proc.stderr
    else:
        assert started["TRAIN_MICRO_BATCHES"] is None and started["TRAIN_BATCH_TOKENS"] is None  # the defaults


def test_gpu_runs_write_the_least_lossy_artifact_that_fits_with_the_code_bundled(tmp_path):
    """On GPUs: ARTIFACT=auto (the first of ARTIFACT_CANDIDATES whose total fits with the margin) and the code counted
    as its bundle, unless the user chose; on a CPU, no artifact."""
    _, started = run_sh(tmp_path, 8)
    assert (started["ARTIFACT"], started["ARTIFACT_CODE"]) == ("auto", "bundle")
    hp = tg.Hyperparameters.from_env({"ARTIFACT": "auto", "ARTIFACT_CODE": "bundle"})
    assert tg.artifact_codecs(hp)[0] == "int8_zlib" and hp.artifact_margin_bytes > 0
    _, started = run_sh(tmp_path, 8, ARTIFACT="int6_lzma", ARTIFACT_CODE="raw")
    assert (started["ARTIFACT"], started["ARTIFACT_CODE"]) == ("int6_lzma", "raw")
    _, started = run_sh(tmp_path, 0)
    assert (started["ARTIFACT"], started["ARTIFACT_CODE"]) == (None, None)


def test_an_explicit_batch_is_left_to_the_user(tmp_path):
    proc, started = run_sh(tmp_path, 3, TRAIN_MICRO_BATCHES="6", TRAIN_BATCH_TOKENS="393216")
    assert proc.returncode == 0, proc.stderr
    assert (started["TRAIN_MICRO_BATCHES"], started["TRAIN_BATCH_TOKENS"]) == ("6", "393216")


def test_cpu_runs_started_in_the_same_second_get_different_run_ids(tmp_path):
    ids = {run_sh(tmp_path, 0)[1]["RUN_ID"] for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("cpu_") for i in ids)

"""Shared pytest setup. Runs before any test module imports `kernels`: Triton picks interpreted or compiled kernels at
import time, so on a machine without CUDA the interpreter must be switched on here, first."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # With a Triton/numpy pair whose interpreter cannot run our kernels (kernels/_common.interpreter_unusable_reason),
    # the interpreter tests skip with that reason and the ops use their references: never a silent pass.

ROOT = Path(__file__).resolve().parent.parent


SAMPLE_DIR = ROOT / "data" / "datasets" / "peps_sp1024_spread"


def prepare_sample() -> Path:
    """The bundled sample, prepared exactly as run.sh does it (cached in data/datasets/, shared with run.sh's; prepared
    again only when prepare_corpus.py's output format or the sample changed)."""
    import subprocess

    subprocess.run([sys.executable, "-m", "data.prepare_corpus", "--input", str(ROOT / "data" / "sample" / "peps.jsonl.gz"),
                    "--out", str(SAMPLE_DIR), "--val-docs", "60", "--val-select", "spread", "--skip-if-current"],
                   check=True, capture_output=True, cwd=ROOT)
    return SAMPLE_DIR


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return prepare_sample()

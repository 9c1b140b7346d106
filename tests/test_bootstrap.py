"""speedrun/bootstrap.sh (sourced by run.sh and test.sh) installs exactly what is missing: nothing in a checkout whose
environment is complete, a missing dependency from pyproject.toml's list, and an editable install of this checkout when
the `speedrun` command or the payload would be imported from another checkout. pip itself is stood in for by a wrapper
that records its arguments (the real interpreter runs the checks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ["-m", "pip"]:
    with open(os.environ["PIP_RECORD"], "a") as f:
        f.write(json.dumps(sys.argv[3:]) + "\\n")
    sys.exit(0)
os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
"""


def pip_calls(tmp_path: Path, checkout: Path, prelude: str = "") -> list[list[str]]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    record = tmp_path / "pip.jsonl"
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {prelude} source speedrun/bootstrap.sh"], cwd=checkout,
                          env={**os.environ, "PYTHON": str(python), "PIP_RECORD": str(record)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_nothing_is_installed_when_nothing_is_missing(tmp_path):
    assert pip_calls(tmp_path, ROOT) == []


def test_a_missing_dependency_and_another_checkout_are_installed(tmp_path):
    """A copy of the checkout whose list names one more (absent) package: that package is installed, then this copy
    in editable mode (the installed `speedrun` is the original checkout's, not this one's)."""
    calls = pip_calls(tmp_path, checkout_copy(tmp_path))
    assert calls == [["install", "-q", "no-such-package-xyz"], ["install", "-q", "-e", ".", "--no-deps",
                                                                "--no-build-isolation"]]


def test_run_sh_accepts_another_checkouts_install(tmp_path):
    """run.sh's setting: the missing package is installed, but the `speedrun` command another checkout installed is
    left alone (runs started at once from several checkouts would otherwise reinstall it under each other)."""
    prelude = "BOOTSTRAP_ANY_CHECKOUT=1;"
    assert pip_calls(tmp_path, checkout_copy(tmp_path), prelude) == [["install", "-q", "no-such-package-xyz"]]
    assert "BOOTSTRAP_ANY_CHECKOUT=1 " in (ROOT / "run.sh").read_text()


def checkout_copy(tmp_path: Path) -> Path:
    """The bootstrap and a pyproject.toml whose list names one more (absent) package."""
    copy = tmp_path / "checkout"
    (copy / "speedrun").mkdir(parents=True)
    shutil.copy(ROOT / "speedrun" / "bootstrap.sh", copy / "speedrun" / "bootstrap.sh")
    text = (ROOT / "pyproject.toml").read_text()
    assert '    "numpy",\n' in text
    (copy / "pyproject.toml").write_text(text.replace('    "numpy",\n', '    "numpy",\n    "no-such-package-xyz",\n'))
    return copy

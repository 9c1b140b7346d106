"""speedrun compare-logs on two small real logs: one of ours (tests/fixtures/record_logs/tiny_seed1.txt) and one of
parameter-golf's train_gpt.py, run on CPU at the same tiny shape (tests/fixtures/parity_logs/peer_tiny_seed1.txt; its
source code, which parameter-golf prints at the top of every log, is stripped: only the log lines are kept)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from speedrun.analysis import compare_logs

OURS = ROOT / "tests" / "fixtures" / "record_logs" / "tiny_seed1.txt"
PEER = ROOT / "tests" / "fixtures" / "parity_logs" / "peer_tiny_seed1.txt"


def train_losses(path: Path) -> dict[int, float]:
    """step -> train loss, read directly off the log's lines (a step line starts at column 0; code is indented)."""
    text = path.read_text(encoding="utf-8")
    return {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([0-9.]+) ", text, re.M)}


def test_reads_our_log_and_skips_its_embedded_code():
    curve = compare_logs.read_curve(OURS, "ours")
    expected = train_losses(OURS)
    assert list(curve.steps) == sorted(expected) == list(range(1, 9))
    assert list(curve.losses) == [expected[s] for s in curve.steps]
    assert (curve.tokens_per_step, curve.tokens_per_step_source) == (1024, "log")  # hparam train_batch_tokens=1024
    assert list(curve.tokens) == [1024 * s for s in range(1, 9)]


def test_reads_parameter_golf_log():
    curve = compare_logs.read_curve(PEER, "peer")
    expected = train_losses(PEER)
    assert list(curve.steps) == list(range(1, 9)) and list(curve.losses) == [expected[s] for s in range(1, 9)]
    assert (curve.tokens_per_step, curve.tokens_per_step_source) == (1024, "log")  # `train_batch_tokens:1024 ...`
    # the flag wins over the log
    assert compare_logs.read_curve(PEER, "peer", tokens_per_step=2048).tokens[-1] == 8 * 2048


def our_log_lines() -> bytes:
    """The fixture's lines after its embedded code."""
    return OURS.read_bytes().rsplit(b"\n#### end ", 1)[1].split(b"\n", 1)[1]


def embedded(name: str, content: bytes) -> bytes:
    import hashlib

    return (b"#### file %s bytes=%d sha256=%s\n" % (name.encode(), len(content), hashlib.sha256(content).hexdigest()
            .encode()) + content + b"\n#### end %s\n" % name.encode())


def test_source_code_at_the_top_is_not_read(tmp_path):
    """Lines of code that look like log lines are skipped, in both layouts."""
    fake = "step:999/999 train_loss:0.0001 train_time:1ms\nhparam train_batch_tokens=7\n"
    ours = tmp_path / "ours.txt"
    ours.write_bytes(embedded("train_gpt.py", fake.encode()) + our_log_lines())
    assert list(compare_logs.read_curve(ours, "ours").steps) == list(range(1, 9))
    assert compare_logs.read_curve(ours, "ours").tokens_per_step == 1024
    peer = tmp_path / "peer.txt"
    peer.write_text(fake.replace("=7", "=5").replace("hparam train_batch_tokens=", "train_batch_tokens:")
                    + PEER.read_text(encoding="utf-8"), encoding="utf-8")
    curve = compare_logs.read_curve(peer, "peer")
    assert 999 not in curve.steps and curve.tokens_per_step == 1024


@pytest.mark.slow
def test_cli_plots_and_prints_the_table(tmp_path):
    out = tmp_path / "plots" / "parity.png"
    result = subprocess.run([sys.executable, "-m", "speedrun", "compare-logs", str(OURS), str(PEER), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(out)).shape[:2]
    assert width > 500 and height > 400
    lines = result.stdout.splitlines()
    ours, peer = train_losses(OURS), train_losses(PEER)
    # Both logs: steps 1..8 of 1,024 tokens. The table's last row is the end of the common range (8,192 tokens).
    last_row = next(line for line in lines if line.split()[0] == "8,192").split()
    assert [float(v) for v in last_row[1:]] == pytest.approx([ours[8], peer[8], ours[8] - peer[8]], abs=1e-4)
    assert sum(1 for line in lines if re.match(r"\s+[\d,]+\s", line)) == 4
    # The last 20% of tokens 1,024..8,192 starts at 6,758: steps 7 and 8.
    mean = (ours[7] - peer[7] + ours[8] - peer[8]) / 2
    summary = next(line for line in lines if line.startswith("mean difference"))
    assert "2 points" in summary and float(summary.rsplit(" ", 1)[1]) == pytest.approx(mean, abs=1e-4)
    assert not list(out.parent.glob(".*.tmp"))


def test_difference_interpolates_between_logged_steps():
    """A peer of half the tokens per step covers 512..4,096 tokens; the difference is taken where both curves exist
    (1,024..4,096) at every logged point of either, ours interpolated linearly between its steps."""
    ours = compare_logs.read_curve(OURS, "ours")
    peer = compare_logs.read_curve(PEER, "peer", tokens_per_step=512)
    points, diff = compare_logs.difference(ours, peer)
    assert list(points) == [512.0 * k for k in range(2, 9)]
    our_losses, peer_losses = train_losses(OURS), train_losses(PEER)
    for t, d in zip(points, diff):
        step, between = divmod(int(t), 1024)  # ours: step 1.5 is halfway between steps 1 and 2
        ours_here = our_losses[step] if not between else (our_losses[step] + our_losses[step + 1]) / 2
        assert d == pytest.approx(ours_here - peer_losses[int(t) // 512])


@pytest.mark.parametrize("case", ["missing file", "no train loss", "no tokens per step", "no overlap", "bad number",
                                  "bad number in ours", "truncated embedded code"])
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    out = tmp_path / "x.png"
    peer_lines = PEER.read_text(encoding="utf-8").splitlines(keepends=True)
    bad = tmp_path / "bad.txt"
    args = [str(OURS), str(bad)]
    if case == "missing file":
        expected = "no such file"
    elif case == "no train loss":
        bad.write_text("".join(line for line in peer_lines if "train_loss" not in line), encoding="utf-8")
        expected = "no `step:N/M train_loss:X` lines"
    elif case == "no tokens per step":
        bad.write_text("".join(line for line in peer_lines if not line.startswith("train_batch_tokens")),
                       encoding="utf-8")
        expected = "give it with the flag"
    elif case == "no overlap":
        bad.write_text(PEER.read_text(encoding="utf-8"), encoding="utf-8")
        args += ["--peer-tokens-per-step", "1000000"]
        expected = "do not overlap"
    elif case == "bad number":
        bad.write_text(PEER.read_text(encoding="utf-8").replace("train_loss:6.2459", "train_loss:6.2.459"),
                       encoding="utf-8")
        expected = "is not a number"
    elif case == "bad number in ours":
        bad.write_bytes(re.sub(rb"(?m)^(step:5/8 train_loss:)[0-9.]+", rb"\g<1>6.2.459", OURS.read_bytes()))
        args = [str(bad), str(PEER)]
        expected = "'6.2.459' at step 5 is not a number"
    else:
        block = embedded("train_gpt.py", b"x = 1\n" * 20)
        bad.write_bytes(block[:-40] + our_log_lines())  # the end of the file and its `#### end` line are missing
        args = [str(bad), str(PEER)]
        expected = "truncated"
    assert compare_logs.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ") and expected in err[0], err
    assert not out.exists()

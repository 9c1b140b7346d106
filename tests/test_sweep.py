"""speedrun sweep: a grid of eval_ttt.py configurations against the strided reference (CSV, JSON, plots, the same
numbers as a single eval_ttt.py run), the defaults a swept window brings, bad arguments, and 1 vs 2 processes under
torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_eval_modes import model, one_thread, small_dir  # noqa: F401  (the same fixtures, one definition)
from test_eval_ttt import TTT_ARGS, checkpoint  # noqa: F401
from test_eval_ttt import run_cli as run_eval_ttt

ROOT = Path(__file__).resolve().parents[1]
from speedrun.experiments import sweep


def run_sweep(capsys, *argv) -> tuple[int, str, str]:
    code = sweep.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_runs_a_grid_and_plots(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    code, stdout, err = run_sweep(capsys, "--checkpoint", checkpoint, *TTT_ARGS, "--max-docs", "3",
                                  "--sweep", "chunk=16,32", "--sweep", "lora-lr=0,0.05", "--sweep-out", out_dir)
    assert code == 0, err
    rows = read_csv(out_dir / "sweep.csv")
    assert tuple(rows[0]) == sweep.CSV_FIELDS
    assert len(rows) == 1 + 4 and rows[0]["mode"] == "strided" and rows[0]["reference"] == "True"
    assert [(r["chunk"], r["lora_lr"]) for r in rows[1:]] == [("16", "0.0"), ("16", "0.05"), ("32", "0.0"),
                                                              ("32", "0.05")]
    for name in ("bpb_vs_time.png", "bpb_vs_chunk.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out_dir / "sweep.json").read_text())
    # the same numbers as a single run of the same configuration
    code, _, err = run_eval_ttt(capsys, "--checkpoint", checkpoint, *TTT_ARGS, "--max-docs", "3", "--chunk", "32",
                                "--out", tmp_path / "one.json")
    assert code == 0, err
    single = json.loads((tmp_path / "one.json").read_text())
    assert results[4]["bpb"] == pytest.approx(single["bpb"], rel=1e-9)
    assert stdout.count("eval mode:") == 5


@pytest.mark.parametrize("given, expected", [
    # a swept window brings its own stride (window/2) and chunk (window/4); the reference keeps the base window
    ([], [(64, 32, 16), (32, 16, 8), (128, 64, 32)]),
    # unless the stride or the chunk is given
    (["--stride", "8", "--chunk", "4"], [(64, 8, 4), (32, 8, 4), (128, 8, 4)]),
])
def test_a_swept_window_brings_its_own_stride_and_chunk(given, expected):
    args, grid = sweep.parse_args(["--checkpoint", "x.pt", "--mode", "ttt", *given, "--sweep", "window=32,128"])
    specs = sweep.sweep_specs(args, grid, {"eval_window": 64})
    assert [(c.window, c.stride, c.chunk) for c, _ in specs] == expected
    assert [(c.mode, is_reference) for c, is_reference in specs] == [("strided", True), ("ttt", False),
                                                                        ("ttt", False)]


def test_the_frontier_options_and_the_mode_are_grid_axes():
    args, grid = sweep.parse_args(["--checkpoint", "x.pt", "--mode", "ttt", "--window", "64", "--chunk", "16",
                                   "--sweep", "mode=ttt,phased", "--sweep", "phase-docs=2,4/3", "--sweep", "warm-a=0,1",
                                   "--sweep", "beta1=0", "--sweep", "weight-decay=0.5", "--sweep", "lora-alpha=144",
                                   "--sweep", "virtual-layers=1", "--sweep", "global-lr=0.01",
                                   "--sweep", "global-chunk=512", "--sweep", "beta2=0.99"])
    specs = [spec for spec, _ in sweep.sweep_specs(args, grid, {})]
    assert [(s.mode, s.phase_docs, s.warm_a, s.documents) for s in specs[1:]] == [
        ("ttt", (2, 4), False, "per-document"), ("ttt", (2, 4), True, "cross-document"),
        ("ttt", (3,), False, "per-document"), ("ttt", (3,), True, "cross-document"),
        ("phased", (2, 4), False, "cross-document"), ("phased", (2, 4), True, "cross-document"),
        ("phased", (3,), False, "cross-document"), ("phased", (3,), True, "cross-document")]
    assert {(s.beta1, s.weight_decay, s.lora_alpha, s.virtual_layers, s.global_lr, s.global_chunk, s.beta2)
            for s in specs[1:]} == {(0.0, 0.5, 144.0, True, 0.01, 512, 0.99)}


def test_a_sweep_over_modes_labels_the_cross_document_rows(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    code, stdout, err = run_sweep(capsys, "--checkpoint", checkpoint, *TTT_ARGS, "--max-docs", "3",
                                  "--phase-docs", "1", "--global-chunk", "128", "--sweep", "mode=ttt,phased",
                                  "--sweep-out", out_dir)
    assert code == 0, err
    rows = read_csv(out_dir / "sweep.csv")
    assert [(r["mode"], r["documents"], r["phase_docs"]) for r in rows] == [
        ("strided", "per-document", ""), ("ttt", "per-document", ""), ("phased", "cross-document", "1")]
    assert float(rows[1]["setup_seconds"]) == float(rows[2]["setup_seconds"]) > 0
    code, _, err = run_eval_ttt(capsys, "--checkpoint", checkpoint, *TTT_ARGS, "--max-docs", "3", "--mode", "phased",
                                "--phase-docs", "1", "--global-chunk", "128", "--out", tmp_path / "one.json")
    assert code == 0, err
    assert float(rows[2]["bpb"]) == pytest.approx(json.loads((tmp_path / "one.json").read_text())["bpb"], rel=1e-9)
    assert float(rows[2]["bpb"]) != pytest.approx(float(rows[1]["bpb"]), rel=1e-6)  # the global steps did something


@pytest.mark.parametrize("argv, needle", [
    (["--sweep", "colour=1,2"], "--sweep"),
    (["--sweep", "mode=ttt,sideways"], "modes are"),
    (["--sweep", "warm-a=0,maybe"], "0/1 flags"),
    (["--sweep", "chunk=a,b"], "--sweep"),
    (["--sweep", "chunk=16", "--sweep", "chunk=32"], "swept twice"),
    (["--sweep", "chunk=16", "--dump-token-losses", "x.npy"], "--dump-token-losses"),
    ([], "--sweep"),
    # a bad point of the grid is found before the first configuration runs
    (["--mode", "ttt", "--window", "64", "--sweep", "chunk=16,128"], "--chunk 128"),
])
def test_bad_arguments_are_one_line(checkpoint, argv, needle, tmp_path, capsys):
    code, stdout, err = run_sweep(capsys, "--checkpoint", checkpoint, *argv, "--sweep-out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sweep_two_processes_score_like_one(checkpoint, tmp_path, capsys):
    """Under torchrun every process scores its share of each configuration's documents; process 0 alone prints and
    writes, and the numbers are those of one process."""
    grid = [*TTT_ARGS, "--max-docs", "3", "--sweep", "chunk=16,32"]
    code, _, err = run_sweep(capsys, "--checkpoint", checkpoint, *grid, "--sweep-out", tmp_path / "one")
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "speedrun", "sweep", "--checkpoint", str(checkpoint), *grid,
                           "--sweep-out", str(tmp_path / "two")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval mode:") == 3 and proc.stdout.count("sweep: 3 configurations") == 1
    one, two = (json.loads((tmp_path / n / "sweep.json").read_text()) for n in ("one", "two"))
    assert [r["config"]["world_size"] for r in two] == [2, 2, 2]
    assert [(r["config"]["mode"], r["config"].get("chunk")) for r in two] == [("strided", None), ("ttt", 16), ("ttt", 32)]
    for a, b in zip(one, two):
        assert [(d["id"], d["tokens"], d["bytes"]) for d in a["docs"]] == [(d["id"], d["tokens"], d["bytes"])
                                                                           for d in b["docs"]]
        np.testing.assert_allclose([d["nats"] for d in b["docs"]], [d["nats"] for d in a["docs"]], rtol=1e-5)
    rows_one, rows_two = read_csv(tmp_path / "one" / "sweep.csv"), read_csv(tmp_path / "two" / "sweep.csv")
    np.testing.assert_allclose([float(r["bpb"]) for r in rows_two], [float(r["bpb"]) for r in rows_one], rtol=1e-5)

"""tools/gpu_report.py on a CPU: the dry run, and the reading of every tool's output into report rows.

The fixtures in tests/fixtures/gpu_report/ are real outputs, made on the 2-core CPU machine (2026-11-23):
- bench_train_cpu.txt: `python tools/bench_train.py --steps 4 --backends fa3,reference
  --configs "FUSED=0 COMPILE=0;FUSED=1 COMPILE=0" --timeout 120 --env NUM_LAYERS=2 --env MODEL_DIM=64 --env NUM_HEADS=2
  --env NUM_KV_HEADS=1 --env TRAIN_SEQ_LEN=256 --env TRAIN_BATCH_TOKENS=2048 --env TRAIN_MICRO_BATCHES=2
  --env WARMUP_STEPS=0 --env EVAL_BATCH_TOKENS=4096` (fa3 cannot load on a CPU).
- bench_kernels_no_cuda.txt: `python tools/bench_kernels.py` without a GPU.
- bench_kernels_cpu.txt: bench_kernels.benchmark() itself, run on the CPU with its shapes shrunk (TOKENS 256, WIDTH 64,
  VOCAB 128, MLP_HIDDEN 128, Newton-Schulz 64x64 and 128x64), _cases handed the CPU and triton.testing.do_bench
  replaced by a perf_counter median of 5 (the Triton column is then the reference fallback). Its figures are CPU
  figures, used only as parser input.
- train_log.txt, train_log_without_compile_stats.txt: train_gpt.py logs of a 2-layer width-64 model on the sample
  (COMPILE=0), before and after train_gpt.py learnt to log `compile_stats:`; the embedded source files at their top
  are cut off (the log's tail, from the first line after the last `#### end`).
- eval_strided.json, eval_ttt_chunk32.json: `python eval_ttt.py --checkpoint <that run's checkpoint> --mode strided
  (--mode ttt --chunk 32) --max-docs 4 --out ...`.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_report  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "gpu_report"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sample_data_choice() -> gpu_report.DataChoice:
    return gpu_report.DataChoice(gpu_report.SAMPLE_DIR, None, "the bundled sample", "the bundled sample",
                                 needs_preparing=False)


# ----------------------------------------------------------------------------------------------------------------------
# the plan


def run_dry(tmp_path: Path, *args: str) -> str:
    # With CUDA the plain command would run the report; --plan prints the same plan there.
    flags = ["--plan"] if torch.cuda.is_available() else []
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_report.py"), *flags, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    return done.stdout


def planned_budget(plan: str) -> int:
    return int(plan.split("budgets add up to ")[1].split(" s")[0])


def test_dry_run_prints_every_command_with_its_budget_and_exits_0(tmp_path):
    plan = run_dry(tmp_path)
    if not torch.cuda.is_available():
        assert plan.startswith("no CUDA device here: this is the plan, nothing is run")
    backends = ",".join(gpu_report.attention_backends())
    data = gpu_report.display_path(gpu_report.choose_data(None).path)  # FineWeb where downloaded, else the sample
    for command in ["source tools/bootstrap.sh",
                    "python -m pytest tests -m cuda",
                    "python -m pytest tests/test_kernels.py -m 'not cuda'",
                    "python tools/bench_kernels.py",
                    f"python tools/bench_train.py --data {data} --steps 20",
                    f"--backends {backends} --configs 'FUSED=0 COMPILE=0;FUSED=0 COMPILE=1;FUSED=1 COMPILE=0;"
                    "FUSED=1 COMPILE=1'",
                    "ITERATIONS=300", "python train_gpt.py",
                    "python eval_ttt.py --checkpoint checkpoints/gpu_report_", "--mode strided",
                    "--mode ttt --chunk 32", "--mode ttt --chunk 64", "--mode ttt --chunk 256"]:
        assert command in plan, command
    commands = [line for line in plan.splitlines() if line.strip().startswith("$ ")]
    budgets = [line for line in plan.splitlines() if line.strip().split(" ", 1)[0].isdigit()]
    assert len(commands) == len(budgets) == 11  # every command comes with its budget
    # the unconditional parts fit in 20 minutes; setup and data run only on a machine that lacks them
    conditional = sum(int(line.split()[0]) for line in budgets if "[only if" in line)
    assert planned_budget(plan) - conditional <= 20 * 60
    assert "the whole run stops at 1200 s" in plan


def test_quick_dry_run_is_a_shorter_plan(tmp_path):
    plan = run_dry(tmp_path, "--quick")
    assert "ITERATIONS=30 " in plan and "--steps 5" in plan and "tests/test_kernels.py" not in plan
    conditional = sum(int(line.split()[0]) for line in plan.splitlines() if "[only if" in line)
    assert planned_budget(plan) - conditional <= 10 * 60
    assert "the whole run stops at 600 s" in plan


def test_bad_arguments_are_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_report.py"), "--env", "NOEQUALS"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "error: --env 'NOEQUALS': expected KEY=VALUE"


# ----------------------------------------------------------------------------------------------------------------------
# running: budgets and timeouts


@pytest.mark.slow
def test_a_part_is_stopped_at_its_budget_with_its_children_and_later_parts_skip_when_time_ran_out(tmp_path):
    sleeper = ("import subprocess, sys, time\n"
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               "print('grandchild_pid:', child.pid, flush=True)\n"
               "time.sleep(60)\n")
    parts = [gpu_report.Part("03_slow", "slow", [sys.executable, "-c", sleeper], budget_s=2),
             gpu_report.Part("05_next", "next", [sys.executable, "-c", "print('never')"], budget_s=100)]
    start = time.monotonic()
    outcomes = gpu_report.run_plan(parts, budget_s=4, raw_dir=tmp_path, data=sample_data_choice(), log=lambda _: None)
    assert time.monotonic() - start < 20
    assert outcomes["03_slow"].status == "timed out after 2 s"
    child = int(outcomes["03_slow"].output.split("grandchild_pid: ")[1].split()[0])
    time.sleep(0.5)
    state = Path(f"/proc/{child}/status")
    assert not state.exists() or "State:\tZ" in state.read_text(), "the command's child outlived the timeout"
    assert outcomes["05_next"].status.startswith("skipped: time ran out (")
    raw = (tmp_path / "03_slow.txt").read_text()
    assert raw.startswith("$ python -c ") and "grandchild_pid: " in raw  # the raw output is kept, with its command


def test_evaluation_is_skipped_without_the_runs_checkpoint(tmp_path):
    parts = gpu_report.build_plan(False, sample_data_choice(), tmp_path, "r", [])
    strided = next(p for p in parts if p.key == "08_eval_strided")
    outcomes = {"07_train": gpu_report.Outcome("timed out after 270 s")}
    assert gpu_report.skip_reason(strided, outcomes, sample_data_choice(), []) == \
        "skipped: no checkpoint (the training run: timed out after 270 s)"
    assert gpu_report.skip_reason(strided, {}, sample_data_choice(), ["sentencepiece"]) == \
        "skipped: sentencepiece cannot be imported (see the setup part)"
    kernels = next(p for p in parts if p.key == "05_bench_kernels")  # it needs no sentencepiece: it still runs
    assert gpu_report.skip_reason(kernels, {}, sample_data_choice(), ["sentencepiece"]) is None


# ----------------------------------------------------------------------------------------------------------------------
# reading the tools' outputs


@pytest.fixture(scope="module")
def pytest_output(tmp_path_factory) -> str:
    """A real pytest run, with the report's arguments, of 2 passing, 1 failing and 1 skipped test."""
    folder = tmp_path_factory.mktemp("pytest_run")
    (folder / "test_sample.py").write_text(
        "import pytest\n"
        "def test_one(): pass\n"
        "def test_two(): pass\n"
        "def test_broken(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_gpu(): pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "test_sample.py", *gpu_report.PYTEST_ARGS], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    return done.stdout


@pytest.mark.slow
def test_pytest_counts_and_failures(pytest_output):
    counts = gpu_report.parse_pytest(pytest_output)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (2, 1, 1, 0)
    assert counts["failures"] == ["test_sample.py::test_broken"] and counts["complete"]


@pytest.mark.slow
def test_pytest_stopped_before_its_summary_still_counts(pytest_output):
    stopped = pytest_output[:pytest_output.index("FAILURES")]  # a run killed at its budget has no summary line
    counts = gpu_report.parse_pytest(stopped)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 1, 1)
    assert counts["failures"] == ["test_sample.py::test_broken"] and not counts["complete"]


def test_bench_train_rows_not_available_and_not_run():
    info = {"backends": ["fa3", "reference", "torch_varlen"], "configs": ["FUSED=0 COMPILE=0", "FUSED=1 COMPILE=0"]}
    rows = gpu_report.bench_train_rows(fixture("bench_train_cpu.txt"), info, "timed out after 420 s")
    by_key = {(r["attention"], r["config"]): r for r in rows}
    assert len(rows) == 6
    assert by_key["fa3", "FUSED=0 COMPILE=0"]["status"] == "not available (does not load on cpu, CUDA-only)"
    reference = by_key["reference", "FUSED=0 COMPILE=0"]
    assert reference["status"] == "ok" and reference["step_avg"] == "328.6 ms"
    assert reference["tokens/s per process"] == "0.006M" and reference["peak memory"] == "546 MiB"
    assert reference["compile"] == "0 recompiles, 0 graph breaks"
    assert by_key["reference", "FUSED=1 COMPILE=0"]["fused ops"].startswith("linear_softcap_cross_entropy,")
    assert by_key["torch_varlen", "FUSED=1 COMPILE=0"]["status"] == "not run (bench_train: timed out after 420 s)"


def test_bench_kernels_table_to_the_kernels_column():
    parsed = gpu_report.parse_bench_kernels(fixture("bench_kernels_cpu.txt"))
    assert parsed["device"].startswith("CPU (x86_64")
    column = {op: (cell, faster) for op, cell, faster in gpu_report.kernel_column(parsed["rows"])}
    assert len(column) == 6
    assert column["softcap_cross_entropy"] == ("1.46x (0.944 vs 1.380 ms)", "yes")
    assert column["rms_norm"] == ("0.86x (0.571 vs 0.493 ms)", "no")
    assert column["newton_schulz"] == ("0.88x (0.757 vs 0.664 ms, [64, 64], 5 steps); "
                                       "0.93x (1.028 vs 0.954 ms, [128, 64], 5 steps)", "no")


def test_bench_kernels_without_a_gpu_says_why():
    parsed = gpu_report.parse_bench_kernels("$ python tools/bench_kernels.py\n# budget 100 s\n"
                                            + fixture("bench_kernels_no_cuda.txt"))
    assert parsed["rows"] == [] and parsed["message"].startswith("This benchmark needs a CUDA GPU (none found)")


def test_train_log_figures():
    log = gpu_report.parse_train_log(fixture("train_log.txt"))
    assert log["last_step"] == {"step": "20", "iterations": "20", "train_loss": "6.8542", "train_time_ms": "4357",
                                "step_avg_ms": "217.83", "tokens_per_s": "9402"}
    assert (log["peak_memory_mib"], log["recompiles"], log["graph_breaks"]) == (513, 0, 0)
    assert log["attention_backend"] == "reference" and log["fused_ops"] == "none" and log["error"] is None
    assert log["final_eval"] and log["final_eval"][0].startswith("mode:flat window:256")
    before = gpu_report.parse_train_log(fixture("train_log_without_compile_stats.txt"))
    assert before["recompiles"] is None and before["graph_breaks"] is None and before["peak_memory_mib"] == 521


def test_train_log_skips_the_embedded_source_files():
    """A log starts with the code it ran, byte for byte; lines in it that look like log lines (the README's sample log,
    say) must not be read as the run's figures."""
    sys.path.insert(0, str(ROOT))
    import train_gpt

    files = [ROOT / "README.md", ROOT / "train_gpt.py"]
    log = fixture("train_log.txt")
    assert gpu_report.parse_train_log(train_gpt.embedded_source(files, ROOT) + log) == gpu_report.parse_train_log(log)


def test_eval_results_json():
    strided = gpu_report.parse_eval_json(FIXTURES / "eval_strided.json")
    ttt = gpu_report.parse_eval_json(FIXTURES / "eval_ttt_chunk32.json")
    raw = json.loads(fixture("eval_ttt_chunk32.json"))
    assert (strided["mode"], strided["window"], strided["stride"], strided["docs"]) == ("strided", 256, 128, 4)
    assert (ttt["mode"], ttt["chunk"], ttt["tokens"]) == ("ttt", 32, 32040)
    assert ttt["tokens_per_s"] == raw["tokens_per_s"] and ttt["bpb"] == raw["bpb"]
    assert gpu_report.parse_eval_json(FIXTURES / "missing.json") is None


# ----------------------------------------------------------------------------------------------------------------------
# the report


@pytest.mark.slow
def test_report_rows_and_missing_parts(tmp_path, pytest_output):
    data = sample_data_choice()
    parts = gpu_report.build_plan(False, data, tmp_path, "gpu_report_test", [])
    by_key = {p.key: p for p in parts}
    shutil.copy(FIXTURES / "train_log_without_compile_stats.txt", by_key["07_train"].info["log"])
    shutil.copy(FIXTURES / "eval_strided.json", by_key["08_eval_strided"].info["json"])
    shutil.copy(FIXTURES / "eval_ttt_chunk32.json", by_key["09_eval_ttt_chunk32"].info["json"])
    Outcome = gpu_report.Outcome
    outcomes = {
        "01_setup": Outcome("not needed: numpy, sentencepiece, pytest, triton all import"),
        "02_data": Outcome("not needed: the data is there"),
        "03_cuda_tests": Outcome("failed (exit 1)", 3.0, pytest_output),
        "04_kernel_tests": Outcome("skipped: time ran out (20 s of the 1200 s budget left)"),
        "05_bench_kernels": Outcome("ok", 5.0, fixture("bench_kernels_no_cuda.txt")),
        "06_bench_train": Outcome("timed out after 420 s", 420.0, fixture("bench_train_cpu.txt")),
        "07_train": Outcome("ok", 30.0, ""),
        "08_eval_strided": Outcome("ok", 8.0, ""),
        "09_eval_ttt_chunk32": Outcome("ok", 50.0, ""),
        "10_eval_ttt_chunk64": Outcome("timed out after 45 s", 45.0, ""),
    }  # 11_eval_ttt_chunk256: never reached
    context = {"date": "2026-11-23", "quick": False, "model": "default model", "budget_s": 1200, "total_s": 600.0,
               "data": data, "raw_dir": tmp_path / "r_raw", "revision": "abc1234", "command": "python tools/gpu_report.py"}
    report = gpu_report.build_report(parts, outcomes, {"python": "3.11.7", "torch": "2.13.0+cpu", "gpus": []},
                                     context)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.endswith(", 2026-11-23 |")}

    assert "| CUDA tests (`-m cuda`) | 2 passed, 1 failed, 0 errors, 1 skipped |" in report
    assert "- failed: `test_sample.py::test_broken`" in report
    assert rows["the rest of tests/test_kernels.py, on the GPU"].split(" | ")[1] == \
        "skipped: time ran out (20 s of the 1200 s budget left)"
    assert "not measured: This benchmark needs a CUDA GPU (none found)" in \
        rows["each kernel vs `torch.compile` of its reference"]
    assert "Kernels table, column \"H100 vs `torch.compile`\"" in report and \
        "not measured (see the kernel benchmark part above)" in report

    fa3 = rows["train step, default model, ATTN_BACKEND=fa3 FUSED=0 COMPILE=0"]
    assert "| not available (does not load on cpu, CUDA-only) |" in fa3
    assert "`python tools/bench_train.py --data data/datasets/peps_sp1024_spread --steps 20 --env WARMUP_STEPS=5 " \
           "--backends fa3 --configs 'FUSED=0 COMPILE=0'`" in fa3
    reference = rows["train step, default model, ATTN_BACKEND=reference FUSED=0 COMPILE=0"]
    assert "328.6 ms/step, 0.006M tokens/s, peak 546 MiB, fused: none, compile: 0 recompiles, 0 graph breaks" in \
        reference
    assert "not run (bench_train: timed out after 420 s)" in \
        rows["train step, default model, ATTN_BACKEND=reference FUSED=1 COMPILE=1"]

    train = rows["300-step run, default model, the bundled sample"]
    assert ("step_avg 449.52 ms, 4,556 tokens/s (step 10/12), peak memory 521 MiB, recompiles and graph breaks "
            "not logged, attention reference, fused: none") in train
    assert "ITERATIONS=300" in train and "python train_gpt.py" in train

    strided = json.loads(fixture("eval_strided.json"))
    assert f"| {strided['tokens_per_s']:,.0f} tokens/s ({strided['tokens']:,} tokens in " in \
        rows["strided evaluation W=256 S=128, 4 documents"]
    assert "BPB 3.4440 after the 10-step run" in rows["ttt evaluation W=256 C=32, 4 documents"]
    assert "| TTT evaluation, chunk 64 | timed out after 45 s |" in report
    assert "| TTT evaluation, chunk 256 | skipped: not reached |" in report
    assert ("Not complete: CUDA tests (`-m cuda`), the rest of tests/test_kernels.py, on the GPU, training benchmark, "
            "ATTN_BACKEND x FUSED x COMPILE, TTT evaluation, chunk 64, TTT evaluation, chunk 256.") in report
    assert "- device: no GPU (nvidia-smi absent or silent): CPU figures" in report

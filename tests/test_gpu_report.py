"""speedrun gpu-report on a CPU: the plan and its budgets, running within deadlines, the reading of every tool's output
into report rows, and a whole run with a tiny model (--run-without-cuda) into report.md and raw.tar.gz.

The fixtures in tests/fixtures/gpu_report/ are real outputs, made on the 2-core CPU machine (2026-11-23, 2026-12-01):
- bench_train_cpu.txt: `speedrun bench train --steps 4 --backends fa3,reference
  --configs "FUSED=0 COMPILE=0;FUSED=1 COMPILE=0" --timeout 120 --env NUM_LAYERS=2 --env MODEL_DIM=64 --env NUM_HEADS=2
  --env NUM_KV_HEADS=1 --env TRAIN_SEQ_LEN=256 --env TRAIN_BATCH_TOKENS=2048 --env TRAIN_MICRO_BATCHES=2
  --env WARMUP_STEPS=0 --env EVAL_BATCH_TOKENS=4096` (fa3 cannot load on a CPU).
- bench_kernels_no_cuda.txt: `speedrun bench kernels` without a GPU.
- bench_kernels_cpu.txt: bench_kernels.benchmark() itself, run on the CPU with its shapes shrunk (TOKENS 256, WIDTH 64,
  VOCAB 128, MLP_HIDDEN 128, Newton-Schulz 64x64 and 128x64), _cases handed the CPU and triton.testing.do_bench
  replaced by a perf_counter median of 5 (the Triton column is then the reference fallback). Its figures are CPU
  figures, used only as parser input.
- train_log.txt, train_log_without_compile_stats.txt: train_gpt.py logs of a 2-layer width-64 model on the sample
  (COMPILE=0), before and after train_gpt.py learnt to log `compile_stats:`; the embedded source files at their top
  are cut off (the log's tail, from the first line after the last `#### end`).
- train_log_compiled_capped.txt: the same model compiled (COMPILE=1 WARMUP_STEPS=2), ITERATIONS=100 stopped by
  MAX_WALLCLOCK_SECONDS=3 at step 14, TRAIN_LOG_EVERY=10 (2026-12-01; cut the same way).
- eval_strided.json, eval_ttt_chunk32.json: `python eval_ttt.py --checkpoint <that run's checkpoint> --mode strided
  (--mode ttt --chunk 32) --max-docs 4 --out ...`.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

from speedrun.bench import gpu_report

FIXTURES = ROOT / "tests" / "fixtures" / "gpu_report"
SCRIPT = ["-m", "speedrun", "gpu-report"]
# the commands run with another working directory, so the repository comes on the module path this way
WITH_REPO = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sample_data_choice(needs_preparing: bool = False) -> gpu_report.DataChoice:
    return gpu_report.DataChoice(gpu_report.SAMPLE_DIR, None, "the bundled sample", "the bundled sample",
                                 needs_preparing=needs_preparing)


def plan_parts(budget_s: float = 600, data=None, missing=(), work_dir: Path = Path("/tmp/w")):
    return gpu_report.build_plan(budget_s, data or sample_data_choice(), work_dir, "r", [], list(missing))


# ----------------------------------------------------------------------------------------------------------------------
# the plan


def run_dry(tmp_path: Path, *args: str) -> str:
    # With CUDA the plain command would run the report; --plan prints the same plan there.
    flags = ["--plan"] if torch.cuda.is_available() else []
    done = subprocess.run([sys.executable, *SCRIPT, *flags, *args], cwd=tmp_path, env=WITH_REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    return done.stdout


def planned_total(plan: str) -> tuple[int, int]:
    total, budget = plan.split("budgets add up to ")[1].split(" s of the ")
    return int(total), int(budget.split(" s budget")[0])


def test_dry_run_prints_every_command_with_its_budget_and_fits_600_s(tmp_path):
    plan = run_dry(tmp_path)
    if not torch.cuda.is_available():
        assert plan.startswith("no CUDA device here: this is the plan, nothing is run")
    data = gpu_report.display_path(gpu_report.choose_data(None).path)  # FineWeb where downloaded, else the sample
    for command in ["ITERATIONS=100 WARMUP_STEPS=5 MAX_WALLCLOCK_SECONDS=45", "EVAL_MODES=flat VAL_MAX_DOCS=16",
                    "python train_gpt.py",
                    "python -m pytest tests -m cuda -v",
                    "python -m pytest tests/test_kernels.py -m 'not cuda' -v",
                    "python -m speedrun bench kernels",
                    "python eval_ttt.py --checkpoint logs/gpu_report_", "--mode strided --max-docs 16",
                    "--mode ttt --chunk 32 --max-docs 16", "--mode ttt --chunk 256 --max-docs 16",
                    f"python -m speedrun bench train --data {data} --steps 20 --env WARMUP_STEPS=2 "
                    "--env TRAIN_BATCH_TOKENS=131072 --env TRAIN_MICRO_BATCHES=2",
                    "--backends fa3,fa2,torch_varlen --configs 'FUSED=0 COMPILE=0;FUSED=1 COMPILE=0;FUSED=0 COMPILE=1;"
                    "FUSED=1 COMPILE=1'"]:
        assert command in plan, command
    commands = [line for line in plan.splitlines() if line.strip().startswith("$ ")]
    budgets = [line for line in plan.splitlines() if line.strip().split(" ", 1)[0].isdigit()]
    assert len(commands) == len(budgets) - 1 >= 8  # every command comes with its budget (and the probe's reserve)
    total, budget = planned_total(plan)
    assert budget == 600 and total <= 600
    assert sum(int(line.split()[0]) for line in budgets) == total
    titles = [line.split(" s  ", 1)[1] for line in budgets[1:]]
    assert [t[:3] for t in titles if t.startswith("(")] == ["(1)", "(2)", "(2)", "(3)", "(4)", "(4)", "(4)", "(5)",
                                                                    "(6)"]


def test_a_smaller_budget_cuts_the_least_important_parts(tmp_path):
    plan = run_dry(tmp_path, "--budget", "300")
    total, budget = planned_total(plan)
    assert budget == 300 and total <= 300
    cut = [line for line in plan.splitlines() if "-- cut: no room in the 300 s budget" in line]
    assert [line.split(" s  ", 1)[1][:3] for line in cut] == ["(2)", "(3)", "(4)", "(4)", "(4)", "(5)", "(6)"]
    assert "(1) the default model" in plan.split("-- cut")[0]  # what matters most is never the part that is cut


def test_setup_and_data_enter_the_plan_only_when_needed_and_the_total_still_fits():
    parts, left_out = plan_parts()
    assert [p.key for p in parts][:2] == ["03_train", "04_cuda_tests"]
    assert [line.split(":")[0] for line in left_out] == ["setup", "data"]
    parts, left_out = plan_parts(data=sample_data_choice(needs_preparing=True), missing=["triton"])
    assert [p.key for p in parts][:3] == ["01_setup", "02_data", "03_train"] and left_out == []
    assert gpu_report.RESERVE_S + sum(p.budget_s for p in parts) <= 600
    kept = [p for p in parts if not p.cut]
    assert parts[:len(kept)] == kept, "a cut part is never followed by one that runs"
    assert next(p for p in parts if p.key == "03_train").budget_s == gpu_report.BUDGETS["03_train"]
    roomy, _ = plan_parts(budget_s=1000)  # a larger budget: the last part takes what is left
    assert roomy[-1].key == "11_bench_train"
    assert roomy[-1].budget_s == 1000 - gpu_report.RESERVE_S - sum(p.budget_s for p in roomy[:-1]) > 400


def test_bad_arguments_are_one_clear_line(tmp_path):
    for args, message in ((["--env", "NOEQUALS"], "error: --env 'NOEQUALS': expected KEY=VALUE"),
                          (["--budget", "0"], "error: --budget 0: must be > 0")):
        done = subprocess.run([sys.executable, *SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip() == message


# ----------------------------------------------------------------------------------------------------------------------
# running: deadlines and timeouts


@pytest.mark.slow
def test_time_passes_on_a_part_is_stopped_at_its_deadline_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "REFRESH_S", 0.5)
    sleeper = ("import subprocess, sys, time\n"
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               "print('grandchild_pid:', child.pid, flush=True)\n"
               "time.sleep(60)\n")
    Part = gpu_report.Part
    parts = [Part("a_quick", "quick", [sys.executable, "-c", "print('done')"], budget_s=3),
             Part("b_borrows", "borrows", [sys.executable, "-c", "import time; time.sleep(2)"], budget_s=1),
             Part("c_slow", "slow", [sys.executable, "-c", sleeper], budget_s=100),
             Part("d_cut", "cut", [sys.executable, "-c", "print('never')"], budget_s=0, cut="cut: no room")]
    outcomes, seen = {}, []
    start = time.monotonic()
    gpu_report.run_plan(parts, tmp_path, outcomes, [], cuda=False, log=lambda _: None,
                        progress=lambda: seen.append(dict(outcomes)), end_by=start + 6)
    assert time.monotonic() - start < 8, "no deadline is later than end_by (the whole run's budget)"
    assert outcomes["a_quick"].status == "ok"
    assert outcomes["b_borrows"].status == "ok", "the time a_quick left passes on to b_borrows"
    assert outcomes["c_slow"].status.startswith("timed out after ")
    child = int(outcomes["c_slow"].output.split("grandchild_pid: ")[1].split()[0])
    time.sleep(0.5)
    state = Path(f"/proc/{child}/status")
    assert not state.exists() or "State:\tZ" in state.read_text(), "the command's child outlived the timeout"
    assert outcomes["d_cut"].status == "cut: no room"
    assert any(s.get("c_slow", gpu_report.Outcome("")).status.startswith("running (") for s in seen), \
        "the report is rewritten while a part runs"
    raw = (tmp_path / "c_slow.txt").read_text()
    assert raw.startswith("$ python -c ") and "grandchild_pid: " in raw  # the raw output is kept, with its command


def test_evaluation_is_skipped_without_the_runs_checkpoint_and_kernel_tests_without_cuda(tmp_path):
    parts, _ = plan_parts(work_dir=tmp_path)
    by_key = {p.key: p for p in parts}
    strided = by_key["07_eval_strided"]
    outcomes = {"03_train": gpu_report.Outcome("timed out after 230 s")}
    assert gpu_report.skip_reason(strided, outcomes, [], cuda=True) == \
        "skipped: no checkpoint (the training run: timed out after 230 s)"
    assert gpu_report.skip_reason(strided, {}, ["sentencepiece"], cuda=True) == \
        "skipped: sentencepiece cannot be imported"
    kernels = by_key["06_bench_kernels"]  # it needs no sentencepiece: it still runs
    assert gpu_report.skip_reason(kernels, {}, ["sentencepiece"], cuda=True) is None
    kernel_tests = by_key["05_kernel_tests"]
    assert gpu_report.skip_reason(kernel_tests, {}, [], cuda=True) is None
    assert gpu_report.skip_reason(kernel_tests, {}, [], cuda=False).startswith("skipped: no CUDA here")


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
    stopped = pytest_output[:pytest_output.index("FAILURES")]  # a run killed at its deadline has no summary line
    counts = gpu_report.parse_pytest(stopped)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 1, 1)
    assert counts["failures"] == ["test_sample.py::test_broken"] and not counts["complete"]


def test_bench_train_rows_not_available_and_not_run():
    info = {"backends": ["fa3", "reference", "torch_varlen"], "configs": ["FUSED=0 COMPILE=0", "FUSED=1 COMPILE=0"]}
    rows = gpu_report.bench_train_rows(fixture("bench_train_cpu.txt"), info, "timed out after 45 s")
    by_key = {(r["attention"], r["config"]): r for r in rows}
    assert len(rows) == 6
    assert by_key["fa3", "FUSED=0 COMPILE=0"]["status"] == "not available (does not load on cpu, CUDA-only)"
    reference = by_key["reference", "FUSED=0 COMPILE=0"]
    assert reference["status"] == "ok" and reference["step_avg"] == "328.6 ms"
    assert reference["tokens/s per process"] == "0.006M" and reference["peak memory"] == "546 MiB"
    assert reference["compile"] == "0 recompiles, 0 graph breaks"
    assert by_key["reference", "FUSED=1 COMPILE=0"]["fused ops"].startswith("linear_softcap_cross_entropy,")
    assert by_key["torch_varlen", "FUSED=1 COMPILE=0"]["status"] == "not run (bench_train: timed out after 45 s)"
    assert gpu_report.bench_train_run_id("torch_varlen", "FUSED=1 COMPILE=0") == "bench_torch_varlen_fused1_compile0"


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
    parsed = gpu_report.parse_bench_kernels("$ python -m speedrun bench kernels\n# allowed 40 s\n"
                                            + fixture("bench_kernels_no_cuda.txt"))
    assert parsed["rows"] == [] and parsed["message"].startswith("This benchmark needs a CUDA GPU (none found)")


def test_train_log_figures():
    log = gpu_report.parse_train_log(fixture("train_log.txt"))
    assert log["last_step"] == {"step": "20", "iterations": "20", "train_loss": "6.8542", "train_time_ms": "4357",
                                "step_avg_ms": "217.83", "tokens_per_s": "9402"}
    assert (log["peak_memory_mib"], log["recompiles"], log["graph_breaks"]) == (513, 0, 0)
    assert log["attention_backend"] == "reference" and log["fused_ops"] == "none" and log["error"] is None
    assert log["final_eval"] and log["final_eval"][0].startswith("mode:flat window:256")
    assert log["compile_warmup"] is None and log["stopped_early"] is None
    before = gpu_report.parse_train_log(fixture("train_log_without_compile_stats.txt"))
    assert before["recompiles"] is None and before["graph_breaks"] is None and before["peak_memory_mib"] == 521
    compiled = gpu_report.parse_train_log(fixture("train_log_compiled_capped.txt"))
    assert compiled["compile_warmup"] == {"steps": 2, "ms": 115433}
    assert compiled["stopped_early"] == {"train_time_ms": 3162, "step": 14} and compiled["cap_s"] == "3.0"
    assert (compiled["batch_tokens"], compiled["micro_batches"], compiled["compile"]) == (2048, 2, "True")
    assert (compiled["recompiles"], compiled["graph_breaks"], compiled["peak_memory_mib"]) == (0, 0, 642)


def test_train_log_skips_the_embedded_source_files():
    """A log starts with the code it ran, byte for byte; lines in it that look like log lines (the README's sample log,
    say) must not be read as the run's figures."""
    import train_gpt

    files = [ROOT / "README.md", ROOT / "train_gpt.py"]
    log = fixture("train_log.txt")
    assert gpu_report.parse_train_log(train_gpt.embedded_source(files) + log) == gpu_report.parse_train_log(log)


def test_eval_results_json():
    strided = gpu_report.parse_eval_json(FIXTURES / "eval_strided.json")
    ttt = gpu_report.parse_eval_json(FIXTURES / "eval_ttt_chunk32.json")
    raw = json.loads(fixture("eval_ttt_chunk32.json"))
    assert (strided["mode"], strided["window"], strided["stride"], strided["docs"]) == ("strided", 256, 128, 4)
    assert (ttt["mode"], ttt["chunk"], ttt["tokens"]) == ("ttt", 32, 32040)
    assert ttt["tokens_per_s"] == raw["tokens_per_s"] and ttt["bpb"] == raw["bpb"]
    assert gpu_report.parse_eval_json(FIXTURES / "missing.json") is None


# ----------------------------------------------------------------------------------------------------------------------
# the report and the tarball


H200 = {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
        "gpus": [{"name": "NVIDIA H200", "driver": "580.95.05", "memory": "143771 MiB"}]}


@pytest.mark.slow
def test_report_rows_and_missing_parts(tmp_path, pytest_output):
    data = sample_data_choice()
    parts, left_out = gpu_report.build_plan(600, data, tmp_path, "gpu_report_test", [], [])
    by_key = {p.key: p for p in parts}
    (tmp_path / "raw").mkdir()
    shutil.copy(FIXTURES / "train_log_compiled_capped.txt", by_key["03_train"].info["log"])
    shutil.copy(FIXTURES / "eval_strided.json", by_key["07_eval_strided"].info["json"])
    shutil.copy(FIXTURES / "eval_ttt_chunk32.json", by_key["08_eval_ttt_chunk32"].info["json"])
    Outcome = gpu_report.Outcome
    outcomes = {
        "03_train": Outcome("ok", 200.0, ""),
        "04_cuda_tests": Outcome("failed (exit 1)", 3.0, pytest_output),
        "05_kernel_tests": Outcome("timed out after 35 s", 35.0, pytest_output[:pytest_output.index("FAILURES")]),
        "06_bench_kernels": Outcome("ok", 5.0, fixture("bench_kernels_cpu.txt")),
        "07_eval_strided": Outcome("ok", 8.0, ""),
        "08_eval_ttt_chunk32": Outcome("ok", 20.0, ""),
        "09_eval_ttt_chunk256": Outcome("timed out after 20 s", 20.0, ""),
        "10_train_preset": Outcome("timed out after 140 s", 140.0, ""),
        "11_bench_train": Outcome("running (30 s so far)", 0.0, ""),
    }
    context = {"date": "2026-12-01", "model": "default model", "budget_s": 480, "total_s": 400.0, "data": data,
               "left_out": left_out, "revision": "abc1234", "command": "speedrun gpu-report --out /o",
               "finished": False}
    report = gpu_report.build_report(parts, outcomes, H200, context)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines()
            if line.endswith("| 1x NVIDIA H200, 2026-12-01 |")}

    assert report.startswith("# GPU report, 2026-12-01\n\n**Written while the run was still going")
    train = rows["train step, default model, the bundled sample, compiled, ATTN_BACKEND=auto"]
    assert ("step_avg 230.04 ms, 8,903 tokens/s (step 10/100, 2,048 tokens/step in 2 micro-batches), peak memory "
            "642 MiB, 0 recompiles and 0 graph breaks after warm-up, attention masked_sdpa, fused: none; the timed "
            "steps stopped at step 14 (3162 ms) at the MAX_WALLCLOCK_SECONDS=3.0 cap") in train
    assert "ITERATIONS=100 WARMUP_STEPS=5" in train and "python train_gpt.py" in train
    assert "| 115.4 s for 2 warm-up steps (compile, autotuning; not counted in step_avg) |" in \
        rows["compile warm-up, default model, the bundled sample"]

    assert "| 2 passed, 1 failed, 0 errors, 1 skipped |" in rows["CUDA tests (`-m cuda`)"]
    assert "| 2 passed, 1 failed, 0 errors, 1 skipped (incomplete: timed out after 35 s) |" in \
        rows["the rest of tests/test_kernels.py, on the GPU"]
    assert "- failed: `test_sample.py::test_broken`" in report

    assert "Kernels table, column \"H200 vs `torch.compile`\"" in report
    assert "| op | H200 vs `torch.compile` | faster at every shape |" in report
    assert "| `softcap_cross_entropy` | 1.46x (0.944 vs 1.380 ms) | yes |" in report

    strided = json.loads(fixture("eval_strided.json"))
    assert f"| {strided['tokens_per_s']:,.0f} tokens/s ({strided['tokens']:,} tokens in " in \
        rows["strided evaluation W=256 S=128, 4 documents, attention reference"]
    assert "BPB 3.4440 after the 14-step run" in rows["ttt evaluation W=256 C=32, 4 documents, attention reference"]
    assert "| (4) TTT evaluation, chunk 256 | timed out after 20 s |" in report

    assert "| (6) training matrix, ATTN_BACKEND x FUSED x COMPILE | running (30 s so far) |" in report
    assert "| not run (bench_train: running (30 s so far)) |" in \
        rows["train step, default model, ATTN_BACKEND=torch_varlen FUSED=1 COMPILE=1"]
    assert "| setup | not needed (numpy, sentencepiece, pytest, triton all import) | | - | |" in report
    assert ("Not complete: (2) CUDA tests (`-m cuda`), (2) the rest of tests/test_kernels.py, on the GPU, (4) TTT "
            "evaluation, chunk 256, (5) PRESET=pg1855, compiled: both graphs' warm-up, first steps, (6) training matrix, "
            "ATTN_BACKEND x FUSED x COMPILE.") in report
    assert ("| timed out after 140 s (no step timed: it was still in its compile warm-up) |" in
            rows["train step, PRESET=pg1855 (its 11x512 shape, vocabulary 8192), the bundled sample, compile not "
                 "logged, ATTN_BACKEND=auto"])
    assert "- device: 1 x NVIDIA H200 (143771 MiB, driver 580.95.05); the report uses the first" in report


def test_tarball_holds_the_raw_folder_and_shortens_a_huge_file(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    (raw / "bench_train_logs").mkdir(parents=True)
    (raw / "03_train.txt").write_text("step:1/1\n")
    (raw / "bench_train_logs" / "bench_x.txt").write_text("log\n")
    (raw / ".hidden.tmp").write_text("half written")
    monkeypatch.setattr(gpu_report, "MEMBER_LIMIT_BYTES", 4096)
    (raw / "huge.txt").write_bytes(b"a" * 10_000 + b"THE END")
    with tarfile.open(fileobj=io.BytesIO(gpu_report.raw_tarball(raw))) as tar:
        assert sorted(tar.getnames()) == ["raw/03_train.txt", "raw/bench_train_logs/bench_x.txt", "raw/huge.txt"]
        huge = tar.extractfile("raw/huge.txt").read()
    assert huge.endswith(b"THE END") and b"bytes left out by speedrun gpu-report" in huge and len(huge) < 4096 + 200


# ----------------------------------------------------------------------------------------------------------------------
# a whole run on the CPU, with a tiny model


TINY = ["NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=2", "NUM_KV_HEADS=1", "TRAIN_SEQ_LEN=256", "TRAIN_BATCH_TOKENS=2048",
        "TRAIN_MICRO_BATCHES=2", "EVAL_BATCH_TOKENS=4096", "ITERATIONS=5", "WARMUP_STEPS=1", "COMPILE=0"]
QUIET = {**WITH_REPO, "OMP_NUM_THREADS": "1"}  # a tiny model on a shared 2-core machine: one thread is faster


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, sample_data):
    """The sample's tokenizer and training shard, and a validation shard of three 200-token documents (TTT over the
    sample's long documents would take minutes on a CPU)."""
    import train_gpt as tg
    from data.shards import write_shard

    out = tmp_path_factory.mktemp("tiny_data")
    shutil.copyfile(sample_data / "tokenizer.model", out / "tokenizer.model")
    shutil.copyfile(next(sample_data.glob("*_train_000000.bin")), out / "tiny_train_000000.bin")
    val = tg.TokenStream(tg.split_pattern(str(sample_data), "val"), 1024)
    write_shard(str(out / "tiny_val_000000.bin"), np.concatenate([val.document(k)[:200] for k in range(3)]))
    return out


def report_command(out: Path, data: Path) -> list[str]:
    return [sys.executable, *SCRIPT, "--run-without-cuda", "--out", str(out), "--data", str(data),
            *[word for item in TINY for word in ("--env", item)]]


def work_dir_of(stdout: str) -> Path:
    """The logs/gpu_report_<time>/ folder a run keeps its raw outputs and checkpoint in (removed by the tests)."""
    return Path(stdout.split("(and ")[1].split(")")[0]).parent


def check_out_folder(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["raw.tar.gz", "report.md"]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)


@pytest.mark.slow
def test_run_without_cuda_writes_the_report_and_the_tarball(tmp_path, tiny_data):
    out = tmp_path / "out"
    done = subprocess.run(report_command(out, tiny_data), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=QUIET)
    if "(and " in done.stdout:
        shutil.rmtree(work_dir_of(done.stdout))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_out_folder(out)
    report = (out / "report.md").read_text()
    with tarfile.open(out / "raw.tar.gz") as tar:
        members = {name: tar.extractfile(name).read().decode() for name in tar.getnames()}

    statuses = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in
                report.split("## Parts")[1].split("## Rows")[0].splitlines() if line.startswith("| (")}
    assert statuses == {"(1) the default model, compiled, ATTN_BACKEND=auto": "ok",
                        "(2) CUDA tests (`-m cuda`)": "ok",
                        "(2) the rest of tests/test_kernels.py, on the GPU":
                            "skipped: no CUDA here (on a CPU this is part of ./test.sh, not a GPU figure)",
                        "(3) kernel benchmark": "ok", "(4) strided evaluation": "ok",
                        "(4) TTT evaluation, chunk 32": "ok", "(4) TTT evaluation, chunk 256": "ok",
                        "(5) PRESET=pg1855, compiled: both graphs' warm-up, first steps": "ok",
                        "(6) training matrix, ATTN_BACKEND x FUSED x COMPILE": "ok"}
    assert "| data | not needed (" in report and "| setup | not needed (" in report

    names = set(members)
    for key in ("plan", "03_train", "04_cuda_tests", "06_bench_kernels", "07_eval_strided", "08_eval_ttt_chunk32",
                "09_eval_ttt_chunk256", "10_train_preset", "11_bench_train"):
        assert f"raw/{key}.txt" in names, key
    assert "raw/machine.json" in names
    train_logs = sorted(n for n in names if n.startswith("raw/gpu_report_"))
    assert len(train_logs) == 2 and train_logs[1].endswith("_pg1855.txt")  # the default model's and the preset's
    assert "compile_warmup steps:1 " in members[train_logs[0]]
    assert "hparam preset=pg1855" in members[train_logs[1]] and "recurrence: on at step:" in members[train_logs[1]]
    assert "| train step, PRESET=pg1855 with --env's settings, " in report
    for key in ("07_eval_strided", "08_eval_ttt_chunk32", "09_eval_ttt_chunk256"):
        result = json.loads(members[f"raw/{key}.json"])
        assert f"| {result['tokens_per_s']:,.0f} tokens/s ({result['tokens']:,} tokens in " in report, key
    assert re.search(r"\| CUDA tests \(`-m cuda`\) \| 0 passed, 0 failed, 0 errors, \d+ skipped \|", report)
    assert "| train step, model as set by --env (see the command), ATTN_BACKEND=fa3 | not available (" in report
    assert "compile warm-up, model as set by --env" in report
    assert "Kernels table, column \"CPU vs `torch.compile`\"" in report and "- device: no GPU" in report


@pytest.mark.slow
def test_a_run_stopped_from_outside_leaves_a_consistent_pair(tmp_path, tiny_data):
    out = tmp_path / "out"
    proc = subprocess.Popen(report_command(out, tiny_data), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=QUIET)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            report = out / "report.md"
            if report.is_file() and "| (1) the default model, compiled, ATTN_BACKEND=auto | running" in \
                    report.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the report never showed the training part running")
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if "(and " in stdout:
        shutil.rmtree(work_dir_of(stdout))
    assert proc.returncode == 143, stderr[-2000:]
    check_out_folder(out)
    report = (out / "report.md").read_text()
    assert "| (1) the default model, compiled, ATTN_BACKEND=auto | stopped from outside (SIGTERM) during this part |" \
        in report
    assert "| (4) strided evaluation | not reached |" in report and "Written while the run" not in report
    with tarfile.open(out / "raw.tar.gz") as tar:
        assert {"raw/plan.txt", "raw/03_train.txt", "raw/machine.json"} <= set(tar.getnames())

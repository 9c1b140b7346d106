"""One command for a GPU machine: every GPU-side test and measurement of the project, most important first, in one call
of at most --budget seconds (default 600), into one --out folder: a report and one archive of the raw outputs.

    speedrun gpu-report --out DIR        # DIR/report.md and DIR/raw.tar.gz (default DIR: gpu_report_<date>/)
    speedrun gpu-report --plan           # print the plan (every command with its time budget) and exit
    speedrun gpu-report --budget 600 --data DIR --env KEY=VALUE

The parts, in order of value; each has a time budget, and the budgets add up to at most --budget (a part that does not
fit is cut, and the report says so). A part runs until its deadline, the end of its own budget counted from the start
of the run: time a part does not use (it finished early, or was not needed) passes on to the parts after it, and the
last part uses what is left.
  setup       `source speedrun/bootstrap.sh`, only in the plan when numpy, sentencepiece, pytest or triton is missing
  data        the bundled sample prepared with `python -m data.prepare_corpus`, only in the plan when no FineWeb shards and no
              prepared sample are here
  (1) train   train_gpt.py, the default model, compiled, ATTN_BACKEND=auto: about 100 timed steps of the default batch
              (capped at 45 s): ms/step, tokens/s, peak memory, recompiles and graph breaks after warm-up; its compile
              warm-up is reported on its own. Its checkpoint feeds (4).
  (2) tests   `pytest tests -m cuda`, then the rest of tests/test_kernels.py on the GPU (compiled Triton kernels)
  (3) kernels speedrun bench kernels: each Triton kernel against eager and torch.compile of its reference
  (4) eval    eval_ttt.py on the checkpoint of (1): strided, and TTT with chunks of 32 and 256 tokens
  (5) preset  train_gpt.py with PRESET=pg1855 at its own shape and batch, compiled: the warm-up of both its graphs
              (with and without the repeated layers), 20 steps with the recurrence switched on half-way, recompiles
  (6) matrix  speedrun bench train over the backends that can run on CUDA x FUSED x COMPILE, at a quarter of the
              default batch: the rows that fit in the time left

The report (report.md) and the tarball of every raw output (raw.tar.gz: each part's output, the training logs, the
evaluation JSONs) are rewritten, each atomically, when the run starts, after every part and every 30 s during one, so a
run stopped at any moment still leaves a consistent pair in DIR: what was measured, and which part was running. The raw
outputs and the checkpoint are also kept in logs/gpu_report_<time>/. One process on one GPU (the first): the figures
are per GPU. Without CUDA it prints its plan and exits 0 (`--run-without-cuda` runs it anyway, to check this script on a
CPU with a tiny model given by --env; the report then says "no GPU").

On a machine with everything installed the setup part is not in the plan; the data part is, unless FineWeb shards or
the prepared sample are there.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from data.files import write_atomic

FINEWEB_DIR = ROOT / "data" / "datasets" / "fineweb10B_sp1024"
FINEWEB_TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SAMPLE_DIR = ROOT / "data" / "datasets" / "peps_sp1024_spread"  # where run.sh prepares the sample too
SAMPLE_INPUT = ROOT / "data" / "sample" / "peps.jsonl.gz"

DEFAULT_BUDGET_S = 600  # enough for every part on one GPU at the default sizes
RESERVE_S = 10  # the machine probe at the start (a fresh Python importing torch) and the report writing
REFRESH_S = 30  # during a part, the report and the tarball are rewritten this often
FINAL_WRITE_S = 3  # of the reserve: the last report and tarball, after the last part's deadline
ARCHIVE_LIMIT_BYTES = 16 * 2**20  # the raw archive stays small enough to keep beside the report
MEMBER_LIMIT_BYTES = 4 * 2**20  # a raw file larger than this goes into the tarball as its head and tail
# What the parts import besides torch (the machine has torch). speedrun/bootstrap.sh installs whichever is missing.
NEEDED_MODULES = ("numpy", "sentencepiece", "pytest", "triton")
TEST_NEEDS = ("pytest", "numpy", "sentencepiece", "triton")
# -v: one line per test, so a run stopped at its deadline still counts; no -x, and a module that fails to import (a new
# torch, say) is one error while the other modules' tests still run; --durations: what the next plan should budget for
PYTEST_ARGS = ["-v", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--durations=15"]

# (1): the default model and batch. 5 warm-up steps: the first compiles and autotunes, the next ones absorb a second
# compile (once optimizer state exists, say) before the clock starts, so that `recompiles` counts only what happens in
# the timed steps. The cap on the timed steps keeps a slow step from eating the parts after it.
TRAIN_STEPS, TRAIN_WARMUP_STEPS, TRAIN_CAP_S, VAL_DOCS = 100, 5, 45, 16
TTT_CHUNKS = (32, 256)
# (1) again for the frontier preset at its own shape and batch: 20 steps, the repeated layers from step 10, both graphs
# compiled in its warm-up (the step count stays far below the preset's 1500-step momentum warm-up: a speed figure only)
PRESET_ENV = {"PRESET": "pg1855", "ITERATIONS": "20", "RECUR_START_FRAC": "0.5", "WARMUP_STEPS": "3",
              "MAX_WALLCLOCK_SECONDS": "0", "EVAL_MODES": "flat", "VAL_MAX_DOCS": "4"}
EVAL_DOCS = 16  # the first 16 validation documents: on FineWeb 16 short ones, on the sample 95k tokens
# (5): the matrix's runs, at a quarter of the default batch in 2 micro-batches (the default's 65,536-token micro-batch,
# so the same compiled shapes); eager rows first: they need no compile and fit in what is usually left
MATRIX_ENV = {"WARMUP_STEPS": "2", "TRAIN_BATCH_TOKENS": "131072", "TRAIN_MICRO_BATCHES": "2"}
MATRIX_STEPS = 20
MATRIX_CONFIGS = "FUSED=0 COMPILE=0;FUSED=1 COMPILE=0;FUSED=0 COMPILE=1;FUSED=1 COMPILE=1"
# train_gpt's ATTN_BACKEND=auto never picks these on CUDA (a host sync per segment and layer; a tokens x tokens mask):
# at the default batch they are not rows that can run there.
CPU_ONLY_BACKENDS = ("reference", "masked_sdpa")

# Budgets, seconds, in the order of the plan: estimates for an H200 with torch 2.11 (what each was sized for is in the
# comment). Nothing here was measured on a GPU yet: resize them from a report's `took` column and the tests' --durations.
BUDGETS = {
    "01_setup": 60,  # pip; only when a module is missing (never on the offline GPU machine)
    "02_data": 20,  # prepare_corpus.py on the sample: 6 s on 2 CPU cores
    "03_train": 230,  # Python and CUDA start ~15 s, cold compile of the 9x512 model with fullgraph, Muon's compiled
    # step and the kernels' autotuning 1-3 min, at most 45 s of timed steps, evaluation of 16 documents and checkpoint
    "04_cuda_tests": 55,  # 24 tests: Inductor compiles (fused model, each op), flex attention for the gist test
    "05_kernel_tests": 35,  # 74 tests, small shapes, each kernel variant JIT-compiled once
    "06_bench_kernels": 40,  # 7 rows: Triton autotuning, torch.compile of each reference, do_bench
    "07_eval_strided": 15,  # ~10 s of start and checkpoint loading, then 16 documents
    "08_eval_ttt_chunk32": 30,  # the longest of 16 documents in 32-token steps (a 22k-token one on the sample)
    "09_eval_ttt_chunk256": 20,
    "10_train_preset": 140,  # 11x512 with MLP 4x and vocabulary 8192: two cold compiles (plain and looped), 20 steps
    # of 786,432 tokens in 8 micro-batches on one GPU (about 1 s each if 8 GPUs take 0.12 s), a 4-document evaluation
    "11_bench_train": 20,  # the least it is planned with; it takes whatever is left
}


# ----------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Part:
    key: str  # names its raw output file, <key>.txt
    title: str
    command: list[str]
    budget_s: float  # what it may use: its deadline is the end of the budgets up to and including its own
    env: dict[str, str] = field(default_factory=dict)  # set for this command, on top of the environment
    kind: str = "plain"  # how its output is read: plain, pytest, bench_kernels, bench_train, train, eval
    needs: tuple[str, ...] = ("numpy", "sentencepiece")  # modules it imports besides torch (setup installs them)
    needs_cuda: bool = False  # without CUDA (--run-without-cuda) it is skipped: it would measure nothing of a GPU
    condition: str = ""  # when it runs at all (shown in the plan)
    info: dict = field(default_factory=dict)  # what the report needs to read its output (paths, expected rows)
    cut: str = ""  # why the plan has no time for it ("" when it has)


@dataclass
class Outcome:
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: why", "cut: why", "running", "stopped: why"
    seconds: float = 0.0
    output: str = ""


@dataclass
class DataChoice:
    path: Path
    tokenizer: Path | None  # None: DATA_PATH/tokenizer.model
    name: str  # short, for the README rows
    description: str
    needs_preparing: bool


def attention_backends() -> list[str]:
    """kernels.attention.VARLEN_BACKENDS, read from the source (no import: the plan is printed before anything is set
    up)."""
    tree = ast.parse((ROOT / "kernels" / "attention.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VARLEN_BACKENDS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("error: kernels/attention.py has no VARLEN_BACKENDS tuple")


def choose_data(data: str | None) -> DataChoice:
    if data:
        path = Path(data).resolve()
        return DataChoice(path, None, display_path(path), f"`{display_path(path)}` (--data)", needs_preparing=False)
    if any(FINEWEB_DIR.glob("fineweb_val_*.bin")):
        shards = len(list(FINEWEB_DIR.glob("fineweb_train_*.bin")))
        return DataChoice(FINEWEB_DIR, FINEWEB_TOKENIZER, "FineWeb sp1024",
                          f"FineWeb sp1024 (`{display_path(FINEWEB_DIR)}`, {shards} train shards)",
                          needs_preparing=False)
    return DataChoice(SAMPLE_DIR, None, "the bundled sample",
                      f"the bundled sample (`{display_path(SAMPLE_DIR)}`, 60 validation documents; no FineWeb shards "
                      "here)", needs_preparing=not (SAMPLE_DIR / "manifest.json").is_file())


def build_plan(budget_s: float, data: DataChoice, work_dir: Path, run_id: str, extra_env: list[str],
               missing: list[str]) -> tuple[list[Part], list[str]]:
    """The parts, most important first, with their budgets fitted into budget_s; and the lines saying which conditional
    parts are not in the plan, and why. missing: the NEEDED_MODULES that cannot be imported here."""
    python = sys.executable
    raw_dir = work_dir / "raw"
    data_env = {"DATA_PATH": str(data.path)}
    if data.tokenizer:
        data_env["TOKENIZER_PATH"] = str(data.tokenizer)
    user_env = dict(item.split("=", 1) for item in extra_env)
    parts, left_out = [], []

    if missing:
        parts.append(Part("01_setup", "setup: install missing packages (speedrun/bootstrap.sh)",
                          ["bash", "-c", "source speedrun/bootstrap.sh"], BUDGETS["01_setup"], env={"PYTHON": python},
                          needs=(), condition=f"{', '.join(missing)} cannot be imported"))
    else:
        left_out.append(f"setup: not needed ({', '.join(NEEDED_MODULES)} all import)")
    if data.needs_preparing:
        parts.append(Part("02_data", "data: prepare the bundled sample",
                          [python, "-m", "data.prepare_corpus", "--input", str(SAMPLE_INPUT), "--out", str(data.path),
                           "--val-docs", "60", "--val-select", "spread"], BUDGETS["02_data"],
                          condition="the prepared sample is not here"))
    else:
        left_out.append(f"data: not needed (`{display_path(data.path)}` is there)")

    train_env = {**data_env, "RUN_ID": run_id, "ITERATIONS": str(TRAIN_STEPS), "WARMUP_STEPS": str(TRAIN_WARMUP_STEPS),
                 "MAX_WALLCLOCK_SECONDS": str(TRAIN_CAP_S), "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
                 "EVAL_MODES": "flat", "VAL_MAX_DOCS": str(VAL_DOCS), "LOG_DIR": str(raw_dir),
                 "CHECKPOINT_DIR": str(work_dir / "checkpoints"), **user_env}
    checkpoint = Path(train_env["CHECKPOINT_DIR"], f"{train_env['RUN_ID']}.pt")
    parts.append(Part("03_train", "(1) the default model, compiled, ATTN_BACKEND=auto", [python, "train_gpt.py"],
                      BUDGETS["03_train"], env=train_env, kind="train",
                      info={"log": Path(train_env["LOG_DIR"], f"{train_env['RUN_ID']}.txt"), "checkpoint": checkpoint}))

    parts.append(Part("04_cuda_tests", "(2) CUDA tests (`-m cuda`)",
                      [python, "-m", "pytest", "tests", "-m", "cuda", *PYTEST_ARGS], BUDGETS["04_cuda_tests"],
                      kind="pytest", needs=TEST_NEEDS))
    # tests/conftest.py switches the Triton interpreter on only where torch sees no CUDA: on the GPU these tests run the
    # compiled kernels (and the report's commands never inherit TRITON_INTERPRET).
    parts.append(Part("05_kernel_tests", "(2) the rest of tests/test_kernels.py, on the GPU",
                      [python, "-m", "pytest", "tests/test_kernels.py", "-m", "not cuda", *PYTEST_ARGS],
                      BUDGETS["05_kernel_tests"], kind="pytest", needs=TEST_NEEDS, needs_cuda=True))
    parts.append(Part("06_bench_kernels", "(3) kernel benchmark", [python, "-m", "speedrun", "bench", "kernels"],
                      BUDGETS["06_bench_kernels"], kind="bench_kernels", needs=("triton",)))

    eval_runs = [("07_eval_strided", "(4) strided evaluation", ["--mode", "strided"])]
    eval_runs += [(f"{8 + i:02d}_eval_ttt_chunk{chunk}", f"(4) TTT evaluation, chunk {chunk}",
                   ["--mode", "ttt", "--chunk", str(chunk)]) for i, chunk in enumerate(TTT_CHUNKS)]
    for key, title, mode_args in eval_runs:
        out = raw_dir / f"{key}.json"
        parts.append(Part(key, title, [python, "eval_ttt.py", "--checkpoint", str(checkpoint), *mode_args,
                                       "--max-docs", str(EVAL_DOCS), "--out", str(out)],
                          BUDGETS[key], kind="eval", condition="needs the checkpoint of (1)",
                          info={"json": out, "checkpoint": checkpoint}))

    preset_shape = "with --env's settings" if user_env else "(its 11x512 shape, vocabulary 8192)"
    preset_env = {**train_env, **PRESET_ENV, "RUN_ID": f"{run_id}_{PRESET_ENV['PRESET']}", **user_env}
    parts.append(Part("10_train_preset", f"(5) PRESET={PRESET_ENV['PRESET']}, compiled: both graphs' warm-up, first "
                      "steps", [python, "train_gpt.py"], BUDGETS["10_train_preset"], env=preset_env, kind="train",
                      info={"log": Path(preset_env["LOG_DIR"], f"{preset_env['RUN_ID']}.txt"),
                            "model": f"PRESET={PRESET_ENV['PRESET']} " + preset_shape}))

    backends = [b for b in attention_backends() if b not in CPU_ONLY_BACKENDS]
    bench_common = ["--data", str(data.path), "--steps", str(MATRIX_STEPS)]
    for key, value in {**MATRIX_ENV, **({"TOKENIZER_PATH": str(data.tokenizer)} if data.tokenizer else {}),
                       **user_env}.items():
        bench_common += ["--env", f"{key}={value}"]
    parts.append(Part("11_bench_train", "(6) training matrix, ATTN_BACKEND x FUSED x COMPILE",
                      [python, "-m", "speedrun", "bench", "train", *bench_common, "--timeout", "150",
                       "--backends", ",".join(backends), "--configs", MATRIX_CONFIGS,
                       "--log-dir", str(raw_dir / "bench_train_logs")],
                      BUDGETS["11_bench_train"], kind="bench_train",
                      condition="uses what is left; a backend that does not load shows as such, without a run",
                      info={"backends": backends, "configs": MATRIX_CONFIGS.split(";"), "common": bench_common,
                            "log_dir": raw_dir / "bench_train_logs"}))
    fit_budgets(parts, budget_s)
    return parts, left_out


def fit_budgets(parts: list[Part], budget_s: float) -> None:
    """In plan order: each part gets its budget while the total has room for it; the first that does not fit gets what
    is left if that is at least half its budget, else it is cut, and every part after it is cut; the last part gets
    everything left."""
    left, cutting = budget_s - RESERVE_S, False
    for i, part in enumerate(parts):
        wanted = part.budget_s
        granted = left if i == len(parts) - 1 else min(wanted, left)
        cutting = cutting or granted < wanted / 2 or granted <= 0
        if cutting:
            part.budget_s, part.cut = 0, f"cut: no room in the {budget_s:.0f} s budget"
            continue
        part.budget_s = granted
        left -= granted


def display_path(path) -> str:
    """Paths relative to the repository (every command runs there), when they are inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def shell_line(part: Part) -> str:
    """The command as one would type it in the repository's root."""
    def show(word: str) -> str:
        if word == sys.executable:
            return "python"
        key, equals, value = word.rpartition("=")  # KEY=/path, as in --env TOKENIZER_PATH=/...
        return key + equals + display_path(value) if value.startswith("/") else word

    env = [f"{k}={shlex.quote(show(v))}" for k, v in part.env.items() if k != "PYTHON"]
    return " ".join(env + [shlex.join(show(w) for w in part.command)])


def plan_text(parts: list[Part], left_out: list[str], budget_s: float, data: DataChoice) -> str:
    lines = [f"data: {data.description}",
             f"plan for a {budget_s:.0f} s budget, most important first (a part is stopped at its deadline, the end of "
             "its budget counted from the start; time it leaves passes on, and the last part uses what is left):",
             f"  {RESERVE_S:4.0f} s  machine probe; report.md and raw.tar.gz written at the start, after every part and "
             f"every {REFRESH_S} s"]
    for part in parts:
        when = f"  [{part.condition}]" if part.condition else ""
        budget = f"{part.budget_s:4.0f} s" if not part.cut else "   - s"
        lines.append(f"  {budget}  {part.title}{when}" + (f"  -- {part.cut}" if part.cut else "")
                     + f"\n          $ {shell_line(part)}")
    lines += [f"  not in the plan: {line}" for line in left_out]
    total = RESERVE_S + sum(p.budget_s for p in parts)
    lines.append(f"  budgets add up to {total:.0f} s of the {budget_s:.0f} s budget")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Running


class Stopped(Exception):
    """The run was told to stop (SIGTERM, or Ctrl-C): the part running is ended, the report written as it stands."""


def child_environment(part: Part) -> dict[str, str]:
    env = {**os.environ, **part.env, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the GPU runs compiled kernels; an inherited interpreter switch would fake it
    return env


def run_part(part: Part, timeout_s: float, raw_dir: Path, on_tick=lambda: None, tick_s: float = REFRESH_S) -> Outcome:
    """Run one command, its stdout and stderr into raw_dir/<key>.txt; stop its whole process group at timeout_s (or when
    this process is told to stop); call on_tick every tick_s seconds meanwhile."""
    log_path = raw_dir / f"{part.key}.txt"
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shell_line(part)}\n# allowed {timeout_s:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(part.command, cwd=ROOT, env=child_environment(part), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                left = timeout_s - (time.monotonic() - start)
                try:
                    returncode = proc.wait(timeout=max(min(tick_s, left), 0))
                    status = "ok" if returncode == 0 else f"failed (exit {returncode})"
                    break
                except subprocess.TimeoutExpired:
                    if left <= tick_s:
                        _kill(proc)
                        status = f"timed out after {timeout_s:.0f} s"
                        break
                    on_tick()
        except BaseException:
            _kill(proc)
            raise
    output = log_path.read_text(encoding="utf-8", errors="replace")
    return Outcome(status, time.monotonic() - start, output)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: this ends the command and its children only
    except ProcessLookupError:
        pass
    proc.wait()


def missing_modules(python: str = sys.executable) -> list[str]:
    """The NEEDED_MODULES that python cannot find, asked of a fresh interpreter (setup may have installed some since
    this one started)."""
    probe = f"import importlib.util as u; print(' '.join(m for m in {NEEDED_MODULES!r} if u.find_spec(m) is None))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else list(NEEDED_MODULES)


def run_plan(parts: list[Part], raw_dir: Path, outcomes: dict[str, Outcome], missing: list[str], cuda: bool,
             progress=lambda: None, log=print, clock=time.monotonic, end_by: float | None = None) -> None:
    """Run the parts in order, each until its deadline, filling outcomes (every part gets one, run or not); progress()
    is called before and after each part and every REFRESH_S seconds during one. end_by (a clock() value): no deadline
    is later, so a slow start of the whole run costs the last parts, not the first."""
    deadline = clock()
    for number, part in enumerate(parts, 1):
        deadline += part.budget_s
        if end_by is not None:
            deadline = min(deadline, end_by)
        reason = part.cut or skip_reason(part, outcomes, missing, cuda)
        left = deadline - clock()
        if reason is None and left < 1:
            reason = "skipped: no time left before its deadline"
        if reason is not None:
            outcomes[part.key] = Outcome(reason)
            log(f"[{number}/{len(parts)}] {part.title}: {reason}")
            continue
        log(f"[{number}/{len(parts)}] {part.title} (at most {left:.0f} s)\n    $ {shell_line(part)}")
        began = clock()
        outcomes[part.key] = Outcome("running")
        progress()

        def tick(part=part, began=began):
            outcomes[part.key] = Outcome(f"running ({clock() - began:.0f} s so far)")
            progress()

        outcomes[part.key] = run_part(part, left, raw_dir, on_tick=tick, tick_s=REFRESH_S)
        log(f"    -> {outcomes[part.key].status} in {outcomes[part.key].seconds:.0f} s")
        if part.key == "01_setup":
            missing[:] = missing_modules()
        progress()


def skip_reason(part: Part, outcomes: dict[str, Outcome], missing: list[str], cuda: bool) -> str | None:
    """Why a part does not run (None: it runs). missing: the needed modules that cannot be imported."""
    lacking = [m for m in part.needs if m in missing]
    if lacking:
        return f"skipped: {', '.join(lacking)} cannot be imported" + (" (see the setup part)" if "01_setup" in outcomes
                                                                       else "")
    if part.needs_cuda and not cuda:
        return "skipped: no CUDA here (on a CPU this is part of ./test.sh, not a GPU figure)"
    if part.kind == "eval":
        train = outcomes.get("03_train")
        if train is None or train.status != "ok" or not part.info["checkpoint"].is_file():
            return f"skipped: no checkpoint (the training run: {train.status if train else 'not run'})"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Reading the tools' outputs


def markdown_table(text: str) -> list[dict[str, str]]:
    """The first markdown table in text, as one dict per row keyed by the header's cells."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1]):
            header = _cells(line)
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
            return rows
    return []


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_pytest(output: str) -> dict:
    """Counts from pytest's summary line; if the run was stopped before it, counts from the per-test lines (-v)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    summary = re.findall(r"^=+ (.*?) in [\d.]+s(?: \([^)]*\))? =+$", output, re.M)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if summary:
        for number, word in re.findall(r"(\d+) (\w+)", summary[-1]):
            word = {"error": "errors"}.get(word, word)
            if word in counts:
                counts[word] = int(number)
        return {**counts, "failures": failures, "complete": True}
    for word in re.findall(r"^\S+::.*? (PASSED|FAILED|SKIPPED|ERROR)\b", output, re.M):
        counts[{"ERROR": "errors"}.get(word, word.lower())] += 1
    failures = re.findall(r"^(\S+::.*?) (?:FAILED|ERROR)\b", output, re.M)
    return {**counts, "failures": failures, "complete": False}


def parse_bench_kernels(output: str) -> dict:
    device = re.search(r"^device: ([^;]*)", output, re.M)
    rows = markdown_table(output)
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("$ ", "# allowed "))]
    return {"device": device.group(1) if device else None, "rows": rows,
            "message": None if rows else (lines[-1] if lines else "no output")}


def kernel_column(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(op, the README kernels table's "<GPU> vs torch.compile" cell, faster than compile at every shape?)."""
    by_op: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row)
    result = []
    for op, op_rows in by_op.items():
        cells = [f"{r['speedup vs compile']} ({r['Triton ms']} vs {r['compile ms']} ms"
                 + (f", {r['shape']})" if len(op_rows) > 1 else ")") for r in op_rows]
        faster = all(float(r["speedup vs compile"].rstrip("x")) > 1 for r in op_rows)
        result.append((op, "; ".join(cells), "yes" if faster else "no"))
    return result


def expected_bench_rows(info: dict) -> list[tuple[str, str]]:
    return [(backend, config) for backend in info["backends"] for config in info["configs"]]


def bench_train_rows(output: str, info: dict, part_status: str) -> list[dict[str, str]]:
    """One row per backend x configuration planned: its figures, or why there are none."""
    found = {(row["attention"].split(" (")[0], row["config"]): row for row in markdown_table(output)}
    rows = []
    for backend, config in expected_bench_rows(info):
        row = found.get((backend, config))
        if row is None:
            rows.append({"attention": backend, "config": config, "status": f"not run (bench_train: {part_status})"})
        elif row["step_avg"].endswith(" ms"):
            rows.append({**row, "attention": backend, "status": "ok"})
        else:
            rows.append({"attention": backend, "config": config, "status": row["step_avg"]})
    return rows


def bench_train_run_id(backend: str, config: str) -> str:
    """The RUN_ID speedrun bench train gives a run (its log is <log dir>/<RUN_ID>.txt)."""
    return f"bench_{backend}_" + "_".join(f"{k.lower()}{v}" for k, v in (kv.split("=") for kv in config.split()))


STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:([\d.]+)ms tokens_per_s:(\d+)",
                       re.M)


def parse_train_log(text: str) -> dict:
    """The figures of a train_gpt.py log (the embedded source files at its top are skipped)."""
    ends = [m.end() for m in re.finditer(r"^#### end .*$", text, re.M)]
    body = text[ends[-1]:] if ends else text

    def first(pattern: str):
        match = re.search(pattern, body, re.M)
        return match.groups() if match else None

    def number(pattern: str) -> int | None:
        found = first(pattern)
        return int(found[0]) if found else None

    steps = STEP_LINE.findall(body)
    compile_stats = first(r"^compile_stats: recompiles:(\d+) graph_breaks:(\d+)")
    warmup = first(r"^compile_warmup steps:(\d+) time:(\d+)ms")
    stopped = first(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/(\d+)")
    return {
        "last_step": dict(zip(("step", "iterations", "train_loss", "train_time_ms", "step_avg_ms", "tokens_per_s"),
                              steps[-1])) if steps else None,
        "peak_memory_mib": number(r"^peak_memory: (\d+)MiB"),
        "recompiles": int(compile_stats[0]) if compile_stats else None,
        "graph_breaks": int(compile_stats[1]) if compile_stats else None,
        "compile_warmup": {"steps": int(warmup[0]), "ms": int(warmup[1])} if warmup else None,
        "stopped_early": {"train_time_ms": int(stopped[0]), "step": int(stopped[1])} if stopped else None,
        "attention_backend": (first(r"^attention_backend: (\S+)") or [None])[0],
        "fused_ops": (first(r"^fused_ops: (.*)$") or [None])[0],
        "final_eval": re.findall(r"^final_eval (.*)$", body, re.M),
        "error": (first(r"^error: (.*)$") or [None])[0],
        "batch_tokens": number(r"^hparam train_batch_tokens=(\d+)"),
        "micro_batches": number(r"^hparam train_micro_batches=(\d+)"),
        "compile": (first(r"^hparam compile=(\S+)") or [None])[0],
        "cap_s": (first(r"^hparam max_wallclock_seconds=(\S+)") or [None])[0],
        "steps": number(r"^final val_loss:\S+ val_bpb:\S+ mode:\S+ steps:(\d+)"),
    }


def parse_eval_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    config = result["config"]
    return {"mode": config["mode"], "window": config["window"], "stride": config.get("stride"),
            "chunk": config.get("chunk"), "docs": config["num_docs"], "tokens": result["tokens"],
            "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"], "bpb": result["bpb"],
            "attention_backend": config.get("attention_backend")}


# ----------------------------------------------------------------------------------------------------------------------
# The machine


def machine_info(python: str = sys.executable) -> dict:
    """Device and versions, asked of a fresh interpreter (packages may have been installed since this one started)."""
    probe = r"""
import importlib, importlib.metadata as md, json, platform
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
except ImportError:
    info.update(torch=None, cuda=None, cuda_available=False)
for module, dists in (("triton", ("triton",)), ("flash_attn", ("flash-attn", "flash_attn")),
                      ("flash_attn_interface", ("flash_attn_3", "flash-attn-3", "flashattn-hopper"))):
    try:
        m = importlib.import_module(module)
    except ModuleNotFoundError:
        info[module] = "not installed"
        continue
    except Exception as e:  # installed but broken (an ABI mismatch, say): that is worth reporting
        info[module] = f"import fails ({type(e).__name__}: {str(e)[:80]})"
        continue
    version = getattr(m, "__version__", None)
    for dist in dists:
        try:
            version = version or md.version(dist)
        except md.PackageNotFoundError:
            pass
    info[module] = version or "installed, version unknown"
print(json.dumps(info))
"""
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, IndexError, json.JSONDecodeError):
        info = {"python": sys.version.split()[0], "torch": None, "cuda": None, "cuda_available": False}
    info["gpus"] = nvidia_smi_gpus()
    return info


def nvidia_smi_gpus() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(("name", "driver", "memory"), (c.strip() for c in line.split(","))))
            for line in out.strip().splitlines() if line.count(",") == 2]


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head or "unknown") + (" with uncommitted changes" if dirty else "")


def gpu_short_name(info: dict) -> str:
    """The first GPU's name as the README's kernels column says it ("NVIDIA H200" -> "H200"); "CPU" without one."""
    gpus = info.get("gpus") or []
    return gpus[0]["name"].removeprefix("NVIDIA ").strip() if gpus else "CPU"


def machine_label(info: dict, date: str) -> str:
    gpus = info.get("gpus") or []
    if not gpus:
        return f"no GPU (CPU), {date}"
    return f"1 of {len(gpus)}x {gpus[0]['name']}, {date}" if len(gpus) > 1 else f"1x {gpus[0]['name']}, {date}"


# ----------------------------------------------------------------------------------------------------------------------
# The report


def bench_train_command(info: dict, backend: str, config: str) -> str:
    part = Part("", "", [sys.executable, "-m", "speedrun", "bench", "train", *info["common"], "--backends", backend,
                         "--configs", config], 0)
    return shell_line(part)


def thousands(value) -> str:
    return f"{int(float(value)):,}"


def read_log(part: Part, outcome: Outcome) -> str:
    """A training part's log, or what it printed when it wrote no log."""
    return part.info["log"].read_text(errors="replace") if part.info["log"].is_file() else outcome.output


def build_report(parts: list[Part], outcomes: dict[str, Outcome], info: dict, context: dict) -> str:
    """The markdown report. context: date, budget_s, total_s, data (DataChoice), left_out, command, revision, model
    (what the training rows call the model), finished (False while the run is still going)."""
    date, machine, gpu = context["date"], machine_label(info, context["date"]), gpu_short_name(info)
    by_key = {p.key: p for p in parts}

    def outcome_of(key: str) -> Outcome:
        return outcomes.get(key, Outcome("not reached" if context["finished"] else "not started yet"))

    lines = [f"# GPU report, {date}", ""]
    if not context["finished"]:
        lines += ["**Written while the run was still going: a part marked `running` is where it was when this report "
                  "was last written (if the run stopped there, it was stopped from outside).**", ""]
    lines += [f"`{context['command']}`, {context['total_s']:.0f} s of a {context['budget_s']:.0f} s budget, at commit "
              f"{context['revision']}. Raw outputs of every part: `raw.tar.gz` beside this report (`raw/<part>.txt`, "
              "the training logs, the evaluation JSONs, `raw/bench_train_logs/`).", "", "## Machine", ""]
    gpus = info.get("gpus") or []
    if gpus:
        lines.append(f"- device: {len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory']}, driver {gpus[0]['driver']}); "
                     "the report uses the first")
    else:
        lines.append("- device: no GPU (nvidia-smi absent or silent): CPU figures")
    lines += [f"- python {info.get('python')}, torch {info.get('torch')}, CUDA {info.get('cuda') or 'none'}, "
              f"triton {info.get('triton', 'not installed')}",
              f"- flash-attn: FA2 `flash_attn` {info.get('flash_attn', 'not installed')}; FA3 `flash_attn_interface` "
              f"{info.get('flash_attn_interface', 'not installed')}",
              f"- data: {context['data'].description}", ""]

    lines += ["## Parts", "", "| part | status | took | budget | command |", "| --- | --- | ---: | ---: | --- |"]
    for part in parts:
        outcome = outcome_of(part.key)
        took = f"{outcome.seconds:.0f} s" if outcome.seconds else ""
        budget = f"{part.budget_s:.0f} s" if not part.cut else "-"
        lines.append(f"| {part.title} | {outcome.status} | {took} | {budget} | `{shell_line(part)}` |")
    lines += [f"| {line.split(':')[0]} | {line.split(': ', 1)[1]} | | - | |" for line in context["left_out"]]
    incomplete = [p.title for p in parts if outcome_of(p.key).status != "ok"]
    lines += ["", f"Not complete: {', '.join(incomplete)}." if incomplete else "Every part ran to the end.", ""]

    readme_rows, kernel_rows, details = [], [], []

    def row(what: str, figure: str, command: str) -> None:
        readme_rows.append(f"| {what} | {figure} | `{command}` | {machine} |")

    def not_run(outcome: Outcome) -> bool:
        return outcome.status.startswith(("skipped", "cut", "not ", "running"))

    # (1) the training runs: the default model's (its checkpoint feeds the evaluations) and the preset's
    steps_done = "?"  # of the default model's run, whose checkpoint the evaluations score
    for part in [p for p in parts if p.kind == "train"]:
        outcome = outcome_of(part.key)
        log_path, body = part.info["log"], read_log(part, outcome)
        train = parse_train_log(body)
        if part.key == "03_train":
            steps_done = train["steps"] or "?"
        model = f"{part.info.get('model', context['model'])}, {context['data'].name}"
        if train["last_step"]:
            last = train["last_step"]
            batch = (f"{train['batch_tokens']:,} tokens/step in {train['micro_batches']} micro-batches"
                     if train["batch_tokens"] else "batch not logged")
            compile_note = ("recompiles and graph breaks not logged" if train["recompiles"] is None else
                            f"{train['recompiles']} recompiles and {train['graph_breaks']} graph breaks after warm-up")
            peak = f"{train['peak_memory_mib']:,} MiB" if train["peak_memory_mib"] is not None else "not logged"
            figure = (f"step_avg {last['step_avg_ms']} ms, {thousands(last['tokens_per_s'])} tokens/s (step "
                      f"{last['step']}/{last['iterations']}, {batch}), peak memory {peak}, {compile_note}, attention "
                      f"{train['attention_backend']}, fused: {train['fused_ops']}")
            if train["stopped_early"]:
                figure += (f"; the timed steps stopped at step {train['stopped_early']['step']} "
                           f"({train['stopped_early']['train_time_ms']} ms) at the "
                           f"MAX_WALLCLOCK_SECONDS={train['cap_s']} cap")
            if outcome.status != "ok":
                figure += f" ({outcome.status})"
        else:
            figure = outcome.status + (f": {train['error']}" if train["error"] else "")
            if outcome.status.startswith("timed out") and train["compile_warmup"] is None:
                figure += " (no step timed: it was still in its compile warm-up)"
        compiled = {"True": "compiled", "False": "eager"}.get(train["compile"] or "", "compile not logged")
        row(f"train step, {model}, {compiled}, ATTN_BACKEND={part.env.get('ATTN_BACKEND', 'auto')}", figure,
            shell_line(part))
        warmup = train["compile_warmup"]
        if warmup:
            row(f"compile warm-up, {model}", f"{warmup['ms'] / 1000:.1f} s for {warmup['steps']} warm-up steps "
                "(compile, autotuning; not counted in step_avg)", shell_line(part))
        elif not not_run(outcome):
            row(f"compile warm-up, {model}", "no `compile_warmup` line in the log" + (f" ({outcome.status})" if
                                                                                       outcome.status != "ok" else ""),
                shell_line(part))
        if train["last_step"] or train["error"]:
            details += [f"### {part.title}", "", f"log: `raw/{log_path.name}`", "", "```text"]
            shown = {"1", "10", train["last_step"]["step"] if train["last_step"] else ""}
            details += [line for line in body[-200_000:].splitlines()
                        if line.startswith(("gpus:", "attention_backend", "fused_ops", "compile_warmup", "recurrence",
                                            "stopping",
                                            "compile_stats", "loader:", "final_eval", "peak_memory", "error"))
                        or (STEP_LINE.match(line) and line[len("step:"):].split("/")[0] in shown)]
            details += ["```", ""]

    # (2) the tests
    for key in ("04_cuda_tests", "05_kernel_tests"):
        part, outcome = by_key[key], outcome_of(key)
        if not_run(outcome):
            figure = outcome.status
        else:
            counts = parse_pytest(outcome.output)
            figure = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped")
            if not counts["complete"]:
                figure += f" (incomplete: {outcome.status})"
            details += [f"### {part.title}", "", figure + f"; output: `raw/{key}.txt`.", ""]
            details += [f"- failed: `{name}`" for name in counts["failures"]] + ([""] if counts["failures"] else [])
        row(part.title.removeprefix("(2) "), figure, shell_line(part))

    # (3) bench_kernels
    part, outcome = by_key["06_bench_kernels"], outcome_of("06_bench_kernels")
    kernels = parse_bench_kernels(outcome.output)
    if kernels["rows"]:
        for op, cell, faster in kernel_column(kernels["rows"]):
            kernel_rows.append(f"| `{op}` | {cell} | {faster} |")
        details += [f"### {part.title}", "", f"device: {kernels['device']}"
                    + (f" ({outcome.status}: the rows it reached)" if outcome.status != "ok" else ""), ""]
        details += [line for line in outcome.output.splitlines() if line.startswith("|")] + [""]
        row("each kernel vs `torch.compile` of its reference", "see the kernels rows below"
            + (f" ({outcome.status})" if outcome.status != "ok" else ""), shell_line(part))
    else:
        why = outcome.status if not outcome.status.startswith(("ok", "failed")) else kernels["message"]
        row("each kernel vs `torch.compile` of its reference", f"not measured: {why}", shell_line(part))

    # (4) evaluation
    eval_table = []
    for part in parts:
        if part.kind != "eval":
            continue
        outcome = outcome_of(part.key)
        result = parse_eval_json(part.info["json"]) if outcome.status == "ok" else None
        if result is None:
            figure = outcome.status if outcome.status != "ok" else "ok, but no results JSON"
            row(part.title.removeprefix("(4) "), figure, shell_line(part))
            continue
        knobs = (f"W={result['window']} S={result['stride']}" if result["mode"] == "strided"
                 else f"W={result['window']} C={result['chunk']}")
        row(f"{result['mode']} evaluation {knobs}, {result['docs']} documents, attention "
            f"{result['attention_backend']}",
            f"{result['tokens_per_s']:,.0f} tokens/s ({result['tokens']:,} tokens in {result['seconds']:.1f} s; "
            f"BPB {result['bpb']:.4f} after the {steps_done}-step run)", shell_line(part))
        eval_table.append(f"| {result['mode']} | {knobs} | {result['docs']} | {result['tokens']:,} "
                          f"| {result['seconds']:.1f} s | {result['tokens_per_s']:,.0f} | {result['bpb']:.4f} |")
    if eval_table:
        details += ["### (4) Evaluation", "", "| mode | settings | documents | tokens | time | tokens/s | BPB |",
                    "| --- | --- | ---: | ---: | ---: | ---: | ---: |"] + eval_table + [""]

    # (5) the matrix
    part, outcome = by_key["11_bench_train"], outcome_of("11_bench_train")
    common = part.info["common"]
    matrix_env = [common[i + 1] for i, word in enumerate(common[:-1]) if word == "--env"]
    benches = bench_train_rows(outcome.output, part.info, outcome.status)
    for bench in benches:
        what = f"train step, {context['model']}, ATTN_BACKEND={bench['attention']} {bench['config']}"
        same_backend = [b for b in benches if b["attention"] == bench["attention"]]
        if bench["status"].startswith("not available") and all(b["status"] == bench["status"] for b in same_backend):
            if bench is same_backend[0]:  # one row for a backend that cannot load here
                row(f"train step, {context['model']}, ATTN_BACKEND={bench['attention']}", bench["status"],
                    bench_train_command(part.info, bench["attention"], MATRIX_CONFIGS))
            continue
        if bench["status"] == "ok":
            figure = (f"{bench['step_avg']}/step, {bench['tokens/s per process']} tokens/s, peak "
                      f"{bench['peak memory']}, fused: {bench['fused ops']}, compile: {bench['compile']}")
            run_log = part.info["log_dir"] / f"{bench_train_run_id(bench['attention'], bench['config'])}.txt"
            run = parse_train_log(run_log.read_text(errors="replace")) if run_log.is_file() else None
            if run and run["batch_tokens"]:
                figure += f", {run['batch_tokens']:,} tokens/step"
            if run and run["compile_warmup"]:
                figure += (f"; compile warm-up {run['compile_warmup']['ms'] / 1000:.1f} s "
                           f"({run['compile_warmup']['steps']} steps)")
        else:
            figure = bench["status"]
        row(what, figure, bench_train_command(part.info, bench["attention"], bench["config"]))
    if outcome.output:
        details += [f"### {part.title}", "", f"each run: {MATRIX_STEPS} timed steps, {' '.join(matrix_env)}; "
                    "logs in `raw/bench_train_logs/`", ""]
        details += [line for line in outcome.output.splitlines() if line.startswith("|")] + [""]

    lines += ["## Rows for the README", "", "Measured figures (`what | figure | command | machine`):", "",
              "| what | figure | command | machine |", "| --- | --- | --- | --- |"] + readme_rows + [""]
    lines += [f"Kernels table, column \"{gpu} vs `torch.compile`\" (speedup = compile ms / Triton ms, forward + "
              "backward):", ""]
    if kernel_rows:
        lines += [f"| op | {gpu} vs `torch.compile` | faster at every shape |", "| --- | --- | --- |"] + kernel_rows
    else:
        lines.append("not measured (see the kernel benchmark part above)")
    lines += ["", "## Details", ""] + details
    return "\n".join(lines).rstrip() + "\n"


def raw_tarball(raw_dir: Path) -> bytes:
    """raw_dir as raw/... in a .tar.gz; a file over MEMBER_LIMIT_BYTES goes in as its head and tail, and members are
    shortened further until the whole fits in ARCHIVE_LIMIT_BYTES."""
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    limit = MEMBER_LIMIT_BYTES
    while True:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for path in files:
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if len(data) > limit:
                    cut = f"\n\n[... {len(data) - limit} bytes left out by speedrun gpu-report ...]\n\n".encode()
                    data = data[:limit // 4] + cut + data[-(limit * 3 // 4):]
                member = tarfile.TarInfo(f"raw/{path.relative_to(raw_dir).as_posix()}")
                member.size, member.mtime, member.mode = len(data), int(path.stat().st_mtime), 0o644
                tar.addfile(member, io.BytesIO(data))
        if buffer.tell() <= ARCHIVE_LIMIT_BYTES - 2**20 or limit < 2**16:
            return buffer.getvalue()
        limit //= 4


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun gpu-report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for report.md and raw.tar.gz, empty or new (default: "
                        "gpu_report_<date>/)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}); the parts that do not fit are "
                             "cut, least important first")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit, even with CUDA")
    parser.add_argument("--data", default=None, help="shard folder (default: FineWeb sp1024 if downloaded, else the "
                        "bundled sample, prepared if needed)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the training run and the training matrix")
    parser.add_argument("--run-without-cuda", action="store_true",
                        help="run the plan on a machine without CUDA (to check this script; CPU figures, add --env "
                             "for a tiny model)")
    args = parser.parse_args(argv)
    bad_env = [item for item in args.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item)]
    if bad_env:
        print(f"error: --env {bad_env[0]!r}: expected KEY=VALUE", file=sys.stderr)
        return 2
    if args.budget <= 0:
        print(f"error: --budget {args.budget:g}: must be > 0", file=sys.stderr)
        return 2
    if args.data and not Path(args.data).is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
        return 2

    started = time.monotonic()
    now = datetime.datetime.now()
    date = now.strftime("%Y-%m-%d")
    out_dir = Path(args.out or f"gpu_report_{date}").resolve()
    run_id = f"gpu_report_{now.strftime('%Y%m%d_%H%M%S')}"
    work_dir = ROOT / "logs" / run_id  # raw outputs and the checkpoint, kept here too; only the tarball goes to out_dir
    data = choose_data(args.data)
    missing = missing_modules()
    parts, left_out = build_plan(args.budget, data, work_dir, run_id, args.env, missing)
    plan = plan_text(parts, left_out, args.budget, data)

    # No nvidia-smi: no CUDA, and no need to import torch to know it (the dry run stays fast).
    gpus = nvidia_smi_gpus()
    info = machine_info() if gpus and not args.plan else {"cuda_available": False, "gpus": gpus}
    if args.plan or not (info.get("cuda_available") or args.run_without_cuda):
        if not args.plan:
            where = "no CUDA device here" if not info.get("gpus") else \
                f"nvidia-smi lists {len(info['gpus'])} GPU(s), but torch {info.get('torch')} cannot use CUDA"
            print(f"{where}: this is the plan, nothing is run (on a CUDA machine it runs it and writes "
                  f"{display_path(out_dir)}/report.md and raw.tar.gz)")
        print(plan)
        return 0

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        print(f"error: --out {out_dir}: exists and is not an empty folder", file=sys.stderr)
        return 2
    if "torch" not in info:  # --run-without-cuda without nvidia-smi: the versions still belong in the report
        info = machine_info()
    raw_dir = work_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / "plan.txt").write_text(plan + "\n")
    outcomes: dict[str, Outcome] = {}
    context = {"date": date, "budget_s": args.budget, "data": data, "left_out": left_out, "revision": git_revision(),
               "model": "default model" if not args.env else "model as set by --env (see the command)",
               "command": shlex.join(["speedrun", "gpu-report", *(argv if argv is not None else sys.argv[1:])]),
               "finished": False}

    def write_outputs() -> None:
        (raw_dir / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
        context["total_s"] = time.monotonic() - started
        write_atomic(out_dir / "raw.tar.gz", raw_tarball(raw_dir))
        write_atomic(out_dir / "report.md", build_report(parts, outcomes, info, context).encode("utf-8"))

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    print(plan)
    write_outputs()
    code = 0
    try:
        run_plan(parts, raw_dir, outcomes, missing, bool(info.get("cuda_available")), progress=write_outputs,
                 end_by=started + args.budget - FINAL_WRITE_S)
    except (Stopped, KeyboardInterrupt) as why:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        running = [key for key, o in outcomes.items() if o.status.startswith("running")]
        for key in running:
            outcomes[key] = Outcome(f"stopped from outside ({why or 'SIGINT'}) during this part")
        code = 143 if isinstance(why, Stopped) else 130
    if "01_setup" in outcomes and outcomes["01_setup"].status == "ok":
        info = machine_info()  # after setup: versions of what the parts actually used
    context["finished"] = True
    write_outputs()
    print(f"report: {out_dir / 'report.md'}\nraw outputs: {out_dir / 'raw.tar.gz'} (and {raw_dir}/)")
    return code


if __name__ == "__main__":
    sys.exit(main())

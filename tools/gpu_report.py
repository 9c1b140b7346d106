"""One command for a GPU machine: run every GPU-side test and measurement of the project, write one markdown report.

    python tools/gpu_report.py                  # about 20 minutes on one H100 -> gpu_report_<date>.md + _raw/ folder
    python tools/gpu_report.py --quick          # a smoke version, about 10 minutes; its figures are not for the README
    python tools/gpu_report.py --plan           # print the plan (every command with its time budget) and exit
    python tools/gpu_report.py --out FILE.md --data DIR --env KEY=VALUE

What it runs, in this order, each part with a time budget (a part that runs past it is stopped and the report says so;
when the 20 minutes are nearly spent, the remaining parts are skipped and listed as such):
  setup        `source tools/bootstrap.sh` (installs the missing Python packages), only if one is missing
  data         the bundled sample prepared with data/prepare_corpus.py, only if no FineWeb shards and no prepared sample
  CUDA tests   `pytest tests -m cuda`, then the rest of tests/test_kernels.py on the GPU
  kernels      tools/bench_kernels.py (each Triton kernel against eager and torch.compile of its reference)
  train bench  tools/bench_train.py over ATTN_BACKEND x FUSED x COMPILE (a backend not installed shows as such)
  300 steps    train_gpt.py, default model: step time, tokens/s, peak memory, recompiles and graph breaks
  evaluation   eval_ttt.py on that run's checkpoint: strided, and TTT with chunks of 32, 64 and 256 tokens

One process on one GPU (the first): the figures are per GPU. The report has the date, device, versions, every part's
status and time, and the rows to paste into the README's tables, each with the command that produced it; the raw
outputs (every part's output, the training logs, the evaluation JSONs) go into a folder beside it, so that each figure
can be checked. Without CUDA it prints its plan and exits 0 (`--run-without-cuda` runs it anyway, to check this script
on a CPU with a tiny model given by --env; the report then says "no GPU").

The machine needs torch (with CUDA) and, for the setup part, pip access to PyPI. Offline, install numpy, sentencepiece,
pytest and triton first (from wheels), and the setup part has nothing to do.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, tools/ is on the path but the repository root is not
    sys.path.insert(0, str(ROOT))

from data.files import write_atomic  # noqa: E402 - standard library only, like this script: no numpy before setup

FINEWEB_DIR = ROOT / "data" / "datasets" / "fineweb10B_sp1024"
FINEWEB_TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SAMPLE_DIR = ROOT / "data" / "datasets" / "peps_sp1024_spread"  # where run.sh prepares the sample too
SAMPLE_INPUT = ROOT / "data" / "sample" / "peps.jsonl.gz"

FULL_BUDGET_S = 20 * 60
QUICK_BUDGET_S = 10 * 60
# What the parts import besides torch (the machine has torch). tools/bootstrap.sh installs whichever is missing.
NEEDED_MODULES = ("numpy", "sentencepiece", "pytest", "triton")
TTT_CHUNKS = (32, 64, 256)
PYTEST_ARGS = ["-v", "-rfE", "-p", "no:cacheprovider"]  # -v: one line per test, so a stopped run still counts
TEST_NEEDS = ("pytest", "numpy", "sentencepiece", "triton")


# ----------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Part:
    key: str  # names its raw output file, <key>.txt
    title: str
    command: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)  # set for this command, on top of the environment
    kind: str = "plain"  # how its output is read: plain, pytest, bench_kernels, bench_train, train, eval
    needs: tuple[str, ...] = ("numpy", "sentencepiece")  # modules it imports besides torch (setup installs them)
    condition: str = ""  # when it runs at all (shown in the plan)
    info: dict = field(default_factory=dict)  # what the report needs to read its output (paths, expected rows)


@dataclass
class Outcome:
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: why", "not needed: why"
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


def build_plan(quick: bool, data: DataChoice, raw_dir: Path, run_id: str, extra_env: list[str]) -> list[Part]:
    python = sys.executable
    data_env = {"DATA_PATH": str(data.path)}
    if data.tokenizer:
        data_env["TOKENIZER_PATH"] = str(data.tokenizer)
    user_env = dict(item.split("=", 1) for item in extra_env)
    parts = [
        Part("01_setup", "setup: install missing packages (tools/bootstrap.sh)",
             ["bash", "-c", "source tools/bootstrap.sh"], 150, env={"PYTHON": python}, needs=(),
             condition=f"only if one of {', '.join(NEEDED_MODULES)} cannot be imported"),
        Part("02_data", "data: prepare the bundled sample",
             [python, "data/prepare_corpus.py", "--input", str(SAMPLE_INPUT), "--out", str(data.path),
              "--val-docs", "60", "--val-select", "spread"], 90, condition="only if the data is not there yet"),
        Part("03_cuda_tests", "CUDA tests (`-m cuda`)", [python, "-m", "pytest", "tests", "-m", "cuda", *PYTEST_ARGS],
             100, kind="pytest", needs=TEST_NEEDS),
    ]
    if not quick:
        parts.append(Part("04_kernel_tests", "the rest of tests/test_kernels.py, on the GPU",
                          [python, "-m", "pytest", "tests/test_kernels.py", "-m", "not cuda", *PYTEST_ARGS], 100,
                          kind="pytest", needs=TEST_NEEDS))
    parts.append(Part("05_bench_kernels", "kernel benchmark", [python, "tools/bench_kernels.py"], 100,
                      kind="bench_kernels", needs=("triton",)))

    backends = attention_backends()
    # Compilation and autotuning happen in the first warm-up step; more warm-up steps would only cost time here.
    if quick:
        steps, configs, bench_env = 5, "FUSED=0 COMPILE=0;FUSED=1 COMPILE=0", {"WARMUP_STEPS": "2"}
    else:
        steps, configs = 20, "FUSED=0 COMPILE=0;FUSED=0 COMPILE=1;FUSED=1 COMPILE=0;FUSED=1 COMPILE=1"
        bench_env = {"WARMUP_STEPS": "5"}
    bench_common = ["--data", str(data.path), "--steps", str(steps)]
    for key, value in {**bench_env, **({"TOKENIZER_PATH": str(data.tokenizer)} if data.tokenizer else {}),
                       **user_env}.items():
        bench_common += ["--env", f"{key}={value}"]
    parts.append(Part("06_bench_train", "training benchmark, ATTN_BACKEND x FUSED x COMPILE",
                      [python, "tools/bench_train.py", *bench_common, "--timeout", "150" if not quick else "90",
                       "--backends", ",".join(backends), "--configs", configs,
                       "--log-dir", str(raw_dir / "bench_train_logs")],
                      420 if not quick else 120, kind="bench_train",
                      info={"backends": backends, "configs": configs.split(";"), "common": bench_common}))

    iterations = 30 if quick else 300
    train_env = {**data_env, "RUN_ID": run_id, "ITERATIONS": str(iterations), "MAX_WALLCLOCK_SECONDS": "0",
                 "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "10" if quick else "50", "EVAL_MODES": "flat",
                 "LOG_DIR": str(raw_dir), "CHECKPOINT_DIR": str(ROOT / "checkpoints"), **user_env}
    checkpoint = Path(train_env["CHECKPOINT_DIR"], f"{run_id}.pt")
    parts.append(Part("07_train", f"{iterations}-step run of the default model", [python, "train_gpt.py"],
                      270 if not quick else 150, env=train_env, kind="train",
                      info={"log": Path(train_env["LOG_DIR"], f"{run_id}.txt"), "checkpoint": checkpoint}))

    # FineWeb's validation set is 62M tokens: a few hundred documents give a stable tokens/s in seconds.
    max_docs = "16" if quick else "256"
    eval_runs = [("08_eval_strided", "strided evaluation", ["--mode", "strided"], 40)]
    eval_runs += [(f"{9 + i:02d}_eval_ttt_chunk{chunk}", f"TTT evaluation, chunk {chunk}",
                   ["--mode", "ttt", "--chunk", str(chunk)], budget)
                  for i, (chunk, budget) in enumerate(zip(TTT_CHUNKS, (60, 45, 35)))]
    for key, title, mode_args, budget in eval_runs:
        out = raw_dir / f"{key}.json"
        parts.append(Part(key, title, [python, "eval_ttt.py", "--checkpoint", str(checkpoint), *mode_args,
                                       "--max-docs", max_docs, "--out", str(out)],
                          budget if not quick else 25, kind="eval",
                          condition="needs the checkpoint of the run above",
                          info={"json": out, "checkpoint": checkpoint}))
    return parts


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


def print_plan(parts: list[Part], budget_s: float, data: DataChoice) -> None:
    print(f"data: {data.description}")
    print(f"plan ({budget_s / 60:.0f} minutes in all; a part is stopped at its budget, and skipped if less than half "
          "of it is left):")
    for part in parts:
        when = f"  [{part.condition}]" if part.condition else ""
        print(f"  {part.budget_s:4.0f} s  {part.title}{when}\n          $ {shell_line(part)}")
    print(f"  budgets add up to {sum(p.budget_s for p in parts):.0f} s; the whole run stops at {budget_s:.0f} s")


# ----------------------------------------------------------------------------------------------------------------------
# Running


def child_environment(part: Part) -> dict[str, str]:
    env = {**os.environ, **part.env, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the GPU runs compiled kernels; an inherited interpreter switch would fake it
    return env


def run_part(part: Part, timeout_s: float, raw_dir: Path) -> Outcome:
    """Run one command, its stdout and stderr into raw_dir/<key>.txt; stop its whole process group at timeout_s."""
    log_path = raw_dir / f"{part.key}.txt"
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shell_line(part)}\n# budget {timeout_s:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(part.command, cwd=ROOT, env=child_environment(part), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
            status = "ok" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: this ends the command and its children only
            proc.wait()
            status = f"timed out after {timeout_s:.0f} s"
    output = log_path.read_text(encoding="utf-8", errors="replace")
    return Outcome(status, time.monotonic() - start, output)


def missing_modules(python: str = sys.executable) -> list[str]:
    """The NEEDED_MODULES that python cannot find, asked of a fresh interpreter (setup may have installed some since
    this one started)."""
    probe = f"import importlib.util as u; print(' '.join(m for m in {NEEDED_MODULES!r} if u.find_spec(m) is None))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else list(NEEDED_MODULES)


def run_plan(parts: list[Part], budget_s: float, raw_dir: Path, data: DataChoice,
             log=print, clock=time.monotonic) -> dict[str, Outcome]:
    """Run the parts in order within budget_s seconds in all; every part gets an Outcome, run or not."""
    outcomes: dict[str, Outcome] = {}
    missing = missing_modules()
    start = clock()
    for number, part in enumerate(parts, 1):
        reason = skip_reason(part, outcomes, data, missing)
        remaining = budget_s - (clock() - start)
        if reason is None and remaining < part.budget_s / 2:
            reason = f"skipped: time ran out ({max(remaining, 0):.0f} s of the {budget_s:.0f} s budget left)"
        if reason is not None:
            outcomes[part.key] = Outcome(reason)
            log(f"[{number}/{len(parts)}] {part.title}: {reason}")
            continue
        timeout = min(part.budget_s, remaining)
        log(f"[{number}/{len(parts)}] {part.title} (at most {timeout:.0f} s)\n    $ {shell_line(part)}")
        outcomes[part.key] = run_part(part, timeout, raw_dir)
        log(f"    -> {outcomes[part.key].status} in {outcomes[part.key].seconds:.0f} s")
        if part.key == "01_setup":
            missing = missing_modules()
    return outcomes


def skip_reason(part: Part, outcomes: dict[str, Outcome], data: DataChoice, missing: list[str]) -> str | None:
    """Why a part does not run (None: it runs). missing: the needed modules that cannot be imported."""
    if part.key == "01_setup":
        return None if missing else f"not needed: {', '.join(NEEDED_MODULES)} all import"
    lacking = [m for m in part.needs if m in missing]
    if lacking:
        return f"skipped: {', '.join(lacking)} cannot be imported (see the setup part)"
    if part.key == "02_data":
        return None if data.needs_preparing else "not needed: the data is there"
    if part.kind == "eval":
        train = outcomes.get("07_train")
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
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("$ ", "# budget"))]
    return {"device": device.group(1) if device else None, "rows": rows,
            "message": None if rows else (lines[-1] if lines else "no output")}


def kernel_column(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(op, the README kernels table's "H100 vs torch.compile" cell, faster than compile at every shape?)."""
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
    found = {(row["attention"], row["config"]): row for row in markdown_table(output)}
    rows = []
    for backend, config in expected_bench_rows(info):
        row = found.get((backend, config))
        if row is None:
            rows.append({"attention": backend, "config": config, "status": f"not run (bench_train: {part_status})"})
        elif row["step_avg"].endswith(" ms"):
            rows.append({**row, "status": "ok"})
        else:
            rows.append({"attention": backend, "config": config, "status": row["step_avg"]})
    return rows


STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:([\d.]+)ms tokens_per_s:(\d+)",
                       re.M)


def parse_train_log(text: str) -> dict:
    """The figures of a train_gpt.py log (the embedded source files at its top are skipped)."""
    ends = [m.end() for m in re.finditer(r"^#### end .*$", text, re.M)]
    body = text[ends[-1]:] if ends else text

    def first(pattern: str):
        match = re.search(pattern, body, re.M)
        return match.groups() if match else None

    steps = STEP_LINE.findall(body)
    compile_stats = first(r"^compile_stats: recompiles:(\d+) graph_breaks:(\d+)")
    peak = first(r"^peak_memory: (\d+)MiB")
    return {
        "last_step": dict(zip(("step", "iterations", "train_loss", "train_time_ms", "step_avg_ms", "tokens_per_s"),
                              steps[-1])) if steps else None,
        "peak_memory_mib": int(peak[0]) if peak else None,
        "recompiles": int(compile_stats[0]) if compile_stats else None,
        "graph_breaks": int(compile_stats[1]) if compile_stats else None,
        "attention_backend": (first(r"^attention_backend: (\S+)") or [None])[0],
        "fused_ops": (first(r"^fused_ops: (.*)$") or [None])[0],
        "final_eval": re.findall(r"^final_eval (.*)$", body, re.M),
        "error": (first(r"^error: (.*)$") or [None])[0],
        "batch_tokens": int(first(r"^hparam train_batch_tokens=(\d+)")[0]) if first(r"^hparam train_batch_tokens=")
        else None,
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
# The report


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
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
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


def machine_label(info: dict, date: str) -> str:
    gpus = info.get("gpus") or []
    if not gpus:
        return f"no GPU (CPU), {date}"
    return f"1 of {len(gpus)}x {gpus[0]['name']}, {date}" if len(gpus) > 1 else f"1x {gpus[0]['name']}, {date}"


def bench_train_command(info: dict, backend: str, config: str) -> str:
    part = Part("", "", [sys.executable, "tools/bench_train.py", *info["common"], "--backends", backend,
                         "--configs", config], 0)
    return shell_line(part)


def build_report(parts: list[Part], outcomes: dict[str, Outcome], info: dict, context: dict) -> str:
    """The markdown report. context: date, quick, budget_s, total_s, data (DataChoice), raw_dir, command, revision,
    model (what the training rows call the model)."""
    date, machine = context["date"], machine_label(info, context["date"])
    by_key = {p.key: p for p in parts}
    lines = [f"# GPU report, {date}", ""]
    if context["quick"]:
        lines += ["**Quick smoke run (`--quick`): a few steps only. Do not paste these figures into the README.**", ""]
    lines += [f"`{context['command']}`, {context['total_s'] / 60:.1f} min of a {context['budget_s'] / 60:.0f}-minute "
              f"budget, at commit {context['revision']}. Raw outputs of every part: "
              f"[{context['raw_dir'].name}/]({context['raw_dir'].name}/).", "", "## Machine", ""]
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
        outcome = outcomes.get(part.key, Outcome("skipped: not reached"))
        took = f"{outcome.seconds:.0f} s" if outcome.seconds else ""
        lines.append(f"| {part.title} | {outcome.status} | {took} | {part.budget_s:.0f} s | `{shell_line(part)}` |")
    incomplete = [p.title for p in parts
                  if not outcomes.get(p.key, Outcome("")).status.startswith(("ok", "not needed"))]
    lines += ["", f"Not complete: {', '.join(incomplete)}." if incomplete else "Every part ran to the end.", ""]

    readme_rows, kernel_rows, details = [], [], []

    def row(what: str, figure: str, command: str) -> None:
        readme_rows.append(f"| {what} | {figure} | `{command}` | {machine} |")

    # CUDA tests
    for key in ("03_cuda_tests", "04_kernel_tests"):
        if key not in by_key:
            continue
        part, outcome = by_key[key], outcomes.get(key, Outcome("skipped: not reached"))
        if outcome.status.startswith(("skipped", "not needed")):
            figure = outcome.status
        else:
            counts = parse_pytest(outcome.output)
            figure = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped")
            if not counts["complete"]:
                figure += f" (incomplete: {outcome.status})"
            details += [f"### {part.title}", "", figure + ".", ""]
            details += [f"- failed: `{name}`" for name in counts["failures"]] + ([""] if counts["failures"] else [])
        row(part.title, figure, shell_line(part))

    # bench_kernels
    part, outcome = by_key["05_bench_kernels"], outcomes.get("05_bench_kernels", Outcome("skipped: not reached"))
    kernels = parse_bench_kernels(outcome.output)
    if kernels["rows"]:
        for op, cell, faster in kernel_column(kernels["rows"]):
            kernel_rows.append(f"| `{op}` | {cell} | {faster} |")
        details += [f"### {part.title}", "", f"device: {kernels['device']}", ""]
        details += [line for line in outcome.output.splitlines() if line.startswith("|")] + [""]
        row("each kernel vs `torch.compile` of its reference", "see the kernels rows below", shell_line(part))
    else:
        why = outcome.status if not outcome.status.startswith(("ok", "failed")) else kernels["message"]
        row("each kernel vs `torch.compile` of its reference", f"not measured: {why}", shell_line(part))

    # bench_train
    part, outcome = by_key["06_bench_train"], outcomes.get("06_bench_train", Outcome("skipped: not reached"))
    for bench in bench_train_rows(outcome.output, part.info, outcome.status):
        what = f"train step, {context['model']}, ATTN_BACKEND={bench['attention']} {bench['config']}"
        if bench["status"] == "ok":
            figure = (f"{bench['step_avg']}/step, {bench['tokens/s per process']} tokens/s, peak "
                      f"{bench['peak memory']}, fused: {bench['fused ops']}, compile: {bench['compile']}")
        else:
            figure = bench["status"]
        row(what, figure, bench_train_command(part.info, bench["attention"], bench["config"]))
    if outcome.output:
        details += [f"### {part.title}", ""] + [line for line in outcome.output.splitlines()
                                                 if line.startswith("|")] + [""]

    # the training run
    part, outcome = by_key["07_train"], outcomes.get("07_train", Outcome("skipped: not reached"))
    log_path = part.info["log"]
    train = parse_train_log(log_path.read_text() if log_path.is_file() else outcome.output)
    what = f"{part.env['ITERATIONS']}-step run, {context['model']}, {context['data'].name}"
    if train["last_step"]:
        last = train["last_step"]
        compile_note = ("recompiles and graph breaks not logged" if train["recompiles"] is None
                        else f"{train['recompiles']} recompiles, {train['graph_breaks']} graph breaks")
        peak = f"{train['peak_memory_mib']:,} MiB" if train["peak_memory_mib"] is not None else "not logged"
        figure = (f"step_avg {last['step_avg_ms']} ms, {int(last['tokens_per_s']):,} tokens/s (step "
                  f"{last['step']}/{last['iterations']}), peak memory {peak}, {compile_note}, attention "
                  f"{train['attention_backend']}, fused: {train['fused_ops']}")
        if outcome.status != "ok":
            figure += f" ({outcome.status})"
    else:
        figure = outcome.status + (f": {train['error']}" if train["error"] else "")
    row(what, figure, shell_line(part))
    if train["last_step"] or train["error"]:
        details += [f"### {part.title}", "", f"log: `{display_path(log_path)}`", "", "```text"]
        body = (log_path.read_text() if log_path.is_file() else outcome.output)
        details += [line for line in body.splitlines()
                    if line.startswith(("compile_warmup", "step:", "stopping", "compile_stats", "loader:", "final_eval",
                                        "peak_memory", "error"))]
        details += ["```", ""]

    # evaluation
    eval_table = []
    for part in parts:
        if part.kind != "eval":
            continue
        outcome = outcomes.get(part.key, Outcome("skipped: not reached"))
        result = parse_eval_json(part.info["json"]) if outcome.status == "ok" else None
        if result is None:
            figure = outcome.status if outcome.status != "ok" else "ok, but no results JSON"
            row(part.title, figure, shell_line(part))
            continue
        knobs = (f"W={result['window']} S={result['stride']}" if result["mode"] == "strided"
                 else f"W={result['window']} C={result['chunk']}")
        row(f"{result['mode']} evaluation {knobs}, {result['docs']} documents",
            f"{result['tokens_per_s']:,.0f} tokens/s ({result['tokens']:,} tokens in {result['seconds']:.1f} s; "
            f"BPB {result['bpb']:.4f} after the {train['last_step']['step'] if train['last_step'] else '?'}-step run)",
            shell_line(part))
        eval_table.append(f"| {result['mode']} | {knobs} | {result['docs']} | {result['tokens']:,} "
                          f"| {result['seconds']:.1f} s | {result['tokens_per_s']:,.0f} | {result['bpb']:.4f} |")
    if eval_table:
        details += ["### Evaluation", "", "| mode | settings | documents | tokens | time | tokens/s | BPB |",
                    "| --- | --- | ---: | ---: | ---: | ---: | ---: |"] + eval_table + [""]

    lines += ["## Rows for the README", "", "Measured figures (`what | figure | command | machine`):", "",
              "| what | figure | command | machine |", "| --- | --- | --- | --- |"] + readme_rows + [""]
    lines += ["Kernels table, column \"H100 vs `torch.compile`\" (speedup = compile ms / Triton ms, forward + "
              "backward):", ""]
    if kernel_rows:
        lines += ["| op | H100 vs `torch.compile` | faster at every shape |", "| --- | --- | --- |"] + kernel_rows
    else:
        lines.append("not measured (see the kernel benchmark part above)")
    lines += ["", "## Details", ""] + details
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="report file (default: gpu_report_<date>.md); the raw outputs go "
                        "into <out without .md>_raw/ beside it")
    parser.add_argument("--quick", action="store_true", help="a short smoke version (about 10 minutes)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit, even with CUDA")
    parser.add_argument("--data", default=None, help="shard folder (default: FineWeb sp1024 if downloaded, else the "
                        "bundled sample, prepared if needed)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the training benchmark and the training run")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help=f"the whole run's time limit (default: {FULL_BUDGET_S // 60}, --quick: "
                             f"{QUICK_BUDGET_S // 60})")
    parser.add_argument("--run-without-cuda", action="store_true",
                        help="run the plan on a machine without CUDA (to check this script; CPU figures, add --env "
                             "for a tiny model)")
    args = parser.parse_args(argv)
    bad_env = [item for item in args.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item)]
    if bad_env:
        print(f"error: --env {bad_env[0]!r}: expected KEY=VALUE", file=sys.stderr)
        return 2
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        print(f"error: --budget-minutes {args.budget_minutes:g}: must be > 0", file=sys.stderr)
        return 2
    if args.data and not Path(args.data).is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
        return 2

    now = datetime.datetime.now()
    date = now.strftime("%Y-%m-%d")
    out = Path(args.out or f"gpu_report_{date}.md").resolve()
    raw_dir = out.with_name(out.name.removesuffix(".md") + "_raw")
    budget_s = 60 * args.budget_minutes if args.budget_minutes else (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    data = choose_data(args.data)
    run_id = f"gpu_report_{now.strftime('%Y%m%d_%H%M%S')}"
    parts = build_plan(args.quick, data, raw_dir, run_id, args.env)

    # No nvidia-smi: no CUDA, and no need to import torch to know it (the dry run stays fast).
    info = machine_info() if nvidia_smi_gpus() else {"cuda_available": False}
    if args.plan or not (info.get("cuda_available") or args.run_without_cuda):
        if not args.plan:
            where = "no CUDA device here" if not info.get("gpus") else \
                f"nvidia-smi lists {len(info['gpus'])} GPU(s), but torch {info.get('torch')} cannot use CUDA"
            print(f"{where}: this is the plan, nothing is run (on a CUDA machine it runs it and writes "
                  f"{display_path(out)} and {display_path(raw_dir)}/)")
        print_plan(parts, budget_s, data)
        return 0

    if raw_dir.exists() and any(raw_dir.iterdir()):
        print(f"error: {raw_dir} exists and is not empty: give another --out, or remove it", file=sys.stderr)
        return 2
    raw_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    outcomes = run_plan(parts, budget_s, raw_dir, data)
    info = machine_info()  # after setup: versions of what the parts actually used
    context = {"date": date, "quick": args.quick, "budget_s": budget_s, "total_s": time.monotonic() - start,
               "model": "default model" if not args.env else "model as set by --env (see the command)",
               "data": data, "raw_dir": raw_dir, "revision": git_revision(),
               "command": shlex.join(["python", "tools/gpu_report.py", *(argv if argv is not None else sys.argv[1:])])}
    write_atomic(out, build_report(parts, outcomes, info, context).encode("utf-8"))
    print(f"report: {out}\nraw outputs: {raw_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

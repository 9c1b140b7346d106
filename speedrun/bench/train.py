"""Training speed of train_gpt.py over ATTN_BACKEND x FUSED x COMPILE (a benchmark, not a test).

    speedrun bench train [--steps 60] [--nproc 1] [--data DIR] [--backends fa3,torch_varlen]
                                [--timeout SECONDS] [--log-dir DIR] [--env KEY=VALUE ...]

Runs train_gpt.py once per attention backend and configuration (FUSED in {0, 1} x COMPILE in {0, 1}) on the given data
for --steps timed steps of the default model (warm-up and compile time excluded, as in a record run) and prints one
markdown table: step_avg, tokens/s per process, peak memory, fused ops, and the recompile / graph-break counts when the
log has them. A backend that cannot load here (not installed, or CUDA-only on a CPU) shows as "not available" in its
rows, without a run (train_gpt.load_attention_backend decides). A run past --timeout is stopped and shows as such.
Reference point: parameter-golf's baseline does 524,288 tokens per step in 43.5 ms on 8xH100, about 1.5M tokens/s per
GPU.
On a CPU-only machine add `--env NUM_LAYERS=2 --env MODEL_DIM=64 ...` to make it small; figures are per process.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = "FUSED=0 COMPILE=0;FUSED=0 COMPILE=1;FUSED=1 COMPILE=0;FUSED=1 COMPILE=1"
NOT_AVAILABLE = "not available"


def default_backends() -> str:
    """Every backend train_gpt.py knows, fastest first (read from the script, so a new backend is benchmarked too)."""
    from kernels.attention import VARLEN_BACKENDS

    return ",".join(VARLEN_BACKENDS)


def unavailable_reason(backend: str) -> str | None:
    """Why train_gpt.py cannot use this backend here (not installed, CUDA-only), or None if it loads. Asks
    kernels.attention.load_varlen_backend, the function a run would use, rather than reading a run's error message."""
    import torch
    from kernels.attention import BackendError, load_varlen_backend

    if backend == "auto":
        return None  # train_gpt.py picks one, or stops with its own error (shown as the run's failure)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if load_varlen_backend(backend, device) is None:
            return f"does not load on {device.type}" + ("" if device.type == "cuda" else ", CUDA-only")
    except BackendError as error:
        return str(error)
    return None


def run(backend: str, config: dict, args, log_dir: str, checkpoint_dir: str) -> dict:
    """One train_gpt.py run; returns its figures, or {"status": why there are none}."""
    env = {**os.environ, "DATA_PATH": args.data, "ITERATIONS": str(args.steps), "VAL_LOSS_EVERY": "0",
           "TRAIN_LOG_EVERY": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0", "EVAL_MODES": "flat",
           "VAL_MAX_DOCS": "4", "LOG_DIR": log_dir, "CHECKPOINT_DIR": checkpoint_dir}
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(config)  # the axes of the table win over --env
    env["ATTN_BACKEND"] = backend
    run_id = f"bench_{backend}_" + "_".join(f"{k.lower()}{v}" for k, v in config.items())
    env["RUN_ID"] = run_id
    command = [sys.executable, str(ROOT / "train_gpt.py")]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(ROOT / "train_gpt.py")]
    # Own process group, so that a timeout ends torchrun's workers too.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": f"timed out after {args.timeout:g} s"}
    log_path = Path(log_dir, f"{run_id}.txt")
    log = log_path.read_text() if log_path.exists() else ""
    step = re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms step_avg:([\d.]+)ms", log, re.M)
    if proc.returncode != 0 or not step:
        error = (stderr.strip().splitlines() or ["no step line in the log"])[-1]
        return {"status": f"failed: {error.removeprefix('error: ')[:160]}"}
    batch = int(re.search(r"^hparam train_batch_tokens=(\d+)", log, re.M).group(1))
    step_ms = float(step[-1][2])
    compile_stats = re.search(r"^compile_stats: recompiles:(\d+) graph_breaks:(\d+)", log, re.M)
    return {
        "step_avg_ms": step_ms,
        "tokens_per_s_per_gpu": batch / (step_ms / 1000) / args.nproc,
        "peak_mib": re.search(r"^peak_memory: (\d+)MiB", log, re.M).group(1),
        "backend": re.search(r"^attention_backend: (\S+)", log, re.M).group(1),
        "fused": re.search(r"^fused_ops: (.*)$", log, re.M).group(1),
        "compile_stats": (f"{compile_stats.group(1)} recompiles, {compile_stats.group(2)} graph breaks"
                          if compile_stats else "not logged"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--data", default=str(ROOT / "data" / "datasets" / "peps_sp1024_spread"))
    parser.add_argument("--backends", default=None,
                        help="comma-separated ATTN_BACKEND values (default: every backend of train_gpt.py)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="semicolon-separated runs, each space-separated KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each run (default: no limit)")
    parser.add_argument("--log-dir", default=None, help="keep every run's train_gpt.py log here (default: discarded)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for every run")
    args = parser.parse_args(argv)
    try:
        configs = [dict(item.split("=", 1) for item in spec.split()) for spec in args.configs.split(";")]
    except ValueError:
        print(f"error: --configs {args.configs!r}: each run must be space-separated KEY=VALUE", file=sys.stderr)
        return 2
    bad_env = [item for item in args.env if "=" not in item]
    if bad_env:
        print(f"error: --env {bad_env[0]!r}: expected KEY=VALUE", file=sys.stderr)
        return 2
    known = default_backends().split(",")
    backends = [b for b in (args.backends or ",".join(known)).split(",") if b]
    unknown = [b for b in backends if b not in known + ["auto"]]
    if unknown:
        print(f"error: --backends {unknown[0]!r}: unknown; train_gpt.py has auto, {', '.join(known)}", file=sys.stderr)
        return 2

    print("| attention | config | step_avg | tokens/s per process | peak memory | fused ops | compile |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.log_dir or scratch  # checkpoints always go to scratch: they are not wanted, and large
        os.makedirs(log_dir, exist_ok=True)
        for backend in backends:
            unavailable = unavailable_reason(backend)
            for config in configs:
                name = " ".join(f"{k}={v}" for k, v in config.items())
                if unavailable:
                    print(f"| {backend} | {name} | {NOT_AVAILABLE} ({unavailable}) | | | | |", flush=True)
                    continue
                result = run(backend, config, args, log_dir, scratch)
                if "status" in result:
                    print(f"| {backend} | {name} | {result['status']} | | | | |", flush=True)
                    continue
                chosen = backend if result["backend"] == backend else f"{backend} ({result['backend']})"
                print(f"| {chosen} | {name} | {result['step_avg_ms']:.1f} ms "
                      f"| {result['tokens_per_s_per_gpu'] / 1e6:.3f}M | {result['peak_mib']} MiB | {result['fused']} "
                      f"| {result['compile_stats']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

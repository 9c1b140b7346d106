"""Training speed of train_gpt.py with and without FUSED and COMPILE (a benchmark, not a test).

    python tools/bench_train.py [--steps 60] [--nproc 1] [--data DIR] [--env KEY=VALUE ...]

Runs train_gpt.py once per configuration (FUSED in {0, 1} x COMPILE in {0, 1}) on the given data for --steps timed
steps of the default model (warm-up and compile time excluded, as in a record run) and prints one markdown table:
step_avg, tokens/s per GPU, peak memory, attention backend. Reference point: parameter-golf's baseline does 524,288
tokens per step in 43.5 ms on 8xH100, about 1.5M tokens/s per GPU.
On a CPU-only machine add `--env NUM_LAYERS=2 --env MODEL_DIM=64 ...` to make it small; figures are per process.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(config: dict, args, workdir: str) -> dict:
    env = {**os.environ, "DATA_PATH": args.data, "ITERATIONS": str(args.steps), "VAL_LOSS_EVERY": "0",
           "TRAIN_LOG_EVERY": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0", "EVAL_MODES": "flat",
           "VAL_MAX_DOCS": "4", "LOG_DIR": workdir, "CHECKPOINT_DIR": workdir, **config}
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    run_id = "bench_" + "_".join(f"{k.lower()}{v}" for k, v in config.items())
    env["RUN_ID"] = run_id
    command = [sys.executable, str(ROOT / "train_gpt.py")]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(ROOT / "train_gpt.py")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    log = Path(workdir, f"{run_id}.txt").read_text() if Path(workdir, f"{run_id}.txt").exists() else ""
    step = re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms step_avg:([\d.]+)ms", log, re.M)
    if proc.returncode != 0 or not step:
        return {"error": (proc.stderr.strip().splitlines() or ["no step line"])[-1][:120]}
    batch = int(re.search(r"^hparam train_batch_tokens=(\d+)", log, re.M).group(1))
    step_ms = float(step[-1][2])
    return {
        "step_avg_ms": step_ms,
        "tokens_per_s_per_gpu": batch / (step_ms / 1000) / args.nproc,
        "peak_mib": re.search(r"^peak_memory: (\d+)MiB", log, re.M).group(1),
        "backend": re.search(r"^attention_backend: (\S+)", log, re.M).group(1),
        "fused": re.search(r"^fused_ops: (.*)$", log, re.M).group(1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--data", default=str(ROOT / "data" / "datasets" / "peps_sp1024"))
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for every run")
    parser.add_argument("--configs", default="FUSED=0 COMPILE=0;FUSED=0 COMPILE=1;FUSED=1 COMPILE=0;FUSED=1 COMPILE=1",
                        help="semicolon-separated runs, each space-separated KEY=VALUE")
    args = parser.parse_args()
    print("| config | step_avg | tokens/s per process | peak memory | attention | fused ops |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.configs.split(";"):
            config = dict(item.split("=", 1) for item in spec.split())
            result = run(config, args, workdir)
            name = " ".join(f"{k}={v}" for k, v in config.items())
            if "error" in result:
                print(f"| {name} | failed: {result['error']} | | | | |", flush=True)
                continue
            print(f"| {name} | {result['step_avg_ms']:.1f} ms | {result['tokens_per_s_per_gpu'] / 1e6:.3f}M "
                  f"| {result['peak_mib']} MiB | {result['backend']} | {result['fused']} |", flush=True)


if __name__ == "__main__":
    main()

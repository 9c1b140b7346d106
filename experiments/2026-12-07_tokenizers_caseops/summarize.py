"""summary.json of the tokenizer x CaseOps measurement (data/README.md), from the runs' logs in logs/ and the
datasets' manifests: python experiments/2026-12-07_tokenizers_caseops/summarize.py"""

import json
import statistics
from pathlib import Path

from speedrun.analysis.run_log import parse_log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARMS = ("meas_sp1024", "meas_sp1024_caseops", "meas_sp4096", "meas_sp4096_caseops", "meas_sp8192",
        "meas_sp8192_caseops")

arms = []
for arm in ARMS:
    manifest = json.loads((ROOT / "data/datasets" / arm / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    runs = []
    for path in sorted((HERE / "logs").glob(f"{arm}_seed*.txt")):
        log = parse_log(path)
        if log.final is None or log.label != path.stem:
            continue
        evals = [e for e in log.final_evals if e.get("mode") == "strided"]
        run = {"seed": log.seed, "val_loss": log.final["val_loss"], "val_bpb": log.final["val_bpb"],
               "steps": log.final["steps"], "train_time_ms": log.final["train_time"],
               "val_tokens": evals[-1]["tokens"], "val_bytes": evals[-1]["bytes"],
               "eval_time_ms": evals[-1].get("eval_time"), "log": f"logs/{path.name}"}
        run["train_tokens"] = run["steps"] * int(log.hparams["train_batch_tokens"])
        runs.append(run)
        params = log.run["model_params"]
        vocab, dim = int(log.hparams["vocab_size"]), int(log.hparams["model_dim"])
    if not runs:
        continue
    bpb = [r["val_bpb"] for r in runs]
    loss = [r["val_loss"] for r in runs]
    train_bytes_per_token = train["bytes"] / train["tokens"]
    arms.append({
        "arm": arm, "vocab_size": vocab, "caseops": arm.endswith("_caseops"),
        "params": params, "embedding_params": vocab * dim, "embedding_share": vocab * dim / params,
        "train_tokens": runs[0]["train_tokens"],
        "train_bytes_per_token": train_bytes_per_token,
        "train_bytes_estimate": round(runs[0]["train_tokens"] * train_bytes_per_token),
        "val_tokens": runs[0]["val_tokens"], "val_bytes": runs[0]["val_bytes"],
        "val_bytes_per_token": runs[0]["val_bytes"] / runs[0]["val_tokens"],
        "n": len(runs), "val_loss_mean": statistics.mean(loss), "val_bpb_mean": statistics.mean(bpb),
        "val_bpb_min": min(bpb), "val_bpb_max": max(bpb), "runs": runs,
    })
(HERE / "summary.json").write_text(json.dumps({"arms": arms}, indent=1) + "\n")
for a in arms:
    print(f"{a['arm']:22} V={a['vocab_size']:5} params={a['params']:,} emb={a['embedding_share']:.1%} "
          f"train_tok={a['train_tokens']:,} train_bytes~{a['train_bytes_estimate']:,} val_tok={a['val_tokens']:,} "
          f"B/tok={a['val_bytes_per_token']:.3f} loss={a['val_loss_mean']:.4f} bpb={a['val_bpb_mean']:.4f} "
          f"[{a['val_bpb_min']:.4f}, {a['val_bpb_max']:.4f}] n={a['n']}")

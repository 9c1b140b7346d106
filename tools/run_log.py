"""
run_log.py: the training logs that train_gpt.py writes (rank 0's logs/<RUN_ID>.txt; a record's train_seed<N>.log), read
into a TrainLog. The one place that knows their line prefixes: tools/record.py, tools/record_check.py and tools/plot.py
read logs through parse_log. Standard library only.

A log is the code the run used, embedded byte for byte (`#### file NAME bytes=N sha256=H`, the N bytes, `#### end
NAME`), then one line per fact: `versions:`, `gpus:`, `env_overrides:` (the variables the run was given),
`hparam NAME=VALUE` (every resolved hyperparameter), `attention_backend:`, `fused_ops:`, `tokenizer:`, `train_data:`,
`val_data:`, `model_params:`, `step:N/M train_loss:...`, `step:N/M val_loss:...`, `stopping_early:`, `checkpoint:`,
`final_eval mode:...`, and last `final val_loss:... val_bpb:...`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_KV = re.compile(r"(\w+):(\S+)")


@dataclass
class TrainLog:
    path: Path
    code: dict[str, bytes] = field(default_factory=dict)  # embedded files, in log order
    problems: list[str] = field(default_factory=list)  # the log is damaged or incomplete
    versions: dict[str, str] = field(default_factory=dict)
    gpus: str = ""
    hparams: dict[str, str] = field(default_factory=dict)
    attention_backend: str = ""
    fused_ops: str = ""
    tokenizer_sha256: str = ""
    val_data: dict[str, int] = field(default_factory=dict)
    train_data: dict[str, int] = field(default_factory=dict)
    run: dict[str, int] = field(default_factory=dict)  # model_params, world_size, grad_accum, micro_batch_tokens
    train_steps: list[dict] = field(default_factory=list)
    val_steps: list[dict] = field(default_factory=list)
    final_evals: list[dict] = field(default_factory=list)
    final: dict | None = None
    stopped_early: bool = False
    checkpoint: str = ""  # the final checkpoint's path
    errors: list[str] = field(default_factory=list)
    env_overrides: dict[str, str] | None = None  # the variables the run read from its environment (None: older log)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        try:
            return int(self.hparams["seed"])
        except (KeyError, ValueError):
            return None

    @property
    def label(self) -> str:
        return self.hparams.get("run_id") or self.path.stem

    def run_env(self) -> dict[str, str]:
        """The variables the run was given: its `env_overrides:` line, or, for a log written before that line existed,
        every hyperparameter it printed, as a variable (True/False as 1/0)."""
        if self.env_overrides is not None:
            return dict(self.env_overrides)
        return {key.upper(): {"True": "1", "False": "0"}.get(value, value) for key, value in self.hparams.items()}

    def final_eval(self, mode: str) -> dict | None:
        found = [e for e in self.final_evals if e.get("mode") == mode]
        return found[-1] if found else None


def _number(text: str) -> float | int:
    text = text.removesuffix("ms").removesuffix("MiB")
    try:
        return int(text)
    except ValueError:
        return float(text)  # may be nan/inf; checked by the caller


def _fields(line: str) -> dict:
    """`step:3/20 val_loss:5.1 train_time:12ms` -> {'step': '3/20', 'val_loss': 5.1, 'train_time': 12}."""
    out = {}
    for key, value in _KV.findall(line):
        if key in ("step", "mode"):
            out[key] = value
        else:
            try:
                out[key] = _number(value)
            except ValueError:
                out[key] = value
    return out


def _split_step(value: str) -> tuple[int, int]:
    step, total = value.split("/")
    return int(step), int(total)


def _parse_embedded(data: bytes, log: TrainLog) -> int:
    """Read the `#### file NAME bytes=N sha256=H` blocks at the top of a log; returns where the text lines begin."""
    pos = 0
    header = re.compile(rb"#### file (\S+) bytes=(\d+) sha256=([0-9a-f]{64})\n")
    while data.startswith(b"#### file ", pos):
        m = header.match(data, pos)
        if not m:
            log.problems.append("malformed `#### file` header")
            return len(data)
        name, size, digest = m.group(1).decode(), int(m.group(2)), m.group(3).decode()
        start = m.end()
        content = data[start:start + size]
        trailer = f"\n#### end {name}\n".encode()
        if len(content) < size or not data.startswith(trailer, start + size):
            log.problems.append(f"embedded {name} is truncated or not followed by `#### end {name}`")
            return len(data)
        if hashlib.sha256(content).hexdigest() != digest:
            log.problems.append(f"embedded {name} does not match its sha256 {digest[:12]}...")
        if name in log.code:
            log.problems.append(f"embedded {name} appears twice")
        log.code[name] = content
        pos = start + size + len(trailer)
    if not log.code:
        log.problems.append("no embedded code (`#### file` blocks) at the top")
    return pos


def parse_log(path: str | os.PathLike) -> TrainLog:
    path = Path(path)
    log = TrainLog(path)
    data = path.read_bytes()
    text_start = _parse_embedded(data, log)
    text = data[text_start:].decode("utf-8", errors="replace")
    lines = [line for line in text.split("\n") if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:") or line.startswith("stopped by SIGTERM"):
            log.errors.append(line)
        elif line.startswith("versions: "):
            log.versions = dict(_KV.findall(line))
        elif line.startswith("gpus: "):
            log.gpus = line[len("gpus: "):]
        elif line.startswith("env_overrides:"):
            log.env_overrides = dict(item.partition("=")[::2] for item in shlex.split(line[len("env_overrides:"):]))
        elif line.startswith("hparam "):
            name, _, value = line[len("hparam "):].partition("=")
            log.hparams[name] = value
        elif line.startswith("attention_backend: "):
            log.attention_backend = line.split(": ", 1)[1]
        elif line.startswith("fused_ops: "):
            log.fused_ops = line.split(": ", 1)[1]
        elif line.startswith("tokenizer: "):
            m = re.search(r"sha256:([0-9a-f]{64})", line)
            log.tokenizer_sha256 = m.group(1) if m else ""
        elif line.startswith("val_data: "):
            log.val_data = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("train_data: "):
            log.train_data = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("model_params:"):
            log.run = {k: int(v) for k, v in _KV.findall(line) if v.isdigit()}
        elif line.startswith("checkpoint: ") and "(resumable" not in line:
            log.checkpoint = line[len("checkpoint: "):].strip()
        elif line.startswith("stopping_early:"):
            log.stopped_early = True
        elif line.startswith("step:"):
            f = _fields(line)
            try:
                f["step"], f["total"] = _split_step(f["step"])
            except ValueError:
                log.problems.append(f"unreadable line: {line[:80]}")
                continue
            (log.val_steps if "val_loss" in f else log.train_steps).append(f)
        elif line.startswith("final_eval "):
            log.final_evals.append(_fields(line))
        elif line.startswith("final "):
            log.final = _fields(line)
            if i != len(lines) - 1:
                log.problems.append("the `final` line is not the last line")
    for kind, rows in (("step", log.train_steps + log.val_steps), ("final_eval", log.final_evals),
                       ("final", [log.final] if log.final else [])):
        for row in rows:
            for key, value in row.items():
                numeric = key in ("train_loss", "val_loss", "val_bpb") or isinstance(value, float)
                if numeric and not (isinstance(value, (int, float)) and math.isfinite(value)):
                    where = f" at step {row['step']}" if "step" in row else ""
                    log.problems.append(f"{key} is {value}{where} ({kind} line)")
    if log.final is None:
        log.problems.append("incomplete: no `final val_loss:... val_bpb:...` line")
    else:
        for key in ("val_loss", "val_bpb", "mode", "steps", "train_time"):
            if key not in log.final:
                log.problems.append(f"the `final` line has no {key}")
        fe = log.final_eval(log.final["mode"]) if "mode" in log.final else None
        if "mode" in log.final and fe is None:
            log.problems.append(f"no `final_eval mode:{log.final['mode']}` line for the final mode")
        for key in ("val_loss", "val_bpb"):
            if fe is not None and key in log.final and fe.get(key) != log.final[key]:
                log.problems.append(f"the `final` line's {key} {log.final[key]} differs from its final_eval line's "
                                    f"{fe.get(key)}")
    for line in log.errors:
        log.problems.append(f"run failed: {line[:120]}")
    if log.seed is None:
        log.problems.append("no `hparam seed=N` line")
    return log

"""
The training logs that train_gpt.py writes (rank 0's logs/<RUN_ID>.txt; a record's train_seed<N>.log), read
into a TrainLog. The one reader of training logs, ours and the peers': the records, the plots and the loss curves
(speedrun.analysis.curves) read logs through it. Standard library only.

A log is the code the run used, embedded byte for byte (`#### file NAME bytes=N sha256=H`, the N bytes, `#### end
NAME`), then one line per fact: `versions:`, `gpus:`, `env_overrides:` (the variables the run was given),
`hparam NAME=VALUE` (every resolved hyperparameter), `attention_backend:`, `fused_ops:`, `tokenizer:`, `train_data:`,
`val_data:`, `model_params:`, `step:N/M train_loss:...`, `step:N/M val_loss:...`, `stopping_early:`, `checkpoint:`,
`final_eval mode:...`, on the size-limited track `artifact: codec:C model_bytes:N code_bytes:N total_bytes:N limit:L
files:...` and `final_roundtrip codec:C mode:M val_loss:X val_bpb:Y`, and last `final val_loss:... val_bpb:...` (the
round-trip score when there is a `final_roundtrip` line).

It also reads the logs of parameter-golf's and modded-nanogpt's records (read_run, the same summary for all three
dialects), and prints what it read from any log:

  speedrun log LOG [LOG ...] [--json]
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
    artifact: dict | None = None  # the `artifact:` line: codec, model_bytes, code_bytes, total_bytes, limit, files
    final_roundtrip: dict | None = None  # the artifact's score after the round trip (then the `final` line's)
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
        elif line.startswith("artifact: "):
            log.artifact = _fields(line)
            log.artifact["files"] = [f for f in str(log.artifact.get("files", "")).split(",") if f]
        elif line.startswith("final_roundtrip "):
            log.final_roundtrip = _fields(line)
        elif line.startswith("final "):
            log.final = _fields(line)
            if i != len(lines) - 1:
                log.problems.append("the `final` line is not the last line")
    for kind, rows in (("step", log.train_steps + log.val_steps), ("final_eval", log.final_evals),
                       ("final_roundtrip", [log.final_roundtrip] if log.final_roundtrip else []),
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
        # the line the headline repeats: the round trip's score when the run wrote an artifact, else the final mode's
        if log.final_roundtrip is not None:
            source, fe = "final_roundtrip", log.final_roundtrip
        else:
            source, fe = "final_eval", log.final_eval(log.final["mode"]) if "mode" in log.final else None
            if "mode" in log.final and fe is None:
                log.problems.append(f"no `final_eval mode:{log.final['mode']}` line for the final mode")
        for key in ("val_loss", "val_bpb"):
            if fe is not None and key in log.final and fe.get(key) != log.final[key]:
                log.problems.append(f"the `final` line's {key} {log.final[key]} differs from its {source} line's "
                                    f"{fe.get(key)}")
    for line in log.errors:
        log.problems.append(f"run failed: {line[:120]}")
    if log.seed is None:
        log.problems.append("no `hparam seed=N` line")
    return log


# ----------------------------------------------------------------------------------------------------------------------
# Any log, ours or another leaderboard's, read into one summary: RunSummary.
#
# parameter-golf (its records' train*.log, train_seed<N>.log, logs/*.txt): the script's text may come first, then
# `key: value` or `key:value` lines (hyperparameters, `seed: N` or `seed:N`), `step:N/M train_loss:X train_time:Tms`
# (March) or `N/M train_loss: X train_time: Tm` (April), `stopping_early: wallclock_cap train_time:Tms step:N/M`,
# `Serialized model [LABEL]: N bytes`, `Total submission size [LABEL]: N bytes`, the final evaluations
# `LABEL val_loss:X val_bpb:Y [eval_time:Tms]` (final_int8_zlib_roundtrip_exact, final_int6_sliding_window_exact,
# legal_ttt_exact, quantized_ttt_phased, ...) and `total_eval_time:Ts`. Some lines carry an epoch time stamp first.
# modded-nanogpt: its script's text, then `step:N/M train_time:Tms step_avg:Ams` and `step:N/M val_loss:X train_time:Tms
# ...`; the last val_loss line is the run's result.

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
STAMP = r"(?:\d{9,}\.\d+[ \t]+)?"  # an epoch time stamp some parameter-golf logs put before each line
# a final evaluation: a label first (not `step:...`, not `diagnostic ...`), then val_loss and val_bpb
FINAL_LINE = re.compile(rf"^{STAMP}(?P<label>[A-Za-z][\w.+-]*)(?:[ \t]+(?:sliding|stride:\d+))*[ \t]+val_loss:[ \t]*"
                        rf"(?P<loss>{NUM})[ \t]+(?:sliding[ \t]+)?val_bpb:[ \t]*(?P<bpb>{NUM})(?P<rest>[^\n]*)$", re.M)
# any other line with both numbers (step lines, diagnostics, pre-quantization figures): where a claim may come from
VALUE_LINE = re.compile(rf"^(?P<head>[^\n]*?)val_loss[:=][ \t]*(?P<loss>{NUM})[ \t]+(?:sliding[ \t]+)?val_bpb[:=][ \t]*"
                        rf"(?P<bpb>{NUM})[^\n]*$", re.M)
# the last step line, and the last one with a val_loss (a leading `(?s:.*)` makes the search start from the end)
_STEP = rf"^{STAMP}(?:step:)?[ \t]*(?P<step>\d+)/(?P<total>\d+)[ \t]+"
LAST_STEP_LINE = re.compile(rf"(?s:.*){_STEP}(?P<rest>(?:train_loss|val_loss|train_time|loss:)[^\n]*)$", re.M)
LAST_VAL_LINE = re.compile(rf"(?s:.*){_STEP}(?P<rest>val_loss[^\n]*)$", re.M)
STOP_LINE = re.compile(rf"^{STAMP}stopping_early: wallclock_cap train_time:[ \t]*(?P<ms>{NUM})ms step:[ \t]*"
                       rf"(?P<step>\d+)/(?P<total>\d+)", re.M)
TRAIN_TIME = re.compile(rf"train_time:[ \t]*(?P<value>{NUM})(?P<unit>ms|m|s)\b")
EVAL_TIME = re.compile(rf"(?:eval_time|time):[ \t]*(?P<ms>{NUM})ms")
STEP_AVG = re.compile(rf"step_avg:[ \t]*(?P<ms>{NUM})ms")
TOTAL_EVAL_LINE = re.compile(rf"^{STAMP}total_eval_time:[ \t]*(?P<s>{NUM})s", re.M)
SIZE_LINE = re.compile(rf"^{STAMP}(?P<what>Serialized model|Total submission size)(?:[ \t]+(?P<label>[^:\n]+?))?:[ \t]*"
                       rf"(?P<bytes>\d+) bytes", re.M)
SEED_LINES = ((re.compile(rf"^{STAMP}[ \t]*seed:[ \t]*(\d+)[ \t]*$", re.M), "seed:"),  # `seed: 42`, `seed:1337`
              (re.compile(r"(?:^|[ \t])seed=(\d+)(?=[ \t]|$)", re.M), "seed="))  # `... seed=7 ...` (a k=v line)
VAL_TOKENS_LINE = re.compile(rf"^{STAMP}(?:val_tokens:[ \t]*|val_loader:shards [^\n]*?tokens:)(\d+)[ \t]*$", re.M)
TOKENIZER_PATH = re.compile(r"tokenizer_path[:=][ \t]*([^\s'\"]+?\.model)\b")
VOCAB_SIZE = re.compile(r"^[ \t]*vocab_size[:=][ \t]*(\d+)[ \t]*$", re.M)


@dataclass
class FinalEval:
    """One final evaluation line: its label, both numbers as printed, and where it is."""

    label: str
    val_loss: float
    val_bpb: float | None
    loss_text: str
    bpb_text: str
    eval_time_ms: float | None
    line_no: int


@dataclass
class RunSummary:
    """What a training log of any dialect says, in common terms. The scored line is the last final evaluation."""

    path: Path
    dialect: str  # "ours", "parameter-golf", "modded-nanogpt" or "unknown"
    seed: int | None = None
    seeds_named: list[int] = field(default_factory=list)  # every seed the log names (more than one: several runs)
    finals: list[FinalEval] = field(default_factory=list)
    other_values: list[FinalEval] = field(default_factory=list)  # step lines, diagnostics, pre-quantization figures
    steps: int | None = None
    total_steps: int | None = None
    train_time_ms: float | None = None
    train_time_from: str = ""  # which line gave train_time
    capped: bool = False  # stopped by its own wall-clock cap
    step_avg_ms: float | None = None
    total_eval_time_ms: float | None = None
    artifact_bytes: int | None = None  # code + compressed model, as the log counts it
    artifact_line: str = ""
    val_tokens: int | None = None
    tokenizer: str = ""  # the tokenizer model's name (fineweb_1024_bpe, ...) or `vocab N`
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def scored(self) -> FinalEval | None:
        return self.finals[-1] if self.finals else None

    @property
    def eval_time_ms(self) -> float | None:
        """The whole evaluation's time when the log says it (`total_eval_time`), else the scored line's: printed on
        it, or on the last earlier final line with the same val_bpb (parameter-golf prints a rounded line with the
        time, then the `_exact` line, sometimes again under another label)."""
        if self.total_eval_time_ms is not None:
            return self.total_eval_time_ms
        scored = self.scored
        if scored is None or scored.val_bpb is None:
            return None
        for f in reversed(self.finals):
            if f.eval_time_ms is not None and f.val_bpb is not None:
                digits = min(printed_decimals(f.bpb_text), printed_decimals(scored.bpb_text))
                if abs(f.val_bpb - scored.val_bpb) <= 0.5 * 10 ** -digits * (1 + 1e-9):
                    return f.eval_time_ms
        return None


def printed_decimals(text: str) -> int:
    """Decimals a number is printed with (12 for exponent notation: as good as exact)."""
    text = text.lower()
    if "e" in text:
        return 12
    return len(text.split(".", 1)[1]) if "." in text else 0


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _train_time_ms(m: re.Match) -> float:
    value = float(m.group("value"))
    return value * {"ms": 1.0, "s": 1000.0, "m": 60_000.0}[m.group("unit")]


def _peer_summary(path: Path, text: str) -> RunSummary:
    """parameter-golf's and modded-nanogpt's logs: the lines listed above; everything else (their script's text,
    progress lines) is skipped because no pattern matches it."""
    run = RunSummary(path, "unknown")
    has_bpb = "val_bpb" in text  # the patterns below scan every line: skip those a log cannot match
    for m in FINAL_LINE.finditer(text) if has_bpb else ():
        rest = m.group("rest")
        t = EVAL_TIME.search(rest)
        run.finals.append(FinalEval(m.group("label"), float(m.group("loss")), float(m.group("bpb")), m.group("loss"),
                                    m.group("bpb"), float(t.group("ms")) if t else None, _line_no(text, m.start())))
    final_starts = {f.line_no for f in run.finals}
    for m in VALUE_LINE.finditer(text) if has_bpb else ():
        line_no = _line_no(text, m.start())
        head = m.group("head").strip()
        if line_no not in final_starts and "{" not in head and "(" not in head:
            run.other_values.append(FinalEval(head.rstrip(":") or "(line)", float(m.group("loss")),
                                              float(m.group("bpb")), m.group("loss"), m.group("bpb"), None, line_no))
    last_step = LAST_STEP_LINE.match(text)
    last_val = LAST_VAL_LINE.match(text)
    if run.finals:
        run.dialect = "parameter-golf"
    elif last_val is not None and "val_bpb" not in last_val.group("rest"):
        run.dialect = "modded-nanogpt"
        v = re.match(rf"val_loss:[ \t]*({NUM})", last_val.group("rest"))
        t = TRAIN_TIME.search(last_val.group("rest"))
        run.finals.append(FinalEval(f"step:{last_val.group('step')}/{last_val.group('total')}", float(v.group(1)), None,
                                    v.group(1), "", None, _line_no(text, last_val.start("step"))))
        if t:
            run.train_time_ms, run.train_time_from = _train_time_ms(t), "the last val_loss line"
    elif run.other_values:
        run.dialect = "parameter-golf"  # val_bpb lines, but no final evaluation (a run that never finished)
    stop = None
    for stop in STOP_LINE.finditer(text) if "stopping_early" in text else ():
        pass
    if stop is not None:
        run.capped = True
        run.steps, run.total_steps = int(stop.group("step")), int(stop.group("total"))
        run.train_time_ms, run.train_time_from = float(stop.group("ms")), "stopping_early"
    elif last_step is not None:
        run.steps, run.total_steps = int(last_step.group("step")), int(last_step.group("total"))
        t = TRAIN_TIME.search(last_step.group("rest"))
        if t and run.train_time_ms is None:
            run.train_time_ms, run.train_time_from = _train_time_ms(t), f"step {run.steps}"
    if last_step is not None:
        a = STEP_AVG.search(last_step.group("rest"))
        run.step_avg_ms = float(a.group("ms")) if a else None
    if run.step_avg_ms is None and run.train_time_ms and run.steps:
        run.step_avg_ms = run.train_time_ms / run.steps
    if run.dialect == "unknown":
        run.problems.append("no final evaluation and no val_loss line")
    if run.dialect != "modded-nanogpt":  # modded-nanogpt logs print none of these (one tokenizer, no artifact)
        _parameter_golf_facts(run, text)
    return run


def _parameter_golf_facts(run: RunSummary, text: str) -> None:
    """Evaluation time, artifact size, seed, validation tokens and tokenizer of a parameter-golf log."""
    for m in TOTAL_EVAL_LINE.finditer(text) if "total_eval_time" in text else ():
        run.total_eval_time_ms = 1000.0 * float(m.group("s"))
    # The artifact: the last `Total submission size` line that counts a compressed model. The first pair of
    # `Serialized model: N bytes` / `Total submission size: N bytes` without a label is the raw torch.save.
    raw_total = compressed = None
    last_model_label = ""
    for m in SIZE_LINE.finditer(text) if "submission size" in text or "Serialized model" in text else ():
        label = (m.group("label") or "").strip()
        if m.group("what") == "Serialized model":
            last_model_label = label
        elif label or last_model_label:
            compressed = m
        else:
            raw_total = m
    chosen = compressed or raw_total
    if chosen is not None:
        run.artifact_bytes = int(chosen.group("bytes"))
        run.artifact_line = f"line {_line_no(text, chosen.start())}: {chosen.group(0).strip()}"
    for pattern, needle in SEED_LINES:
        for m in pattern.finditer(text) if needle in text else ():
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end()) % (len(text) + 1)]
            if needle == "seed=" and "(" in line:  # a line of the script's text, not a `k=v` line
                continue
            if int(m.group(1)) not in run.seeds_named:
                run.seeds_named.append(int(m.group(1)))
        if run.seeds_named:
            break
    run.seed = run.seeds_named[0] if run.seeds_named else None
    if len(run.seeds_named) > 1:
        run.problems.append(f"names {len(run.seeds_named)} seeds ({', '.join(map(str, run.seeds_named))})")
    tokens = VAL_TOKENS_LINE.findall(text) if "val_tokens:" in text or "val_loader:" in text else []
    run.val_tokens = int(tokens[-1]) if tokens else None
    paths = TOKENIZER_PATH.findall(text)  # the last: a script's text, printed first, may name a default
    if paths:
        run.tokenizer = Path(paths[-1]).stem
    else:
        v = VOCAB_SIZE.search(text) if "vocab_size" in text else None
        run.tokenizer = f"vocab {v.group(1)}" if v else ""


def _our_summary(log: TrainLog) -> RunSummary:
    run = RunSummary(log.path, "ours", seed=log.seed, seeds_named=[log.seed] if log.seed is not None else [],
                     problems=list(log.problems))
    for e in log.final_evals:
        if isinstance(e.get("val_loss"), (int, float)):
            run.finals.append(FinalEval(f"final_eval mode:{e.get('mode')}", float(e["val_loss"]), e.get("val_bpb"),
                                        str(e["val_loss"]), str(e.get("val_bpb")), e.get("eval_time"), 0))
    rt = log.final_roundtrip
    if rt is not None and isinstance(rt.get("val_loss"), (int, float)):
        run.finals.append(FinalEval(f"final_roundtrip codec:{rt.get('codec')} mode:{rt.get('mode')}",
                                    float(rt["val_loss"]), rt.get("val_bpb"), str(rt["val_loss"]),
                                    str(rt.get("val_bpb")), rt.get("eval_time"), 0))
    fin = log.final
    if fin is not None and isinstance(fin.get("val_loss"), (int, float)):
        run.finals.append(FinalEval("final", float(fin["val_loss"]), fin.get("val_bpb"), str(fin["val_loss"]),
                                    str(fin.get("val_bpb")), None, 0))
        run.steps = fin.get("steps")
        if isinstance(fin.get("train_time"), (int, float)):
            run.train_time_ms, run.train_time_from = float(fin["train_time"]), "final"
    if log.train_steps:
        run.total_steps = log.train_steps[-1].get("total")
    run.capped = log.stopped_early
    if run.train_time_ms and run.steps:
        run.step_avg_ms = run.train_time_ms / run.steps
    times = [f.eval_time_ms for f in run.finals if isinstance(f.eval_time_ms, (int, float))]
    run.total_eval_time_ms = float(sum(times)) if times else None
    if log.artifact and isinstance(log.artifact.get("total_bytes"), int):
        run.artifact_bytes = log.artifact["total_bytes"]
        run.artifact_line = "artifact: " + " ".join(f"{k}:{v}" for k, v in log.artifact.items() if k != "files")
    run.val_tokens = log.val_data.get("tokens")
    run.tokenizer = log.tokenizer_sha256[:12]
    return run


def read_run(path: str | os.PathLike) -> RunSummary:
    """The summary of a log of any of the three dialects. Raises OSError when the file cannot be read."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"#### file ") or b"\nhparam seed=" in data:
        return _our_summary(parse_log(path))
    return _peer_summary(path, data.decode("utf-8", errors="replace"))


def describe_run(run: RunSummary) -> list[str]:
    """What `speedrun log LOG` prints about one log."""
    def ms(value):
        return "?" if value is None else f"{value / 1000:.1f} s"

    out = [f"{run.path}: {run.dialect} log",
           f"  seed       {run.seed if run.seed is not None else '?'}"
           + (f" (the log names {', '.join(map(str, run.seeds_named))})" if len(run.seeds_named) > 1 else ""),
           f"  steps      {run.steps if run.steps is not None else '?'}/{run.total_steps or '?'}"
           + (" (stopped by its wall-clock cap)" if run.capped else ""),
           f"  train_time {ms(run.train_time_ms)}" + (f" (from {run.train_time_from})" if run.train_time_from else "")
           + (f", {run.step_avg_ms:.2f} ms/step" if run.step_avg_ms else ""),
           f"  eval_time  {ms(run.eval_time_ms)}" + (" (total_eval_time)" if run.total_eval_time_ms is not None
                                                      and run.dialect != "ours" else ""),
           f"  artifact   {run.artifact_bytes:,} bytes ({run.artifact_line})" if run.artifact_bytes is not None
           else "  artifact   ? (no size line)",
           f"  val_tokens {run.val_tokens if run.val_tokens is not None else '?'}; tokenizer {run.tokenizer or '?'}"]
    for f in run.finals:
        where = f"line {f.line_no}: " if f.line_no else ""
        timed = f" eval_time {f.eval_time_ms / 1000:.1f} s" if f.eval_time_ms is not None else ""
        scored = "  <- scored" if f is run.scored else ""
        out.append(f"  final      {where}{f.label} val_loss {f.loss_text}"
                   + (f" val_bpb {f.bpb_text}" if f.val_bpb is not None else "") + timed + scored)
    if not run.finals:
        out.append("  final      none")
    out.extend(f"  problem    {p}" for p in run.problems)
    return out


_PEER_STEP_LINE = re.compile(r"step:(\d+)/(\d+) train_loss:(\S+)")
_PEER_BATCH_LINE = re.compile(r"train_batch_tokens:(\d+)(?:\s|$)")
_PEER_CODE_END = "=" * 100  # parameter-golf prints its own source, then this line


def parameter_golf_train_losses(text: str) -> tuple[dict[int, float | str], int | None]:
    """(step -> train loss, stated tokens per step) of a parameter-golf log: its script text, printed before its first
    line of 100 `=`, is skipped; every later `step:N/M train_loss:X` line counts (a value that is not a number is kept
    as its text, for the caller to report)."""
    lines = text.splitlines()
    if _PEER_CODE_END in lines:
        lines = lines[lines.index(_PEER_CODE_END) + 1:]
    stated, losses = None, {}
    for line in lines:
        m = _PEER_BATCH_LINE.match(line)
        if m and stated is None:
            stated = int(m.group(1))
        m = _PEER_STEP_LINE.match(line)
        if m:
            try:
                losses[int(m.group(1))] = float(m.group(3))
            except ValueError:
                losses[int(m.group(1))] = m.group(3)
    return losses, stated

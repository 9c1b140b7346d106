"""
The checks that `speedrun verify` runs on a record folder (and `new` on the folder it is
about to write): tracks, the numbers derived from the logs, the logs' consistency, the code, the dataset fingerprint
and the statistics against the previous record.

verify checks, for each record (a folder with submission.json; a PATH that is not one is searched for them):
  code        every *.py in the folder equals, byte for byte, the code embedded in every log; no embedded file missing;
              the logs embed exactly the payload their train_gpt.py names (PAYLOAD, EXPERIMENT_PAYLOAD)
  numbers     submission.json equals what the logs (and eval_results.json) say; eval_results.json is self-consistent
  logs        complete (final line last), no `error:` line, every loss finite, seeds distinct and matching file names,
              the same configuration in every log (all hparams but seed and the run's paths)
  track       the track is known or its name parses; train_time <= the track's budget (a run stopped by its own
              MAX_WALLCLOCK_SECONDS <= budget may overrun by one average step: the cap is checked after each step;
              evaluation time is not counted); hardware: the GPU model in the `gpus:` line and world_size <= the
              track's GPUs, or no GPU for a cpu track
  dataset     when a log's DATA_PATH (relative to the repository) is on this machine, speedrun.audit's fingerprint of
              it equals the log's: tokenizer sha256, val_data documents/tokens/bytes, number of train shards (this
              check imports numpy, sentencepiece and torch; without them it is skipped with a warning)
  statistics  one-sided Welch t-test of the seeds' final val_loss against the previous record of the track on the same
              data (a val_loss on other data says nothing about this one): the record named by submission.json's
              "compared_with" (`new --against`), which must be on the same data and not dated later, or else the best
              record dated strictly earlier, by mean val_loss, among records/<track>/*/ with "record": true whose
              logs name the same validation data (tokenizer sha256, val documents, tokens and bytes):
              H0: new_mean >= prev_mean - margin. A submission that claims "record": true fails when p >= alpha
              (or when it has fewer than 2 seeds and a previous record exists); with "record": false it is only
              reported.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kernels.bundle import bundle_bytes
from speedrun.stats import mean_std, welch_test
from speedrun.analysis.run_log import TrainLog, parse_log

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MARGIN = 0.005  # nats of val_loss a new record must beat the previous one by
DEFAULT_ALPHA = 0.01
EVAL_FILE = "eval_results.json"
SKIP_DIRS = {"logs", "checkpoints", "results", "__pycache__", ".pytest_cache"}  # run outputs inside a record folder
# hparams that may differ between the seeds of one record: the seed and where each run read and wrote its files
PER_RUN_HPARAMS = {"seed", "run_id", "data_path", "tokenizer_path", "log_dir", "checkpoint_dir", "resume"}


class RecordError(Exception):
    """A problem that stops `new`; its message is one line."""


# ----------------------------------------------------------------------------------------------------------------------
# Tracks: named by hardware and training budget. Unknown names of the same shape are accepted with a warning.


@dataclass(frozen=True)
class Track:
    name: str
    budget_seconds: float  # training wall clock (train_time in the log), evaluation not included
    gpus: int  # 0 means CPU
    gpu_model: str  # substring of the GPU name, e.g. "H100"; "" for CPU
    known: bool = True
    eval_seconds: float | None = None  # limit on the evaluation after training (the final evaluations' eval_time)
    artifact_bytes: int | None = None  # limit on code + compressed model (the log's `artifact:` total_bytes)

    def describe(self) -> str:
        hardware = "CPU" if self.gpus == 0 else f"{self.gpus}x {self.gpu_model}"
        limits = "".join([f", {self.eval_seconds / 60:g} min evaluation" if self.eval_seconds else "",
                          f", artifact at most {self.artifact_bytes:,} bytes" if self.artifact_bytes else ""])
        return f"{hardware}, {self.budget_seconds / 60:g} min training{limits}"


ARTIFACT_LIMIT = 16_000_000  # bytes of code + compressed model (decimal 16 MB, parameter-golf's cap)
TRACKS = {
    "8xh100_10min": Track("8xh100_10min", 600, 8, "H100"),
    "1xh100_10min": Track("1xh100_10min", 600, 1, "H100"),
    "cpu_5min": Track("cpu_5min", 300, 0, ""),
    "track_10min_16mb": Track("track_10min_16mb", 600, 8, "H100", eval_seconds=600, artifact_bytes=ARTIFACT_LIMIT),
}
TRACK_PATTERN = re.compile(r"^(?:cpu|(\d+)x([a-z0-9]+))_(\d+)min$")


def get_track(name: str) -> Track:
    """The known track, or one read from a name like `4xa100_20min` / `cpu_10min` (flagged unknown)."""
    if name in TRACKS:
        return TRACKS[name]
    m = TRACK_PATTERN.match(name)
    if not m or int(m.group(3)) <= 0 or (m.group(1) is not None and int(m.group(1)) <= 0):
        raise RecordError(f"track {name!r}: not a known track ({', '.join(TRACKS)}) and not of the form "
                          f"<N>x<gpu>_<M>min or cpu_<M>min")
    gpus = int(m.group(1)) if m.group(1) else 0
    return Track(name, 60.0 * int(m.group(3)), gpus, (m.group(2) or "").upper(), known=False)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation results (eval_ttt.py's JSON)

# eval_ttt.py's config keys shown in a record's README (all its scalar config keys go into submission.json)
EVAL_PARAMETERS_SHOWN = ("window", "stride", "chunk", "lora_rank", "lora_lr", "lora_targets", "doc_batch", "seed",
                         "rope_ntk_alpha", "max_docs")


def eval_problems(results: dict) -> list[str]:
    """bpb and loss recomputed from the per-document rows, and the totals, within 1e-9 relative."""
    problems = []
    if not isinstance(results.get("config"), dict):
        problems.append("no `config` object")
    docs = results.get("docs")
    if not isinstance(docs, list) or not docs:
        return problems + ["no `docs` rows"]
    try:
        nats = math.fsum(float(d["nats"]) for d in docs)
        tokens = sum(int(d["tokens"]) for d in docs)
        nbytes = sum(int(d["bytes"]) for d in docs)
    except (KeyError, TypeError, ValueError):
        return problems + ["a `docs` row lacks nats, tokens or bytes"]
    if len({d.get("id") for d in docs}) != len(docs):
        problems.append("a document id appears twice in `docs`")
    if results.get("tokens") != tokens:
        problems.append(f"tokens {results.get('tokens')} != sum of docs' tokens {tokens}")
    if results.get("bytes") != nbytes:
        problems.append(f"bytes {results.get('bytes')} != sum of docs' bytes {nbytes}")
    expected = {"bpb": nats / math.log(2) / max(nbytes, 1), "loss": nats / max(tokens, 1)}
    for key, want in expected.items():
        got = results.get(key)
        if not isinstance(got, (int, float)) or not math.isfinite(got) or not _close(got, want, 1e-9):
            problems.append(f"{key} {got} != {want:.12g} recomputed from `docs`")
    return problems


def eval_summary(results: dict) -> dict:
    """The results JSON's totals and every scalar of its config (mode, window, stride, chunk, LoRA rank and lr, ...)."""
    config = results.get("config") or {}
    summary = {k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool))}
    summary.update({k: results.get(k) for k in ("bpb", "loss", "tokens", "bytes", "seconds", "tokens_per_s")})
    summary["docs"] = len(results.get("docs") or [])
    return summary


def _close(a: float, b: float, rel: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


# ----------------------------------------------------------------------------------------------------------------------
# submission.json: everything but the free fields is derived from the logs and the results JSON, so `verify` can
# rebuild it and compare.

FREE_FIELDS = ("name", "author", "date", "track", "blurb", "record")
OPTIONAL_FIELDS = ("compared_with",)  # `new --against FOLDER`: the record of the same data this one is tested against


@dataclass(frozen=True)
class Dataset:
    """The data a record was scored on, as its logs say: DATA_PATH's folder name, and what identifies the validation
    data (two records compare only when all of these but the name agree)."""

    name: str
    tokenizer_sha256: str
    val_documents: int
    val_tokens: int
    val_bytes: int

    @property
    def key(self) -> tuple:
        return self.tokenizer_sha256, self.val_documents, self.val_tokens, self.val_bytes

    def describe(self) -> str:
        return (f"{self.name} ({self.val_documents} val documents, {self.val_tokens:,} tokens, {self.val_bytes:,} bytes; "
                f"tokenizer {self.tokenizer_sha256[:8]})")


def log_dataset(lg: TrainLog) -> Dataset:
    v = lg.val_data
    return Dataset(Path(lg.hparams.get("data_path", "?")).name, lg.tokenizer_sha256, v.get("documents", -1),
                   v.get("tokens", -1), v.get("bytes", -1))


def same_data(a: Dataset | None, b: Dataset | None) -> bool:
    """Whether two records' val_loss compare: both datasets known and identical but for their folder names."""
    return a is not None and b is not None and a.key == b.key


def record_dataset(folder: Path) -> Dataset | None:
    """The dataset of a record folder, from its first training log; None when there is no readable one."""
    logs = sorted(folder.glob("train_seed*.log"))
    if not logs:
        return None
    try:
        return log_dataset(parse_log(logs[0]))
    except OSError:
        return None


def log_file_name(seed: int) -> str:
    return f"train_seed{seed}.log"


def seed_entry(lg: TrainLog) -> dict:
    fin = lg.final
    fe = lg.final_eval(fin["mode"]) or {}
    return {
        "seed": lg.seed, "log": log_file_name(lg.seed), "run_id": lg.hparams.get("run_id", ""),
        "val_bpb": fin["val_bpb"], "val_loss": fin["val_loss"], "steps": fin["steps"],
        "train_seconds": fin["train_time"] / 1000.0, "eval_mode": fin["mode"],
        "eval_seconds": fe.get("eval_time", 0) / 1000.0, "stopped_early": lg.stopped_early,
    }


def checkpoint_seed(results: dict, logs: list[TrainLog]) -> int | None:
    """The seed whose final checkpoint the results JSON evaluated (matched by file name), if any."""
    config = results.get("config") or {}
    names = {Path(v).name for k, v in config.items() if "checkpoint" in k and isinstance(v, str) and v.endswith(".pt")}
    seeds = [lg.seed for lg in logs if lg.checkpoint and Path(lg.checkpoint).name in names]
    return seeds[0] if len(seeds) == 1 else None


def derived_submission(logs: list[TrainLog], results: dict | None) -> dict:
    logs = sorted(logs, key=lambda lg: lg.seed)
    seeds = [seed_entry(lg) for lg in logs]
    bpb_mean, bpb_std = mean_std([s["val_bpb"] for s in seeds])
    loss_mean, loss_std = mean_std([s["val_loss"] for s in seeds])
    first = logs[0]
    fe = first.final_eval(first.final["mode"]) or {}
    out = {
        "seeds": seeds,
        "val_bpb": {"mean": bpb_mean, "std": bpb_std, "n": len(seeds)},
        "val_loss": {"mean": loss_mean, "std": loss_std, "n": len(seeds)},
        "evaluation": {"mode": first.final["mode"], "window": fe.get("window"), "stride": fe.get("stride"),
                       "docs": fe.get("docs"), "tokens": fe.get("tokens"), "bytes": fe.get("bytes")},
        "hardware": {"gpus": first.gpus, "world_size": first.run.get("world_size"),
                     "attention_backend": first.attention_backend, "fused_ops": first.fused_ops},
        "versions": dict(first.versions),
        "model_params": first.run.get("model_params"),
        "tokenizer_sha256": first.tokenizer_sha256,
        "code": {name: hashlib.sha256(data).hexdigest() for name, data in first.code.items()},
        "eval_results": None,
    }
    if results is not None:
        out["eval_results"] = {"file": EVAL_FILE, "checkpoint_seed": checkpoint_seed(results, logs),
                               **eval_summary(results)}
    return out


def _compare(path: str, want, got, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got:
                out.append(f"{path}.{key} is missing")
            elif key not in want:
                out.append(f"{path}.{key} is not expected")
            else:
                _compare(f"{path}.{key}", want[key], got[key], out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{path} has {len(got)} entries, the logs give {len(want)}")
        for i, (w, g) in enumerate(zip(want, got)):
            _compare(f"{path}[{i}]", w, g, out)
    elif isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, (int, float)) \
            or not isinstance(got, (int, float)):
        if want != got or type(want) is not type(got):
            out.append(f"{path} is {json.dumps(got)}, the logs give {json.dumps(want)}")
    elif not _close(float(got), float(want)):
        out.append(f"{path} is {got!r}, the logs give {want!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Consistency of a set of logs (shared by `new` and `verify`)


def log_set_problems(logs: list[TrainLog], track: Track | None) -> list[tuple[TrainLog, str]]:
    """(log, problem) for every problem of the logs as a set: each log, seeds, identical code and config, track budget
    and hardware."""
    out = [(lg, p) for lg in logs for p in lg.problems]
    by_seed: dict[int, list[TrainLog]] = {}
    for lg in logs:
        if lg.seed is not None:
            by_seed.setdefault(lg.seed, []).append(lg)
    for seed, same in by_seed.items():
        if len(same) > 1:
            out.append((same[-1], f"seed {seed} used twice ({', '.join(lg.name for lg in same)}): seeds must be "
                                  f"distinct"))
    base = logs[0]
    for lg in logs[1:]:
        if lg.code != base.code:
            differing = sorted(n for n in set(lg.code) | set(base.code) if lg.code.get(n) != base.code.get(n))
            out.append((lg, f"embeds different code than {base.name}: {', '.join(differing)}"))
        for key in sorted(set(lg.hparams) | set(base.hparams)):
            if key not in PER_RUN_HPARAMS and lg.hparams.get(key) != base.hparams.get(key):
                out.append((lg, f"hparam {key}={lg.hparams.get(key)} but {base.name} has "
                                     f"{key}={base.hparams.get(key)}: every seed must run the same configuration"))
        for what in ("tokenizer_sha256", "val_data"):
            if getattr(lg, what) != getattr(base, what):
                out.append((lg, f"{what} differs from {base.name}"))
        if lg.final and base.final and lg.final.get("mode") != base.final.get("mode"):
            out.append((lg, f"final mode {lg.final.get('mode')} but {base.name} has {base.final.get('mode')}"))
    if track is not None:
        for lg in logs:
            out.extend((lg, p) for p in track_problems(lg, track))
    return out


def train_time_allowed_ms(budget_seconds: float, train_ms: float, steps: int | None, capped: bool,
                          steps_allowed: float = 1.0) -> float:
    """The training budget in ms, plus `steps_allowed` average steps for a run stopped by its own wall-clock cap at
    or under the budget: the cap is checked after each step, so such a run ends at most one step past it."""
    return 1000.0 * budget_seconds + (steps_allowed * train_ms / steps if capped and steps else 0.0)


def limit_problems(lg: TrainLog, track: Track) -> dict[str, str]:
    """{check name: problem} for the track's limits on one log: train_time (every track), eval_time and artifact_size
    (tracks that have those limits)."""
    problems = {}
    if lg.final and isinstance(lg.final.get("train_time"), (int, float)):
        train_ms = float(lg.final["train_time"])
        try:
            cap_s = float(lg.hparams.get("max_wallclock_seconds", "0"))
        except ValueError:
            cap_s = 0.0
        capped = 0 < cap_s <= track.budget_seconds
        if train_ms > train_time_allowed_ms(track.budget_seconds, train_ms, lg.final.get("steps") or 1, capped):
            problems["train_time"] = (f"train_time {train_ms / 1000:.1f}s exceeds the {track.name} budget of "
                                      f"{track.budget_seconds:g}s" + ("" if capped else
                                                                      f" (MAX_WALLCLOCK_SECONDS={cap_s:g})"))
    if track.eval_seconds is not None:
        seconds = our_eval_seconds(lg)
        if seconds > track.eval_seconds:
            problems["eval_time"] = (f"evaluation took {seconds:.1f}s (final_eval and final_roundtrip lines), over the "
                                     f"{track.name} limit of {track.eval_seconds:g}s")
    if track.artifact_bytes is not None:
        art = lg.artifact or {}
        total = art.get("total_bytes")
        if not isinstance(total, int):
            problems["artifact_size"] = f"no `artifact: ... total_bytes:N` line (track {track.name} scores an artifact)"
        elif total > track.artifact_bytes:
            problems["artifact_size"] = (f"artifact total_bytes {total:,} exceeds the {track.name} limit of "
                                         f"{track.artifact_bytes:,}")
        elif isinstance(art.get("model_bytes"), int) and isinstance(art.get("code_bytes"), int) \
                and art["model_bytes"] + art["code_bytes"] != total:
            problems["artifact_size"] = (f"artifact total_bytes {total:,} is not model_bytes {art['model_bytes']:,} + "
                                         f"code_bytes {art['code_bytes']:,}")
        elif problem := code_count_problem(lg):
            problems["artifact_size"] = problem
    return problems


def code_count_problem(lg: TrainLog) -> str:
    """The artifact line's code_bytes against the code the log embeds, counted as the line says (`code:raw`, the
    default: the files' sizes; `code:bundle`: the size of kernels.bundle's bundle of them, rebuilt here); '' when they
    agree or the log embeds no code."""
    art, how = lg.artifact or {}, (lg.artifact or {}).get("code", "raw")
    if not lg.code or not isinstance(art.get("code_bytes"), int):
        return ""
    if how == "raw":
        counted = sum(map(len, lg.code.values()))
    elif how == "bundle":
        try:
            counted = len(bundle_bytes(lg.code))
        except ValueError as e:
            return f"artifact code:bundle, but the embedded code cannot be bundled ({e})"
    else:
        return f"artifact code:{how} is not a way this toolkit counts code (raw or bundle)"
    if counted != art["code_bytes"]:
        return (f"artifact code_bytes {art['code_bytes']:,} is not the {how} count of the embedded code, {counted:,}"
                + (" (a bundle built with another lzma may differ by a few bytes)" if how == "bundle" else ""))
    return ""


def our_eval_seconds(lg: TrainLog) -> float:
    """Seconds of evaluation after training: every final_eval line's eval_time and the final_roundtrip line's."""
    rows = lg.final_evals + ([lg.final_roundtrip] if lg.final_roundtrip else [])
    return sum(float(r["eval_time"]) for r in rows if isinstance(r.get("eval_time"), (int, float))) / 1000.0


def track_problems(lg: TrainLog, track: Track) -> list[str]:
    problems = list(limit_problems(lg, track).values())
    if track.gpus == 0:
        if not lg.gpus.startswith("none"):
            problems.append(f"track {track.name} is a CPU track but the run had GPUs: {lg.gpus}")
    else:
        if track.gpu_model.lower() not in lg.gpus.lower():
            problems.append(f"track {track.name} needs {track.gpu_model} GPUs, the log says gpus: {lg.gpus or '?'}")
        world = lg.run.get("world_size")
        if world is None or world > track.gpus:
            problems.append(f"world_size {world} exceeds the {track.gpus} GPUs of track {track.name}")
    return problems


def eval_vs_logs_problems(results: dict, logs: list[TrainLog], folder_code: dict[str, bytes] | None) -> list[str]:
    """The results JSON belongs to this record: same eval_ttt.py (code_sha256) and tokenizer."""
    problems = []
    config = results.get("config") or {}
    code_sha = config.get("code_sha256")
    embedded = logs[0].code.get("eval_ttt.py") if logs else None
    source = folder_code.get("eval_ttt.py") if folder_code is not None else embedded
    if not code_sha:
        problems.append("config has no code_sha256 (sha256 of eval_ttt.py)")
    elif source is None:
        problems.append("there is no eval_ttt.py in the logs' embedded code to match its code_sha256")
    elif hashlib.sha256(source).hexdigest() != code_sha:
        problems.append(f"code_sha256 {code_sha[:12]}... is not the sha256 of the record's eval_ttt.py")
    tok = config.get("tokenizer_sha256")
    if tok and logs and tok != logs[0].tokenizer_sha256:
        problems.append(f"tokenizer_sha256 {tok[:12]}... differs from the logs' tokenizer")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Records on disk


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_code_files(folder: Path) -> dict[str, bytes]:
    """Every *.py in a record folder (run outputs and caches left out), by path relative to the folder."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(root) / name
                found[path.relative_to(folder).as_posix()] = path.read_bytes()
    return found


def payload_problems(lg: TrainLog) -> list[str]:
    """The files a log embeds against the payload its own train_gpt.py names (PAYLOAD, and each EXPERIMENT_PAYLOAD
    file whose hyperparameter the log's run switched on): exactly those, none missing and none extra. A train_gpt.py
    older than the explicit list names none, and is not checked."""
    source = lg.code.get("train_gpt.py")
    if source is None:
        return []
    try:
        names = literal_assignments(source.decode("utf-8"), ("PAYLOAD", "EXPERIMENT_PAYLOAD"))
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
        return [f"the embedded train_gpt.py's payload list cannot be read ({type(e).__name__}: {e})"]
    if "PAYLOAD" not in names:
        return []
    switched_on = [name for name, switch in dict(names.get("EXPERIMENT_PAYLOAD", {})).items()
                   if lg.hparams.get(switch, "0") not in ("0", "", "False", "false")]
    want = list(names["PAYLOAD"]) + switched_on
    problems = [f"{name}: in train_gpt.py's payload but not embedded" for name in want if name not in lg.code]
    problems += [f"{name}: embedded but not in train_gpt.py's payload" for name in lg.code if name not in want]
    return problems


def literal_assignments(source: str, names: tuple[str, ...]) -> dict:
    """The values of the module-level `NAME = <literal>` assignments of `names` in a Python source (never run)."""
    import ast

    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in names and node.value is not None:
                    found[target.id] = ast.literal_eval(node.value)
    return found


def find_records(path: Path) -> list[Path]:
    if (path / "submission.json").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("submission.json")
                  if not any(part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(path).parts[:-1]))


def record_loss_values(sub: dict) -> list[float]:
    return [float(s["val_loss"]) for s in sub["seeds"]]


def previous_record(track_dir: Path, folder: Path, date: str, dataset: Dataset | None) -> tuple[Path, dict] | None:
    """The best (lowest mean val_loss) record of the track on the same data dated strictly before `date`."""
    best = None
    if not track_dir.is_dir():
        return None
    for other in sorted(track_dir.iterdir()):
        if other.name.startswith(".") or not other.is_dir() or other.resolve() == folder.resolve():
            continue
        sub_path = other / "submission.json"
        if not sub_path.is_file():
            continue
        try:
            sub = read_json(sub_path)
            if sub.get("record", True) is not True or str(sub["date"]) >= date:
                continue
            if not same_data(record_dataset(other), dataset):
                continue
            values = record_loss_values(sub)
            score = math.fsum(values) / len(values)
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            warn(f"{sub_path}: unreadable, not considered as a previous record")
            continue
        if best is None or score < best[0]:
            best = (score, other, sub)
    return (best[1], best[2]) if best else None


def named_record(track_dir: Path, name: str, date: str, dataset: Dataset | None) -> tuple[tuple[Path, dict] | None, str]:
    """The record `compared_with` names: ((folder, submission), "") or (None, why it cannot be compared with)."""
    other = track_dir / name
    if "/" in name or name in ("", ".", "..") or not (other / "submission.json").is_file():
        return None, f"compared_with {name!r}: no such record in {track_dir}"
    try:
        sub = read_json(other / "submission.json")
        record_loss_values(sub)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"compared_with {name!r}: unreadable submission.json ({e})"
    if str(sub.get("date", "")) > date:
        return None, f"compared_with {name!r}: dated {sub.get('date')}, after this record ({date})"
    other_data = record_dataset(other)
    if not same_data(other_data, dataset):
        theirs = other_data.describe() if other_data else "unknown data"
        return None, f"compared_with {name!r}: scored on other data ({theirs}), so the losses do not compare"
    return (other, sub), ""


def significance(sub: dict, folder: Path, margin: float, alpha: float,
                 dataset: Dataset | None = None) -> tuple[str, str | None]:
    """(a line describing the test, a failure message or None). dataset: the record's data (default: read from the
    folder's logs)."""
    dataset = dataset or record_dataset(folder)
    date = str(sub.get("date", ""))
    if sub.get("compared_with") is not None:
        prev, problem = named_record(folder.parent, str(sub["compared_with"]), date, dataset)
        if prev is None:
            return problem, problem
    else:
        prev = previous_record(folder.parent, folder, date, dataset)
    claims = sub.get("record", True) is True
    if prev is None:
        return "first record of its track on this data: no previous record to test against", None
    prev_folder, prev_sub = prev
    new_values = record_loss_values(sub)
    result = welch_test(new_values, record_loss_values(prev_sub), margin)
    desc = (f"vs {prev_folder.name}: val_loss {mean_std(new_values)[0]:.5f} vs "
            f"{mean_std(record_loss_values(prev_sub))[0]:.5f} - {margin:g}, {result.text()}")
    modes = [(s.get("evaluation") or {}).get("mode") for s in (sub, prev_sub)]
    if modes[0] != modes[1]:
        desc += f" [evaluation modes differ: {modes[0]} vs {modes[1]}]"
    if len(new_values) < 2:
        return desc, ("needs at least 2 seeds for the t-test against " + prev_folder.name) if claims else None
    if result.p < alpha:
        return desc + f" (significant at alpha={alpha:g})", None
    verdict = f"not significant: p={result.p:.3g} >= {alpha:g}"
    if claims:
        return desc, (f"{verdict} (one-sided Welch t-test on val_loss vs {prev_folder.name}, margin {margin:g}: "
                      f"t={result.t:.3f} dof={result.dof:.2f}); add seeds or submit as \"record\": false")
    return f"{desc} ({verdict}; not claimed as a record)", None


def dataset_fingerprint(logs: list[TrainLog], fail) -> list[str]:
    """speedrun.audit.fingerprint's checks of each log's dataset (DATA_PATH relative to the repository, where records'
    runs start), when it is on this machine: tokenizer sha256, val_data documents/tokens/bytes, train shards. They
    need numpy, sentencepiece and torch (train_gpt.py's reader and byte tables); without them they are skipped with a
    warning. Returns the datasets checked."""
    checked, cache = [], {}
    try:
        from speedrun.audit.fingerprint import record_fingerprint_problems

        for lg in logs:
            problems, data = record_fingerprint_problems(lg.hparams, lg.tokenizer_sha256, lg.val_data, lg.train_data,
                                                         REPO, cache)
            for p in problems:
                fail(lg.name, p)
            if data is not None and data not in checked:
                checked.append(data)
    except ImportError as e:
        warn(f"dataset fingerprints not checked ({e})")
    return checked


def verify_record(folder: Path, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA) -> tuple[list[str], str]:
    """(failure lines, each naming a file; a one-line summary)."""
    failures: list[str] = []

    def fail(name: str, message: str) -> None:
        failures.append(f"{folder / name if name else folder}: {message}")

    sub_path = folder / "submission.json"
    try:
        sub = read_json(sub_path)
        if not isinstance(sub, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        fail("submission.json", f"unreadable ({e})")
        return failures, ""
    for key in FREE_FIELDS:
        if key not in sub:
            fail("submission.json", f"no `{key}`")
    date = str(sub.get("date", ""))
    try:
        datetime.date.fromisoformat(date)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise ValueError
    except ValueError:
        fail("submission.json", f"date {date!r} is not YYYY-MM-DD")
    if not folder.name.startswith(f"{date}_"):
        fail("submission.json", f"date {date} does not match the folder name {folder.name} (<YYYY-MM-DD>_<Name>)")
    track_name = str(sub.get("track", ""))
    if track_name != folder.parent.name:
        fail("submission.json", f"track {track_name!r} but the folder is under {folder.parent.name}/")
    track = None
    try:
        track = get_track(track_name)
        if not track.known:
            warn(f"{folder}: unknown track {track_name}; budget {track.budget_seconds:g}s read from its name")
    except RecordError as e:
        fail("submission.json", str(e))
    if not isinstance(sub.get("record", True), bool):
        fail("submission.json", "`record` must be true or false")

    log_paths = sorted(folder.glob("train_seed*.log"))
    if not log_paths:
        fail("", "no train_seed<N>.log in the folder")
        return failures, ""
    logs = [parse_log(p) for p in log_paths]
    for lg in logs:
        m = re.fullmatch(r"train_seed(\d+)\.log", lg.name)
        if not m:
            fail(lg.name, "log names are train_seed<N>.log")
        elif lg.seed is not None and int(m.group(1)) != lg.seed:
            fail(lg.name, f"the log's seed is {lg.seed}, not the {m.group(1)} of its name")
    for lg, problem in log_set_problems(logs, track):
        fail(lg.name, problem)
    checked = dataset_fingerprint(logs, fail)

    # (a) code: every file in the folder equals the code embedded in each log, and nothing embedded is missing
    code = folder_code_files(folder)
    for lg in logs:
        for name, data in lg.code.items():
            if name not in code:
                fail(name, f"missing: embedded in {lg.name} but not in the folder")
            elif code[name] != data:
                have, want = (hashlib.sha256(x).hexdigest()[:12] for x in (code[name], data))
                fail(name, f"differs from the code embedded in {lg.name} (sha256 {have}... vs {want}...)")
        for name in code:
            if name not in lg.code:
                fail(name, f"not embedded in {lg.name}: a record holds only the code that produced it")
        for problem in payload_problems(lg):
            fail(lg.name, problem)

    # (b) numbers: submission.json against the logs and the results JSON
    results = None
    eval_path = folder / EVAL_FILE
    if eval_path.is_file():
        try:
            results = read_json(eval_path)
            if not isinstance(results, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            fail(EVAL_FILE, f"unreadable ({e})")
            results = None
        if results is not None:
            for p in eval_problems(results) + eval_vs_logs_problems(results, logs, code):
                fail(EVAL_FILE, p)
    elif sub.get("eval_results") is not None:
        fail(EVAL_FILE, "missing, but submission.json has eval_results")
    usable = [lg for lg in logs if lg.seed is not None and lg.final is not None
              and all(k in lg.final for k in ("val_loss", "val_bpb", "mode", "steps", "train_time"))]
    mismatches: list[str] = []
    if len(usable) == len(logs) and len({lg.seed for lg in logs}) == len(logs):
        try:
            want = derived_submission(logs, results)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            fail("submission.json", f"cannot be rebuilt from the logs ({type(e).__name__}: {e})")
            want = None
        if want is not None:
            for key, value in want.items():
                if key not in sub:
                    mismatches.append(f"{key} is missing")
                else:
                    _compare(key, value, sub[key], mismatches)
            for key in sub:
                if key not in want and key not in FREE_FIELDS + OPTIONAL_FIELDS:
                    mismatches.append(f"{key} is not expected")
    else:  # some logs are broken (already reported): still check the seeds of the others
        listed = {s.get("seed"): (i, s) for i, s in enumerate(sub.get("seeds") or []) if isinstance(s, dict)}
        for lg in usable:
            if lg.seed not in listed:
                mismatches.append(f"seeds has no entry for seed {lg.seed} ({lg.name})")
            else:
                i, entry = listed[lg.seed]
                _compare(f"seeds[{i}]", seed_entry(lg), entry, mismatches)
    for m in mismatches:
        fail("submission.json", m)

    # (d) statistics
    summary = ""
    try:
        values = record_loss_values(sub)
        bpb = [float(s["val_bpb"]) for s in sub["seeds"]]
        mean, std = mean_std(bpb)
        desc, problem = significance(sub, folder, margin, alpha, log_dataset(logs[0]))
        if problem:
            fail("submission.json", problem)
        summary = (f"{len(values)} seeds, val_bpb {mean:.5f} ± {std if std is not None else 0:.5f}; {desc}; "
                   + (f"dataset {', '.join(checked)} matches the logs" if checked else "dataset not on this machine"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        fail("submission.json", f"seeds unreadable for the statistics ({type(e).__name__})")
    return failures, summary


# ----------------------------------------------------------------------------------------------------------------------
# Named checks: one row per check, for `verify --json` and for the rules of other leaderboards (speedrun.records.peers)

STATUSES = ("ok", "FAULT", "info", "skip")


@dataclass
class Check:
    check: str  # e.g. "claim", "train_time"
    status: str  # one of STATUSES
    detail: str  # one line naming the file and the numbers

    def line(self) -> str:
        return f"  {self.check:<15} {self.status:<5} {self.detail}"


@dataclass
class RecordReport:
    path: Path
    rules: str  # "ours", "parameter-golf" or "modded-nanogpt"
    checks: list[Check]
    summary: str = ""

    @property
    def faults(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAULT"]

    def as_json(self) -> dict:
        return {"path": str(self.path), "rules": self.rules,
                "checks": [{"check": c.check, "status": c.status, "detail": c.detail} for c in self.checks]}


def our_record_checks(folder: Path, margin: float = DEFAULT_MARGIN,
                      alpha: float = DEFAULT_ALPHA) -> tuple[RecordReport, list[str]]:
    """verify_record as named checks: `record` (code, numbers, logs, track, dataset, statistics: every failure line
    but the limits') and the track's limits one check each (train_time; eval_time and artifact_size on tracks with
    those limits); and verify_record's failure lines, all of them."""
    all_failures, summary = verify_record(folder, margin, alpha)
    failures = list(all_failures)
    checks: list[Check] = []
    track = None
    try:
        track = get_track(str(read_json(folder / "submission.json").get("track", "")))
    except (OSError, ValueError, AttributeError, RecordError):
        pass
    if track is not None:
        logs = [parse_log(p) for p in sorted(folder.glob("train_seed*.log"))]
        names = ["train_time"] + (["eval_time"] if track.eval_seconds else []) \
            + (["artifact_size"] if track.artifact_bytes else [])
        found = {name: [] for name in names}
        for lg in logs:
            for name, problem in limit_problems(lg, track).items():
                found[name].append(f"{folder / lg.name}: {problem}")
        for name in names:
            lines = found[name]
            failures = [f for f in failures if f not in lines]
            checks.append(Check(name, "FAULT" if lines else "ok", "; ".join(lines) if lines else
                                f"{len(logs)} logs within the {track.name} limit"))
    checks.insert(0, Check("record", "FAULT" if failures else "ok", "; ".join(failures) if failures else summary))
    return RecordReport(folder, "ours", checks, summary), all_failures

"""`speedrun reproduce` (speedrun.records.reproduce): a record against the record it beat, trained again here.

The fast tests build pairs of records whose embedded train_gpt.py is a fake trainer: it writes train_gpt.py-style
logs (its code embedded, env_overrides, hparams, the prepared sample's real data fingerprint, train losses, a final
val_loss that depends on the seed and MATRIX_LR) in a fraction of a second and imports its kernels/ package, so a
reproduction that ran anything but the record's own code, or ran it without its kernels/, would show. They check the
verdicts (holds, weaker, does not hold on a seed-noise "improvement"), the step-by-step comparison of a fixed-step
record (exact, and where a drifting run parts), the interleaved order of a wall-clock record's arms, bad input and a
crashing run. The slow test builds a real tiny fixed-step pair with train_gpt.py and `record.py new` and reproduces
it to the digit."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
from speedrun.records import new as record_new, reproduce
from speedrun.analysis.run_log import parse_log

DATE = "2026-01-02"
TRACK = "cpu_5min"
DATA = "data/datasets/peps_sp1024_spread"  # relative to the repository, as records name it

FAKE_TRAIN = textwrap.dedent(r'''
    import hashlib, os, sys
    from pathlib import Path
    from kernels import OFFSET  # the record's own kernels/ must have come along

    here, env = Path(__file__).resolve().parent, os.environ
    DEFAULTS = {"seed": "1337", "run_id": "run", "data_path": "", "tokenizer_path": "", "log_dir": "logs",
                "checkpoint_dir": "checkpoints", "iterations": "6", "max_wallclock_seconds": "0",
                "matrix_lr": "0.04", "train_batch_tokens": "512", "train_log_every": "1"}
    hp = {k: env.get(k.upper(), v) for k, v in DEFAULTS.items()}
    hp["tokenizer_path"] = hp["tokenizer_path"] or hp["data_path"] + "/tokenizer.model"
    if env.get("FAKE_CALLS"):
        with open(env["FAKE_CALLS"], "a") as f:
            f.write(f"{hp['run_id']} {os.getcwd()} {env.get('OMP_NUM_THREADS', '-')}\n")
    Path(hp["log_dir"]).mkdir(parents=True, exist_ok=True)
    log = open(Path(hp["log_dir"]) / f"{hp['run_id']}.txt", "wb")
    for name in ("train_gpt.py", "kernels/__init__.py", "eval_ttt.py"):
        code = (here / name).read_bytes()
        log.write(b"#### file %s bytes=%d sha256=%s\n" % (name.encode(), len(code),
                                                          hashlib.sha256(code).hexdigest().encode()))
        log.write(code + b"\n#### end %s\n" % name.encode())

    def line(text):
        print(text, flush=True)
        log.write(text.encode() + b"\n")
        log.flush()

    line("versions: python:3 torch:fake")
    line("gpus: none (fake trainer)")
    line("env_overrides: " + " ".join(f"{k.upper()}={env[k.upper()]}" for k in DEFAULTS if k.upper() in env))
    for k, v in hp.items():
        line(f"hparam {k}={v}")
    line(f"tokenizer: {hp['tokenizer_path']} sha256:TOKENIZER_SHA256 pieces:1024")
    line("train_data: shards:TRAIN_SHARDS documents:630 tokens:5419916")
    line("val_data: documents:VAL_DOCUMENTS tokens:VAL_TOKENS bytes:VAL_BYTES")
    line("model_params:100 world_size:1 grad_accum:1 micro_batch_tokens:512")
    seed, lr, iters = int(hp["seed"]), float(hp["matrix_lr"]), int(hp["iterations"])
    drift = int(env.get("FAKE_DRIFT", "0"))  # from this step on, the run's losses move: a reproduction that parts
    for step in range(1, iters + 1):
        loss = 7 - 0.3 * step - 5 * lr * step + 0.01 * (seed % 5) + (0.05 if drift and step >= drift else 0)
        line(f"step:{step}/{iters} train_loss:{loss:.4f} train_time:{10 * step}ms step_avg:10.00ms tokens_per_s:51200")
        if env.get("FAKE_CRASH") and hp["run_id"].startswith(env["FAKE_CRASH"]) and step == 3:
            print("RuntimeError: fake crash at step 3", file=sys.stderr, flush=True)
            sys.exit(3)
    val_loss = 6 - 10 * lr + OFFSET + 0.01 * (seed % 7) + (0.05 if drift else 0)
    val_bpb = val_loss * 0.62
    line(f"final_eval mode:flat window:64 stride:64 val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} docs:1 tokens:9 "
         "bytes:20 eval_time:1ms")
    line(f"final val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} mode:flat steps:{iters} train_time:{10 * iters}ms")
''')


@pytest.fixture(scope="module")
def fake_code(sample_data, tmp_path_factory) -> Path:
    """The fake record code (train_gpt.py, kernels/__init__.py, eval_ttt.py), naming the prepared sample's real
    fingerprint so that the reproduction's dataset check passes."""
    from speedrun.audit.fingerprint import fingerprint

    fp = fingerprint(str(sample_data), str(sample_data / "tokenizer.model"), 1024)
    code = tmp_path_factory.mktemp("fake_code")
    text = FAKE_TRAIN
    for key, value in (("TOKENIZER_SHA256", fp["tokenizer_sha256"]), ("TRAIN_SHARDS", fp["train_shards"]),
                       ("VAL_DOCUMENTS", fp["val_documents"]), ("VAL_TOKENS", fp["val_tokens"]),
                       ("VAL_BYTES", fp["val_bytes"])):
        text = text.replace(key, str(value))
    (code / "train_gpt.py").write_text(text)
    (code / "kernels").mkdir()
    (code / "kernels" / "__init__.py").write_text("OFFSET = 0.0\n")
    (code / "eval_ttt.py").write_text("# the fake record's evaluation script (not run)\n")
    return code


def build_record(fake_code: Path, records: Path, name: str, seeds, env: dict, compared_with: str | None = None,
                 date: str = "2026-11-20") -> Path:
    """A record folder as `record.py new` lays it out: the code, one log per seed written by that code, and a
    submission.json (the fields reproduce reads: its seeds and compared_with)."""
    folder = records / TRACK / f"{date}_{name}"
    shutil.copytree(fake_code, folder)
    work = folder.parent / f".work_{name}"
    rows = []
    for seed in seeds:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE")}
        run_env.update(env, DATA_PATH=DATA, SEED=str(seed), RUN_ID=f"{name}_seed{seed}", LOG_DIR=str(work))
        subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=run_env, check=True,
                       stdout=subprocess.DEVNULL)
        log = folder / f"train_seed{seed}.log"
        shutil.move(work / f"{name}_seed{seed}.txt", log)
        final = parse_log(log).final
        rows.append({"seed": seed, "log": log.name, "val_loss": final["val_loss"], "val_bpb": final["val_bpb"]})
    shutil.rmtree(work)
    sub = {"name": name, "author": "tests", "date": date, "track": TRACK, "blurb": "", "record": True, "seeds": rows}
    if compared_with:
        sub["compared_with"] = compared_with
    (folder / "submission.json").write_text(json.dumps(sub, indent=2))
    return folder


@pytest.fixture(scope="module")
def built(fake_code, tmp_path_factory):
    """Records built once per module, by their seeds and environment; tests get copies."""
    store, cache = tmp_path_factory.mktemp("built"), {}

    def get(name, seeds, env, compared_with=None) -> Path:
        key = (name, tuple(seeds), tuple(sorted(env.items())), compared_with)
        if key not in cache:
            cache[key] = build_record(fake_code, store / str(len(cache)), name, seeds, env, compared_with)
        return cache[key]
    return get


@pytest.fixture
def tool(tmp_path, monkeypatch, capsys, built):
    for name in list(os.environ):  # nothing of the shell's hyperparameters or of earlier fakes
        if name.startswith("FAKE") or name in ("MATRIX_LR", "ITERATIONS", "MAX_WALLCLOCK_SECONDS"):
            monkeypatch.delenv(name)
    records, experiments = tmp_path / "records", tmp_path / "experiments"
    calls = tmp_path / "calls.txt"

    def pair(record_env=None, against_env=None, seeds=(1, 2), record_seeds=None):
        made = [built("Base", seeds, {"MATRIX_LR": "0.04", **(against_env or {})}),
                built("Better", record_seeds or seeds, {"MATRIX_LR": "0.06", **(record_env or {})},
                      compared_with="2026-11-20_Base")]
        for folder in made:
            shutil.copytree(folder, records / TRACK / folder.name)
        monkeypatch.setenv("FAKE_CALLS", str(calls))  # from here on: the reproduction's runs
        return records / TRACK / made[1].name, records / TRACK / made[0].name

    def run(*argv):
        code = reproduce.main([*map(str, argv), "--date", DATE, "--experiments-dir", experiments])
        out, err = capsys.readouterr()
        return code, out, err

    def ran() -> list[list[str]]:
        return [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []

    def summary(rec: Path) -> dict:
        return json.loads((experiments / f"{DATE}_reproduce_{rec.name}" / "summary.json").read_text())

    return SimpleNamespace(pair=pair, run=run, ran=ran, summary=summary, records=records, experiments=experiments)


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts and the table


def test_fixed_step_pair_is_reproduced_exactly_and_holds(tool, monkeypatch):
    rec, against = tool.pair(seeds=(1, 2, 3))
    monkeypatch.setenv("MATRIX_LR", "0.5")  # set in the shell: must not reach either arm
    monkeypatch.setenv("ITERATIONS", "2")
    code, out, err = tool.run(rec, "--seeds", "3")
    assert code == 0, err
    s = tool.summary(rec)
    folder = tool.experiments / f"{DATE}_reproduce_{rec.name}"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "logs", "summary.json"]
    assert [p.name for p in tool.experiments.iterdir()] == [folder.name]  # no temporary folder, no failed log
    # every run ran its record's code from a temporary copy (gone now), and its log is the claimed one again
    for run_id, cwd, _ in tool.ran():
        assert Path(cwd).name == run_id.split("_")[0] and not Path(cwd).exists()
    for r in s["runs"]:
        arm = rec if r["arm"] == "record" else against
        claimed, here = parse_log(arm / f"train_seed{r['seed']}.log"), parse_log(folder / r["log"])
        assert here.code == claimed.code and here.code["train_gpt.py"] == (arm / "train_gpt.py").read_bytes()
        assert here.final["val_loss"] == claimed.final["val_loss"] == r["val_loss"] == r["claimed"]["val_loss"]
        assert here.hparams["matrix_lr"] == claimed.hparams["matrix_lr"] and here.hparams["iterations"] == "6"
        assert here.hparams["data_path"] == str(ROOT / DATA)
    # the statistics, recomputed independently
    values = {arm: [r["val_loss"] for r in s["runs"] if r["arm"] == arm] for arm in ("against", "record")}
    assert s["improvement"]["val_loss"] == pytest.approx(statistics.mean(values["against"])
                                                         - statistics.mean(values["record"]))
    assert s["improvement"]["val_loss"] == pytest.approx(0.2) == pytest.approx(s["improvement"]["claimed_val_loss"])
    shifted = [v - 0.005 for v in values["against"]]  # H1: record < against - margin
    welch = scipy.stats.ttest_ind(values["record"], shifted, equal_var=False, alternative="less")
    assert s["improvement"]["p"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert s["verdict"] == "holds" and s["margin"] == 0.005 and s["alpha"] == 0.01
    # step by step: every seed of both arms agrees with its log at every step
    assert [(a["arm"], a["seed"]) for a in s["step_by_step"]] == [(r["arm"], r["seed"]) for r in s["runs"]]
    assert all(a["agrees"] and a["steps_compared"] == 6 and a["max_abs_difference"] == 0 for a in s["step_by_step"])
    # the printed table
    rows = {}
    for line in out.splitlines():
        rows.setdefault(line.split()[0], line)  # each record's table row comes before its step-by-step lines
    base = s["arms"]["against"]["here"]
    assert f"{base['val_bpb_mean']:.4f} ± {base['val_bpb_std']:.4f}" in rows[against.name]
    assert "6 → 6" in rows[against.name] and "51,200 → 51,200" in rows[against.name]
    assert f"improvement here ({against.name} - {rec.name}): +0.2000 nats" in out
    assert f"{s['improvement']['p']:.3g}" in out and "verdict: holds: a significant improvement" in out
    assert f"{rec.name} seed 2 against train_seed2.log: train_loss agrees at all 6 logged steps" in out
    readme = (folder / "README.md").read_text()
    assert "Verdict: **holds" in readme and s["command"] in readme and f"| {rec.name} | 2 |" in readme
    assert s["command"] == f"speedrun reproduce {rec} --seeds 3 --experiments-dir {tool.experiments}"


@pytest.mark.parametrize("record_lr, verdict, code", [("0.0402", "weaker", 1), ("0.03", "does not hold", 1)])
def test_verdicts_weaker_and_does_not_hold(tool, record_lr, verdict, code):
    rec, _ = tool.pair(record_env={"MATRIX_LR": record_lr})
    got, out, err = tool.run(rec)
    assert got == code, err
    assert tool.summary(rec)["verdict"] == verdict and f"verdict: {verdict}:" in out


def test_an_improvement_that_was_seed_noise_does_not_hold(tool):
    """The same configuration in both records; the 'record' only claims luckier seeds. Run on the same seeds, the
    two arms are the same runs: no improvement here."""
    rec, against = tool.pair(record_env={"MATRIX_LR": "0.04"}, record_seeds=(7, 15))
    claimed = {key: statistics.mean(r["val_loss"] for r in json.loads((f / "submission.json").read_text())["seeds"])
               for key, f in (("against", against), ("record", rec))}
    assert claimed["against"] - claimed["record"] > 0.009  # what the record claims
    code, out, err = tool.run(rec)
    assert code == 1, err
    s = tool.summary(rec)
    assert s["seeds"] == [7, 15] and s["arms"]["against"]["seeds_without_log"] == [7, 15]
    assert s["improvement"]["val_loss"] == 0 and s["improvement"]["claimed_val_loss"] == pytest.approx(
        claimed["against"] - claimed["record"])
    assert s["verdict"] == "does not hold" and "verdict: does not hold: no improvement on this machine" in out
    assert f"(seeds 7, 15: not in {against.name}'s logs, run with the configuration of its first log" in out
    assert [a["arm"] for a in s["step_by_step"]] == ["record"] * 2  # the against arm has no log for these seeds


def test_a_reproduction_that_parts_says_where(tool, monkeypatch):
    rec, _ = tool.pair()
    monkeypatch.setenv("FAKE_DRIFT", "4")  # this machine's runs move from step 4 on
    code, out, err = tool.run(rec)
    assert code == 0, err
    s = tool.summary(rec)
    for a in s["step_by_step"]:
        assert not a["agrees"] and a["parts_at_step"] == 4
        assert a["train_loss_here"] == pytest.approx(a["train_loss_logged"] + 0.05)
        assert a["val_loss_here"] == pytest.approx(a["val_loss_logged"] + 0.05)
    seed1 = next(a for a in s["step_by_step"] if a["arm"] == "record" and a["seed"] == 1)
    assert (f"{rec.name} seed 1 against train_seed1.log: parts at step 4: train_loss "
            f"{seed1['train_loss_logged']:.4f} logged, {seed1['train_loss_here']:.4f} here (tolerance 0.001)") in out
    code, out, _ = tool.run(rec, "--tolerance", "0.06", "--force")  # a looser tolerance lets them agree
    assert all(a["agrees"] for a in tool.summary(rec)["step_by_step"])


def test_wall_clock_records_interleave_their_arms(tool):
    rec, against = tool.pair(record_env={"MAX_WALLCLOCK_SECONDS": "215"},
                             against_env={"MAX_WALLCLOCK_SECONDS": "215"})
    code, out, err = tool.run(rec)
    assert code == 0, err
    order = ["against_seed1", "record_seed1", "record_seed2", "against_seed2"]
    assert [call[0] for call in tool.ran()] == order and tool.summary(rec)["order"] == order
    s = tool.summary(rec)
    assert s["step_by_step"] == [] and not s["arms"]["record"]["fixed_steps"]
    assert (f"{rec.name}: wall-clock record (MAX_WALLCLOCK_SECONDS=215): its step count follows this machine's "
            "speed; train losses not compared step by step") in out


def test_jobs_run_both_arms_of_a_seed_at_once(tool):
    rec, _ = tool.pair()
    code, out, err = tool.run(rec, "--jobs", "2")
    assert code == 0, err
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert sorted((c[0], c[2]) for c in tool.ran()) == sorted((f"{a}_seed{s}", threads) for s in (1, 2)
                                                              for a in ("against", "record"))
    assert "not solo figures" in out and "--jobs 2" in tool.summary(rec)["command"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input and a crashing run


def edit_logs(folder: Path, old: str, new: str) -> None:
    """Change a line of every log of a record, after the embedded code."""
    for log in folder.glob("train_seed*.log"):
        head, sep, tail = log.read_bytes().rpartition(b"\n#### end ")
        end = tail.index(b"\n") + 1
        log.write_bytes(head + sep + tail[:end] + tail[end:].replace(old.encode(), new.encode()))


@pytest.mark.parametrize("case, message", [
    ("not a record", "nowhere: not a record (a folder with submission.json and train_seed<N>.log)"),
    ("no compared_with", "submission.json: no compared_with; name the record to compare with: --against FOLDER"),
    ("missing against", "2026-11-20_Gone (its compared_with): not a record"),
    ("other data", "their losses do not compare"),
    ("dataset not here", "its dataset data/datasets/nowhere is not on this machine"),
    ("dataset differs", "the dataset on this machine is not the one it was scored on: dataset fingerprint"),
    ("code differs", "train_gpt.py: differs from the code embedded in train_seed1.log"),
    ("kernel missing", "kernels/__init__.py: missing"),
    ("too many seeds", "--seeds 3: "),
    ("no seeds", "--seeds 0: must be at least 1"),
    ("jobs", "--jobs 0: must be at least 1"),
    ("unknown option", "unrecognized arguments: --bogus"),
    ("exists", f"{DATE}_reproduce_2026-11-20_Better exists; give --force to replace it"),
])
def test_bad_input_is_one_line_and_runs_nothing(tool, case, message):
    rec, against = tool.pair()
    argv = [rec]
    if case == "not a record":
        argv = [rec.parent / "nowhere"]
    elif case in ("no compared_with", "missing against"):
        sub = json.loads((rec / "submission.json").read_text())
        if case == "no compared_with":
            del sub["compared_with"]
        else:
            sub["compared_with"] = "2026-11-20_Gone"
        (rec / "submission.json").write_text(json.dumps(sub))
    elif case == "other data":
        edit_logs(against, "val_data: documents:", "val_data: documents:1")
    elif case == "dataset not here":
        for folder in (rec, against):
            edit_logs(folder, f"hparam data_path={DATA}", "hparam data_path=data/datasets/nowhere")
    elif case == "dataset differs":
        for folder in (rec, against):
            edit_logs(folder, "train_data: shards:1", "train_data: shards:2")
    elif case == "code differs":
        (rec / "train_gpt.py").write_text("print('edited')\n")
    elif case == "kernel missing":
        (against / "kernels" / "__init__.py").unlink()
    elif case == "too many seeds":
        argv += ["--seeds", "3"]
    elif case == "no seeds":
        argv += ["--seeds", "0"]
    elif case == "jobs":
        argv += ["--jobs", "0"]
    elif case == "unknown option":
        argv += ["--bogus"]
    elif case == "exists":
        (tool.experiments / f"{DATE}_reproduce_{rec.name}").mkdir(parents=True)
    code, out, err = tool.run(*argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and tool.ran() == []
    assert not tool.experiments.exists() or [p.name for p in tool.experiments.iterdir()] == (
        [f"{DATE}_reproduce_{rec.name}"] if case == "exists" else [])


def test_a_crashing_run_stops_the_reproduction_and_keeps_its_tail(tool, monkeypatch):
    rec, _ = tool.pair()
    monkeypatch.setenv("FAKE_CRASH", "record")
    code, out, err = tool.run(rec)
    assert code == 2 and out == ""
    failed = tool.experiments / f"{DATE}_reproduce_{rec.name}.failed.log"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {rec.name} run, seed 1: exit status 3; no output folder written; its last "
                      f"{sum(line.startswith('  | ') for line in err.splitlines())} lines of output (kept in "
                      f"{failed.as_posix()}):"]
    assert "  | RuntimeError: fake crash at step 3" in err.splitlines()
    assert [c[0] for c in tool.ran()] == ["against_seed1", "record_seed1"]  # nothing after the crash
    text = failed.read_text().splitlines()
    assert text[0] == f"# reproduce {rec.name}: the {rec.name} run, seed 1, failed: exit status 3"
    assert "MATRIX_LR=0.06" in text[1] and "SEED=1" in text[1] and text[-1] == "RuntimeError: fake crash at step 3"
    assert sorted(p.name for p in tool.experiments.iterdir()) == [failed.name]
    monkeypatch.delenv("FAKE_CRASH")  # fixed: the next reproduction removes the stale tail
    assert tool.run(rec)[0] == 0 and not failed.exists()


@pytest.mark.slow
def test_record_py_reproduce_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "speedrun", "reproduce", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path}: not a record (a folder with submission.json and train_seed<N>.log)\n"


# ----------------------------------------------------------------------------------------------------------------------
# The real thing: a tiny fixed-step pair trained by train_gpt.py, packaged by `record.py new`, reproduced to the digit

TINY = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64",
        "TRAIN_BATCH_TOKENS": "512", "TRAIN_MICRO_BATCHES": "1", "ITERATIONS": "4", "WARMDOWN_ITERS": "1",
        "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "1", "VAL_MAX_DOCS": "1", "EVAL_MODES": "flat",
        "EVAL_BATCH_TOKENS": "4096", "COMPILE": "0"}


@pytest.mark.slow
def test_real_tiny_fixed_step_pair_is_reproduced_to_the_digit(tmp_path, sample_data, capsys, monkeypatch):
    import train_gpt

    for field in dataclasses.fields(train_gpt.Hyperparameters):  # nothing from the shell running the tests
        monkeypatch.delenv(field.name.upper(), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    records, logs = tmp_path / "records", tmp_path / "logs"
    folders = {}
    for name, extra, more in (("Base", {}, []), ("Better", {"MATRIX_LR": "0.08"}, ["--against", "2026-11-20_Base",
                                                                                    "--no-record"])):
        paths = []
        for seed in (1, 2):
            env = {**os.environ, **TINY, **extra, "DATA_PATH": DATA, "SEED": str(seed), "RUN_ID": f"{name}_{seed}",
                   "LOG_DIR": str(logs), "CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
            subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            paths.append(logs / f"{name}_{seed}.txt")
        assert record_new.main(["--name", name, "--track", TRACK, "--date", "2026-11-20", "--author", "tests",
                            "--records-dir", str(records), *more, *map(str, paths)]) == 0
        folders[name] = records / TRACK / f"2026-11-20_{name}"
    capsys.readouterr()
    code = reproduce.main([str(folders["Better"]), "--seeds", "2", "--tolerance", "0", "--date", DATE,
                        "--experiments-dir", str(tmp_path / "experiments")])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    s = json.loads((tmp_path / "experiments" / f"{DATE}_reproduce_2026-11-20_Better" / "summary.json").read_text())
    assert len(s["step_by_step"]) == 4 and all(a["agrees"] and a["steps_compared"] == 4 for a in s["step_by_step"])
    for r in s["runs"]:
        assert r["val_loss"] == r["claimed"]["val_loss"] and r["val_bpb"] == r["claimed"]["val_bpb"]
    assert out.count("train_loss agrees at all 4 logged steps (max |difference| 0.0000, tolerance 0)") == 4


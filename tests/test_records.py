"""Record packaging and verification (speedrun new / verify / leaderboard) and curves (speedrun plot).

The training logs are real: tests/fixtures/record_logs/tiny_seed{1,2,3}.txt were written by train_gpt.py with the tiny
configuration of TINY_ENV (about 20 s each on 2 CPU cores), and eval_seed1.json by eval_ttt.py (TTT) on the checkpoint
of seed 1. Regenerate them with `python tests/test_records.py --regenerate` after a change to the log format; when the
logs are missing, the tests write them into a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import scipy.stats

from conftest import prepare_sample
from speedrun import cli
from speedrun.analysis import plot, run_log
from speedrun.records import check as record_check
from speedrun.records import leaderboard, new as record_new

REPO = Path(__file__).resolve().parent.parent

FIXTURES = REPO / "tests" / "fixtures" / "record_logs"
SEEDS = (1, 2, 3)
TINY_ENV = {
    "COMPILE": "0", "NUM_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "1024", "TRAIN_MICRO_BATCHES": "2", "ITERATIONS": "8", "WARMUP_STEPS": "0",
    "VAL_LOSS_EVERY": "2", "MAX_WALLCLOCK_SECONDS": "300", "WARMDOWN_ITERS": "3", "VAL_MAX_DOCS": "2",
    "EVAL_WINDOW": "128", "EVAL_STRIDE": "64", "EVAL_BATCH_TOKENS": "8192", "OMP_NUM_THREADS": "1",
}
TRACK = "cpu_5min"


def generate_logs(dest: Path, with_eval: bool = False) -> list[Path]:
    """Run train_gpt.py for real, once per seed, on the prepared bundled sample, and copy its logs to
    dest/tiny_seed<N>.txt (and, with_eval, the results of eval_ttt.py's TTT on seed 1's checkpoint to
    dest/eval_seed1.json)."""
    dest.mkdir(parents=True, exist_ok=True)
    data_path = os.path.relpath(prepare_sample(), REPO)  # as run.sh names it, so any clone finds its own copy
    out = []
    with tempfile.TemporaryDirectory() as work:
        for seed in SEEDS:
            env = {**os.environ, **TINY_ENV, "DATA_PATH": data_path, "RUN_ID": f"tiny_seed{seed}", "SEED": str(seed),
                   "LOG_DIR": str(Path(work, "logs")), "CHECKPOINT_DIR": str(Path(work, "checkpoints"))}
            subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            out.append(dest / f"tiny_seed{seed}.txt")
            shutil.copyfile(Path(work, "logs", f"tiny_seed{seed}.txt"), out[-1])
        if with_eval and (REPO / "eval_ttt.py").is_file():
            subprocess.run([sys.executable, str(REPO / "eval_ttt.py"), "--checkpoint", "checkpoints/tiny_seed1.pt",
                            "--mode", "ttt", "--chunk", "32", "--lora-rank", "4", "--max-docs", "2",
                            "--out", str(dest / "eval_seed1.json")],
                           cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> list[Path]:
    committed = [FIXTURES / f"tiny_seed{seed}.txt" for seed in SEEDS]
    if all(p.is_file() for p in committed):
        return committed
    return generate_logs(tmp_path_factory.mktemp("logs"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def new_record(capsys, records_dir: Path, logs, name="Tiny", date="2026-11-22", *extra) -> Path:
    code, out, err = run_cli(capsys, "new", "--name", name, "--track", TRACK, "--date", date, "--author", "tests",
                             "--blurb", "tiny real runs", "--records-dir", records_dir, *extra, *logs)
    assert code == 0, out + err
    return records_dir / TRACK / f"{date}_{name}"


@pytest.fixture(scope="module")
def made(tmp_path_factory, logs) -> Path:
    """A record built by `speedrun new` from the tiny real logs (module scope: built once)."""
    records_dir = tmp_path_factory.mktemp("records")
    code = record_new.main(["--name", "Tiny", "--track", TRACK, "--date", "2026-11-22", "--author", "tests",
                        "--records-dir", str(records_dir), *map(str, logs)])
    assert code == 0
    return records_dir / TRACK / "2026-11-22_Tiny"


@pytest.fixture
def copy_of(made, tmp_path):
    """A fresh copy of the made record, under a folder named after its track."""
    def make() -> Path:
        dest = tmp_path / "records" / TRACK / made.name
        shutil.copytree(made, dest)
        return dest
    return make


def failures_of(folder: Path) -> list[str]:
    failures, _ = record_check.verify_record(folder)
    return failures


def set_embedded(log_bytes: bytes, name: str, content: bytes) -> bytes:
    """The log with its embedded file `name` replaced (or appended after the last one), header sha256 updated."""
    header = f"#### file {name} bytes={len(content)} sha256={hashlib.sha256(content).hexdigest()}\n".encode()
    block = header + content + f"\n#### end {name}\n".encode()
    m = re.search(rf"#### file {re.escape(name)} bytes=(\d+) sha256=[0-9a-f]{{64}}\n".encode(), log_bytes)
    if m:
        end = m.end() + int(m.group(1)) + len(f"\n#### end {name}\n")
        return log_bytes[:m.start()] + block + log_bytes[end:]
    last = log_bytes.rfind(b"\n#### end ")
    cut = log_bytes.index(b"\n", last + 1) + 1
    return log_bytes[:cut] + block + log_bytes[cut:]


# ----------------------------------------------------------------------------------------------------------------------
# Records that exist: every committed record verifies, and so does what `new` makes


def committed_records() -> list[Path]:
    return sorted(p.parent for p in (REPO / "records").glob("*/*/submission.json"))


@pytest.mark.parametrize("which", [str(p.relative_to(REPO)) for p in committed_records()] + ["speedrun new output"])
def test_verify_passes(which, made, capsys):
    folder = made if which == "speedrun new output" else REPO / which
    code, out, err = run_cli(capsys, "verify", folder)
    assert code == 0, out + err
    assert out.startswith(f"ok {folder}")


def test_new_output_layout(made, logs):
    names = sorted(p.relative_to(made).as_posix() for p in made.rglob("*") if p.is_file())
    parsed = run_log.parse_log(logs[0])
    assert set(names) == {"README.md", "submission.json", *parsed.code, *(f"train_seed{s}.log" for s in SEEDS)}
    for name, data in parsed.code.items():  # the code comes from the logs, byte for byte
        assert (made / name).read_bytes() == data
    sub = json.loads((made / "submission.json").read_text())
    assert [s["seed"] for s in sub["seeds"]] == list(SEEDS)
    finals = [run_log.parse_log(p).final for p in logs]
    assert [s["val_bpb"] for s in sub["seeds"]] == [f["val_bpb"] for f in finals]
    assert sub["val_bpb"]["mean"] == pytest.approx(sum(f["val_bpb"] for f in finals) / 3, rel=1e-12)
    assert sub["hardware"]["gpus"].startswith("none") and sub["versions"]["torch"]
    assert sub["evaluation"] == {**sub["evaluation"], "mode": "strided", "window": 128, "stride": 64}
    readme = (made / "README.md").read_text()
    assert f"{sub['val_bpb']['mean']:.5f}" in readme and "MODEL_DIM=32" in readme and "python train_gpt.py" in readme


def test_reproduce_command_replays_exactly_the_overrides(logs, tmp_path):
    lg = run_log.parse_log(logs[0])
    words = shlex.split(record_new.reproduce_command(lg))
    assert words[:3] == [f"DATA_PATH={lg.hparams['data_path']}", "SEED=<seed>", "RUN_ID=seed<seed>"]
    assert words[-2:] == ["python", "train_gpt.py"]
    given = {k: v for k, v in TINY_ENV.items() if k != "OMP_NUM_THREADS"}  # the one variable that is not a hyperparameter
    assert dict(w.split("=", 1) for w in words[3:-2]) == given
    # a log from before the env_overrides: line: every hyperparameter, spelled out
    old = tmp_path / "old.txt"
    old.write_bytes(b"".join(line for line in logs[0].read_bytes().splitlines(keepends=True)
                             if not line.startswith(b"env_overrides:")))
    old_words = shlex.split(record_new.reproduce_command(run_log.parse_log(old)))
    assert len(old_words) - 5 == len(lg.hparams) - len(record_check.PER_RUN_HPARAMS) and "MODEL_DIM=32" in old_words


@pytest.mark.slow
def test_verify_via_subprocess(made):
    proc = subprocess.run([sys.executable, "-m", "speedrun", "verify", str(made.parent.parent)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok " in proc.stdout


def test_verify_paths(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "verify", tmp_path)  # nothing to check: bad usage
    assert code == 2 and out == f"no records under {tmp_path}\n"
    (tmp_path / "train_seed1.log").write_text("x\n")  # a record folder that lost its submission.json
    code, out, _ = run_cli(capsys, "verify", tmp_path)
    assert code == 1 and out == f"{tmp_path}: not a record (a folder with submission.json and train_seed<N>.log)\n"
    code, out, _ = run_cli(capsys, "verify", tmp_path, tmp_path / "missing")
    assert code == 2 and out == (f"{tmp_path}: not a record (a folder with submission.json and train_seed<N>.log)\n"
                                 f"{tmp_path / 'missing'}: no such file or directory\n")
    (tmp_path / "submission.json").write_text("{")
    code, out, _ = run_cli(capsys, "verify", tmp_path)
    assert code == 1 and out.startswith(f"{tmp_path / 'submission.json'}: unreadable")


def test_new_refuses_to_overwrite(made, logs, capsys):
    code, _, err = run_cli(capsys, "new", "--name", "Tiny", "--track", TRACK, "--date", "2026-11-22",
                           "--records-dir", made.parent.parent, *logs)
    assert code == 1 and "already exists" in err


# ----------------------------------------------------------------------------------------------------------------------
# verify fails, naming the file, on damaged copies


def test_one_byte_of_code_changed(copy_of):
    folder = copy_of()
    data = bytearray((folder / "train_gpt.py").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "train_gpt.py").write_bytes(bytes(data))
    failures = failures_of(folder)
    assert failures and all("train_gpt.py: differs from the code embedded" in f for f in failures), failures
    assert len(failures) == len(SEEDS)  # once per log


def test_run_outputs_inside_the_folder_are_ignored(copy_of):
    folder = copy_of()  # running the record from inside its folder leaves these behind
    for name in ("kernels/__pycache__/rms_norm.cpython-311.pyc", "logs/seed1.txt", "checkpoints/seed1.pt",
                 "__pycache__/train_gpt.cpython-311.pyc", "logs/stray.py"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    assert failures_of(folder) == []


def test_kernel_missing_or_extra_code(copy_of):
    folder = copy_of()
    (folder / "kernels" / "rms_norm.py").unlink()
    (folder / "helper.py").write_text("x = 1\n")
    failures = "\n".join(failures_of(folder))
    assert "kernels/rms_norm.py: missing: embedded in train_seed1.log" in failures
    assert "helper.py: not embedded in train_seed1.log" in failures


def test_number_in_submission_changed(copy_of):
    folder = copy_of()
    sub = json.loads((folder / "submission.json").read_text())
    sub["seeds"][1]["val_bpb"] += 1e-4
    (folder / "submission.json").write_text(json.dumps(sub, indent=2))
    failures = failures_of(folder)
    assert len(failures) == 1 and "submission.json: seeds[1].val_bpb is" in failures[0], failures


def test_derived_statistic_changed(copy_of):
    folder = copy_of()
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_loss"]["std"] *= 0.5
    (folder / "submission.json").write_text(json.dumps(sub, indent=2))
    assert any("submission.json: val_loss.std" in f for f in failures_of(folder))


def test_log_lost_final_line(copy_of):
    folder = copy_of()
    log = folder / "train_seed2.log"
    lines = log.read_bytes().rstrip(b"\n").split(b"\n")
    assert lines[-1].startswith(b"final ")
    log.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    failures = failures_of(folder)
    assert any("train_seed2.log: incomplete: no `final" in f for f in failures), failures


def test_two_seeds_equal(copy_of):
    folder = copy_of()
    shutil.copyfile(folder / "train_seed1.log", folder / "train_seed2.log")
    failures = "\n".join(failures_of(folder))
    assert "seed 1 used twice (train_seed1.log, train_seed2.log)" in failures
    assert "train_seed2.log: the log's seed is 1, not the 2 of its name" in failures


def test_nan_loss_and_error_line(copy_of):
    folder = copy_of()
    log = folder / "train_seed3.log"
    text = log.read_bytes()
    text = re.sub(rb"(step:3/\d+ train_loss:)[0-9.]+", rb"\1nan", text, count=1)
    log.write_bytes(text)
    failures = "\n".join(failures_of(folder))
    assert "train_seed3.log: train_loss is nan at step 3" in failures
    text = text.replace(b"\nfinal ", b"\nerror: something broke\nfinal ")
    log.write_bytes(text)
    failures = "\n".join(failures_of(folder))
    assert "train_seed3.log: run failed: error: something broke" in failures


def test_corrupted_embedded_code_in_log(copy_of):
    folder = copy_of()
    log = folder / "train_seed1.log"
    data = bytearray(log.read_bytes())
    data[data.index(b"def ") + 1] ^= 0x20  # inside train_gpt.py's embedded text: no longer matches its sha256
    log.write_bytes(bytes(data))
    failures = "\n".join(failures_of(folder))
    assert "train_seed1.log: embedded train_gpt.py does not match its sha256" in failures


def test_logs_embed_exactly_their_payload(copy_of):
    """A file embedded in every log and present in the folder, but not in the embedded train_gpt.py's PAYLOAD, is
    reported per log: a record's code is the payload, nothing more."""
    folder = copy_of()
    extra = b"x = 1\n"
    for log in sorted(folder.glob("train_seed*.log")):
        log.write_bytes(set_embedded(log.read_bytes(), "extra.py", extra))
    (folder / "extra.py").write_bytes(extra)
    failures = [f for f in failures_of(folder) if "submission.json: code." not in f]  # its code sizes: another check
    assert failures == [f"{folder}/train_seed{s}.log: extra.py: embedded but not in train_gpt.py's payload"
                        for s in SEEDS]


@pytest.mark.parametrize("embedded, hparams, expected", [
    (["train_gpt.py", "a.py"], {"gist_tokens": "0"}, []),
    (["train_gpt.py"], {"gist_tokens": "0"}, ["a.py: in train_gpt.py's payload but not embedded"]),
    (["train_gpt.py", "a.py", "gist.py"], {"gist_tokens": "0"}, ["gist.py: embedded but not in train_gpt.py's payload"]),
    (["train_gpt.py", "a.py"], {"gist_tokens": "4"}, ["gist.py: in train_gpt.py's payload but not embedded"]),
    (["train_gpt.py", "a.py", "gist.py"], {"gist_tokens": "4"}, []),
])
def test_payload_problems(embedded, hparams, expected):
    source = b'PAYLOAD = ("train_gpt.py", "a.py")\nEXPERIMENT_PAYLOAD = {"gist.py": "gist_tokens"}\n'
    code = {name: source if name == "train_gpt.py" else b"" for name in embedded}
    lg = run_log.TrainLog(path=Path("train_seed1.log"), code=code, hparams=hparams)
    assert record_check.payload_problems(lg) == expected
    older = run_log.TrainLog(path=Path("x.log"), code={"train_gpt.py": b"def main(): pass\n"})
    assert record_check.payload_problems(older) == []  # a train_gpt.py from before the explicit list


def test_wrong_track_folder_and_date(copy_of):
    folder = copy_of()
    sub = json.loads((folder / "submission.json").read_text())
    sub["track"], sub["date"] = "8xh100_10min", "2026-11-23"
    (folder / "submission.json").write_text(json.dumps(sub))
    failures = "\n".join(failures_of(folder))
    assert "track '8xh100_10min' but the folder is under cpu_5min/" in failures
    assert "does not match the folder name" in failures
    assert "needs H100 GPUs" in failures  # the logs were written on a CPU


# ----------------------------------------------------------------------------------------------------------------------
# `new` refuses inconsistent logs


def test_new_refuses_bad_log_sets(logs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "new", "--name", "X", "--track", TRACK, "--records-dir", tmp_path, logs[0], logs[0])
    assert code == 1 and "seed 1 used twice" in err
    other = tmp_path / "other.txt"
    data = logs[1].read_bytes()
    other.write_bytes(set_embedded(data, "train_gpt.py", run_log.parse_log(logs[1]).code["train_gpt.py"] + b"# x\n"))
    code, _, err = run_cli(capsys, "new", "--name", "X", "--track", TRACK, "--records-dir", tmp_path, logs[0], other)
    assert code == 1 and f"{other}: embeds different code than" in err and "train_gpt.py" in err
    other.write_bytes(re.sub(rb"\nhparam matrix_lr=[^\n]*", b"\nhparam matrix_lr=0.05", data))
    code, _, err = run_cli(capsys, "new", "--name", "X", "--track", TRACK, "--records-dir", tmp_path, logs[0], other)
    assert code == 1 and "hparam matrix_lr=0.05 but" in err
    code, _, err = run_cli(capsys, "new", "--name", "X", "--track", "gpu", "--records-dir", tmp_path, logs[0])
    assert code == 1 and "not a known track" in err
    assert not (tmp_path / TRACK / "X").exists() and not list(tmp_path.rglob("submission.json"))


# ----------------------------------------------------------------------------------------------------------------------
# Tracks and budgets


def test_tracks():
    assert record_check.get_track("8xh100_10min").budget_seconds == 600
    assert record_check.get_track("cpu_5min").budget_seconds == 300 and record_check.get_track("cpu_5min").gpus == 0
    unknown = record_check.get_track("4xa100_20min")
    assert (unknown.budget_seconds, unknown.gpus, unknown.gpu_model, unknown.known) == (1200, 4, "A100", False)
    for bad in ("gpu", "8xh100", "8xh100_0min", "cpu-5min"):
        with pytest.raises(record_check.RecordError):
            record_check.get_track(bad)


def test_budget_and_hardware(logs):
    lg = run_log.parse_log(logs[0])
    cpu = record_check.get_track("cpu_5min")
    assert record_check.track_problems(lg, cpu) == []
    steps = lg.final["steps"]
    lg.final["train_time"] = 300_000 + 0.5 * 300_000 / steps  # stopped by its own 300 s cap: one step of overrun is ok
    assert record_check.track_problems(lg, cpu) == []
    lg.final["train_time"] = 400_000
    assert "exceeds the cpu_5min budget of 300s" in record_check.track_problems(lg, cpu)[0]
    lg.final["train_time"] = 300_001
    lg.hparams["max_wallclock_seconds"] = "0.0"  # no cap: no allowance
    assert "exceeds" in record_check.track_problems(lg, cpu)[0]
    lg.final["train_time"] = 1000
    lg.gpus, lg.run["world_size"] = "8 x NVIDIA H100 80GB HBM3", 8
    assert record_check.track_problems(lg, record_check.get_track("8xh100_10min")) == []
    assert "CPU track" in record_check.track_problems(lg, cpu)[0]
    assert "world_size 8 exceeds" in record_check.track_problems(lg, record_check.get_track("1xh100_10min"))[0]


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: Student-t tail, Welch t-test, significance against the previous record


@pytest.mark.parametrize("seed", range(6))
def test_welch_agrees_with_scipy(seed):
    """Our one-sided Welch test is scipy's two-sample Welch t-test, shifted by the margin and one-sided."""
    rng = random.Random(seed)
    new = [rng.gauss(3.0, 0.01) for _ in range(rng.randint(2, 6))]
    prev = [rng.gauss(3.01, 0.02) for _ in range(rng.randint(2, 6))]
    margin = 0.005
    ours = record_check.welch_test(new, prev, margin)
    theirs = scipy.stats.ttest_ind([p - margin for p in prev], new, equal_var=False, alternative="greater")
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)


def test_welch_hand_computed():
    new = [3.00, 3.01, 3.02]  # mean 3.01, variance 1e-4
    prev = [3.05, 3.07, 3.09]  # mean 3.07, variance 4e-4
    result = record_check.welch_test(new, prev, margin=0.005)
    # t = (3.07 - 0.005 - 3.01) / sqrt(1e-4/3 + 4e-4/3); dof = (5e-4/3)^2 / ((1e-4/3)^2/2 + (4e-4/3)^2/2) = 50/17
    assert result.t == pytest.approx(0.055 / math.sqrt(5e-4 / 3), rel=1e-9)
    assert result.dof == pytest.approx(50 / 17, rel=1e-9)
    assert result.p == pytest.approx(scipy.stats.t.sf(result.t, result.dof), rel=1e-12)
    assert 0.01 < result.p < 0.02
    # equal samples: t = margin / se, p > 0.5 is impossible only when the margin is 0
    same = record_check.welch_test(new, new, margin=0.0)
    assert same.t == 0 and same.p == pytest.approx(0.5)
    # one value per sample and no spread: the sign decides
    assert record_check.welch_test([1.0], [2.0], 0.005).p == 0.0
    assert record_check.welch_test([2.0], [2.0], 0.005).p == 1.0
    # a previous record of a single seed contributes no variance and no degrees of freedom
    single = record_check.welch_test(new, [3.07], 0.005)
    assert single.dof == pytest.approx(2) and single.t == pytest.approx(0.055 / math.sqrt(1e-4 / 3))


def test_significance_against_previous_record(logs, tmp_path, capsys):
    records_dir = tmp_path / "records"
    prev = new_record(capsys, records_dir, logs, "Prev", "2026-11-01")
    # the same runs again cannot beat themselves by a margin: refused as a record, accepted as a non-record
    code, out, err = run_cli(capsys, "new", "--name", "Same", "--track", TRACK, "--date", "2026-11-22",
                             "--records-dir", records_dir, *logs)
    assert code == 1 and "submission.json: not significant: p=" in err and ">= 0.01" in err
    assert not (records_dir / TRACK / "2026-11-22_Same").exists()
    same = new_record(capsys, records_dir, logs, "Same", "2026-11-22", "--no-record")
    code, out, _ = run_cli(capsys, "verify", same)
    assert code == 0 and "not significant" in out and "not claimed as a record" in out
    # claiming the record by editing the flag fails verify
    sub = json.loads((same / "submission.json").read_text())
    sub["record"] = True
    (same / "submission.json").write_text(json.dumps(sub))
    code, out, _ = run_cli(capsys, "verify", same)
    assert code == 1 and out.startswith(f"{same / 'submission.json'}: not significant: p=")
    # against a much worse previous record the same runs are significant
    psub = json.loads((prev / "submission.json").read_text())
    for s in psub["seeds"]:
        s["val_loss"] += 1.0
    (prev / "submission.json").write_text(json.dumps(psub))
    code, out, _ = run_cli(capsys, "verify", same)
    assert code == 0 and "significant at alpha=0.01" in out
    # only earlier records count: the previous record itself has nothing before it
    assert record_check.significance(psub, prev, 0.005, 0.01) == (
        "first record of its track on this data: no previous record to test against", None)


def other_data(folder: Path) -> None:
    """Make a record's logs say they were scored on other validation data (one token more)."""
    for log in folder.glob("train_seed*.log"):
        raw = log.read_bytes()
        head, sep, tail = raw.rpartition(b"\n#### end ")
        tail = re.sub(rb"(?m)^(val_data: documents:\d+ tokens:)(\d+)", lambda m: m.group(1) + str(int(m.group(2)) + 1)
                      .encode(), tail)
        log.write_bytes(head + sep + tail)


def test_only_records_on_the_same_data_compare(logs, tmp_path, capsys):
    """A much worse earlier record counts only while its logs name the same validation data; `--against` picks the
    record to test against (same date allowed), and refuses one on other data, a later one, or a missing one."""
    records_dir = tmp_path / "records"
    prev = new_record(capsys, records_dir, logs, "Prev", "2026-11-01")
    psub = json.loads((prev / "submission.json").read_text())
    for s in psub["seeds"]:
        s["val_loss"] += 1.0
    (prev / "submission.json").write_text(json.dumps(psub))
    same = new_record(capsys, records_dir, logs, "Same", "2026-11-22", "--no-record")
    code, out, _ = run_cli(capsys, "verify", same)
    assert code == 0 and "vs 2026-11-01_Prev" in out and "significant at alpha=0.01" in out
    other_data(prev)
    code, out, _ = run_cli(capsys, "verify", same)
    assert code == 0 and "first record of its track on this data" in out and "Prev" not in out
    # --against: named explicitly, same date allowed
    base = new_record(capsys, records_dir, logs, "Base", "2026-11-22")
    bsub = json.loads((base / "submission.json").read_text())
    for s in bsub["seeds"]:
        s["val_loss"] += 1.0
    (base / "submission.json").write_text(json.dumps(bsub))
    better = new_record(capsys, records_dir, logs, "Better", "2026-11-22", "--against", "2026-11-22_Base")
    assert json.loads((better / "submission.json").read_text())["compared_with"] == "2026-11-22_Base"
    code, out, _ = run_cli(capsys, "verify", better)
    assert code == 0 and "vs 2026-11-22_Base" in out and "significant at alpha=0.01" in out
    for against, why in [("2026-11-01_Prev", "scored on other data"), ("2026-12-01_Nope", "no such record")]:
        code, _, err = run_cli(capsys, "new", "--name", "X", "--track", TRACK, "--date", "2026-11-22", "--records-dir",
                               records_dir, "--against", against, *logs)
        assert code == 1 and f"compared_with {against!r}: {why}" in err
    later = new_record(capsys, records_dir, logs, "Later", "2026-11-30", "--no-record")
    code, _, err = run_cli(capsys, "new", "--name", "Y", "--track", TRACK, "--date", "2026-11-22", "--records-dir",
                           records_dir, "--against", later.name, *logs)
    assert code == 1 and "after this record" in err


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation results JSON


def eval_results(code_sha256: str, tokenizer_sha256: str) -> dict:
    docs = [{"id": 0, "tokens": 100, "bytes": 260, "nats": 321.5}, {"id": 5, "tokens": 40, "bytes": 97, "nats": 130.25}]
    nats, tokens, nbytes = 451.75, 140, 357
    return {"config": {"mode": "ttt", "window": 128, "stride": 64, "chunk": 32, "lora_rank": 4, "lora_lr": 0.01,
                       "checkpoint": "checkpoints/tiny_seed1.pt", "checkpoint_sha256": "0" * 64,
                       "code_sha256": code_sha256, "tokenizer_sha256": tokenizer_sha256, "world_size": 1,
                       "device": "cpu"},
            "bpb": nats / math.log(2) / nbytes, "loss": nats / tokens, "tokens": tokens, "bytes": nbytes,
            "seconds": 1.5, "tokens_per_s": tokens / 1.5, "docs": docs}


def test_eval_results(logs, tmp_path, capsys):
    parsed = run_log.parse_log(logs[0])
    eval_code = parsed.code.get("eval_ttt.py")
    results_path = FIXTURES / "eval_seed1.json"  # real: eval_ttt.py's TTT on the checkpoint of tiny_seed1
    if eval_code is None or logs[0].parent != FIXTURES or not results_path.is_file():
        # logs written without eval_ttt.py: embed a stand-in, as train_gpt.py would, and write results of its shape
        eval_code = b'"""eval_ttt.py stand-in for the record tests."""\n'
        patched = []
        for p in logs:
            patched.append(tmp_path / p.name)
            patched[-1].write_bytes(set_embedded(p.read_bytes(), "eval_ttt.py", eval_code))
        logs = patched
        results_path = tmp_path / "results.json"
        results_path.write_text(json.dumps(eval_results(hashlib.sha256(eval_code).hexdigest(),
                                                        parsed.tokenizer_sha256)))
    results = json.loads(results_path.read_text())
    assert record_check.eval_problems(results) == []
    folder = new_record(capsys, tmp_path / "records", logs, "Ttt", "2026-11-22", "--eval", results_path)
    assert (folder / "eval_ttt.py").read_bytes() == eval_code
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["eval_results"]["bpb"] == results["bpb"] and sub["eval_results"]["lora_rank"] == 4
    assert sub["eval_results"]["checkpoint_seed"] == 1  # its checkpoint is tiny_seed1.pt
    assert "ttt" in (folder / "README.md").read_text()
    assert failures_of(folder) == []

    # a wrong bpb in the results JSON: named, and submission.json no longer agrees with it
    bad = dict(results, bpb=results["bpb"] * (1 + 1e-6))
    (folder / record_check.EVAL_FILE).write_text(json.dumps(bad))
    failures = "\n".join(failures_of(folder))
    assert f"{record_check.EVAL_FILE}: bpb" in failures and "recomputed from `docs`" in failures
    assert "submission.json: eval_results.bpb" in failures
    # totals
    nbytes = results["bytes"]
    expected = [f"bytes {nbytes - 1} != sum of docs' bytes {nbytes}"]
    assert record_check.eval_problems(dict(results, bytes=nbytes - 1)) == expected
    assert "loss" in record_check.eval_problems(dict(results, loss=results["loss"] * 1.01))[0]
    synthetic = eval_results("0" * 64, "0" * 64)
    assert record_check.eval_problems(synthetic) == []
    assert record_check.eval_problems(dict(synthetic, tokens=141)) == ["tokens 141 != sum of docs' tokens 140"]

    # results of other code are refused by `new`
    other = tmp_path / "other.json"
    other.write_text(json.dumps(eval_results("f" * 64, parsed.tokenizer_sha256)))
    code, _, err = run_cli(capsys, "new", "--name", "Other", "--track", TRACK, "--records-dir", tmp_path / "records",
                           "--eval", other, *logs)
    assert code == 1 and "code_sha256" in err and "is not the sha256 of the record's eval_ttt.py" in err


# ----------------------------------------------------------------------------------------------------------------------
# Leaderboard


def test_leaderboard(made, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{leaderboard.START_MARKER}\n| stale | table |\n{leaderboard.END_MARKER}\n\nrest\n")
    args = ["--readme", readme, "--records-dir", made.parent.parent]
    code, out, _ = run_cli(capsys, "leaderboard", "--check", *args)
    assert code == 1 and out.count("\n") == 1 and "out of date" in out
    code, _, _ = run_cli(capsys, "leaderboard", *args)
    assert code == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{leaderboard.END_MARKER}\n\nrest\n")
    sub = json.loads((made / "submission.json").read_text())
    link = os.path.relpath(made, tmp_path)
    row = (f"| 1 | {sub['val_bpb']['mean']:.4f} ± {sub['val_bpb']['std']:.4f} | 3 | 2026-11-22 | Tiny | tests | "
           f"strided (w128/s64) | [{made.name}]({link}) |")
    assert row in text and "### `cpu_5min` (CPU, 5 min training)" in text
    data = record_check.log_dataset(record_check.parse_log(made / "train_seed1.log"))
    assert f"Scored on peps_sp1024_spread ({data.val_documents} val documents, {data.val_tokens:,} tokens" in text
    code, out, _ = run_cli(capsys, "leaderboard", "--check", *args)
    assert code == 0 and out == ""
    readme.write_text("# no markers\n")
    code, out, _ = run_cli(capsys, "leaderboard", "--check", *args)
    assert code == 1 and "markers" in out and out.count("\n") == 1


def test_repository_leaderboard_is_up_to_date(capsys):
    # the README's tables are generated between the markers: a README that lost them has lost its leaderboard
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert leaderboard.START_MARKER in text and leaderboard.END_MARKER in text, "README.md lost its leaderboard markers"
    code, out, _ = run_cli(capsys, "leaderboard", "--check")
    assert code == 0, out


def test_leaderboard_without_records(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{leaderboard.START_MARKER}\n{leaderboard.END_MARKER}\n")
    assert run_cli(capsys, "leaderboard", "--readme", readme, "--records-dir", tmp_path / "none")[0] == 0
    assert readme.read_text() == f"{leaderboard.START_MARKER}\nNo records yet.\n{leaderboard.END_MARKER}\n"


def test_leaderboard_ranks_by_mean_bpb(made, tmp_path, capsys):
    records_dir = tmp_path / "records"
    shutil.copytree(made, records_dir / TRACK / made.name)
    better = records_dir / TRACK / "2026-11-23_Better"
    shutil.copytree(made, better)
    sub = json.loads((better / "submission.json").read_text())
    sub.update(name="Better", date="2026-11-23")
    sub["val_bpb"]["mean"] -= 0.1
    (better / "submission.json").write_text(json.dumps(sub))
    table = leaderboard.leaderboard_markdown(records_dir, tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "Better" in rows[0] and "Tiny" in rows[1]
    # on other data, a record gets a table of its own and ranks first there
    other_data(better)
    table = leaderboard.leaderboard_markdown(records_dir, tmp_path)
    assert table.count("Scored on peps_sp1024_spread") == 2
    assert [line.split(" | ")[4] for line in table.splitlines() if line.startswith("| 1 ")] == ["Better", "Tiny"]


# ----------------------------------------------------------------------------------------------------------------------
# Curves


@pytest.mark.slow
def test_plot_two_logs(logs, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main([str(logs[0]), str(logs[1]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_difference():
    x, d = plot.difference([0, 10, 20], [3.0, 2.0, 1.5], [5, 15, 25], [2.4, 1.7, 1.0])
    assert list(x) == [5, 15] and list(d) == pytest.approx([2.4 - 2.5, 1.7 - 1.75])


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        for path in generate_logs(FIXTURES, with_eval=True):
            print(f"wrote {path}")
    else:
        print("usage: python tests/test_records.py --regenerate   (rewrites tests/fixtures/record_logs/)")

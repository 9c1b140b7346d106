"""speedrun experiment: a real tiny experiment through run.sh (folder, summary against the logs, statistics against an
independent recomputation, the printed table, plots, README), the baseline cache (reused only for the same code,
configuration, dataset and seed), bad input and failing runs (exit status 2, one line, no folder, the failed run's
tail kept). The cache, bad-input and failure rules run in-process against a fake trainer that writes train_gpt.py-style
logs in a fraction of a second."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
from speedrun.experiments import arms, experiment
from speedrun.analysis.run_log import parse_log

DATE = "2026-01-02"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a run of a few seconds through run.sh (its CPU defaults are overridden by the environment)
TINY_BASE = ("NUM_LAYERS=2", "MODEL_DIM=32", "NUM_HEADS=2", "NUM_KV_HEADS=1", "TRAIN_SEQ_LEN=64",
             "TRAIN_BATCH_TOKENS=512", "TRAIN_MICRO_BATCHES=1", "ITERATIONS=4", "WARMDOWN_ITERS=1",
             "MAX_WALLCLOCK_SECONDS=0", "TRAIN_LOG_EVERY=1", "VAL_MAX_DOCS=1", "EVAL_MODES=flat",
             "EVAL_BATCH_TOKENS=4096", "COMPILE=0")


def run_tool(capsys, *argv) -> tuple[int, str, str]:
    code = experiment.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def clean_hyperparameter_environment(monkeypatch) -> None:
    """No hyperparameter variable inherited from the shell that runs the tests."""
    for name in experiment.HP_NAMES:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------------------------------
# A real tiny experiment through run.sh: 2 seeds, baseline and variant (4 runs of a few seconds each)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sample_data):
    root = tmp_path_factory.mktemp("experiments")
    out, err = io.StringIO(), io.StringIO()
    inherited = {k: v for k, v in os.environ.items() if k not in experiment.HP_NAMES}
    with mock.patch.dict(os.environ, {**inherited, "OMP_NUM_THREADS": "1"}, clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = experiment.main(["--name", "tiny", "--seeds", "2", "--date", DATE, "--experiments-dir", root,
                                "--base", *TINY_BASE, "--", "MATRIX_LR=0.1"])
    return SimpleNamespace(root=root, folder=root / f"{DATE}_tiny", code=code, out=out.getvalue(),
                           err=err.getvalue())


def arm_values(summary: dict, arm: str, key: str) -> list[float]:
    return [r[key] for r in summary["runs"] if r["arm"] == arm]


@pytest.mark.slow
def test_tiny_experiment_writes_the_folder_and_the_logs_numbers(tiny):
    assert tiny.code == 0, tiny.err
    folder = tiny.folder
    for name in ("summary.json", "README.md"):
        assert (folder / name).is_file()
    for name in ("train_loss.png", "train_loss_difference.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (folder / "logs").iterdir()) == [
        "baseline_seed1337.txt", "baseline_seed1338.txt", "variant_seed1337.txt", "variant_seed1338.txt"]
    assert not (folder / "checkpoints").exists() and not (folder / "console").exists()
    assert [p.name for p in tiny.root.iterdir() if p.name.startswith(".") and p.name != ".baseline_cache"] == []

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [1337, 1338] and summary["overrides"] == {"MATRIX_LR": "0.1"}
    assert summary["base_overrides"] == dict(item.split("=", 1) for item in TINY_BASE)
    assert [(r["arm"], r["seed"]) for r in summary["runs"]] == [("baseline", 1337), ("variant", 1337),
                                                                ("baseline", 1338), ("variant", 1338)]
    # every run's figures are its log's, read independently here
    for r in summary["runs"]:
        log = parse_log(folder / r["log"])
        assert not r["cached"]
        assert log.seed == r["seed"] and log.final["val_bpb"] == r["val_bpb"] and log.final["val_loss"] == r["val_loss"]
        assert r["steps"] == log.final["steps"] == 4
        assert r["train_tokens"] == 4 * 512 and r["train_time_ms"] == log.final["train_time"]
        assert r["steps_per_s"] == pytest.approx(4 / (log.final["train_time"] / 1000))
        assert r["tokens_per_s"] == pytest.approx(2048 / (log.final["train_time"] / 1000))
        assert log.env_overrides["NUM_LAYERS"] == "2" and log.env_overrides["SEED"] == str(r["seed"])
        assert ("MATRIX_LR" in log.env_overrides) == (r["arm"] == "variant")
        assert log.hparams["matrix_lr"] == ("0.1" if r["arm"] == "variant" else "0.04")
    # the statistics, recomputed independently (statistics, scipy)
    for arm in ("baseline", "variant"):
        a = summary["arms"][arm]
        assert a["n"] == 2
        for key in ("val_bpb", "val_loss"):
            values = arm_values(summary, arm, key)
            assert a[f"{key}_mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert a[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    diff = summary["difference"]
    for key in ("val_bpb", "val_loss"):
        assert diff[key] == pytest.approx(statistics.mean(arm_values(summary, "variant", key))
                                          - statistics.mean(arm_values(summary, "baseline", key)), rel=1e-9)
    welch = scipy.stats.ttest_ind(arm_values(summary, "variant", "val_loss"),
                                  arm_values(summary, "baseline", "val_loss"), equal_var=False, alternative="less")
    assert diff["p_variant_lower"] == pytest.approx(welch.pvalue, rel=1e-9)
    # the printed table carries those numbers
    arms = summary["arms"]
    for arm in ("baseline", "variant"):
        a = arms[arm]
        row = next(line for line in tiny.out.splitlines() if line.startswith(arm))
        assert f"{a['val_bpb_mean']:.6f} ± {a['val_bpb_std']:.6f}" in row and f"{a['val_loss_mean']:.6f}" in row
        assert f"{a['steps_per_s_mean']:.3f}" in row and f"{a['tokens_per_s_mean']:.0f}" in row
    assert f"val_loss {diff['val_loss']:+.6f} nats" in tiny.out and f"val_bpb {diff['val_bpb']:+.6f}" in tiny.out
    assert f"(variant val_loss lower): {diff['p_variant_lower']:.4g}" in tiny.out
    # the README: the plots, the table and the command
    readme = (folder / "README.md").read_text()
    assert "](train_loss.png)" in readme and "](train_loss_difference.png)" in readme
    base = arms["baseline"]
    assert f"| baseline | 2 | {base['val_bpb_mean']:.6f} ± {base['val_bpb_std']:.6f} |" in readme
    assert summary["command"] in readme and summary["command"].startswith("speedrun experiment --name tiny "
                                                                          "--seed-list 1337,1338 --base NUM_LAYERS=2")
    assert summary["command"].endswith(" -- MATRIX_LR=0.1")
    # the fingerprints
    manifest = ROOT / experiment.SAMPLE_DIR / "manifest.json"
    assert summary["dataset"] == {"path": experiment.SAMPLE_DIR, "source": "manifest.json",
                                  "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    for name in ("train_gpt.py", "run.sh"):
        assert summary["code_files"][name] == hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
    # both baselines are in the cache, byte for byte
    cached = sorted((tiny.root / ".baseline_cache").glob("*/train.log"))
    assert len(cached) == 2
    assert sorted(p.read_bytes() for p in cached) == sorted((folder / "logs" / f"baseline_seed{s}.txt").read_bytes()
                                                            for s in (1337, 1338))


@pytest.mark.slow
def test_real_second_experiment_reuses_the_cached_baseline(tiny, capsys, monkeypatch):
    assert tiny.code == 0, tiny.err
    clean_hyperparameter_environment(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = run_tool(capsys, "--name", "tiny_again", "--seed-list", "1337", "--date", DATE,
                              "--experiments-dir", tiny.root, "--base", *TINY_BASE, "--", "MATRIX_LR=0.02")
    assert code == 0, err
    folder = tiny.root / f"{DATE}_tiny_again"
    summary = json.loads((folder / "summary.json").read_text())
    assert [(r["arm"], r["cached"]) for r in summary["runs"]] == [("baseline", True), ("variant", False)]
    assert "baseline_seed1337: cached" in err and "baseline_seed1337: running" not in err
    # not a rerun: a fresh run's log would differ in its timings
    assert ((folder / "logs" / "baseline_seed1337.txt").read_bytes()
            == (tiny.folder / "logs" / "baseline_seed1337.txt").read_bytes())
    assert "(1 baseline runs cached)" in out
    assert summary["arms"]["baseline"]["val_bpb_std"] is None and summary["difference"]["p_variant_lower"] is None
    assert "n/a (needs 2 seeds per arm)" in out


@pytest.mark.slow
def test_real_failing_run_from_the_command_line(tmp_path, sample_data):
    """A DATA_PATH that does not exist: train_gpt.py stops, the tool reports it and leaves no folder."""
    root = tmp_path / "experiments"
    env = {k: v for k, v in os.environ.items() if k not in experiment.HP_NAMES}
    proc = subprocess.run([sys.executable, "-m", "speedrun", "experiment", "--name", "broken", "--seeds", "2",
                           "--date", DATE, "--experiments-dir", str(root), "--base", *TINY_BASE,
                           f"DATA_PATH={tmp_path / 'nowhere'}", "--", "MATRIX_LR=0.1"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: baseline run, seed 1337: exit status 2")
    assert proc.stdout == ""
    failed = root / f"{DATE}_broken.failed.log"
    assert sorted(p.name for p in root.iterdir()) == [failed.name]  # no folder, no temporary folder, nothing cached
    text = failed.read_text()
    assert text.startswith("# experiment broken: the baseline run, seed 1337, failed: exit status 2")
    trainer_error = next(line for line in text.splitlines() if line.startswith("error:"))
    assert "nowhere" in trainer_error and f"  | {trainer_error}" in proc.stderr.splitlines()


# ----------------------------------------------------------------------------------------------------------------------
# A fake trainer: train_gpt.py's log lines (and its embedded code) in a fraction of a second, a val_loss that depends
# on the seed and MATRIX_LR, a timestamp that makes every fresh log unique, and the failures of a real run

FAKE_TRAIN = textwrap.dedent(r'''
    import hashlib, json, math, os, sys, time
    from pathlib import Path

    env, root = os.environ, Path(sys.argv[1])
    with open(env["FAKE_CALLS"], "a") as f:
        f.write(f"{env['RUN_ID']} {env.get('OMP_NUM_THREADS', '-')}\n")
    if env.get("FAKE_SLOW_BASELINE"):  # the baseline hangs; the variant goes on once the baseline is up
        if env["RUN_ID"].startswith("baseline"):
            Path(env["FAKE_SLOW_BASELINE"]).write_text(str(os.getpid()))
            time.sleep(120)
        for _ in range(200):
            if Path(env["FAKE_SLOW_BASELINE"]).exists():
                break
            time.sleep(0.05)
    Path(env["LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    log = open(Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt", "wb")
    code = (root / "train_gpt.py").read_bytes()
    log.write(b"#### file train_gpt.py bytes=%d sha256=%s\n" % (len(code), hashlib.sha256(code).hexdigest().encode()))
    log.write(code + b"\n#### end train_gpt.py\n")

    def line(text):
        print(text, flush=True)
        log.write(text.encode() + b"\n")
        log.flush()

    line(f"gpus: none (fake trainer, started {time.time_ns()})")
    line("env_overrides: " + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.isupper() and "FAKE" not in k
                                      and k in ("SEED", "RUN_ID", "DATA_PATH", "MATRIX_LR", "ITERATIONS")))
    batch, iters = int(env.get("TRAIN_BATCH_TOKENS", "512")), int(env.get("ITERATIONS", "4"))
    for name in ("seed", "run_id", "data_path"):
        line(f"hparam {name}={env.get(name.upper(), '')}")
    line(f"hparam train_batch_tokens={batch}")
    if not os.path.isdir(env.get("DATA_PATH", "")):
        line(f"error: {env.get('DATA_PATH')}/fineweb_train_*.bin: no shard files match")
        sys.exit(2)
    manifest = Path(env["DATA_PATH"]) / "manifest.json"
    if env.get("FAKE_REPREPARE"):  # as run.sh does when prepare_corpus.py's output changed: a new dataset
        manifest.write_text(env["FAKE_REPREPARE"])
    line("tokenizer: fake.model sha256:" + "ab" * 32 + " pieces:1024")
    line(f"train_data: shards:1 documents:{json.loads(manifest.read_text())['train_docs']} tokens:1000")
    seed, lr = int(env["SEED"]), float(env.get("MATRIX_LR", "0.04"))
    for step in range(1, iters + 1):
        loss = 7 - 0.3 * step - lr * step + 0.01 * (seed % 3)
        line(f"step:{step}/{iters} train_loss:{loss:.4f} train_time:{10 * step}ms step_avg:10.00ms tokens_per_s:"
             f"{batch * 100}")
    if env.get("ATTN_BACKEND") == "fa3":  # (a real run stops before training; a late failure has a longer output)
        print("error: ATTN_BACKEND='fa3': not available on cpu (CUDA-only)", file=sys.stderr)
        sys.exit(2)
    val_loss = 6 - lr + 0.01 * (seed % 7) + 0.001 * iters
    val_bpb = val_loss / math.log(2) * 0.62
    line(f"final_eval mode:flat window:64 stride:64 val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} docs:1 tokens:9 "
         "bytes:20 eval_time:1ms")
    line(f"final val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} mode:flat steps:{iters} train_time:{10 * iters}ms")
''')


REAL_PLOT = experiment.plot


def placeholder_plot(exp, out_dir, summary):
    """Plotting costs about a second per experiment on these cores: the fake experiments draw nothing but the one
    that checks the plots (the real experiment and test_fake_experiment_numbers draw)."""
    for name in experiment.PLOTS.values():
        (out_dir / name).write_bytes(PNG_MAGIC)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    clean_hyperparameter_environment(monkeypatch)
    monkeypatch.setattr(experiment, "plot", placeholder_plot)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"train_docs": 641}\n')
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    root = tmp_path / "experiments"
    runner = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(ROOT))}"

    def args(name, seeds="1,2", base=(), overrides=("MATRIX_LR=0.1",), more=()):
        return ["--name", name, "--seed-list", seeds, "--date", DATE, "--experiments-dir", root, "--runner", runner,
                *more, "--base", f"DATA_PATH={data}", *base, "--", *overrides]

    def ran() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    def summary(name):
        return json.loads((root / f"{DATE}_{name}" / "summary.json").read_text())

    return SimpleNamespace(root=root, data=data, calls=calls, args=args, ran=ran, summary=summary, tmp=tmp_path)


def test_fake_experiment_numbers(fake, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "plot", REAL_PLOT)
    code, out, err = run_tool(capsys, *fake.args("lr", seeds="1,2,3"))
    assert code == 0, err
    for name in experiment.PLOTS.values():
        png = (fake.root / f"{DATE}_lr" / name).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000
    summary = fake.summary("lr")
    order = [f"{arm}_seed{s}" for s in (1, 2, 3) for arm in ("baseline", "variant")]
    assert [r.split()[0] for r in fake.ran()] == order
    base = arm_values(summary, "baseline", "val_loss")
    assert base == [pytest.approx(6 - 0.04 + 0.01 * s + 0.004) for s in (1, 2, 3)]
    assert summary["difference"]["val_loss"] == pytest.approx(-0.06)
    welch = scipy.stats.ttest_ind(arm_values(summary, "variant", "val_loss"), base, equal_var=False,
                                  alternative="less")
    assert summary["difference"]["p_variant_lower"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert summary["speeds_are_solo"] is True and "not solo figures" not in out


# "nothing" and "seed" in the fast loop (./test.sh -m "not slow"); every key field in the whole suite
@pytest.mark.parametrize("change", ["nothing", "seed"] + [pytest.param(c, marks=pytest.mark.slow)
                                                        for c in ("base", "environment", "code", "dataset")])
def test_baseline_cache_is_reused_only_for_the_same_code_config_dataset_and_seed(fake, capsys, monkeypatch, change):
    code, _, err = run_tool(capsys, *fake.args("first"))
    assert code == 0, err
    assert not any(r["cached"] for r in fake.summary("first")["runs"])
    fake.calls.unlink()

    seeds, base = "1,2", ()
    if change == "seed":
        seeds = "2,3"
    elif change == "base":
        base = ("ITERATIONS=5",)
    elif change == "environment":  # a hyperparameter set in the shell reaches both arms: another configuration
        monkeypatch.setenv("NUM_LAYERS", "3")
    elif change == "code":
        extra = fake.tmp / "extra_kernel.py"
        extra.write_text("X = 1\n")
        files = experiment.code_files
        monkeypatch.setattr(experiment, "code_files", lambda: files() + [extra])
    elif change == "dataset":
        (fake.data / "manifest.json").write_text('{"train_docs": 641, "format": 3}\n')
    code, out, err = run_tool(capsys, *fake.args("second", seeds=seeds, base=base, overrides=("MATRIX_LR=0.2",)))
    assert code == 0, err

    expected = {"nothing": {1, 2}, "seed": {2}}.get(change, set())
    second = fake.summary("second")
    assert {r["seed"] for r in second["runs"] if r["cached"]} == expected
    assert all(r["arm"] == "baseline" for r in second["runs"] if r["cached"])
    new_seeds = [int(s) for s in seeds.split(",")]
    assert sorted(r.split()[0] for r in fake.ran()) == sorted(
        [f"variant_seed{s}" for s in new_seeds] + [f"baseline_seed{s}" for s in new_seeds if s not in expected])
    first_logs, second_logs = (fake.root / f"{DATE}_{n}" / "logs" for n in ("first", "second"))
    for s in set(new_seeds) & {1, 2}:  # a reused log is the same bytes; a rerun's has its own timestamp
        name = f"baseline_seed{s}.txt"
        assert ((first_logs / name).read_bytes() == (second_logs / name).read_bytes()) == (s in expected)
    assert f"({len(expected)} baseline runs cached)" in out


def test_cached_baseline_on_data_prepared_again_is_run_again(fake, capsys, monkeypatch):
    """run.sh prepares the sample again when prepare_corpus.py changed: the lookup saw the old dataset, the fresh runs
    train on the new one; the cached baseline must not be compared with them."""
    assert run_tool(capsys, *fake.args("first", seeds="1"))[0] == 0
    fake.calls.unlink()
    monkeypatch.setenv("FAKE_REPREPARE", '{"train_docs": 630}\n')
    code, _, err = run_tool(capsys, *fake.args("second", seeds="1"))
    assert code == 0, err
    assert "1 cached baseline runs trained on other data" in err
    assert [r.split()[0] for r in fake.ran()] == ["variant_seed1", "baseline_seed1"]
    runs = fake.summary("second")["runs"]
    assert [r["cached"] for r in runs] == [False, False]
    logs = fake.root / f"{DATE}_second" / "logs"
    assert all("documents:630" in (logs / f"{arm}_seed1.txt").read_text() for arm in ("baseline", "variant"))
    assert len(list((fake.root / ".baseline_cache").glob("*/train.log"))) == 2  # the old data's entry and the new one
    monkeypatch.delenv("FAKE_REPREPARE")
    code, _, err = run_tool(capsys, *fake.args("third", seeds="1"))  # the new data's entry is used from now on
    assert code == 0, err
    assert [r["cached"] for r in fake.summary("third")["runs"]] == [True, False]


def test_no_cache_runs_every_baseline_and_refreshes_the_entry(fake, capsys):
    assert run_tool(capsys, *fake.args("first", seeds="1"))[0] == 0
    entry = next((fake.root / ".baseline_cache").glob("*/train.log"))
    before = entry.read_bytes()
    code, _, err = run_tool(capsys, *fake.args("second", seeds="1", more=("--no-cache",)))
    assert code == 0, err
    assert not fake.summary("second")["runs"][0]["cached"]
    assert entry.read_bytes() != before
    assert entry.read_bytes() == (fake.root / f"{DATE}_second" / "logs" / "baseline_seed1.txt").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"overrides": ("NOT_A_VARIABLE=1",)}, "unknown variable NOT_A_VARIABLE: not a hyperparameter of train_gpt.py"),
    ({"base": ("NUM_LAYER=2",)}, "unknown variable NUM_LAYER: not a hyperparameter of train_gpt.py (a field of "
                                 "Hyperparameters) (did you mean NUM_LAYERS?)"),
    ({"overrides": ("ATTN_BACKEND=nonsense",)}, "the variant's configuration: ATTN_BACKEND='nonsense': must be auto"),
    ({"overrides": ("NUM_LAYERS=-1",)}, "the variant's configuration: NUM_LAYERS=-1: must be a positive integer"),
    ({"base": ("ITERATIONS=many",)}, "the baseline's configuration: ITERATIONS='many': expected int"),
    ({"overrides": ("NUM_LAYERS",)}, "override 'NUM_LAYERS': expected VAR=value"),
    ({"overrides": ("=3",)}, "override '=3': expected VAR=value"),
    ({"overrides": ("MATRIX_LR=0.1", "--lr=3")}, "override '--lr=3': expected VAR=value"),
    ({"overrides": ("SEED=5",)}, "SEED is set by the tool for every run; use --seeds or --seed-list"),
    ({"base": ("LOG_DIR=/tmp",)}, "LOG_DIR is set by the tool for every run"),
    ({"overrides": ("MATRIX_LR=0.1", "MATRIX_LR=0.2")}, "MATRIX_LR is given twice"),
    ({"overrides": ()}, "no idea to compare"),
    ({"seeds": "1,1"}, "expected distinct seeds"),
    ({"seeds": "1,x"}, "expected comma-separated integers"),
    ({"more": ("--jobs", "0")}, "--jobs 0: must be at least 1"),
    ({"more": ("--bogus",)}, "unrecognized arguments: --bogus"),
    ({"name": "a/b"}, "--name 'a/b'"),
])
def test_bad_input_is_one_line_and_writes_nothing(fake, capsys, change, message):
    change = dict(change)
    args = fake.args(change.pop("name", "bad"), **change)
    code, out, err = run_tool(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not fake.root.exists() and fake.ran() == []


def test_existing_folder_is_refused_unless_forced(fake, capsys):
    assert run_tool(capsys, *fake.args("twice", seeds="1"))[0] == 0
    code, out, err = run_tool(capsys, *fake.args("twice", seeds="1", overrides=("MATRIX_LR=0.3",)))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{DATE}_twice exists; choose another --name or give --force" in err
    assert fake.summary("twice")["overrides"] == {"MATRIX_LR": "0.1"}
    code, _, err = run_tool(capsys, *fake.args("twice", seeds="1", overrides=("MATRIX_LR=0.3",), more=("--force",)))
    assert code == 0, err
    assert fake.summary("twice")["overrides"] == {"MATRIX_LR": "0.3"}
    assert sorted(p.name for p in fake.root.iterdir()) == [".baseline_cache", f"{DATE}_twice"]


def test_failing_variant_stops_the_experiment_and_keeps_its_tail(fake, capsys):
    code, out, err = run_tool(capsys, *fake.args("fa3", seeds="1,2", base=("ITERATIONS=40",),
                                                 overrides=("ATTN_BACKEND=fa3",)))
    assert code == 2 and out == ""
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [f"error: variant run, seed 1: exit status 2; no experiment folder written; its last "
                      f"{sum(line.startswith('  | ') for line in lines)} lines of output (kept in {fake.root.as_posix()}/{DATE}_fa3.failed.log):"]
    assert "  | error: ATTN_BACKEND='fa3': not available on cpu (CUDA-only)" in lines
    assert [r.split()[0] for r in fake.ran()] == ["baseline_seed1", "variant_seed1"]  # stopped at the first failure
    failed = fake.root / f"{DATE}_fa3.failed.log"
    text = failed.read_text().splitlines()
    assert text[0] == "# experiment fa3: the variant run, seed 1, failed: exit status 2"
    assert "ATTN_BACKEND=fa3" in text[1] and text[-1] == "error: ATTN_BACKEND='fa3': not available on cpu (CUDA-only)"
    assert text[2] == f"# its last {arms.TAIL_LINES} lines of output:" and len(text) == 3 + arms.TAIL_LINES
    assert [line.split()[0] for line in text[3:-1]] == [f"step:{s}/40" for s in range(12, 41)]
    assert [line[4:] for line in lines if line.startswith("  | ")] == text[3:]
    # no experiment folder and no temporary folder; the baseline that finished is cached
    assert sorted(p.name for p in fake.root.iterdir()) == [".baseline_cache", failed.name]
    assert len(list((fake.root / ".baseline_cache").glob("*/train.log"))) == 1
    # the fixed experiment reuses that baseline and removes the stale tail
    code, _, err = run_tool(capsys, *fake.args("fa3", seeds="1,2", base=("ITERATIONS=40",),
                                               overrides=("ATTN_BACKEND=reference",)))
    assert code == 0, err
    assert [r["cached"] for r in fake.summary("fa3")["runs"]] == [True, False, False, False]
    assert not failed.exists()


def test_run_without_a_final_line_fails(fake, capsys):
    script = fake.tmp / "fake_train.py"
    script.write_text(script.read_text().replace('line(f"final val_loss', 'print(f"final val_loss'))
    code, _, err = run_tool(capsys, *fake.args("nofinal", seeds="1"))
    assert code == 2
    assert "error: baseline run, seed 1: no `final val_loss:... val_bpb:...` line in its log" in err
    assert sorted(p.name for p in fake.root.iterdir()) == [f"{DATE}_nofinal.failed.log"]  # and nothing cached


def test_jobs_share_the_cores_and_flag_the_speeds(fake, capsys):
    code, out, err = run_tool(capsys, *fake.args("parallel", seeds="1,2", more=("--jobs", "2")))
    assert code == 0, err
    cores = len(os.sched_getaffinity(0))
    assert sorted(fake.ran()) == sorted(f"{arm}_seed{s} {max(1, cores // 2)}" for s in (1, 2)
                                        for arm in ("baseline", "variant"))
    summary = fake.summary("parallel")
    assert summary["jobs"] == 2 and summary["speeds_are_solo"] is False and "--jobs 2" in summary["command"]
    assert "not solo figures" in out
    assert "not solo figures" in (fake.root / f"{DATE}_parallel" / "README.md").read_text()
    assert all(math.isfinite(r["val_loss"]) for r in summary["runs"])


def test_a_failure_stops_the_runs_still_going(fake, capsys, monkeypatch):
    pid_file = fake.tmp / "slow.pid"
    monkeypatch.setenv("FAKE_SLOW_BASELINE", str(pid_file))
    started = time.monotonic()
    code, _, err = run_tool(capsys, *fake.args("stopped", seeds="1", overrides=("ATTN_BACKEND=fa3",),
                                               more=("--jobs", "2")))
    assert code == 2 and "error: variant run, seed 1: exit status 2" in err
    assert time.monotonic() - started < 60  # not the baseline's two minutes
    with pytest.raises(ProcessLookupError):  # the baseline the tool started is gone
        os.kill(int(pid_file.read_text()), 0)
    assert sorted(p.name for p in fake.root.iterdir()) == [f"{DATE}_stopped.failed.log"]

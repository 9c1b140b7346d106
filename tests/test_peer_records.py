"""Verifying other leaderboards' records (speedrun.records.peers through `speedrun verify`), the log dialects of
speedrun.analysis.run_log, and our own track_10min_16mb limits.

The folders are built here, in each leaderboard's layout and line formats (parameter-golf's March and April logs,
modded-nanogpt's logs and statistics.md) with numbers of our own; each test plants one fault and asserts the check
that catches it by name and status. Nothing of theirs is copied: the formats are written from the rules the verifier
reads, with invented values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kernels.bundle import bundle_bytes
from speedrun.analysis import run_log, show_log
from speedrun.records import check as record_check
from speedrun.records import leaderboard, new as record_new, verify as record_verify
from speedrun.records import peers as peer_records

REPO = Path(__file__).resolve().parent.parent

RATIO = 0.5922  # val_bpb / val_loss of our invented sp1024 runs (tokens per byte / ln 2)
VAL_TOKENS = 62_021_632
SCRIPT = ('def main():\n'
          '    log0(f"final_int8_zlib_roundtrip_exact val_loss:{q_val_loss:.8f} val_bpb:{q_val_bpb:.8f}")\n'
          '    log0(f"Total submission size int8+zlib: {quant_file_bytes + code_bytes} bytes")\n    seed = 1337\n')


def march_log(seed: int, loss: float, *, bpb: float | None = None, train_ms: float = 600_040, steps: int = 7000,
              total_bytes: int = 15_900_000, eval_ms: float = 90_000, val_tokens: int = VAL_TOKENS) -> str:
    """A parameter-golf log as its March scripts print it: the script first, `key:value` lines, `step:` lines, the
    raw and the compressed sizes, then round trip, sliding window and TTT evaluations (the last one is scored)."""
    bpb = loss * RATIO if bpb is None else bpb
    pre, rt = loss + 0.03, loss + 0.04
    return (SCRIPT + "=" * 100 + "\n"
            "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model\n"
            f"val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin tokens:{val_tokens}\n"
            f"seed:{seed}\n"
            "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.01ms\n"
            f"step:1000/20000 train_loss:2.5000 train_time:{train_ms / steps * 1000:.0f}ms step_avg:"
            f"{train_ms / steps:.2f}ms\n"
            f"step:{steps}/20000 val_loss:{pre:.4f} val_bpb:{pre * RATIO:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / steps:.2f}ms\n"
            f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{steps}/20000\n"
            "Serialized model: 67224983 bytes\nCode size: 60000 bytes\nTotal submission size: 67284983 bytes\n"
            f"Serialized model int6+zstd: {total_bytes - 60000} bytes\n"
            f"Total submission size int6+zstd: {total_bytes} bytes\n"
            f"final_int6_roundtrip val_loss:{rt:.4f} val_bpb:{rt * RATIO:.4f} eval_time:20000ms\n"
            f"final_int6_roundtrip_exact val_loss:{rt:.8f} val_bpb:{rt * RATIO:.8f}\n"
            f"final_int6_sliding_window val_loss:{loss + 0.01:.4f} val_bpb:{(loss + 0.01) * RATIO:.4f} stride:64 "
            "eval_time:80000ms\n"
            f"final_int6_sliding_window_exact val_loss:{loss + 0.01:.8f} val_bpb:{(loss + 0.01) * RATIO:.8f}\n"
            f"legal_ttt val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{eval_ms:.0f}ms\n"
            f"legal_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\n")


def april_log(seed: int, loss: float, *, bpb: float | None = None, train_ms: float = 599_500, steps: int = 4900,
              total_bytes: int = 15_950_000, eval_s: float = 450.0, val_tokens: int = VAL_TOKENS) -> str:
    """A parameter-golf log as its April scripts print it: a `Hyperparameters:` block, `N/M train_loss: X` lines,
    diagnostics before the scored phased-TTT line, and total_eval_time."""
    bpb = loss * RATIO if bpb is None else bpb
    return ("Hyperparameters:\n  max_wallclock_seconds: 600.0\n"
            f"  seed: {seed}\n  tokenizer_path: /data/tokenizers/fineweb_1024_bpe.model\n  vocab_size: 1024\n"
            f"train_shards: 80\nval_tokens: {val_tokens}\nmodel_params:35945671\n"
            f"500/20000 train_loss: 2.9000 train_time: 1.0m tok/s: 6900000\n"
            f"{steps}/20000 train_loss: 2.3000 train_time: {train_ms / 60000:.1f}m tok/s: 6600000\n"
            f"{steps}/20000 val_loss: {loss + 0.05:.4f} val_bpb: {(loss + 0.05) * RATIO:.4f}\n"
            f"stopping_early: wallclock_cap train_time: {train_ms:.0f}ms step: {steps}/20000\n"
            f"diagnostic pre-quantization post-ema val_loss:{loss + 0.01:.8f} val_bpb:{(loss + 0.01) * RATIO:.8f} "
            "eval_time:6700ms\n"
            "Serialized model: 135417533 bytes\nCode size (uncompressed): 157868 bytes\n"
            f"Serialized model quantized+brotli: {total_bytes - 32000} bytes\n"
            f"Total submission size quantized+brotli: {total_bytes} bytes\n"
            f"diagnostic quantized val_loss:{loss + 0.02:.8f} val_bpb:{(loss + 0.02) * RATIO:.8f} eval_time:50000ms\n"
            f"quantized_ttt_phased val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{eval_s * 1000:.0f}ms\n"
            f"total_eval_time:{eval_s:.1f}s\n")


def golf_record(track_dir: Path, name: str, date: str, runs: dict[int, str], claim_field: str = "val_bpb",
                claim: float | None = None, **extra) -> Path:
    """A parameter-golf record folder: README.md, train_gpt.py, train_seed<N>.log per run, submission.json claiming the
    mean of the scored lines (or `claim`)."""
    folder = track_dir / f"{date}_{name}"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"# {name}\n")
    (folder / "train_gpt.py").write_text(SCRIPT)
    read = []
    for seed, text in runs.items():
        (folder / f"train_seed{seed}.log").write_text(text)
        read.append(run_log.read_run(folder / f"train_seed{seed}.log"))
    value = claim if claim is not None else round(sum(r.scored.val_bpb for r in read) / len(read), 8)
    sub = {"author": "tests", "name": name, "date": date, claim_field: value,
           "bytes_total": max(r.artifact_bytes for r in read), **extra}
    (folder / "submission.json").write_text(json.dumps(sub, indent=2))
    return folder


@pytest.fixture
def golf(tmp_path) -> Path:
    """records/track_10min_16mb with a base record (March logs) and a later one (April logs) that beats it by 0.02 nats
    on three seeds each; everything in it checks out."""
    track = tmp_path / "records" / "track_10min_16mb"
    base, later = {1: 2.000, 2: 2.002, 3: 1.998}, {1: 1.980, 2: 1.981, 3: 1.979}
    golf_record(track, "Base", "2026-03-20", {s: march_log(s, loss) for s, loss in base.items()})
    golf_record(track, "Next", "2026-03-25", {s: april_log(s, loss) for s, loss in later.items()})
    return tmp_path / "records"


def verify(capsys, *argv) -> tuple[int, dict[str, dict[str, tuple[str, str]]], str]:
    """(exit status, {record folder name: {check: (status, detail)}}, printed output) of `speedrun verify --json`."""
    out = Path(argv[0]).parent / "verify.json" if Path(argv[0]).exists() else None
    json_args = ["--json", str(out)] if out else []
    code = record_verify.main([*map(str, argv), *json_args])
    printed = capsys.readouterr().out
    rows = {}
    if out and out.exists():
        for rec in json.loads(out.read_text())["records"]:
            rows[Path(rec["path"]).name] = {c["check"]: (c["status"], c["detail"]) for c in rec["checks"]}
        out.unlink()
    return code, rows, printed


CHECKS = ["files", "claim", "seeds", "significance", "artifact_size", "train_time", "eval_time", "val_set", "bpb_ratio"]


def test_clean_tree_is_all_ok(golf, capsys):
    code, rows, printed = verify(capsys, golf)
    assert code == 0, printed
    base, nxt = rows["2026-03-20_Base"], rows["2026-03-25_Next"]
    assert list(nxt) == CHECKS and {c: s for c, (s, _) in nxt.items()} == {c: "ok" for c in CHECKS}
    assert base["significance"][0] == "skip" and "no earlier record" in base["significance"][1]
    assert all(s == "ok" for c, (s, _) in base.items() if c != "significance")
    assert "legal_ttt_exact" in base["claim"][1] and "quantized_ttt_phased" in nxt["claim"][1]  # the scored lines
    assert "p=" in nxt["significance"][1] and "without" in nxt["significance"][1]
    assert "2 records of other leaderboards, 0 with a FAULT" in printed


def test_scored_line_is_the_last_final_evaluation(golf):
    march = run_log.read_run(golf / "track_10min_16mb" / "2026-03-20_Base" / "train_seed1.log")
    assert march.dialect == "parameter-golf" and march.seed == 1 and march.steps == 7000 and march.capped
    assert march.scored.label == "legal_ttt_exact" and march.scored.val_loss == 2.0
    assert march.artifact_bytes == 15_900_000  # the compressed total, not the raw torch.save's
    assert march.eval_time_ms == 90_000  # from `legal_ttt`, the rounded twin printed with the time
    assert march.val_tokens == VAL_TOKENS and march.tokenizer == "fineweb_1024_bpe"
    april = run_log.read_run(golf / "track_10min_16mb" / "2026-03-25_Next" / "train_seed2.log")
    assert april.scored.label == "quantized_ttt_phased" and april.seed == 2 and april.steps == 4900
    assert april.train_time_ms == 599_500 and april.eval_time_ms == 450_000 and april.artifact_bytes == 15_950_000
    assert [f.label for f in april.finals] == ["quantized_ttt_phased"]  # diagnostics and the step line are not finals


def rewrite(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def next_record(golf: Path) -> Path:
    return golf / "track_10min_16mb" / "2026-03-25_Next"


def set_claim(folder: Path, value) -> None:
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] = value
    (folder / "submission.json").write_text(json.dumps(sub))


def test_best_seed_claim(golf, capsys):
    set_claim(next_record(golf), round(1.979 * RATIO, 8))  # seed 3's value, not the mean
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["claim"]
    assert code == 1 and status == "FAULT" and "the best seed's value (train_seed3.log, seed 3" in detail


def test_claim_in_no_log(golf, capsys):
    set_claim(next_record(golf), 1.15)
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["claim"]
    assert code == 1 and status == "FAULT" and "1.15 is in no log's scored line" in detail


def test_claim_of_a_diagnostic_line_says_where_it_is(golf, capsys):
    set_claim(next_record(golf), round(1.990 * RATIO, 8))  # seed 1's `diagnostic pre-quantization` figure
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["claim"]
    assert status == "FAULT" and "train_seed1.log (`diagnostic pre-quantization post-ema`" in detail


def test_claim_within_printed_precision_and_other_field_names(golf, capsys):
    folder = next_record(golf)
    sub = json.loads((folder / "submission.json").read_text())
    mean = sub.pop("val_bpb")
    sub["mean_val_bpb"] = round(mean, 4)  # four decimals, as some records print it
    (folder / "submission.json").write_text(json.dumps(sub))
    code, rows, _ = verify(capsys, golf)
    assert code == 0 and rows["2026-03-25_Next"]["claim"][0] == "ok"
    assert "mean_val_bpb" in rows["2026-03-25_Next"]["claim"][1]


BASE, NEXT = "2026-03-20_Base", "2026-03-25_Next"
ONE_LOG_FAULTS = {  # one log rewritten: (record, log, its new text, check, status, words of the detail)
    "log named for one seed ran another": (NEXT, "train_seed2.log", april_log(7, 1.981), "seeds", "FAULT",
                                           "train_seed2.log is named for seed 2 but ran seed 7"),
    "16,000,001 bytes": (NEXT, "train_seed1.log", april_log(1, 1.980, total_bytes=16_000_001), "artifact_size", "FAULT",
                         "train_seed1.log: 16,000,001 bytes"),
    "JSON claiming fewer bytes than a log": (NEXT, "train_seed1.log", april_log(1, 1.980, total_bytes=15_990_000),
                                             "artifact_size", "info",
                                             "says bytes_total 15,950,000, fewer than train_seed1.log shows"),
    # (the clean runs stop by their cap at 600.04 s, 86 ms a step: one step past the cap is within the limit)
    "601 s of training": (BASE, "train_seed2.log", march_log(2, 2.002, train_ms=601_000), "train_time", "FAULT",
                          "train_seed2.log: train_time 601.0 s"),
    "601 s of evaluation": (NEXT, "train_seed3.log", april_log(3, 1.979, eval_s=601.0), "eval_time", "FAULT",
                            "train_seed3.log: 601.0 s"),
    "another validation set": (NEXT, "train_seed1.log", april_log(1, 1.980, val_tokens=VAL_TOKENS + 1_000_000),
                               "val_set", "FAULT", "train_seed1.log: 63,021,632 tokens"),
}


@pytest.mark.parametrize("fault", ONE_LOG_FAULTS)
def test_one_log_fault(golf, capsys, fault):
    name, log, text, check, status, words = ONE_LOG_FAULTS[fault]
    rewrite(golf / "track_10min_16mb" / name, log, text)
    code, rows, _ = verify(capsys, golf)
    assert rows[name][check][0] == status and words in rows[name][check][1], rows[name][check]
    assert code == (1 if status == "FAULT" else 0)
    others = {c: s for rec, row in rows.items() for c, (s, _) in row.items() if (rec, c) != (name, check)}
    assert set(others.values()) <= {"ok", "skip"}  # nothing else is flagged


def test_duplicate_seed_is_reported_and_one_log_per_seed_may_match(golf, capsys):
    folder = next_record(golf)
    rewrite(folder, "train_seed3_rerun.log", april_log(3, 1.990))  # a second run of seed 3, not in the claim
    code, rows, _ = verify(capsys, golf)
    assert rows["2026-03-25_Next"]["seeds"][0] == "info" and "seed 3 run 2 times" in rows["2026-03-25_Next"]["seeds"][1]
    assert rows["2026-03-25_Next"]["claim"][0] == "ok" and "one log per seed" in rows["2026-03-25_Next"]["claim"][1]


def test_insignificant_improvement(golf, capsys):
    folder = next_record(golf)
    for seed, loss in ((1, 1.997), (2, 1.999), (3, 1.995)):  # 0.003 nats better: less than the 0.005 margin
        rewrite(folder, f"train_seed{seed}.log", april_log(seed, loss))
    set_claim(folder, round(1.997 * RATIO, 8))
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["significance"]
    assert code == 1 and status == "FAULT" and "vs 2026-03-20_Base" in detail
    p_margin, p_plain = (float(p) for p in re.findall(r"p=(\S+?) with", detail))  # with the margin, without it
    assert p_margin >= 0.01 and p_plain < p_margin  # printed with and without the margin
    expected = record_check.welch_test([1.997, 1.999, 1.995], [2.000, 2.002, 1.998], 0.005).p
    assert p_margin == pytest.approx(expected, rel=1e-2)


def test_one_seed_cannot_be_tested(golf, capsys):
    folder = next_record(golf)
    for seed in (2, 3):
        (folder / f"train_seed{seed}.log").unlink()
    set_claim(folder, round(1.980 * RATIO, 8))
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["significance"]
    assert code == 0 and status == "skip" and "the t-test cannot be made" in detail


def test_ratio_off_by_five_percent(golf, capsys):
    folder = next_record(golf)
    for seed, loss in ((1, 1.980), (2, 1.981), (3, 1.979)):  # val_bpb counted over 5% fewer bytes
        rewrite(folder, f"train_seed{seed}.log", april_log(seed, loss, bpb=loss * RATIO * 1.05))
    set_claim(folder, round(1.980 * RATIO * 1.05, 8))
    code, rows, _ = verify(capsys, golf)
    status, detail = rows["2026-03-25_Next"]["bpb_ratio"]
    assert code == 1 and status == "FAULT" and "+5.00%" in detail


def test_unreadable_json(golf, capsys):
    (next_record(golf) / "submission.json").write_text('{"val_bpb": 1.17,')
    code, rows, _ = verify(capsys, golf)
    row = rows["2026-03-25_Next"]
    assert code == 1 and row["files"][0] == "FAULT" and "submission.json unreadable" in row["files"][1]
    assert row["claim"][0] == "FAULT" and list(row) == CHECKS  # every check still reported


def test_submission_named_otherwise_and_logs_in_a_subfolder(golf, capsys):
    folder = next_record(golf)
    (folder / "submission.json").rename(folder / "submission_next.json")
    (folder / "logs").mkdir()
    for seed in (1, 2, 3):
        (folder / f"train_seed{seed}.log").rename(folder / "logs" / f"train{seed}.txt")
    code, rows, _ = verify(capsys, golf)
    row = rows["2026-03-25_Next"]
    assert code == 0 and {s for s, _ in row.values()} == {"ok"} and "submission_next.json" in row["files"][1]


def test_non_record_track_has_no_time_limit_or_significance_rule(golf, capsys):
    track = golf / "track_non_record_16mb"
    golf_record(track, "Long", "2026-03-26", {1: march_log(1, 1.90, train_ms=14_400_000, steps=300_000)})
    code, rows, _ = verify(capsys, golf)
    row = rows["2026-03-26_Long"]
    assert code == 0 and row["train_time"][0] == "info" and row["significance"][0] == "skip"


def test_empty_tree_and_missing_path(tmp_path, capsys):
    (tmp_path / "records" / "track_10min_16mb").mkdir(parents=True)
    code, _, printed = verify(capsys, tmp_path / "records")
    assert code == 2 and "no records under" in printed
    code = record_verify.main([str(tmp_path / "nowhere"), "--rules", "parameter-golf"])
    assert code == 2 and "no such file or directory" in capsys.readouterr().out


def test_folder_that_cannot_be_read_is_a_fault_row(golf, capsys, monkeypatch):
    def broken(path):
        raise OSError(13, "Permission denied")

    folder = next_record(golf)
    monkeypatch.setattr(peer_records, "load", lambda f, rules: broken(f))
    code, rows, printed = verify(capsys, folder)
    assert code == 1 and rows[folder.name]["files"][0] == "FAULT" and "Permission denied" in printed


def test_rules_flag_and_auto_detection(golf, capsys):
    folder = next_record(golf)
    assert peer_records.find_records(golf) == [(golf / "track_10min_16mb" / "2026-03-20_Base", "parameter-golf"),
                                               (folder, "parameter-golf")]
    code, rows, _ = verify(capsys, folder, "--rules", "parameter-golf")
    assert code == 0 and list(rows[folder.name]) == CHECKS
    code, rows, printed = verify(capsys, folder, "--rules", "ours")  # our rules: not a record of ours
    assert code == 1 and "submission.json" in printed


def test_leaderboard_of_their_tree_marks_flagged_rows(golf, capsys):
    set_claim(next_record(golf), round(1.979 * RATIO, 8))
    code = leaderboard.main(["--records-dir", str(golf)])
    table = capsys.readouterr().out
    assert code == 0 and "### track_10min_16mb (parameter-golf)" in table
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "Next" in rows[0] and rows[0].endswith("| claim |") and rows[1].endswith("| – |")


def test_run_log_command_line(golf, capsys):
    assert show_log.main([str(next_record(golf) / "train_seed1.log")]) == 0
    out = capsys.readouterr().out
    assert "parameter-golf log" in out and "seed       1" in out and "quantized_ttt_phased" in out
    assert "<- scored" in out and "15,950,000 bytes" in out
    assert show_log.main([str(next_record(golf) / "missing.log")]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# modded-nanogpt


def modded_log(loss: float, train_ms: float, steps: int = 1400) -> str:
    return ("import os\nprint0(f\"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms\")\n"
            + "=" * 100 + "\n"
            f"step:0/{steps} val_loss:10.8258 train_time:0ms step_avg:0.03ms\n"
            f"step:{steps - 1}/{steps} train_time:{train_ms - 60:.0f}ms step_avg:{train_ms / steps:.2f}ms\n"
            f"step:{steps}/{steps} train_time:{train_ms:.0f}ms step_avg:{train_ms / steps:.2f}ms\n"
            f"step:{steps}/{steps} val_loss:{loss:.4f} train_time:{train_ms:.0f}ms step_avg:{train_ms / steps:.2f}ms\n")


LOSSES = (3.2771, 3.2785, 3.2779, 3.2790, 3.2776, 3.2782)


def modded_record(parent: Path, name: str, losses=LOSSES, stats: str | None = "auto") -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    for i, loss in enumerate(losses):
        (folder / f"{i:08x}-run.txt").write_text(modded_log(loss, 80_000 + 100 * i))
    if stats == "auto":
        mean = sum(losses) / len(losses)
        p = record_check.welch_test(list(losses), [3.28], 0.0).p
        stats = (f"# Run statistics\n\n{len(losses)} runs, step 1400/1400.\n\n|  | mean | std |\n|---|---|---|\n"
                 f"| val_loss | {mean:.5f} | 0.001 |\n\np(val_loss < 3.28) = **{p:.4f}**\n")
    if stats is not None:
        (folder / "statistics.md").write_text(stats)
    return folder


def test_modded_clean_folder(tmp_path, capsys):
    folder = modded_record(tmp_path / "records" / "track_1_short" / "2026-05-01_Faster", "this_pr")
    code, rows, _ = verify(capsys, tmp_path / "records")
    row = rows["this_pr"]
    assert code == 0 and list(row) == ["files", "claim", "seeds", "significance", "train_time"]
    assert [row[c][0] for c in ("files", "claim", "seeds", "significance")] == ["ok"] * 4
    assert row["train_time"][0] == "info" and "80.25 s" in row["train_time"][1]
    assert "runs 6" in row["claim"][1] and str(folder / "statistics.md") in row["claim"][1]


def test_modded_statistics_that_the_logs_do_not_give(tmp_path, capsys):
    folder = modded_record(tmp_path / "r" / "track_1_short" / "2026-05-01_X", "this_pr",
                           stats="7 runs\n\n| val_loss | 3.27500 | 0.001 |\n")
    code, rows, _ = verify(capsys, folder)
    status, detail = rows["this_pr"]["claim"]
    assert code == 1 and status == "FAULT" and "runs 7, the logs give 6" in detail and "3.27500" in detail


def test_modded_mean_not_below_the_target(tmp_path, capsys):
    parent = tmp_path / "r" / "track_1_short" / "2026-05-01_X"
    modded_record(parent, "this_pr", losses=(3.2801, 3.2795, 3.2810, 3.2790), stats=None)
    modded_record(parent, "baseline", losses=(3.2801, 3.2795, 3.2810, 3.2790), stats=None)
    code, rows, _ = verify(capsys, parent)
    assert code == 1 and rows["this_pr"]["significance"][0] == "FAULT"
    assert rows["baseline"]["significance"][0] == "info"  # a comparison run, not the claim
    assert rows["this_pr"]["claim"][0] == "skip"


def test_modded_medium_track_target(tmp_path, capsys):
    folder = modded_record(tmp_path / "r" / "track_2_medium" / "2026-05-01_M", "runs", losses=(2.9180, 2.9170, 2.9175),
                           stats=None)
    code, rows, _ = verify(capsys, folder)
    assert code == 0 and "against 2.92" in rows["runs"]["significance"][1]


def test_modded_log_dialect():
    run = run_log._peer_summary(Path("x.txt"), modded_log(3.2779, 80_000))
    assert run.dialect == "modded-nanogpt" and run.scored.val_loss == 3.2779 and run.scored.val_bpb is None
    assert run.train_time_ms == 80_000 and run.steps == 1400


# ----------------------------------------------------------------------------------------------------------------------
# Our track_10min_16mb: the artifact and round-trip lines, and the limits as named checks


FIXTURES = REPO / "tests" / "fixtures" / "record_logs"


def sized_log(src: Path, dest: Path, total: int = 15_000_000, eval_ms: int = 1000, counted: str = "raw") -> Path:
    """One of our tiny real logs as if run on 8 H100s with an artifact: the gpus line, the `artifact:` line (its code
    counted raw or bundled from the embedded files) and a `final_roundtrip` line whose score the `final` line repeats."""
    data = src.read_bytes()
    embedded = run_log.parse_log(src).code
    code = sum(map(len, embedded.values())) if counted == "raw" else len(bundle_bytes(embedded))
    head, _, tail = data.rpartition(b"#### end ")
    end = tail.index(b"\n") + 1
    lines = tail[end:].decode().split("\n")
    out = []
    for line in lines:
        if line.startswith("gpus: "):
            line = "gpus: 8 x NVIDIA H100 80GB HBM3"
        if line.startswith("final_eval "):
            line = line.replace(line.split("eval_time:")[1], f"{eval_ms}ms")
        if line.startswith("final "):
            f = dict(kv.split(":", 1) for kv in line.split()[1:])
            out.append(f"artifact: codec:int8_zlib model_bytes:{total - code} code_bytes:{code} total_bytes:{total} "
                       f"limit:16000000 code:{counted} files:train_gpt.py,kernels/__init__.py")
            out.append(f"final_roundtrip codec:int8_zlib mode:{f['mode']} val_loss:{f['val_loss']} "
                       f"val_bpb:{f['val_bpb']}")
        out.append(line)
    dest.write_bytes(head + b"#### end " + tail[:end] + "\n".join(out).encode())
    return dest


@pytest.fixture
def sized_logs(tmp_path) -> list[Path]:
    if not all((FIXTURES / f"tiny_seed{s}.txt").is_file() for s in (1, 2, 3)):
        pytest.skip("the tiny real logs are not committed")
    return [sized_log(FIXTURES / f"tiny_seed{s}.txt", tmp_path / f"sized_seed{s}.txt") for s in (1, 2, 3)]


def test_our_artifact_and_roundtrip_lines(sized_logs):
    lg = run_log.parse_log(sized_logs[0])
    assert lg.problems == []
    assert lg.artifact["total_bytes"] == 15_000_000 and lg.artifact["files"] == ["train_gpt.py", "kernels/__init__.py"]
    assert lg.final_roundtrip["val_bpb"] == lg.final["val_bpb"] and lg.final_roundtrip["codec"] == "int8_zlib"
    run = run_log.read_run(sized_logs[0])
    assert run.dialect == "ours" and run.artifact_bytes == 15_000_000 and run.scored.label == "final"
    # a headline that is not the round trip's score is a damaged log
    broken = sized_logs[0].with_name("broken.txt")
    broken.write_bytes(sized_logs[0].read_bytes().replace(b"final_roundtrip codec:int8_zlib mode:strided val_loss:6",
                                                          b"final_roundtrip codec:int8_zlib mode:strided val_loss:5"))
    assert any("final_roundtrip" in p for p in run_log.parse_log(broken).problems)


def test_track_10min_16mb_limits(sized_logs):
    track = record_check.get_track("track_10min_16mb")
    assert (track.budget_seconds, track.eval_seconds, track.artifact_bytes, track.gpus) == (600, 600, 16_000_000, 8)
    lg = run_log.parse_log(sized_logs[0])
    assert record_check.limit_problems(lg, track) == {}
    lg.artifact["total_bytes"] = 16_000_001
    assert "exceeds the track_10min_16mb limit of 16,000,000" in record_check.limit_problems(lg, track)["artifact_size"]
    lg.artifact = None
    assert "no `artifact:" in record_check.limit_problems(lg, track)["artifact_size"]
    lg = run_log.parse_log(sized_logs[0])
    lg.artifact["code_bytes"] -= 1
    lg.artifact["model_bytes"] += 1
    assert "code_bytes" in record_check.limit_problems(lg, track)["artifact_size"]  # the code is counted again here
    for counted in ("bundle", "raw"):
        lg = run_log.parse_log(sized_log(FIXTURES / "tiny_seed1.txt", sized_logs[0].with_name(f"{counted}.txt"),
                                         counted=counted))
        assert lg.artifact["code"] == counted and record_check.limit_problems(lg, track) == {}
        lg.artifact["code"] = {"raw": "bundle", "bundle": "raw"}[counted]  # counted the other way: caught
        assert f"is not the {lg.artifact['code']} count" in record_check.limit_problems(lg, track)["artifact_size"]
    lg = run_log.parse_log(sized_logs[0])
    lg.final["train_time"] = 601_000
    lg.hparams["max_wallclock_seconds"] = "0"
    assert "train_time 601.0s exceeds" in record_check.limit_problems(lg, track)["train_time"]
    lg = run_log.parse_log(sized_log(FIXTURES / "tiny_seed1.txt", sized_logs[0].with_name("slow.txt"),
                                     eval_ms=300_500))
    assert "evaluation took 601.0s" in record_check.limit_problems(lg, track)["eval_time"]
    # cpu_5min has none of these limits: its problems are what they were
    assert record_check.limit_problems(lg, record_check.get_track("cpu_5min")) == {}


@pytest.mark.slow
def test_our_track_10min_16mb_record_as_named_checks(sized_logs, tmp_path, capsys):
    records = tmp_path / "records"
    code = record_new.main(["--name", "Sized", "--track", "track_10min_16mb", "--date", "2026-11-24",
                        "--records-dir", str(records), *map(str, sized_logs)])
    assert code == 0, capsys.readouterr()
    folder = records / "track_10min_16mb" / "2026-11-24_Sized"
    code, rows, _ = verify(capsys, folder)
    assert code == 0 and {c: s for c, (s, _) in rows[folder.name].items()} == {
        "record": "ok", "train_time": "ok", "eval_time": "ok", "artifact_size": "ok"}
    log = folder / "train_seed2.log"
    log.write_bytes(log.read_bytes().replace(b"total_bytes:15000000", b"total_bytes:16000001")
                    .replace(b"model_bytes:14940000", b"model_bytes:15940001"))
    code, rows, printed = verify(capsys, folder)
    assert code == 1 and rows[folder.name]["artifact_size"][0] == "FAULT" and rows[folder.name]["record"][0] == "ok"
    assert "train_seed2.log: artifact total_bytes 16,000,001 exceeds" in printed

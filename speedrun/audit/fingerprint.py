"""The dataset fingerprint a training log prints (tokenizer sha256, validation documents, tokens and bytes, number of
train shards), recomputed from the dataset on this machine and compared with a record's log."""

from __future__ import annotations

import glob
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fingerprint(data_path: str, tokenizer_path: str, vocab_size: int, val_max_docs: int = 0) -> dict:
    """The numbers a train_gpt.py log prints about its data: tokenizer sha256, the `val_data:` line (documents,
    scored tokens, bytes, as data.loader.ValidationSet counts them) and the number of train shards."""
    from data.files import sha256_file
    from data.loader import ValidationSet, build_byte_tables, load_tokenizer, split_pattern

    tables = build_byte_tables(load_tokenizer(tokenizer_path), vocab_size, tokenizer_path)
    val = ValidationSet.load(data_path, vocab_size, tables, val_max_docs)
    return {"tokenizer_sha256": sha256_file(tokenizer_path),
            "val_documents": val.num_docs, "val_tokens": int(val.token_counts.sum()),
            "val_bytes": int(val.byte_counts.sum()),
            "train_shards": len(glob.glob(split_pattern(data_path, "train")))}


def record_fingerprint_problems(hparams: dict, tokenizer_sha256: str, val_data: dict, train_data: dict,
                                base: Path = REPO, cache: dict | None = None) -> tuple[list[str], str | None]:
    """(problems, the dataset folder checked or None when it is not on this machine) for one training log: its
    dataset (DATA_PATH, relative to `base`, where records' runs start) fingerprinted and compared with the log."""
    from data.loader import DataError, split_pattern

    def resolve(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else base / path

    data = resolve(hparams.get("data_path", ""))
    shown = os.path.relpath(data, base) if str(data).startswith(str(base) + os.sep) else str(data)
    if not hparams.get("data_path") or not glob.glob(split_pattern(str(data), "val")):
        return [], None
    tok = resolve(hparams.get("tokenizer_path") or str(Path(hparams["data_path"]) / "tokenizer.model"))
    try:
        vocab = int(hparams.get("vocab_size", "1024"))
        max_docs = int(hparams.get("val_max_docs", "0") or 0)
    except ValueError:
        return ["vocab_size or val_max_docs unreadable in the log"], shown
    key = (str(data), str(tok), vocab, max_docs)
    try:
        if cache is not None and key in cache:
            fp = cache[key]
        else:
            fp = fingerprint(str(data), str(tok), vocab, max_docs)
            if cache is not None:
                cache[key] = fp
    except (DataError, OSError) as e:
        return [f"dataset {shown}: cannot be fingerprinted ({e})"], shown
    problems = []
    if tokenizer_sha256 and fp["tokenizer_sha256"] != tokenizer_sha256:
        problems.append(f"tokenizer sha256 {tokenizer_sha256[:12]}... in the log, {fp['tokenizer_sha256'][:12]}... "
                        f"for {tok}")
    for ours, theirs in (("val_documents", "documents"), ("val_tokens", "tokens"), ("val_bytes", "bytes")):
        if theirs in val_data and val_data[theirs] != fp[ours]:
            problems.append(f"val_data {theirs}:{val_data[theirs]} in the log, {fp[ours]} in {shown}")
    if "shards" in train_data and train_data["shards"] != fp["train_shards"]:
        problems.append(f"train_data shards:{train_data['shards']} in the log, {fp['train_shards']} in {shown}")
    return [f"dataset fingerprint (speedrun.audit): {p}" for p in problems], shown

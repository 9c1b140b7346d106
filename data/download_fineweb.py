"""Download parameter-golf's FineWeb shards and tokenizer (sp1024, or a published variant) from the Hugging Face hub.

    python -m data.download_fineweb [--train-shards 80] [--variant sp1024] [--repo-id REPO] [--remote-root datasets]
                                    [--revision REV] [--out data]

Variants (--variant) and the dataset repositories that publish them (the default --repo-id of each; any other
repository in the same layout can be named, or set in MATCHED_FINEWEB_REPO_ID as parameter-golf's script reads it):
  sp1024, byte260                               willdepueoai/parameter-golf (the challenge's own)
  sp4096, sp8192                                kevclark/parameter-golf
  sp8192_lossless_caps_caseops_v1_reserved      romeerp/parameter-golf-caseops-v1 (CaseOps, data/caseops.py: its
                                                validation shards come with byte sidecars fineweb_val_bytes_*.bin,
                                                fetched when the manifest's dataset entry has val_bytes_glob)
  (alias: sp8192_caseops)

What it fetches (the layout of the dataset repo, as parameter-golf's data/cached_challenge_fineweb.py reads it):
  datasets/manifest.json                                   first; it names the shard counts and the tokenizer
  datasets/datasets/fineweb10B_sp1024/fineweb_val_*.bin    every validation shard (the manifest's files_val)
  datasets/datasets/fineweb10B_sp1024/fineweb_train_*.bin  the first --train-shards training shards (default 80,
                                                           parameter-golf's default: 8B tokens; 1 for a smoke test)
  datasets/tokenizers/fineweb_1024_bpe.model               the tokenizer (the manifest's model_path)

Where it puts them (parameter-golf's local layout, under --out, default this data/ folder):
  OUT/datasets/fineweb10B_sp1024/fineweb_{val,train}_*.bin
  OUT/tokenizers/fineweb_1024_bpe.model
  OUT/datasets/fineweb10B_sp1024/tokenizer.model   a hard link (or copy) of the tokenizer, so that train_gpt.py's
                                                   defaults (DATA_PATH=data/datasets/fineweb10B_sp1024,
                                                   TOKENIZER_PATH=DATA_PATH/tokenizer.model) work as they are
  OUT/datasets/manifest.json                       the dataset repo's manifest

Resumable: a file already present is skipped when it is complete: its size equals the hub's (asked once for all
files), and a shard also passes data/loader.load_shard (the record's own checks: magic, version, size =
header + 2 x count), the tokenizer loads with SentencePiece and the manifest parses. Anything else is downloaded again.
Every file is downloaded into the Hugging Face cache, checked, then linked (or copied) to a temporary name next to its
destination and renamed into place, so an interrupted run never leaves a partial file under a final name. When the hub
cannot be reached and every file is present and passes the local checks, the run succeeds without the network.

Errors: one line on stderr and exit code 2, e.g.
  error: cannot reach the Hugging Face hub (https://huggingface.co): offline mode is enabled (HF_HUB_OFFLINE=1)

All network access goes through `hub_sizes` and `hub_download` below (tests replace them with local fakes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

from data.files import write_atomic
from data.loader import DataError, load_shard

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANT_REPOS = {"sp1024": DEFAULT_REPO_ID, "byte260": DEFAULT_REPO_ID, "sp4096": "kevclark/parameter-golf",
                 "sp8192": "kevclark/parameter-golf", CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1"}
VARIANT_ALIASES = {"sp8192_caseops": CASEOPS_VARIANT}
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
DATA_DIR = os.path.dirname(os.path.abspath(__file__))


class DownloadError(Exception):
    """Reported as `error: <message>` (the message starts with the file or repository it is about)."""


class HubUnreachable(Exception):
    """The hub cannot be reached (no network, offline mode, DNS, refused connection, timeout)."""


# ---------------------------------------------------------------------------------------------------------------------
# Network: the only two functions that talk to the hub.


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_unreachable(error: BaseException) -> bool:
    """Connection-level failures, as huggingface_hub and its HTTP client raise them (walking the exception chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"OfflineModeIsEnabled", "ConnectionError", "TimeoutError", "ConnectError", "ConnectTimeout",
                    "TimeoutException", "TransportError", "NetworkError", "gaierror"}:
            return True
        error = error.__cause__ or error.__context__
    return False


def _hub_failure(error: BaseException, repo_id: str, remote_path: str) -> Exception:
    if _is_unreachable(error):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return HubUnreachable(reason)
    names = {cls.__name__ for cls in type(error).__mro__}
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return DownloadError(f"{repo_id}: dataset repository not found on the hub, or not accessible")
    if "RevisionNotFoundError" in names:
        return DownloadError(f"{repo_id}: revision not found on the hub")
    if "EntryNotFoundError" in names:
        return DownloadError(f"{repo_id}/{remote_path}: not found in the dataset repository")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return DownloadError(f"{repo_id}/{remote_path}: {type(error).__name__}: {first}")


def hub_sizes(repo_id: str, revision: str | None, remote_paths: list[str]) -> dict[str, int]:
    """Sizes in bytes of the files of the dataset repo that exist (one request). Raises HubUnreachable/DownloadError."""
    from huggingface_hub import HfApi

    try:
        infos = HfApi().get_paths_info(repo_id, remote_paths, repo_type="dataset", revision=revision)
    except Exception as e:  # noqa: BLE001 - classified into our two errors
        raise _hub_failure(e, repo_id, remote_paths[0] if remote_paths else "") from None
    return {info.path: int(info.size) for info in infos if getattr(info, "size", None) is not None}


def hub_download(repo_id: str, revision: str | None, remote_path: str, destination: str) -> None:
    """Download one file of the dataset repo to `destination` (a new file): into the Hugging Face cache, then a hard
    link to the cached blob (a copy where links are impossible). Raises HubUnreachable/DownloadError."""
    from huggingface_hub import hf_hub_download

    folder, name = os.path.split(remote_path)
    try:
        cached = hf_hub_download(repo_id, name, subfolder=folder or None, repo_type="dataset", revision=revision)
    except Exception as e:  # noqa: BLE001
        raise _hub_failure(e, repo_id, remote_path) from None
    link_or_copy(os.path.realpath(cached), destination)


def link_or_copy(source: str, destination: str) -> None:
    """`destination` (a new file) becomes a hard link to `source`, or a copy where links are impossible."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


# ---------------------------------------------------------------------------------------------------------------------
# Checks of local files


def check_shard(path: str):
    """None if `path` is a complete shard, else the problem."""
    try:
        load_shard(path)
    except DataError as e:
        return str(e).split(": ", 1)[-1]
    return None


def check_tokenizer(path: str, vocab_size: int | None = None):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
        return f"not a SentencePiece model ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        return f"tokenizer has {sp.vocab_size()} pieces, the manifest says {vocab_size}"
    return None


def check_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"not valid JSON ({e})"
    return None


def local_problem(path: str, expected_size: int | None, check) -> str | None:
    """None if the file at `path` is complete, else why it must be downloaded."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        return f"has {size} bytes, the hub has {expected_size}"
    return check(path)


# ---------------------------------------------------------------------------------------------------------------------
# Main


class Fetcher:
    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id, self.revision = repo_id, revision
        self.sizes: dict[str, int] = {}
        self.offline_reason: str | None = None  # set when the hub was found unreachable
        self.downloaded = self.skipped = 0

    def ask_sizes(self, remote_paths: list[str]) -> None:
        if self.offline_reason is not None:
            return
        try:
            self.sizes.update(hub_sizes(self.repo_id, self.revision, remote_paths))
        except HubUnreachable as e:
            self.offline_reason = str(e)

    def ensure(self, remote_path: str, local_path: str, check) -> None:
        """Make `local_path` a complete copy of `remote_path`, downloading only when needed."""
        expected = self.sizes.get(remote_path)
        problem = local_problem(local_path, expected, check)
        if problem is None:
            self.skipped += 1
            print(f"present  {local_path}", flush=True)
            return
        if self.offline_reason is not None:
            raise HubUnreachable(self.offline_reason)
        print(f"download {self.repo_id}/{remote_path} -> {local_path}"
              + ("" if problem == "missing" else f" (local file {problem})"), flush=True)

        def download_and_check(tmp: str) -> None:
            hub_download(self.repo_id, self.revision, remote_path, tmp)
            bad = local_problem(tmp, expected, check)
            if bad is not None:
                raise DownloadError(f"{self.repo_id}/{remote_path}: the downloaded file is not usable: {bad}")

        write_atomic(local_path, download_and_check)
        self.downloaded += 1


def place_alias(source: str, alias: str) -> None:
    """`alias` becomes a hard link to (or a copy of) `source`, unless it already has the same bytes."""
    if os.path.isfile(alias):
        with open(source, "rb") as a, open(alias, "rb") as b:
            if a.read() == b.read():
                return
    write_atomic(alias, lambda tmp: link_or_copy(source, tmp))


def dataset_dir_for_variant(variant: str) -> str:
    """fineweb10B_<variant>: sp<VOCAB_SIZE>, optionally with a suffix naming a text transform (parameter-golf's
    dataset_suffix, e.g. sp8192_lossless_caps_caseops_v1_reserved), or byte260."""
    variant = VARIANT_ALIASES.get(variant, variant)
    if variant == "byte260" or re.fullmatch(r"sp\d+(_[a-z0-9]+)*", variant):
        return f"fineweb10B_{variant}"
    raise DownloadError(f"--variant {variant}: expected sp<VOCAB_SIZE> (e.g. sp1024, sp8192), sp<VOCAB_SIZE>_<suffix>"
                        f" (e.g. {CASEOPS_VARIANT}) or byte260")


def repo_for_variant(variant: str) -> str:
    """--repo-id's default: MATCHED_FINEWEB_REPO_ID when set, else the repository that publishes the variant."""
    return os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS.get(VARIANT_ALIASES.get(variant, variant),
                                                                          DEFAULT_REPO_ID)


def check_sidecars(dataset_dir: str) -> None:
    """The downloaded validation shards and their byte sidecars agree (data/loader.py's checks), or DownloadError
    naming the file."""
    from data.loader import TokenStream, load_sidecar, split_pattern

    try:
        load_sidecar(TokenStream(split_pattern(dataset_dir, "val"), 1 << 16))
    except DataError as e:
        raise DownloadError(str(e)) from None


def run(args) -> Fetcher:
    if args.train_shards < 0:
        raise DownloadError(f"--train-shards: must be at least 0, got {args.train_shards}")
    dataset_dir = dataset_dir_for_variant(args.variant)
    out = args.out
    repo_id = args.repo_id or repo_for_variant(args.variant)
    fetcher = Fetcher(repo_id, args.revision)
    root = args.remote_root.strip("/")
    prefix = f"{root}/" if root else ""

    # 1. The manifest (its size is asked alone: the other file names come from it).
    manifest_remote = f"{prefix}manifest.json"
    manifest_local = os.path.join(out, "datasets", "manifest.json")
    fetcher.ask_sizes([manifest_remote])
    fetcher.ensure(manifest_remote, manifest_local, check_json)
    with open(manifest_local, encoding="utf-8") as f:
        manifest = json.load(f)

    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if dataset is None:
        raise DownloadError(f"{manifest_local}: no dataset {dataset_dir} in the manifest")
    stats = dataset.get("stats") or {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{manifest_local}: dataset {dataset_dir} has no files_train/files_val counts") from None
    if args.train_shards > files_train:
        raise DownloadError(f"--train-shards {args.train_shards}: {dataset_dir} has only {files_train} training shards"
                            f" on {repo_id}")
    tokenizer_entry = next((t for t in manifest.get("tokenizers", [])
                            if t.get("name") == dataset.get("tokenizer_name")), {})
    model_path = tokenizer_entry.get("model_path") or tokenizer_entry.get("path")
    plain = re.fullmatch(r"sp(\d+)", VARIANT_ALIASES.get(args.variant, args.variant))
    if not model_path and plain:  # parameter-golf's name for its sp tokenizers
        model_path = f"tokenizers/fineweb_{plain.group(1)}_bpe.model"
    if not model_path:
        raise DownloadError(f"{manifest_local}: no tokenizer model_path for {dataset_dir}"
                            f" (tokenizer {dataset.get('tokenizer_name')!r})")
    vocab_size = tokenizer_entry.get("vocab_size") or dataset.get("vocab_size")

    # 2. Shards and tokenizer, sizes asked in one request.
    remote_dataset = f"{prefix}datasets/{dataset_dir}"
    local_dataset = os.path.join(out, "datasets", dataset_dir)
    wanted = [(f"{remote_dataset}/fineweb_val_{i:06d}.bin", os.path.join(local_dataset, f"fineweb_val_{i:06d}.bin"),
               check_shard) for i in range(files_val)]
    sidecars = bool(dataset.get("val_bytes_glob"))  # parameter-golf's CaseOps export: one sidecar per val shard
    wanted += [(f"{remote_dataset}/fineweb_val_bytes_{i:06d}.bin",
                os.path.join(local_dataset, f"fineweb_val_bytes_{i:06d}.bin"), check_shard)
               for i in range(files_val if sidecars else 0)]
    wanted += [(f"{remote_dataset}/fineweb_train_{i:06d}.bin",
                os.path.join(local_dataset, f"fineweb_train_{i:06d}.bin"), check_shard)
               for i in range(args.train_shards)]
    tokenizer_local = os.path.join(out, "tokenizers", os.path.basename(model_path))
    wanted.append((f"{prefix}{model_path}", tokenizer_local,
                   lambda p: check_tokenizer(p, int(vocab_size) if vocab_size else None)))
    fetcher.ask_sizes([remote for remote, _, _ in wanted])
    for remote, local, check in wanted:
        fetcher.ensure(remote, local, check)
    if sidecars:
        check_sidecars(local_dataset)

    # 3. DATA_PATH/tokenizer.model, train_gpt.py's default TOKENIZER_PATH.
    place_alias(tokenizer_local, os.path.join(local_dataset, "tokenizer.model"))
    note = "" if fetcher.offline_reason is None else " (hub unreachable: checked the local files only)"
    print(f"done: {fetcher.downloaded} downloaded, {fetcher.skipped} already present{note}; "
          f"DATA_PATH={local_dataset} TOKENIZER_PATH={tokenizer_local}")
    return fetcher


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"how many training shards, from the first (default {DEFAULT_TRAIN_SHARDS}; 100M tokens each)")
    p.add_argument("--variant", default="sp1024",
                   help=f"dataset of the repo: sp1024 (default), sp4096, sp8192, {CASEOPS_VARIANT} (alias sp8192_caseops),"
                        " byte260, or any other sp<N>[_suffix] the repo's manifest lists")
    p.add_argument("--repo-id", default=None,
                   help=f"dataset repository (default: MATCHED_FINEWEB_REPO_ID, else the variant's publisher:"
                        f" {', '.join(f'{v} {r}' for v, r in VARIANT_REPOS.items())})")
    p.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", REMOTE_ROOT),
                   help=f"folder of the repo that holds manifest.json, datasets/ and tokenizers/ (default {REMOTE_ROOT})")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the dataset repository (default main)")
    p.add_argument("--out", default=DATA_DIR, help="folder that receives datasets/ and tokenizers/ (default: data/)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its retry warnings would break the one-line error contract
        run(args)
    except HubUnreachable as e:
        print(f"error: cannot reach the Hugging Face hub ({hub_endpoint()}): {e}", file=sys.stderr)
        return 2
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

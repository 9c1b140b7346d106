#!/usr/bin/env python3
"""
Small English documentation corpora that a machine already holds, as .jsonl for data/prepare_corpus.py.
No network: the second corpus of issue 23 (the bundled PEPs being the first).

  --source info    the GNU manuals in Info format under --info-dir (default /usr/share/info: on Debian 12 the manuals of
                   coreutils, gettext, gnupg, findutils, grep, sed, wget, diffutils, gzip, bzip2, bc, ed, time, nettle,
                   libtasn1, libffi, readline, ...), one document per chapter: a manual's Top node, then each node whose
                   Up is Top starts a document and the nodes after it (its sections, in the file's order) are appended to
                   it. The node header lines are left out, and so are the chapters that are license texts or indices
                   (the same GFDL text in every manual; lists of index entries).
  --source pydoc   the help topics of the standard library's pydoc_data/topics.py (sections of the Python Language and
                   Library References that help("if") prints), one document per topic in sorted order. Python 3.11.7:
                   79 topics, 465 k characters, too few for a training split (85 k tokens after a 20-document validation
                   split), so issue 23 used --source info.

The output depends on what the machine has installed (the Info files, the Python version); the script prints the
sha256 of what it wrote and, for Info, every manual's file names, so a figure can name its exact corpus.

  speedrun doc-corpus --source info --out /tmp/gnu_info.jsonl
  python -m data.prepare_corpus --input /tmp/gnu_info.jsonl --out /tmp/gnu_info_sp1024 --val-docs 20
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

SKIPPED_CHAPTERS = re.compile(r"License|Copying|Index|Indices", re.IGNORECASE)


def info_nodes(text: str):
    """(node name, up, body) of every node of one Info file, in order (blocks that are not nodes are skipped)."""
    for block in text.split("\x1f"):
        block = block.lstrip("\n")
        if not block.startswith("File:"):
            continue
        header, _, body = block.partition("\n")
        node = re.search(r"Node: ([^,\n]+)", header)
        up = re.search(r"Up: ([^,\n]+)", header)
        yield node.group(1).strip() if node else "", up.group(1).strip() if up else "", body.strip("\n")


def info_documents(info_dir: str) -> list[tuple[str, str]]:
    """(name, text) of every chapter of every manual under info_dir, files in sorted name order."""
    docs: list[list] = []
    for path in sorted(Path(info_dir).glob("*.info*.gz")):
        manual = path.name.split(".info")[0]
        for node, up, body in info_nodes(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")):
            if node == "Top" or up in ("Top", "(dir)") or not docs or docs[-1][0] != manual:
                docs.append([manual, node, [body]])
            else:
                docs[-1][2].append(body)
    return [(f"{manual}/{node}", "\n\n".join(bodies)) for manual, node, bodies in docs
            if not SKIPPED_CHAPTERS.search(node)]


def pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedrun doc-corpus", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", choices=("info", "pydoc"), required=True)
    parser.add_argument("--info-dir", default="/usr/share/info")
    parser.add_argument("--out", required=True, help="the .jsonl to write")
    args = parser.parse_args(argv)
    docs = info_documents(args.info_dir) if args.source == "info" else pydoc_documents()
    docs = [(name, text) for name, text in docs if text.strip()]
    data = b"".join((json.dumps({"id": name, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")
                    for name, text in docs)
    with open(args.out, "wb") as f:
        f.write(data)
    source = (f"manuals {' '.join(sorted({n.split('/')[0] for n, _ in docs}))}" if args.source == "info"
              else f"Python {sys.version.split()[0]}")
    print(f"{args.out}: {len(docs)} documents, {sum(len(t) for _, t in docs)} characters, {len(data)} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()} ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

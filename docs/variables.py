"""Writes docs/variables.md: every field of train_gpt.Hyperparameters, each its environment variable.

    python -m docs.variables            # (re)write docs/variables.md
    python -m docs.variables --check    # exit 1, with one line, when docs/variables.md is not what this writes

The descriptions live in one place, train_gpt.py: a field's trailing comment, and the comment lines above a group of
fields (a section). They are read from its source with `tokenize`; the defaults come from importing train_gpt.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import os
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "train_gpt.py"
OUTPUT = ROOT / "docs" / "variables.md"
CLASSES = ("ModelConfig", "Hyperparameters")  # Hyperparameters extends ModelConfig: its fields come after these


@dataclasses.dataclass
class Section:
    comment: str  # the comment lines above the group, joined ("" for the fields before any section comment)
    fields: list[tuple[str, str]]  # (field name, its trailing comment)


def _comments_by_line(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on it (without '#')."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def read_sections(source: str) -> dict[str, list[Section]]:
    """Per class of CLASSES: its docstring-led sections of annotated fields, in source order."""
    comments = _comments_by_line(source)
    lines = source.splitlines()
    out: dict[str, list[Section]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in CLASSES):
            continue
        sections = [Section(" ".join((ast.get_docstring(node) or "").split()), [])]
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above = []  # the comment-only lines right above this field
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            if above:
                sections.append(Section(" ".join(above), []))
            trailing = comments.get(stmt.end_lineno, "") if not lines[stmt.end_lineno - 1].strip().startswith("#") else ""
            sections[-1].fields.append((stmt.target.id, trailing))
        out[node.name] = [s for s in sections if s.fields]
    return out


def _title(comment: str) -> tuple[str, str]:
    """A section comment as (heading, the rest): "batch: the global batch is ..." -> ("Batch", "the global ...")."""
    head, colon, rest = comment.partition(":")
    if not colon or len(head) > 60:
        head, rest = comment, ""
    rest = rest.strip()
    return head[:1].upper() + head[1:], rest


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value) -> str:
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if value == "":
        return "empty"
    return f"`{value}`"


def render(source: str | None = None) -> str:
    import train_gpt

    source = SOURCE.read_text(encoding="utf-8") if source is None else source
    fields = {f.name: f for f in dataclasses.fields(train_gpt.Hyperparameters)}
    out = [
        "# Environment variables",
        "",
        "<!-- Written by `python -m docs.variables` from train_gpt.py; edit the comments there, then rerun it. -->",
        "",
        "Every field of `train_gpt.Hyperparameters` is read from the environment variable of its name in upper case",
        "(`NUM_LAYERS=4 python train_gpt.py`); a bad value stops the run with one line naming it, before any work. "
        "Booleans",
        "take `1`/`0` (also `true`/`false`, `yes`/`no`, `on`/`off`). The ten changed most are in the",
        "[README](../README.md#the-ten-variables-changed-most); what training does with them is in",
        "[training.md](training.md).",
    ]
    seen = set()
    for sections in read_sections(source).values():
        for section in sections:
            rows = [(name, trailing) for name, trailing in section.fields if name in fields]
            if not rows:
                continue
            title, rest = _title(section.comment)
            out += ["", f"## {title}", *(["", rest] if rest else []), "",
                    "| variable | type | default | description |", "| --- | --- | --- | --- |"]
            for name, trailing in rows:
                field = fields[name]
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                kind = field.type if isinstance(field.type, str) else field.type.__name__
                out.append(f"| `{name.upper()}` | {kind} | {_cell(_default(default))} | {_cell(trailing)} |")
                seen.add(name)
    missing = sorted(set(fields) - seen)
    if missing:  # a field declared where the reader does not look: listed, so the table never silently lacks it
        out += ["", "## Declared elsewhere", "", "| variable | type | default | description |", "| --- | --- | --- | --- |"]
        for name in missing:
            field = fields[name]
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            out.append(f"| `{name.upper()}` | {kind} | {_cell(_default(field.default))} | |")
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.variables", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/variables.md differs from what is written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else None
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python -m docs.variables")
            return 1
        return 0
    write_atomically(OUTPUT, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

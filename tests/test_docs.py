"""The documentation against the code: the generated variable table is current, the README stays a front page whose
top-ten table names real variables, and no relative link in README.md or docs/*.md points to a missing file."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt
from docs import variables

ROOT = Path(__file__).resolve().parents[1]

README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FIELDS = {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)}


def test_variables_md_is_what_the_generator_writes_now():
    expected = variables.render()
    current = variables.OUTPUT.read_text(encoding="utf-8") if variables.OUTPUT.is_file() else ""
    assert current == expected, "docs/variables.md is out of date: run python -m docs.variables"


def test_variables_md_lists_every_hyperparameter_once():
    text = variables.render()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|", text, re.M)
    assert sorted(rows) == sorted(FIELDS)


def test_descriptions_come_from_the_source_comments():
    source = '''
@dataclass
class ModelConfig:
    """Shape."""

    width: int = 3  # how wide
    # knobs: what they turn
    # and more
    knob: int = 0
    other: str = "x"  # the other | one


class Hyperparameters(ModelConfig):
    plain: int = 1
'''
    sections = variables.read_sections(source)
    shape, knobs = sections["ModelConfig"]
    assert (shape.comment, shape.fields) == ("Shape.", [("width", "how wide")])
    assert (knobs.comment, knobs.fields) == ("knobs: what they turn and more", [("knob", ""), ("other", "the other | one")])
    assert sections["Hyperparameters"][0].fields == [("plain", "")]
    assert variables._title(knobs.comment) == ("Knobs", "what they turn and more")
    assert variables._cell("a | b") == "a \\| b"


@pytest.mark.slow
def test_check_exits_1_with_one_line_when_stale(tmp_path, monkeypatch):
    assert subprocess.run([sys.executable, "-m", "docs.variables", "--check"], cwd=ROOT).returncode == 0
    stale = tmp_path / "variables.md"
    stale.write_text("old\n")
    monkeypatch.setattr(variables, "OUTPUT", stale)
    monkeypatch.setattr(variables, "ROOT", tmp_path)
    assert variables.main(["--check"]) == 1
    assert variables.main([]) == 0 and stale.read_text() == variables.render()
    assert variables.main(["--check"]) == 0


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def test_readme_top_ten_names_real_variables():
    table = _section(README.read_text(encoding="utf-8"), "The ten variables changed most")
    names = re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.M)
    assert len(names) == 10 and len(set(names)) == 10, names
    assert not set(names) - FIELDS, f"not a Hyperparameters field: {sorted(set(names) - FIELDS)}"


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move the detail into docs/"
    first = "\n".join(lines[:12])
    assert re.search(r"^\./run\.sh\b", first, re.M) and re.search(r"^\./test\.sh\b", first, re.M)


def _markdown_files() -> list[Path]:
    """The project's own documentation (a record's README is history, kept as its run wrote it)."""
    return [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "data").glob("*.md")),
            ROOT / "kernels" / "README.md", ROOT / "records" / "README.md"]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "code", text)  # nor do code spans, though a link's text may be one
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files or headings: {missing}"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_speedrun_commands_in_the_docs_exist(path):
    """Every `speedrun COMMAND` (and `speedrun bench NAME`) written in code in the docs is one the command has."""
    from speedrun import cli

    text = path.read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text))
    unknown = []
    for bench, name in re.findall(r"(?<![\w/.-])speedrun (bench )?([a-z][a-z-]*)", code):
        if (name not in cli.BENCHES) if bench else (name not in cli.COMMANDS):
            unknown.append(f"speedrun {bench}{name}")
    assert not unknown, f"{path.relative_to(ROOT)} names commands that do not exist: {sorted(set(unknown))}"

"""The import rules of the repository, read from the source with ast (nothing is imported):
- no file changes sys.path (the toolkit is a package; the payload and the tests import from the repository root);
- the payload (train_gpt.py, eval_ttt.py, kernels/, data/) never imports the toolkit;
- speedrun's modules import each other without a cycle, function-level imports included;
- a library module never imports a command module (one that the `speedrun` command runs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from speedrun import cli

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = [REPO / "train_gpt.py", REPO / "eval_ttt.py", REPO / "gist.py", *sorted((REPO / "kernels").rglob("*.py")),
           *sorted((REPO / "data").rglob("*.py"))]
TOOLKIT = sorted((REPO / "speedrun").rglob("*.py"))
CHECKED = [*TOOLKIT, *PAYLOAD, *sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "docs").rglob("*.py"))]
COMMAND_MODULES = {"speedrun.cli", "speedrun.__main__", *(m for m, _, _ in cli.COMMANDS.values()),
                   *cli.BENCHES.values()}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (`from a import b` names a.b when a/b.py exists)."""
    names = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (REPO / Path(*candidate.split("."))).with_suffix(".py").is_file():
                    names.add(candidate)
    return names


# an edit of sys.path written as text, e.g. in a script handed to `python -c`
SYS_PATH_TEXT = re.compile(r"\bsys\.path\s*(\.(insert|append|extend)\(|\[[^]]*\]\s*=|\+?=)")


def sys_path_lines(path: Path) -> list[int]:
    """The lines that use sys.path in code, or edit it in a string."""
    lines = {node.lineno for node in ast.walk(tree(path)) if isinstance(node, ast.Attribute)
             and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"}
    text = path.read_text(encoding="utf-8").splitlines()
    return sorted(lines | {i for i, line in enumerate(text, 1) if SYS_PATH_TEXT.search(line)})


def test_no_file_edits_sys_path():
    offenders = {rel(p): lines for p in CHECKED if (lines := sys_path_lines(p))}
    assert not offenders, f"sys.path used in {offenders}"


def test_the_payload_never_imports_the_toolkit():
    offenders = {rel(p): sorted(n for n in imported_modules(p) if n.split(".")[0] in ("speedrun", "tools"))
                 for p in PAYLOAD}
    assert not {k: v for k, v in offenders.items() if v}


def toolkit_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in TOOLKIT}
    return {name: {n for n in imported_modules(path) if n in modules and n != name} for name, path in modules.items()}


def test_the_toolkit_has_no_import_cycle():
    graph = toolkit_graph()
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(other):] + [other]))
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_library_modules_never_import_a_command():
    graph = toolkit_graph()
    assert COMMAND_MODULES <= set(graph), sorted(COMMAND_MODULES - set(graph))
    offenders = {name: sorted(imports & COMMAND_MODULES) for name, imports in graph.items()
                 if name not in COMMAND_MODULES and imports & COMMAND_MODULES}
    assert not offenders, offenders


def test_the_rules_see_function_level_imports(tmp_path):
    sample = REPO / "speedrun" / "records" / "check.py"
    assert "speedrun.audit.fingerprint" in imported_modules(sample)  # imported inside dataset_fingerprint()

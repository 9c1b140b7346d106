"""The `speedrun` command: one subcommand per tool, each the `main(argv)` of one module, imported only when it runs
(so that `speedrun --help` and the light commands start without torch or numpy)."""

from __future__ import annotations

import importlib
import sys

# name -> (module, arguments put before the user's, one line of help)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "new": ("speedrun.records.new", (), "build a record folder from training logs"),
    "verify": ("speedrun.records.verify", (), "check records (ours and the peers' rules)"),
    "leaderboard": ("speedrun.records.leaderboard", (), "write or check the README's leaderboard tables"),
    "reproduce": ("speedrun.records.reproduce", (), "train a record and the record it beat again, seed by seed"),
    "audit": ("speedrun.audit.audit", (), "check a token dataset, and a BPB claimed on it"),
    "experiment": ("speedrun.experiments.experiment", (), "train a baseline and variants, seed by seed, and compare"),
    "sweep": ("speedrun.experiments.sweep", (), "score a checkpoint over a grid of evaluation settings"),
    "log": ("speedrun.analysis.show_log", (), "print what a training log says (any dialect)"),
    "compare-logs": ("speedrun.analysis.compare_logs", (), "two training-loss curves against tokens trained on"),
    "plot": ("speedrun.analysis.plot", (), "plot training logs"),
    "plot-context": ("speedrun.analysis.plot_context", (), "plot BPB against context length"),
    "bpb-by-position": ("speedrun.analysis.bpb_by_position", (), "BPB by position in the document"),
    "doc-corpus": ("speedrun.analysis.doc_corpus", (), "build a small documentation corpus"),
    "gpu-report": ("speedrun.bench.gpu_report", (), "the GPU benchmark: everything GPU-side within a --budget"),
}
BENCHES: dict[str, str] = {name: f"speedrun.bench.{name}" for name in
                           ("artifact", "audit", "gist", "kernels", "loader", "prepare", "train")}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: speedrun COMMAND [ARGS...]   (speedrun COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}{help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines.append(f"  {'bench NAME':<{width}}a benchmark: {', '.join(BENCHES)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"error: speedrun bench needs one of: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        module, prefix, rest = BENCHES[rest[0]], (), rest[1:]
    elif name in COMMANDS:
        module, prefix, _ = COMMANDS[name]
    else:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    status = importlib.import_module(module).main([*prefix, *rest])
    return int(status or 0)

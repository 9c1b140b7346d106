"""The speedrun toolkit: everything a user runs around the record payload (train_gpt.py, kernels/, data/,
eval_ttt.py). One command, `speedrun` (or `python -m speedrun`), with a subcommand per tool; see speedrun.cli."""

"""The command-line options that speedrun new, verify and leaderboard share: the statistics of a record claim and
whose rules a folder is checked by."""

from __future__ import annotations

import argparse
import math

from speedrun.records import peers
from speedrun.records.check import DEFAULT_ALPHA, DEFAULT_MARGIN


def add_statistics_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"nats of val_loss to beat the previous record by (default {DEFAULT_MARGIN})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"significance level of the one-sided Welch t-test (default {DEFAULT_ALPHA})")


def add_rules_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", choices=("auto", "ours") + peers.RULES, default="auto",
                   help="whose rules: ours, parameter-golf's or modded-nanogpt's (auto: by each folder's files)")


def check_statistics_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.alpha < 1:
        p.error("--alpha must be in (0, 1)")
    if not (math.isfinite(args.margin) and args.margin >= 0):
        p.error("--margin must be >= 0")

"""`flan-jax data list | show TASK_MIXTURE_OR_FAMILY | stats TASK_OR_MIXTURE | overlap`: inspect registered tasks.

`data overlap --mixture=M --suite=S`: training examples sharing a 13-word
n-gram with evaluation questions (tasks/overlap.py).

The reports themselves are in tasks/data_report.py (imported when a command runs: it needs SeqIO).
"""

from __future__ import annotations

import argparse
import json

from flan_jax import errors
from flan_jax.commands import catalog, gin_flags, process


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect registered tasks and mixtures")
    data_commands = parser.add_subparsers(dest="data_command", required=True)

    data_commands.add_parser("list", help="mixtures, task families and their variants").set_defaults(run=run_list)

    show = data_commands.add_parser("show", help="print rendered examples")
    show.add_argument("name", metavar="TASK_MIXTURE_OR_FAMILY")
    show.add_argument("--variant", help="only tasks of this variant, e.g. fs_cot")
    show.add_argument("-n", type=int, help="number of examples (default 3; of a task family: 1 per variant)")
    show.add_argument("--split", default="train")
    show.set_defaults(check=check_show, run=run_show)

    stats = data_commands.add_parser("stats", help="shares, token lengths, truncation, packing fill rate")
    stats.add_argument("name", metavar="TASK_OR_MIXTURE")
    stats.add_argument("--split", default="train")
    stats.add_argument("--num_examples", type=int, default=2000)
    stats.add_argument("--inputs_length", type=int, default=1024)
    stats.add_argument("--targets_length", type=int, default=256)
    stats.add_argument("--fill", type=float, help="also suggest lengths at which best-fit packing fills this share "
                                                  "of the rows' positions (inputs and targets together), e.g. 0.9")
    stats.add_argument("--max_truncated", type=float, default=0.01,
                       help="with --fill: most share of examples a suggested length may cut (default 0.01)")
    stats.set_defaults(check=check_stats, run=run_stats)

    overlap = data_commands.add_parser(
        "overlap", help="evaluation examples that share a 13-word n-gram with training examples")
    overlap.add_argument("--mixture", required=True, help="the training mixture or task")
    overlap.add_argument("--suite", required=True, help="evaluation suites, comma-separated (e.g. flan_heldout)")
    overlap.add_argument("--split", help="evaluation split (default: each suite's own)")
    overlap.add_argument("--limit", type=int, help="only the first N evaluation examples of each task")
    overlap.add_argument("--max_rows", type=int, help="only the first N training rows of each source")
    overlap.add_argument("--output", help="write the report as JSON here")
    overlap.set_defaults(check=check_overlap, run=run_overlap)


def check_show(args: argparse.Namespace) -> None:
    if args.n is not None:
        errors.require("-n", args.n, errors.POSITIVE_INT)


def check_stats(args: argparse.Namespace) -> None:
    for flag in ("num_examples", "inputs_length", "targets_length"):
        errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
    if args.fill is not None:
        errors.require("--fill", args.fill, errors.Check("a number in (0, 1]", lambda v: 0 < v <= 1))
    errors.require("--max_truncated", args.max_truncated, errors.FRACTION)


def check_overlap(args: argparse.Namespace) -> None:
    for flag in ("limit", "max_rows"):
        if getattr(args, flag) is not None:
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)


def _load(gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    catalog.load_tasks()


def run_list(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _load(gin)
    from tasks import data_report

    data_report.list_registered()


def run_show(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _load(gin)
    from tasks import data_report

    data_report.show(args.name, variant=args.variant, n=args.n, split=args.split)


def run_stats(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _load(gin)
    from tasks import data_report

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    data_report.stats(args.name, split=args.split, num_examples=args.num_examples, task_feature_lengths=lengths,
                      fill=args.fill, max_truncated=args.max_truncated)


def run_overlap(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    suites = catalog.get_suites(args.suite)
    _load(gin)
    from tasks import overlap

    result = overlap.overlap_report(args.mixture, suites, split=args.split, limit=args.limit,
                                    max_rows=args.max_rows)
    print(overlap.format_report(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
        print(f"wrote {args.output}")

"""`flan-jax train`: finetune on a SeqIO mixture, as gin configures it."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence

from flan_jax.commands import catalog, gin_flags, process
from flan_jax.errors import UserError

logger = logging.getLogger(__name__)

EXCLUDED_FILE = "excluded_overlap.json"  # In model_dir: what `TrainConfig.exclude_overlap_with` dropped.


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="finetune on a SeqIO mixture (gin-configured)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    catalog.load_tasks()
    from flan_jax import trainer

    try:
        config = trainer.TrainConfig()
    except TypeError as e:  # gin adds lines on what it had bound; the first one names what is missing.
        raise UserError(f"incomplete gin config: {str(e).splitlines()[0]}") from None
    pipeline_metrics = exclude_overlap(config.exclude_overlap_with)
    from flan_jax import evaluation

    eval_config = evaluation.EvalConfig()
    suites = catalog.get_suites(",".join(eval_config.suites)) if eval_config.suites else []
    summary = trainer.train(config, eval_config=eval_config, suites=suites, pipeline_metrics=pipeline_metrics)
    print(summary.format())
    if config.exclude_overlap_with:
        report_excluded(config.exclude_overlap_with, config.model_dir)
    if summary.preempted_by:
        from flan_jax import preemption

        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)  # "Run me again": the run is not finished.


def _suite_names(suites: Sequence[str] | str) -> str:
    return suites if isinstance(suites, str) else ",".join(suites)  # gin may bind one name as a string.


def exclude_overlap(suites: Sequence[str] | str) -> Callable[[], Mapping[str, float]] | None:
    """Drops training examples overlapping `suites`' evaluation questions in every training pipeline built next.

    Returns what reads the running counts for the training log (`trainer.train(pipeline_metrics=)`);
    None when `suites` is empty.
    """
    from tasks import overlap

    if not suites:
        overlap.exclude_overlap(None)
        return None
    index = overlap.eval_index(overlap.eval_tasks(catalog.get_suites(_suite_names(suites))))
    logger.info("exclude_overlap_with: %d evaluation questions of %s indexed", len(index), _suite_names(suites))
    overlap.exclude_overlap(index)
    return overlap.exclusion_metrics


def report_excluded(suites: Sequence[str] | str, model_dir: str) -> dict[str, int]:
    """Prints and writes (model_dir/excluded_overlap.json) the training examples read and those dropped, by source.

    The pipeline reads ahead of training (shuffle and prefetch buffers), so
    "read" counts what it reached, a little more than the steps consumed.
    """
    from tasks import overlap

    counts, checked = overlap.excluded_counts(), overlap.checked_count()
    by_source = f" ({', '.join(f'{k}: {n}' for k, n in sorted(counts.items()))})" if counts else ""
    print(f"exclude_overlap_with={_suite_names(suites)}: dropped {sum(counts.values())} of {checked} training "
          f"examples read{by_source}")
    with open(os.path.join(model_dir, EXCLUDED_FILE), "w") as f:
        json.dump({"suites": _suite_names(suites).split(","), "checked": checked, "dropped": counts}, f, indent=1)
    return counts

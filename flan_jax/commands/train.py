"""`flan-jax train`: finetune on a SeqIO mixture, as gin configures it."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flan_jax.commands import catalog, gin_flags, process
from flan_jax.errors import UserError

if TYPE_CHECKING:
    from tasks.overlap import OverlapExclusion

logger = logging.getLogger(__name__)

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="finetune on a SeqIO mixture (gin-configured)")
    parser.add_argument("--vocab", help="spiece.model, for an init_checkpoint that carries none (T5X); the same "
                                        "as --gin.get_default_vocabulary.sentencepiece_model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    from flan_jax import checkpoint_bindings, trainer

    try:
        config = trainer.TrainConfig()
    except TypeError as e:  # gin adds lines on what it had bound; the first one names what is missing.
        raise UserError(f"incomplete gin config: {str(e).splitlines()[0]}") from None
    checkpoint_bindings.take_from_checkpoint(config.init_checkpoint, args.vocab)
    catalog.load_tasks()  # After the vocabulary is settled: the tasks are tokenized with it.
    exclusion = overlap_exclusion(config.exclude_overlap_with)
    from flan_jax import evaluation

    eval_config = evaluation.EvalConfig()
    suites = catalog.get_suites(",".join(eval_config.suites)) if eval_config.suites else []
    summary = trainer.train(config, eval_config=eval_config, suites=suites, example_filter=exclusion)
    print(summary.format())
    if exclusion and not summary.already_complete:
        from tasks import overlap

        print(overlap.format_exclusion(exclusion.report()))
    if summary.preempted_by:
        from flan_jax import preemption

        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)  # "Run me again": the run is not finished.


def overlap_exclusion(suites: Sequence[str] | str) -> OverlapExclusion | None:
    """The training pipeline's filter for `TrainConfig.exclude_overlap_with` (None when it names no suite):
    it drops the training examples that overlap the suites' evaluation questions."""
    if not suites:
        return None
    from tasks import overlap

    names = suites if isinstance(suites, str) else ",".join(suites)  # gin may bind one name as a string.
    exclusion = overlap.OverlapExclusion.of(catalog.get_suites(names))
    logger.info("exclude_overlap_with: %d evaluation questions of %s indexed", len(exclusion.index), names)
    return exclusion

"""`flan-jax train`: finetune on a SeqIO mixture, as gin configures it."""

from __future__ import annotations

import argparse

from flan_jax.commands import catalog, gin_flags, process
from flan_jax.errors import UserError


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
    from flan_jax import evaluation

    eval_config = evaluation.EvalConfig()
    suites = catalog.get_suites(",".join(eval_config.suites)) if eval_config.suites else []
    summary = trainer.train(config, eval_config=eval_config, suites=suites)
    print(summary.format())
    if summary.preempted_by:
        from flan_jax import preemption

        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)  # "Run me again": the run is not finished.

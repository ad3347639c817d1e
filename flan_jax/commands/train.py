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


VOCAB_BINDING = "get_default_vocabulary.sentencepiece_model"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="finetune on a SeqIO mixture (gin-configured)")
    parser.add_argument("--vocab", help=f"spiece.model, for an init_checkpoint that carries none (T5X); the same "
                                        f"as --gin.{VOCAB_BINDING}")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    from flan_jax import trainer

    try:
        config = trainer.TrainConfig()
    except TypeError as e:  # gin adds lines on what it had bound; the first one names what is missing.
        raise UserError(f"incomplete gin config: {str(e).splitlines()[0]}") from None
    take_from_checkpoint(config.init_checkpoint, args.vocab)
    catalog.load_tasks()  # After the vocabulary is settled: the tasks are tokenized with it.
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


def take_from_checkpoint(path: str | None, vocab: str | None = None) -> None:
    """Binds in gin what it leaves unbound from the pretrained checkpoint at `path`: the
    architecture (T5Config) and the vocabulary (the checkpoint's spiece.model, else
    `vocab`, the --vocab flag). A binding or --vocab that disagrees with the
    checkpoint is a UserError naming both and the flag that fixes it."""
    import gin

    ckpt_vocab = None
    if path:
        from flan_jax import formats

        architecture = formats.read_architecture(path)
        for field, value in formats.unbound_architecture(architecture, gin.get_bindings("T5Config"), path).items():
            gin.bind_parameter(f"T5Config.{field}", value)
        ckpt_vocab = architecture.vocab_file
    bound = gin.get_bindings("get_default_vocabulary").get("sentencepiece_model")
    if ckpt_vocab and vocab and not _same_file(ckpt_vocab, vocab):
        raise UserError(f"--vocab={vocab} is not the vocabulary of {path} ({ckpt_vocab}): drop --vocab")
    if ckpt_vocab and bound and not _same_file(ckpt_vocab, bound):
        raise UserError(f"{VOCAB_BINDING}={bound!r} is bound in gin but {path} has its own vocabulary: pass "
                        f"--gin.{VOCAB_BINDING}={ckpt_vocab!r} (or bind none, to take the checkpoint's)")
    if vocab and bound and not _same_file(vocab, bound):
        raise UserError(f"--vocab={vocab} and {VOCAB_BINDING}={bound!r} (gin) differ: give one of them")
    wanted = ckpt_vocab or vocab
    if wanted and not bound:
        gin.bind_parameter(VOCAB_BINDING, wanted)


def _same_file(a: str, b: str) -> bool:
    """The same path or, for local files, the same bytes (a copy of a checkpoint's spiece.model agrees with it)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


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

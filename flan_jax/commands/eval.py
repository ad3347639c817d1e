"""`flan-jax eval`: a checkpoint on held-out suites (`--suite`) or on EvalConfig's tasks; `--compare` results."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from flan_jax import errors
from flan_jax.commands import BASE_HELP, CHECKPOINT_HELP, catalog, gin_flags, process
from flan_jax.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on held-out suites, or on EvalConfig's tasks")
    parser.add_argument("--checkpoint", "--model_dir", help=CHECKPOINT_HELP + " (default: TrainConfig.model_dir)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: best, else latest)")
    parser.add_argument("--base", help=BASE_HELP)
    parser.add_argument("--vocab", help="spiece.model, for checkpoints that carry none")
    parser.add_argument("--suite", help="comma-separated suites: flan_heldout (the paper's six and their normalized "
                        "average; flan_heldout_mmlu_test: MMLU's test split), mmlu_direct, mmlu_cot, bbh_direct, "
                        "bbh_cot, tydiqa_direct, mgsm_cot, gsm8k_cot")
    parser.add_argument("--limit", type=int, help="suite: the first N examples of each task (default: all)")
    parser.add_argument("--method", choices=["generate", "rank", "choice"],
                        help="where examples have options: rank (the likeliest option) or choice (the option whose "
                        "first token has the highest first-step logit); default: each suite's own (MMLU-Direct: "
                        "choice, the rest: generate), else generate")
    parser.add_argument("--batch_size", type=int, default=32, help="suite: rows per batch")
    parser.add_argument("--input_length", type=int, default=2048, help="suite: prompt tokens (EOS included)")
    parser.add_argument("--target_length", type=int, help="suite: most tokens decoded per row (default: each "
                        "suite's own, long enough for its exemplars' answers) and scored per option")
    parser.add_argument("--export_prompts", metavar="FILE", help="suite: write every prompt with its gold target as "
                        "JSON Lines (suite, task, index, inputs, target, stops), evaluate nothing")
    parser.add_argument("--predictions", metavar="FILE", help="suite: score a JSON Lines file of "
                        "{task, index, prediction} made elsewhere, with the suite's own extraction and metrics")
    parser.add_argument("--output", help="suite: results JSON, written by process 0 (default "
                        "eval_results/<checkpoint>-step<N>.json)")
    parser.add_argument("--tb_dir", help="suite: TensorBoard directory (default: next to --output)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print results files side by side")
    parser.set_defaults(check=check, run=run)


def check(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "input_length"):
        errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
    if args.limit is not None:
        errors.require("--limit", args.limit, errors.POSITIVE_INT)
    if args.target_length is not None:
        errors.require("--target_length", args.target_length, errors.POSITIVE_INT)
    if args.compare and len(args.compare) < 2:
        raise UserError("--compare takes two or more results files")
    if (args.export_prompts or args.predictions) and not args.suite:
        raise UserError(f"--{'export_prompts' if args.export_prompts else 'predictions'} needs --suite")
    if args.export_prompts and args.predictions:
        raise UserError("--export_prompts and --predictions are two steps: run them one after the other")


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    from flan_jax.suite_results import compare_results, read_results

    if args.compare:
        print(compare_results([(path, read_results(path)) for path in args.compare]))
    elif args.export_prompts or args.predictions:
        _suite_files(args)
    elif args.suite:
        _eval_suites(args)
    else:
        _eval_configured(args)


def _train_setting(name: str) -> Any:
    """TrainConfig's field `name` as gin binds it, else its default (MISSING if it has none).

    Read without building a TrainConfig, which would require fields evaluation does not use.
    """
    import gin

    from flan_jax import trainer

    bound = gin.get_bindings("TrainConfig")
    if name in bound:
        return bound[name]
    field = {f.name: f for f in dataclasses.fields(trainer.TrainConfig)}[name]
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def _eval_configured(args: argparse.Namespace) -> None:
    """`eval` without --suite: EvalConfig's tasks, at the training lengths unless EvalConfig sets its own."""
    from flan_jax import evaluation, inference, suite_results
    from flan_jax.training_eval import Evaluator

    model_dir = args.checkpoint or _train_setting("model_dir")
    if model_dir is dataclasses.MISSING:
        raise UserError("eval needs --checkpoint=PATH, --suite or a gin config that binds TrainConfig.model_dir")
    catalog.load_tasks()
    model = inference.load_model(model_dir, step=args.step, vocab_path=args.vocab, base=args.base)
    eval_config = evaluation.EvalConfig()
    if args.method:
        eval_config = dataclasses.replace(eval_config, method=args.method)
    evaluator = Evaluator(eval_config, _train_setting("task_feature_lengths"),
                          prompt_length=model.module.config.prompt_length)
    metrics = evaluator.evaluate(inference.ModelRunner(model.module, model.partitioner).fns(model.params), model.step,
                                 show_progress=True)
    if not suite_results.is_writer():  # Every process has the same scores; one table is enough.
        return
    print(f"step {model.step}")
    for key, value in sorted(metrics.items()):
        print(f"  {key.removeprefix('eval/'):<56} {value:7.2f}")


def _suite_lengths(args: argparse.Namespace, suites: list) -> dict[str, int]:
    """Prompt tokens, and the most target tokens scored per option (rank): --target_length, else
    the longest of the suites' default decode lengths."""
    from flan_jax.suites import expand_suites

    targets = args.target_length or max(s.max_decode_length for s in expand_suites(suites)[0])
    return {"inputs": args.input_length, "targets": targets}


def _suite_files(args: argparse.Namespace) -> None:
    """`--export_prompts`: the suites' prompts out; `--predictions`: predictions made elsewhere scored."""
    from flan_jax import suite_files, suite_results
    from flan_jax.suites import load_suites, score_predictions

    suites = catalog.get_suites(args.suite)
    if args.checkpoint:  # Tokenized (exemplars dropped to fit) with the checkpoint's vocabulary.
        from flan_jax import inference

        vocabulary = inference.load_model(args.checkpoint, step=args.step, vocab_path=args.vocab,
                                          base=args.base).vocabulary
    else:
        import seqio

        vocabulary = seqio.SentencePieceVocabulary(args.vocab) if args.vocab else None  # None: the default
    catalog.load_tasks(vocabulary)
    loaded = load_suites(suites, _suite_lengths(args, suites), args.limit)
    if args.export_prompts:
        if not suite_results.is_writer():  # One file, written once, whichever process reads it.
            return
        count = suite_files.export_prompts(loaded, args.export_prompts)
        print(f"{count} prompts of {', '.join(s.name for s in loaded.suites)} written to {args.export_prompts}")
        return
    results = score_predictions(loaded, suite_files.read_predictions(args.predictions, loaded))
    results = {"predictions": os.path.abspath(args.predictions), **results}
    suite_results.report(results, args.output or os.path.join("eval_results", f"{Path(args.predictions).stem}.json"))


def _eval_suites(args: argparse.Namespace) -> None:
    """`eval --suite`: held-out benchmarks of any checkpoint, to JSON, TensorBoard and a table."""
    from flan_jax import data as data_lib
    from flan_jax import inference, suite_results
    from flan_jax.suites import run_suites

    suites = catalog.get_suites(args.suite)
    if not args.checkpoint:
        raise UserError("--suite needs --checkpoint=PATH (a flan-jax run, a HF directory or a T5X checkpoint)")
    model = inference.load_model(args.checkpoint, step=args.step, vocab_path=args.vocab, base=args.base)
    if model.vocabulary.vocab_size > model.module.config.vocab_size:
        raise UserError(f"the vocabulary has {model.vocabulary.vocab_size} ids but the model only "
                        f"{model.module.config.vocab_size}; pass the model's own with --vocab")
    catalog.load_tasks(model.vocabulary)  # The suites' prompts are tokenized as the model was trained.
    output = args.output or os.path.join(
        "eval_results", f"{Path(os.path.abspath(args.checkpoint)).name}-step{model.step}.json")
    tb_dir = args.tb_dir or os.path.splitext(output)[0] + "_tb"
    print(f"Evaluating {args.checkpoint} ({model.format}, step {model.step}) on {', '.join(s.name for s in suites)}")
    prompt_length = model.module.config.prompt_length
    data_lib.check_prompt_room(prompt_length, args.input_length, "--input_length")
    results = run_suites(
        suites, inference.ModelRunner(model.module, model.partitioner).fns(model.params),
        lengths=_suite_lengths(args, suites), method=args.method, decode_length=args.target_length,
        batch_size=args.batch_size, limit=args.limit, prompt_length=prompt_length,
    )
    results = {"checkpoint": os.path.abspath(args.checkpoint), "format": model.format, "step": model.step, **results}
    suite_results.report(results, output, tb_dir, model.step)

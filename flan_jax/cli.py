"""The `flan-jax` command: parses T5X-style gin flags and runs one subcommand.

  flan-jax train --gin_file=runs/smoke.gin [--gin_file=...] [--gin.KEY=VALUE ...]
  flan-jax eval  --gin_file=runs/smoke.gin [--step=N]                  (EvalConfig's tasks)
  flan-jax eval  --checkpoint=PATH --suite=bbh_direct,bbh_cot,mmlu_direct,mmlu_cot,gsm8k_cot
                 [--limit=N --method=generate|rank --output=FILE --batch_size=32]
  flan-jax eval  --compare A.json B.json [...]
  flan-jax infer --checkpoint=PATH [--decode=greedy|beam|sample] [PROMPT ...]   (stdin if none)
                 [--input_file=prompts.jsonl --output=predictions.jsonl --batch_size=32]
  flan-jax convert SRC DST [--to=flan-jax|hf]
  flan-jax bench decode|data
  flan-jax bench collection --dir=DIR [--generate_gb=2 --format=jsonl]
  flan-jax bench train --gin_file=models/flan_t5_base.gin [--batch_size=32 --lengths=1024,256 --compare_hf]
                       [--compile_only --devices=8]   (plan: compile on shapes alone, per-device memory)
  flan-jax data list | show TASK_MIXTURE_OR_FAMILY [--variant=fs_cot] [-n 3] | stats TASK_OR_MIXTURE

`--gin_file` is searched relative to the working directory, then the gin
configs shipped with the package (the checkout's `gin/` when run from source).
`--gin.KEY=VALUE` adds the binding `KEY = VALUE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from flan_jax import errors
from flan_jax.config_files import candidate_dirs, gin_config_dir
from flan_jax.errors import UserError

# flan_jax/gin_configs when installed, the checkout's gin/ from source; None if neither exists.
GIN_DIR = gin_config_dir()


def _init_distributed() -> None:
    """Joins a multi-process run (FLAN_JAX_DISTRIBUTED=1) before JAX touches a device.

    On Cloud TPU slices and under SLURM, jax.distributed.initialize() finds the
    coordinator, the process count and this process's id by itself. Elsewhere
    (e.g. launch/multiprocess_local.sh) set FLAN_JAX_COORDINATOR_ADDRESS
    (host:port of process 0), FLAN_JAX_NUM_PROCESSES and FLAN_JAX_PROCESS_ID;
    any of them that is set overrides auto-detection. On CPU the processes
    exchange collectives over TCP with gloo (jax's default; set here so that a
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=none in the environment cannot break it).
    """
    if os.environ.get("FLAN_JAX_DISTRIBUTED") != "1":
        return
    import jax

    explicit: dict = {}
    if address := os.environ.get("FLAN_JAX_COORDINATOR_ADDRESS"):
        explicit["coordinator_address"] = address
    for key, name in (("num_processes", "FLAN_JAX_NUM_PROCESSES"), ("process_id", "FLAN_JAX_PROCESS_ID")):
        if value := os.environ.get(name):
            try:
                explicit[key] = int(value)
            except ValueError:
                raise SystemExit(f"flan-jax: error: {name}={value!r} is not an integer") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)


# An INFO line of absl's C++ logging ("I0000 00:00:1795783688.436051   18202 port.cc:153] ..."),
# of TensorFlow's own format before 2.19 ("2025-01-01 10:00:00.000001: I tensorflow/...:12] ..."),
# and absl's notice that such lines go to stderr until absl::InitializeLog() is called.
_NATIVE_INFO_LINE = re.compile(
    r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|\d{4}-\d\d-\d\d [\d:.]+: I \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
)


@contextlib.contextmanager
def _native_info_lines_dropped() -> Iterator[None]:
    """Holds back what is written to file descriptor 2 meanwhile, then passes it on without INFO lines.

    (Should the process die inside, what was held is lost: TF_CPP_MIN_LOG_LEVEL=0 shows it.)
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not _NATIVE_INFO_LINE.match(line.decode(errors="replace"))]
            os.write(2, b"".join(kept))


def _quiet_backends() -> None:
    """Keeps TensorFlow to the CPU input pipeline and its logs quiet.

    TF_CPP_MIN_LOG_LEVEL quiets TensorFlow's C++ logging once it is set up, but
    TensorFlow >= 2.19 logs INFO lines (oneDNN, CUDA drivers) through absl while
    its shared libraries load, before absl::InitializeLog(); absl then writes
    every line to stderr and reads no environment variable. So those lines
    are filtered out of stderr during the import; warnings and errors pass.
    TF_CPP_MIN_LOG_LEVEL=0 keeps everything.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with contextlib.nullcontext() if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" else _native_info_lines_dropped():
        import tensorflow as tf
    from absl import logging as absl_logging

    # SeqIO warns once per task about uncached sources; only errors matter here.
    absl_logging.set_verbosity(absl_logging.ERROR)

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already runs in this process (main() called in-process); too late.
        pass


def _split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Pulls --gin_file=F and --gin.K=V out of argv; returns (files, bindings, rest)."""
    files, bindings, rest = [], [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--gin_file" and args:
            files.append(args.pop(0))
        elif arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            key, sep, value = arg[len("--gin."):].partition("=")
            if not sep:
                raise SystemExit(f"flan-jax: error: gin flag {arg!r} needs the form --gin.KEY=VALUE")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(arg)
    return files, bindings, rest


def _resolve_gin_file(name: str) -> str:
    for candidate in (Path(name), *([GIN_DIR / name] if GIN_DIR else [])):
        if candidate.is_file():
            return str(candidate)
    where = str(GIN_DIR) if GIN_DIR else ", ".join(map(str, candidate_dirs())) + ": none of them holds gin configs"
    raise SystemExit(f"flan-jax: error: gin file {name!r} not found (looked in . and {where})")


class _GinProbeFilter(logging.Filter):
    """gin logs an error for every search-path prefix an include is not under; that is normal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found:")


def parse_gin(files: Sequence[str], bindings: Sequence[str], *, with_data: bool = True) -> None:
    """Parses gin files and bindings; a bad one ends the program with gin's message.

    `with_data=False` registers only the model, optimizer and partitioning
    configurables (what `bench train` needs), so TensorFlow, SeqIO and t5 are
    never imported.
    """
    import gin

    logging.getLogger().addFilter(_GinProbeFilter())

    if with_data:
        import tasks

        tasks.import_modules()  # Their gin configurables (vocabulary, data directory); nothing registered yet.
        from flan_jax import trainer  # noqa: F401  (registers the configurables)
    else:
        from flan_jax import bench_train  # noqa: F401  (registers model, optimizer, partitioner)

    if GIN_DIR:
        gin.add_config_file_search_path(str(GIN_DIR))
    try:
        gin.parse_config_files_and_bindings([_resolve_gin_file(f) for f in files], bindings, finalize_config=False)
    except SystemExit:
        raise
    except Exception as e:  # gin raises several types; all are user errors here.
        # gin's message, then where: "  In bindings string line 2", the line, "    ^".
        message, *where = [line.strip() for line in str(e).splitlines() if line.strip().strip("^")] or [repr(e)]
        raise UserError(f"bad gin config: {message}" + (f" ({': '.join(where)})" if where else "")) from None


def _cmd_train(args: argparse.Namespace) -> None:
    from flan_jax import trainer

    try:
        config = trainer.TrainConfig()
    except TypeError as e:  # gin adds lines on what it had bound; the first one names what is missing.
        raise UserError(f"incomplete gin config: {str(e).splitlines()[0]}") from None
    summary = trainer.train(config)
    print(summary.format())
    if summary.preempted_by:
        from flan_jax import preemption

        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)  # "Run me again": the run is not finished.


def _cmd_eval(args: argparse.Namespace) -> None:
    from flan_jax import evaluation, inference, trainer

    if args.compare:
        print(evaluation.compare_results([(path, evaluation.read_results(path)) for path in args.compare]))
        return
    if args.suite:
        _eval_suites(args)
        return
    config = trainer.TrainConfig()
    model = inference.load_model(args.checkpoint or config.model_dir, step=args.step, vocab_path=args.vocab)
    eval_config = evaluation.EvalConfig()
    if args.method:
        eval_config = dataclasses.replace(eval_config, method=args.method)
    evaluator = evaluation.Evaluator(eval_config, config.task_feature_lengths)
    metrics = evaluator.evaluate(inference.ModelRunner(model.module, model.partitioner).fns(model.params), model.step,
                                 show_progress=True)
    print(f"step {model.step}")
    for key, value in sorted(metrics.items()):
        print(f"  {key.removeprefix('eval/'):<56} {value:7.2f}")


def _eval_suites(args: argparse.Namespace) -> None:
    """`eval --suite`: held-out benchmarks of any checkpoint, to JSON, TensorBoard and a table."""
    import json

    from clu import metric_writers

    import tasks
    from flan_jax import evaluation, inference
    from tasks import registry

    tasks.discover()  # The suites, recorded; registered below with the model's vocabulary.
    suites = [registry.get_suite(name.strip()) for name in args.suite.split(",") if name.strip()]
    if not args.checkpoint:
        raise UserError("--suite needs --checkpoint=PATH (a flan-jax run, a HF directory or a T5X checkpoint)")
    model = inference.load_model(args.checkpoint, step=args.step, vocab_path=args.vocab)
    if model.vocabulary.vocab_size > model.module.config.vocab_size:
        raise UserError(f"the vocabulary has {model.vocabulary.vocab_size} ids but the model only "
                        f"{model.module.config.vocab_size}; pass the model's own with --vocab")
    tasks.register(model.vocabulary)  # The suites' prompts are tokenized as the model was trained.
    output = args.output or os.path.join(
        "eval_results", f"{Path(os.path.abspath(args.checkpoint)).name}-step{model.step}.json")
    tb_dir = args.tb_dir or os.path.splitext(output)[0] + "_tb"
    print(f"Evaluating {args.checkpoint} ({model.format}, step {model.step}) on {', '.join(s.name for s in suites)}")
    results = evaluation.run_suites(
        suites, inference.ModelRunner(model.module, model.partitioner).fns(model.params),
        lengths={"inputs": args.input_length, "targets": args.target_length}, method=args.method or "generate",
        batch_size=args.batch_size, limit=args.limit,
    )
    results = {"checkpoint": os.path.abspath(args.checkpoint), "format": model.format, "step": model.step, **results}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=1)
    writer = metric_writers.create_default_writer(tb_dir)
    writer.write_scalars(model.step, evaluation.tensorboard_scalars(results))
    writer.close()
    print(evaluation.format_results(results))
    print(f"results      {output}\ntensorboard  {tb_dir}")


def _cmd_infer(args: argparse.Namespace) -> None:
    import tqdm

    from flan_jax import inference

    if args.input_file:
        if args.prompts:
            raise UserError("give prompts as arguments or in --input_file, not both")
        records = inference.read_prompts(args.input_file)
    else:
        lines = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        records = [{"inputs": line} for line in lines]
    if not records:
        raise SystemExit("flan-jax: error: no prompt given (pass it as an argument, on stdin or with --input_file)")
    if args.output and os.path.exists(args.output):
        raise UserError(f"{args.output} exists; refusing to overwrite it")
    model = inference.load_model(args.checkpoint, step=args.step, vocab_path=args.vocab)
    options = {}
    if args.decode == "beam":
        options = {"num_beams": args.num_beams, "alpha": args.alpha}
    elif args.decode == "sample":
        options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    with tqdm.tqdm(total=len(records), unit="prompt", desc=f"{args.decode} decoding", dynamic_ncols=True,
                   disable=len(records) <= args.batch_size) as bar:
        answers = inference.generate(
            model, [r["inputs"] for r in records], method=args.decode, max_decode_length=args.max_decode_length,
            max_input_length=args.max_input_length, batch_size=args.batch_size, seed=args.seed, progress=bar.update,
            **options,
        )
    if args.output:
        inference.write_predictions(args.output, records, answers)
        print(f"{len(answers)} predictions -> {args.output}")
        return
    for record, answer in zip(records, answers):
        print(f"> {record['inputs']}\n{answer}\n")


def _cmd_convert(args: argparse.Namespace) -> None:
    from flan_jax import formats
    from flan_jax.formats import hf

    loaded = formats.load_checkpoint(args.src, step=args.step)
    vocab_file = args.vocab or formats.vocab_file_of(loaded)
    if args.to == "hf":
        if os.path.exists(args.dst) and os.listdir(args.dst):
            raise SystemExit(f"flan-jax: error: {args.dst} exists and is not empty; refusing to overwrite it")
        import jax

        hf.save_hf_directory(args.dst, jax.device_get(loaded.params), loaded.config, vocab_file)
    else:
        formats.save_flan_jax(args.dst, loaded.config, loaded.params, vocab_file, loaded.step)
    print(f"{args.src} ({loaded.format}, step {loaded.step}) -> {args.dst} ({args.to})")
    if not vocab_file:
        print("note: no vocabulary was found or given (--vocab); the result carries none")


def _cmd_data(args: argparse.Namespace) -> None:
    from flan_jax import data_inspect

    if args.data_command == "list":
        data_inspect.list_registered()
    elif args.data_command == "show":
        data_inspect.show(args.name, variant=args.variant, n=args.n, split=args.split)
    else:
        lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
        data_inspect.stats(args.name, split=args.split, num_examples=args.num_examples, task_feature_lengths=lengths,
                           fill=args.fill, max_truncated=args.max_truncated)


def _cmd_bench(args: argparse.Namespace) -> None:
    from flan_jax import bench

    if args.what == "decode":
        bench.bench_decode(repeats=args.repeats, compare_hf=not args.no_hf)
    elif args.what == "data":
        from flan_jax import data

        inputs, targets = _positive_ints("--lengths", args.lengths, "1024,256", count=2)
        packers = [data.check_packer(p, "--packer") for p in args.packer.split(",")] if args.packer else [None]
        for i, packer in enumerate(packers):  # One after the other, to compare them in the same run.
            if i:
                print()
            bench.bench_data(args.mixture, {"inputs": inputs, "targets": targets}, repeats=args.repeats, packer=packer)
    elif args.what == "collection":
        from flan_jax import bench_collection

        bench_collection.bench_collection(args.dir, generate_gb=args.generate_gb, file_format=args.format)
    else:
        from flan_jax import bench_train

        inputs, targets = _positive_ints("--lengths", args.lengths, "1024,256", count=2)
        lengths = {"inputs": inputs, "targets": targets}
        layers = _positive_ints("--layers", args.layers, "2,24") if args.layers else []
        bench_train.bench_train(
            batch_size=args.batch_size, lengths=lengths, steps=args.steps, num_microbatches=args.num_microbatches,
            layers=layers, compare_hf=args.compare_hf, json_out=args.json_out, profile_dir=args.profile_dir,
            compile_only=args.compile_only,
        )


def _positive_ints(flag: str, text: str, example: str, count: int | None = None) -> list[int]:
    """'1024,256' -> [1024, 256]; a UserError naming `flag` for anything else."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (count is not None and len(values) != count):
        number = f"{count} " if count else ""
        raise UserError(f"{flag}={text!r}: expected {number}comma-separated positive integers like {example}")
    return values


def _check_flags(args: argparse.Namespace) -> None:
    """Checks numeric flags before anything is imported or read; a UserError names the flag."""
    if args.command == "bench" and args.what == "train":
        for flag in ("batch_size", "steps", "num_microbatches"):
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
        if args.batch_size % args.num_microbatches:
            raise UserError(f"--num_microbatches={args.num_microbatches} does not divide --batch_size={args.batch_size}")
        _positive_ints("--lengths", args.lengths, "1024,256", count=2)
        if args.layers:
            _positive_ints("--layers", args.layers, "2,24")
        if args.devices is not None:
            errors.require("--devices", args.devices, errors.POSITIVE_INT)
        if args.compile_only and (args.compare_hf or args.profile_dir):
            raise UserError("--compile_only runs no step: it takes neither --compare_hf nor --profile_dir")
    elif args.command == "bench" and args.what == "data":
        _positive_ints("--lengths", args.lengths, "1024,256", count=2)
    elif args.command == "bench" and args.what == "collection":
        if not args.dir:
            raise UserError("bench collection: --dir is required (an export, or where to make one with --generate_gb)")
        errors.require("--generate_gb", args.generate_gb, errors.Check("a number >= 0", lambda v: v >= 0))
    elif args.command == "eval":
        for flag in ("batch_size", "input_length", "target_length"):
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
        if args.limit is not None:
            errors.require("--limit", args.limit, errors.POSITIVE_INT)
        if args.compare and len(args.compare) < 2:
            raise UserError("--compare takes two or more results files")
    elif args.command == "infer":
        for flag in ("batch_size", "max_decode_length", "max_input_length"):
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
    elif args.command == "data" and args.data_command == "show" and args.n is not None:
        errors.require("-n", args.n, errors.POSITIVE_INT)
    elif args.command == "data" and args.data_command == "stats":
        for flag in ("num_examples", "inputs_length", "targets_length"):
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
        if args.fill is not None:
            errors.require("--fill", args.fill, errors.Check("a number in (0, 1]", lambda v: 0 < v <= 1))
        errors.require("--max_truncated", args.max_truncated, errors.FRACTION)


def _message(error: UserError) -> str:
    """The error's message alone: gin appends "\n  In call to configurable 'X' (...)" to
    exceptions raised while it builds a configurable (e.g. by a config's __post_init__)."""
    return str(error).split("\n  In call to configurable ", 1)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flan-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="finetune on a SeqIO mixture (gin-configured)")
    checkpoint_help = "a flan-jax run or step directory, a HF model directory or a T5X checkpoint_<step>/"
    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out suites, or on EvalConfig's tasks")
    p.add_argument("--checkpoint", "--model_dir", help=checkpoint_help + " (default: TrainConfig.model_dir)")
    p.add_argument("--step", type=int, help="checkpoint step (default: best, else latest)")
    p.add_argument("--vocab", help="spiece.model, for checkpoints that carry none")
    p.add_argument("--suite", help="comma-separated suites: bbh_direct, bbh_cot, mmlu_direct, mmlu_cot, gsm8k_cot")
    p.add_argument("--limit", type=int, help="suite: the first N examples of each task (default: all)")
    p.add_argument("--method", choices=["generate", "rank"],
                   help="rank: rank classification of the options where examples have them (default: generate)")
    p.add_argument("--batch_size", type=int, default=32, help="suite: rows per batch")
    p.add_argument("--input_length", type=int, default=2048, help="suite: prompt tokens (EOS included)")
    p.add_argument("--target_length", type=int, default=256, help="suite: most tokens decoded or scored")
    p.add_argument("--output", help="suite: results JSON (default eval_results/<checkpoint>-step<N>.json)")
    p.add_argument("--tb_dir", help="suite: TensorBoard directory (default: next to --output)")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print results files side by side")
    p = sub.add_parser("infer", help="answer prompts with a trained model")
    p.add_argument("--checkpoint", "--model_dir", required=True, help=checkpoint_help)
    p.add_argument("--step", type=int, help="checkpoint step (default: best, else latest)")
    p.add_argument("--vocab", help="spiece.model, for checkpoints that carry none")
    p.add_argument("--decode", choices=["greedy", "beam", "sample"], default="greedy")
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6, help="beam length penalty (T5X); 0 for none")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_decode_length", type=int, default=128)
    p.add_argument("--max_input_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32, help="prompts per batch (grouped by length)")
    p.add_argument("--input_file", help="prompts from a file: .jsonl (objects with \"inputs\") or text, one per line")
    p.add_argument("--output", help="write JSON Lines (each input record plus \"prediction\") here instead of printing")
    p.add_argument("prompts", nargs="*", help="prompts; read one per line from stdin if none")
    p = sub.add_parser("convert", help="convert a checkpoint between formats")
    p.add_argument("src", help=checkpoint_help)
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--to", choices=["flan-jax", "hf"], default="flan-jax")
    p.add_argument("--step", type=int, help="step of a flan-jax run (default: best, else latest)")
    p.add_argument("--vocab", help="spiece.model to bundle, for sources that carry none")
    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("what", choices=["decode", "data", "train", "collection"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32, help="train: global batch")
    p.add_argument("--lengths", default="1024,256", help="train, data: inputs,targets lengths")
    p.add_argument("--steps", type=int, default=10, help="train: timed steps")
    p.add_argument("--num_microbatches", type=int, default=1, help="train: gradient accumulation")
    p.add_argument("--layers", help="train: comma-separated depths (encoder = decoder) to benchmark in turn, e.g. 2,24")
    p.add_argument("--compare_hf", action="store_true", help="train: also time transformers' T5 step")
    p.add_argument("--json_out", help="train: also write the figures to this JSON file")
    p.add_argument("--profile_dir", help="train: trace 3 steps there and print time per model part")
    p.add_argument("--compile_only", action="store_true",
                   help="train: compile on parameter shapes alone (nothing allocated) and print what one device holds")
    p.add_argument("--devices", type=int, help="train: run on this many fake CPU devices (e.g. with --compile_only, "
                                               "to plan a mesh this machine lacks)")
    p.add_argument("--no_hf", action="store_true", help="decode: skip the transformers comparison")
    p.add_argument("--mixture", help="data: task or mixture (default: flan_cot if registered, else builtin_train)")
    p.add_argument("--packer", help="data: best_fit, seqio, or both comma-separated to compare them "
                                    "(default: get_train_dataset.packer)")
    p.add_argument("--dir", help="collection: a Flan Collection export (made there first with --generate_gb)")
    p.add_argument("--generate_gb", type=float, default=0.0,
                   help="collection: write a made-up export of this many GB to --dir if it does not exist")
    p.add_argument("--format", choices=["jsonl", "jsonl.gz", "parquet"], default="jsonl",
                   help="collection: the made-up export's file format")
    p = sub.add_parser("data", help="inspect registered tasks and mixtures")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    data_sub.add_parser("list", help="mixtures, task families and their variants")
    q = data_sub.add_parser("show", help="print rendered examples")
    q.add_argument("name", metavar="TASK_MIXTURE_OR_FAMILY")
    q.add_argument("--variant", help="only tasks of this variant, e.g. fs_cot")
    q.add_argument("-n", type=int, help="number of examples (default 3; of a task family: 1 per variant)")
    q.add_argument("--split", default="train")
    q = data_sub.add_parser("stats", help="shares, token lengths, truncation, packing fill rate")
    q.add_argument("name", metavar="TASK_OR_MIXTURE")
    q.add_argument("--split", default="train")
    q.add_argument("--num_examples", type=int, default=2000)
    q.add_argument("--inputs_length", type=int, default=1024)
    q.add_argument("--targets_length", type=int, default=256)
    q.add_argument("--fill", type=float, help="also suggest lengths at which best-fit packing fills this share "
                                              "of the rows' positions (inputs and targets together), e.g. 0.9")
    q.add_argument("--max_truncated", type=float, default=0.01,
                   help="with --fill: most share of examples a suggested length may cut (default 0.01)")
    return parser


def _fake_cpu_devices(count: int) -> None:
    """`bench train --devices=N`: N CPU devices (before JAX starts), to compile for a mesh this machine lacks."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX GPU/TPU plugin is installed (checked without starting a backend)."""
    from importlib import metadata, util

    return bool(metadata.entry_points(group="jax_plugins")) or util.find_spec("libtpu") is not None


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_environment() -> dict[str, str] | None:
    """The environment under which glibc backs large allocations with huge pages, or None.

    XLA's CPU runtime allocates each step's temporaries (2 GB for the d256
    4+4-layer benchmark model) afresh; glibc maps such blocks with new pages
    and unmaps them when freed, so every step faults its working set in again,
    4 KiB at a time: 540k page faults and a second of system time per step
    there, a sixth of the step. With the tunable glibc.malloc.hugetlb=1
    (glibc 2.35+) those blocks ask for transparent huge pages, 512x fewer
    faults. Tunables are read at process start, so `run` re-executes itself
    with it. None when it is set already, where the platform lacks it (not
    glibc 2.35+, huge pages off), where a GPU/TPU plugin is installed (its
    host allocations differ, unmeasured) or with FLAN_JAX_HUGE_PAGES=0.
    """
    import platform

    if os.environ.get("FLAN_JAX_HUGE_PAGES", "1") == "0" or HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return None
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] != "cpu" or _accelerator_plugin_installed():
        return None
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE)))
    return {**os.environ, "GLIBC_TUNABLES": tunables}


def run() -> None:
    """The `flan-jax` console script (and `python -m flan_jax.cli`): on CPU
    hosts, re-executes itself once under `huge_page_environment`, then `main`."""
    environment = huge_page_environment()
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environment)
    main()


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    files, bindings, rest = _split_gin_args(argv)
    args = build_parser().parse_args(rest)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "infer": _cmd_infer, "convert": _cmd_convert, "bench": _cmd_bench, "data": _cmd_data}
    try:
        _check_flags(args)
        _init_distributed()
        with_data = not (args.command == "bench" and args.what == "train")
        if not with_data:
            # Allocate on demand: the peak-memory figure is then the step's own, and
            # --compare_hf's torch can use the memory JAX does not.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            if args.devices:
                _fake_cpu_devices(args.devices)
        if with_data:
            _quiet_backends()
        parse_gin(files, bindings, with_data=with_data)
        if with_data and not (args.command == "eval" and args.suite):  # `eval --suite` uses the model's vocabulary.
            import tasks

            tasks.register()  # Once, after gin: its bindings (vocabulary, data directory) shape the tasks.
        commands[args.command](args)
    except UserError as e:
        raise SystemExit(f"flan-jax: error: {_message(e)}") from None


if __name__ == "__main__":
    run()

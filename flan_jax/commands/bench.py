"""`flan-jax bench decode | data | train | collection | kernels | attention_check`: benchmarks that print figures, each with its own flags."""

from __future__ import annotations

import argparse
import dataclasses
import os

from flan_jax import errors
from flan_jax.commands import catalog, gin_flags, process
from flan_jax.errors import UserError

LENGTHS_HELP = "inputs,targets lengths"
# bench train's shape where neither its flags nor gin's TrainConfig bindings give one.
TRAIN_DEFAULTS = {"batch_size": 32, "task_feature_lengths": {"inputs": 1024, "targets": 256}, "num_microbatches": 1}
# bench kernels' shapes (flan_jax/bench/kernels.py MODELS), named here so that --help imports no JAX.
KERNEL_MODELS = ("base", "large")
# bench attention_check's kernels and shape sets (flan_jax/bench/attention_check.py), likewise.
CHECK_KERNELS = ("pallas", "cudnn")
CHECK_SHAPES = ("model", "tiny")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that print figures")
    benchmarks = parser.add_subparsers(dest="what", required=True)

    decode = benchmarks.add_parser("decode", help="cached decoding steps (and transformers' for comparison)")
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--no_hf", action="store_true", help="skip the transformers comparison")
    decode.add_argument("--batch_size", type=int, default=8)
    decode.add_argument("--input_length", type=int, default=64)
    decode.add_argument("--new_tokens", type=int, default=64)
    decode.add_argument("--scan_layers", action="store_true", help="layers under nn.scan (the big-model layout)")
    decode.add_argument("--dtype", help="activation dtype, e.g. bfloat16 (default: the model's)")
    decode.set_defaults(run=run_decode, check=check_decode)

    data = benchmarks.add_parser("data", help="the input pipeline: examples/s, tokens/s, fill rates")
    data.add_argument("--repeats", type=int, default=5)
    data.add_argument("--lengths", default="1024,256", help=LENGTHS_HELP)
    data.add_argument("--mixture", help="task or mixture (default: flan_cot if registered, else builtin_train)")
    data.add_argument("--packer", help="best_fit, seqio, or both comma-separated to compare them "
                                       "(default: get_train_dataset.packer)")
    data.set_defaults(check=check_data, run=run_data)

    train = benchmarks.add_parser("train", help="train steps: time, tokens/s, MFU, memory (gin-configured model)")
    train.add_argument("--batch_size", type=int, help="global batch (default: TrainConfig.batch_size as gin binds "
                                                      f"it, e.g. in a run file, else {TRAIN_DEFAULTS['batch_size']})")
    train.add_argument("--lengths", help=LENGTHS_HELP + " (default: TrainConfig.task_feature_lengths as gin binds "
                                                        "them, else 1024,256)")
    train.add_argument("--steps", type=int, default=10, help="timed steps")
    train.add_argument("--num_microbatches", type=int, help="gradient accumulation (default: "
                                                            "TrainConfig.num_microbatches as gin binds it, else 1)")
    train.add_argument("--layers", help="comma-separated depths (encoder = decoder) to benchmark in turn, e.g. 2,24")
    train.add_argument("--compare_hf", action="store_true", help="also time transformers' T5 step")
    train.add_argument("--json_out", help="also write the figures to this JSON file")
    train.add_argument("--profile_dir", help="trace 3 steps there and print time per model part")
    train.add_argument("--compile_only", action="store_true",
                       help="compile on parameter shapes alone (nothing allocated) and print what one device holds")
    train.add_argument("--peft_compare", action="store_true",
                       help="with adapters (e.g. --gin_file=peft/lora.gin): time them against full finetuning of "
                            "the base in one process; step time, memory, optimizer state and checkpoint bytes")
    train.add_argument("--devices", type=int, help="run on this many fake CPU devices (e.g. with --compile_only, "
                                                   "to plan a mesh this machine lacks)")
    train.set_defaults(check=check_train, run=run_train)

    collection = benchmarks.add_parser("collection", help="stream a Flan Collection export: rows/s, MB/s, memory")
    collection.add_argument("--dir", help="a Flan Collection export (made there first with --generate_gb)")
    collection.add_argument("--generate_gb", type=float, default=0.0,
                            help="write a made-up export of this many GB to --dir if it does not exist")
    collection.add_argument("--format", choices=["jsonl", "jsonl.gz", "parquet"], default="jsonl",
                            help="the made-up export's file format")
    collection.set_defaults(check=check_collection, run=run_collection)

    kernels = benchmarks.add_parser("kernels", help="the Pallas attention kernels as Triton compiles them for sm_90a "
                                                    "(no GPU; needs `pip install triton`): PTX, barriers, spills")
    kernels.add_argument("--models", default="base", help=f"comma-separated, of {', '.join(KERNEL_MODELS)}")
    kernels.add_argument("--lengths", default="1024,256", help=LENGTHS_HELP)
    kernels.set_defaults(check=check_kernels, run=run_kernels)

    check = benchmarks.add_parser(
        "attention_check", help="an attention kernel's output and gradients (dq, dk, dv, bias table) against the "
                                "einsum reference at the gin-configured model's shapes; exits 1 if they differ")
    check.add_argument("--kernel", choices=CHECK_KERNELS,
                       help="the kernel to check (default: T5Config.attention_kernel as gin binds it)")
    check.add_argument("--batch_size", type=int, default=TRAIN_DEFAULTS["batch_size"], help="rows (default %(default)s)")
    check.add_argument("--lengths", default="1024,256", help=LENGTHS_HELP)
    check.add_argument("--shapes", choices=CHECK_SHAPES, default="model",
                       help="tiny: small shapes for a CPU, where Pallas runs in its (slow) interpreter")
    check.add_argument("--json_out", help="also write the result to this JSON file")
    check.set_defaults(check=check_attention_check, run=run_attention_check)


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


def _lengths(args: argparse.Namespace) -> dict[str, int]:
    inputs, targets = _positive_ints("--lengths", args.lengths, "1024,256", count=2)
    return {"inputs": inputs, "targets": targets}


def _train_shape(args: argparse.Namespace) -> tuple[int, dict[str, int], int]:
    """(batch size, lengths, microbatches) of `bench train`: each from its flag, else from
    TrainConfig as gin binds it (a run file such as runs/flan_t5_xxl.gin), else TRAIN_DEFAULTS."""
    import gin

    from flan_jax import train_config  # noqa: F401  (registers TrainConfig, whose bindings are read)

    bound = {**TRAIN_DEFAULTS, **gin.get_bindings("TrainConfig")}
    batch_size = args.batch_size or bound["batch_size"]
    lengths = _lengths(args) if args.lengths else dict(bound["task_feature_lengths"])
    num_microbatches = args.num_microbatches or bound["num_microbatches"]
    for key, value, check in (("batch_size", batch_size, errors.POSITIVE_INT),
                              ("task_feature_lengths", lengths, errors.FEATURE_LENGTHS),
                              ("num_microbatches", num_microbatches, errors.POSITIVE_INT)):
        errors.require(f"TrainConfig.{key}", value, check)
    if batch_size % num_microbatches:
        raise UserError(f"num_microbatches={num_microbatches} does not divide batch_size={batch_size}")
    return batch_size, lengths, num_microbatches


def _start_with_data(gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)


def check_decode(args: argparse.Namespace) -> None:
    for flag in ("repeats", "batch_size", "input_length", "new_tokens"):
        errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)


def run_decode(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _start_with_data(gin)
    from flan_jax.bench import decode
    from flan_jax.model import T5Config

    config = T5Config() if gin.files else decode.DECODE_CONFIG  # e.g. --gin_file=models/t5_1_1_small.gin
    if args.scan_layers:
        config = dataclasses.replace(config, scan_layers=True)
    if args.dtype:
        config = dataclasses.replace(config, dtype=args.dtype)
    decode.bench_decode(config, batch_size=args.batch_size, input_length=args.input_length,
                        new_tokens=args.new_tokens, repeats=args.repeats, compare_hf=not args.no_hf)


def check_data(args: argparse.Namespace) -> None:
    _lengths(args)


def run_data(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _start_with_data(gin)
    catalog.load_tasks()
    from flan_jax import data
    from flan_jax.bench import data as bench_data

    packers = [data.check_packer(p, "--packer") for p in args.packer.split(",")] if args.packer else [None]
    for i, packer in enumerate(packers):  # One after the other, to compare them in the same run.
        if i:
            print()
        bench_data.bench_data(args.mixture, _lengths(args), repeats=args.repeats, packer=packer)


def check_train(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "steps", "num_microbatches"):
        if getattr(args, flag) is not None:
            errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)
    if args.lengths is not None:
        _lengths(args)
    if args.layers:
        _positive_ints("--layers", args.layers, "2,24")
    if args.devices is not None:
        errors.require("--devices", args.devices, errors.POSITIVE_INT)
    if args.compile_only and (args.compare_hf or args.profile_dir):
        raise UserError("--compile_only runs no step: it takes neither --compare_hf nor --profile_dir")
    if args.peft_compare and (args.compile_only or args.compare_hf or args.profile_dir or args.layers):
        raise UserError("--peft_compare takes none of --compile_only, --compare_hf, --profile_dir, --layers")


def run_train(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    """Without the data stack: TensorFlow, SeqIO, t5 and tasks/ are never imported."""
    # Allocate on demand: the peak-memory figure is then the step's own, and
    # --compare_hf's torch can use the memory JAX does not.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.devices:
        process.fake_cpu_devices(args.devices)
    gin_flags.parse(gin, with_data=False)
    from flan_jax.bench import peft as bench_peft
    from flan_jax.bench import plan as bench_plan
    from flan_jax.bench import train as bench_train
    from flan_jax.model import T5Config

    batch_size, lengths, num_microbatches = _train_shape(args)
    if args.peft_compare:
        bench_peft.bench_peft(T5Config(), batch_size=batch_size, lengths=lengths, steps=args.steps,
                              num_microbatches=num_microbatches, json_out=args.json_out)
        return
    layers = _positive_ints("--layers", args.layers, "2,24") if args.layers else []
    if args.compile_only:
        bench_plan.bench_plan(T5Config(), batch_size=batch_size, lengths=lengths,
                              num_microbatches=num_microbatches, layers=layers, json_out=args.json_out)
        return
    bench_train.bench_train(
        batch_size=batch_size, lengths=lengths, steps=args.steps, num_microbatches=num_microbatches,
        layers=layers, compare_hf=args.compare_hf, json_out=args.json_out, profile_dir=args.profile_dir,
    )


def check_collection(args: argparse.Namespace) -> None:
    if not args.dir:
        raise UserError("bench collection: --dir is required (an export, or where to make one with --generate_gb)")
    errors.require("--generate_gb", args.generate_gb, errors.Check("a number >= 0", lambda v: v >= 0))


def run_collection(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    _start_with_data(gin)
    from tasks import collection_bench

    collection_bench.bench_collection(args.dir, generate_gb=args.generate_gb, file_format=args.format)


def _kernel_models(args: argparse.Namespace) -> list[str]:
    models = args.models.split(",")
    unknown = [m for m in models if m not in KERNEL_MODELS]
    if unknown:
        raise UserError(f"--models={args.models!r}: expected comma-separated names of {', '.join(KERNEL_MODELS)}")
    return models


def check_kernels(args: argparse.Namespace) -> None:
    _kernel_models(args)
    _lengths(args)


def run_kernels(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    """JAX alone (lowering for CUDA from any host), then Triton's compiler; no data stack."""
    del gin
    from flan_jax.bench import kernels

    kernels.bench_kernels(_kernel_models(args), _lengths(args))


def check_attention_check(args: argparse.Namespace) -> None:
    errors.require("--batch_size", args.batch_size, errors.POSITIVE_INT)
    _lengths(args)


def run_attention_check(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    """JAX and the model alone, no data stack; exits 1 when the gradients differ."""
    gin_flags.parse(gin, with_data=False)
    from flan_jax.bench import attention_check
    from flan_jax.model import T5Config

    config = T5Config()
    kernel = args.kernel or config.attention_kernel
    if kernel not in CHECK_KERNELS:
        raise UserError(f"bench attention_check: kernel {kernel!r} is the reference itself; "
                        f"pass --kernel (one of {', '.join(CHECK_KERNELS)}) or bind T5Config.attention_kernel")
    shapes = (attention_check.TINY if args.shapes == "tiny"
              else attention_check.model_shapes(config, args.batch_size, _lengths(args)))
    if not attention_check.bench_attention_check(kernel, shapes, args.json_out):
        raise SystemExit(1)

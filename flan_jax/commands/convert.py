"""`flan-jax convert SRC DST [--to=flan-jax|hf]`: a checkpoint of any format to flan-jax's or HF's."""

from __future__ import annotations

import argparse
import os

from flan_jax.commands import CHECKPOINT_HELP, gin_flags, process


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint between formats")
    parser.add_argument("src", help=CHECKPOINT_HELP)
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument("--to", choices=["flan-jax", "hf"], default="flan-jax")
    parser.add_argument("--step", type=int, help="step of a flan-jax run (default: best, else latest)")
    parser.add_argument("--vocab", help="spiece.model to bundle, for sources that carry none")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
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

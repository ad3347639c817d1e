"""`flan-jax convert SRC DST [--to=flan-jax|hf|hf_peft] [--base=PATH]`: a checkpoint of any format to
flan-jax's or HF's, LoRA adapters merged into the kernels; or its adapters alone as a HF PEFT directory.
A HF PEFT adapter directory as SRC is read onto its base checkpoint, `--base`."""

from __future__ import annotations

import argparse

from flan_jax import conversion
from flan_jax.commands import CHECKPOINT_HELP, gin_flags, process


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint between formats")
    parser.add_argument("src", help=f"{CHECKPOINT_HELP}, or a HF PEFT LoRA adapter directory (with --base)")
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--to", choices=conversion.TARGETS, default="flan-jax",
        help="flan-jax, hf: the whole model, with any LoRA adapters merged into its kernels; "
        "hf_peft: the LoRA adapters alone, as a HF PEFT adapter directory",
    )
    parser.add_argument(
        "--base",
        help="the base model of the adapters: with a PEFT adapter directory as SRC, the checkpoint (any format) "
        "they apply to; with --to=hf_peft, the base_model_name_or_path written (e.g. google/flan-t5-xl)",
    )
    parser.add_argument("--step", type=int, help="step of a flan-jax run (default: best, else latest)")
    parser.add_argument("--vocab", help="spiece.model to bundle, for sources that carry none")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    done = conversion.convert(args.src, args.dst, to=args.to, base=args.base, step=args.step, vocab=args.vocab)
    if args.to == "hf_peft":
        print(f"{args.src} ({done.source_format}, step {done.step}) -> {args.dst} "
              f"(hf_peft, LoRA rank {done.lora_rank})")
        return
    merged = f", LoRA rank {done.lora_rank} merged" if done.lora_rank else ""
    print(f"{args.src} ({done.source_format}, step {done.step}{merged}) -> {args.dst} ({args.to})")
    if not done.vocab_file:
        print("note: no vocabulary was found or given (--vocab); the result carries none")

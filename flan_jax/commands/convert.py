"""`flan-jax convert SRC DST [--to=flan-jax|hf|hf_peft] [--base=PATH]`: a checkpoint of any format to
flan-jax's or HF's, LoRA adapters merged into the kernels; or its adapters alone as a HF PEFT directory.
A HF PEFT adapter directory as SRC is read onto its base checkpoint, `--base`."""

from __future__ import annotations

import argparse
import os

from flan_jax.commands import CHECKPOINT_HELP, gin_flags, process
from flan_jax.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint between formats")
    parser.add_argument("src", help=f"{CHECKPOINT_HELP}, or a HF PEFT LoRA adapter directory (with --base)")
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--to", choices=["flan-jax", "hf", "hf_peft"], default="flan-jax",
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
    import jax

    from flan_jax import formats, peft
    from flan_jax.formats import hf, hf_peft

    adapter_src = formats.detect_format(args.src) == "hf_peft"
    if args.base and not adapter_src and args.to != "hf_peft":
        raise UserError(f"--base: {args.src} is no PEFT adapter directory and --to is not hf_peft; it has no use here")
    # float32: adapters merge into the base at full precision, whatever dtype training held it in.
    loaded = formats.load_checkpoint(args.src, step=args.step, base=args.base if adapter_src else None, dtype="float32")
    vocab_file = args.vocab or formats.vocab_file_of(loaded)
    if args.to == "hf_peft":
        hf_peft.save_hf_peft(args.dst, loaded.config, jax.device_get(loaded.params), args.base)
        rank = loaded.config.lora.rank
        print(f"{args.src} ({loaded.format}, step {loaded.step}) -> {args.dst} (hf_peft, LoRA rank {rank})")
        return
    # The full formats hold a plain model: fold the adapters into the kernels.
    config, params = peft.merge_lora(loaded.config, loaded.params)
    if args.to == "hf":
        if os.path.exists(args.dst) and os.listdir(args.dst):
            raise SystemExit(f"flan-jax: error: {args.dst} exists and is not empty; refusing to overwrite it")
        if config.prompt_length:
            raise UserError(f"{args.src}: its {config.prompt_length} prompt vectors have no place in a HF T5 model")
        hf.save_hf_directory(args.dst, jax.device_get(params), config, vocab_file)
    else:
        formats.save_flan_jax(args.dst, config, params, vocab_file, loaded.step)
    merged = f", LoRA rank {loaded.config.lora.rank} merged" if loaded.config.lora else ""
    print(f"{args.src} ({loaded.format}, step {loaded.step}{merged}) -> {args.dst} ({args.to})")
    if not vocab_file:
        print("note: no vocabulary was found or given (--vocab); the result carries none")

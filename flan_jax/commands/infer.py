"""`flan-jax infer --checkpoint=PATH [PROMPT ...]`: answer prompts (arguments, stdin or a file) with a model."""

from __future__ import annotations

import argparse
import os
import sys

from flan_jax import errors
from flan_jax.commands import BASE_HELP, CHECKPOINT_HELP, gin_flags, process
from flan_jax.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="answer prompts with a trained model")
    parser.add_argument("--checkpoint", "--model_dir", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--step", type=int, help="checkpoint step (default: best, else latest)")
    parser.add_argument("--base", help=BASE_HELP)
    parser.add_argument("--vocab", help="spiece.model, for checkpoints that carry none")
    parser.add_argument("--decode", choices=["greedy", "beam", "sample"], default="greedy")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6, help="beam length penalty (T5X); 0 for none")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_decode_length", type=int, default=128)
    parser.add_argument("--max_input_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per batch (grouped by length)")
    parser.add_argument("--input_file",
                        help="prompts from a file: .jsonl (objects with \"inputs\") or text, one per line")
    parser.add_argument("--output",
                        help="write JSON Lines (each input record plus \"prediction\") here instead of printing")
    parser.add_argument("prompts", nargs="*", help="prompts; read one per line from stdin if none")
    parser.set_defaults(check=check, run=run)


def check(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_decode_length", "max_input_length"):
        errors.require(f"--{flag}", getattr(args, flag), errors.POSITIVE_INT)


def _read_prompts(args: argparse.Namespace) -> list[dict]:
    """[{"inputs": prompt, ...}] from --input_file, the arguments or stdin."""
    from flan_jax import inference

    if args.input_file:
        if args.prompts:
            raise UserError("give prompts as arguments or in --input_file, not both")
        return inference.read_prompts(args.input_file)
    lines = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return [{"inputs": line} for line in lines]


def _decode_options(args: argparse.Namespace) -> dict:
    if args.decode == "beam":
        return {"num_beams": args.num_beams, "alpha": args.alpha}
    if args.decode == "sample":
        return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    return {}


def run(args: argparse.Namespace, gin: gin_flags.GinFlags) -> None:
    process.quiet_backends()
    gin_flags.parse(gin)
    import tqdm

    from flan_jax import inference

    records = _read_prompts(args)
    if not records:
        raise SystemExit("flan-jax: error: no prompt given (pass it as an argument, on stdin or with --input_file)")
    if args.output and os.path.exists(args.output):
        raise UserError(f"{args.output} exists; refusing to overwrite it")
    model = inference.load_model(args.checkpoint, step=args.step, vocab_path=args.vocab, base=args.base)
    with tqdm.tqdm(total=len(records), unit="prompt", desc=f"{args.decode} decoding", dynamic_ncols=True,
                   disable=len(records) <= args.batch_size) as bar:
        answers = inference.generate(
            model, [r["inputs"] for r in records], method=args.decode, max_decode_length=args.max_decode_length,
            max_input_length=args.max_input_length, batch_size=args.batch_size, seed=args.seed, progress=bar.update,
            **_decode_options(args),
        )
    if args.output:
        inference.write_predictions(args.output, records, answers)
        print(f"{len(answers)} predictions -> {args.output}")
        return
    for record, answer in zip(records, answers):
        print(f"> {record['inputs']}\n{answer}\n")

"""The `flan-jax` command: parses T5X-style gin flags and runs one subcommand.

  flan-jax train --gin_file=runs/smoke.gin [--gin_file=...] [--gin.KEY=VALUE ...]
  flan-jax eval  --gin_file=runs/smoke.gin [--step=N]                  (EvalConfig's tasks)
  flan-jax eval  --checkpoint=PATH --suite=bbh_direct,bbh_cot,mmlu_direct,mmlu_cot,gsm8k_cot
                 [--limit=N --method=generate|rank --output=FILE --batch_size=32]
  flan-jax eval  --compare A.json B.json [...]
  flan-jax infer --checkpoint=PATH [--decode=greedy|beam|sample] [PROMPT ...]   (stdin if none)
                 [--input_file=prompts.jsonl --output=predictions.jsonl --batch_size=32]
  flan-jax convert SRC DST [--to=flan-jax|hf|hf_peft] [--base=PATH]   (PATH: the base of a PEFT adapter SRC)
  flan-jax bench decode|data
  flan-jax bench collection --dir=DIR [--generate_gb=2 --format=jsonl]
  flan-jax bench train --gin_file=models/flan_t5_base.gin [--batch_size=32 --lengths=1024,256 --compare_hf]
                       [--compile_only --devices=8]   (plan: compile on shapes alone, per-device memory)
  flan-jax bench attention_check --gin_file=models/flan_t5_base.gin --kernel=pallas|cudnn [--shapes=tiny]
  flan-jax bench kernels [--models=base,large --lengths=1024,256]   (Pallas kernels to PTX; needs triton, no GPU)
  flan-jax data list | show TASK_MIXTURE_OR_FAMILY [--variant=fs_cot] [-n 3] | stats TASK_OR_MIXTURE

`--gin_file` is searched relative to the working directory, then the gin
configs shipped with the package (the checkout's `gin/` when run from source).
`--gin.KEY=VALUE` adds the binding `KEY = VALUE`.

Each command lives in flan_jax/commands/ (its flags, their checks, its body);
this module builds the parser from them and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flan_jax import xla_presets
from flan_jax.commands import bench, convert, data, gin_flags, infer, process, train
from flan_jax.commands import eval as eval_command
from flan_jax.errors import UserError

COMMANDS = (train, eval_command, infer, convert, bench, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flan-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _message(error: UserError) -> str:
    """The error's message alone: gin appends "\n  In call to configurable 'X' (...)" to
    exceptions raised while it builds a configurable (e.g. by a config's __post_init__)."""
    return str(error).split("\n  In call to configurable ", 1)[0]


def run() -> None:
    """The `flan-jax` console script (and `python -m flan_jax.cli`): on CPU
    hosts, re-executes itself once under `process.huge_page_environment`, then
    `main`, and exits without a last collection (`process.exit_without_collecting`)."""
    # --help and malformed flags are answered here: the re-execution would double their start-up.
    build_parser().parse_args(gin_flags.split_args(sys.argv[1:])[1])
    process.reexec_with_huge_pages()
    process.exit_without_collecting()
    main()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command of `argv` (default: sys.argv[1:]); a UserError ends the program with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    gin, rest = gin_flags.split_args(argv)
    args = build_parser().parse_args(rest)
    try:
        if check := getattr(args, "check", None):  # Flags are checked before anything heavy is imported.
            check(args)
        xla_presets.apply_from_env()  # FLAN_JAX_XLA_PRESET: XLA reads its flags when JAX starts.
        process.init_distributed()
        args.run(args, gin)
    except UserError as e:
        raise SystemExit(f"flan-jax: error: {_message(e)}") from None


if __name__ == "__main__":
    run()

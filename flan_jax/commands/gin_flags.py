"""T5X-style gin flags, shared by every command: `--gin_file=F` (repeatable) and `--gin.KEY=VALUE`.

`--gin_file` is searched relative to the working directory, then the gin
configs shipped with the package (the checkout's `gin/` when run from source).
`--gin.KEY=VALUE` adds the binding `KEY = VALUE`.
A LoraConfig bound without `T5Config.lora` is an error (`_check_lora_enabled`),
not a silent full finetune.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from flan_jax.config_files import candidate_dirs, gin_config_dir
from flan_jax.errors import UserError

# flan_jax/gin_configs when installed, the checkout's gin/ from source; None if neither exists.
GIN_DIR = gin_config_dir()


# What the data stack registers (flan_jax's data, evaluation and checkpointing,
# tasks/): a run file binds them, and `parse(with_data=False)` passes over them.
DATA_CONFIGURABLES = ("get_train_dataset", "EvalConfig", "CheckpointConfig", "train", "get_default_vocabulary",
                      "data_dir", "flan_cot_location")


class GinFlags(NamedTuple):
    files: list[str]
    bindings: list[str]


def split_args(argv: Sequence[str]) -> tuple[GinFlags, list[str]]:
    """Pulls --gin_file=F and --gin.K=V out of argv; returns them and the other arguments."""
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
    return GinFlags(files, bindings), rest


def resolve_file(name: str) -> str:
    """The gin file `name` in the working directory, else among the shipped configs; else the program ends."""
    for candidate in (Path(name), *([GIN_DIR / name] if GIN_DIR else [])):
        if candidate.is_file():
            return str(candidate)
    where = str(GIN_DIR) if GIN_DIR else ", ".join(map(str, candidate_dirs())) + ": none of them holds gin configs"
    raise SystemExit(f"flan-jax: error: gin file {name!r} not found (looked in . and {where})")


class _GinProbeFilter(logging.Filter):
    """gin logs an error for every search-path prefix an include is not under; that is normal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found:")


def parse(flags: GinFlags, *, with_data: bool = True) -> None:
    """Parses gin files and bindings; a bad one is a UserError with gin's message and where.

    `with_data=False` registers only the model, optimizer, partitioning and
    TrainConfig configurables (what `bench train` needs), so TensorFlow, SeqIO
    and t5 are never imported; the bindings of DATA_CONFIGURABLES (a run file's
    evaluation, checkpointing, vocabulary) are passed over. Tasks are
    registered afterwards (`catalog.load_tasks`), so
    that bindings which shape them (vocabulary, data directory) take effect.
    Without files or bindings nothing is imported (a command that needs no
    configurable then starts faster).
    """
    if not flags.files and not flags.bindings:
        return
    import gin

    logging.getLogger().addFilter(_GinProbeFilter())

    if with_data:
        import tasks

        tasks.import_modules()  # Their configurables (vocabulary, data directories); registers nothing.
        from flan_jax import trainer  # noqa: F401  (registers the configurables)
    else:
        from flan_jax import train_config  # noqa: F401  (registers TrainConfig)
        from flan_jax.bench import train  # noqa: F401  (registers the model, optimizer and partitioner)

    if GIN_DIR:
        gin.add_config_file_search_path(str(GIN_DIR))
    try:
        gin.parse_config_files_and_bindings([resolve_file(f) for f in flags.files], flags.bindings,
                                            finalize_config=False,
                                            skip_unknown=False if with_data else list(DATA_CONFIGURABLES))
    except SystemExit:
        raise
    except Exception as e:  # gin raises several types; all are user errors here.
        # gin's message, then where: "  In bindings string line 2", the line, "    ^".
        message, *where = [line.strip() for line in str(e).splitlines() if line.strip().strip("^")] or [repr(e)]
        raise UserError(f"bad gin config: {message}" + (f" ({': '.join(where)})" if where else "")) from None
    _check_lora_enabled()


def _check_lora_enabled() -> None:
    """A UserError when LoraConfig is bound but T5Config.lora is not: the model would have no
    adapters and the run would silently train (and save) every parameter. Called once `parse`
    has registered both; `T5Config.lora = None` bound explicitly is taken as meant and passes."""
    import gin

    # Unresolved: resolving would build `@LoraConfig()` and any other reference here, not where the model is.
    lora_bindings = gin.get_bindings("LoraConfig", resolve_references=False)
    if lora_bindings and "lora" not in gin.get_bindings("T5Config", resolve_references=False):
        key = "targets" if "targets" in lora_bindings else next(iter(lora_bindings))
        raise UserError(f"LoraConfig.{key} is bound but T5Config.lora is None: add --gin_file=peft/lora.gin "
                        "or bind T5Config.lora = @LoraConfig()")

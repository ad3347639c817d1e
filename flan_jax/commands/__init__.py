"""The `flan-jax` commands, one module each (train, eval, infer, convert, data, bench).

A command module has `add_parser(subparsers)`: its flags, their checks
(`check`, run before anything heavy is imported) and its body (`run(args,
gin)`), set as the parser's defaults. Heavy imports (JAX, TensorFlow, SeqIO,
tasks/) happen inside the bodies, so building the parser and `--help` stay
cheap. Shared by the commands: `gin_flags` (gin files and bindings),
`catalog.load_tasks` (the one way tasks/ is registered; only this layer
imports tasks/) and `process` (set-up of the process itself).
"""

CHECKPOINT_HELP = ("a flan-jax run or step directory, a HF model directory, a T5X checkpoint_<step>/ "
                   "or a HF PEFT adapter directory (with --base)")
BASE_HELP = "the base model of a HF PEFT adapter directory (default: the local path its adapter_config.json records)"

"""`flan-jax --help` and every subcommand's `--help` answer without importing the heavy stacks
(TensorFlow, JAX, SeqIO, torch): commands import those in their bodies, never while the parser is built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "jax", "jaxlib", "flax", "seqio", "torch", "transformers")

# Every command path of the parser (walked, so that a new subcommand is covered), each asked for --help
# in this one process; prints {command: heavy top-level modules imported by then}.
HELP_ALL = f"""
import argparse, contextlib, io, json, sys
from flan_jax import cli

def paths(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from paths(sub, [*prefix, name])

found = {{}}
for path in paths(cli.build_parser(), []):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main([*path, "--help"])
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    assert out.getvalue().startswith("usage: flan-jax"), path
    found[" ".join(path)] = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps(found))
"""


def test_every_help_imports_no_heavy_module():
    done = subprocess.run([sys.executable, "-c", HELP_ALL], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"", "train", "eval", "infer", "convert", "bench", "bench train", "data", "data list"} <= set(found)
    assert {command: heavy for command, heavy in found.items() if heavy} == {}


def test_the_console_script_answers_help_without_re_executing(monkeypatch, capsys):
    """The huge-page re-execution (a second interpreter start-up) is only for commands that run."""
    from flan_jax import cli
    from flan_jax.commands import process

    def refuse() -> None:
        raise AssertionError("re-executed for --help")

    monkeypatch.setattr(process, "reexec_with_huge_pages", refuse)
    for argv in (["--help"], ["train", "--help"], ["bench", "train", "-h"]):
        monkeypatch.setattr(sys, "argv", ["flan-jax", *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.run()
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith("usage: flan-jax")
    monkeypatch.setattr(sys, "argv", ["flan-jax", "no_such_command"])
    with pytest.raises(SystemExit) as exit_:  # A malformed command line neither.
        cli.run()
    assert exit_.value.code == 2

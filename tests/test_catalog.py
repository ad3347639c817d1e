"""The task catalog's shape: importing it does nothing, registering happens once, no import circle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The command layer may import anything; every other module of these packages is checked.
LAYERED = ("tasks", "flan_jax")
COMMAND_LAYER = ("flan_jax.cli", "flan_jax.commands")


def _python(code: str, tmp_path: Path) -> dict:
    """Runs `code` in a fresh interpreter (cache dir under tmp_path); returns the JSON its last line prints."""
    env = {**os.environ, "FLAN_JAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_tasks_trains_nothing_and_registers_nothing(tmp_path):
    found = _python("""
import json, os
import sentencepiece

def refuse(*args, **kwargs):
    raise AssertionError("a SentencePiece model was trained")

sentencepiece.SentencePieceTrainer.train = refuse
import seqio
import tasks
from tasks import registry, seqio_tasks

print(json.dumps({
    "tasks": sorted(seqio.TaskRegistry.names()), "mixtures": sorted(seqio.MixtureRegistry.names()),
    "store": [len(registry.families()), len(registry.sources()), len(registry.text_tasks()),
              len(registry.mixtures()), len(registry.suites())],
    "registrations": seqio_tasks.registration_count(),
    "cache": sorted(os.listdir(os.environ["FLAN_JAX_CACHE_DIR"])) if os.path.isdir(os.environ["FLAN_JAX_CACHE_DIR"]) else [],
}))
""", tmp_path)
    ours = ("builtin_", "flan_cot", "flan2022", "bbh_", "mmlu", "gsm8k")
    assert [name for name in found["tasks"] + found["mixtures"] if name.startswith(ours)] == []
    assert found["store"] == [0, 0, 0, 0, 0]
    assert found["registrations"] == 0
    assert found["cache"] == []  # No vocabulary file written either.


def test_data_list_registers_the_tasks_once(tmp_path):
    found = _python("""
import functools, json
import tasks
from flan_jax import cli
from tasks import builtin, seqio_tasks

calls = []
register = builtin.register

@functools.wraps(register)
def counted():
    calls.append(1)
    register()

builtin.register = counted
cli.main(["data", "list"])
tasks.register()  # Again, as a command's code may: nothing to do.
print(json.dumps({"registrations": seqio_tasks.registration_count(), "builtin_register_calls": len(calls)}))
""", tmp_path)
    assert found == {"registrations": 1, "builtin_register_calls": 1}


def test_register_again_re_registers_the_store_only_when_asked():
    import seqio

    import tasks
    from tasks import registry, seqio_tasks

    tasks.register()
    count = seqio_tasks.registration_count()
    tasks.register()
    tasks.register(seqio_tasks.registered_vocabulary())  # The same vocabulary: nothing to do either.
    assert seqio_tasks.registration_count() == count
    registry.add_mixture("catalog_test_mixture", [("builtin_dates_zs_noopt", 1.0)])
    try:
        tasks.register(again=True)
        assert seqio_tasks.registration_count() == count + 1
        assert "catalog_test_mixture" in seqio.MixtureRegistry.names()
    finally:
        registry.remove_mixture("catalog_test_mixture")


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the layered packages, the command layer left out."""
    modules = {}
    for package in LAYERED:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            if not name.startswith(COMMAND_LAYER):
                modules[name] = path
    return modules


def _imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The known modules that `path` imports anywhere in it (in functions too: a newcomer reads those)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            # `from x import y`: the module x.y if there is one, else a name defined in x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every import circle among `modules`, each as the modules on it (Tarjan's strongly connected components)."""
    graph = {name: _imported(path, name, set(modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_circle_in_the_catalog_or_the_library():
    modules = _modules()
    assert {"tasks", "tasks.registry", "tasks.seqio_tasks", "flan_jax.trainer"} <= set(modules)
    assert import_cycles(modules) == []


def test_the_circle_check_finds_a_circle(tmp_path):
    for name, text in {"a": "from pkg import b\n", "b": "def f():\n    from pkg.c import x\n", "c": "import pkg.a\n"}.items():
        (tmp_path / f"{name}.py").write_text(text)
    modules = {f"pkg.{name}": tmp_path / f"{name}.py" for name in "abc"}
    assert import_cycles(modules) == [["pkg.a", "pkg.b", "pkg.c"]]

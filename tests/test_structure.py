"""The code's structure, read with `ast` alone (nothing of the project is imported, so these run in a blink).

No module reaches into another's private names: `from <project module> import _name`
and `<project module>._name` are errors in flan_jax/, tasks/, tests/ and launch/.
What two modules share is public in the one that defines it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKED_DIRS = ("flan_jax", "tasks", "tests", "launch")
# Packages imported by their dotted name; the modules of tests/ and launch/ are imported by file name
# (pytest and the scripts put their directory on sys.path).
PACKAGES = ("flan_jax", "tasks")


def _private(name: str) -> bool:
    """One leading underscore, not a dunder (`__version__`, `__file__` are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path, root: Path = REPO) -> str:
    """The dotted name a file is imported under: flan_jax/commands/bench.py -> flan_jax.commands.bench,
    tests/test_formats.py -> test_formats."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] not in PACKAGES:
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """{dotted name: file} of every module under the checked directories."""
    return {module_name(p, root): p for d in CHECKED_DIRS for p in sorted((root / d).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative imports resolved against the importing module `here`."""
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def violations(path: Path, modules: dict[str, Path], root: Path = REPO) -> Iterator[str]:
    """'file:line: what' for each private name of another project module that `path` imports or reads."""
    here = module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(root)

    top_levels = {name.split(".")[0] for name in modules}
    aliases: dict[str, str] = {}  # local name -> project module it is bound to (any scope: an approximation)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                aliases[alias.asname or parts[0]] = alias.name if alias.asname else parts[0]  # `import a.b` binds a
                if parts[0] in top_levels and any(_private(part) for part in parts):
                    yield f"{where}:{node.lineno}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, here, path.name == "__init__.py")
            if source not in modules:
                continue
            for alias in node.names:
                if _private(alias.name) and source != here:
                    yield f"{where}:{node.lineno}: from {source} import {alias.name}"
                elif f"{source}.{alias.name}" in modules:  # a submodule
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    aliases = {local: module for local, module in aliases.items() if module in modules}

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):  # (an inner `a.b` of `a.b.c` is visited too; the set dedups)
            continue
        chain = []
        value: ast.expr = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in aliases:
            continue
        module = aliases[value.id]
        for attr in reversed(chain):  # Down through submodules to the first name that is not one.
            if f"{module}.{attr}" in modules:
                module = f"{module}.{attr}"
                continue
            if _private(attr) and module != here:
                yield f"{where}:{node.lineno}: {module}.{attr}"
            break


def all_violations(root: Path = REPO) -> list[str]:
    modules = project_modules(root)
    return sorted({v for path in modules.values() for v in violations(path, modules, root)})


def test_no_module_uses_another_modules_private_names():
    found = all_violations()
    assert not found, "private names used across modules (make them public where they live):\n" + "\n".join(found)


def test_the_check_finds_a_planted_violation(tmp_path):
    (tmp_path / "flan_jax" / "sub").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "flan_jax" / "__init__.py").write_text("")
    (tmp_path / "flan_jax" / "sub" / "__init__.py").write_text("")
    (tmp_path / "flan_jax" / "sub" / "lib.py").write_text("_hidden = 1\nvisible = 2\n")
    (tmp_path / "flan_jax" / "user.py").write_text(
        "from flan_jax.sub.lib import _hidden, visible\nfrom .sub import lib\nprint(lib._hidden, lib.__name__)\n")
    (tmp_path / "tests" / "test_x.py").write_text(
        "import flan_jax.sub.lib\nimport flan_jax.sub.lib as L\nprint(flan_jax.sub.lib._hidden, L._hidden, L.visible)\n"
        "import os\nprint(os._exit)\n")
    assert all_violations(tmp_path) == [
        "flan_jax/user.py:1: from flan_jax.sub.lib import _hidden",
        "flan_jax/user.py:3: flan_jax.sub.lib._hidden",
        "tests/test_x.py:3: flan_jax.sub.lib._hidden",
    ]

"""The catalog's store: families, sources, text tasks, mixtures and suites, by name.

Task modules record what they define here (add_*), from their `register()`
(see tasks/__init__.py); tasks/seqio_tasks.py turns what is recorded into
SeqIO tasks and mixtures. Recording is cheap and touches no data: nothing
is read, tokenized or trained until a dataset is built.

  add_family(family)             a generated family (tasks/family.py); its
                                 tasks are `builtin_{family}_{variant}`, one
                                 per variant, and it joins the built-in
                                 mixtures (tasks/mixing.py `family_mixtures`)
  add_source(source, {task: variant})
                                 any other `Source` (e.g. a
                                 `sources.LoadedSource` reading real files)
  add_text_task(name, source)    text already rendered (the Flan Collection
                                 export, tasks/collection.py): a SeqIO data
                                 source, tokenized as it is
  add_mixture(name, [(entry, rate)])
                                 entries name tasks or mixtures; a rate may be
                                 a function of the task (tasks/mixing.py)
  add_suite(suite)               a held-out benchmark for `flan-jax eval
                                 --suite` (flan_jax/suites.py)

Adding under a name already present replaces the entry. Removing a task's
entry also unregisters its SeqIO tasks, so nothing removed lingers in SeqIO.

The data model is re-exported here (`Family`, `Example`, `Source`,
`render_example`, `postprocess`, `RENDER_SEED`, `task_name`), so a task file
needs one import: `from tasks.registry import Family, add_family`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import seqio

from flan_jax.suites import CompositeSuite, Suite
from flan_jax.errors import UserError
from tasks.family import RENDER_SEED, Example, Family, Source, postprocess, render_example, task_name

__all__ = [
    "RENDER_SEED", "Example", "Family", "MixtureRate", "Source", "add_family", "add_mixture", "add_source",
    "add_suite", "add_text_task", "families", "get_source", "get_suite", "mixtures", "postprocess",
    "remove_family", "remove_mixture", "remove_source", "remove_text_task", "render_example", "sources",
    "suites", "task_name", "text_tasks",
]

MixtureRate = float | Callable[[seqio.Task], float]

_FAMILIES: dict[str, Family] = {}
_SOURCES: dict[str, tuple[Source, dict[str, str]]] = {}  # By source name: (source, {task name: variant}).
_MIXTURES: dict[str, list[tuple[str, MixtureRate]]] = {}
_SUITES: dict[str, Suite | CompositeSuite] = {}
_TEXT_TASKS: dict[str, tuple[seqio.DataSource, int]] = {}  # By task name: (source, shuffle buffer).


# --- families ---------------------------------------------------------------------------


def add_family(family: Family) -> Family:
    """Records a family; adding one under a name already present replaces it."""
    _FAMILIES[family.name] = family
    return family


def remove_family(name: str) -> None:
    """Forgets a family and unregisters its SeqIO tasks (re-register to update the mixtures)."""
    family = _FAMILIES.pop(name)
    for variant in family.spec.variants:
        seqio.TaskRegistry.remove(task_name(name, variant))


def families() -> dict[str, Family]:
    """Every recorded family, by name."""
    return dict(_FAMILIES)


# --- sources ----------------------------------------------------------------------------


def add_source(source: Source, tasks: Mapping[str, str]) -> list[str]:
    """Records a source and its tasks, {task name: variant}; returns the task names.

    Adding a source under a name already present replaces it (its old tasks
    are unregistered).
    """
    for variant in tasks.values():
        if variant not in source.spec.variants:
            raise ValueError(f"source {source.name!r} has no variant {variant!r}; it has {source.spec.variants}")
    if source.name in _SOURCES:
        for name in _SOURCES[source.name][1]:
            seqio.TaskRegistry.remove(name)
    _SOURCES[source.name] = (source, dict(tasks))
    return list(tasks)


def remove_source(name: str) -> None:
    """Forgets a source and unregisters its SeqIO tasks (re-register to update the mixtures)."""
    _, tasks = _SOURCES.pop(name)
    for task in tasks:
        seqio.TaskRegistry.remove(task)


def get_source(name: str) -> Source:
    """A source recorded with `add_source`, by name (e.g. "flan_cot_aqua", "mmlu_anatomy")."""
    return _SOURCES[name][0]


def sources() -> dict[str, tuple[Source, dict[str, str]]]:
    """Every recorded source, by name: (source, {task name: variant})."""
    return {name: (source, dict(tasks)) for name, (source, tasks) in _SOURCES.items()}


# --- text tasks -------------------------------------------------------------------------


def add_text_task(name: str, source: seqio.DataSource, *, shuffle_buffer_size: int = 2_000) -> str:
    """Records a task whose source yields rendered text {"inputs", "targets", ...}; returns its name.

    Its pipeline is tokenize -> EOS (nothing to render), its metric exact
    match. The name replaces any earlier one.
    """
    seqio.TaskRegistry.remove(name)
    _TEXT_TASKS[name] = (source, shuffle_buffer_size)
    return name


def remove_text_task(name: str) -> None:
    """Forgets a task of `add_text_task` and unregisters it."""
    _TEXT_TASKS.pop(name, None)
    seqio.TaskRegistry.remove(name)


def text_tasks() -> dict[str, tuple[seqio.DataSource, int]]:
    """Every recorded text task, by name: (data source, shuffle buffer size)."""
    return dict(_TEXT_TASKS)


# --- mixtures ---------------------------------------------------------------------------


def add_mixture(name: str, tasks: Sequence[tuple[str, MixtureRate]]) -> None:
    """Records a mixture of (task or mixture name, rate); registered after the entries it names.

    A rate may be a function of the task, evaluated when a dataset is built
    (e.g. a file's row count, which is not known before the file is read).
    """
    _MIXTURES[name] = list(tasks)


def remove_mixture(name: str) -> None:
    """Forgets a mixture of `add_mixture` and unregisters it."""
    _MIXTURES.pop(name, None)
    seqio.MixtureRegistry.remove(name)


def mixtures() -> dict[str, list[tuple[str, MixtureRate]]]:
    """Every recorded mixture, by name, in the order recorded."""
    return {name: list(entries) for name, entries in _MIXTURES.items()}


# --- suites -----------------------------------------------------------------------------


def add_suite(suite: Suite | CompositeSuite) -> None:
    """Records a held-out benchmark for `flan-jax eval --suite` (its tasks must be recorded too)."""
    _SUITES[suite.name] = suite


def suites() -> dict[str, Suite | CompositeSuite]:
    """Every recorded suite, by name."""
    return dict(_SUITES)


def get_suite(name: str) -> Suite | CompositeSuite:
    if name not in _SUITES:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(sorted(_SUITES)) or 'none'}")
    return _SUITES[name]

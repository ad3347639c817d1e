"""The task catalog: Flan-style tasks as SeqIO tasks and mixtures.

Layers, imports pointing down only (a module imports those below it and,
where named, one beside it):

  __init__.py    `register()`: imports every module below, then registers the
                 store with SeqIO in vocab.py's vocabulary
  vocab.py       the default vocabulary, trained on the families of builtin.py
                 on first use (so it sits above the task modules)
  user_files.py, overlap.py: tasks from your own files, and the
                 decontamination check; both reach into seqio_tasks.py
  data_report.py, collection_bench.py: the reports of `flan-jax data
                 list|show|stats` (over what SeqIO has registered, with
                 mixing.py) and `flan-jax bench collection` with its made-up
                 exports (collection.py); neither registers anything
  task modules   builtin.py, flan_cot.py, bbh.py, mmlu.py, mgsm.py, gsm8k.py
                 (uses mgsm.py's number reading), tydiqa.py, heldout.py,
                 flan2022.py (uses flan_cot.py and mixing.py): each records
                 its tasks in `register()`
  seqio_tasks.py registers what the store holds with SeqIO, tokenized with
                 the vocabulary it is given
  mixing.py      mixture policy: rates, caps, the Flan 2022 recipe, the
                 built-in mixtures
  registry.py    the store: families, sources, text tasks, mixtures, suites
  family.py, sources.py, collection.py (uses sources.py and
                 collection_index.py): the data model (Family, Example,
                 Source, rendering) and the readers of data files and the
                 Flan Collection
  templates.py, files.py: templates, and file access (local, URLs, caches)

`import tasks` reads no data, trains nothing and registers nothing. One call
does it all, once per process:

    tasks.register(vocabulary=None)

  1. imports every public module of the package, in name order (modules
     whose name starts with "_" are skipped), so a new file in tasks/ is
     picked up with no other edit;
  2. calls each module's `register()`, which records the module's families,
     sources, mixtures and suites in tasks/registry.py;
  3. registers everything recorded with SeqIO, tokenized with `vocabulary`;
     None means the default one (`vocab.get_default_vocabulary`, which gin
     can bind to a checkpoint's spiece.model), trained or loaded only now.

Calling it again does nothing, unless with another vocabulary or with
`again=True` (after recording more, e.g. `registry.add_family` in a test or a
notebook, or after a gin binding changed the default vocabulary), which
registers the store with SeqIO again; each module's `register()` runs once
(`discover` runs those of modules added since).

A task module (the pattern every module of tasks/ follows):

    # tasks/riddles.py
    from tasks import registry, sources
    from tasks.templates import TaskSpec, Template

    SPEC = TaskSpec("riddles", [Template("{question}")])   # data: defined at import

    def register() -> None:                                 # recording: only when asked
        source = sources.LoadedSource("riddles", SPEC, ("train",), locate=..., read=...)
        registry.add_source(source, {"riddles_zs_noopt": "zs_noopt"})

`register()` takes no arguments, may run more than once (recording a name
again replaces it) and must not register with SeqIO itself. A module that
records at import instead (a module-level call, the older pattern) still
works, since step 1 imports it, but then importing it alone records it too.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import seqio

from tasks import registry, seqio_tasks, vocab
from tasks.family import task_name
from tasks.mixing import HELDOUT_MIXTURE, TRAIN_MIXTURE, VALIDATION_MIXTURE

add_family = registry.add_family

_handled: set[str] = set()  # Modules whose `register()` has run (or which have none).


def import_modules() -> list[ModuleType]:
    """Imports every public module of the package, in name order (so gin knows their configurables)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]


def discover() -> list[str]:
    """Imports every module of the package, runs each `register()` not run yet; returns the module names."""
    modules = import_modules()
    for module in modules:
        if module.__name__ in _handled:
            continue
        register_module = vars(module).get("register")
        # Only a module's own function: `from x import register` does not make it a task module.
        if callable(register_module) and register_module.__module__ == module.__name__:
            register_module()
        _handled.add(module.__name__)
    return [module.__name__.removeprefix(f"{__name__}.") for module in modules]


def register(vocabulary: seqio.Vocabulary | None = None, *, again: bool = False) -> None:
    """Records every module's tasks and registers them with SeqIO, once (see the module docstring)."""
    current = seqio_tasks.registered_vocabulary()
    if current is not None and not again and (vocabulary is None or vocabulary == current):
        return
    if not _handled:
        discover()
    seqio_tasks.register_seqio(vocab.get_default_vocabulary() if vocabulary is None else vocabulary)


__all__ = ["HELDOUT_MIXTURE", "TRAIN_MIXTURE", "VALIDATION_MIXTURE", "add_family", "discover", "import_modules",
           "register", "task_name"]

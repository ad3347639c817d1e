"""The task catalog's one way in for commands: `load_tasks`, called once by each command that reads tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import seqio


def load_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
    """Registers the SeqIO tasks and mixtures of `tasks/`, tokenized with `vocabulary` (default: gin's choice).

    Call it after gin is parsed: bindings shape the tasks (vocabulary, data directories).
    A second call with the same vocabulary does nothing (`tasks.register`).
    """
    import tasks

    tasks.register(vocabulary)


def get_suites(names: str) -> list:
    """The recorded suites named in a comma-separated list (an unknown name is a UserError listing the known ones).

    Records the catalog without registering it with SeqIO: the caller registers
    afterwards with the vocabulary the suites' prompts are to be tokenized with.
    """
    import tasks
    from tasks import registry

    tasks.discover()
    return [registry.get_suite(name.strip()) for name in names.split(",") if name.strip()]

"""The task catalog's one way in for commands: `load_tasks`, called once by each command that reads tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import seqio


def load_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
    """Registers the SeqIO tasks and mixtures of `tasks/`, tokenized with `vocabulary` (default: gin's choice).

    Call it after gin is parsed: bindings shape the tasks (vocabulary, data directories).
    """
    import tasks

    tasks.registry.register_seqio(vocabulary)

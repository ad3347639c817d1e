"""Flan-style tasks as SeqIO tasks and mixtures; see tasks/registry.py.

Importing the package imports every public module in it, in name order (a
module whose name starts with "_" is skipped), so a file that calls
`registry.add_family` is picked up with no other edit. Then every recorded
family is registered with SeqIO, along with the mixtures. Importing again,
or re-running `register_seqio`, replaces the registrations instead of raising.
"""

import importlib
import pkgutil

from tasks import registry
from tasks.registry import HELDOUT_MIXTURE, TRAIN_MIXTURE, VALIDATION_MIXTURE, add_family, task_name

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

registry.register_seqio()

__all__ = ["HELDOUT_MIXTURE", "TRAIN_MIXTURE", "VALIDATION_MIXTURE", "add_family", "task_name"]

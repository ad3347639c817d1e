"""Flan-style tasks as SeqIO tasks and mixtures; see tasks/registry.py.

Importing the package runs `discover`: it imports every public module in the
package, in name order (modules whose name starts with "_" are skipped), so a
new file that calls `registry.add_family` is picked up with no other edit;
then it registers every recorded family and source with SeqIO, and the mixtures.
Importing again, or calling `discover` again, replaces the registrations
instead of raising "already registered".
"""

import importlib
import pkgutil

from tasks import registry
from tasks.registry import HELDOUT_MIXTURE, TRAIN_MIXTURE, VALIDATION_MIXTURE, add_family, task_name


def discover() -> list[str]:
    """Imports every module of the package, registers everything; returns the module names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    registry.register_seqio()
    return names


discover()

__all__ = ["HELDOUT_MIXTURE", "TRAIN_MIXTURE", "VALIDATION_MIXTURE", "add_family", "discover", "task_name"]

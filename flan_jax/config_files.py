"""Where the gin configs (models/, runs/, partitioning/) are.

setup.py ships the repository's top-level `gin/` directory inside the package
as `flan_jax/gin_configs/` (data only: it has no `__init__.py`), so a wheel or
`pip install .` carries them. From a source checkout (an editable install, or
`PYTHONPATH=. python -m flan_jax.cli`) they are the checkout's `gin/`.

The result is always a real directory: gin files include each other by
relative names ('models/tiny.gin'), which gin resolves against its search path.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

PACKAGE_SUBDIR = "gin_configs"  # flan_jax/gin_configs in an installed package


def _is_config_dir(path: Path) -> bool:
    # The `__init__.py` check rules out the gin-config library's `gin` package.
    return (path / "models").is_dir() and (path / "runs").is_dir() and not (path / "__init__.py").exists()


def candidate_dirs() -> list[Path]:
    """The places looked in, in order: the installed package data, then the checkout's gin/."""
    candidates = []
    installed = importlib.resources.files("flan_jax") / PACKAGE_SUBDIR
    if isinstance(installed, Path):  # a package on the file system (not a zip)
        candidates.append(installed)
    root = Path(__file__).resolve().parent.parent
    # Only a source checkout: in site-packages, <root>/gin is the gin-config library.
    if (root / "setup.py").is_file():
        candidates.append(root / "gin")
    return candidates


@functools.cache
def gin_config_dir() -> Path | None:
    """The directory holding the shipped gin configs, or None if there is none."""
    for path in candidate_dirs():
        if _is_config_dir(path):
            return path
    return None

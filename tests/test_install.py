"""The installed stack is the one setup.py pins."""

import re
from pathlib import Path

from seqio import version as seqio_version


def test_installed_seqio_is_the_pinned_one():
    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    pinned = re.search(r'SEQIO_VERSION = "(.+)"', setup_py).group(1)
    assert seqio_version.__version__ == pinned


def test_training_path_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys, flan_jax.trainer, flan_jax.cli, tasks;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

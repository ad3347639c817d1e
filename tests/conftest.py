"""Shared test set-up: quiet TensorFlow, keep it off GPUs, find ../shared."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLAN_JAX_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("FLAN_JAX_FIXTURES_DIR", str(REPO.parent / "shared" / "fixtures"))


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """On GPUs, float32 matmuls default to TF32-like precision (logits off by
    ~3e-3 at test sizes); the tests compare float32 results to 1e-4 or better."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def tiny_config():
    from flan_jax.model import T5Config

    return T5Config(
        vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2,
        num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0,
    )


@pytest.fixture(scope="module")
def flan_cot_data():
    """Skips a test when the real Flan CoT files are not there."""
    from tasks import sources

    directory = sources.data_dir()
    if not directory or not os.path.isdir(os.path.join(directory, "flan_cot")):
        pytest.skip("no Flan CoT data (set FLAN_JAX_DATA_DIR)")

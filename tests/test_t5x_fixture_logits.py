"""Reproduces logits that T5X itself computed from a tiny checkpoint it wrote.

The fixture (see ../shared/fixtures/t5x/README.md) holds the checkpoint in
the legacy tensorstore+msgpack layout of the published Flan-T5 checkpoints.
Padding positions are not compared: T5X masks decoder query rows there.
"""

import json
import os
from pathlib import Path

import flax.serialization
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model import T5Config, Transformer

FIXTURE = Path(os.environ.get("FLAN_JAX_FIXTURES_DIR", Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "t5x"
CHECKPOINT = FIXTURE / "legacy_tensorstore_msgpack" / "checkpoint_20"

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "checkpoint").exists(), reason="T5X fixture not found")

CONFIG = T5Config(
    vocab_size=512, dtype="float32", emb_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
    head_dim=16, mlp_dim=128, mlp_activations=("gelu", "linear"), dropout_rate=0.0, logits_via_embedding=False,
)


def _read_tensorstore(spec: dict, directory: Path) -> np.ndarray:
    import tensorstore as ts

    spec = dict(spec, kvstore=dict(spec["kvstore"], path=str(directory / spec["kvstore"]["path"])))
    return ts.open(spec, read=True).result().read().result()


def _load_params(directory: Path) -> dict:
    """The `target` (parameter) tree of a T5X legacy checkpoint."""
    state = flax.serialization.msgpack_restore((directory / "checkpoint").read_bytes())

    def load(node):
        if isinstance(node, dict) and "driver" in node:
            return _read_tensorstore(node, directory)
        if isinstance(node, dict):
            return {k: load(v) for k, v in node.items()}
        return np.asarray(node)

    return load(state["optimizer"]["target"])


@pytest.fixture(scope="module")
def params():
    return _load_params(CHECKPOINT)


@pytest.mark.parametrize("case", ["A_unpacked_padded", "B_packed"])
def test_logits_match_t5x(params, case):
    spec = json.loads((FIXTURE / "logits_fixture.json").read_text())["cases"][case]
    want = np.load(FIXTURE / spec["logits_npy"])
    features = {
        k: jnp.asarray(spec[k])
        for k in (
            "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions",
        )
        if k in spec
    }
    got = np.asarray(Transformer(CONFIG).apply({"params": params}, **features, enable_dropout=False))
    assert got.shape == want.shape
    real = np.asarray(spec["decoder_target_tokens"]) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    assert (got[real].argmax(-1) == np.asarray(spec["argmax_tokens"])[real]).all()

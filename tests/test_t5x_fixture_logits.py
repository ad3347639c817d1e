"""Reproduces logits that T5X itself computed from a tiny checkpoint it wrote.

The fixture (see ../shared/fixtures/t5x/README.md) holds the checkpoint in
both layouts: the legacy tensorstore+msgpack one of the published Flan-T5
checkpoints and the orbax one T5X writes today.
Padding positions are not compared: T5X masks decoder query rows there.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import formats
from flan_jax.model import T5Config, Transformer, scan

DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FIXTURE = Path(os.environ.get("FLAN_JAX_FIXTURES_DIR", DEFAULT_FIXTURES)) / "t5x"

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="T5X fixture not found")


CONFIG = T5Config(
    vocab_size=512, dtype="float32", emb_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
    head_dim=16, mlp_dim=128, mlp_activations=("gelu", "linear"), dropout_rate=0.0, logits_via_embedding=False,
)


LAYOUTS = {
    "t5x_legacy": FIXTURE / "legacy_tensorstore_msgpack" / "checkpoint_20",
    "t5x_orbax": FIXTURE / "default_orbax" / "checkpoint_20",
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def loaded(request):
    return formats.load_checkpoint(str(LAYOUTS[request.param]))


def test_both_layouts_restore_the_same_checkpoint(loaded):
    assert loaded.format in LAYOUTS and loaded.step == 20
    # T5X stores no config: the architecture is read off the parameter shapes.
    assert loaded.config == CONFIG
    n = sum(np.size(x) for x in jax.tree.leaves(loaded.params))
    assert n == 263_168


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", ["A_unpacked_padded", "B_packed"])
def test_logits_match_t5x(loaded, case, scan_layers):
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
    config = dataclasses.replace(loaded.config, scan_layers=scan_layers)
    params = scan.to_layout(loaded.params, scan_layers)
    got = np.asarray(Transformer(config).apply({"params": params}, **features, enable_dropout=False))
    assert got.shape == want.shape
    real = np.asarray(spec["decoder_target_tokens"]) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    assert (got[real].argmax(-1) == np.asarray(spec["argmax_tokens"])[real]).all()

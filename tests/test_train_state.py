"""The checkpoint metadata's one writer (StepMeta.to_dict) and one reader (StepMeta.from_dict)."""

import dataclasses
import json

import pytest

from flan_jax.errors import UserError
from flan_jax.formats import DataPosition, StepMeta
from flan_jax.model import T5Config

CONFIG = T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=1, mlp_dim=32)
VOCAB = {"type": "sentencepiece", "file": "spiece.model", "extra_ids": 100}
WINDOW = {"sums": {"loss": 2.5}, "num_steps": 2, "skipped_total": 1}


def _run_meta() -> StepMeta:
    return StepMeta(12, CONFIG, VOCAB, DataPosition("flan_mix", 3, 12), WINDOW)


def test_a_training_steps_metadata_round_trips_through_json():
    meta = _run_meta()
    written = meta.to_dict()
    assert list(written) == ["step", "model_config", "vocabulary", "data", "metrics_window"]
    assert written["data"] == {"mixture_or_task_name": "flan_mix", "seed": 3, "batches_consumed": 12}
    assert StepMeta.from_dict(json.loads(json.dumps(written)), "meta") == meta


def test_a_converted_checkpoints_metadata_has_no_data_position():
    written = StepMeta(7, CONFIG, None).to_dict()
    assert list(written) == ["step", "model_config", "vocabulary"]
    read = StepMeta.from_dict(json.loads(json.dumps(written)), "meta")
    assert read.data is None and read.metrics_window is None and read.model_config == CONFIG


def _edited(**changes) -> dict:
    fields = _run_meta().to_dict()
    for key, value in changes.items():
        if value is _DROP:
            del fields[key]
        else:
            fields[key] = value
    return fields


_DROP = object()


@pytest.mark.parametrize("fields, message", [
    ([1, 2], r"run/5/meta: expected a JSON object, found list"),
    (_edited(step=_DROP), r"run/5/meta has no 'step'"),
    (_edited(model_config=_DROP), r"run/5/meta has no 'model_config'"),
    (_edited(step="12"), r"run/5/meta: step='12': expected a JSON integer"),
    (_edited(step=True), r"run/5/meta: step=True: expected a JSON integer"),
    (_edited(extra=1), r"run/5/meta has unknown keys \['extra'\]"),
    (_edited(vocabulary="spiece.model"), r"run/5/meta: vocabulary='spiece.model': expected a JSON object"),
    (_edited(data={"seed": 3}), r"run/5/meta: data has keys \['seed'\], expected"),
    (_edited(data={"mixture_or_task_name": 1, "seed": 3, "batches_consumed": 12}),
     r"run/5/meta: data: mixture_or_task_name=1: expected a JSON string"),
    (_edited(metrics_window={"sums": [], "num_steps": 0, "skipped_total": 0}),
     r"run/5/meta: metrics_window: sums=\[\]: expected a JSON object"),
    (_edited(model_config={**dataclasses.asdict(CONFIG), "depth": 3}), r"run/5/meta: model_config has unknown fields \['depth'\]"),
])
def test_bad_metadata_is_one_line_naming_the_key(fields, message):
    with pytest.raises(UserError, match=message) as error:
        StepMeta.from_dict(fields, "run/5/meta")
    assert "\n" not in str(error.value)

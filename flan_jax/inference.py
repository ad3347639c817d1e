"""Load a trained model from a run directory and answer prompts."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from flan_jax import checkpoints as ckpt_lib
from flan_jax import data as data_lib
from flan_jax import decoding
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer


@dataclasses.dataclass
class LoadedModel:
    module: Transformer
    params: Any
    vocabulary: seqio.Vocabulary
    step: int


def config_from_dict(fields: dict) -> T5Config:
    """Rebuilds a T5Config from its JSON form (lists back to tuples)."""
    known = {f.name for f in dataclasses.fields(T5Config)}
    unknown = set(fields) - known
    if unknown:
        raise UserError(f"checkpoint model_config has unknown fields {sorted(unknown)}")
    return T5Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_run(model_dir: str, step: int | None = None) -> LoadedModel:
    """Restores params from MODEL_DIR/checkpoints (the best step, else the latest)."""
    ckpt = ckpt_lib.open_for_reading(os.path.join(model_dir, "checkpoints"))
    if step is None:
        step = ckpt.best_step() or ckpt.latest_step()
    elif step not in ckpt.all_steps():
        raise UserError(f"no step {step} in {ckpt.directory}; available: {ckpt.all_steps()}")
    params, meta = ckpt.restore_params(step)
    ckpt.close()
    config = config_from_dict(meta["model_config"])
    vocab = data_lib.load_vocabulary(meta["vocabulary"], model_dir)
    return LoadedModel(Transformer(config), params, vocab, step)


def encode_prompts(vocab: seqio.Vocabulary, prompts: Sequence[str], max_input_length: int) -> np.ndarray:
    """Tokenizes prompts (+ EOS) into one zero-padded [batch, length] array."""
    ids = [vocab.encode(p)[: max_input_length - 1] + [vocab.eos_id] for p in prompts]
    # Round the length up to a multiple of 32 so nearby lengths share one compilation.
    length = min(max_input_length, -(-max(len(x) for x in ids) // 32) * 32)
    out = np.zeros((len(ids), length), np.int32)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
    return out


def generate(model: LoadedModel, prompts: Sequence[str], *, max_decode_length: int = 128, max_input_length: int = 512) -> list[str]:
    """Greedy answers to a batch of prompts."""
    inputs = encode_prompts(model.vocabulary, prompts, max_input_length)
    fn = jax.jit(functools.partial(decoding.greedy_decode, model.module, max_decode_length=max_decode_length))
    tokens = np.asarray(fn(model.params, jnp.asarray(inputs)))
    return [model.vocabulary.decode(row.tolist()) for row in tokens]

"""Parameter-efficient finetuning: which parameters train, and the frozen base.

With `T5Config.lora` or `T5Config.prompt_length` the model's parameter tree
holds the base (T5X's names, unchanged) plus adapters: `lora_a`/`lora_b` next
to each targeted kernel and `encoder/prompt/prompt`. Only adapters are
trained, get optimizer state and are checkpointed (`split`); the base is
"frozen": it gets no gradient, may be held in `T5Config.frozen_dtype`, and a
run records which base it belongs to (`BaseRef`, with `fingerprint`).
Without adapters every parameter trains and nothing is frozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flan_jax.errors import UserError
from flan_jax.model import T5Config
from flan_jax.model import prompt as prompt_lib

PyTree = Any
ADAPTER_NAMES = ("lora_a", "lora_b", "prompt")
_STACKED = re.compile(r"^(encoder|decoder)/layers/")


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (a tuple of keys) is an adapter."""
    return path[-1] in ADAPTER_NAMES


def split(config: T5Config, params: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen) nested dicts: the adapters and the rest with
    adapters, everything and {} without. Works on any tree shaped like the
    params (values, shardings, abstract shapes)."""
    if not config.has_adapters:
        return params, {}
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_adapter(k)}
    frozen = {k: v for k, v in flat.items() if not is_adapter(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def trainable(config: T5Config, params: PyTree) -> PyTree:
    """The parameters that are trained, checkpointed and given optimizer state."""
    return split(config, params)[0]


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """The whole parameter tree from the two halves of `split`."""
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def cast_frozen(config: T5Config, params: PyTree) -> PyTree:
    """`params` with the frozen half in `config.frozen_dtype` (works on arrays and ShapeDtypeStructs)."""
    trained, frozen = split(config, params)
    dtype = jnp.dtype(config.frozen_dtype)

    def cast(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return combine(trained, jax.tree.map(cast, frozen))


def base_config(config: T5Config) -> T5Config:
    """The config of the base model alone (no adapters; parameters in float32)."""
    return dataclasses.replace(config, lora=None, prompt_length=0, frozen_dtype="float32")


def check_targets(config: T5Config, params: PyTree) -> None:
    """A UserError unless every LoRA target pattern matches some kernel of `params`."""
    if config.lora is None:
        return
    kernels = ["/".join(path) for path in traverse_util.flatten_dict(params) if path[-1] == "kernel"]
    for pattern in config.lora.targets:
        if not any(re.search(pattern, path) for path in kernels):
            example = kernels[0] if kernels else "none"
            raise UserError(
                f"LoraConfig.targets: {pattern!r} matches no kernel of the model "
                f"(paths look like {example!r}; scanned layers read 'layers/', unrolled 'layers_0/')"
            )


PROMPT_PATH = ("encoder", "prompt", "prompt")


def abstract_adapters(config: T5Config, base: PyTree) -> PyTree:
    """The adapters' shapes (float32 ShapeDtypeStructs) for a base tree of
    shapes in `config`'s layer layout, as `Transformer(config)` makes them."""
    flat: dict[tuple[str, ...], jax.ShapeDtypeStruct] = {}
    for path, kernel in traverse_util.flatten_dict(base).items():
        if config.lora is not None and path[-1] == "kernel" and config.lora.targets_path("/".join(path)):
            *lead, fan_in, fan_out = kernel.shape  # lead: the layers axis of a scanned stack
            flat[(*path[:-1], "lora_a")] = jax.ShapeDtypeStruct((*lead, fan_in, config.lora.rank), jnp.float32)
            flat[(*path[:-1], "lora_b")] = jax.ShapeDtypeStruct((*lead, config.lora.rank, fan_out), jnp.float32)
    if config.prompt_length:
        flat[PROMPT_PATH] = jax.ShapeDtypeStruct((config.prompt_length, config.emb_dim), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def merge_lora(config: T5Config, params: PyTree) -> tuple[T5Config, PyTree]:
    """Folds every LoRA adapter into its kernel (W + scale A B, in float32) and
    drops the adapters; the config loses `lora`. Prompt vectors stay."""
    if config.lora is None:
        return config, params
    flat = traverse_util.flatten_dict(params)
    merged = {}
    for path, value in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        lora_a = flat.get((*path[:-1], "lora_a"))
        if path[-1] == "kernel" and lora_a is not None:
            lora_b = flat[(*path[:-1], "lora_b")]
            # '...': a stacked (scanned) kernel carries a leading layers axis.
            update = jnp.einsum("...ir,...ro->...io", jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32))
            value = (jnp.asarray(value, jnp.float32) + config.lora.scale * update).astype(value.dtype)
        merged[path] = value
    return dataclasses.replace(config, lora=None), traverse_util.unflatten_dict(merged)


def init_prompt_from_embeddings(config: T5Config, params: PyTree, rng: jax.Array) -> PyTree:
    """`params` with the prompt (`encoder/prompt/prompt`) drawn again from rows
    of their own `token_embedder/embedding`, as the model's initialiser draws
    it (`flan_jax.model.prompt`): call it once a pretrained base has replaced
    the randomly initialised embedding. The prompt keeps its dtype and
    sharding; without prompt tuning `params` come back unchanged."""
    if not config.prompt_length:
        return params
    flat = traverse_util.flatten_dict(params)
    if PROMPT_PATH not in flat:
        raise ValueError("params have no encoder/prompt/prompt: initialise them with the model of `config` first")
    old = flat[PROMPT_PATH]

    def draw(embedding: jax.Array, key: jax.Array) -> jax.Array:
        return prompt_lib.sample_embedding_rows(key, embedding, config.prompt_length).astype(old.dtype)

    flat[PROMPT_PATH] = jax.jit(draw, out_shardings=getattr(old, "sharding", None))(
        flat[("token_embedder", "embedding")], rng
    )
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------- which base


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """The base model a run's adapters belong to: where it was loaded from
    (None: the seed's random initialisation) and its content fingerprint."""

    path: str | None
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, fields: Any, source: str) -> BaseRef:
        if not isinstance(fields, Mapping) or set(fields) != {"path", "fingerprint"}:
            raise UserError(f"{source}: base must be an object with keys 'path' and 'fingerprint', found {fields!r}")
        if not isinstance(fields["fingerprint"], str) or not isinstance(fields["path"], (str, type(None))):
            raise UserError(f"{source}: base {dict(fields)!r}: expected a string fingerprint and a string or null path")
        return cls(fields["path"], fields["fingerprint"])

    def check_same(self, other: BaseRef, what: str) -> None:
        """A UserError unless `other` (the base at hand) has this fingerprint."""
        if other.fingerprint != self.fingerprint:
            raise UserError(
                f"{what} belongs to base {self.path or '(random init)'} (fingerprint {self.fingerprint}), "
                f"but the base given, {other.path or '(random init)'}, has fingerprint {other.fingerprint}: "
                "adapters only make sense on the base they were trained on"
            )


_SAMPLES_PER_LEAF = 256


def fingerprint(params: PyTree) -> str:
    """A content hash of a base's parameters (adapters excluded), the same for
    either layer layout, any sharding, and float32 or bfloat16 storage: names,
    shapes and `_SAMPLES_PER_LEAF` evenly spaced values per parameter (per
    layer), read exactly (no reductions, whose rounding depends on the
    sharding) and rounded to bfloat16 (a frozen base may be held in it)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        if is_adapter(path):
            continue
        name = "/".join(path)
        slices = [(name, leaf)]
        if _STACKED.match(name):  # one entry per layer, as the unrolled tree has them
            stack, rest = name.split("/layers/", 1)
            slices = [(f"{stack}/layers_{i}/{rest}", leaf[i]) for i in range(leaf.shape[0])]
        for slice_name, x in slices:
            flat = x.reshape(-1)
            index = np.linspace(0, flat.shape[0] - 1, min(_SAMPLES_PER_LEAF, flat.shape[0])).astype(np.int64)
            values = np.asarray(jax.device_get(flat[index].astype(jnp.bfloat16)))
            digest.update(f"{slice_name}:{tuple(x.shape)}:".encode())
            digest.update(values.tobytes())
    return digest.hexdigest()[:16]

"""Hugging Face PEFT LoRA adapter directories <-> flan-jax LoRA adapters.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`
with one pair of tensors per adapted Linear of the HF model:
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]. Ours are `lora_a` [in, r] and `lora_b` [r, out] beside the kernel
that `hf.name_table` maps to `<module>.weight`, so each is the other's
transpose. Both scale the update by alpha / r (PEFT's rsLoRA, alpha /
sqrt(r), reads as alpha * sqrt(r) here), and both drop out the adapter's input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from flan_jax.errors import UserError
from flan_jax.formats import hf
from flan_jax.model import T5Config, scan
from flan_jax.model.lora import LoraConfig

PyTree = Any
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the transformers model
_OURS_TO_PEFT = {"lora_a": "lora_A", "lora_b": "lora_B"}

# adapter_config.json options that change what the adapter computes in ways
# flan-jax's LoRA does not (falsy values are PEFT's defaults, which are fine).
_UNSUPPORTED_OPTIONS = (
    "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
    "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
    "use_bdlora",
)
# These initialisations also change the base weights, so the adapter alone is not the finetune.
_BASE_CHANGING_INITS = re.compile(r"^(pissa|olora|loftq|corda)", re.IGNORECASE)


def is_adapter_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


# ----------------------------------------------------------- names


def _adapted_modules(config: T5Config) -> dict[tuple[str, ...], str]:
    """Unrolled kernel path -> HF module name ('encoder.block.0.layer.0.SelfAttention.q'),
    for every Linear that flan-jax's LoRA can adapt (attention and MLP kernels)."""
    return {
        path: name.removesuffix(".weight")
        for path, name, _ in hf.name_table(config)
        if path[-1] == "kernel" and path[-2] != "logits_dense"
    }


def _suffixes_if_exact(targeted: set[str], modules: list[str]) -> list[str] | None:
    """The modules' last names (['q', 'v']) when exactly the targeted modules carry them, else None."""
    suffixes = {name.rsplit(".", 1)[-1] for name in targeted}
    covered = {name for name in modules if name.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if covered == targeted else None


def _targets(config: T5Config, targeted: set[tuple[str, ...]], source: str) -> tuple[str, ...]:
    """LoraConfig.targets (patterns over `config`'s layout) that adapt exactly the `targeted`
    unrolled kernel paths: one per module kind ('attention/query/kernel$') when every layer
    has it, else one exact path per kernel."""
    kernels = list(_adapted_modules(config))
    kinds = {path[-2] for path in targeted}  # query, ..., wi_0, wo
    if {path for path in kernels if path[-2] in kinds} == targeted:
        # 'attention/' covers self_attention/ and encoder_decoder_attention/ too.
        parents = {(path[-2], "mlp" if path[-3] == "mlp" else "attention") for path in targeted}
        return tuple(f"{parent}/{kind}/kernel$" for kind, parent in sorted(parents))
    if not config.scan_layers:
        return tuple(f"^{'/'.join(path)}$" for path in sorted(targeted))
    # Scanned layers share one adapter shape, so a kernel is adapted in all of its stack's layers or none.
    stacked = {(path[0], *path[2:]) for path in targeted}
    for stack, *rest in sorted(stacked):
        layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        missing = [i for i in range(layers) if (stack, f"layers_{i}", *rest) not in targeted]
        if missing:
            raise UserError(
                f"{source}: adapts {'/'.join(rest)} in only some {stack} layers (not layers {missing}), "
                "which scanned layers cannot hold: load it with T5Config.scan_layers=False"
            )
    return tuple(f"^{stack}/layers/{'/'.join(rest)}$" for stack, *rest in sorted(stacked))


# ----------------------------------------------------------- writing


def save_hf_peft(directory: str, config: T5Config, params: PyTree, base_model_name_or_path: str | None) -> None:
    """Writes the LoRA adapters in `params` (a whole tree or adapters alone, either layer
    layout) as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads
    onto the HF model of the base."""
    lora = config.lora
    if lora is None:
        raise UserError("the model has no LoRA adapters (T5Config.lora is None): nothing to write as a PEFT adapter")
    if config.prompt_length:
        raise UserError(f"the model has {config.prompt_length} prompt vectors, which a PEFT LoRA adapter cannot hold")
    if os.path.exists(directory) and os.listdir(directory):
        raise UserError(f"{directory} exists and is not empty; refusing to overwrite it")
    flat = traverse_util.flatten_dict(scan.to_layout(_adapters_only(params), scanned=False))
    if not flat:
        raise UserError("the parameters hold no LoRA adapters (lora_a / lora_b): nothing to write as a PEFT adapter")
    modules = _adapted_modules(config)
    tensors = {}
    for path, value in flat.items():
        module = modules[path[:-1] + ("kernel",)]
        value = np.asarray(value, np.float32).T  # PEFT's orientation: lora_A [r, in], lora_B [out, r]
        tensors[f"{_PREFIX}{module}.{_OURS_TO_PEFT[path[-1]]}.weight"] = np.ascontiguousarray(value)
    targeted = {modules[path[:-1] + ("kernel",)] for path in flat}
    target_modules = _suffixes_if_exact(targeted, list(modules.values())) or sorted(targeted)
    os.makedirs(directory, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(_peft_config(lora, target_modules, base_model_name_or_path), f, indent=2, sort_keys=True)


def _adapters_only(params: PyTree) -> PyTree:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] in _OURS_TO_PEFT})


def _peft_config(lora: LoraConfig, target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json: PEFT fills the fields left out with its defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "r": lora.rank,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


# ----------------------------------------------------------- reading


def load_hf_peft(directory: str, config: T5Config) -> tuple[LoraConfig, PyTree]:
    """(the adapter's LoraConfig, its adapters `lora_a`/`lora_b` as a tree in `config`'s
    layer layout) from a PEFT LoRA directory written by flan-jax or by peft;
    `config` is the base model's. One-line UserError for anything else."""
    fields = _read_config(directory)
    rank, alpha = fields["r"], fields["lora_alpha"]
    if fields.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # PEFT's rsLoRA scale alpha / sqrt(r) as our alpha / r
    tensors = hf.read_safetensors(_require_file(directory, WEIGHTS_FILE))
    adapters = _adapter_tree(tensors, config, rank, os.path.join(directory, WEIGHTS_FILE))
    targeted = {path[:-1] + ("kernel",) for path in traverse_util.flatten_dict(adapters)}
    try:
        lora = LoraConfig(
            rank=rank, alpha=alpha, dropout=fields.get("lora_dropout", 0.0),
            targets=_targets(config, targeted, directory),
        )
    except UserError as e:
        raise UserError(f"{os.path.join(directory, CONFIG_FILE)}: {str(e).splitlines()[0]}") from e
    return lora, scan.to_layout(adapters, config.scan_layers)


def _require_file(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise UserError(f"{directory}: no {name}; not a Hugging Face PEFT adapter directory")
    return path


def _read_config(directory: str) -> dict[str, Any]:
    """adapter_config.json, checked to describe a plain LoRA adapter."""
    path = _require_file(directory, CONFIG_FILE)
    fields = hf.read_json_object(path)
    if fields.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {fields.get('peft_type')!r}; only LoRA adapters (\"LORA\") can be read")
    for key, kinds in (("r", int), ("lora_alpha", (int, float))):
        value = fields.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: {key}={value!r}: expected a positive {'integer' if key == 'r' else 'number'}")
    if bad := next((key for key in _UNSUPPORTED_OPTIONS if fields.get(key)), None):
        raise UserError(f"{path}: {bad}={fields[bad]!r} is not supported by flan-jax's LoRA")
    if fields.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={fields['bias']!r} is not supported (T5 has no biases); expected 'none'")
    init = fields.get("init_lora_weights")
    if isinstance(init, str) and _BASE_CHANGING_INITS.match(init):
        raise UserError(f"{path}: init_lora_weights={init!r} also changes the base weights, which the adapter lacks")
    return fields


def _adapter_tree(tensors: dict[str, np.ndarray], config: T5Config, rank: int, source: str) -> PyTree:
    """The unrolled tree of lora_a [in, r] / lora_b [r, out] from PEFT's tensors, checked
    for unknown names, shapes and pairs."""
    by_name = {}
    for path, module in _adapted_modules(config).items():
        for ours, theirs in _OURS_TO_PEFT.items():
            by_name[f"{_PREFIX}{module}.{theirs}.weight"] = (*path[:-1], ours)
    shapes = hf.param_shapes(config)
    flat = {}
    for name in sorted(tensors):
        if name not in by_name:
            raise UserError(
                f"{source}: tensor {name!r} is not a LoRA adapter of a T5 attention or MLP projection "
                f"of this model (expected names like {next(iter(by_name))!r})"
            )
        path = by_name[name]
        fan_in, fan_out = shapes[path[:-1] + ("kernel",)]
        want = (rank, fan_in) if path[-1] == "lora_a" else (fan_out, rank)  # PEFT's orientation
        if tensors[name].shape != want:
            raise UserError(f"{source}: tensor {name!r} has shape {tensors[name].shape}, expected {want} (r={rank})")
        flat[path] = np.asarray(tensors[name], np.float32).T
    if not flat:
        raise UserError(f"{source}: holds no LoRA tensors")
    for path in flat:
        pair = path[:-1] + ("lora_b" if path[-1] == "lora_a" else "lora_a",)
        if pair not in flat:
            raise UserError(f"{source}: {'/'.join(path)} has no {pair[-1]} beside it")
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------- onto a base


def recorded_base(adapter_dir: str) -> str:
    """The base model path an adapter directory records (`base_model_name_or_path`),
    if it is a local path; a UserError asking for `--base` otherwise."""
    recorded = _read_config(adapter_dir).get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and os.path.exists(recorded):
        return recorded
    raise UserError(
        f"{adapter_dir} (base_model_name_or_path {recorded!r}, not a local path) is a Hugging Face PEFT adapter "
        "directory: give its base model too (--base=PATH)"
    )


def read_adapters(adapter_dir: str, config: T5Config) -> PyTree:
    """The adapters of `adapter_dir` for a model configured with `config.lora`,
    which must compute the same LoRA (rank, scale, targeted kernels)."""
    lora, adapters = load_hf_peft(adapter_dir, dataclasses.replace(config, lora=None, prompt_length=0))
    _check_same_lora(config, lora, adapter_dir)
    return adapters


def adapters_onto(adapter_dir: str, base_config: T5Config, config: T5Config | None = None) -> tuple[T5Config, PyTree]:
    """(the base's config with the adapter's LoraConfig, the adapters in its layer layout)
    for putting the PEFT adapter of `adapter_dir` on a base of `base_config`. If
    `config` (the wanted model) has a `lora`, its dropout is kept and its rank,
    scale and targeted kernels must match the adapter's."""
    if base_config.lora is not None:
        raise UserError("the base has LoRA adapters of its own: merge them (flan-jax convert) to make it a base")
    lora, adapters = load_hf_peft(adapter_dir, base_config)
    if config is not None and config.lora is not None:
        _check_same_lora(config, lora, adapter_dir)
        lora = dataclasses.replace(lora, dropout=config.lora.dropout)
    return dataclasses.replace(base_config, lora=lora), adapters


def _check_same_lora(config: T5Config, found: LoraConfig, source: str) -> None:
    """A UserError unless the configured LoRA and the adapter's compute the same thing."""
    wanted = config.lora
    kernels = ["/".join(path) for path in traverse_util.flatten_dict(_kernel_paths(config))]
    differ = [
        what for what, same in (
            ("rank", wanted.rank == found.rank),
            ("scale alpha/rank", math.isclose(wanted.scale, found.scale, rel_tol=1e-6)),
            ("targeted kernels", [wanted.targets_path(k) for k in kernels] == [found.targets_path(k) for k in kernels]),
        ) if not same
    ]
    if differ:
        raise UserError(
            f"{source}: the adapter (rank {found.rank}, alpha {found.alpha:g}, targets {list(found.targets)}) differs "
            f"from the configured LoraConfig (rank {wanted.rank}, alpha {wanted.alpha:g}, targets "
            f"{list(wanted.targets)}) in {', '.join(differ)}"
        )


def _kernel_paths(config: T5Config) -> PyTree:
    """A tree with a leaf per kernel path of `config`'s layout (values unused)."""
    tree = traverse_util.unflatten_dict({path: np.zeros(1) for path in _adapted_modules(config)})
    return scan.to_layout(tree, config.scan_layers)

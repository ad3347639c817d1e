"""The metadata of a flan-jax checkpoint step (`StepMeta`: one writer, one reader)
and the JSON form of a T5Config in it."""

from __future__ import annotations

import dataclasses
from typing import Any

from flan_jax import peft
from flan_jax.errors import UserError
from flan_jax.model import T5Config


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a run's input pipeline stands: `batches_consumed` batches of the mixture read with `seed`."""

    mixture_or_task_name: str
    seed: int
    batches_consumed: int


@dataclasses.dataclass(frozen=True)
class StepMeta:
    """The `meta` item of a flan-jax checkpoint step; `to_dict` writes it and `from_dict` reads it.

    A converted checkpoint holds step, model config and vocabulary; a training
    run's steps also hold the input position and the metrics window (sums of
    the per-step metrics since the last log step, see run_dir.MetricWindow).
    """

    step: int
    model_config: T5Config
    vocabulary: dict | None = None  # see flan_jax.data.load_vocabulary
    data: DataPosition | None = None
    metrics_window: dict | None = None
    base: peft.BaseRef | None = None  # with adapters: the base they were trained on (the step holds only them)

    def to_dict(self) -> dict[str, Any]:
        fields = {"step": self.step, "model_config": dataclasses.asdict(self.model_config), "vocabulary": self.vocabulary}
        if self.base is not None:
            fields["base"] = self.base.to_dict()
        if self.data is not None:
            fields["data"] = dataclasses.asdict(self.data)
        if self.metrics_window is not None:
            fields["metrics_window"] = dict(self.metrics_window)
        return fields

    @classmethod
    def from_dict(cls, fields: Any, source: str) -> StepMeta:
        """Reads what `to_dict` wrote; a UserError naming `source` and the key for anything missing or malformed."""
        if not isinstance(fields, dict):
            raise UserError(f"{source}: expected a JSON object, found {type(fields).__name__}")
        if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(cls)}):
            raise UserError(f"{source} has unknown keys {unknown}")
        for key in ("step", "model_config"):
            if key not in fields:
                raise UserError(f"{source} has no {key!r}")
        step = _field(fields, "step", int, source)
        vocabulary = _field(fields, "vocabulary", dict, source)
        data = _field(fields, "data", dict, source)
        if data is not None:
            names = {f.name: f.type for f in dataclasses.fields(DataPosition)}
            if set(data) != set(names):
                raise UserError(f"{source}: data has keys {sorted(data)}, expected {sorted(names)}")
            data = DataPosition(**{k: _field(data, k, str if t == "str" else int, f"{source}: data") for k, t in names.items()})
        window = _field(fields, "metrics_window", dict, source)
        if window is not None:
            _field(window, "sums", dict, f"{source}: metrics_window")
            _field(window, "num_steps", int, f"{source}: metrics_window")
            _field(window, "skipped_total", int, f"{source}: metrics_window")
        config = config_from_dict(fields["model_config"], f"{source}: model_config")
        base = peft.BaseRef.from_dict(fields["base"], source) if fields.get("base") is not None else None
        return cls(step, config, vocabulary, data, window, base)


_JSON_NAMES = {int: "integer", str: "string", dict: "object"}


def _field(fields: dict, key: str, kind: type, source: str) -> Any:
    """fields[key] (None if absent or null), checked to be a `kind`."""
    value = fields.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UserError(f"{source}: {key}={value!r}: expected a JSON {_JSON_NAMES[kind]}")
    return value


def config_from_dict(fields: Any, source: str = "checkpoint model_config") -> T5Config:
    """Rebuilds a T5Config from its JSON form in a flan-jax checkpoint; UserError naming `source` if it is bad."""
    if not isinstance(fields, dict):
        raise UserError(f"{source}: expected a JSON object of T5Config fields, found {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(T5Config)}
    unknown = set(fields) - known
    if unknown:
        raise UserError(f"{source} has unknown fields {sorted(unknown)}")
    try:
        return T5Config(**fields)
    except UserError as e:  # its first line: gin appends where it called T5Config
        raise UserError(f"{source}: {str(e).splitlines()[0]}") from e

"""Device mesh and logical-axis partitioning.

Partitioning is data: the model annotates parameters and activations with
logical axis names ('batch', 'embed', 'mlp', ...); gin-chosen rules map those
names to mesh axes ('data', 'model'). With one device every rule is a no-op,
so the same code runs on a laptop CPU and on a pod slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | None]]

# T5X's standard rules (1-D data parallel plus 1-D model parallel).
STANDARD_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("length", None),
    ("abspos_buckets", None),
)

# Data parallel only: every parameter replicated, the batch split.
DATA_PARALLEL_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = tuple(
    (name, "data" if name == "batch" else None) for name, _ in STANDARD_LOGICAL_AXIS_RULES
)


@gin.configurable
class Partitioner:
    """Owns the mesh and the logical-axis rules; turns logical specs into shardings."""

    def __init__(
        self,
        model_parallel_size: int = 1,
        logical_axis_rules: LogicalRules = STANDARD_LOGICAL_AXIS_RULES,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) % model_parallel_size:
            raise ValueError(
                f"model_parallel_size={model_parallel_size} does not divide the "
                f"{len(devices)} available devices"
            )
        grid = np.asarray(devices).reshape(len(devices) // model_parallel_size, model_parallel_size)
        self.mesh = Mesh(grid, ("data", "model"))
        self.rules = tuple(logical_axis_rules)

    @property
    def data_parallel_size(self) -> int:
        return self.mesh.shape["data"]

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def logical_to_sharding(self, logical_specs: Any) -> Any:
        """Maps a tree of logical PartitionSpecs to NamedShardings on the mesh."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

    def params_shardings(self, boxed_abstract_params: Any) -> Any:
        """Shardings for a tree of (abstract) params still wrapped in nn.Partitioned."""
        return self.logical_to_sharding(nn.get_partition_spec(boxed_abstract_params))

    def batch_sharding(self) -> NamedSharding:
        """Batches are split along their leading axis over 'data'."""
        return self.sharding(PartitionSpec("data"))

    def replicated(self) -> NamedSharding:
        return self.sharding(PartitionSpec())

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Makes the mesh current and the rules active for nn.with_logical_constraint."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles each host's share of the batch into one global array split over 'data'."""
        sharding = self.batch_sharding()
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


gin.constant("flan_jax.partitioning.STANDARD_LOGICAL_AXIS_RULES", STANDARD_LOGICAL_AXIS_RULES)
gin.constant("flan_jax.partitioning.DATA_PARALLEL_LOGICAL_AXIS_RULES", DATA_PARALLEL_LOGICAL_AXIS_RULES)

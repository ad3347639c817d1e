"""Device mesh and logical-axis partitioning.

Partitioning is data: the model annotates parameters and activations with
logical axis names ('batch', 'embed', 'mlp', ...); gin-chosen rules map those
names to the axes of a (data, model) mesh. With one device every rule is a no-op,
so the same code runs on a laptop CPU and on a pod slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | None]]

# Flax resolves rules in order and gives each mesh axis to at most one array
# dimension: an activation [batch, length, embed] takes 'data' for 'batch', so
# a later ('embed', 'data') rule leaves its 'embed' unsharded, while a kernel
# [embed, mlp] (no 'batch') is split over 'data' along 'embed'. That is how the
# FSDP rules below shard parameters but not activations, as in T5X's 2-D rules.

# T5X's standard rules: batch over 'data', heads / mlp / vocab over 'model'
# (tensor parallel); parameters are replicated over 'data'.
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
    ("layers", None),  # the stacked axis of scanned layers
)

# Data parallel only: every parameter replicated, the batch split.
DATA_PARALLEL_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = tuple(
    (name, "data" if name == "batch" else None) for name, _ in STANDARD_LOGICAL_AXIS_RULES
)

# Fully sharded data parallel: the batch over 'data', and every parameter with
# an 'embed' axis (all but the relative-position tables) split over 'data'
# along it, Adafactor statistics with them. With a 'model' axis of size > 1 this
# is T5X's 2-D partitioning (FSDP over 'data', tensor parallel over 'model').
FSDP_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = tuple(
    (name, "data" if name == "embed" else mesh_axis) for name, mesh_axis in STANDARD_LOGICAL_AXIS_RULES
)


def _mesh_devices(mesh_shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged as (data, model); one -1 entry takes what is left."""
    shape = list(mesh_shape)
    if len(shape) != 2 or shape.count(-1) > 1 or any(n == 0 or n < -1 for n in shape):
        raise ValueError(f"Partitioner.mesh_shape={tuple(mesh_shape)}: expected (data, model) with at most one -1")
    known = int(np.prod([n for n in shape if n != -1]))
    if len(devices) % known:
        raise ValueError(f"Partitioner.mesh_shape={tuple(mesh_shape)} does not divide the {len(devices)} devices")
    shape = [len(devices) // known if n == -1 else n for n in shape]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"Partitioner.mesh_shape={tuple(mesh_shape)} asks for {int(np.prod(shape))} devices; "
            f"{len(devices)} are available"
        )
    # Topology-aware on TPU slices; elsewhere devices in id order, model innermost.
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which part of the global batch this process feeds (see `Partitioner.data_layout`).

    The global batch is split along 'data' into `num_shards` equal parts, one
    per group of processes whose devices hold the same rows (processes that
    differ only along 'model' feed identical rows); this process feeds part
    `shard_index`. `contiguous`: that part is the `shard_index`-th block of
    consecutive rows, rows [i * B / n, (i + 1) * B / n). It always is where the
    mesh lists devices in process order (CPU, GPU); a topology-aware TPU mesh
    may spread a host's rows over the batch instead, which is fine for data
    that is sharded at its source but not for slicing one global batch.
    """

    shard_index: int
    num_shards: int
    contiguous: bool = True


def data_layout(mesh: Mesh, process_index: int) -> DataLayout:
    """The `DataLayout` of one process on a (data, model) mesh; see `Partitioner.data_layout`."""
    data_axis = mesh.axis_names.index("data")
    size = mesh.shape["data"]
    rows: dict[int, set[int]] = {}
    for index, device in np.ndenumerate(mesh.devices):
        rows.setdefault(device.process_index, set()).add(index[data_axis])
    if process_index not in rows:
        raise ValueError(f"process {process_index} has no device in the mesh")
    groups = sorted({tuple(sorted(r)) for r in rows.values()})
    if len({len(g) for g in groups}) != 1 or sorted(i for g in groups for i in g) != list(range(size)):
        raise ValueError(
            f"the mesh splits its 'data' axis unevenly over processes (data indices per process group: {groups}); "
            "every process must hold the same number of whole rows of the batch"
        )
    mine = tuple(sorted(rows[process_index]))
    shard_index, per_shard = groups.index(mine), len(mine)
    contiguous = mine == tuple(range(shard_index * per_shard, (shard_index + 1) * per_shard))
    return DataLayout(shard_index, size // per_shard, contiguous)


@gin.configurable
class Partitioner:
    """Owns the mesh and the logical-axis rules; turns logical specs into shardings.

    `mesh_shape` is (data, model); -1 means "all remaining devices". The
    presets in gin/partitioning/ pair a mesh shape with a rule set.
    """

    def __init__(
        self,
        mesh_shape: Sequence[int] = (-1, 1),
        logical_axis_rules: LogicalRules = DATA_PARALLEL_LOGICAL_AXIS_RULES,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        devices = list(devices if devices is not None else jax.devices())
        self.mesh = Mesh(_mesh_devices(mesh_shape, devices), ("data", "model"))
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

    def state_shardings(self, params_shardings: Any, abstract_params: Any, abstract_state: Any) -> Any:
        """Shardings of per-parameter optimizer state (see `flan_jax.optim.per_parameter`).

        A statistic shaped like its parameter gets the parameter's sharding; one
        that drops an axis of it (Adafactor's factored row and column moments)
        gets that sharding without the dropped axis; anything else (counts,
        placeholders) is replicated. So FSDP shards Adafactor's state with the
        parameters rather than leaving the compiler to guess.
        """

        def for_param(sharding: NamedSharding, param: Any, state: Any) -> Any:
            return jax.tree.map(lambda leaf: self._derived(sharding, tuple(param.shape), tuple(leaf.shape)), state)

        return jax.tree.map(for_param, params_shardings, abstract_params, abstract_state)

    def _derived(self, sharding: NamedSharding, param_shape: tuple, shape: tuple) -> NamedSharding:
        spec = tuple(sharding.spec) + (None,) * (len(param_shape) - len(sharding.spec))
        if shape == param_shape:
            return sharding
        if len(shape) == len(param_shape) - 1:
            for axis in range(len(param_shape)):
                if param_shape[:axis] + param_shape[axis + 1:] == shape:
                    return self.sharding(PartitionSpec(*spec[:axis], *spec[axis + 1:]))
        return self.replicated()

    def batch_sharding(self) -> NamedSharding:
        """Batches are split along their leading axis over 'data'."""
        return self.sharding(PartitionSpec("data"))

    def replicated(self) -> NamedSharding:
        return self.sharding(PartitionSpec())

    def data_layout(self) -> DataLayout:
        """Which rows of each global batch this process must pass to `shard_batch`.

        A batch is split over 'data' in contiguous blocks, one per index of the
        'data' axis; a process feeds the blocks of its own devices, in order.
        With devices in process order (`_mesh_devices` off TPU: process 0's
        devices first) the processes' blocks follow each other: on 2 hosts x 2
        devices a (4, 1) mesh gives host 0 rows [0, B/2) and host 1 the rest,
        a (2, 2) mesh the same, and a (1, 4) mesh gives both the whole batch.
        """
        return data_layout(self.mesh, jax.process_index())

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Makes the mesh current and the rules active for nn.with_logical_constraint."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles each host's share of the batch into one global array split over 'data'.

        Each process passes its own rows, global batch / `data_layout().num_shards`
        of them, as `data_layout()` describes; with one process, the whole batch.
        """
        sharding = self.batch_sharding()
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


gin.constant("flan_jax.partitioning.STANDARD_LOGICAL_AXIS_RULES", STANDARD_LOGICAL_AXIS_RULES)
gin.constant("flan_jax.partitioning.DATA_PARALLEL_LOGICAL_AXIS_RULES", DATA_PARALLEL_LOGICAL_AXIS_RULES)
gin.constant("flan_jax.partitioning.FSDP_LOGICAL_AXIS_RULES", FSDP_LOGICAL_AXIS_RULES)

"""Reads PyTorch `.bin` state dicts without torch and without running pickled code.

A torch zip checkpoint is `<name>/data.pkl` (a pickle describing the dict of
tensors) plus one raw storage file per tensor under `<name>/data/`. We unpickle
with an allow-list: tensor rebuilds, storage types and OrderedDict map to
numpy; any other global (which is how a pickle runs code) is refused.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from flan_jax.errors import UserError

_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused: Any) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * storage.itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `pytorch_model.bin` as numpy arrays; UserError if that is impossible safely."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: not a zip-format torch checkpoint (torch < 1.6 legacy format); it cannot be read "
            "without executing pickled code. Convert it to safetensors with a trusted torch install."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UserError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, np.ndarray] = {}

        class SafeUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(name)
                if (module, name) in _ALLOWED:
                    return _ALLOWED[(module, name)]
                raise UserError(
                    f"{path}: refusing to load global {module}.{name}: only tensors are read, "
                    "pickled code is never executed"
                )

            def persistent_load(self, pid: Any) -> np.ndarray:
                _, storage_type, key, _location, _numel = pid
                if key not in storages:
                    raw = archive.read(f"{prefix}data/{key}")
                    storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
                return storages[key]

        with archive.open(pickles[0]) as f:
            state = SafeUnpickler(f).load()
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)

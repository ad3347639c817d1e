"""Reads PyTorch `.bin` state dicts without torch and without running pickled code.

A torch zip checkpoint is `<name>/data.pkl` (a pickle describing the dict of
tensors) plus one raw storage file per tensor under `<name>/data/`. We unpickle
with an allow-list: tensor rebuilds, storage types and OrderedDict map to
numpy; any other global (which is how a pickle runs code) is refused.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
import zlib
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
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)) or len(size) != len(stride):
        raise ValueError(f"bad tensor layout: offset {offset!r}, size {size}, stride {stride}")
    # as_strided reads whatever memory the layout points at: keep it inside the storage
    # (and the copy no larger than it, so a corrupt size cannot exhaust memory).
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size or math.prod(size) > storage.size:
        raise ValueError(
            f"a tensor of size {size}, stride {stride} at offset {offset} overruns its storage of {storage.size} elements"
        )
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


# What a damaged archive or pickle raises: zipfile's own errors (and RuntimeError for an
# encrypted member, NotImplementedError for an unknown compression), and the errors the
# pickle docs list for unpickling bad data, plus OverflowError for absurd lengths;
# ValueError covers our layout checks.
_CORRUPT = (
    zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, OSError, pickle.UnpicklingError,
    EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError, OverflowError,
)


def _not_a_zip_reason(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read: {e}"
    if head.startswith(b"PK"):
        return "a damaged (truncated?) zip archive"
    if head.startswith(b"\x80"):  # a pickle: torch < 1.6's format
        return (
            "not a zip-format torch checkpoint (torch < 1.6 legacy format); it cannot be read without "
            "executing pickled code. Convert it to safetensors with a trusted torch install."
        )
    return "neither a zip-format torch checkpoint nor a legacy torch pickle"


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `pytorch_model.bin` as numpy arrays; UserError if that is impossible safely."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: {_not_a_zip_reason(path)}")
    try:
        state = _unpickle_zip(path)
    except UserError:
        raise
    except _CORRUPT as e:
        raise UserError(f"{path}: a corrupt torch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    if not all(isinstance(k, str) for k in state):
        raise UserError(f"{path}: a state dict whose keys are not all tensor names")
    return dict(state)


def _unpickle_zip(path: str) -> Any:
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

        pickled = archive.read(pickles[0])
        _check_memo_indices(pickled)
        # From memory, not a stream: a corrupt frame length then cannot make the reader allocate it.
        return SafeUnpickler(io.BytesIO(pickled)).load()


def _check_memo_indices(pickled: bytes) -> None:
    """pickle's C unpickler sizes its memo by the largest index a PUT names: a corrupt
    index could make it allocate gigabytes. A valid pickle's indices stay below its length."""
    for opcode, arg, position in pickletools.genops(pickled):  # parses only; runs nothing
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and not 0 <= arg <= len(pickled):
            raise ValueError(f"memo index {arg} at byte {position} is out of range")

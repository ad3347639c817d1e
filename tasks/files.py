"""Reading files wherever they are: local paths and gs:// through TensorFlow
(`tf.io.gfile`), any other URL through fsspec (`filesystem`, `open_file`):
s3://, hf://, memory://, http(s):// (fsspec's own, or without aiohttp its
blocking one over `requests`), whatever fsspec's installed implementations
know. `read_data_file` reads one file of a source, keeping http(s) downloads
in a cache, and raises `MissingDataError` (a `UserError`) for a missing one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import fsspec
import fsspec.implementations.cached
import fsspec.implementations.http_sync as fsspec_http_sync
import tensorflow as tf

from flan_jax.errors import UserError


class MissingDataError(UserError):
    """A data file a source needs is not where it was looked for."""


def cache_dir() -> str:
    """Where flan-jax keeps what it makes or downloads: $FLAN_JAX_CACHE_DIR, default ~/.cache/flan_jax."""
    return os.environ.get("FLAN_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flan_jax")



def is_native(path: str) -> bool:
    """Whether TensorFlow reads `path` itself (a local path or gs://); fsspec reads any other URL."""
    return "://" not in path or path.startswith("gs://")


def is_http(path: str) -> bool:
    return path.startswith(("http://", "https://"))


# fsspec's http(s) file system needs aiohttp; without it, fsspec's blocking one over `requests` serves.
_HTTP_SYNC = importlib.util.find_spec("aiohttp") is None
if _HTTP_SYNC:
    fsspec_http_sync.register()


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's file system for URL `path` (s3://, hf://, memory://, http(s)://, ...) and the path within it.

    A protocol whose package is missing (s3fs, gcsfs, huggingface_hub) is a
    UserError saying what to install.
    """
    try:
        return fsspec.core.url_to_fs(path, **_storage_options(path))
    except (ImportError, ValueError) as e:  # fsspec names the package a protocol needs.
        raise UserError(f"cannot read {path}: {e}") from None


def _storage_options(path: str) -> dict[str, Any]:
    # fsspec's blocking HTTP would otherwise hold a whole response in memory.
    return {"stream": True} if is_http(path) and _HTTP_SYNC else {}


def open_file(path: str, mode: str = "rb") -> Any:
    """Opens a local, gs:// (TensorFlow) or other fsspec URL's file; the caller closes it."""
    if is_native(path):
        return tf.io.gfile.GFile(path, mode)
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def isdir(path: str) -> bool:
    if is_native(path):
        return tf.io.gfile.isdir(path)
    fs, inner = filesystem(path)
    try:
        return fs.isdir(inner)
    except (OSError, ValueError):  # E.g. the Hub for an owner or a repository that does not exist.
        return False


def find_files(directory: str) -> list[str]:
    """Every file under `directory` (any depth), as full paths or URLs, sorted."""
    if is_native(directory):
        return sorted(os.path.join(parent, f) for parent, _, files in tf.io.gfile.walk(directory) for f in files)
    fs, inner = filesystem(directory)
    return sorted(fs.unstrip_protocol(p) for p in fs.find(inner))


def file_version(path: str) -> list[Any]:
    """[size, modification time or version]: what tells a changed file from the one indexed."""
    if is_native(path):
        stat = tf.io.gfile.stat(path)
        return [int(stat.length), int(stat.mtime_nsec)]
    fs, inner = filesystem(path)
    info = fs.info(inner)
    keys = ("mtime", "LastModified", "blob_id", "ETag", "etag", "created")  # Local, S3, the Hub, http, memory.
    return [int(info.get("size") or 0), str(next((info[k] for k in keys if info.get(k) is not None), ""))]


def _download_cache(path: str, subdirectory: str) -> fsspec.AbstractFileSystem:
    """fsspec's whole-file cache over http(s) `path`'s file system, kept under cache_dir()/`subdirectory`."""
    fs, _ = filesystem(path)
    return fsspec.implementations.cached.SimpleCacheFileSystem(
        fs=fs, cache_storage=os.path.join(cache_dir(), subdirectory))


def read_data_file(source: str, location: str, relative_path: str, advice: str) -> tuple[str, bytes]:
    """Reads `location/relative_path`; returns (path, bytes).

    `location` is a local directory, a gs:// one (read by TensorFlow), or
    any URL fsspec reads: s3://, hf://datasets/OWNER/NAME/..., memory://, or
    http(s)://, whose files are kept in fsspec's cache under
    $FLAN_JAX_CACHE_DIR/downloads (default ~/.cache/flan_jax/downloads)
    after the first read. A missing file raises MissingDataError naming
    `source`, the file and where it was looked for, followed by `advice`
    (where to get it, e.g. `get_it_from(url)`).
    """
    path = location + ("" if location.endswith("/") else "/") + relative_path
    try:
        if is_http(path):
            with _download_cache(path, "downloads").open(path, "rb") as f:
                return path, f.read()
        with open_file(path) as f:
            return path, f.read()
    except (FileNotFoundError, tf.errors.NotFoundError):
        if is_http(path):
            raise MissingDataError(f"{source}: could not download {path} (HTTP 404, not found). {advice}") from None
        raise MissingDataError(f"{source}: data file {relative_path} not found in {location} "
                               f"(looked for {path}). {advice}") from None
    except OSError as e:  # requests' errors too.
        raise MissingDataError(f"{source}: could not {'download' if is_http(path) else 'read'} {path} ({e}). "
                               f"{advice}") from None

"""HDF5 feature store: one cache file per feature spec, written so that no crash corrupts it.

Commit protocol (see ``docs/FORMAT.md``):

* The cache file ``NAME.h5`` is never modified in place. A new version is written to a
  temporary file beside it, flushed with ``fsync`` and published with ``os.replace``.
* While an extraction runs, each batch of finished rows is written to its own segment
  file in ``NAME.h5.parts/`` and published the same way. A published segment is a
  committed set of rows, so a run killed at any moment loses at most the batch in flight.
* At the end of a run the cache file is rewritten with the rows of every segment
  (compaction) and the absorbed segments are deleted. Their names are recorded in the
  new file first, so a crash between the two steps never counts a row twice.

Readers take no lock: they see the published cache file plus the published segments.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.spec import FeatureSpec, SpecError

logger = logging.getLogger(__name__)

FORMAT_NAME = "convcache.features"
SCHEMA_VERSION = 1
PARTS_SUFFIX = ".parts"
# Rows per HDF5 chunk along the first axis: large enough for fast sequential reads,
# small enough that reading one row does not decode megabytes.
CHUNK_BYTES = 1 << 20
COLUMN_NAMES = ("digest", "path", "label", "split", "size", "mtime_ns", "view", "present")
STRING = h5py.string_dtype("utf-8")


class CacheFileError(ValueError):
    """Raised for a file that is not a convcache cache, or not one this version can use."""


@dataclass
class Rows:
    """Columns of a set of cache rows, aligned by position."""

    features: np.ndarray
    digest: list[str]
    path: list[str]
    label: np.ndarray
    split: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    view: np.ndarray
    present: np.ndarray

    def __len__(self) -> int:
        return len(self.digest)

    @classmethod
    def empty(cls, feature_shape: tuple[int, ...], dtype: str) -> Rows:
        """Return a table with no rows."""
        return cls(
            features=np.zeros((0, *feature_shape), dtype=dtype),
            digest=[],
            path=[],
            label=np.zeros(0, np.int32),
            split=[],
            size=np.zeros(0, np.int64),
            mtime_ns=np.zeros(0, np.int64),
            view=np.zeros(0, np.int16),
            present=np.zeros(0, bool),
        )


@dataclass
class CacheHeader:
    """Attributes of a cache or segment file that are read without loading rows."""

    spec: FeatureSpec
    classes: list[str]
    n_rows: int
    feature_shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def parts_dir(cache_path: str | os.PathLike[str]) -> Path:
    """Return the folder that holds the published segments of a cache file."""
    return Path(str(cache_path) + PARTS_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_rows(feature_shape: tuple[int, ...], itemsize: int) -> int:
    row_bytes = max(1, int(np.prod(feature_shape)) * itemsize)
    return int(max(1, min(4096, CHUNK_BYTES // row_bytes)))


def write_table(
    path: Path,
    spec: FeatureSpec,
    classes: Sequence[str],
    rows_iter: Iterator[Rows],
    total_rows: int,
    feature_shape: tuple[int, ...],
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write a complete cache or segment file atomically.

    The rows are streamed from ``rows_iter`` into a temporary file in the same folder,
    which is flushed, ``fsync``-ed and renamed onto ``path``. A failure at any point
    (including a full disk) removes the temporary file and leaves ``path`` untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    dtype = np.dtype(spec.store_dtype)
    try:
        with h5py.File(tmp, "w-", libver="latest") as handle:
            handle.attrs["format"] = FORMAT_NAME
            handle.attrs["schema_version"] = SCHEMA_VERSION
            handle.attrs["spec"] = spec.to_json()
            handle.attrs["spec_digest"] = spec.digest
            handle.attrs["classes"] = json.dumps(list(classes))
            handle.attrs["feature_shape"] = json.dumps(list(feature_shape))
            handle.attrs["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for key, value in (attrs or {}).items():
                handle.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
            chunk = _chunk_rows(feature_shape, dtype.itemsize)
            features = handle.create_dataset(
                "features",
                shape=(total_rows, *feature_shape),
                dtype=dtype,
                chunks=(max(1, min(chunk, total_rows or 1)), *feature_shape),
            )
            columns = {
                "digest": handle.create_dataset("digest", (total_rows,), dtype="S32"),
                "path": handle.create_dataset("path", (total_rows,), dtype=STRING),
                "label": handle.create_dataset("label", (total_rows,), dtype=np.int32),
                "split": handle.create_dataset("split", (total_rows,), dtype=STRING),
                "size": handle.create_dataset("size", (total_rows,), dtype=np.int64),
                "mtime_ns": handle.create_dataset("mtime_ns", (total_rows,), dtype=np.int64),
                "view": handle.create_dataset("view", (total_rows,), dtype=np.int16),
                "present": handle.create_dataset("present", (total_rows,), dtype=bool),
            }
            start = 0
            for block in rows_iter:
                stop = start + len(block)
                if stop > total_rows:
                    raise RuntimeError(f"row stream holds more than the {total_rows} rows announced")
                if len(block):
                    features[start:stop] = block.features.astype(dtype, copy=False)
                    columns["digest"][start:stop] = np.array(block.digest, dtype="S32")
                    columns["path"][start:stop] = block.path
                    columns["label"][start:stop] = block.label
                    columns["split"][start:stop] = block.split
                    columns["size"][start:stop] = block.size
                    columns["mtime_ns"][start:stop] = block.mtime_ns
                    columns["view"][start:stop] = block.view
                    columns["present"][start:stop] = block.present
                start = stop
            if start != total_rows:
                raise RuntimeError(f"row stream held {start} rows, {total_rows} announced")
            handle.flush()
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path: str | os.PathLike[str], expected_digest: str | None = None) -> CacheHeader:
    """Open a cache or segment file read-only and validate that it is ours.

    Raises
    ------
    CacheFileError
        When the file is not HDF5, not a convcache file, written by a newer schema
        version, or (with ``expected_digest``) belongs to another feature spec.
    """
    path = Path(path)
    if not h5py.is_hdf5(path):
        raise CacheFileError(
            f"{path} is not an HDF5 file, so it is not a convcache cache. "
            "Pass a file written by 'convcache extract', or move this file out of the cache folder."
        )
    with h5py.File(path, "r", locking=False) as handle:
        return _header_of(handle, path, expected_digest)


def _header_of(handle: h5py.File, path: Path, expected_digest: str | None) -> CacheHeader:
    attrs = dict(handle.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise CacheFileError(
            f"{path} is an HDF5 file but not a convcache cache (no format={FORMAT_NAME!r} attribute). "
            "Pass a file written by 'convcache extract'."
        )
    version = int(attrs.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        raise CacheFileError(
            f"{path} uses cache schema version {version}, newer than the {SCHEMA_VERSION} this convcache reads. "
            "Upgrade convcache, or extract into another cache folder."
        )
    try:
        spec = FeatureSpec.from_json(str(attrs["spec"]))
    except (KeyError, SpecError, TypeError, ValueError) as error:
        raise CacheFileError(f"{path} holds no valid feature spec: {error}") from error
    if expected_digest is not None and spec.digest != expected_digest:
        raise CacheFileError(
            f"{path} belongs to feature spec {spec.digest[:12]} ({spec.base}, {spec.input_size} px), "
            f"not to the requested spec {expected_digest[:12]}. Rename or remove the file; it was left untouched."
        )
    return CacheHeader(
        spec=spec,
        classes=json.loads(str(attrs["classes"])),
        n_rows=int(handle["digest"].shape[0]),
        feature_shape=tuple(json.loads(str(attrs["feature_shape"]))),
        attrs=attrs,
    )


def _decode_strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_columns(handle: h5py.File) -> Rows:
    """Read every column except the features of an open cache or segment file."""
    n = handle["digest"].shape[0]
    return Rows(
        features=np.zeros((n, 0)),
        digest=_decode_strings(handle["digest"][:]),
        path=_decode_strings(handle["path"][:]),
        label=handle["label"][:],
        split=_decode_strings(handle["split"][:]),
        size=handle["size"][:],
        mtime_ns=handle["mtime_ns"][:],
        view=handle["view"][:],
        present=handle["present"][:],
    )


def list_segments(cache_path: str | os.PathLike[str]) -> list[Path]:
    """Return the published segment files of a cache, oldest first."""
    folder = parts_dir(cache_path)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))


def publish_segment(cache_path: Path, spec: FeatureSpec, classes: Sequence[str], rows: Rows) -> Path:
    """Commit a batch of rows as a new segment file and return its path."""
    folder = parts_dir(cache_path)
    folder.mkdir(exist_ok=True)
    name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
    target = folder / name
    feature_shape = tuple(rows.features.shape[1:])
    write_table(target, spec, classes, iter([rows]), len(rows), feature_shape)
    return target

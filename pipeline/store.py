"""HDF5 feature store: one cache file per feature spec, written so that no crash corrupts it.

Commit protocol (see ``docs/FORMAT.md``):

* The cache file ``NAME.h5`` is never modified in place. A new version is written to a
  temporary file beside it, flushed with ``fsync`` and published with ``os.replace``.
* While an extraction runs, each batch of finished rows is written to its own segment
  file in ``NAME.h5.parts/`` and published the same way. A published segment is a
  committed set of rows, so a run killed at any moment loses only the rows computed
  since the last published segment (``commit_rows`` rows plus the queued batches).
* At the end of a run the cache file is rewritten with the rows of every segment
  (compaction) and the absorbed segments are deleted. Their names are recorded in the
  new file first, so a crash between the two steps never counts a row twice.

Readers take no lock: they see the published cache file plus the published segments.
"""

from __future__ import annotations

import errno
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
# Target bytes per HDF5 chunk of the features dataset (chunks run along the first axis):
# large enough for fast sequential reads, small enough that reading one row stays cheap.
CHUNK_BYTES = 1 << 20
# HDF5 filters of the features dataset, as h5py create_dataset keyword arguments.
FEATURE_FILTERS: dict[str, Any] = {}
COLUMN_NAMES = ("digest", "path", "label", "split", "size", "mtime_ns", "view", "present")
STRING = h5py.string_dtype("utf-8")
# Remedies for the write errors that mean no room is left.
_REMEDIES = {
    errno.ENOSPC: "Free disk space in that folder",
    errno.EDQUOT: "Free space or raise your disk quota",
    errno.EFBIG: "Raise the file-size limit of the process (ulimit -f)",
}


class CacheFileError(ValueError):
    """Raised for a file that is not a convcache cache, or not one this version can use."""


class CacheWriteError(OSError):
    """Raised when a cache or segment file cannot be written, for example on a full disk.

    ``errno`` is the operating system's error number (``errno.ENOSPC`` for a full disk).
    """


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


class _LatchingFile:
    """File object for h5py's ``fileobj`` driver that keeps operating-system write errors away from HDF5.

    With HDF5 1.14.6 and h5py 3.14, a failed write leaves HDF5 objects whose teardown
    crashes the interpreter with SIGSEGV (reproduced with writes failing on EFBIG under
    ``RLIMIT_FSIZE``). This object records the first ``OSError`` instead, drops later
    writes and reports success, so HDF5 closes cleanly and :func:`write_table` raises
    the recorded error. Reads of dropped ranges return zeros; the file is deleted anyway.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.position = 0
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.position = offset
        elif whence == os.SEEK_CUR:
            self.position += offset
        else:
            self.position = os.fstat(self.fd).st_size + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.fd).st_size - self.position)
        data = os.pread(self.fd, size, self.position)
        self.position += size
        return data + bytes(size - len(data))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(view):
                    written += os.pwrite(self.fd, view[written:], self.position + written)
            except OSError as error:
                self.error = error
        self.position += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as error:
                self.error = error
        return size

    def flush(self) -> None:
        """Do nothing: :func:`write_table` calls ``fsync`` once HDF5 has closed the file."""

    def check(self) -> None:
        """Raise the first write error, if there was one."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_error(path: Path, error: OSError, published: bool) -> CacheWriteError:
    reason = error.strerror or str(error)
    if published:
        return CacheWriteError(
            error.errno,
            f"wrote {path} but could not flush its folder to disk ({reason}); a power loss now could undo "
            "the last commit. Check the disk, then run the command again.",
        )
    remedy = _REMEDIES.get(error.errno or 0, "Fix the cause")
    return CacheWriteError(
        error.errno,
        f"could not write {path} ({reason}). Nothing was published: the cache file and every committed "
        f"segment are unchanged. {remedy}, then run the extraction again; it computes only the missing rows.",
    )


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
    which is flushed, ``fsync``-ed and renamed onto ``path``, and the folder is
    ``fsync``-ed. A failure before the rename (including a full disk) removes the
    temporary file and leaves ``path`` untouched.

    Raises
    ------
    CacheWriteError
        When the operating system fails a write, ``fsync`` or rename; ``errno`` is kept.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    sink: _LatchingFile | None = None
    published = False
    try:
        sink = _LatchingFile(tmp)
        with h5py.File(sink, "w", libver="latest") as handle:
            _fill_table(handle, sink, spec, classes, rows_iter, total_rows, feature_shape, attrs)
        sink.check()
        os.fsync(sink.fd)
        sink.close()
        os.replace(tmp, path)
        published = True
        _fsync_dir(path.parent)
    except OSError as error:
        if not published:
            _discard(sink, tmp)
        if isinstance(error, CacheWriteError):
            raise
        raise _write_error(path, error, published) from error
    except BaseException:
        _discard(sink, tmp)
        raise


def _discard(sink: _LatchingFile | None, tmp: Path) -> None:
    if sink is not None:
        sink.close()
    tmp.unlink(missing_ok=True)


def _fill_table(
    handle: h5py.File,
    sink: _LatchingFile,
    spec: FeatureSpec,
    classes: Sequence[str],
    rows_iter: Iterator[Rows],
    total_rows: int,
    feature_shape: tuple[int, ...],
    attrs: dict[str, Any] | None,
) -> None:
    dtype = np.dtype(spec.store_dtype)
    handle.attrs["format"] = FORMAT_NAME
    handle.attrs["schema_version"] = SCHEMA_VERSION
    handle.attrs["spec"] = spec.to_json()
    handle.attrs["spec_digest"] = spec.digest
    handle.attrs["classes"] = json.dumps(list(classes))
    handle.attrs["feature_shape"] = json.dumps(list(feature_shape))
    handle.attrs["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in (attrs or {}).items():
        handle.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    shape = (total_rows, *feature_shape)
    if all(shape):
        chunk = _chunk_rows(feature_shape, dtype.itemsize)
        layout: dict[str, Any] = {"chunks": (max(1, min(chunk, total_rows)), *feature_shape), **FEATURE_FILTERS}
    else:
        # An empty table (every image failed, or a prune removed every row) cannot be chunked.
        layout = {}
    features = handle.create_dataset("features", shape=shape, dtype=dtype, **layout)
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
        # Stop at the first failed write; the close that follows only writes metadata.
        sink.check()
        start = stop
    if start != total_rows:
        raise RuntimeError(f"row stream held {start} rows, {total_rows} announced")
    handle.flush()


def read_header(path: str | os.PathLike[str], expected_digest: str | None = None) -> CacheHeader:
    """Open a cache or segment file read-only and validate that it is ours.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    CacheFileError
        When the file is not HDF5, not a convcache file, damaged, written by a newer
        schema version, or (with ``expected_digest``) belongs to another feature spec.
    """
    path = Path(path)
    handle = open_table(path)
    with handle:
        return _header_of(handle, path, expected_digest)


def open_table(path: Path) -> h5py.File:
    """Open a cache or segment file read-only, without HDF5 file locking.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist (a compaction may just have deleted a segment).
    CacheFileError
        For a file that is not HDF5, or that HDF5 cannot open.
    """
    try:
        # Readers take no lock: a published file is never written again.
        return h5py.File(path, "r", locking=False)
    except OSError as error:
        if not path.exists():
            raise FileNotFoundError(
                f"cache file not found: {path}. Run 'convcache extract' first, or check the path."
            ) from error
        if not h5py.is_hdf5(path):
            raise CacheFileError(
                f"{path} is not an HDF5 file, so it is not a convcache cache. "
                "Pass a file written by 'convcache extract', or move this file out of the cache folder."
            ) from None
        raise CacheFileError(
            f"{path} is a damaged HDF5 file ({error}). Move it out of the cache folder and run the extraction again."
        ) from error


def _header_of(handle: h5py.File, path: Path, expected_digest: str | None) -> CacheHeader:
    attrs = dict(handle.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise CacheFileError(
            f"{path} is an HDF5 file but not a convcache cache (no format={FORMAT_NAME!r} attribute). "
            "Pass a file written by 'convcache extract'."
        )
    try:
        version = int(attrs.get("schema_version", 0))
    except (TypeError, ValueError) as error:
        raise CacheFileError(f"{path} has an invalid schema_version {attrs.get('schema_version')!r}") from error
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
    try:
        classes = json.loads(str(attrs["classes"]))
        feature_shape = tuple(int(n) for n in json.loads(str(attrs["feature_shape"])))
    except (KeyError, TypeError, ValueError) as error:
        raise CacheFileError(f"{path} lacks a valid 'classes' or 'feature_shape' attribute: {error}") from error
    n_rows = _check_datasets(handle, path, feature_shape)
    return CacheHeader(spec=spec, classes=classes, n_rows=n_rows, feature_shape=feature_shape, attrs=attrs)


def _check_datasets(handle: h5py.File, path: Path, feature_shape: tuple[int, ...]) -> int:
    """Return the row count after checking that every dataset exists and all are aligned."""
    missing = [name for name in ("features", *COLUMN_NAMES) if not isinstance(handle.get(name), h5py.Dataset)]
    if missing:
        raise CacheFileError(
            f"{path} lacks the datasets {', '.join(missing)}; it is damaged or not a convcache cache. "
            "Move it out of the cache folder and run the extraction again."
        )
    n_rows = int(handle["features"].shape[0])
    lengths = {name: int(handle[name].shape[0]) for name in COLUMN_NAMES}
    if any(length != n_rows for length in lengths.values()) or tuple(handle["features"].shape[1:]) != feature_shape:
        raise CacheFileError(
            f"{path} has misaligned datasets (features {tuple(handle['features'].shape)}, "
            f"feature_shape attribute {list(feature_shape)}, columns {lengths}). "
            "Move it out of the cache folder and run the extraction again."
        )
    return n_rows


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
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        _fsync_dir(folder.parent)  # make the new folder's entry durable before segments count on it
    name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
    target = folder / name
    feature_shape = tuple(rows.features.shape[1:])
    write_table(target, spec, classes, iter([rows]), len(rows), feature_shape)
    return target

"""Consistent read-only view of a cache: the published cache file plus its published segments."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.spec import FeatureSpec
from pipeline.store import CacheFileError, CacheHeader, Rows, _header_of, list_segments, open_table, read_columns

logger = logging.getLogger(__name__)

# A reader retries when a compaction replaces the cache file while it lists segments.
OPEN_RETRIES = 5


@dataclass
class _Source:
    path: Path
    handle: h5py.File
    offset: int
    n_rows: int
    n_bytes: int


class CacheSnapshot:
    """Rows of a cache as committed at the moment it was opened.

    Row ``i`` of the snapshot is addressed by its position in :attr:`columns`. Labels
    are renumbered against :attr:`classes`, the sorted union of the class names of
    every source file, so rows from segments of a run that added a class line up.

    Use as a context manager; the HDF5 files stay open until :meth:`close`.
    """

    def __init__(self, cache_path: str | os.PathLike[str], expected_digest: str | None = None) -> None:
        self.path = Path(cache_path)
        self.sources: list[_Source] = []
        for attempt in range(OPEN_RETRIES):
            try:
                self._open(expected_digest)
                return
            except _Changed:
                self.close()
                logger.debug("cache %s changed while opening; retry %d", self.path, attempt + 1)
            except BaseException:
                self.close()
                raise
        raise CacheFileError(
            f"{self.path} was replaced {OPEN_RETRIES} times while it was being opened; try again, "
            "or stop the other writer (extract or prune) first."
        )

    def _open(self, expected_digest: str | None) -> None:
        """Open the cache file and its pending segments, or raise ``_Changed`` on a concurrent compaction.

        A compaction publishes the new cache file before it deletes the segments it absorbed.
        So the set read here is consistent when the cache file is the same file (same inode
        and modification time), or still absent, before and after the segments are listed.
        """
        self.sources = []
        self.spec: FeatureSpec | None = None
        self.attrs: dict[str, object] = {}
        headers = []
        absorbed: set[str] = set()
        main_identity = _identity(self.path)
        if main_identity is not None:
            header = self._add_source(self.path, expected_digest)
            headers.append(header)
            self.attrs = header.attrs
            absorbed = set(json.loads(str(header.attrs.get("absorbed_segments", "[]"))))
        for segment in list_segments(self.path):
            if segment.name not in absorbed:
                headers.append(self._add_source(segment, expected_digest))
        if _identity(self.path) != main_identity:
            raise _Changed
        if not headers:
            raise FileNotFoundError(f"cache file not found: {self.path}. Run 'convcache extract' first.")

        self.spec = headers[0].spec
        self.feature_shape = headers[0].feature_shape
        self.classes = sorted({name for h in headers for name in h.classes}) if len(headers) > 1 else headers[0].classes
        parts = []
        offset = 0
        for source, header in zip(self.sources, headers, strict=True):
            columns = read_columns(source.handle)
            remap = np.array([self.classes.index(name) for name in header.classes] or [0], dtype=np.int32)
            if len(columns):
                # Label -1 marks a row whose class left the tree; it must not index the last class.
                columns.label = np.where(columns.label >= 0, remap[np.maximum(columns.label, 0)], -1).astype(np.int32)
            if source.path != self.path:
                columns.present = np.ones(len(columns), bool)
            source.offset, source.n_rows = offset, len(columns)
            offset += len(columns)
            parts.append(columns)
        self.columns = _concat(parts)
        self.main_rows = self.sources[0].n_rows if main_identity is not None else 0

    def _add_source(self, path: Path, expected_digest: str | None) -> CacheHeader:
        try:
            handle = open_table(path)
        except FileNotFoundError as error:
            raise _Changed from error  # a compaction deleted it after it was listed
        source = _Source(path, handle, 0, 0, os.fstat(handle.id.get_vfd_handle()).st_size)
        self.sources.append(source)
        return _header_of(handle, path, expected_digest)

    def __enter__(self) -> CacheSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open HDF5 file of the snapshot."""
        for source in getattr(self, "sources", []):
            source.handle.close()
        self.sources = []

    @property
    def file_bytes(self) -> int:
        """Size in bytes of the cache file and the segments of this snapshot, measured when opened."""
        return sum(source.n_bytes for source in self.sources)

    @property
    def segment_paths(self) -> list[Path]:
        """Segment files this snapshot includes."""
        return [s.path for s in self.sources if s.path != self.path]

    def select(
        self,
        split: str | None = None,
        present_only: bool = True,
        views: bool = False,
    ) -> np.ndarray:
        """Return snapshot row indices of one split (or all), newest row per path first wins.

        Rows that a later segment re-committed for the same path and view replace the
        older row, so a reader never sees one image twice.
        """
        cols = self.columns
        keep = np.ones(len(cols), bool)
        if present_only:
            keep &= cols.present
        if not views:
            keep &= cols.view == 0
        if split is not None:
            keep &= np.array([s == split for s in cols.split], bool)
        chosen: dict[tuple[str, int], int] = {}
        for i in np.flatnonzero(keep):
            chosen[(cols.path[i], int(cols.view[i]))] = int(i)
        return np.array(sorted(chosen.values()), dtype=np.int64)

    def read_features(self, indices: Sequence[int] | np.ndarray, dtype: str | None = "float32") -> np.ndarray:
        """Gather the feature rows at snapshot ``indices`` into one array, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        out_dtype = np.dtype(dtype) if dtype else np.dtype(self.spec.store_dtype)
        out = np.empty((len(indices), *self.feature_shape), dtype=out_dtype)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        for source in self.sources:
            lo = np.searchsorted(sorted_idx, source.offset)
            hi = np.searchsorted(sorted_idx, source.offset + source.n_rows)
            if lo == hi:
                continue
            local = sorted_idx[lo:hi] - source.offset
            dataset = source.handle["features"]
            # Read windows of consecutive rows and pick from them: much faster than h5py's
            # point selection, and bounded in memory by the window size.
            window = max(1, dataset.chunks[0] if dataset.chunks else 1024) * 8
            start = 0
            while start < len(local):
                first = local[start]
                stop = np.searchsorted(local, first + window)
                block = dataset[first : local[stop - 1] + 1]
                out[order[lo + start : lo + stop]] = block[local[start:stop] - first]
                start = stop
        return out


class _Changed(Exception):
    """Internal: the cache file was replaced while the snapshot was being opened."""


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns)


def _concat(parts: list[Rows]) -> Rows:
    if not parts:
        raise ValueError("no parts")
    return Rows(
        features=np.zeros((sum(len(p) for p in parts), 0)),
        digest=[d for p in parts for d in p.digest],
        path=[d for p in parts for d in p.path],
        label=np.concatenate([p.label for p in parts]).astype(np.int32),
        split=[d for p in parts for d in p.split],
        size=np.concatenate([p.size for p in parts]).astype(np.int64),
        mtime_ns=np.concatenate([p.mtime_ns for p in parts]).astype(np.int64),
        view=np.concatenate([p.view for p in parts]).astype(np.int16),
        present=np.concatenate([p.present for p in parts]).astype(bool),
    )

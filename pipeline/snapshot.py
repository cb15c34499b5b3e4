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
from pipeline.store import CacheFileError, Rows, _header_of, list_segments, read_columns

logger = logging.getLogger(__name__)

# A reader retries when a compaction replaces the cache file while it lists segments.
OPEN_RETRIES = 5


@dataclass
class _Source:
    path: Path
    handle: h5py.File
    offset: int
    n_rows: int


class CacheSnapshot:
    """Rows of a cache as committed at the moment it was opened.

    Row ``i`` of the snapshot is addressed by its position in :attr:`columns`. Labels
    are renumbered against :attr:`classes`, the sorted union of the class names of
    every source file, so rows from segments of a run that added a class line up.

    Use as a context manager; the HDF5 files stay open until :meth:`close`.
    """

    def __init__(self, cache_path: str | os.PathLike[str], expected_digest: str | None = None) -> None:
        self.path = Path(cache_path)
        for attempt in range(OPEN_RETRIES):
            try:
                self._open(expected_digest)
                return
            except _Changed:
                self.close()
                logger.debug("cache %s changed while opening; retry %d", self.path, attempt + 1)
        raise CacheFileError(f"{self.path} kept changing while it was opened; try again")

    def _open(self, expected_digest: str | None) -> None:
        self.sources: list[_Source] = []
        self.spec: FeatureSpec | None = None
        self.attrs: dict[str, object] = {}
        headers = []
        main_stat = None
        absorbed: set[str] = set()
        if self.path.exists():
            if not h5py.is_hdf5(self.path):
                raise CacheFileError(
                    f"{self.path} is not an HDF5 file, so it is not a convcache cache. "
                    "Pass a file written by 'convcache extract', or move this file out of the cache folder."
                )
            main_stat = os.stat(self.path)
            handle = h5py.File(self.path, "r", locking=False)
            self.sources.append(_Source(self.path, handle, 0, 0))
            header = _header_of(handle, self.path, expected_digest)
            headers.append(header)
            self.attrs = header.attrs
            absorbed = set(json.loads(str(header.attrs.get("absorbed_segments", "[]"))))
        for segment in list_segments(self.path):
            if segment.name in absorbed:
                continue
            try:
                handle = h5py.File(segment, "r", locking=False)
            except FileNotFoundError as error:
                raise _Changed from error
            self.sources.append(_Source(segment, handle, 0, 0))
            headers.append(_header_of(handle, segment, expected_digest))
        if main_stat is not None:
            try:
                now = os.stat(self.path)
            except FileNotFoundError as error:
                raise _Changed from error
            if (now.st_ino, now.st_mtime_ns) != (main_stat.st_ino, main_stat.st_mtime_ns):
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
            columns.label = remap[columns.label] if len(columns) else columns.label
            if source.path != self.path:
                columns.present = np.ones(len(columns), bool)
            source.offset, source.n_rows = offset, len(columns)
            offset += len(columns)
            parts.append(columns)
        self.columns = _concat(parts)
        self.main_rows = self.sources[0].n_rows if main_stat is not None else 0

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

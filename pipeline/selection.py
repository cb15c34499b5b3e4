"""Row selections: which cache rows form each split, passed around instead of feature arrays.

A :class:`RowSelection` names a cache file and snapshot row indices plus a fingerprint of
the digests at those rows. It is small enough to hand to a Prefect task. The task opens
the cache itself with a :class:`RowReader`, which checks the fingerprint: when a writer
compacted the cache in between and rows moved, the task fails instead of mixing them up.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from pipeline.snapshot import CacheSnapshot
from pipeline.store import CacheFileError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSelection:
    """Sorted snapshot row indices of one cache, with the digest fingerprint they had when selected."""

    cache_path: str
    name: str
    rows: tuple[int, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def indices(self) -> np.ndarray:
        """The rows as an int64 array."""
        return np.asarray(self.rows, dtype=np.int64)


def fingerprint(snapshot: CacheSnapshot, rows: Sequence[int] | np.ndarray) -> str:
    """Return a sha256 over the digest, path and view of each row, in order."""
    cols = snapshot.columns
    digest = hashlib.sha256()
    for i in rows:
        digest.update(f"{cols.digest[i]}\t{cols.path[i]}\t{int(cols.view[i])}\n".encode())
    return digest.hexdigest()


def make_selection(snapshot: CacheSnapshot, name: str, rows: Sequence[int] | np.ndarray) -> RowSelection:
    """Build a :class:`RowSelection` of ``rows`` (sorted, so reads run forward through the file)."""
    rows = sorted(int(i) for i in rows)
    return RowSelection(str(snapshot.path), name, tuple(rows), fingerprint(snapshot, rows))


class RowReader:
    """Read features and labels of row selections from one cache, checking their fingerprints.

    Use as a context manager. Features are read with :meth:`CacheSnapshot.read_features`,
    either all at once or in windows of consecutive rows (:meth:`chunks`).
    """

    def __init__(self, cache_path: str | os.PathLike[str], spec_digest: str | None = None) -> None:
        self.snapshot = CacheSnapshot(cache_path, expected_digest=spec_digest)
        self.path = Path(cache_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the cache files."""
        self.snapshot.close()

    @property
    def feature_size(self) -> int:
        """Values per row once the features are flattened."""
        return int(np.prod(self.snapshot.feature_shape))

    def verify(self, selection: RowSelection) -> np.ndarray:
        """Return the selection's rows after checking they still hold the same images.

        Raises
        ------
        CacheFileError
            When a row index is out of range or its digest, path or view changed.
        """
        rows = selection.indices
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.snapshot.columns)):
            raise CacheFileError(f"{self.path} has {len(self.snapshot.columns)} rows, fewer than the {selection.name} "
                                 "selection expects; the cache changed during the run. Run the comparison again.")
        if fingerprint(self.snapshot, rows) != selection.fingerprint:
            raise CacheFileError(f"the {selection.name} rows of {self.path} changed after they were selected "
                                 "(another process rewrote the cache). Run the comparison again.")
        return rows

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """Return the class indices of ``rows``."""
        return self.snapshot.columns.label[rows].astype(np.int64)

    def features(self, rows: np.ndarray) -> np.ndarray:
        """Return the float32 features of ``rows``, in that order."""
        return self.snapshot.read_features(rows)

    def chunks(
        self,
        rows: np.ndarray,
        rows_per_chunk: int,
        rng: np.random.Generator | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(rows, features, labels)`` windows of at most ``rows_per_chunk`` rows.

        Windows are cut from the sorted rows so each read is sequential in the file. With
        ``rng``, the window order and the rows inside each window are shuffled for
        stochastic training. Without it, the windows come in row order.
        """
        ordered = np.sort(rows)
        starts = np.arange(0, len(ordered), max(1, int(rows_per_chunk)))
        if rng is not None:
            starts = rng.permutation(starts)
        for start in starts:
            window = ordered[start : start + rows_per_chunk]
            if rng is not None:
                window = rng.permutation(window)
            yield window, self.features(window), self.labels(window)

    def path_of(self, row: int) -> str:
        """Return the image path (relative to the data root) of a row."""
        return self.snapshot.columns.path[row]


__all__ = ["RowReader", "RowSelection", "fingerprint", "make_selection"]

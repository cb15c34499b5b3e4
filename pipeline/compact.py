"""Compaction: rewrite a cache file from its snapshot and the latest scan of the image tree."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec
from pipeline.store import Rows, list_segments, parts_dir, write_table

logger = logging.getLogger(__name__)

BLOCK_ROWS = 1024
# Attributes that write_table sets itself on every file.
RESERVED_ATTRS = ("format", "schema_version", "spec", "spec_digest", "classes", "feature_shape", "written_at")


@dataclass(frozen=True)
class IndexEntry:
    """One image of the latest scan, with the content digest that keys its features."""

    path: str
    label: int
    split: str
    size: int
    mtime_ns: int
    digest: str


def plan_rows(
    snapshot: CacheSnapshot | None,
    index: Sequence[IndexEntry],
    classes: Sequence[str],
    prune: bool = False,
) -> tuple[list[int], list[IndexEntry | None]]:
    """Choose the source row of every output row.

    Returns two aligned lists: the snapshot row to copy features from, and the index
    entry that supplies path, label and split (None for an orphan row, whose image is
    no longer in the tree and which is kept, marked absent, unless ``prune``).
    """
    newest: dict[tuple[str, int], int] = {}
    if snapshot is not None:
        cols = snapshot.columns
        for i, (digest, view) in enumerate(zip(cols.digest, cols.view, strict=True)):
            newest[(digest, int(view))] = i  # later rows (segments) win
    views_of: dict[str, list[int]] = {}
    for digest, view in newest:
        if view > 0:
            views_of.setdefault(digest, []).append(view)

    sources: list[int] = []
    owners: list[IndexEntry | None] = []
    referenced: set[str] = set()
    for entry in index:
        row = newest.get((entry.digest, 0))
        if row is None:
            continue
        referenced.add(entry.digest)
        sources.append(row)
        owners.append(entry)
        for view in sorted(views_of.get(entry.digest, [])):
            sources.append(newest[(entry.digest, view)])
            owners.append(entry)
    if not prune:
        for (digest, _view), row in sorted(newest.items(), key=lambda item: item[1]):
            if digest not in referenced:
                sources.append(row)
                owners.append(None)
    return sources, owners


def compact(
    cache_path: Path,
    spec: FeatureSpec,
    snapshot: CacheSnapshot | None,
    index: Sequence[IndexEntry],
    classes: Sequence[str],
    attrs: dict[str, Any],
    prune: bool = False,
) -> int:
    """Publish a new cache file that holds every committed row, ordered by the scan.

    Rows of the index come first, in scan order; rows of images that left the tree
    follow with ``present`` false (dropped when ``prune``). The names of the segments
    read, and of segments an earlier compaction absorbed but did not delete, are stored
    in ``absorbed_segments`` so readers skip them until they are deleted, which happens
    only after the new file is published. Returns the number of rows written.
    """
    sources, owners = plan_rows(snapshot, index, classes, prune)
    if snapshot is not None and snapshot.sources:
        feature_shape = snapshot.feature_shape
        absorbed = [p.name for p in snapshot.segment_paths] + _leftover_segments(cache_path, snapshot)
    else:
        feature_shape = tuple(attrs.pop("feature_shape_hint", (0,)))
        absorbed = []
    # Attributes that other modules added (an augmentation recipe, say) survive compaction.
    previous = dict(snapshot.attrs) if snapshot is not None else {}
    for key in RESERVED_ATTRS:
        previous.pop(key, None)
    attrs = {**previous, **attrs}
    attrs.pop("feature_shape_hint", None)
    attrs["absorbed_segments"] = json.dumps(absorbed)

    # Orphan rows keep their class name where the tree still has that class, else label -1.
    old_classes = snapshot.classes if snapshot is not None and snapshot.sources else []
    label_map = np.array([classes.index(c) if c in classes else -1 for c in old_classes] or [-1], np.int32)

    def blocks() -> Iterator[Rows]:
        for start in range(0, len(sources), BLOCK_ROWS):
            rows = sources[start : start + BLOCK_ROWS]
            who = owners[start : start + BLOCK_ROWS]
            cols = snapshot.columns
            features = snapshot.read_features(rows, dtype=spec.store_dtype)
            yield Rows(
                features=features,
                digest=[cols.digest[r] for r in rows],
                path=[cols.path[r] if w is None else w.path for r, w in zip(rows, who, strict=True)],
                label=np.array(
                    [label_map[cols.label[r]] if w is None else w.label for r, w in zip(rows, who, strict=True)], np.int32
                ),
                split=[cols.split[r] if w is None else w.split for r, w in zip(rows, who, strict=True)],
                size=np.array([cols.size[r] if w is None else w.size for r, w in zip(rows, who, strict=True)]),
                mtime_ns=np.array(
                    [cols.mtime_ns[r] if w is None else w.mtime_ns for r, w in zip(rows, who, strict=True)]
                ),
                view=np.array([cols.view[r] for r in rows], np.int16),
                present=np.array([w is not None for w in who], bool),
            )

    write_table(cache_path, spec, classes, blocks(), len(sources), tuple(feature_shape), attrs)
    logger.info("published %s with %d rows (%d segments absorbed)", cache_path, len(sources), len(absorbed))
    folder = parts_dir(cache_path)
    for name in absorbed:
        (folder / name).unlink(missing_ok=True)
    return len(sources)


def _leftover_segments(cache_path: Path, snapshot: CacheSnapshot) -> list[str]:
    """Return segments that the current cache file absorbed but a killed run did not delete.

    They stay listed in the next file's ``absorbed_segments`` until they are gone,
    because readers would count their rows twice once no cache file lists them.
    """
    listed = json.loads(str(snapshot.attrs.get("absorbed_segments", "[]")))
    on_disk = {p.name for p in list_segments(cache_path)}
    return [name for name in listed if name in on_disk]

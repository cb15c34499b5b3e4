"""Cache inspection (``convcache info``) and pruning (``convcache prune``)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.compact import compact
from pipeline.extract import plan_extraction, remove_stale_temporaries, scan_attrs
from pipeline.images import scan_tree
from pipeline.locking import CacheLock
from pipeline.snapshot import CacheSnapshot
from pipeline.store import list_segments, parts_dir, read_header

logger = logging.getLogger(__name__)


def describe_cache(cache_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a cache: spec, rows per split and class, failures, size and writer versions."""
    path = Path(cache_path)
    first_run = not path.exists() and bool(list_segments(path))
    if not path.exists() and not first_run:
        raise FileNotFoundError(f"cache file not found: {path}. Run 'convcache extract' first, or check the path.")
    if not first_run:
        read_header(path)  # rejects files that are not ours before anything else
    with CacheSnapshot(path) as snapshot:
        cols = snapshot.columns
        present = snapshot.select(split=None, present_only=True, views=False)
        per_split: dict[str, dict[str, int]] = {}
        for i in present:
            split = cols.split[i] or "(none)"
            label = cols.label[i]
            name = snapshot.classes[label] if label >= 0 else "(unknown)"
            per_split.setdefault(split, Counter())[name] += 1
        views = int((cols.view > 0).sum())
        absent = int((~cols.present).sum())
        attrs = snapshot.attrs
        return {
            "cache": str(path),
            "spec": json.loads(snapshot.spec.to_json()),
            "spec_digest": snapshot.spec.digest,
            "feature_shape": list(snapshot.feature_shape),
            "classes": snapshot.classes,
            "rows": len(cols),
            "images": len(present),
            "rows_per_split": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
            "augmented_rows": views,
            "absent_rows": absent,
            "failed": len(json.loads(str(attrs.get("failed", "[]")))),
            "conflicts": len(json.loads(str(attrs.get("conflicts", "[]")))),
            "pending_segments": len(snapshot.segment_paths),
            "file_bytes": snapshot.file_bytes,  # measured at open: a compaction may delete segments
            "data_root": str(attrs.get("data_root", "")),
            "written_at": str(attrs.get("written_at", "")),
            "library_versions": json.loads(str(attrs.get("library_versions", "{}"))),
        }


class PruneError(ValueError):
    """Raised when a prune looks like it was given the wrong data folder."""


def prune_cache(
    cache_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Drop the rows of images that are no longer under ``data_dir``; returns rows before and after.

    Images of the tree that the cache does not hold yet are not computed: run
    ``convcache extract`` for that. Unless ``force``, a prune that would remove more
    than half of the rows of a cache extracted from another folder is rejected, since
    that usually means the wrong folder was passed.
    """
    path = Path(cache_path)
    if not path.exists():
        raise FileNotFoundError(f"cache file not found: {path}. Check the path, or run 'convcache extract' first.")
    header = read_header(path)
    manifest = scan_tree(data_dir)
    with CacheLock(path, timeout=lock_timeout, enabled=use_lock):
        remove_stale_temporaries(path)
        with CacheSnapshot(path, expected_digest=header.spec.digest) as snapshot:
            before = len(snapshot.columns)
            plan = plan_extraction(manifest, snapshot)
            attrs = scan_attrs(manifest, plan.failures, plan.conflicts)
            not_cached = set(plan.todo_digests)
            index = [e for e in plan.index if e.digest not in not_cached]
            stored_root = str(snapshot.attrs.get("data_root", ""))
            kept = len({e.digest for e in index})
            if not force and stored_root != str(manifest.root) and kept < before / 2:
                raise PruneError(
                    f"{manifest.root} holds {kept} of the {before} cached images, and the cache was extracted "
                    f"from {stored_root}. Check the folder, or pass --force to prune anyway."
                )
            after = compact(path, header.spec, snapshot, index, manifest.classes, attrs, prune=True)
    logger.info("pruned %s: %d rows before, %d after", path, before, after)
    return {"cache": str(path), "rows_before": before, "rows_after": after, "removed": before - after,
            "not_cached": len(plan.todo), "parts": str(parts_dir(path))}

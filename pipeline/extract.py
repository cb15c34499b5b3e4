"""Incremental extraction: scan a tree, compute only what the cache lacks, commit, compact."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.compact import IndexEntry, compact
from pipeline.images import ImageEntry, Manifest, file_digest, scan_tree
from pipeline.locking import CacheLock
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec
from pipeline.compute import INFERENCE_STREAMS, DeferredExtractor, Failure, ProgressCallback, WorkItem, compute_rows
from pipeline.store import list_segments, parts_dir
from pipeline.versions import library_versions

logger = logging.getLogger(__name__)



class CacheFolderError(OSError):
    """Raised when the cache folder cannot be created or written."""


@dataclass
class ExtractSummary:
    """Outcome of one extraction run, as printed by ``convcache extract --json``."""

    cache: str
    images: int
    computed: int
    reused: int
    failed: list[dict[str, str]]
    conflicts: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    warnings: list[str]
    classes: list[str]
    seconds: float
    images_per_second: float
    segments_committed: int = 0
    rows: int = 0
    built_model: bool = False
    # Seconds spent importing TensorFlow and building the conv base; 0.0 when none was built.
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON-serialisable data."""
        return asdict(self)


@dataclass
class ExtractPlan:
    """What a run must do: the scan's index, the images to compute and the known failures."""

    manifest: Manifest
    index: list[IndexEntry]
    todo: list[ImageEntry]
    todo_digests: list[str]
    failures: list[Failure]
    conflicts: list[dict[str, Any]]
    unchanged: bool
    reused: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_cache_dir(cache_dir: Path) -> None:
    """Create the cache folder if needed and fail early if it is not writable."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheFolderError(
            f"cannot create cache folder {cache_dir}: {error.strerror}. Pass a writable --cache-dir."
        ) from error
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise CacheFolderError(f"cache folder {cache_dir} is not writable. Pass a writable --cache-dir or fix its permissions.")


def _hash_entries(entries: Sequence[ImageEntry], workers: int) -> list[str | Exception]:
    def one(entry: ImageEntry) -> str | Exception:
        try:
            return file_digest(entry.abs_path)
        except OSError as error:
            return error

    if len(entries) < 64:
        return [one(e) for e in entries]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, entries))


def plan_extraction(manifest: Manifest, snapshot: CacheSnapshot | None, workers: int = 4) -> ExtractPlan:
    """Compare a scan with a snapshot and decide which images need the conv base.

    An image whose path, size and modification time match a cached row keeps that row's
    digest without being read; every other image is hashed. Images whose digest the
    cache already holds, or that failed to decode before, are not computed again.
    """
    known_by_path: dict[str, tuple[int, int, str]] = {}
    known_digests: set[str] = set()
    previous_failures: dict[str, str] = {}
    if snapshot is not None:
        cols = snapshot.columns
        for i in range(len(cols)):
            if cols.view[i] == 0:
                known_by_path[cols.path[i]] = (int(cols.size[i]), int(cols.mtime_ns[i]), cols.digest[i])
                known_digests.add(cols.digest[i])
        for item in json.loads(str(snapshot.attrs.get("failed", "[]"))):
            if item.get("digest"):
                previous_failures[item["digest"]] = item["reason"]

    digests: list[str | Exception | None] = []
    to_hash: list[int] = []
    for i, entry in enumerate(manifest.entries):
        known = known_by_path.get(entry.path)
        # NOTE: two files of equal size and mtime_ns that swap paths (same-sized BMPs unpacked from one
        # archive, say) keep their old digests. Change detection by size and mtime cannot see that.
        if known is not None and known[0] == entry.size and known[1] == entry.mtime_ns:
            digests.append(known[2])
        else:
            digests.append(None)
            to_hash.append(i)
    for i, value in zip(to_hash, _hash_entries([manifest.entries[i] for i in to_hash], workers), strict=True):
        digests[i] = value

    index: list[IndexEntry] = []
    failures: list[Failure] = [Failure(path, reason) for path, reason in manifest.skipped]
    todo: list[ImageEntry] = []
    todo_digests: list[str] = []
    scheduled: set[str] = set()
    labels_of: dict[str, dict[str, int]] = {}
    reused = 0
    for entry, digest in zip(manifest.entries, digests, strict=True):
        if isinstance(digest, Exception):
            failures.append(Failure(entry.path, f"cannot read file: {digest}"))
            continue
        assert digest is not None
        if digest in previous_failures:
            failures.append(Failure(entry.path, previous_failures[digest], digest))
            continue
        index.append(IndexEntry(entry.path, entry.label, entry.split, entry.size, entry.mtime_ns, digest))
        labels_of.setdefault(digest, {})[entry.path] = entry.label
        if digest in known_digests:
            reused += 1
        elif digest not in scheduled:
            scheduled.add(digest)
            todo.append(entry)
            todo_digests.append(digest)

    conflicts = []
    for digest, paths in labels_of.items():
        if len(set(paths.values())) > 1:
            names = {p: manifest.classes[label] for p, label in paths.items()}
            conflicts.append({"digest": digest, "paths": names})
            logger.warning("same image bytes under several classes: %s", ", ".join(sorted(names)))

    unchanged = False
    if snapshot is not None and not todo and not snapshot.segment_paths:
        cols = snapshot.columns
        stored = {
            (cols.path[i], int(cols.label[i]), cols.split[i], int(cols.size[i]), int(cols.mtime_ns[i]), cols.digest[i])
            for i in range(len(cols))
            if cols.present[i] and cols.view[i] == 0
        }
        current = {(e.path, e.label, e.split, e.size, e.mtime_ns, e.digest) for e in index}
        stored_failed = json.loads(str(snapshot.attrs.get("failed", "[]")))
        # A moved tree has the same rows but a new data_root, which must be published.
        unchanged = (
            stored == current
            and snapshot.classes == manifest.classes
            and _sorted_failures(stored_failed) == _sorted_failures([asdict(f) for f in failures])
            and str(snapshot.attrs.get("data_root", "")) == str(manifest.root)
        )
    return ExtractPlan(manifest, index, todo, todo_digests, failures, conflicts, unchanged, reused)


def _sorted_failures(failures: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return sorted((f.get("path", ""), f.get("reason", ""), f.get("digest", "")) for f in failures)


def remove_stale_temporaries(cache_path: Path) -> None:
    """Delete temporary files that a killed writer left; call only while holding the lock."""
    prefix = f".{cache_path.name}.tmp-"
    for candidate in cache_path.parent.glob(f"{prefix}*"):
        candidate.unlink(missing_ok=True)
    folder = parts_dir(cache_path)
    if folder.is_dir():
        for candidate in folder.glob(".seg-*.tmp-*"):
            candidate.unlink(missing_ok=True)


def extract_features(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spec: FeatureSpec,
    batch_size: int = 32,
    commit_rows: int = 512,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
    decode_workers: int | None = None,
    progress: ProgressCallback | None = None,
    extractor_factory: Callable[[FeatureSpec], Callable[[np.ndarray], np.ndarray]] | None = None,
    streams: int = INFERENCE_STREAMS,
) -> ExtractSummary:
    """Bring the cache of ``spec`` up to date with the images under ``data_dir``.

    Only images whose content digest the cache lacks go through the conv base, and the
    base is not built at all when there are none. ``streams`` batches run through the
    base at once, so an extractor from ``extractor_factory`` must be thread-safe unless
    ``streams`` is 1. See :mod:`pipeline.store` for how rows are committed.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    cache_dir = Path(cache_dir).expanduser()
    manifest = scan_tree(data_dir)
    check_cache_dir(cache_dir)
    cache_path = cache_dir / spec.cache_name
    if extractor_factory is None:
        from pipeline.extractor import FeatureExtractor

        extractor_factory = FeatureExtractor

    with CacheLock(cache_path, timeout=lock_timeout, enabled=use_lock):
        remove_stale_temporaries(cache_path)
        snapshot = open_cache_snapshot(cache_path, spec)
        try:
            plan = plan_extraction(manifest, snapshot)
        finally:
            if snapshot is not None:
                snapshot.close()
        logger.info(
            "%s: %d images, %d cached, %d to compute, %d failed", data_dir, len(plan.index), plan.reused,
            len(plan.todo), len(plan.failures),
        )
        failures = list(plan.failures)
        committed = segments = 0
        built, build_seconds = False, 0.0
        if plan.todo:
            # Built on the first batch, so a run in which nothing decodes builds no model.
            extractor = DeferredExtractor(lambda: extractor_factory(spec))
            work = [WorkItem(e, d) for e, d in zip(plan.todo, plan.todo_digests, strict=True)]
            new_failures, committed, segments = compute_rows(
                cache_path, spec, manifest.classes, work, extractor,
                batch_size=batch_size, commit_rows=commit_rows, decode_workers=decode_workers, progress=progress,
                streams=streams,
            )
            built, build_seconds = extractor.built, extractor.build_seconds
            failures += new_failures
            failed_digests = {f.digest for f in new_failures}
            failed_paths = {f.path for f in failures}
            failures += [
                Failure(e.path, next(f.reason for f in new_failures if f.digest == e.digest), e.digest)
                for e in plan.index
                if e.digest in failed_digests and e.path not in failed_paths
            ]
        rows = 0
        if not plan.unchanged:
            rows = publish_cache(cache_path, spec, manifest, plan.index, failures, plan.conflicts)
        elif snapshot is not None:
            rows = len(snapshot.columns)

    seconds = time.perf_counter() - started
    failed = sorted(({"path": f.path, "reason": f.reason} for f in failures), key=lambda f: f["path"])
    return ExtractSummary(
        cache=str(cache_path),
        images=len(manifest.entries) + len(manifest.skipped),
        computed=committed,
        reused=plan.reused,
        failed=failed,
        conflicts=plan.conflicts,
        skipped=[{"path": p, "reason": r} for p, r in manifest.skipped],
        warnings=list(manifest.warnings),
        classes=list(manifest.classes),
        seconds=round(seconds, 3),
        images_per_second=round(committed / seconds, 2) if seconds > 0 else 0.0,
        segments_committed=segments,
        rows=rows,
        built_model=built,
        build_seconds=round(build_seconds, 3),
    )


def open_cache_snapshot(cache_path: Path, spec: FeatureSpec) -> CacheSnapshot | None:
    """Open a snapshot of the cache of ``spec``, or return None when it has no file and no segment."""
    if not cache_path.exists() and not list_segments(cache_path):
        return None
    return CacheSnapshot(cache_path, expected_digest=spec.digest)


def scan_attrs(manifest: Manifest, failures: Sequence[Failure], conflicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the cache file attributes that describe the scan: failures, conflicts, root, versions."""
    return {
        "failed": [asdict(f) for f in failures],
        "conflicts": conflicts,
        "data_root": str(manifest.root),
        "library_versions": library_versions(),
    }


def publish_cache(
    cache_path: Path,
    spec: FeatureSpec,
    manifest: Manifest,
    index: Iterable[IndexEntry],
    failures: Sequence[Failure],
    conflicts: list[dict[str, Any]],
) -> int:
    """Compact the cache file and its segments into a new cache file ordered by ``index``.

    Call only while holding the cache's :class:`~pipeline.locking.CacheLock`. Returns
    the number of rows written.
    """
    failed_digests = {f.digest for f in failures if f.digest}
    kept = [e for e in index if e.digest not in failed_digests]
    attrs = scan_attrs(manifest, failures, conflicts)
    snapshot = open_cache_snapshot(cache_path, spec)
    try:
        if snapshot is None:
            attrs["feature_shape_hint"] = (0,)
        return compact(cache_path, spec, snapshot, kept, manifest.classes, attrs)
    finally:
        if snapshot is not None:
            snapshot.close()

"""Incremental extraction: scan a tree, compute only what the cache lacks, commit, compact."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.compact import IndexEntry, compact
from pipeline.images import ImageDecodeError, ImageEntry, Manifest, file_digest, load_image, scan_tree
from pipeline.locking import CacheLock
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec
from pipeline.store import Rows, list_segments, parts_dir, publish_segment
from pipeline.versions import library_versions

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class CacheFolderError(OSError):
    """Raised when the cache folder cannot be created or written."""


@dataclass
class Failure:
    """An image that produced no row, and why."""

    path: str
    reason: str
    digest: str = ""


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
        stored_classes = snapshot.classes
        stored_failed = json.loads(str(snapshot.attrs.get("failed", "[]")))
        unchanged = (
            stored == current
            and stored_classes == manifest.classes
            and stored_failed == [asdict(f) for f in failures]
        )
    return ExtractPlan(manifest, index, todo, todo_digests, failures, conflicts, unchanged, reused)


def _decoded(
    entries: Sequence[ImageEntry], digests: Sequence[str], spec: FeatureSpec, workers: int, lookahead: int
) -> Iterator[tuple[ImageEntry, str, np.ndarray | ImageDecodeError]]:
    """Decode images on a thread pool, ``lookahead`` ahead of the consumer, in input order."""

    def one(entry: ImageEntry) -> np.ndarray | ImageDecodeError:
        try:
            return load_image(
                entry.abs_path,
                spec.input_size,
                resize=spec.resize,
                draft=spec.jpeg_draft,
                exif_transpose=spec.exif_transpose,
            )
        except ImageDecodeError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: queue.SimpleQueue[tuple[ImageEntry, str, Future[Any]]] = queue.SimpleQueue()
        submitted = 0
        for submitted in range(min(lookahead, len(entries))):
            pending.put((entries[submitted], digests[submitted], pool.submit(one, entries[submitted])))
        next_index = min(lookahead, len(entries))
        for _ in range(len(entries)):
            entry, digest, future = pending.get()
            if next_index < len(entries):
                pending.put((entries[next_index], digests[next_index], pool.submit(one, entries[next_index])))
                next_index += 1
            yield entry, digest, future.result()


class _SegmentWriter:
    """Background thread that commits finished rows as segment files, off the compute path."""

    def __init__(self, cache_path: Path, spec: FeatureSpec, classes: Sequence[str], commit_rows: int) -> None:
        self.cache_path = cache_path
        self.spec = spec
        self.classes = list(classes)
        self.commit_rows = commit_rows
        self.queue: queue.Queue[tuple[list[ImageEntry], list[str], np.ndarray] | None] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.committed_segments = 0
        self.committed_rows = 0
        self._thread = threading.Thread(target=self._run, name="segment-writer", daemon=True)
        self._thread.start()

    def put(self, entries: list[ImageEntry], digests: list[str], features: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((entries, digests, features))

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        buffer: list[tuple[list[ImageEntry], list[str], np.ndarray]] = []
        buffered = 0
        while True:
            item = self.queue.get()
            if item is not None:
                buffer.append(item)
                buffered += len(item[0])
            if buffered and (item is None or buffered >= self.commit_rows):
                try:
                    self._commit(buffer)
                except BaseException as error:  # re-raised in the compute thread by put() or close()
                    self.error = error
                    logger.error("segment commit to %s failed: %s", parts_dir(self.cache_path), error)
                    return
                buffer, buffered = [], 0
            if item is None:
                return

    def _commit(self, buffer: list[tuple[list[ImageEntry], list[str], np.ndarray]]) -> None:
        entries = [e for part in buffer for e in part[0]]
        rows = Rows(
            features=np.concatenate([part[2] for part in buffer]),
            digest=[d for part in buffer for d in part[1]],
            path=[e.path for e in entries],
            label=np.array([e.label for e in entries], np.int32),
            split=[e.split for e in entries],
            size=np.array([e.size for e in entries], np.int64),
            mtime_ns=np.array([e.mtime_ns for e in entries], np.int64),
            view=np.zeros(len(entries), np.int16),
            present=np.ones(len(entries), bool),
        )
        publish_segment(self.cache_path, self.spec, self.classes, rows)
        self.committed_segments += 1
        self.committed_rows += len(rows)


def compute_rows(
    cache_path: Path,
    spec: FeatureSpec,
    classes: Sequence[str],
    todo: Sequence[ImageEntry],
    todo_digests: Sequence[str],
    extractor: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 32,
    commit_rows: int = 512,
    decode_workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[Failure], int, int]:
    """Run the conv base over ``todo`` and commit the rows as segments.

    Returns the decode failures, the number of rows committed and of segments written.
    """
    workers = decode_workers or max(2, os.cpu_count() or 2)
    writer = _SegmentWriter(cache_path, spec, classes, commit_rows)
    failures: list[Failure] = []
    batch: list[np.ndarray] = []
    batch_entries: list[ImageEntry] = []
    batch_digests: list[str] = []
    done = 0

    def flush() -> None:
        features = extractor(np.stack(batch))
        writer.put(list(batch_entries), list(batch_digests), features)
        batch.clear()
        batch_entries.clear()
        batch_digests.clear()

    try:
        for entry, digest, image in _decoded(todo, todo_digests, spec, workers, lookahead=batch_size * 3):
            done += 1
            if isinstance(image, ImageDecodeError):
                failures.append(Failure(entry.path, image.reason, digest))
                logger.warning("skipped %s: %s", entry.path, image.reason)
            else:
                batch.append(image)
                batch_entries.append(entry)
                batch_digests.append(digest)
                if len(batch) == batch_size:
                    flush()
            if progress is not None:
                progress(done, len(todo))
        if batch:
            flush()
    finally:
        writer.close()
    return failures, writer.committed_rows, writer.committed_segments


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
) -> ExtractSummary:
    """Bring the cache of ``spec`` up to date with the images under ``data_dir``.

    Only images whose content digest the cache lacks go through the conv base, and the
    base is not built at all when there are none. See :mod:`pipeline.store` for how
    rows are committed.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    manifest = scan_tree(data_dir)
    check_cache_dir(cache_dir)
    cache_path = cache_dir / spec.cache_name
    if extractor_factory is None:
        from pipeline.extractor import FeatureExtractor

        extractor_factory = FeatureExtractor

    with CacheLock(cache_path, timeout=lock_timeout, enabled=use_lock):
        remove_stale_temporaries(cache_path)
        snapshot = _open_snapshot(cache_path, spec)
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
        built = False
        if plan.todo:
            extractor = extractor_factory(spec)
            built = True
            new_failures, committed, segments = compute_rows(
                cache_path, spec, manifest.classes, plan.todo, plan.todo_digests, extractor,
                batch_size=batch_size, commit_rows=commit_rows, decode_workers=decode_workers, progress=progress,
            )
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
            rows = _publish(cache_path, spec, manifest, plan.index, failures, plan.conflicts)
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
    )


def _open_snapshot(cache_path: Path, spec: FeatureSpec) -> CacheSnapshot | None:
    if not cache_path.exists() and not list_segments(cache_path):
        return None
    return CacheSnapshot(cache_path, expected_digest=spec.digest)


def _publish(
    cache_path: Path,
    spec: FeatureSpec,
    manifest: Manifest,
    index: Iterable[IndexEntry],
    failures: Sequence[Failure],
    conflicts: list[dict[str, Any]],
) -> int:
    failed_digests = {f.digest for f in failures if f.digest}
    kept = [e for e in index if e.digest not in failed_digests]
    attrs: dict[str, Any] = {
        "failed": [asdict(f) for f in failures],
        "conflicts": conflicts,
        "data_root": str(manifest.root),
        "library_versions": library_versions(),
    }
    snapshot = _open_snapshot(cache_path, spec)
    try:
        if snapshot is None:
            attrs["feature_shape_hint"] = (0,)
        return compact(cache_path, spec, snapshot, kept, manifest.classes, attrs)
    finally:
        if snapshot is not None:
            snapshot.close()

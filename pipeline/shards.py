"""Sharded extraction: split the images to compute into shards that separate workers run.

The caller (a Prefect flow on a Dask cluster, or a plain loop) supplies a function that
runs a list of :class:`Shard` objects and returns one :class:`ShardResult` each.
:func:`extract_sharded` does the rest in the calling process:

1. take the cache's writer lock and hold it for the whole run,
2. scan the tree and plan as :func:`pipeline.extract.plan_extraction` does,
3. hand the shards to the runner; every worker process runs :func:`run_shard`, which
   builds the conv base once per process (:func:`worker_extractor`) and publishes the
   rows of one shard as one segment file in ``NAME.h5.parts/``,
4. compact the segments into the cache file (:func:`pipeline.extract.publish_cache`).

Shards carry plain data (paths, sizes, digests) and return small summaries; the
features travel only through the segment files, so the workers need the cache folder
on a file system they share with the caller, mounted at the same path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.compute import Failure, WorkItem, compute_rows
from pipeline.extract import (
    ExtractPlan,
    ExtractSummary,
    check_cache_dir,
    open_cache_snapshot,
    plan_extraction,
    publish_cache,
    remove_stale_temporaries,
)
from pipeline.images import ImageEntry, scan_tree
from pipeline.locking import CacheLock
from pipeline.spec import FeatureSpec, resolve_weights, sha256_file
from pipeline.store import list_segments, parts_dir

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256
# A conv base as FeatureExtractor wraps it: uint8 images in, float32 feature rows out.
Extractor = Callable[[np.ndarray], np.ndarray]


class ShardError(RuntimeError):
    """Raised when shards stay lost after every attempt; committed shards are kept."""


class FilesVanishedError(OSError):
    """Raised by :func:`run_shard` when images disappeared after the scan listed them.

    The rows of every other image of the shard are committed before it is raised, so a
    retry (which passes ``skip_committed=True``) reads only the missing files again.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        listed = ", ".join(self.paths[:5]) + (f" and {len(self.paths) - 5} more" if len(self.paths) > 5 else "")
        super().__init__(f"{len(self.paths)} images vanished after the scan listed them: {listed}")


@dataclass(frozen=True)
class ShardItem:
    """One image of a shard, as plain data that pickles cheaply to a worker."""

    path: str
    abs_path: str
    label: int
    class_name: str
    split: str
    size: int
    mtime_ns: int
    digest: str

    def work_item(self) -> WorkItem:
        """Rebuild the :class:`~pipeline.compute.WorkItem` that ``compute_rows`` takes."""
        entry = ImageEntry(self.path, Path(self.abs_path), self.label, self.class_name, self.split,
                           self.size, self.mtime_ns)
        return WorkItem(entry, self.digest)


@dataclass(frozen=True)
class Shard:
    """A slice of the images to compute, and what its worker needs to know about the run.

    ``known_segments`` names the segment files that existed when the run was planned;
    a retried shard skips only digests committed by segments written since.
    """

    index: int
    items: tuple[ShardItem, ...]
    classes: tuple[str, ...]
    known_segments: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ShardResult:
    """Summary of one execution of a shard; the features themselves are in its segment file."""

    index: int
    computed: int
    skipped_committed: int
    segments: int
    failures: list[dict[str, str]]
    vanished: list[str]
    seconds: float
    worker: str
    built_model: bool


@dataclass
class ShardedSummary(ExtractSummary):
    """An :class:`~pipeline.extract.ExtractSummary` plus how the shards ran."""

    shards: int = 0
    shard_size: int = 0
    workers: list[str] = field(default_factory=list)
    models_built: int = 0
    vanished: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- planning


def split_into_shards(
    plan: ExtractPlan, shard_size: int, known_segments: Sequence[str] = ()
) -> list[Shard]:
    """Cut the images that ``plan`` must compute into shards of at most ``shard_size``.

    Shards keep scan order, so consecutive files of a folder stay together.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 image, got {shard_size}")
    items = [
        ShardItem(e.path, str(e.abs_path), e.label, e.class_name, e.split, e.size, e.mtime_ns, digest)
        for e, digest in zip(plan.todo, plan.todo_digests, strict=True)
    ]
    classes = tuple(plan.manifest.classes)
    known = frozenset(known_segments)
    return [
        Shard(index, tuple(items[start : start + shard_size]), classes, known)
        for index, start in enumerate(range(0, len(items), shard_size))
    ]


# --------------------------------------------------------------------------- worker side

# One extractor per feature spec per process: a Dask worker process builds the conv base
# for its first shard and reuses it for every later shard of the same spec.
_EXTRACTORS: dict[str, Extractor] = {}  # keyed by spec digest
_EXTRACTORS_LOCK = threading.Lock()


def configure_tf_threads(threads: int) -> None:
    """Limit TensorFlow to ``threads`` intra-op threads and one inter-op thread.

    The limit takes effect only before TensorFlow runs its first operation in this
    process, so call it before the first extractor is built. A later call logs a warning.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as error:
        logger.warning("TensorFlow already started in pid %d, thread limit %d not applied: %s",
                       os.getpid(), threads, error)


def _verified_weights(spec: FeatureSpec) -> str | None:
    """Resolve the spec's weights on this host and check that they hash to its digest."""
    label = "none" if spec.weights_digest == "none" else spec.weights
    path = resolve_weights(spec.base, label, spec.alpha, spec.input_size)
    if path is None:
        return None
    digest = sha256_file(path)
    if digest != spec.weights_digest:
        raise ValueError(
            f"weights file {path} on host {socket.gethostname()} has sha256 {digest[:12]}, "
            f"not the {spec.weights_digest[:12]} of the feature spec. Give every worker the same weights file."
        )
    return path


def worker_extractor(spec: FeatureSpec, tf_threads: int | None = None) -> tuple[Extractor, bool]:
    """Return this process's extractor for ``spec`` and whether this call built it.

    The first call for a spec checks the weights file, applies ``tf_threads`` and
    builds the conv base; later calls return the same object.
    """
    with _EXTRACTORS_LOCK:
        extractor = _EXTRACTORS.get(spec.digest)
        if extractor is not None:
            return extractor, False
        from pipeline.extractor import FeatureExtractor

        weights_path = _verified_weights(spec)
        if tf_threads is not None:
            configure_tf_threads(tf_threads)
        started = time.perf_counter()
        extractor = FeatureExtractor(spec, weights_path=weights_path)
        logger.info("pid %d built %s in %.1f s", os.getpid(), spec.base, time.perf_counter() - started)
        _EXTRACTORS[spec.digest] = extractor
        return extractor, True


def committed_digests(cache_path: Path, known_segments: frozenset[str]) -> set[str]:
    """Return the digests (view 0) committed by segments not in ``known_segments``."""
    digests: set[str] = set()
    for segment in list_segments(cache_path):
        if segment.name in known_segments:
            continue
        try:
            with h5py.File(segment, "r", locking=False) as handle:
                views = handle["view"][:]
                values = handle["digest"][:]
        except FileNotFoundError:
            continue  # absorbed by a compaction meanwhile; its rows are in the cache file
        digests.update(d.decode() for d, v in zip(values, views, strict=True) if v == 0)
    return digests


def run_shard(
    cache_path: str | os.PathLike[str],
    spec: FeatureSpec,
    shard: Shard,
    batch_size: int = 32,
    decode_workers: int = 2,
    tf_threads: int | None = None,
    skip_committed: bool = False,
    final_attempt: bool = True,
) -> ShardResult:
    """Compute the rows of one shard and publish them as one segment file.

    Runs in a worker process. With ``skip_committed`` (a retry), images that a segment
    written during this run already contains are not computed again. Images whose file
    vanished after the scan are reported in ``vanished``; unless ``final_attempt``, they
    raise :class:`FilesVanishedError` instead, after the other rows are committed.

    Raises
    ------
    FileNotFoundError
        When the cache folder does not exist on this host (no shared file system).
    FilesVanishedError
        As described above.
    """
    started = time.perf_counter()
    cache_path = Path(cache_path)
    if not cache_path.parent.is_dir():
        raise FileNotFoundError(
            f"cache folder {cache_path.parent} not found on host {socket.gethostname()}. Shards write their "
            "segments there, so every worker needs it on a shared file system mounted at the same path."
        )
    work = [item.work_item() for item in shard.items]
    skipped = 0
    if skip_committed:
        done = committed_digests(cache_path, shard.known_segments)
        skipped = sum(1 for w in work if w.digest in done)
        work = [w for w in work if w.digest not in done]

    extractor, built = (None, False) if not work else worker_extractor(spec, tf_threads)
    failures: list[Failure] = []
    committed = segments = 0
    if work:
        failures, committed, segments = compute_rows(
            cache_path, spec, shard.classes, work, extractor, batch_size=batch_size,
            # One stream: a worker's TensorFlow has a fixed thread budget (tf_threads), and
            # a second stream was measured only for a whole machine, not per Dask worker.
            commit_rows=len(work), decode_workers=decode_workers, streams=1,
        )
    by_path = {item.path: item.abs_path for item in shard.items}
    # "file not found" is recorded when the decode ran, so a file that reappears before
    # this check still counts as vanished and the retry picks it up.
    vanished = [f.path for f in failures if f.reason == "file not found" or not os.path.lexists(by_path[f.path])]
    if vanished and not final_attempt:
        raise FilesVanishedError(vanished)
    vanished_paths = set(vanished)
    decode_failures = [asdict(f) for f in failures if f.path not in vanished_paths]
    seconds = time.perf_counter() - started
    logger.info("shard %d: %d computed, %d already committed, %d failed, %d vanished in %.1f s (pid %d)",
                shard.index, committed, skipped, len(decode_failures), len(vanished), seconds, os.getpid())
    return ShardResult(
        index=shard.index,
        computed=committed,
        skipped_committed=skipped,
        segments=segments,
        failures=decode_failures,
        vanished=vanished,
        seconds=round(seconds, 3),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        built_model=built,
    )


# --------------------------------------------------------------------------- orchestration

ShardRunner = Callable[[list[Shard]], list[ShardResult]]


def _merge_failures(plan: ExtractPlan, results: Sequence[ShardResult]) -> list[Failure]:
    """Add the shards' decode failures to the plan's, once for every path of a failed digest."""
    failures = list(plan.failures)
    new = [Failure(**f) for r in results for f in r.failures]
    failures += new
    reason_of = {f.digest: f.reason for f in new}
    failed_paths = {f.path for f in failures}
    failures += [
        Failure(e.path, reason_of[e.digest], e.digest)
        for e in plan.index
        if e.digest in reason_of and e.path not in failed_paths
    ]
    return failures


def extract_sharded(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spec: FeatureSpec,
    run_shards: ShardRunner,
    shard_size: int = DEFAULT_SHARD_SIZE,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
) -> ShardedSummary:
    """Bring the cache of ``spec`` up to date, computing the missing rows shard by shard.

    The writer lock is held from the scan to the compaction, so a second run of the
    same cache waits up to ``lock_timeout`` seconds (then raises
    :class:`~pipeline.locking.CacheLockError`) and always plans against a finished cache.

    Raises
    ------
    ShardError
        When ``run_shards`` returns no result for some shards. The cache file is not
        rewritten then; committed shards stay as segments and the next run skips them.
    """
    started = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 image, got {shard_size}")
    cache_dir = Path(cache_dir).expanduser()
    check_cache_dir(cache_dir)
    cache_path = cache_dir / spec.cache_name

    with CacheLock(cache_path, timeout=lock_timeout, enabled=use_lock):
        # Scanning under the lock means that a writer which adds images while holding the
        # lock is seen either completely or not at all.
        manifest = scan_tree(data_dir)
        remove_stale_temporaries(cache_path)
        snapshot = open_cache_snapshot(cache_path, spec)
        try:
            plan = plan_extraction(manifest, snapshot)
        finally:
            if snapshot is not None:
                snapshot.close()
        known = [p.name for p in list_segments(cache_path)]
        shards = split_into_shards(plan, shard_size, known)
        logger.info("%s: %d images, %d cached, %d to compute in %d shards of up to %d", data_dir,
                    len(plan.index), plan.reused, len(plan.todo), len(shards), shard_size)

        results = run_shards(shards) if shards else []
        missing = sorted({s.index for s in shards} - {r.index for r in results})
        if missing:
            raise ShardError(
                f"{len(missing)} of {len(shards)} shards produced no result (shards {missing[:10]}). "
                f"Committed shards are kept in {parts_dir(cache_path)}; run again to compute the rest."
            )
        failures = _merge_failures(plan, results)
        vanished = sorted(p for r in results for p in r.vanished)
        for path in vanished:
            logger.warning("vanished after the scan, not cached: %s", path)
        rows = 0
        if not plan.unchanged:
            rows = publish_cache(cache_path, spec, manifest, plan.index, failures, plan.conflicts)
        elif snapshot is not None:
            rows = len(snapshot.columns)

    seconds = time.perf_counter() - started
    # Rows that an earlier, failed attempt of a shard committed count as computed in this run.
    computed = sum(r.computed + r.skipped_committed for r in results)
    return ShardedSummary(
        cache=str(cache_path),
        images=len(manifest.entries) + len(manifest.skipped),
        computed=computed,
        reused=plan.reused,
        failed=sorted(({"path": f.path, "reason": f.reason} for f in failures), key=lambda f: f["path"]),
        conflicts=plan.conflicts,
        skipped=[{"path": p, "reason": r} for p, r in manifest.skipped],
        warnings=list(manifest.warnings),
        classes=list(manifest.classes),
        seconds=round(seconds, 3),
        images_per_second=round(computed / seconds, 2) if seconds > 0 else 0.0,
        segments_committed=sum(r.segments for r in results),
        rows=rows,
        built_model=any(r.built_model for r in results),
        shards=len(shards),
        shard_size=shard_size,
        workers=sorted({r.worker for r in results}),
        models_built=sum(1 for r in results if r.built_model),
        vanished=vanished,
    )


def run_shards_in_process(
    cache_path: Path, spec: FeatureSpec, batch_size: int = 32, decode_workers: int | None = None
) -> ShardRunner:
    """Return a :data:`ShardRunner` that runs the shards one after another in this process."""

    def run(shards: list[Shard]) -> list[ShardResult]:
        return [
            run_shard(cache_path, spec, shard, batch_size=batch_size, decode_workers=decode_workers or 2)
            for shard in shards
        ]

    return run

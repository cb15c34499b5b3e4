"""The compute path: decode on a thread pool, run the conv base, commit segments off-thread."""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.images import ImageDecodeError, ImageEntry, load_image
from pipeline.spec import FeatureSpec, SpecError
from pipeline.store import Rows, parts_dir, publish_segment

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# Turns a work item into a (size, size, 3) uint8 image, or raises ImageDecodeError.
DecodeFunction = Callable[["WorkItem", FeatureSpec], np.ndarray]
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
# Batches that run through the conv base at once, each called from its own thread.
# TensorFlow's intra-op threads leave cores idle between the many small operations of a
# network like MobileNetV2, and a second batch fills those gaps. Each batch in flight
# needs its own activations, so peak memory grows by about one batch's worth.
# Measured effect: docs/BENCHMARKS.md, "Levers".
# NOTE: 2 was chosen on a 2-core CPU; machines with more cores or a GPU were not measured.
INFERENCE_STREAMS = 2


@dataclass
class Failure:
    """An image that produced no row, and why."""

    path: str
    reason: str
    digest: str = ""


@dataclass(frozen=True)
class WorkItem:
    """One row to compute: an image, its content digest and its view (0 is the original)."""

    entry: ImageEntry
    digest: str
    view: int = 0


def decode_original(item: WorkItem, spec: FeatureSpec) -> np.ndarray:
    """Decode and resize an image as the spec says, without augmentation."""
    return load_image(
        item.entry.abs_path,
        spec.input_size,
        resize=spec.resize,
        draft=spec.jpeg_draft,
        exif_transpose=spec.exif_transpose,
    )


def _decoded(
    items: Sequence[WorkItem], spec: FeatureSpec, decode: DecodeFunction, workers: int, lookahead: int
) -> Iterator[tuple[WorkItem, np.ndarray | ImageDecodeError]]:
    """Decode work items on a thread pool, ``lookahead`` ahead of the consumer, in input order."""

    def one(item: WorkItem) -> np.ndarray | ImageDecodeError:
        try:
            return decode(item, spec)
        except ImageDecodeError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: queue.SimpleQueue[tuple[WorkItem, Future[Any]]] = queue.SimpleQueue()
        ahead = min(lookahead, len(items))
        for k in range(ahead):
            pending.put((items[k], pool.submit(one, items[k])))
        for k in range(len(items)):
            item, future = pending.get()
            if k + ahead < len(items):
                pending.put((items[k + ahead], pool.submit(one, items[k + ahead])))
            yield item, future.result()


class DeferredExtractor:
    """An extractor that is built on its first call, and records how long that took.

    A run in which no image decodes never builds the conv base, so it also never checks
    the weights. Calls from several threads build it once, and a failed build is raised
    again to every later caller.

    Parameters
    ----------
    build : callable
        Takes no argument and returns the extractor.
    """

    def __init__(self, build: Callable[[], Callable[[np.ndarray], np.ndarray]]) -> None:
        self._build = build
        self._extractor: Callable[[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.build_seconds = 0.0

    @property
    def built(self) -> bool:
        """Whether the extractor has been built."""
        return self._extractor is not None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Build the extractor if needed, then return its features for ``images``. Thread-safe."""
        with self._lock:
            if self._error is not None:  # a failed build is not retried by the other streams
                raise RuntimeError("building the conv base failed in another inference stream") from self._error
            if self._extractor is None:
                started = time.perf_counter()
                try:
                    self._extractor = self._build()
                except BaseException as error:
                    self._error = error
                    raise
                self.build_seconds = time.perf_counter() - started
        return self._extractor(images)


class _SegmentWriter:
    """Background thread that commits finished rows as segment files, off the compute path."""

    def __init__(self, cache_path: Path, spec: FeatureSpec, classes: Sequence[str], commit_rows: int) -> None:
        self.cache_path = cache_path
        self.spec = spec
        self.classes = list(classes)
        self.commit_rows = commit_rows
        self.queue: queue.Queue[tuple[list[WorkItem], np.ndarray] | None] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.committed_segments = 0
        self.committed_rows = 0
        self._thread = threading.Thread(target=self._run, name="segment-writer", daemon=True)
        self._thread.start()

    def put(self, items: list[WorkItem], features: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((items, features))

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        buffer: list[tuple[list[WorkItem], np.ndarray]] = []
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
                    # Keep emptying the queue until close(), so that neither put() nor
                    # close() blocks forever on a full queue that nothing reads.
                    while item is not None:
                        item = self.queue.get()
                    return
                buffer, buffered = [], 0
            if item is None:
                return

    def _commit(self, buffer: list[tuple[list[WorkItem], np.ndarray]]) -> None:
        items = [item for part in buffer for item in part[0]]
        entries = [item.entry for item in items]
        rows = Rows(
            features=np.concatenate([part[1] for part in buffer]),
            digest=[item.digest for item in items],
            path=[e.path for e in entries],
            label=np.array([e.label for e in entries], np.int32),
            split=[e.split for e in entries],
            size=np.array([e.size for e in entries], np.int64),
            mtime_ns=np.array([e.mtime_ns for e in entries], np.int64),
            view=np.array([item.view for item in items], np.int16),
            present=np.ones(len(entries), bool),
        )
        publish_segment(self.cache_path, self.spec, self.classes, rows)
        self.committed_segments += 1
        self.committed_rows += len(rows)


def check_features(features: np.ndarray, spec: FeatureSpec, items: Sequence[WorkItem]) -> None:
    """Raise SpecError for feature rows that are not finite or that the spec's store dtype cannot hold.

    A float16 base can overflow where float32 does not, and float16 storage turns values
    above 65504 into ``inf``, so both would otherwise be cached silently. The run stops at
    the first such batch, and the batches committed before it stay as segments of this
    spec until ``convcache prune`` or a later run of the same spec.

    Parameters
    ----------
    features : numpy.ndarray
        One batch of features, row ``i`` computed from ``items[i]``.
    spec : FeatureSpec
        The spec whose ``precision`` and ``store_dtype`` produced and will store them.
    items : sequence of WorkItem
        The work items of the batch, used to name the first bad image.
    """
    rows = features.reshape(len(features), -1)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        path = items[int(np.argmin(finite))].entry.path
        if spec.precision == "float16":
            hint = "Use --precision bfloat16 or float32, which have the range of float32."
        else:
            hint = "Check the weights file: it may hold inf or NaN values."
        raise SpecError(f"the conv base computed inf or NaN features for {path} in {spec.precision}. {hint}")
    if spec.store_dtype == "float16":
        peaks = np.abs(rows).max(axis=1)
        if (peaks > FLOAT16_MAX).any():
            worst = int(np.argmax(peaks))
            raise SpecError(
                f"features of {items[worst].entry.path} reach {peaks[worst]:.6g}, above the float16 maximum "
                f"{FLOAT16_MAX:.0f}, so --store-dtype float16 would store them as inf. Use --store-dtype float32."
            )


def compute_rows(
    cache_path: Path,
    spec: FeatureSpec,
    classes: Sequence[str],
    work: Sequence[WorkItem],
    extractor: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 32,
    commit_rows: int = 512,
    decode_workers: int | None = None,
    progress: ProgressCallback | None = None,
    decode: DecodeFunction = decode_original,
    streams: int = INFERENCE_STREAMS,
) -> tuple[list[Failure], int, int]:
    """Run the conv base over ``work`` and commit the rows as segments.

    ``streams`` batches run through ``extractor`` at once, each called from its own
    thread, so with ``streams`` above 1 the extractor must be thread-safe (a
    :class:`~pipeline.extractor.FeatureExtractor` is). Rows are committed in input order.
    Returns the decode failures, the number of rows committed and of segments written.
    """
    if streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    workers = decode_workers or max(2, os.cpu_count() or 2)
    writer = _SegmentWriter(cache_path, spec, classes, commit_rows)
    failures: list[Failure] = []
    batch: list[np.ndarray] = []
    batch_items: list[WorkItem] = []
    running: deque[tuple[list[WorkItem], Future[np.ndarray]]] = deque()
    done = 0

    def finish_oldest() -> None:
        items, future = running.popleft()
        features = future.result()
        check_features(features, spec, items)
        writer.put(items, features)

    def flush() -> None:
        # A copy of the caller's context per call, so that loggers which find their run
        # through context variables (Prefect's) work in the inference threads too.
        call = contextvars.copy_context().run
        running.append((list(batch_items), inference.submit(call, extractor, np.stack(batch))))
        batch.clear()
        batch_items.clear()
        while len(running) >= streams:
            finish_oldest()

    try:
        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="inference") as inference:
            for item, image in _decoded(work, spec, decode, workers, lookahead=batch_size * (2 + streams)):
                done += 1
                if isinstance(image, ImageDecodeError):
                    failures.append(Failure(item.entry.path, image.reason, item.digest))
                    logger.warning("skipped %s: %s", item.entry.path, image.reason)
                else:
                    batch.append(image)
                    batch_items.append(item)
                    if len(batch) == batch_size:
                        flush()
                if progress is not None:
                    progress(done, len(work))
            if batch:
                flush()
            while running:
                finish_oldest()
    finally:
        writer.close()
    return failures, writer.committed_rows, writer.committed_segments

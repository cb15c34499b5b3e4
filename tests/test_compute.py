"""The compute path: inference streams, rows in input order and a base built on first use.

Real photos, a real MobileNet 0.25 with ImageNet weights and real segment files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_subset
from pipeline.compute import DeferredExtractor, WorkItem, compute_rows
from pipeline.extract import extract_features
from pipeline.extractor import FeatureExtractor
from pipeline.images import scan_tree
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, make_spec
from pipeline.store import list_segments

INPUT_SIZE = 96
SIZES = {"train": 5, "validation": 2, "test": 2}  # photos per class: 18 in all
BATCH = 4


@pytest.fixture(scope="module")
def photos(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 real photos in train/validation/test class folders."""
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("compute") / "photos", SIZES)


@pytest.fixture(scope="module")
def spec(mobilenet_025_weights: Path) -> FeatureSpec:
    return make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def extractor(spec: FeatureSpec) -> FeatureExtractor:
    return FeatureExtractor(spec)


def work_items(photos: Path) -> tuple[list[WorkItem], list[str]]:
    manifest = scan_tree(photos)
    return [WorkItem(entry, f"{index:032x}") for index, entry in enumerate(manifest.entries)], manifest.classes


def committed_rows(cache: Path) -> tuple[list[str], np.ndarray]:
    """Return the digests and features of the committed segments of ``cache``, in commit order."""
    assert list_segments(cache), f"no segment committed beside {cache}"
    with CacheSnapshot(cache) as snapshot:
        return list(snapshot.columns.digest), snapshot.read_features(np.arange(len(snapshot.columns)))


class RecordingExtractor:
    """Wrap an extractor: number the calls in submission order, delay some, count overlap."""

    def __init__(self, extractor: FeatureExtractor, delay: Callable[[int], float] = lambda call: 0.0,
                 fail_on: int | None = None) -> None:
        self.extractor = extractor
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.calls = 0
        self.active = 0
        self.max_active = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:  # the pool starts calls in the order compute_rows submits them
            number = self.calls
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay(number))
            if number == self.fail_on:
                raise RuntimeError(f"conv base failed on batch {number}")
            return self.extractor(images)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_streams_keep_input_order(photos: Path, spec: FeatureSpec, extractor: FeatureExtractor, tmp_path: Path,
                                  streams: int) -> None:
    items, classes = work_items(photos)
    cache = tmp_path / spec.cache_name
    # The first batch of every group of streams finishes last, so completion order differs from input order.
    recording = RecordingExtractor(extractor, delay=lambda call: 0.3 if call % streams == 0 else 0.0)
    failures, rows, _ = compute_rows(cache, spec, classes, items, recording, batch_size=BATCH, commit_rows=8,
                                     streams=streams)
    digests, _ = committed_rows(cache)
    assert failures == []
    assert rows == len(items)
    assert digests == [item.digest for item in items]


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_streams_run_concurrently(photos: Path, spec: FeatureSpec, extractor: FeatureExtractor, tmp_path: Path,
                                  streams: int) -> None:
    items, classes = work_items(photos)
    recording = RecordingExtractor(extractor, delay=lambda call: 0.2)
    compute_rows(tmp_path / spec.cache_name, spec, classes, items, recording, batch_size=BATCH, streams=streams)
    assert recording.calls == -(-len(items) // BATCH)
    assert recording.max_active == streams


def test_streams_match_one_stream(photos: Path, spec: FeatureSpec, extractor: FeatureExtractor,
                                  tmp_path: Path) -> None:
    items, classes = work_items(photos)
    one_stream_cache = tmp_path / "one" / spec.cache_name
    two_stream_cache = tmp_path / "two" / spec.cache_name
    one_stream_cache.parent.mkdir()
    two_stream_cache.parent.mkdir()
    compute_rows(one_stream_cache, spec, classes, items, extractor, batch_size=BATCH, streams=1)
    compute_rows(two_stream_cache, spec, classes, items, extractor, batch_size=BATCH, streams=2)
    np.testing.assert_allclose(committed_rows(two_stream_cache)[1], committed_rows(one_stream_cache)[1],
                               rtol=1e-5, atol=1e-6)


def test_streams_below_one_rejected(photos: Path, spec: FeatureSpec, extractor: FeatureExtractor,
                                    tmp_path: Path) -> None:
    items, classes = work_items(photos)
    with pytest.raises(ValueError, match="streams must be at least 1, got 0"):
        compute_rows(tmp_path / spec.cache_name, spec, classes, items, extractor, streams=0)


def test_inference_error_reaches_caller(photos: Path, spec: FeatureSpec, extractor: FeatureExtractor,
                                        tmp_path: Path) -> None:
    items, classes = work_items(photos)
    failing = RecordingExtractor(extractor, fail_on=2)
    cache = tmp_path / spec.cache_name
    with pytest.raises(RuntimeError, match="conv base failed on batch 2"):
        compute_rows(cache, spec, classes, items, failing, batch_size=BATCH, commit_rows=BATCH, streams=2)
    digests, _ = committed_rows(cache)
    assert digests == [item.digest for item in items[: 2 * BATCH]]


def test_deferred_extractor_builds_once(extractor: FeatureExtractor) -> None:
    builds = []

    def build() -> FeatureExtractor:
        builds.append(threading.get_ident())
        time.sleep(0.2)  # keeps the first build running while the other threads call
        return extractor

    deferred = DeferredExtractor(build)
    images = np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    assert not deferred.built
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(deferred, [images] * 4))
    assert len(builds) == 1
    assert deferred.built
    assert deferred.build_seconds >= 0.2
    assert [result.shape for result in results] == [(2, *extractor.feature_shape)] * 4


def test_build_failure_propagates(photos: Path, spec: FeatureSpec, tmp_path: Path) -> None:
    attempts = []

    def broken(_spec: FeatureSpec) -> FeatureExtractor:
        attempts.append(1)
        raise OSError("weights file unreadable")

    with pytest.raises(OSError, match="weights file unreadable"):
        extract_features(photos, tmp_path, spec, batch_size=BATCH, extractor_factory=broken)
    assert not (tmp_path / spec.cache_name).exists()
    assert len(attempts) == 1


def test_summary_reports_build_seconds(photos: Path, spec: FeatureSpec, tmp_path: Path) -> None:
    cold = extract_features(photos, tmp_path, spec, batch_size=BATCH)
    hit = extract_features(photos, tmp_path, spec, batch_size=BATCH)
    assert cold.built_model is True
    assert 0 < cold.build_seconds < cold.seconds
    assert hit.built_model is False
    assert hit.build_seconds == 0.0


def test_nothing_decodable_builds_no_model(photos: Path, spec: FeatureSpec, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for split in ("train", "test"):
        for label in ("cats", "dogs"):
            folder = broken / split / label
            folder.mkdir(parents=True)
            (folder / "a.jpg").write_bytes(b"not a jpeg")
    summary = extract_features(broken, tmp_path / "cache", spec, batch_size=BATCH)
    assert summary.computed == 0
    assert len(summary.failed) == 4
    assert summary.built_model is False

"""Crash safety: extraction runs killed with SIGKILL at chosen points, and runs that hit a full disk.

The killed runs are subprocesses of ``tests/benchmarks/stress_kill.py extract`` with real
MobileNet 0.25 weights at 96 px, 8 images per batch and a segment every 8 rows. The
harness kills itself at an injected point (``--kill-at EVENT:N``). After each kill the
cache must open, every committed row must belong to the image at its path and hold the
features of a clean reference run, and a re-run must compute exactly the missing images.

Kills during compaction start from a cache whose remaining rows are already committed
as segments, as a killed run leaves them. That subprocess then computes nothing and
skips the seconds of TensorFlow start-up, and its compaction runs the same code.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import pipeline.compute
import pipeline.store
from conftest import copy_subset
from pipeline.extract import extract_features
from pipeline.locking import CacheLock
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, make_spec
from pipeline.store import CacheWriteError, Rows, list_segments, publish_segment

HARNESS_PATH = Path(__file__).resolve().parent / "benchmarks" / "stress_kill.py"
INPUT_SIZE = 96
BATCH = 8
COMMIT_ROWS = 8
TREE_SIZES = {"train": 10, "validation": 5, "test": 5}  # per class: 40 photos
SEED_SIZES = {"train": 4, "validation": 2, "test": 2}  # per class: the first 16 of them
TOTAL, SEEDED = 40, 16


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stress_kill", HARNESS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()


@pytest.fixture(scope="module")
def tree(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("crash") / "photos", TREE_SIZES)


@pytest.fixture(scope="module")
def spec(mobilenet_025_weights: Path) -> FeatureSpec:
    return make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def extractor(spec: FeatureSpec) -> Callable[[np.ndarray], np.ndarray]:
    from pipeline.extractor import FeatureExtractor

    return FeatureExtractor(spec)


def extract(tree: Path, cache_dir: Path, spec: FeatureSpec, extractor: Any, **kwargs: Any) -> Any:
    """Run an extraction in this process with the module's conv base."""
    return extract_features(tree, cache_dir, spec, batch_size=BATCH, commit_rows=COMMIT_ROWS, decode_workers=2,
                            extractor_factory=lambda _spec: extractor, **kwargs)


@pytest.fixture(scope="module")
def reference_cache(tree: Path, spec: FeatureSpec, extractor: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of every photo written by one clean run."""
    summary = extract(tree, tmp_path_factory.mktemp("reference"), spec, extractor)
    assert summary.computed == TOTAL
    return Path(summary.cache)


@pytest.fixture(scope="module")
def reference(reference_cache: Path) -> dict[str, np.ndarray]:
    """Features of the clean run, by digest."""
    with CacheSnapshot(reference_cache) as snapshot:
        rows = snapshot.select()
        features = snapshot.read_features(rows)
        return {snapshot.columns.digest[i]: features[k] for k, i in enumerate(rows)}


@pytest.fixture(scope="module")
def seed_cache(cats_vs_dogs: Path, spec: FeatureSpec, extractor: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published cache of the first 16 photos, to copy in before a run that adds 24."""
    seed_tree = copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("seed") / "photos", SEED_SIZES)
    summary = extract(seed_tree, tmp_path_factory.mktemp("seed_cache"), spec, extractor)
    assert summary.rows == SEEDED
    return Path(summary.cache)


def run_harness(tree: Path, cache_dir: Path, weights: Path, *extra: str) -> tuple[int, list[dict], str]:
    """Run one extraction subprocess; return its exit status, its events and its stderr."""
    result = subprocess.run(
        [sys.executable, str(HARNESS_PATH), "extract", "--data", str(tree), "--cache", str(cache_dir),
         "--weights", str(weights), "--input-size", str(INPUT_SIZE), "--batch-size", str(BATCH),
         "--commit-rows", str(COMMIT_ROWS), *extra],
        capture_output=True, text=True, timeout=300,
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, events, result.stderr


def temporaries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.rglob(".*") if ".tmp-" in p.name)


def check_rerun(tree: Path, cache_dir: Path, spec: FeatureSpec, extractor: Any, reference: dict, committed: int) -> None:
    """Re-run the extraction and check that it computes exactly what the crash left missing."""
    summary = extract(tree, cache_dir, spec, extractor)
    cache_path = cache_dir / spec.cache_name

    assert summary.computed == TOTAL - committed
    assert summary.failed == []
    assert harness.check_cache(cache_path, spec, tree, reference) == TOTAL
    assert temporaries(cache_dir) == []
    with CacheSnapshot(cache_path) as snapshot:
        assert snapshot.segment_paths == []
        assert len(snapshot.select()) == TOTAL
        absorbed = set(json.loads(str(snapshot.attrs["absorbed_segments"])))
    assert {p.name for p in list_segments(cache_path)} <= absorbed


def prepare(state: str, cache_path: Path, spec: FeatureSpec, seed_cache: Path, reference_cache: Path) -> None:
    """Set up the cache a run starts from.

    ``empty``: nothing. ``seeded``: the 16-row cache. ``pending``: the 16-row cache plus
    the other 24 rows as 3 segments. ``segments``: all 40 rows as 5 segments, no cache file.
    """
    if state in ("seeded", "pending"):
        shutil.copy2(seed_cache, cache_path)
    if state == "pending":
        with CacheSnapshot(seed_cache) as snapshot:
            publish_rest_as_segments(cache_path, spec, reference_cache, set(snapshot.columns.path))
    if state == "segments":
        publish_rest_as_segments(cache_path, spec, reference_cache, set())


# name: (kill point, starting state, rows committed when the kill hits; None: checked as a range)
KILL_POINTS = {
    "first-batch": ("batch:1", "empty", 0),
    "segment-before-rename": ("segment_rename:3", "empty", 16),
    "segment-after-rename": ("segment_renamed:2", "seeded", SEEDED + 16),
    "mid-batch": ("batch:3", "seeded", None),
    "compaction-before-rename": ("cache_rename:1", "pending", TOTAL),
    "compaction-after-rename": ("cache_renamed:1", "pending", TOTAL),
    "compaction-before-delete": ("segment_unlink:1", "pending", TOTAL),
    "compaction-mid-delete": ("segment_unlink:2", "pending", TOTAL),
    "first-compaction-after-rename": ("cache_renamed:1", "segments", TOTAL),
}


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_kill_leaves_committed_rows(
    name: str,
    tree: Path,
    spec: FeatureSpec,
    extractor: Any,
    reference: dict,
    reference_cache: Path,
    seed_cache: Path,
    mobilenet_025_weights: Path,
    tmp_path: Path,
) -> None:
    kill_at, state, expected = KILL_POINTS[name]
    event = kill_at.split(":")[0]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_path = cache_dir / spec.cache_name
    prepare(state, cache_path, spec, seed_cache, reference_cache)
    cache_bytes = cache_path.read_bytes() if cache_path.exists() else None
    segments_before = list_segments(cache_path)

    returncode, events, stderr = run_harness(tree, cache_dir, mobilenet_025_weights, "--kill-at", kill_at)

    assert returncode == -signal.SIGKILL, stderr[-3000:]
    assert events[-1] == {"event": "killing", "at": kill_at}
    assert ("computing" in {e["event"] for e in events}) == (state in ("empty", "seeded"))
    committed = harness.check_cache(cache_path, spec, tree, reference)
    if expected is None:
        assert committed in (SEEDED, SEEDED + 8, SEEDED + 16)  # the third batch never ran
    else:
        assert committed == expected
    if event in ("segment_rename", "cache_rename"):
        assert temporaries(cache_dir) != []  # the kill hit a commit in progress
    if event not in ("cache_renamed", "segment_unlink") and cache_bytes is not None:
        assert cache_path.read_bytes() == cache_bytes
    if event == "segment_unlink":
        assert len(list_segments(cache_path)) == len(segments_before) - int(kill_at.split(":")[1]) + 1
    check_rerun(tree, cache_dir, spec, extractor, reference, committed)


# --------------------------------------------------------------------------- full disk


def fail_segment_write(monkeypatch: pytest.MonkeyPatch, segment: int, delay: float) -> dict[str, int]:
    """Make the ``segment``-th segment commit fail with ENOSPC after ``delay`` seconds."""
    real_publish = pipeline.compute.publish_segment
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def no_space(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def publish(cache_path: Path, spec: FeatureSpec, classes: list[str], rows: Rows) -> Path:
        calls["n"] += 1
        if calls["n"] != segment:
            return real_publish(cache_path, spec, classes, rows)
        time.sleep(delay)  # let the compute thread fill the commit queue meanwhile
        os.pwrite = no_space
        try:
            return real_publish(cache_path, spec, classes, rows)
        finally:
            os.pwrite = real_pwrite

    monkeypatch.setattr(pipeline.compute, "publish_segment", publish)
    return calls


@pytest.mark.timeout(180)
def test_disk_full_during_segment_commit(
    tree: Path,
    spec: FeatureSpec,
    extractor: Any,
    reference: dict,
    seed_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_path = cache_dir / spec.cache_name
    shutil.copy2(seed_cache, cache_path)
    seed_bytes = cache_path.read_bytes()
    calls = fail_segment_write(monkeypatch, segment=2, delay=2.0)

    with pytest.raises(CacheWriteError, match="No space left on device") as caught:
        extract_features(tree, cache_dir, spec, batch_size=2, commit_rows=2, decode_workers=2,
                         extractor_factory=lambda _spec: extractor)

    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert "Nothing was published" in str(caught.value)
    assert calls["n"] == 2
    assert cache_path.read_bytes() == seed_bytes
    assert temporaries(cache_dir) == []
    assert harness.check_cache(cache_path, spec, tree, reference) == SEEDED + 2
    with CacheLock(cache_path, timeout=0):
        pass  # the failed run released the writer lock
    check_rerun(tree, cache_dir, spec, extractor, reference, SEEDED + 2)


def publish_rest_as_segments(cache_path: Path, spec: FeatureSpec, reference_cache: Path, skip: set[str]) -> None:
    """Commit the reference rows whose path is not in ``skip`` as segments of 8 rows."""
    with CacheSnapshot(reference_cache) as snapshot:
        cols = snapshot.columns
        rows = [i for i in snapshot.select() if cols.path[i] not in skip]
        features = snapshot.read_features(rows)
        for start in range(0, len(rows), COMMIT_ROWS):
            chosen = rows[start : start + COMMIT_ROWS]
            publish_segment(cache_path, spec, snapshot.classes, Rows(
                features=features[start : start + COMMIT_ROWS],
                digest=[cols.digest[i] for i in chosen],
                path=[cols.path[i] for i in chosen],
                label=cols.label[chosen],
                split=[cols.split[i] for i in chosen],
                size=cols.size[chosen],
                mtime_ns=cols.mtime_ns[chosen],
                view=cols.view[chosen],
                present=np.ones(len(chosen), bool),
            ))


def test_disk_full_during_compaction(
    tree: Path,
    spec: FeatureSpec,
    extractor: Any,
    reference: dict,
    seed_cache: Path,
    mobilenet_025_weights: Path,
    reference_cache: Path,
    tmp_path: Path,
) -> None:
    """A compaction that the kernel stops (EFBIG past RLIMIT_FSIZE) fails cleanly and loses nothing."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_path = cache_dir / spec.cache_name
    prepare("pending", cache_path, spec, seed_cache, reference_cache)
    before = {p: p.read_bytes() for p in [cache_path, *list_segments(cache_path)]}
    limit = max(len(data) for data in before.values()) + 4096

    returncode, events, stderr = run_harness(tree, cache_dir, mobilenet_025_weights, "--max-file-bytes", str(limit))

    assert returncode == 1, stderr[-3000:]
    assert "CacheWriteError" in stderr
    assert "File too large" in stderr
    assert "Nothing was published" in stderr
    assert [e["event"] for e in events if e["event"] in ("computing", "compacting")] == ["compacting"]
    assert {p: p.read_bytes() for p in [cache_path, *list_segments(cache_path)]} == before
    assert temporaries(cache_dir) == []
    assert harness.check_cache(cache_path, spec, tree, reference) == TOTAL
    check_rerun(tree, cache_dir, spec, extractor, reference, TOTAL)

"""Concurrent writers and readers on one cache: the writer lock, and readers that never block.

Writers are subprocesses of ``tests/benchmarks/stress_kill.py`` (``extract`` runs a real
extraction with MobileNet 0.25 at 96 px, ``hold-lock`` only holds the writer lock).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import pipeline.maintenance
from conftest import copy_subset
from pipeline.compact import compact
from pipeline.dataset import load_dataset
from pipeline.extract import extract_features
from pipeline.locking import CacheLock, CacheLockError
from pipeline.maintenance import describe_cache
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, make_spec
from pipeline.store import Rows, list_segments, publish_segment, write_table

HARNESS_PATH = Path(__file__).resolve().parent / "benchmarks" / "stress_kill.py"
INPUT_SIZE = 96
TREE_SIZES = {"train": 10, "validation": 5, "test": 5}  # per class: 40 photos
SEED_SIZES = {"train": 4, "validation": 2, "test": 2}  # per class: the first 16 of them
TOTAL, SEEDED = 40, 16
# A spec for tests that never reach the conv base: no weights file is needed.
LOCK_ONLY_SPEC = FeatureSpec(base="mobilenet", weights="none", weights_digest="none", input_size=96, alpha=0.25)


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stress_kill", HARNESS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()


def never_build(spec: FeatureSpec) -> Any:
    raise AssertionError(f"the conv base {spec.base} was built, but this run should not have reached it")


class Child:
    """A harness subprocess whose stdout events and stderr are collected in files."""

    def __init__(self, folder: Path, name: str, *args: str) -> None:
        self.stdout_path = folder / f"{name}.out"
        self.stderr_path = folder / f"{name}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen([sys.executable, str(HARNESS_PATH), *args], stdout=out, stderr=err)
        self.pid = self.process.pid

    def events(self) -> list[dict[str, Any]]:
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, condition: Any, description: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None and not condition():
                raise AssertionError(
                    f"child exited ({self.process.returncode}) before {description}: {self.stderr()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {description}")
            time.sleep(0.05)

    def wait_for_event(self, name: str, timeout: float = 180.0) -> None:
        self.wait_for(lambda: any(e["event"] == name for e in self.events()), f"event {name!r}", timeout)

    def finish(self, timeout: float = 300.0) -> int:
        return self.process.wait(timeout=timeout)

    def summary(self) -> dict[str, Any]:
        return next(e for e in self.events() if e["event"] == "summary")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def children(tmp_path: Path):
    started: list[Child] = []

    def start(name: str, *args: str) -> Child:
        child = Child(tmp_path, name, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()


@pytest.fixture(scope="module")
def tree(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("concurrency") / "photos", TREE_SIZES)


@pytest.fixture(scope="module")
def spec(mobilenet_025_weights: Path) -> FeatureSpec:
    return make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def extractor(spec: FeatureSpec) -> Any:
    from pipeline.extractor import FeatureExtractor

    return FeatureExtractor(spec)


@pytest.fixture(scope="module")
def reference(tree: Path, spec: FeatureSpec, extractor: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Features of a clean run, by digest."""
    summary = extract_features(tree, tmp_path_factory.mktemp("reference"), spec, batch_size=8, decode_workers=2,
                               extractor_factory=lambda _spec: extractor)
    with CacheSnapshot(summary.cache) as snapshot:
        rows = snapshot.select()
        features = snapshot.read_features(rows)
        return {snapshot.columns.digest[i]: features[k] for k, i in enumerate(rows)}


@pytest.fixture(scope="module")
def seed_cache(cats_vs_dogs: Path, spec: FeatureSpec, extractor: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published cache of the first 16 photos of :func:`tree`."""
    seed_tree = copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("seed") / "photos", SEED_SIZES)
    summary = extract_features(seed_tree, tmp_path_factory.mktemp("seed_cache"), spec, batch_size=8,
                               decode_workers=2, extractor_factory=lambda _spec: extractor)
    return Path(summary.cache)


def extract_args(tree: Path, cache_dir: Path, weights: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(tree), "--cache", str(cache_dir), "--weights", str(weights),
            "--input-size", str(INPUT_SIZE), *extra]


# --------------------------------------------------------------------------- two writers


def test_two_extractions_take_turns(
    tree: Path, spec: FeatureSpec, reference: dict, mobilenet_025_weights: Path, tmp_path: Path, children: Any
) -> None:
    cache_dir = tmp_path / "cache"
    cache_path = cache_dir / spec.cache_name
    gate = tmp_path / "gate"
    first = children("first", *extract_args(tree, cache_dir, mobilenet_025_weights, "--gate", str(gate)))
    first.wait_for_event("gated")  # holds the lock, one segment committed, now paused
    second = children("second", *extract_args(tree, cache_dir, mobilenet_025_weights))
    second.wait_for(lambda: f"locked by pid {first.pid}" in second.stderr(), "the second run to wait on the lock")
    assert not any(e["event"] == "locked" for e in second.events())

    gate.touch()

    assert first.finish() == 0, first.stderr()[-3000:]
    assert second.finish() == 0, second.stderr()[-3000:]
    assert first.summary()["computed"] == TOTAL
    assert second.summary()["computed"] == 0
    assert second.summary()["built_model"] is False
    assert harness.check_cache(cache_path, spec, tree, reference) == TOTAL
    with CacheSnapshot(cache_path) as snapshot:
        paths = [snapshot.columns.path[i] for i in snapshot.select()]
    assert len(paths) == len(set(paths)) == TOTAL


def test_second_writer_times_out_naming_holder(photo_subset: Path, tmp_path: Path, children: Any) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_path = cache_dir / LOCK_ONLY_SPEC.cache_name
    holder = children("holder", "hold-lock", "--cache-file", str(cache_path), "--seconds", "120")
    holder.wait_for_event("locked")
    started = time.monotonic()

    with pytest.raises(CacheLockError) as caught:
        extract_features(photo_subset, cache_dir, LOCK_ONLY_SPEC, lock_timeout=1.0, extractor_factory=never_build)

    waited = time.monotonic() - started
    message = str(caught.value)
    assert f"held by pid {holder.pid} on " in message
    assert "timed out after" in message
    assert "--lock-timeout" in message
    assert waited >= 1.0
    assert not cache_path.exists()
    assert list_segments(cache_path) == []


def test_killed_holder_releases_lock(tmp_path: Path, children: Any) -> None:
    cache_path = tmp_path / LOCK_ONLY_SPEC.cache_name
    holder = children("holder", "hold-lock", "--cache-file", str(cache_path), "--seconds", "120")
    holder.wait_for_event("locked")

    holder.kill()

    started = time.monotonic()
    with CacheLock(cache_path, timeout=10) as lock:
        assert time.monotonic() - started < 2.0
        assert lock.holder().startswith(f"pid {os.getpid()} on ")


# --------------------------------------------------------------------------- readers during a write


def read_all(cache_path: Path, spec: FeatureSpec, tree: Path, reference: dict) -> list[int]:
    """Read the cache as train and info do; return the image counts seen, in read order."""
    counts = [harness.check_cache(cache_path, spec, tree, reference)]
    dataset = load_dataset(cache_path)
    counts.append(sum(len(split) for split in dataset.splits.values()))
    for split in dataset.splits.values():
        for digest, features in zip(split.digests, split.features, strict=True):
            assert np.allclose(features, reference[digest], rtol=1e-4, atol=1e-5)
    info = describe_cache(cache_path)
    counts.append(info["images"])
    assert info["rows"] == info["images"]
    return counts


def test_readers_see_consistent_rows_during_extraction(
    tree: Path,
    spec: FeatureSpec,
    reference: dict,
    seed_cache: Path,
    mobilenet_025_weights: Path,
    tmp_path: Path,
    children: Any,
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_path = cache_dir / spec.cache_name
    shutil.copy2(seed_cache, cache_path)
    writer = children("writer", *extract_args(tree, cache_dir, mobilenet_025_weights, "--batch-size", "4",
                                              "--commit-rows", "4", "--batch-delay", "0.4"))
    seen: list[int] = []

    while writer.process.poll() is None:
        seen += read_all(cache_path, spec, tree, reference)
        if not any(e["event"] == "computing" for e in writer.events()):
            time.sleep(0.2)  # leave the CPU to the writer's TensorFlow start-up
    seen += read_all(cache_path, spec, tree, reference)

    assert writer.process.returncode == 0, writer.stderr()[-3000:]
    assert seen[0] == SEEDED
    assert seen[-1] == TOTAL
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False)), f"counts went down: {seen}"
    assert len(set(seen)) >= 3, f"reads did not overlap the writes: {sorted(set(seen))}"


def synthetic_rows(start: int, count: int) -> Rows:
    numbers = np.arange(start, start + count)
    return Rows(
        features=np.repeat(numbers[:, None], 4, axis=1).astype(np.float32),
        digest=[f"{n:032x}" for n in numbers],
        path=[f"train/cats/{n}.jpg" for n in numbers],
        label=np.zeros(count, np.int32),
        split=["train"] * count,
        size=np.zeros(count, np.int64),
        mtime_ns=np.zeros(count, np.int64),
        view=np.zeros(count, np.int16),
        present=np.ones(count, bool),
    )


def test_describe_cache_during_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``info`` opened just before a compaction deletes the segments it reads."""
    from pipeline.compact import IndexEntry

    cache = tmp_path / "c.h5"
    write_table(cache, LOCK_ONLY_SPEC, ["cats"], iter([synthetic_rows(0, 3)]), 3, (4,))
    publish_segment(cache, LOCK_ONLY_SPEC, ["cats"], synthetic_rows(3, 2))
    index = [IndexEntry(f"train/cats/{n}.jpg", 0, "train", 0, 0, f"{n:032x}") for n in range(5)]

    class CompactedAfterOpen(CacheSnapshot):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            with CacheSnapshot(cache) as writer_view:
                compact(cache, LOCK_ONLY_SPEC, writer_view, index, ["cats"], {})

    monkeypatch.setattr(pipeline.maintenance, "CacheSnapshot", CompactedAfterOpen)

    info = describe_cache(cache)

    assert list_segments(cache) == []
    assert info["images"] == 5
    assert info["pending_segments"] == 1
    assert info["file_bytes"] > 0


# --------------------------------------------------------------------------- file systems without locks


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS], ids=errno.errorcode.get)
def test_lock_unsupported_filesystem(
    photo_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)

    with pytest.raises(CacheLockError) as caught:
        extract_features(photo_subset, tmp_path, LOCK_ONLY_SPEC, extractor_factory=never_build)

    message = str(caught.value)
    assert "does not support locks" in message
    assert os.strerror(code) in message
    assert "CONVCACHE_NO_LOCK=1" in message
    assert "--no-lock" in message
    assert not (tmp_path / LOCK_ONLY_SPEC.cache_name).exists()


def test_no_lock_env_skips_locking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setenv("CONVCACHE_NO_LOCK", "1")
    caplog.set_level(logging.WARNING, logger="pipeline.locking")
    cache_path = tmp_path / LOCK_ONLY_SPEC.cache_name

    with CacheLock(cache_path) as lock:
        assert lock.enabled is False

    assert "cache lock disabled" in caplog.text
    assert not Path(str(cache_path) + ".lock").exists()


def test_use_lock_false_skips_locking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache_path = tmp_path / LOCK_ONLY_SPEC.cache_name

    with CacheLock(cache_path, enabled=False) as lock:
        assert lock.enabled is False

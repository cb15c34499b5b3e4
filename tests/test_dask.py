"""Sharded extraction: real Dask LocalClusters, real conv bases, real HDF5 segments."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import copy_subset
from pipeline.extract import extract_features, plan_extraction
from pipeline.images import scan_tree
from pipeline.shards import (
    FilesVanishedError,
    Shard,
    ShardError,
    ShardItem,
    extract_sharded,
    run_shard,
    run_shards_in_process,
    split_into_shards,
)
from pipeline.spec import FeatureSpec, make_spec
from pipeline.store import list_segments

SMALL_SIZES = {"train": 6, "validation": 2, "test": 2}  # 20 photos


def _tiny_spec(weights: Path) -> FeatureSpec:
    return make_spec("mobilenet", str(weights), input_size=128, alpha=0.25)


def _rows_by_digest(cache: str | Path) -> dict[str, np.ndarray]:
    with h5py.File(cache, "r") as handle:
        digests = [d.decode() for d in handle["digest"][:]]
        features = handle["features"][:]
        views = handle["view"][:]
    assert len(digests) == len(set(zip(digests, views, strict=True))), "a (digest, view) appears twice"
    return {d: f for d, f, v in zip(digests, features, views, strict=True) if v == 0}


def _plan_shards(data: Path, shard_size: int) -> list[Shard]:
    return split_into_shards(plan_extraction(scan_tree(data), None), shard_size)


# --------------------------------------------------------------------------- library


def test_split_keeps_scan_order(photo_subset: Path) -> None:
    shards = _plan_shards(photo_subset, 16)
    paths = [item.path for shard in shards for item in shard.items]
    assert paths == [e.path for e in scan_tree(photo_subset).entries]
    assert [len(s) for s in shards] == [16] * 8 + [2]
    assert [s.index for s in shards] == list(range(9))


def test_split_rejects_zero_shard_size(photo_subset: Path) -> None:
    with pytest.raises(ValueError, match="shard size must be at least 1 image, got 0"):
        _plan_shards(photo_subset, 0)


def test_shard_needs_cache_folder(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    shard = _plan_shards(photo_subset, 4)[0]
    with pytest.raises(FileNotFoundError, match="shared file system"):
        run_shard(tmp_path / "missing" / "x.h5", _tiny_spec(mobilenet_025_weights), shard)


def test_shard_rejects_other_weights(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    spec = dataclasses.replace(_tiny_spec(mobilenet_025_weights), weights_digest="0" * 64)
    shard = _plan_shards(photo_subset, 4)[0]
    with pytest.raises(ValueError, match="Give every worker the same weights file"):
        run_shard(tmp_path / spec.cache_name, spec, shard)


def test_retried_shard_skips_committed(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    spec = _tiny_spec(mobilenet_025_weights)
    shard = _plan_shards(photo_subset, 10)[0]
    cache = tmp_path / spec.cache_name

    first = run_shard(cache, spec, shard)
    again = run_shard(cache, spec, shard, skip_committed=True)

    assert (first.computed, first.segments) == (10, 1)
    assert (again.computed, again.skipped_committed, again.segments) == (0, 10, 0)
    assert len(list_segments(cache)) == 1


def test_known_segments_not_skipped(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    spec = _tiny_spec(mobilenet_025_weights)
    shard = _plan_shards(photo_subset, 4)[0]
    cache = tmp_path / spec.cache_name
    run_shard(cache, spec, shard)
    older = dataclasses.replace(shard, known_segments=frozenset(p.name for p in list_segments(cache)))

    again = run_shard(cache, spec, older, skip_committed=True)

    assert (again.computed, again.skipped_committed) == (4, 0)


def test_vanished_file_raises_before_final(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    data = copy_subset(photo_subset, tmp_path / "photos", SMALL_SIZES)
    spec = _tiny_spec(mobilenet_025_weights)
    cache = tmp_path / "cache" / spec.cache_name
    cache.parent.mkdir()
    shard = _plan_shards(data, 100)[0]
    gone = shard.items[3]
    Path(gone.abs_path).unlink()

    with pytest.raises(FilesVanishedError, match=gone.path):
        run_shard(cache, spec, shard, final_attempt=False)
    last = run_shard(cache, spec, shard, skip_committed=True, final_attempt=True)

    assert (last.computed, last.skipped_committed) == (0, len(shard) - 1)
    assert last.vanished == [gone.path]
    assert last.failures == []


def test_vanished_file_left_out_of_cache(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    data = copy_subset(photo_subset, tmp_path / "photos", SMALL_SIZES)
    spec = _tiny_spec(mobilenet_025_weights)
    cache_dir = tmp_path / "cache"
    in_process = run_shards_in_process(cache_dir / spec.cache_name, spec)
    victim = sorted((data / "test" / "dogs").iterdir())[0]

    def vanish_then_run(shards: list[Shard]) -> list:
        victim.unlink()
        return in_process(shards)

    summary = extract_sharded(data, cache_dir, spec, vanish_then_run, shard_size=8)

    assert summary.vanished == ["test/dogs/" + victim.name]
    assert summary.failed == []
    assert (summary.computed, summary.rows) == (19, 19)
    # Not recorded as a failure, so the next run computes the image once it is back.
    shutil.copy2(photo_subset / "test" / "dogs" / victim.name, victim)
    again = extract_sharded(data, cache_dir, spec, in_process, shard_size=8)
    assert (again.computed, again.reused, again.rows) == (1, 19, 20)


def test_lost_shards_leave_cache_unpublished(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    data = copy_subset(photo_subset, tmp_path / "photos", SMALL_SIZES)
    spec = _tiny_spec(mobilenet_025_weights)
    cache_dir = tmp_path / "cache"
    in_process = run_shards_in_process(cache_dir / spec.cache_name, spec)

    with pytest.raises(ShardError, match=r"1 of 3 shards produced no result \(shards \[2\]\)"):
        extract_sharded(data, cache_dir, spec, lambda shards: in_process(shards[:2]), shard_size=8)

    assert not (cache_dir / spec.cache_name).exists()
    assert len(list_segments(cache_dir / spec.cache_name)) == 2
    resumed = extract_sharded(data, cache_dir, spec, in_process, shard_size=8)
    assert (resumed.computed, resumed.reused, resumed.rows) == (4, 16, 20)


def test_shard_item_round_trip(photo_subset: Path) -> None:
    entry = scan_tree(photo_subset).entries[0]
    item = ShardItem(entry.path, str(entry.abs_path), entry.label, entry.class_name, entry.split, entry.size,
                     entry.mtime_ns, "d" * 32)
    assert item.work_item().entry == entry
    assert item.work_item().digest == "d" * 32


# --------------------------------------------------------------------------- task runner options


@pytest.mark.parametrize(
    ("kind", "address", "workers", "message"),
    [
        ("spark", None, None, "invalid task runner 'spark'; valid choices: local, dask"),
        ("local", "tcp://127.0.0.1:8786", None, "need --task-runner dask"),
        ("local", None, 2, "need --task-runner dask"),
        ("dask", "tcp://127.0.0.1:8786", 2, "not both"),
        ("dask", None, 0, "--dask-workers must be at least 1, got 0"),
    ],
)
def test_task_runner_rejects_bad_options(kind: str, address: str | None, workers: int | None, message: str) -> None:
    from flows.dask_extract import make_task_runner
    from flows.serve_cli import TaskRunnerOptionError

    with pytest.raises(TaskRunnerOptionError, match=message):
        make_task_runner(kind, address, workers)


def test_local_cluster_on_loopback() -> None:
    from prefect_dask import DaskTaskRunner

    from flows.dask_extract import make_task_runner

    runner, threads = make_task_runner("dask", None, 2)

    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["n_workers"] == 2
    assert runner.cluster_kwargs["threads_per_worker"] == 1
    assert threads == max(1, (os.cpu_count() or 1) // 2)


# --------------------------------------------------------------------------- Prefect and Dask


def test_vanished_file_retried_by_prefect(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.dask_extract import extract_shard_task

    data = copy_subset(photo_subset, tmp_path / "photos", SMALL_SIZES)
    spec = _tiny_spec(mobilenet_025_weights)
    cache = tmp_path / "cache" / spec.cache_name
    cache.parent.mkdir()
    shard = _plan_shards(data, 100)[0]  # the listing
    victim = Path(shard.items[2].abs_path)
    hidden = victim.rename(tmp_path / "hidden.jpg")

    def restore_after_first_commit() -> None:
        deadline = time.monotonic() + 120
        while not list_segments(cache) and time.monotonic() < deadline:
            time.sleep(0.02)
        hidden.rename(victim)

    @flow
    def one_shard() -> tuple[object, int]:
        future = extract_shard_task.submit(str(cache), spec.to_json(), shard, 8, 2, None, False)
        result = future.result()
        with get_client(sync_client=True) as client:
            return result, client.read_task_run(future.task_run_id).run_count

    helper = threading.Thread(target=restore_after_first_commit, daemon=True)
    helper.start()
    result, run_count = one_shard()
    helper.join(timeout=5)

    assert run_count == 2
    assert (result.computed, result.skipped_committed, result.vanished) == (1, len(shard) - 1, [])
    assert len(list_segments(cache)) == 2


def test_two_workers_match_one_process(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from flows.dask_extract import run_sharded_extract

    spec = _tiny_spec(mobilenet_025_weights)
    single = extract_features(photo_subset, tmp_path / "single", spec)

    summary = run_sharded_extract(str(photo_subset), str(tmp_path / "dask"), spec.to_json(), "dask",
                                  dask_workers=2, shard_size=16)

    assert (summary["computed"], summary["rows"], summary["shards"]) == (130, 130, 9)
    assert len(summary["workers"]) == 2
    assert summary["models_built"] == 2  # once per worker process, not once per shard
    expected = _rows_by_digest(single.cache)
    actual = _rows_by_digest(summary["cache"])
    assert sorted(actual) == sorted(expected)
    for digest, row in expected.items():
        np.testing.assert_allclose(actual[digest], row, rtol=1e-4, atol=1e-5, err_msg=digest)


def test_killed_worker_loses_one_shard(
    prefect_api: None, photo_subset: Path, mobilenet_cache: Path, mobilenet_v2_weights: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    from flows.dask_extract import run_sharded_extract

    spec = make_spec("mobilenet_v2", str(mobilenet_v2_weights))
    cache = tmp_path / spec.cache_name
    finished = threading.Event()
    killed: dict[str, object] = {}

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 240
            while not list_segments(cache) and not finished.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = [address for address, keys in client.processing().items() if keys]
            if finished.is_set() or not busy:
                return
            killed["pid"] = pids[busy[0]]
            os.kill(pids[busy[0]], signal.SIGKILL)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        summary = run_sharded_extract(str(photo_subset), str(tmp_path), spec.to_json(), "dask",
                                      dask_address=cluster.scheduler_address, shard_size=8, tf_threads=1)
        finished.set()
        killer.join(timeout=10)

    assert "pid" in killed, "the extraction finished before a worker could be killed"
    assert summary["rows"] == 130
    assert summary["computed"] >= 130  # a shard committed just before the kill may run twice
    expected = _rows_by_digest(mobilenet_cache)
    actual = _rows_by_digest(cache)  # also checks that no image appears twice
    assert sorted(actual) == sorted(expected)
    for digest, row in expected.items():
        np.testing.assert_allclose(actual[digest], row, rtol=1e-4, atol=1e-5, err_msg=digest)

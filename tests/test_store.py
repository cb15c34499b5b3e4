"""Unit tests of the HDF5 table format: write_table, publish_segment, read_header, CacheSnapshot, compact.

The rows are synthetic (no conv base is needed to test the file format), the files are
real HDF5 files written and read by the real code.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.snapshot
from pipeline.compact import IndexEntry, compact
from pipeline.extract import extract_features
from pipeline.snapshot import OPEN_RETRIES, CacheSnapshot
from pipeline.spec import FeatureSpec
from pipeline.store import (
    CacheFileError,
    CacheWriteError,
    Rows,
    list_segments,
    parts_dir,
    publish_segment,
    read_header,
    write_table,
)

SPEC = FeatureSpec(base="mobilenet", weights="none", weights_digest="none", input_size=96, alpha=0.25)
OTHER_SPEC = FeatureSpec(base="mobilenet", weights="none", weights_digest="none", input_size=128, alpha=0.25)
CLASSES = ["cats", "dogs"]
DIM = 6


def make_rows(start: int, count: int) -> Rows:
    """Rows ``start .. start+count-1`` with features that encode the row number."""
    numbers = np.arange(start, start + count)
    return Rows(
        features=(numbers[:, None] + np.linspace(0, 0.5, DIM)[None, :]).astype(np.float32),
        digest=[f"{n:032x}" for n in numbers],
        path=[f"train/{CLASSES[n % 2]}/{n}.jpg" for n in numbers],
        label=(numbers % 2).astype(np.int32),
        split=["train"] * count,
        size=(numbers * 10).astype(np.int64),
        mtime_ns=(numbers * 1000).astype(np.int64),
        view=np.zeros(count, np.int16),
        present=np.ones(count, bool),
    )


def index_of(rows: Rows) -> list[IndexEntry]:
    """The scan index that owns every row of ``rows``."""
    return [
        IndexEntry(rows.path[i], int(rows.label[i]), rows.split[i], int(rows.size[i]), int(rows.mtime_ns[i]),
                   rows.digest[i])
        for i in range(len(rows))
    ]


def concat(*parts: Rows) -> Rows:
    return Rows(
        features=np.concatenate([p.features for p in parts]),
        digest=[d for p in parts for d in p.digest],
        path=[d for p in parts for d in p.path],
        label=np.concatenate([p.label for p in parts]),
        split=[d for p in parts for d in p.split],
        size=np.concatenate([p.size for p in parts]),
        mtime_ns=np.concatenate([p.mtime_ns for p in parts]),
        view=np.concatenate([p.view for p in parts]),
        present=np.concatenate([p.present for p in parts]),
    )


def write_cache(path: Path, rows: Rows, spec: FeatureSpec = SPEC, attrs: dict | None = None) -> Path:
    write_table(path, spec, CLASSES, iter([rows]), len(rows), (DIM,), attrs)
    return path


def compact_all(cache: Path, rows: Rows) -> int:
    """Compact ``cache`` and its segments against an index that owns ``rows``."""
    with CacheSnapshot(cache) as snapshot:
        return compact(cache, SPEC, snapshot, index_of(rows), CLASSES, {})


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name]


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def digests_in(cache: Path) -> list[str]:
    with CacheSnapshot(cache) as snapshot:
        return list(snapshot.columns.digest)


# --------------------------------------------------------------------------- write_table


def test_write_table_layout(tmp_path: Path) -> None:
    rows = make_rows(0, 10)
    cache = write_cache(tmp_path / "c.h5", rows, attrs={"failed": [], "data_root": "/data"})

    with h5py.File(cache, "r") as handle:
        assert handle.attrs["format"] == "convcache.features"
        assert handle.attrs["schema_version"] == 1
        assert handle.attrs["spec_digest"] == SPEC.digest
        assert FeatureSpec.from_json(handle.attrs["spec"]) == SPEC
        assert json.loads(handle.attrs["classes"]) == CLASSES
        assert json.loads(handle.attrs["feature_shape"]) == [DIM]
        assert json.loads(handle.attrs["failed"]) == []
        assert handle.attrs["data_root"] == "/data"
        assert handle["features"].dtype == np.float32
        assert handle["features"].chunks == (10, DIM)
        assert handle["digest"].dtype == np.dtype("S32")
        assert h5py.check_string_dtype(handle["path"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(handle["split"].dtype).encoding == "utf-8"
        assert handle["label"].dtype == np.int32
        assert handle["size"].dtype == np.int64
        assert handle["mtime_ns"].dtype == np.int64
        assert handle["view"].dtype == np.int16
        assert handle["present"].dtype == bool
        np.testing.assert_array_equal(handle["features"][:], rows.features)
        assert [d.decode() for d in handle["digest"][:]] == rows.digest
        assert [p.decode() for p in handle["path"][:]] == rows.path
    assert temporaries(tmp_path) == []


def test_write_table_float16_store(tmp_path: Path) -> None:
    spec = FeatureSpec(base="mobilenet", weights="none", weights_digest="none", input_size=96, alpha=0.25,
                       store_dtype="float16")
    rows = make_rows(0, 4)
    write_table(tmp_path / "c.h5", spec, CLASSES, iter([rows]), 4, (DIM,))

    with h5py.File(tmp_path / "c.h5", "r") as handle:
        assert handle["features"].dtype == np.float16
        np.testing.assert_allclose(handle["features"][:], rows.features, rtol=1e-3)


def test_write_table_failure_keeps_target(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 5))
    before = file_state(cache)

    def broken() -> Iterator[Rows]:
        yield make_rows(0, 3)
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_table(cache, SPEC, CLASSES, broken(), 6, (DIM,))

    assert file_state(cache) == before
    assert temporaries(tmp_path) == []


def test_write_table_short_stream_rejected(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 5))
    before = file_state(cache)

    with pytest.raises(RuntimeError, match="held 3 rows, 4 announced"):
        write_table(cache, SPEC, CLASSES, iter([make_rows(0, 3)]), 4, (DIM,))

    assert file_state(cache) == before
    assert temporaries(tmp_path) == []


def failing_call(real, fail_at: int, error: OSError):
    """Wrap ``real`` so that its ``fail_at``-th call raises ``error`` (and later calls too)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= fail_at:
            raise error
        return real(*args, **kwargs)

    return wrapper, calls


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_write_table_disk_full_on_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 5))
    before = file_state(cache)
    wrapper, calls = failing_call(os.pwrite, fail_at, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(os, "pwrite", wrapper)

    with pytest.raises(CacheWriteError) as caught:
        write_cache(cache, make_rows(0, 300))

    monkeypatch.undo()
    assert calls["n"] >= fail_at
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value)
    assert str(cache) in str(caught.value)
    assert "Free disk space in that folder" in str(caught.value)
    assert file_state(cache) == before
    assert temporaries(tmp_path) == []
    assert read_header(cache).n_rows == 5


def test_write_table_disk_full_on_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 5))
    before = file_state(cache)
    wrapper, _ = failing_call(os.fsync, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(os, "fsync", wrapper)

    with pytest.raises(CacheWriteError, match="Nothing was published") as caught:
        write_cache(cache, make_rows(0, 50))

    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert file_state(cache) == before
    assert temporaries(tmp_path) == []


def test_write_table_folder_fsync_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.store

    def fail(folder: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pipeline.store, "_fsync_dir", fail)

    with pytest.raises(CacheWriteError, match="could not flush its folder") as caught:
        write_cache(tmp_path / "c.h5", make_rows(0, 5))

    assert caught.value.errno == errno.EIO
    assert read_header(tmp_path / "c.h5").n_rows == 5  # published, only durability is unconfirmed


REAL_WRITE_FAILURE = textwrap.dedent(
    """
    import gc, resource, signal, sys
    from pathlib import Path
    import numpy as np
    from pipeline.spec import FeatureSpec
    from pipeline.store import CacheWriteError, Rows, write_table

    spec = FeatureSpec(base="mobilenet", weights="none", weights_digest="none", input_size=96, alpha=0.25)
    n = 5000
    rows = Rows(
        features=np.ones((n, 6), np.float32), digest=[f"{i:032x}" for i in range(n)],
        path=[f"train/cats/{i}.jpg" for i in range(n)], label=np.zeros(n, np.int32), split=["train"] * n,
        size=np.zeros(n, np.int64), mtime_ns=np.zeros(n, np.int64), view=np.zeros(n, np.int16),
        present=np.ones(n, bool),
    )
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))
    try:
        write_table(Path(sys.argv[1]), spec, ["cats", "dogs"], iter([rows]), n, (6,))
    except CacheWriteError as error:
        print("errno", error.errno)
        print(error)
    gc.collect()
    print("exited cleanly")
    """
)


def test_write_table_real_write_failure(tmp_path: Path) -> None:
    """A write that the kernel fails (EFBIG past RLIMIT_FSIZE) gives a clean error, not a crash."""
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 5))
    before = file_state(cache)

    result = subprocess.run(
        [sys.executable, "-c", REAL_WRITE_FAILURE, str(cache)],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert f"errno {errno.EFBIG}" in result.stdout
    assert "File too large" in result.stdout
    assert "Raise the file-size limit" in result.stdout
    assert "exited cleanly" in result.stdout
    assert file_state(cache) == before
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- publish_segment


def test_publish_segment_names_and_listing(tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    first = publish_segment(cache, SPEC, CLASSES, make_rows(0, 3))
    second = publish_segment(cache, SPEC, CLASSES, make_rows(3, 2))
    (parts_dir(cache) / ".seg-1-x.h5.tmp-abc").write_bytes(b"half written")
    (parts_dir(cache) / "notes.txt").write_text("not a segment")

    assert first.parent == parts_dir(cache) == tmp_path / "c.h5.parts"
    assert first.name.startswith("seg-")
    assert first.suffix == ".h5"
    assert list_segments(cache) == [first, second]
    assert read_header(second, SPEC.digest).n_rows == 2


def test_snapshot_joins_cache_and_segments(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))
    publish_segment(cache, SPEC, CLASSES, make_rows(7, 2))

    with CacheSnapshot(cache, SPEC.digest) as snapshot:
        assert snapshot.columns.digest == make_rows(0, 9).digest
        assert snapshot.main_rows == 4
        assert len(snapshot.segment_paths) == 2
        np.testing.assert_array_equal(snapshot.read_features([8, 0, 5]), make_rows(0, 9).features[[8, 0, 5]])
        assert snapshot.file_bytes == sum(p.stat().st_size for p in [cache, *snapshot.segment_paths])


def test_snapshot_of_segments_only(tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    publish_segment(cache, SPEC, CLASSES, make_rows(0, 3))

    with CacheSnapshot(cache, SPEC.digest) as snapshot:
        assert snapshot.main_rows == 0
        assert snapshot.columns.digest == make_rows(0, 3).digest


def test_snapshot_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Run 'convcache extract' first"):
        CacheSnapshot(tmp_path / "absent.h5")


def test_snapshot_newest_row_per_path_wins(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 3))
    again = make_rows(1, 1)
    again.features = again.features + 100
    publish_segment(cache, SPEC, CLASSES, again)

    with CacheSnapshot(cache) as snapshot:
        chosen = snapshot.select()
        assert len(chosen) == 3
        features = snapshot.read_features(chosen)
    assert features[:, 0].tolist() == [0.0, 2.0, 101.0]


# --------------------------------------------------------------------------- rejected files


def not_hdf5(path: Path) -> str:
    path.write_bytes(b"this is a text file, not HDF5\n" * 20)
    return "is not an HDF5 file"


def hdf5_without_format(path: Path) -> str:
    with h5py.File(path, "w") as handle:
        handle["features"] = np.zeros((2, DIM), np.float32)
    return "not a convcache cache"


def newer_schema(path: Path) -> str:
    write_cache(path, make_rows(0, 2))
    with h5py.File(path, "r+") as handle:
        handle.attrs["schema_version"] = 2
    return "schema version 2, newer than the 1"


def other_spec(path: Path) -> str:
    write_cache(path, make_rows(0, 2), spec=OTHER_SPEC)
    return f"belongs to feature spec {OTHER_SPEC.digest[:12]}"


def truncated(path: Path) -> str:
    write_cache(path, make_rows(0, 200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return "damaged HDF5 file"


def missing_dataset(path: Path) -> str:
    write_cache(path, make_rows(0, 2))
    with h5py.File(path, "r+") as handle:
        del handle["mtime_ns"]
    return "lacks the datasets mtime_ns"


def misaligned(path: Path) -> str:
    write_cache(path, make_rows(0, 3))
    with h5py.File(path, "r+") as handle:
        del handle["label"]
        handle["label"] = np.zeros(2, np.int32)
    return "misaligned datasets"


REJECTED = [not_hdf5, hdf5_without_format, newer_schema, other_spec, truncated, missing_dataset, misaligned]


@pytest.mark.parametrize("make_bad", REJECTED, ids=lambda f: f.__name__)
def test_read_header_rejects(tmp_path: Path, make_bad) -> None:
    path = tmp_path / "c.h5"
    expected = make_bad(path)
    before = file_state(path)

    with pytest.raises(CacheFileError, match=expected):
        read_header(path, SPEC.digest)

    assert file_state(path) == before


@pytest.mark.parametrize("make_bad", REJECTED, ids=lambda f: f.__name__)
def test_snapshot_rejects(tmp_path: Path, make_bad) -> None:
    path = tmp_path / "c.h5"
    expected = make_bad(path)
    before = file_state(path)

    with pytest.raises(CacheFileError, match=expected):
        CacheSnapshot(path, SPEC.digest)

    assert file_state(path) == before


def test_snapshot_rejects_foreign_segment(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 2))
    foreign = publish_segment(cache, OTHER_SPEC, CLASSES, make_rows(2, 2))
    before = file_state(foreign)

    with pytest.raises(CacheFileError, match=f"{foreign.name} belongs to feature spec"):
        CacheSnapshot(cache, SPEC.digest)

    assert file_state(foreign) == before


@pytest.mark.parametrize("make_bad", REJECTED, ids=lambda f: f.__name__)
def test_extract_rejects_cache(tmp_path: Path, photo_subset: Path, make_bad) -> None:
    cache = tmp_path / "cache" / SPEC.cache_name
    cache.parent.mkdir()
    expected = make_bad(cache)
    before = file_state(cache)
    built: list[FeatureSpec] = []

    with pytest.raises(CacheFileError, match=expected):
        extract_features(photo_subset, cache.parent, SPEC, extractor_factory=built.append)

    assert built == []
    assert file_state(cache) == before
    assert not parts_dir(cache).exists()


def test_read_header_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cache file not found"):
        read_header(tmp_path / "absent.h5")


# --------------------------------------------------------------------------- compaction


def test_compact_absorbs_and_deletes_segments(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    seg_a = publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))
    seg_b = publish_segment(cache, SPEC, CLASSES, make_rows(7, 3))

    written = compact_all(cache, make_rows(0, 10))

    assert written == 10
    assert list_segments(cache) == []
    with h5py.File(cache, "r") as handle:
        assert json.loads(handle.attrs["absorbed_segments"]) == [seg_a.name, seg_b.name]
    assert digests_in(cache) == make_rows(0, 10).digest


def test_absorbed_segments_not_double_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))
    publish_segment(cache, SPEC, CLASSES, make_rows(7, 3))
    # A compaction killed after publishing the cache file, before deleting what it absorbed.
    monkeypatch.setattr(os, "unlink", lambda path, *args, **kwargs: None)
    compact_all(cache, make_rows(0, 10))
    monkeypatch.undo()

    assert len(list_segments(cache)) == 2
    with CacheSnapshot(cache) as snapshot:
        assert snapshot.segment_paths == []
        assert snapshot.columns.digest == make_rows(0, 10).digest


def test_leftover_absorbed_segments_survive_next_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    leftovers = [publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))]
    monkeypatch.setattr(os, "unlink", lambda path, *args, **kwargs: None)
    compact_all(cache, make_rows(0, 7))
    monkeypatch.undo()
    newest = publish_segment(cache, SPEC, CLASSES, make_rows(7, 2))

    # The next compaction must list the leftover again until it is deleted.
    monkeypatch.setattr(os, "unlink", lambda path, *args, **kwargs: None)
    compact_all(cache, make_rows(0, 9))
    monkeypatch.undo()
    with h5py.File(cache, "r") as handle:
        absorbed = json.loads(handle.attrs["absorbed_segments"])
    assert sorted(absorbed) == sorted([leftovers[0].name, newest.name])
    assert sorted(digests_in(cache)) == sorted(make_rows(0, 9).digest)

    compact_all(cache, make_rows(0, 9))
    assert list_segments(cache) == []
    assert sorted(digests_in(cache)) == sorted(make_rows(0, 9).digest)


def test_compact_keeps_orphans_and_extra_attrs(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4), attrs={"augmentation_recipe": "flip"})

    with CacheSnapshot(cache) as snapshot:
        compact(cache, SPEC, snapshot, index_of(make_rows(0, 2)), CLASSES, {"failed": []})

    with h5py.File(cache, "r") as handle:
        assert handle.attrs["augmentation_recipe"] == "flip"
        assert handle["present"][:].tolist() == [True, True, False, False]


# --------------------------------------------------------------------------- concurrent replacement


def hook_listing(monkeypatch: pytest.MonkeyPatch, action) -> dict[str, int]:
    """Run ``action(call_number)`` inside the snapshot's segment listing, before it lists."""
    real = pipeline.snapshot.list_segments
    calls = {"n": 0}

    def listing(cache_path):
        calls["n"] += 1
        action(calls["n"])
        return real(cache_path)

    monkeypatch.setattr(pipeline.snapshot, "list_segments", listing)
    return calls


def test_snapshot_retries_when_cache_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))
    publish_segment(cache, SPEC, CLASSES, make_rows(7, 3))
    with CacheSnapshot(cache) as concurrent:
        def replace_once(call: int) -> None:
            if call == 1:  # another process compacts while this reader lists segments
                compact(cache, SPEC, concurrent, index_of(make_rows(0, 10)), CLASSES, {})

        calls = hook_listing(monkeypatch, replace_once)
        with CacheSnapshot(cache) as snapshot:
            assert calls["n"] == 2
            assert snapshot.segment_paths == []
            assert snapshot.columns.digest == make_rows(0, 10).digest
            np.testing.assert_array_equal(snapshot.read_features(range(10)), make_rows(0, 10).features)


def test_snapshot_retries_when_first_cache_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "c.h5"
    first = publish_segment(cache, SPEC, CLASSES, make_rows(0, 3))
    publish_segment(cache, SPEC, CLASSES, make_rows(3, 3))
    real_unlink = os.unlink
    with CacheSnapshot(cache) as concurrent:
        def first_compaction(call: int) -> None:
            if call != 1:
                return
            # The first cache file is published, and one absorbed segment is already deleted.
            with monkeypatch.context() as patch:
                patch.setattr(os, "unlink", lambda path, *a, **k: real_unlink(path) if Path(path) == first else None)
                compact(cache, SPEC, concurrent, index_of(make_rows(0, 6)), CLASSES, {})

        calls = hook_listing(monkeypatch, first_compaction)
        with CacheSnapshot(cache) as snapshot:
            assert calls["n"] == 2
            assert snapshot.main_rows == 6
            assert snapshot.columns.digest == make_rows(0, 6).digest


def test_snapshot_gives_up_after_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 3))
    hook_listing(monkeypatch, lambda call: write_cache(cache, make_rows(0, 3)))

    with pytest.raises(CacheFileError, match=f"replaced {OPEN_RETRIES} times"):
        CacheSnapshot(cache)


def test_snapshot_survives_segment_deletion_after_open(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", make_rows(0, 4))
    publish_segment(cache, SPEC, CLASSES, make_rows(4, 3))

    with CacheSnapshot(cache) as snapshot:
        compact_all(cache, make_rows(0, 7))  # deletes the segment that this snapshot has open
        assert list_segments(cache) == []
        features = snapshot.read_features(range(7))
        assert snapshot.file_bytes > 0
    np.testing.assert_array_equal(features, make_rows(0, 7).features)

"""Training and comparing heads when the cached features exceed a memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.compare import plan_comparison, run_comparison
from pipeline.dataset import load_dataset
from pipeline.heads import HeadError
from pipeline.predict import predict_images
from pipeline.selection import RowReader
from pipeline.snapshot import CacheSnapshot
from pipeline.streaming import (
    BudgetError,
    estimate_bytes,
    needs_streaming,
    parse_memory_budget,
    rows_per_chunk,
    train_within_budget,
)
from pipeline.training import train_head

# The subset cache contains 130 rows of 1280 float32 values (about 666 KB); 200 KB forces
# streaming in windows of 9 rows.
TINY_BUDGET = "200KB"
TINY_CHUNK_ROWS = 200_000 // (4 * 1280 * 4)
STREAMING_HEADS = ["logreg", "linear_svm", "dense"]
# Streamed and in-memory heads differ in solver (SGD against L-BFGS or liblinear); on the
# 40 test photos they must agree within this accuracy (4 photos).
ACCURACY_TOLERANCE = 0.1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000), ("100000", 100_000),
     ("64 kb", 64_000), (4096, 4096)],
)
def test_parse_memory_budget(text: str | int, expected: int) -> None:
    assert parse_memory_budget(text) == expected


def test_parse_memory_budget_none() -> None:
    assert parse_memory_budget(None) is None


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-5MB", "0", "1e9", "GB"])
def test_parse_memory_budget_rejects(text: str) -> None:
    with pytest.raises(BudgetError, match="memory budget"):
        parse_memory_budget(text)


def test_budget_arithmetic() -> None:
    assert estimate_bytes(1000, 1280) == 1000 * 1280 * 4
    assert needs_streaming(1000, 1280, 1000 * 1280 * 4 - 1)
    assert not needs_streaming(1000, 1280, 1000 * 1280 * 4)
    assert not needs_streaming(10**9, 1280, None)
    assert rows_per_chunk(1280, 200_000) == TINY_CHUNK_ROWS
    assert rows_per_chunk(1280, 10) == 1


def test_chunks_cover_rows_once(mobilenet_cache: Path) -> None:
    with RowReader(mobilenet_cache) as reader:
        rows = np.arange(0, len(reader.snapshot.columns), 3)
        seen: list[int] = []
        for window, features, labels in reader.chunks(rows, 7, np.random.default_rng(0)):
            assert len(window) <= 7
            np.testing.assert_array_equal(features, reader.snapshot.read_features(window))
            np.testing.assert_array_equal(labels, reader.snapshot.columns.label[window])
            seen += [int(i) for i in window]
        assert sorted(seen) == [int(i) for i in rows]
        assert seen != sorted(seen)  # shuffled


@pytest.fixture()
def read_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many rows every CacheSnapshot.read_features call reads (the call itself is unchanged)."""
    sizes: list[int] = []
    original = CacheSnapshot.read_features

    def recording(self: CacheSnapshot, indices: Any, dtype: str | None = "float32") -> np.ndarray:
        sizes.append(len(indices))
        return original(self, indices, dtype)

    monkeypatch.setattr(CacheSnapshot, "read_features", recording)
    return sizes


def _accuracies(summary: dict[str, Any]) -> dict[str, float]:
    return {r["head"]: r["test"]["accuracy"] for r in summary["results"]}


def test_compare_streams_within_budget(mobilenet_cache: Path, photo_subset: Path, tmp_path: Path,
                                       read_sizes: list[int]) -> None:
    streamed = run_comparison([mobilenet_cache], heads=STREAMING_HEADS, grid="small", memory_budget=TINY_BUDGET,
                              models_dir=tmp_path / "models_s", reports_dir=tmp_path / "reports_s")
    assert read_sizes and max(read_sizes) <= TINY_CHUNK_ROWS
    read_sizes.clear()
    in_memory = run_comparison([mobilenet_cache], heads=STREAMING_HEADS, grid="small",
                               models_dir=tmp_path / "models_m", reports_dir=tmp_path / "reports_m")
    assert max(read_sizes) > TINY_CHUNK_ROWS

    assert streamed["caches"][0]["streaming"] is True
    assert in_memory["caches"][0]["streaming"] is False
    for result in streamed["results"]:
        assert result["error"] is None, result["error"]
        assert result["streaming"] is True
    streamed_acc, memory_acc = _accuracies(streamed), _accuracies(in_memory)
    for head in STREAMING_HEADS:
        assert streamed_acc[head] >= 0.8, f"streamed {head}: {streamed_acc[head]}"
        assert abs(streamed_acc[head] - memory_acc[head]) <= ACCURACY_TOLERANCE, (head, streamed_acc, memory_acc)

    by_head = {r["head"]: r for r in streamed["results"]}
    assert by_head["linear_svm"]["probabilities"] == "decision"  # hinge-loss SGD gives scores only
    records = predict_images(streamed["best"]["model_path"], [photo_subset / "test" / "cats"])
    assert all(r["class"] in ("cats", "dogs") for r in records)


def test_compare_rejects_head_without_partial_fit(mobilenet_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(HeadError) as raised:
        run_comparison([mobilenet_cache], heads=["logreg", "random_forest"], memory_budget=TINY_BUDGET,
                       reports_dir=tmp_path / "reports")
    message = str(raised.value)
    assert "random_forest" in message
    assert "memory budget of 200.0 KB" in message
    assert "dense, logreg, linear_svm" in message
    assert not (tmp_path / "reports").exists()


def test_compare_default_heads_keep_streaming_ones(mobilenet_cache: Path) -> None:
    plan = plan_comparison([mobilenet_cache], memory_budget=TINY_BUDGET)
    assert sorted(job.head for job in plan.jobs) == sorted(STREAMING_HEADS)


def test_compare_large_budget_stays_in_memory(mobilenet_cache: Path) -> None:
    plan = plan_comparison([mobilenet_cache], heads=["knn"], memory_budget="2GB")
    assert plan.caches[0].streaming is False


def test_compare_rejects_bad_budget(mobilenet_cache: Path) -> None:
    with pytest.raises(BudgetError, match="invalid memory budget 'two gigs'"):
        plan_comparison([mobilenet_cache], memory_budget="two gigs")


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_train_streams_close_to_in_memory(mobilenet_cache: Path, photo_subset: Path, tmp_path: Path,
                                          read_sizes: list[int], head: str) -> None:
    streamed = train_within_budget(mobilenet_cache, head, tmp_path / "streamed", TINY_BUDGET)
    assert streamed["streaming"] is True
    assert max(read_sizes) <= TINY_CHUNK_ROWS
    in_memory = train_head(mobilenet_cache, head, tmp_path / "memory")
    for split in ("validation", "test"):
        assert streamed["metrics"][split]["n"] == in_memory["metrics"][split]["n"]
        gap = abs(streamed["metrics"][split]["accuracy"] - in_memory["metrics"][split]["accuracy"])
        assert gap <= ACCURACY_TOLERANCE, (split, streamed["metrics"], in_memory["metrics"])

    data = load_dataset(mobilenet_cache)
    photos = [photo_subset / p for p in data.splits["test"].paths]
    records = predict_images(streamed["model_path"], photos)
    accuracy = np.mean([data.classes.index(r["class"]) == y for r, y in zip(records, data.splits["test"].labels,
                                                                                strict=True)])
    assert accuracy == pytest.approx(streamed["metrics"]["test"]["accuracy"])


def test_train_within_budget_in_memory(mobilenet_cache: Path, tmp_path: Path) -> None:
    result = train_within_budget(mobilenet_cache, "logreg", tmp_path, "2GB")
    assert result["streaming"] is False
    assert result["metrics"] == train_head(mobilenet_cache, "logreg", tmp_path / "again")["metrics"]


def test_train_rejects_head_without_partial_fit(mobilenet_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(HeadError, match=r"knn cannot train in chunks.*memory budget of 200\.0 KB"):
        train_within_budget(mobilenet_cache, "knn", tmp_path, TINY_BUDGET)
    assert not any(tmp_path.iterdir())

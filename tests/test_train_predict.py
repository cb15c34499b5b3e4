"""Heads trained on cached real features, prediction on new photos, and the Prefect flows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SUBSET_SIZES, copy_subset

from pipeline.dataset import check_dataset, load_dataset
from pipeline.extract import extract_features
from pipeline.heads import load_head
from pipeline.images import file_digest
from pipeline.predict import predict_images
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import SpecError, make_spec
from pipeline.training import train_head

MIN_ACCURACY = 0.85
HELD_OUT_PER_CLASS = 10


def agreement(results: list[dict[str, Any]]) -> float:
    """Return the share of predictions whose class is the name of the image's folder."""
    return float(np.mean([r["class"] == Path(r["path"]).parent.name for r in results]))


def flat_tree(source: Path, target: Path, per_class: int, offset: int = 0) -> Path:
    """Copy ``per_class`` photos of each class folder of ``source`` into ``target/<class>/``."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for photo in sorted(class_dir.iterdir())[offset : offset + per_class]:
            shutil.copy2(photo, target / class_dir.name / photo.name)
    return target


@pytest.fixture(scope="module")
def logreg_model(mobilenet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A logistic-regression head trained on the MobileNetV2 cache of the photo subset."""
    return train_head(mobilenet_cache, "logreg", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def held_out(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test photos of the full set that the photo subset does not contain."""
    offset = SUBSET_SIZES["test"] + 80
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("held_out"), {"test": HELD_OUT_PER_CLASS}, offset=offset)


def test_logreg_head_accuracy(logreg_model: dict[str, Any], mobilenet_cache: Path) -> None:
    metrics = logreg_model["metrics"]
    folder = Path(logreg_model["model_path"])

    assert metrics["test"]["accuracy"] >= MIN_ACCURACY
    assert metrics["test"]["n"] == 2 * SUBSET_SIZES["test"]
    assert metrics["validation"]["n"] == 2 * SUBSET_SIZES["validation"]
    assert metrics["train"]["n"] == 2 * SUBSET_SIZES["train"]
    assert (folder / "model.joblib").is_file()
    meta = json.loads((folder / "head.json").read_text())
    with CacheSnapshot(mobilenet_cache) as snapshot:
        assert meta["spec_digest"] == snapshot.spec.digest
    assert meta["classes"] == ["cats", "dogs"]


def test_dense_head_accuracy(mobilenet_cache: Path, tmp_path: Path) -> None:
    result = train_head(mobilenet_cache, "dense", tmp_path)

    assert result["metrics"]["test"]["accuracy"] >= MIN_ACCURACY
    assert "loss" in result["metrics"]["test"]
    assert (Path(result["model_path"]) / "model.keras").is_file()
    head, meta = load_head(result["model_path"])
    test = load_dataset(mobilenet_cache).splits["test"]
    assert float(np.mean(head.predict(test.features) == test.labels)) == pytest.approx(
        result["metrics"]["test"]["accuracy"]
    )


def test_derived_splits_group_copies(mobilenet_025_weights: Path, photo_subset: Path, tmp_path: Path) -> None:
    tree = flat_tree(photo_subset / "train", tmp_path / "photos", per_class=10)
    cat = sorted((tree / "cats").iterdir())[0]
    shutil.copy2(cat, tree / "cats" / "copy_of_first.jpg")
    spec = make_spec("mobilenet", str(mobilenet_025_weights), 96, alpha=0.25)
    cache = extract_features(tree, tmp_path / "cache", spec).cache

    data = load_dataset(cache, random_state=3)

    assert data.derived_splits is True
    assert sorted(data.splits) == ["test", "train", "validation"]
    digests = {name: set(split.digests) for name, split in data.splits.items()}
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]
    assert sum(len(split) for split in data.splits.values()) == 21
    holding_copies = [name for name, split in data.splits.items() if f"cats/{cat.name}" in split.paths]
    assert len(holding_copies) == 1
    assert "cats/copy_of_first.jpg" in data.splits[holding_copies[0]].paths
    for split in data.splits.values():
        assert set(split.labels.tolist()) == {0, 1}
    assert check_dataset(cache, random_state=3) == {name: len(split) for name, split in data.splits.items()}
    again = load_dataset(cache, random_state=3)
    assert again.splits["test"].paths == data.splits["test"].paths


def test_predict_held_out_photos(logreg_model: dict[str, Any], held_out: Path, mobilenet_cache: Path) -> None:
    photos = sorted(held_out.rglob("*.jpg"))
    with CacheSnapshot(mobilenet_cache) as snapshot:
        cached_digests = set(snapshot.columns.digest)
    assert not {file_digest(p) for p in photos} & cached_digests

    results = predict_images(logreg_model["model_path"], [held_out])

    assert [r["path"] for r in results] == [str(p) for p in photos]
    assert all(r["cached"] is False for r in results)
    assert agreement(results) >= MIN_ACCURACY
    assert all(0.5 <= r["probability"] <= 1.0 for r in results)


def test_predict_cached_photos_reuses_rows(
    logreg_model: dict[str, Any], photo_subset: Path, mobilenet_cache: Path
) -> None:
    results = predict_images(logreg_model["model_path"], [photo_subset / "test"])

    assert len(results) == 2 * SUBSET_SIZES["test"]
    assert all(r["cached"] is True for r in results)
    assert agreement(results) >= MIN_ACCURACY
    # Cached rows must give exactly what the head gives on the stored features of that path.
    head, meta = load_head(logreg_model["model_path"])
    test = load_dataset(mobilenet_cache).splits["test"]
    proba = head.predict_proba(test.features)
    expected = {
        path: (meta["classes"][int(row.argmax())], float(row.max()))
        for path, row in zip(test.paths, proba, strict=True)
    }
    for result in results:
        path = Path(result["path"]).relative_to(photo_subset).as_posix()
        assert result["class"] == expected[path][0], path
        assert result["probability"] == pytest.approx(expected[path][1], abs=1e-6), path


def test_predict_with_moved_weights(
    mobilenet_025_weights: Path, photo_subset: Path, held_out: Path, tmp_path: Path
) -> None:
    weights_copy = tmp_path / "weights" / mobilenet_025_weights.name
    weights_copy.parent.mkdir()
    shutil.copy(mobilenet_025_weights, weights_copy)
    tree = flat_tree(photo_subset / "train", tmp_path / "photos", per_class=8)
    spec = make_spec("mobilenet", str(weights_copy), 96, alpha=0.25)
    summary = extract_features(tree, tmp_path / "cache", spec)
    model = train_head(summary.cache, "logreg", tmp_path / "models")["model_path"]
    photo = sorted((held_out / "test" / "cats").iterdir())[0]
    weights_copy.unlink()

    with pytest.raises(SpecError, match="--weights"):
        predict_images(model, [photo])
    results = predict_images(model, [photo], weights=str(mobilenet_025_weights))

    assert len(results) == 1
    assert results[0]["cached"] is False
    assert results[0]["class"] in ("cats", "dogs")


def test_predict_rejects_other_weights(
    logreg_model: dict[str, Any], mobilenet_025_weights: Path, held_out: Path
) -> None:
    photo = sorted((held_out / "test" / "dogs").iterdir())[0]

    with pytest.raises(SpecError, match="differ from the weights"):
        predict_images(logreg_model["model_path"], [photo], weights=str(mobilenet_025_weights))


def test_flows_extract_train_predict(
    prefect_api: None, mobilenet_025_weights: Path, photo_subset: Path, held_out: Path, tmp_path: Path
) -> None:
    from flows.extract import extract_flow
    from flows.predict import predict_flow
    from flows.train import train_flow

    tree = flat_tree(photo_subset / "train", tmp_path / "photos", per_class=10)
    spec = make_spec("mobilenet", str(mobilenet_025_weights), 96, alpha=0.25)
    photos = sorted((held_out / "test" / "dogs").iterdir())[:2] + sorted((tree / "cats").iterdir())[:1]

    summary = extract_flow(str(tree), str(tmp_path / "cache"), spec.to_json(), batch_size=8)
    trained = train_flow(summary["cache"], "logreg", str(tmp_path / "models"))
    results = predict_flow(trained["model_path"], [str(p) for p in photos])

    assert summary["computed"] == 20
    assert summary["built_model"] is True
    assert Path(summary["cache"]).name == spec.cache_name
    assert trained["metrics"]["train"]["n"] > 0
    assert (Path(trained["model_path"]) / "head.json").is_file()
    assert [r["path"] for r in results] == [str(p) for p in photos]
    assert [r["cached"] for r in results] == [False, False, True]

"""Cached augmented views: the seeded transform, storage beside the originals, reuse and training on them."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_subset
from pipeline.augment import (
    RECIPE_ATTR,
    AugmentError,
    AugmentRecipe,
    augment_image,
    check_recipe,
    extract_views,
    stored_recipe,
)
from pipeline.images import file_digest, load_image

SIZE = 96
VIEWS = 2
# Images per class and split of the small tree; train images get views.
SIZES = {"train": 4, "validation": 2, "test": 2}
TRAIN_IMAGES = 2 * SIZES["train"]
DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def photo(cats_vs_dogs: Path) -> tuple[np.ndarray, str]:
    """A real cat photo decoded at the test size, with its digest."""
    path = cats_vs_dogs / "train" / "cats" / "cat.0.jpg"
    return load_image(path, SIZE), file_digest(path)


@pytest.fixture(scope="module")
def spec(mobilenet_025_weights: Path):
    from pipeline.spec import make_spec

    return make_spec("mobilenet", str(mobilenet_025_weights), SIZE, alpha=0.25)


@pytest.fixture
def tree(cats_vs_dogs: Path, tmp_path: Path) -> Path:
    return copy_subset(cats_vs_dogs, tmp_path / "data", SIZES)


def _extract(tree: Path, cache_dir: Path, spec) -> Path:
    from pipeline.extract import extract_features

    summary = extract_features(tree, cache_dir, spec)
    assert not summary.failed
    return Path(summary.cache)


def _rows(cache: Path) -> dict[tuple[str, int], tuple[str, np.ndarray]]:
    """Map (digest, view) to (split, features) for every present row."""
    from pipeline.snapshot import CacheSnapshot

    with CacheSnapshot(cache) as snapshot:
        cols = snapshot.columns
        chosen = snapshot.select(split=None, present_only=True, views=True)
        features = snapshot.read_features(chosen)
        return {(cols.digest[i], int(cols.view[i])): (cols.split[i], features[k]) for k, i in enumerate(chosen)}


# ----------------------------------------------------------------------------- recipe


def test_recipe_json_round_trip() -> None:
    recipe = AugmentRecipe(flip=False, rotation=5, zoom=0.1, crop=0.05, seed=7)
    assert AugmentRecipe.from_json(recipe.to_json()) == recipe
    assert json.loads(recipe.to_json())["rotation"] == 5.0


def test_recipe_int_and_float_ranges_serialise_alike() -> None:
    assert AugmentRecipe(rotation=20).to_json() == AugmentRecipe(rotation=20.0).to_json()


@pytest.mark.parametrize(
    "field, value",
    [
        ("rotation", -1.0),
        ("rotation", 181.0),
        ("zoom", -0.1),
        ("zoom", 0.6),
        ("crop", -0.1),
        ("crop", 0.51),
        ("seed", -1),
        ("seed", 1.5),
        ("flip", "yes"),
        ("version", 99),
    ],
)
def test_recipe_rejects_invalid_value(field: str, value: object) -> None:
    with pytest.raises(AugmentError, match=field if field != "version" else "version 99"):
        AugmentRecipe(**{field: value})


def test_recipe_from_json_rejects_unknown_field() -> None:
    with pytest.raises(AugmentError, match="unknown fields"):
        AugmentRecipe.from_json('{"flip": true, "shear": 0.2}')


def test_recipe_from_json_rejects_invalid_json() -> None:
    with pytest.raises(AugmentError, match="not valid JSON"):
        AugmentRecipe.from_json("{flip")


# ----------------------------------------------------------------------------- transform


def test_view_is_reproducible(photo: tuple[np.ndarray, str]) -> None:
    image, digest = photo
    first = augment_image(image, AugmentRecipe(), digest, 1)
    again = augment_image(image.copy(), AugmentRecipe(), digest, 1)
    assert first.shape == image.shape
    assert first.dtype == np.uint8
    assert np.array_equal(first, again)


def test_view_differs_from_original(photo: tuple[np.ndarray, str]) -> None:
    image, digest = photo
    view = augment_image(image, AugmentRecipe(), digest, 1)
    assert np.abs(view.astype(int) - image).mean() > 5


@pytest.mark.parametrize(
    "other",
    [
        {"view": 2},
        {"recipe": AugmentRecipe(seed=1)},
        {"digest": DIGEST},
    ],
    ids=["view", "seed", "digest"],
)
def test_view_depends_on_index_seed_and_digest(photo: tuple[np.ndarray, str], other: dict) -> None:
    image, digest = photo
    base = augment_image(image, AugmentRecipe(), digest, 1)
    args = {"recipe": AugmentRecipe(), "digest": digest, "view": 1, **other}
    assert not np.array_equal(base, augment_image(image, args["recipe"], args["digest"], args["view"]))


def test_identity_recipe_returns_image(photo: tuple[np.ndarray, str]) -> None:
    image, digest = photo
    identity = AugmentRecipe(flip=False, rotation=0, zoom=0, crop=0)
    for view in (1, 2, 3):
        assert np.array_equal(augment_image(image, identity, digest, view), image)


def test_flip_only_recipe_mirrors_half_the_views(photo: tuple[np.ndarray, str]) -> None:
    image, digest = photo
    flip_only = AugmentRecipe(flip=True, rotation=0, zoom=0, crop=0)
    views = [augment_image(image, flip_only, digest, view) for view in range(1, 41)]
    mirrored = [np.array_equal(v, image[:, ::-1]) for v in views]
    unchanged = [np.array_equal(v, image) for v in views]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 8 <= sum(mirrored) <= 32


def test_uniform_image_stays_uniform() -> None:
    """Reflection fill: rotated and zoomed-out views of a flat image have no dark corners."""
    flat = np.full((SIZE, SIZE, 3), 77, np.uint8)
    wide = AugmentRecipe(rotation=45, zoom=0.5, crop=0.5)
    for view in range(1, 11):
        out = augment_image(flat, wide, DIGEST, view)
        assert np.abs(out.astype(int) - 77).max() <= 1


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)],
    ids=["not-square", "float", "gray"],
)
def test_augment_rejects_bad_image(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 image"):
        augment_image(image, AugmentRecipe(), DIGEST, 1)


def test_augment_rejects_view_zero(photo: tuple[np.ndarray, str]) -> None:
    with pytest.raises(ValueError, match="view index"):
        augment_image(photo[0], AugmentRecipe(), photo[1], 0)


# ----------------------------------------------------------------------------- cached views


def test_views_stored_for_train_only(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    summary = extract_views(tree, tmp_path / "cache", spec, VIEWS)
    rows = _rows(cache)

    assert summary.computed == VIEWS * TRAIN_IMAGES
    assert summary.images == TRAIN_IMAGES
    train = {d for (d, v), (split, _) in rows.items() if v == 0 and split == "train"}
    assert len(train) == TRAIN_IMAGES
    for digest in train:
        assert {v for (d, v) in rows if d == digest} == {0, 1, 2}
    evaluation = {d for (d, v), (split, _) in rows.items() if split in ("validation", "test")}
    assert len(evaluation) == 2 * (SIZES["validation"] + SIZES["test"])
    assert all(v == 0 for (d, v) in rows if d in evaluation)
    assert stored_recipe(cache) == AugmentRecipe()


def test_view_features_differ_from_original(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, 1)
    rows = _rows(cache)
    for (digest, view), (_, features) in rows.items():
        if view == 1:
            assert not np.allclose(features, rows[(digest, 0)][1], atol=1e-3)


def test_second_run_reuses_views(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)
    before = _rows(cache)
    written = cache.stat().st_mtime_ns

    again = extract_views(tree, tmp_path / "cache", spec, VIEWS)

    assert again.computed == 0
    assert again.reused == VIEWS * TRAIN_IMAGES
    assert cache.stat().st_mtime_ns == written
    after = _rows(cache)
    assert after.keys() == before.keys()


def test_more_views_computes_only_new_ones(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)
    before = _rows(cache)

    more = extract_views(tree, tmp_path / "cache", spec, VIEWS + 1)

    assert more.computed == TRAIN_IMAGES
    assert more.reused == VIEWS * TRAIN_IMAGES
    after = _rows(cache)
    assert sum(1 for (_, v) in after if v == VIEWS + 1) == TRAIN_IMAGES
    for key, (_, features) in before.items():
        assert np.array_equal(after[key][1], features)


def test_fewer_views_keeps_stored_ones(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)
    fewer = extract_views(tree, tmp_path / "cache", spec, 1)
    assert fewer.computed == 0
    assert sum(1 for (_, v) in _rows(cache) if v == VIEWS) == TRAIN_IMAGES


def test_new_image_gets_its_views(tree: Path, tmp_path: Path, spec, cats_vs_dogs: Path) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)
    added = cats_vs_dogs / "train" / "dogs" / "dog.500.jpg"
    shutil.copy2(added, tree / "train" / "dogs" / added.name)

    _extract(tree, tmp_path / "cache", spec)
    summary = extract_views(tree, tmp_path / "cache", spec, VIEWS)

    assert summary.computed == VIEWS
    digest = file_digest(added)
    assert {v for (d, v) in _rows(cache) if d == digest} == {0, 1, 2}


def test_killed_run_views_reused(tree: Path, tmp_path: Path, spec) -> None:
    """Views that a killed run committed as segments are kept, and compacted by the next run."""
    from pipeline.augment import ViewDecoder
    from pipeline.compute import WorkItem, compute_rows
    from pipeline.extractor import FeatureExtractor
    from pipeline.images import scan_tree
    from pipeline.store import list_segments

    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, 1)
    manifest = scan_tree(tree)
    train = [entry for entry in manifest.entries if entry.split == "train"]
    work = [WorkItem(entry, file_digest(entry.abs_path), 2) for entry in train]
    compute_rows(cache, spec, manifest.classes, work, FeatureExtractor(spec), decode=ViewDecoder(AugmentRecipe()))
    assert list_segments(cache)

    summary = extract_views(tree, tmp_path / "cache", spec, 2)

    assert summary.computed == 0
    assert summary.reused == 2 * TRAIN_IMAGES
    assert not list_segments(cache)
    assert sum(1 for (_, v) in _rows(cache) if v == 2) == TRAIN_IMAGES


def test_views_reproducible_in_another_cache(tree: Path, tmp_path: Path, spec) -> None:
    first = _extract(tree, tmp_path / "one", spec)
    extract_views(tree, tmp_path / "one", spec, 1)
    second = _extract(tree, tmp_path / "two", spec)
    extract_views(tree, tmp_path / "two", spec, 1, batch_size=3)
    rows_one, rows_two = _rows(first), _rows(second)
    assert rows_one.keys() == rows_two.keys()
    for key, (_, features) in rows_one.items():
        np.testing.assert_allclose(rows_two[key][1], features, rtol=1e-4, atol=1e-4)


def test_other_recipe_rejected(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)
    written = cache.stat().st_mtime_ns

    with pytest.raises(AugmentError, match="--replace-views"):
        extract_views(tree, tmp_path / "cache", spec, VIEWS, AugmentRecipe(seed=1))
    with pytest.raises(AugmentError, match="not the requested"):
        check_recipe(cache, AugmentRecipe(seed=1))
    assert cache.stat().st_mtime_ns == written


def test_replace_views_recomputes(tree: Path, tmp_path: Path, spec) -> None:
    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS + 1)
    before = _rows(cache)
    other = AugmentRecipe(seed=1)

    summary = extract_views(tree, tmp_path / "cache", spec, VIEWS, other, replace=True)

    assert summary.dropped == (VIEWS + 1) * TRAIN_IMAGES
    assert summary.computed == VIEWS * TRAIN_IMAGES
    assert stored_recipe(cache) == other
    after = _rows(cache)
    assert sum(1 for (_, v) in after if v > VIEWS) == 0
    for (digest, view), (_, features) in after.items():
        if view == 0:
            assert np.array_equal(features, before[(digest, 0)][1])
        else:
            assert not np.allclose(features, before[(digest, view)][1], atol=1e-3)


def test_views_need_a_cache(tree: Path, tmp_path: Path, spec) -> None:
    with pytest.raises(AugmentError, match="convcache extract"):
        extract_views(tree, tmp_path / "cache", spec, VIEWS)


def test_views_need_original_rows(tree: Path, tmp_path: Path, spec, cats_vs_dogs: Path) -> None:
    _extract(tree, tmp_path / "cache", spec)
    shutil.copy2(cats_vs_dogs / "train" / "cats" / "cat.500.jpg", tree / "train" / "cats" / "cat.500.jpg")
    with pytest.raises(AugmentError, match="1 images .* have no cached features"):
        extract_views(tree, tmp_path / "cache", spec, VIEWS)


@pytest.mark.parametrize("views", [0, -1])
def test_invalid_view_count_rejected(tree: Path, tmp_path: Path, spec, views: int) -> None:
    with pytest.raises(AugmentError, match="invalid number of views"):
        extract_views(tree, tmp_path / "cache", spec, views)


def test_extraction_keeps_views_and_recipe(tree: Path, tmp_path: Path, spec) -> None:
    """A later extraction (here after an image left the tree) compacts the cache without losing views."""
    cache = _extract(tree, tmp_path / "cache", spec)
    recipe = AugmentRecipe(seed=3)
    extract_views(tree, tmp_path / "cache", spec, VIEWS, recipe)
    next(iter(sorted((tree / "validation" / "cats").iterdir()))).unlink()

    _extract(tree, tmp_path / "cache", spec)

    assert sum(1 for (_, v) in _rows(cache) if v > 0) == VIEWS * TRAIN_IMAGES
    assert stored_recipe(cache) == recipe


# ----------------------------------------------------------------------------- training on views


def test_head_with_views_evaluates_on_originals(tree: Path, tmp_path: Path, spec) -> None:
    from pipeline.dataset import load_dataset
    from pipeline.training import train_head

    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, VIEWS)

    data = load_dataset(cache, use_views=True)
    assert len(data.splits["train"]) == (VIEWS + 1) * TRAIN_IMAGES
    for split in ("validation", "test"):
        assert len(data.splits[split]) == 2 * SIZES[split]
        assert not data.splits[split].views.any()

    result = train_head(cache, "logreg", tmp_path / "models", use_views=True, dataset=data)
    assert result["metrics"]["train"]["n"] == (VIEWS + 1) * TRAIN_IMAGES
    assert result["metrics"]["validation"]["n"] == 2 * SIZES["validation"]
    assert result["metrics"]["test"]["n"] == 2 * SIZES["test"]


def test_unsplit_tree_views_join_train_part_only(cats_vs_dogs: Path, tmp_path: Path, spec) -> None:
    from pipeline.dataset import load_dataset

    flat = tmp_path / "flat"
    for name in ("cats", "dogs"):
        (flat / name).mkdir(parents=True)
        for photo in sorted((cats_vs_dogs / "train" / name).iterdir())[:6]:
            shutil.copy2(photo, flat / name / photo.name)
    cache = _extract(flat, tmp_path / "cache", spec)

    summary = extract_views(flat, tmp_path / "cache", spec, 1)
    data = load_dataset(cache, use_views=True)

    assert summary.computed == 12
    train = data.splits["train"]
    originals = {d for d, v in zip(train.digests, train.views) if v == 0}
    assert {d for d, v in zip(train.digests, train.views) if v > 0} == originals
    for split in ("validation", "test"):
        assert not data.splits[split].views.any()


# ----------------------------------------------------------------------------- command line


def _cli_args(tree: Path, cache_dir: Path, weights: Path, *extra: str) -> list[str]:
    return ["augment", str(tree), "--cache-dir", str(cache_dir), "--base", "mobilenet", "--alpha", "0.25",
            "--weights", str(weights), "--input-size", str(SIZE), "--json", *extra]


def test_augment_command_runs_flow(tree: Path, tmp_path: Path, mobilenet_025_weights: Path, prefect_api: None) -> None:
    from flows.cli import main

    # Not capsys: Prefect may bind its log handler to the stderr of the test that first runs a flow.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(_cli_args(tree, tmp_path / "cache", mobilenet_025_weights, "--views", "1"))

    assert code == 0
    result = json.loads(out.getvalue())
    assert result["extract"]["computed"] == 2 * sum(SIZES.values())
    assert result["views"]["computed"] == TRAIN_IMAGES
    assert result["views"]["recipe"] == json.loads(AugmentRecipe().to_json())


def test_augment_command_rejects_other_recipe(tree: Path, tmp_path: Path, spec, mobilenet_025_weights: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    cache = _extract(tree, tmp_path / "cache", spec)
    extract_views(tree, tmp_path / "cache", spec, 1)

    code = main(_cli_args(tree, tmp_path / "cache", mobilenet_025_weights, "--views", "1", "--rotation", "5"))

    assert code == 1
    assert "--replace-views" in capsys.readouterr().err
    assert json.loads(str(_attrs(cache)[RECIPE_ATTR]))["rotation"] == 20.0


def _attrs(cache: Path) -> dict:
    from pipeline.store import read_header

    return read_header(cache).attrs


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--views", "0"], "invalid number of views 0"),
        (["--views", "1", "--zoom", "0.9"], "invalid augmentation zoom"),
        (["--views", "1", "--augment-seed", "-2"], "invalid augmentation seed"),
        (["--views", "1", "--batch-size", "0"], "invalid batch size 0"),
        (["--views", "1", "--layer", "nosuch"], "layer 'nosuch' not found in mobilenet"),
    ],
    ids=["views", "zoom", "seed", "batch-size", "layer"],
)
def test_augment_command_rejects_bad_option(tree: Path, tmp_path: Path, mobilenet_025_weights: Path, extra: list[str],
                                            message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    code = main(_cli_args(tree, tmp_path / "cache", mobilenet_025_weights, *extra))

    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.h5"))

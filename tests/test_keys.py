"""Cache keys: every feature-spec field changes the key, and tree edits reuse rows by content."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from flows.cli import main
from pipeline.bases import BASES
from pipeline.dataset import load_dataset
from pipeline.extract import ExtractSummary, extract_features
from pipeline.images import file_digest
from pipeline.maintenance import describe_cache
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, make_spec
from pipeline.versions import library_versions

INPUT_SIZE = 96
PER_CLASS = 6
N_IMAGES = 2 * PER_CLASS

# One changed value per feature-spec option that make_spec accepts.
OPTION_CHANGES: dict[str, dict[str, Any]] = {
    "input_size": {"input_size": 128},
    "layer": {"layer": "conv_pw_5_relu"},
    "pooling": {"pooling": "max"},
    "resize": {"resize": "bicubic"},
    "jpeg_draft": {"jpeg_draft": False},
    "exif_transpose": {"exif_transpose": False},
    "precision": {"precision": "bfloat16"},
    "store_dtype": {"store_dtype": "float16"},
}


def fail_if_built(spec: FeatureSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Extractor factory for runs that must not build the conv base."""
    raise AssertionError(f"the conv base {spec.base} was built although every image is cached")


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_key_fields(a: FeatureSpec, b: FeatureSpec) -> set[str]:
    """Return the names of the key fields whose values differ between two specs."""
    first, second = a.key_fields(), b.key_fields()
    return {name for name in first if first[name] != second[name]}


def rows_by_path(cache_path: str | Path) -> dict[str, str]:
    """Return ``path -> digest`` for every original-image row of an image still in the tree."""
    with CacheSnapshot(cache_path) as snapshot:
        cols = snapshot.columns
        return {cols.path[i]: cols.digest[i] for i in range(len(cols)) if cols.view[i] == 0 and cols.present[i]}


def all_row_paths(cache_path: str | Path) -> list[str]:
    """Return the path of every row, present or not, in file order."""
    with CacheSnapshot(cache_path) as snapshot:
        return list(snapshot.columns.path)


def dataset_paths(cache_path: str | Path) -> list[str]:
    """Return the paths of every row that load_dataset hands to a head, over all splits."""
    data = load_dataset(cache_path)
    return sorted(path for split in data.splits.values() for path in split.paths)


def save_random_weights(path: Path, seed: int) -> Path:
    """Save randomly initialised MobileNet 0.25 weights drawn with ``seed``."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNet(
        input_shape=(INPUT_SIZE, INPUT_SIZE, 3), alpha=0.25, include_top=False, weights=None
    )
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def key_tree(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat tree of real photos, ``PER_CLASS`` per class. Tests must not modify it."""
    root = tmp_path_factory.mktemp("key_tree") / "photos"
    for class_name in ("cats", "dogs"):
        (root / class_name).mkdir(parents=True)
        for photo in sorted((cats_vs_dogs / "train" / class_name).iterdir())[:PER_CLASS]:
            shutil.copy2(photo, root / class_name / photo.name)
    return root


@pytest.fixture(scope="module")
def base_options(mobilenet_025_weights: Path) -> dict[str, Any]:
    """make_spec arguments of the baseline: real MobileNet 0.25 at 96 pixels."""
    return {"base": "mobilenet", "weights": str(mobilenet_025_weights), "input_size": INPUT_SIZE, "alpha": 0.25}


@pytest.fixture(scope="module")
def base_spec(base_options: dict[str, Any]) -> FeatureSpec:
    """The baseline feature spec."""
    return make_spec(**base_options)


@pytest.fixture(scope="module")
def baseline(key_tree: Path, base_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder containing the baseline spec's cache of :func:`key_tree`. Copy it before use."""
    cache_dir = tmp_path_factory.mktemp("baseline_cache")
    summary = extract_features(key_tree, cache_dir, base_spec)
    assert summary.computed == N_IMAGES
    return cache_dir


@pytest.fixture
def working_copy(key_tree: Path, baseline: Path, base_spec: FeatureSpec, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the tree and of the baseline cache that reuses every row."""
    tree = tmp_path / "photos"
    shutil.copytree(key_tree, tree)
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline, cache_dir)
    summary = extract_features(tree, cache_dir, base_spec, extractor_factory=fail_if_built)
    assert summary.computed == 0
    assert summary.reused == N_IMAGES
    return tree, cache_dir


# --------------------------------------------------------------------------- spec digest


def test_every_key_field_changes_digest(base_spec: FeatureSpec) -> None:
    changes = {
        "base": "vgg16", "weights_digest": "0" * 64, "input_size": 97, "layer": "conv_pw_5_relu",
        "pooling": "max", "alpha": 0.5, "preprocessing": "keras.applications.vgg16.preprocess_input",
        "resize": "bicubic", "jpeg_draft": False, "exif_transpose": False, "precision": "float16",
        "store_dtype": "float16", "augmentation": "flip", "version": 2,
    }
    assert set(changes) == set(base_spec.key_fields())
    for name, value in changes.items():
        changed = dataclasses.replace(base_spec, **{name: value})
        assert changed.digest != base_spec.digest, name
        assert changed.cache_name != base_spec.cache_name, name


def test_weights_label_not_in_key(base_spec: FeatureSpec) -> None:
    relabelled = dataclasses.replace(base_spec, weights="/elsewhere/copy.h5")

    assert "weights" not in base_spec.key_fields()
    assert relabelled.digest == base_spec.digest


def test_preprocessing_follows_base_family() -> None:
    preprocessing = {name: info.preprocessing for name, info in BASES.items()}

    assert len(set(preprocessing.values())) == len(BASES)
    for name in ("mobilenet", "mobilenet_v2", "vgg16"):
        spec = make_spec(name, "none")
        assert "preprocessing" in spec.key_fields()
        assert spec.preprocessing == preprocessing[name]


def test_library_versions_not_in_spec(base_spec: FeatureSpec) -> None:
    text = json.dumps(base_spec.key_fields())

    assert "library_versions" not in base_spec.key_fields()
    for version in library_versions().values():
        if version[0].isdigit() and version.count(".") >= 2:
            assert f'"{version}"' not in text, version


# --------------------------------------------------------------------------- cache misses


@pytest.mark.parametrize("field", sorted(OPTION_CHANGES))
def test_changed_option_misses_cache(
    field: str, base_options: dict[str, Any], base_spec: FeatureSpec, key_tree: Path, baseline: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline, cache_dir)
    baseline_file = cache_dir / base_spec.cache_name
    baseline_sha = sha256_of(baseline_file)
    variant = make_spec(**{**base_options, **OPTION_CHANGES[field]})

    summary = extract_features(key_tree, cache_dir, variant)

    assert changed_key_fields(base_spec, variant) == {field}
    assert variant.digest != base_spec.digest
    assert Path(summary.cache).name == variant.cache_name
    assert variant.cache_name != base_spec.cache_name
    assert summary.computed == N_IMAGES
    assert summary.reused == 0
    assert summary.built_model is True
    assert sha256_of(baseline_file) == baseline_sha
    assert sorted(p.name for p in cache_dir.glob("*.h5")) == sorted([base_spec.cache_name, variant.cache_name])


def test_float16_store_dtype_on_disk(
    base_options: dict[str, Any], key_tree: Path, tmp_path: Path
) -> None:
    spec = make_spec(**{**base_options, "store_dtype": "float16"})

    summary = extract_features(key_tree, tmp_path, spec)

    with h5py.File(summary.cache, "r") as handle:
        assert handle["features"].dtype == np.float16
    assert load_dataset(summary.cache).splits["train"].features.dtype == np.float32


def test_changed_base_misses_cache(key_tree: Path, tmp_path: Path) -> None:
    # Random weights for both, so that base (with its preprocessing) is the only change.
    first = make_spec("mobilenet", "none", INPUT_SIZE, alpha=1.0)
    second = make_spec("mobilenet_v2", "none", INPUT_SIZE, alpha=1.0)

    extract_features(key_tree, tmp_path, first)
    summary = extract_features(key_tree, tmp_path, second)

    assert changed_key_fields(first, second) == {"base", "preprocessing"}
    assert Path(summary.cache).name == second.cache_name
    assert second.cache_name != first.cache_name
    assert summary.computed == N_IMAGES
    assert summary.reused == 0


def test_weights_file_identified_by_content(key_tree: Path, tmp_path: Path) -> None:
    first_file = save_random_weights(tmp_path / "seed1.weights.h5", seed=1)
    second_file = save_random_weights(tmp_path / "seed2.weights.h5", seed=2)
    copy_of_first = tmp_path / "renamed" / "copy.weights.h5"
    copy_of_first.parent.mkdir()
    shutil.copy(first_file, copy_of_first)
    first = make_spec("mobilenet", str(first_file), INPUT_SIZE, alpha=0.25)
    second = make_spec("mobilenet", str(second_file), INPUT_SIZE, alpha=0.25)
    copied = make_spec("mobilenet", str(copy_of_first), INPUT_SIZE, alpha=0.25)
    cache_dir = tmp_path / "cache"

    first_run = extract_features(key_tree, cache_dir, first)
    second_run = extract_features(key_tree, cache_dir, second)
    copied_run = extract_features(key_tree, cache_dir, copied, extractor_factory=fail_if_built)

    assert changed_key_fields(first, second) == {"weights_digest"}
    assert second_run.cache != first_run.cache
    assert second_run.computed == N_IMAGES
    assert copied.digest == first.digest
    assert copied_run.cache == first_run.cache
    assert copied_run.computed == 0
    with CacheSnapshot(first_run.cache) as a, CacheSnapshot(second_run.cache) as b:
        assert a.columns.digest == b.columns.digest
        first_features = a.read_features(np.arange(N_IMAGES))
        second_features = b.read_features(np.arange(N_IMAGES))
    # Random weights give tiny activations, so compare relative to their scale.
    assert np.abs(first_features - second_features).max() > 0.1 * np.abs(first_features).max()


def test_weights_path_with_tilde(
    mobilenet_025_weights: Path, base_spec: FeatureSpec, key_tree: Path, baseline: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    shutil.copy(mobilenet_025_weights, home / "weights" / "mobilenet.h5")
    monkeypatch.setenv("HOME", str(home))
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline, cache_dir)

    spec = make_spec("mobilenet", "~/weights/mobilenet.h5", INPUT_SIZE, alpha=0.25)
    summary = extract_features(key_tree, cache_dir, spec, extractor_factory=fail_if_built)

    assert spec.weights == str((home / "weights" / "mobilenet.h5").resolve())
    assert spec.digest == base_spec.digest
    assert summary.computed == 0


def test_library_upgrade_keeps_cache(
    working_copy: tuple[Path, Path], base_spec: FeatureSpec
) -> None:
    tree, cache_dir = working_copy
    cache_file = cache_dir / base_spec.cache_name
    old_versions = {**library_versions(), "tensorflow": "2.0.0", "keras": "2.3.1", "pillow": "8.0.0"}
    with h5py.File(cache_file, "r+") as handle:
        handle.attrs["library_versions"] = json.dumps(old_versions)

    summary = extract_features(tree, cache_dir, base_spec, extractor_factory=fail_if_built)

    assert summary.cache == str(cache_file)
    assert summary.computed == 0
    assert summary.reused == N_IMAGES


# --------------------------------------------------------------------------- tree edits


def test_moved_tree_reuses_rows(working_copy: tuple[Path, Path], base_spec: FeatureSpec, tmp_path: Path) -> None:
    tree, cache_dir = working_copy
    before = rows_by_path(cache_dir / base_spec.cache_name)
    moved = tmp_path / "moved" / "renamed_photos"
    moved.parent.mkdir()
    shutil.move(tree, moved)

    summary = extract_features(moved, cache_dir, base_spec, extractor_factory=fail_if_built)

    assert summary.computed == 0
    assert summary.reused == N_IMAGES
    info = describe_cache(summary.cache)
    assert info["data_root"] == str(moved.resolve())
    assert info["images"] == N_IMAGES
    assert info["absent_rows"] == 0
    after = rows_by_path(summary.cache)
    assert after == before
    assert sorted(after) == sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*.jpg"))


def test_renamed_file_reuses_row(working_copy: tuple[Path, Path], base_spec: FeatureSpec) -> None:
    tree, cache_dir = working_copy
    old = sorted((tree / "cats").iterdir())[0]
    digest = file_digest(old)
    os.rename(old, tree / "cats" / "renamed.jpg")

    summary = extract_features(tree, cache_dir, base_spec, extractor_factory=fail_if_built)

    assert summary.computed == 0
    rows = rows_by_path(summary.cache)
    assert rows["cats/renamed.jpg"] == digest
    assert f"cats/{old.name}" not in all_row_paths(summary.cache)
    assert len(all_row_paths(summary.cache)) == N_IMAGES
    assert "cats/renamed.jpg" in dataset_paths(summary.cache)


def test_changed_bytes_recompute_one_image(
    working_copy: tuple[Path, Path], base_spec: FeatureSpec, cats_vs_dogs: Path
) -> None:
    tree, cache_dir = working_copy
    target = sorted((tree / "cats").iterdir())[1]
    old_digest = file_digest(target)
    replacement = sorted((cats_vs_dogs / "train" / "cats").iterdir())[700]
    target.write_bytes(replacement.read_bytes())

    summary = extract_features(tree, cache_dir, base_spec)

    assert summary.computed == 1
    assert summary.reused == N_IMAGES - 1
    rows = rows_by_path(summary.cache)
    assert rows[f"cats/{target.name}"] == file_digest(replacement)
    with CacheSnapshot(summary.cache) as snapshot:
        absent = [i for i in range(len(snapshot.columns)) if not snapshot.columns.present[i]]
        assert [snapshot.columns.digest[i] for i in absent] == [old_digest]
    assert dataset_paths(summary.cache).count(f"cats/{target.name}") == 1


def test_deleted_image_left_out_and_pruned(
    working_copy: tuple[Path, Path], base_spec: FeatureSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    tree, cache_dir = working_copy
    cache_file = cache_dir / base_spec.cache_name
    first, second = sorted((tree / "dogs").iterdir())[:2]
    first.unlink()

    summary = extract_features(tree, cache_dir, base_spec, extractor_factory=fail_if_built)

    assert summary.computed == 0
    paths = dataset_paths(cache_file)
    assert f"dogs/{first.name}" not in paths
    assert len(paths) == N_IMAGES - 1
    assert describe_cache(cache_file)["rows"] == N_IMAGES

    assert main(["prune", str(cache_file), str(tree), "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["rows_before"] == N_IMAGES
    assert pruned["rows_after"] == N_IMAGES - 1
    assert describe_cache(cache_file)["rows"] == N_IMAGES - 1
    assert f"dogs/{first.name}" not in all_row_paths(cache_file)

    # Pruning also works on a deletion that no extraction has seen yet.
    second.unlink()
    assert main(["prune", str(cache_file), str(tree), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_after"] == N_IMAGES - 2
    assert sorted(all_row_paths(cache_file)) == sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg"))


def test_new_class_renumbers_labels(
    working_copy: tuple[Path, Path], base_spec: FeatureSpec, cats_vs_dogs: Path
) -> None:
    tree, cache_dir = working_copy
    (tree / "bears").mkdir()
    for photo in sorted((cats_vs_dogs / "validation" / "dogs").iterdir())[:2]:
        shutil.copy2(photo, tree / "bears" / photo.name)

    summary = extract_features(tree, cache_dir, base_spec)

    assert summary.computed == 2
    assert summary.classes == ["bears", "cats", "dogs"]
    with CacheSnapshot(summary.cache) as snapshot:
        assert snapshot.classes == ["bears", "cats", "dogs"]
        cols = snapshot.columns
        for i in range(len(cols)):
            assert snapshot.classes[cols.label[i]] == cols.path[i].split("/")[0], cols.path[i]
            assert file_digest(tree / cols.path[i]) == cols.digest[i], cols.path[i]


def test_same_bytes_in_two_classes(key_tree: Path, base_spec: FeatureSpec, tmp_path: Path) -> None:
    tree = tmp_path / "photos"
    shutil.copytree(key_tree, tree)
    cat = sorted((tree / "cats").iterdir())[0]
    shutil.copy2(cat, tree / "dogs" / "looks_like_a_dog.jpg")

    summary: ExtractSummary = extract_features(tree, tmp_path / "cache", base_spec)

    assert summary.computed == N_IMAGES
    assert summary.conflicts == [
        {"digest": file_digest(cat), "paths": {f"cats/{cat.name}": "cats", "dogs/looks_like_a_dog.jpg": "dogs"}}
    ]
    paths = dataset_paths(summary.cache)
    assert f"cats/{cat.name}" not in paths
    assert "dogs/looks_like_a_dog.jpg" not in paths
    assert len(paths) == N_IMAGES - 1
    assert describe_cache(summary.cache)["conflicts"] == 1

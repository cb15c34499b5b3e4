"""Extraction on real photos with real MobileNet 0.25 weights: row alignment and reuse."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.extract import ExtractSummary, extract_features
from pipeline.images import file_digest, load_image
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, make_spec

INPUT_SIZE = 128


def fail_if_built(spec: FeatureSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Extractor factory for runs that must not build the conv base."""
    raise AssertionError(f"the conv base {spec.base} was built although every image is cached")


def stored_rows(cache_path: Path) -> dict[str, tuple[str, int, str, bool]]:
    """Return ``path -> (digest, label, split, present)`` for every original-image row."""
    with CacheSnapshot(cache_path) as snapshot:
        cols = snapshot.columns
        return {
            cols.path[i]: (cols.digest[i], int(cols.label[i]), cols.split[i], bool(cols.present[i]))
            for i in range(len(cols))
            if cols.view[i] == 0
        }


def features_by_digest(cache_path: Path) -> dict[str, np.ndarray]:
    """Return the stored feature vector of every digest in the cache."""
    with CacheSnapshot(cache_path) as snapshot:
        features = snapshot.read_features(np.arange(len(snapshot.columns)))
        return dict(zip(snapshot.columns.digest, features, strict=True))


def file_identity(path: Path) -> tuple[int, int]:
    """Return inode and mtime_ns, which change whenever the cache file is republished."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def copy_tree_reversed(source: Path, target: Path) -> Path:
    """Copy every file of ``source`` into ``target`` in reverse sorted order, keeping mtimes."""
    files = sorted(path for path in source.rglob("*") if path.is_file())
    for path in reversed(files):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    return target


@pytest.fixture(scope="module")
def mobilenet_025_spec(mobilenet_025_weights: Path) -> FeatureSpec:
    """Real ImageNet MobileNet 0.25 at 128 pixels."""
    return make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def subset_extraction(
    photo_subset: Path, mobilenet_025_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory
) -> ExtractSummary:
    """Extract the photo subset in small, uneven batches so that rows span several segments."""
    summary = extract_features(
        photo_subset, tmp_path_factory.mktemp("subset_cache"), mobilenet_025_spec,
        batch_size=7, commit_rows=20, decode_workers=4,
    )
    assert not summary.failed
    return summary


def test_every_row_belongs_to_its_image(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec
) -> None:
    photos = sorted(photo_subset.rglob("*.jpg"))
    cache_path = Path(subset_extraction.cache)
    rows = stored_rows(cache_path)

    assert subset_extraction.computed == len(photos)
    assert subset_extraction.segments_committed > 1
    assert sorted(rows) == sorted(p.relative_to(photo_subset).as_posix() for p in photos)
    with CacheSnapshot(cache_path) as snapshot:
        classes = snapshot.classes
    assert classes == ["cats", "dogs"]
    for path, (digest, label, split, present) in rows.items():
        split_name, class_name, _ = path.split("/")
        assert file_digest(photo_subset / path) == digest, path
        assert label == classes.index(class_name), path
        assert split == split_name, path
        assert present, path


def test_stored_features_match_a_fresh_forward_pass(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec
) -> None:
    from pipeline.extractor import FeatureExtractor

    cache_path = Path(subset_extraction.cache)
    with CacheSnapshot(cache_path) as snapshot:
        paths = list(snapshot.columns.path)
        stored = snapshot.read_features(np.arange(len(paths)))
    # One batch in reverse order: a row that moved with a neighbour's features would not match.
    order = list(reversed(range(len(paths))))
    spec = mobilenet_025_spec
    images = np.stack([
        load_image(photo_subset / paths[i], spec.input_size, resize=spec.resize, draft=spec.jpeg_draft,
                   exif_transpose=spec.exif_transpose)
        for i in order
    ])
    fresh = np.empty_like(stored)
    fresh[order] = FeatureExtractor(spec)(images)

    np.testing.assert_allclose(stored, fresh, rtol=1e-4, atol=1e-3)
    distances = ((fresh[:, None, :] - stored[None, :, :]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == np.arange(len(paths))).all()


def test_reversed_copy_gives_same_rows(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec, tmp_path: Path
) -> None:
    reversed_tree = copy_tree_reversed(photo_subset, tmp_path / "reversed")

    summary = extract_features(reversed_tree, tmp_path / "cache", mobilenet_025_spec, batch_size=5, commit_rows=16)

    assert summary.computed == subset_extraction.computed
    first = stored_rows(Path(subset_extraction.cache))
    second = stored_rows(Path(summary.cache))
    assert {(d, p, label, s) for p, (d, label, s, _) in second.items()} == {
        (d, p, label, s) for p, (d, label, s, _) in first.items()
    }
    first_features = features_by_digest(Path(subset_extraction.cache))
    second_features = features_by_digest(Path(summary.cache))
    assert first_features.keys() == second_features.keys()
    for digest, vector in first_features.items():
        np.testing.assert_allclose(second_features[digest], vector, rtol=1e-4, atol=1e-3, err_msg=digest)


def test_second_run_computes_nothing(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec,
    cats_vs_dogs: Path, tmp_path: Path,
) -> None:
    tree = tmp_path / "photos"
    shutil.copytree(photo_subset, tree)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    shutil.copy2(subset_extraction.cache, cache_dir)
    n_photos = subset_extraction.computed

    again = extract_features(tree, cache_dir, mobilenet_025_spec, extractor_factory=fail_if_built)

    assert again.computed == 0
    assert again.reused == n_photos
    assert again.built_model is False
    assert again.rows == n_photos

    added = sorted((cats_vs_dogs / "train" / "cats").iterdir())[500]
    shutil.copy2(added, tree / "train" / "cats" / added.name)
    grown = extract_features(tree, cache_dir, mobilenet_025_spec)

    assert grown.computed == 1
    assert grown.reused == n_photos
    assert grown.built_model is True
    assert grown.rows == n_photos + 1
    rows = stored_rows(Path(grown.cache))
    assert rows[f"train/cats/{added.name}"] == (file_digest(added), 0, "train", True)

    published = file_identity(Path(grown.cache))
    third = extract_features(tree, cache_dir, mobilenet_025_spec, extractor_factory=fail_if_built)
    assert third.computed == 0
    assert third.reused == n_photos + 1
    assert file_identity(Path(third.cache)) == published


def test_failed_image_is_not_retried(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec, tmp_path: Path
) -> None:
    tree = tmp_path / "photos"
    for class_name in ("cats", "dogs"):
        (tree / class_name).mkdir(parents=True)
        for photo in sorted((photo_subset / "train" / class_name).iterdir())[:3]:
            shutil.copy2(photo, tree / class_name / photo.name)
    cat = sorted((photo_subset / "train" / "cats").iterdir())[0]
    dog = sorted((photo_subset / "train" / "dogs").iterdir())[0]
    (tree / "cats" / "truncated.jpg").write_bytes(cat.read_bytes()[:1500])
    (tree / "cats" / "truncated_copy.jpg").write_bytes(cat.read_bytes()[:1500])
    (tree / "dogs" / "truncated.jpg").write_bytes(dog.read_bytes()[:1500])
    cache_dir = tmp_path / "cache"

    first = extract_features(tree, cache_dir, mobilenet_025_spec)
    published = file_identity(Path(first.cache))
    second = extract_features(tree, cache_dir, mobilenet_025_spec, extractor_factory=fail_if_built)

    expected = [
        {"path": "cats/truncated.jpg", "reason": "truncated image data"},
        {"path": "cats/truncated_copy.jpg", "reason": "truncated image data"},
        {"path": "dogs/truncated.jpg", "reason": "truncated image data"},
    ]
    assert first.failed == expected
    assert first.computed == 6
    assert first.rows == 6
    assert second.failed == expected
    assert second.computed == 0
    assert file_identity(Path(second.cache)) == published
    # Rows around the failures keep their own paths and features.
    rows = stored_rows(Path(first.cache))
    decodable = [p for p in tree.rglob("*.jpg") if "truncated" not in p.name]
    assert sorted(rows) == sorted(p.relative_to(tree).as_posix() for p in decodable)
    for path, (digest, _label, _split, _present) in rows.items():
        assert file_digest(tree / path) == digest, path
    reference = features_by_digest(Path(subset_extraction.cache))
    for digest, vector in features_by_digest(Path(first.cache)).items():
        np.testing.assert_allclose(vector, reference[digest], rtol=1e-4, atol=1e-3, err_msg=digest)


def test_cache_dir_with_tilde(
    subset_extraction: ExtractSummary, photo_subset: Path, mobilenet_025_spec: FeatureSpec, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    shutil.copy2(subset_extraction.cache, home / "cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)

    summary = extract_features(photo_subset, "~/cache", mobilenet_025_spec, extractor_factory=fail_if_built)

    assert summary.cache == str(home / "cache" / mobilenet_025_spec.cache_name)
    assert summary.computed == 0
    assert not (tmp_path / "~").exists()

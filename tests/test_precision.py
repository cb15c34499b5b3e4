"""Reduced precision: bfloat16 and float16 conv bases, and caches stored as float16.

Real photos and real ImageNet MobileNet 0.25 weights, so the features are those a user gets.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import copy_subset
from pipeline.dataset import load_dataset
from pipeline.extract import ExtractSummary, extract_features
from pipeline.images import load_image
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, SpecError, make_spec

INPUT_SIZE = 128
SIZES = {"train": 6, "validation": 3, "test": 3}  # photos per class: 24 in all
CONV_OPS = {"Conv2D", "DepthwiseConv2dNative"}


def spec_for(weights: Path, **options: str) -> FeatureSpec:
    """MobileNet 0.25 at 128 pixels with real weights and the given precision options."""
    return make_spec("mobilenet", str(weights), INPUT_SIZE, alpha=0.25, **options)


def conv_dtypes(extractor: object) -> set[str]:
    """Return the dtypes that the convolutions of the graph the extractor runs compute in."""
    graph = extractor.graph  # type: ignore[attr-defined]
    return {op.get_attr("T").name for op in graph.get_operations() if op.type in CONV_OPS}


def stored_features(summary: ExtractSummary) -> dict[str, np.ndarray]:
    """Return ``path -> stored feature row`` of a cache, read as float32."""
    with CacheSnapshot(summary.cache) as snapshot:
        rows = snapshot.read_features(np.arange(len(snapshot.columns)))
        return dict(zip(snapshot.columns.path, rows, strict=True))


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """Return the norm of the difference over the norm of the reference."""
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def photos(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real photos in train/validation/test class folders."""
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("precision") / "photos", SIZES)


@pytest.fixture(scope="module")
def batch(photos: Path) -> np.ndarray:
    """The 24 photos decoded as the default spec decodes them."""
    return np.stack([load_image(path, INPUT_SIZE) for path in sorted(photos.rglob("*.jpg"))])


@pytest.fixture(scope="module")
def float32_features(mobilenet_025_weights: Path, batch: np.ndarray) -> np.ndarray:
    from pipeline.extractor import FeatureExtractor

    return FeatureExtractor(spec_for(mobilenet_025_weights))(batch)


@pytest.fixture(scope="module")
def float32_cache(photos: Path, mobilenet_025_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> ExtractSummary:
    return extract_features(photos, tmp_path_factory.mktemp("cache32"), spec_for(mobilenet_025_weights))


@pytest.fixture(scope="module")
def float16_cache(photos: Path, mobilenet_025_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> ExtractSummary:
    spec = spec_for(mobilenet_025_weights, store_dtype="float16")
    return extract_features(photos, tmp_path_factory.mktemp("cache16"), spec)


# --------------------------------------------------------------------------- compute precision


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_convolutions(mobilenet_025_weights: Path, precision: str) -> None:
    from pipeline.extractor import FeatureExtractor

    extractor = FeatureExtractor(spec_for(mobilenet_025_weights, precision=precision))

    assert conv_dtypes(extractor) == {precision}
    assert {variable.dtype for variable in extractor.model.weights} == {"float32"}


def test_float32_convolutions(mobilenet_025_weights: Path) -> None:
    from pipeline.extractor import FeatureExtractor

    assert conv_dtypes(FeatureExtractor(spec_for(mobilenet_025_weights))) == {"float32"}


def test_frozen_graph_matches_model(mobilenet_025_weights: Path, batch: np.ndarray,
                                    float32_features: np.ndarray) -> None:
    from pipeline.extractor import FeatureExtractor

    frozen = FeatureExtractor(spec_for(mobilenet_025_weights))
    unfrozen = FeatureExtractor(spec_for(mobilenet_025_weights), freeze=False)

    assert frozen.frozen
    assert not unfrozen.frozen
    assert "ReadVariableOp" not in {op.type for op in frozen.graph.get_operations()}
    np.testing.assert_allclose(unfrozen(batch), float32_features, rtol=1e-4, atol=1e-4)


# bfloat16 keeps 8 significant bits against float16's 11; through the 28 layers of MobileNet
# 0.25 this gave relative errors of 0.078 and 0.010 on these photos (TensorFlow 2.21, oneDNN).
@pytest.mark.parametrize(("precision", "tolerance"), [("bfloat16", 0.15), ("float16", 0.03)])
def test_reduced_precision_features_close(
    mobilenet_025_weights: Path, batch: np.ndarray, float32_features: np.ndarray, precision: str, tolerance: float
) -> None:
    from pipeline.extractor import FeatureExtractor

    features = FeatureExtractor(spec_for(mobilenet_025_weights, precision=precision))(batch)

    assert features.dtype == np.float32
    assert features.shape == float32_features.shape
    assert np.isfinite(features).all()
    assert relative_error(features, float32_features) < tolerance
    # Each row stays closest to the float32 row of its own photo.
    distances = ((features[:, None, :] - float32_features[None, :, :]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == np.arange(len(batch))).all()


def test_precision_leaves_global_policy(mobilenet_025_weights: Path) -> None:
    import keras

    from pipeline.extractor import FeatureExtractor

    before = keras.config.dtype_policy().name
    FeatureExtractor(spec_for(mobilenet_025_weights, precision="bfloat16"))

    assert keras.config.dtype_policy().name == before


def test_bad_layer_restores_global_policy(mobilenet_025_weights: Path) -> None:
    import keras

    from pipeline.extractor import FeatureExtractor

    spec = make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25, layer="no_such_layer",
                     precision="bfloat16")
    before = keras.config.dtype_policy().name

    with pytest.raises(ValueError, match="no_such_layer"):
        FeatureExtractor(spec)
    assert keras.config.dtype_policy().name == before


def test_bfloat16_cache_separate(photos: Path, mobilenet_025_weights: Path, float32_cache: ExtractSummary,
                                 tmp_path: Path) -> None:
    spec = spec_for(mobilenet_025_weights, precision="bfloat16")
    summary = extract_features(photos, Path(float32_cache.cache).parent, spec)

    assert summary.cache != float32_cache.cache
    assert summary.computed == float32_cache.computed
    assert summary.reused == 0
    float32_rows = stored_features(float32_cache)
    bfloat16_rows = stored_features(summary)
    assert sorted(bfloat16_rows) == sorted(float32_rows)
    for path, row in bfloat16_rows.items():
        assert relative_error(row, float32_rows[path]) < 0.15, path


# --------------------------------------------------------------------------- float16 storage


def test_float16_store_dtype_on_disk(float16_cache: ExtractSummary, float32_cache: ExtractSummary) -> None:
    with h5py.File(float16_cache.cache, "r") as half, h5py.File(float32_cache.cache, "r") as full:
        assert half["features"].dtype == np.float16
        assert full["features"].dtype == np.float32
        assert half["features"].shape == full["features"].shape
        assert half["features"].id.get_storage_size() * 2 == full["features"].id.get_storage_size()


def test_float16_store_reads_back_close(float16_cache: ExtractSummary, float32_cache: ExtractSummary) -> None:
    half = stored_features(float16_cache)
    full = stored_features(float32_cache)

    assert sorted(half) == sorted(full)
    for path, row in half.items():
        assert row.dtype == np.float32
        # float16 keeps 11 significant bits: a relative rounding error of at most 2**-11.
        np.testing.assert_allclose(row, full[path], rtol=2**-10, atol=1e-6, err_msg=path)


def test_float16_native_read(float16_cache: ExtractSummary) -> None:
    with CacheSnapshot(float16_cache.cache) as snapshot:
        native = snapshot.read_features([0, 1], dtype=None)
        widened = snapshot.read_features([0, 1])

    assert native.dtype == np.float16
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(native.astype(np.float32), widened)


def test_float16_dataset_is_float32(float16_cache: ExtractSummary) -> None:
    dataset = load_dataset(float16_cache.cache)

    assert set(dataset.splits) == {"train", "validation", "test"}
    for name, split in dataset.splits.items():
        assert split.features.dtype == np.float32, name
        assert np.isfinite(split.features).all(), name


def test_float16_store_survives_compaction(photos: Path, mobilenet_025_weights: Path, cats_vs_dogs: Path,
                                           float32_cache: ExtractSummary, tmp_path: Path) -> None:
    tree = copy_subset(photos, tmp_path / "photos", {"train": SIZES["train"]})
    spec = spec_for(mobilenet_025_weights, store_dtype="float16")
    first = extract_features(tree, tmp_path / "cache", spec)
    copy_subset(cats_vs_dogs, tree, {"validation": SIZES["validation"], "test": SIZES["test"]})

    second = extract_features(tree, tmp_path / "cache", spec)

    assert first.computed == 2 * SIZES["train"]
    assert second.computed == 2 * (SIZES["validation"] + SIZES["test"])
    assert second.reused == first.computed
    with h5py.File(second.cache, "r") as handle:
        assert handle["features"].dtype == np.float16
        assert handle["features"].shape[0] == second.rows
    full = stored_features(float32_cache)
    for path, row in stored_features(second).items():
        np.testing.assert_allclose(row, full[path], rtol=2**-10, atol=1e-6, err_msg=path)


# --------------------------------------------------------------------------- out-of-range features


@pytest.fixture(scope="module")
def amplified_vgg16_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random VGG16 weights with every kernel times 8, so features at 32 pixels exceed 65504."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel * 8, bias])
    path = tmp_path_factory.mktemp("weights") / "vgg16_amplified.weights.h5"
    model.save_weights(path)
    return path


def test_large_features_stored_as_float32(photos: Path, amplified_vgg16_weights: Path, tmp_path: Path) -> None:
    summary = extract_features(photos, tmp_path, make_spec("vgg16", str(amplified_vgg16_weights), 32))

    assert summary.computed == 2 * sum(SIZES.values())
    features = np.stack(list(stored_features(summary).values()))
    assert np.isfinite(features).all()
    assert np.abs(features).max() > np.finfo(np.float16).max


def test_float16_store_rejects_overflow(photos: Path, amplified_vgg16_weights: Path, tmp_path: Path) -> None:
    spec = make_spec("vgg16", str(amplified_vgg16_weights), 32, store_dtype="float16")

    with pytest.raises(SpecError, match="above the float16 maximum 65504.*Use --store-dtype float32"):
        extract_features(photos, tmp_path, spec)
    assert not (tmp_path / spec.cache_name).exists()


def test_float16_compute_rejects_overflow(photos: Path, amplified_vgg16_weights: Path, tmp_path: Path) -> None:
    spec = make_spec("vgg16", str(amplified_vgg16_weights), 32, precision="float16")

    with pytest.raises(SpecError, match="inf or NaN features .* in float16. Use --precision bfloat16 or float32"):
        extract_features(photos, tmp_path, spec)
    assert not (tmp_path / spec.cache_name).exists()


# --------------------------------------------------------------------------- bad settings


def test_spec_digest_covers_precision(mobilenet_025_weights: Path) -> None:
    names = {
        spec_for(mobilenet_025_weights).cache_name,
        spec_for(mobilenet_025_weights, precision="bfloat16").cache_name,
        spec_for(mobilenet_025_weights, precision="float16").cache_name,
        spec_for(mobilenet_025_weights, store_dtype="float16").cache_name,
    }

    assert len(names) == 4


def test_unknown_precision_rejected() -> None:
    with pytest.raises(SpecError, match="invalid precision 'fp16'; valid choices: float32, bfloat16, float16"):
        make_spec("vgg16", "none", precision="fp16")


def test_unknown_store_dtype_rejected() -> None:
    with pytest.raises(SpecError, match="invalid store dtype 'bfloat16'; valid choices: float32, float16"):
        make_spec("vgg16", "none", store_dtype="bfloat16")


def test_cli_rejects_unknown_precision(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(tmp_path), "--weights", "none", "--precision", "half"])

    assert exit_info.value.code == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err


def test_cli_rejects_unknown_store_dtype(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(tmp_path), "--weights", "none", "--store-dtype", "int8"])

    assert exit_info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err

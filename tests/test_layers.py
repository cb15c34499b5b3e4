"""Features from intermediate layers: layer listing, layer and pooling in the spec, extraction from a named layer."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_subset
from pipeline.layers import list_layers
from pipeline.spec import SpecError, make_spec

VGG16_NAMES = [
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
]


@pytest.fixture
def tiny_tree(cats_vs_dogs: Path, tmp_path: Path) -> Path:
    return copy_subset(cats_vs_dogs, tmp_path / "data", {"train": 2})


def _cache_features(cache: str | Path) -> np.ndarray:
    from pipeline.dataset import load_dataset

    return load_dataset(cache).splits["train"].features


def test_vgg16_layers_listed() -> None:
    layers = {row["name"]: row["shape"] for row in list_layers("vgg16")}

    assert list(layers) == VGG16_NAMES
    # At the default 150 px input, each pooling halves the side: 75, 37, 18, 9, 4.
    assert layers["block4_pool"] == [9, 9, 512]
    assert layers["block5_pool"] == [4, 4, 512]
    assert layers["block1_conv1"] == [150, 150, 64]


def test_mobilenet_v2_layers_listed() -> None:
    layers = {row["name"]: row["shape"] for row in list_layers("mobilenet_v2")}

    assert list(layers)[0] == "Conv1"
    assert list(layers)[-1] == "out_relu"
    assert layers["out_relu"] == [5, 5, 1280]
    assert layers["block_13_expand_relu"] == [10, 10, 576]
    assert layers["block_16_project"] == [5, 5, 320]


def test_layer_shapes_follow_input_size() -> None:
    layers = {row["name"]: row["shape"] for row in list_layers("vgg16", input_size=64)}
    assert layers["block4_pool"] == [4, 4, 512]


def test_layers_command_prints_json() -> None:
    from flows.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["layers", "vgg16", "--json"])

    assert code == 0
    assert [row["name"] for row in json.loads(out.getvalue())] == VGG16_NAMES


def test_layers_command_unknown_base(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    code = main(["layers", "vgg61"])

    err = capsys.readouterr().err
    assert code == 1
    assert "unknown conv base 'vgg61'" in err
    assert "vgg16" in err


def test_layer_and_pooling_change_spec() -> None:
    top = make_spec("vgg16", "none")
    block4 = make_spec("vgg16", "none", layer="block4_pool")
    block4_avg = make_spec("vgg16", "none", layer="block4_pool", pooling="avg")
    block4_max = make_spec("vgg16", "none", layer="block4_pool", pooling="max")

    digests = {spec.digest for spec in (top, block4, block4_avg, block4_max)}
    names = {spec.cache_name for spec in (top, block4, block4_avg, block4_max)}
    assert len(digests) == 4
    assert len(names) == 4
    assert block4.cache_name.startswith("vgg16-150-block4_pool-none-")
    assert block4_avg.cache_name.startswith("vgg16-150-block4_pool-avg-")


def test_invalid_pooling_rejected() -> None:
    with pytest.raises(SpecError, match="invalid pooling 'sum'; valid choices: none, avg, max"):
        make_spec("vgg16", "none", pooling="sum")


def test_block4_pool_extraction_shape(tiny_tree: Path, tmp_path: Path) -> None:
    from pipeline.extract import extract_features

    top = extract_features(tiny_tree, tmp_path / "cache", make_spec("vgg16", "none"))
    block4 = extract_features(tiny_tree, tmp_path / "cache", make_spec("vgg16", "none", layer="block4_pool"))
    block4_avg = extract_features(tiny_tree, tmp_path / "cache",
                                  make_spec("vgg16", "none", layer="block4_pool", pooling="avg"))

    assert _cache_features(top.cache).shape == (4, 4, 4, 512)
    assert _cache_features(block4.cache).shape == (4, 9, 9, 512)
    assert _cache_features(block4_avg.cache).shape == (4, 512)
    assert len({top.cache, block4.cache, block4_avg.cache}) == 3
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.h5")) == sorted(
        Path(s.cache).name for s in (top, block4, block4_avg))


def test_layer_features_match_keras(tiny_tree: Path, tmp_path: Path, mobilenet_025_weights: Path) -> None:
    """Cached rows of an intermediate layer equal a plain Keras sub-model's output, average-pooled."""
    import keras

    from pipeline.bases import build_conv_base, preprocess_function
    from pipeline.dataset import load_dataset
    from pipeline.extract import extract_features
    from pipeline.images import load_image

    spec = make_spec("mobilenet", str(mobilenet_025_weights), 128, alpha=0.25, layer="conv_pw_6_relu")
    data = load_dataset(extract_features(tiny_tree, tmp_path / "cache", spec).cache)
    base = build_conv_base("mobilenet", 128, str(mobilenet_025_weights), 0.25)
    sub = keras.Model(base.input, base.get_layer("conv_pw_6_relu").output)
    images = np.stack([load_image(tiny_tree / p, 128) for p in data.splits["train"].paths]).astype("float32")

    expected = np.asarray(sub(preprocess_function("mobilenet")(images), training=False)).mean(axis=(1, 2))

    assert data.splits["train"].features.shape == (4, 128)
    np.testing.assert_allclose(data.splits["train"].features, expected, rtol=1e-4, atol=1e-4)


def test_unknown_layer_rejected(tiny_tree: Path, tmp_path: Path) -> None:
    from pipeline.extract import extract_features

    with pytest.raises(ValueError, match=r"layer 'block9_pool' not found in vgg16; valid layers: block1_conv1"):
        extract_features(tiny_tree, tmp_path / "cache", make_spec("vgg16", "none", layer="block9_pool"))
    assert not list((tmp_path / "cache").glob("*.h5"))

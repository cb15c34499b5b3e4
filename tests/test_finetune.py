"""Fine-tuning: layer selection, freezing, a CPU run end to end and the tuned weights' own cache."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import copy_subset
from pipeline.augment import AugmentRecipe
from pipeline.finetune import (
    REPORT_FILE,
    WEIGHTS_FILE,
    FinetuneError,
    FinetuneSettings,
    finetune_base,
    freeze_layers,
    select_trainable_layers,
    warm_start_head,
)

SIZE = 96
SIZES = {"train": 8, "validation": 4, "test": 4}
# The last depthwise-separable block of MobileNet v1: two convolutions, two frozen BatchNorms, two ReLUs.
TRAINABLE_FROM = "conv_dw_13"
TUNED_LAYERS = ["conv_dw_13", "conv_pw_13"]


@pytest.fixture(scope="module")
def spec(mobilenet_025_weights: Path):
    from pipeline.spec import make_spec

    return make_spec("mobilenet", str(mobilenet_025_weights), SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def random_base() -> Any:
    from pipeline.bases import build_conv_base

    return build_conv_base("mobilenet", SIZE, None, 0.25)


@pytest.fixture(scope="module")
def tree(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real photo tree; tests must not modify it."""
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("finetune") / "data", SIZES)


@pytest.fixture(scope="module")
def cache(tree: Path, spec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.extract import extract_features

    summary = extract_features(tree, tmp_path_factory.mktemp("cache"), spec)
    assert not summary.failed
    return Path(summary.cache)


@pytest.fixture(scope="module")
def tuned(tree: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fine-tuning run on the CPU: 2 epochs of the last block, learning rate 1e-4."""
    settings = FinetuneSettings(trainable_from=TRAINABLE_FROM, epochs=2, batch_size=8, learning_rate=1e-4,
                                patience=2)
    output = tmp_path_factory.mktemp("models") / "tuned"
    warm = warm_start_head(cache, output, settings)
    result = finetune_base(tree, cache, warm["model_path"], output, settings)
    return {"warm": warm, "result": result, "output": output}


def _layer_weights(weights_path: str) -> dict[str, list[np.ndarray]]:
    from pipeline.bases import build_conv_base

    base = build_conv_base("mobilenet", SIZE, weights_path, 0.25)
    return {layer.name: layer.get_weights() for layer in base.layers if layer.weights}


# ----------------------------------------------------------------------------- settings


def test_settings_json_round_trip() -> None:
    settings = FinetuneSettings(trainable=("a", "b"), epochs=3, recipe=AugmentRecipe(seed=4), use_views=True)
    assert FinetuneSettings.from_json(settings.to_json()) == settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"trainable_from": "conv_pw_13", "trainable": ("conv_pw_13",)}, "exactly one of"),
        ({"trainable_from": "conv_pw_13", "epochs": 0}, "invalid number of epochs 0"),
        ({"trainable_from": "conv_pw_13", "batch_size": 0}, "invalid batch size 0"),
        ({"trainable_from": "conv_pw_13", "learning_rate": 0.0}, "invalid learning rate 0.0"),
        ({"trainable_from": "conv_pw_13", "learning_rate": -1e-5}, "invalid learning rate"),
        ({"trainable_from": "conv_pw_13", "learning_rate": math.nan}, "invalid learning rate nan"),
        ({"trainable_from": "conv_pw_13", "patience": -1}, "invalid patience -1"),
    ],
    ids=["neither", "both", "epochs", "batch", "rate-zero", "rate-negative", "rate-nan", "patience"],
)
def test_settings_reject_invalid_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        FinetuneSettings(**kwargs)


# ----------------------------------------------------------------------------- layer selection


def test_trainable_from_takes_later_layers(random_base: Any) -> None:
    assert select_trainable_layers(random_base, TRAINABLE_FROM) == TUNED_LAYERS


def test_trainable_list_takes_named_layers(random_base: Any) -> None:
    assert select_trainable_layers(random_base, None, ("conv_pw_12", "conv_pw_13_bn", "conv_pw_13")) == [
        "conv_pw_12", "conv_pw_13"]


def test_vgg16_block5_selection() -> None:
    from pipeline.bases import build_conv_base

    vgg16 = build_conv_base("vgg16", 64, None)
    assert select_trainable_layers(vgg16, "block5_conv1") == ["block5_conv1", "block5_conv2", "block5_conv3"]


def test_unknown_layer_rejected(random_base: Any) -> None:
    with pytest.raises(FinetuneError, match=r"layer 'block5_conv1' not found .*valid layers: conv1, conv1_bn"):
        select_trainable_layers(random_base, "block5_conv1")


def test_unknown_layer_in_list_rejected(random_base: Any) -> None:
    with pytest.raises(FinetuneError, match="layer 'nosuch' not found"):
        select_trainable_layers(random_base, None, ("conv_pw_13", "nosuch"))


@pytest.mark.parametrize("names", [("conv_pw_13_bn",), ("conv_pw_13_relu",), ("conv_pw_13_bn", "conv_pw_13_relu")],
                         ids=["batch-norm", "relu", "both"])
def test_layers_without_trainable_weights_rejected(random_base: Any, names: tuple[str, ...]) -> None:
    with pytest.raises(FinetuneError, match="no weights that fine-tuning trains"):
        select_trainable_layers(random_base, None, names)


def test_freeze_keeps_batch_norm_frozen() -> None:
    from pipeline.bases import build_conv_base

    base = build_conv_base("mobilenet", SIZE, None, 0.25)
    freeze_layers(base, ["conv_dw_13", "conv_dw_13_bn", "conv_pw_13"])

    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert trainable == TUNED_LAYERS
    assert len(base.trainable_weights) == 2


def test_layer_after_feature_cut_rejected(spec) -> None:
    from dataclasses import replace

    from pipeline.finetune import check_trainable_layers

    cut = replace(spec, layer="conv_pw_6_relu")
    with pytest.raises(FinetuneError, match="layer 'conv_pw_13' not found"):
        check_trainable_layers(cut, FinetuneSettings(trainable_from="conv_pw_13"))
    assert check_trainable_layers(cut, FinetuneSettings(trainable_from="conv_pw_6")) == ["conv_pw_6"]


# ----------------------------------------------------------------------------- end to end on the CPU


def test_only_unfrozen_layers_change(tuned: dict[str, Any], spec) -> None:
    from pipeline.spec import resolve_weights

    original = _layer_weights(resolve_weights(spec.base, spec.weights, spec.alpha, SIZE))
    after = _layer_weights(tuned["result"]["weights"])

    assert tuned["result"]["trainable_layers"] == TUNED_LAYERS
    assert original.keys() == after.keys()
    for name, weights in original.items():
        same = all(np.array_equal(a, b) for a, b in zip(weights, after[name], strict=True))
        if name in TUNED_LAYERS:
            assert not same, f"{name} should have been trained"
        else:
            assert same, f"{name} is frozen but changed"


def test_accuracy_reported_before_and_after(tuned: dict[str, Any]) -> None:
    result, warm = tuned["result"], tuned["warm"]
    for split in ("validation", "test"):
        n = 2 * SIZES[split]
        assert result["before"][split]["n"] == n
        assert result["after"][split]["n"] == n
        assert 0.0 <= result["after"][split]["accuracy"] <= 1.0
        # Before training, the stacked model is the warm-start head on the frozen base.
        assert result["before"][split]["accuracy"] == warm["metrics"][split]["accuracy"]
        assert result["before"][split]["loss"] == pytest.approx(warm["metrics"][split]["loss"], abs=1e-3)
    assert 1 <= result["epochs_run"] <= 2
    assert result["train_images"] == 2 * SIZES["train"]
    assert result["device"] in ("CPU", "GPU")


def test_report_and_head_written(tuned: dict[str, Any]) -> None:
    output = tuned["output"]
    report = json.loads((output / REPORT_FILE).read_text())
    head = json.loads((output / "head.json").read_text())

    assert report["after"] == tuned["result"]["after"]
    assert (output / WEIGHTS_FILE).is_file()
    assert head["spec_digest"] == tuned["result"]["tuned_spec_digest"]
    assert json.loads(head["spec"])["weights"] == str((output / WEIGHTS_FILE).resolve())


def test_tuned_weights_get_their_own_cache(tuned: dict[str, Any], tree: Path, cache: Path, spec) -> None:
    from pipeline.dataset import load_dataset
    from pipeline.extract import extract_features
    from pipeline.spec import make_spec

    tuned_spec = make_spec("mobilenet", tuned["result"]["weights"], SIZE, alpha=0.25)
    summary = extract_features(tree, cache.parent, tuned_spec)

    assert tuned_spec.digest != spec.digest
    assert tuned_spec.digest == tuned["result"]["tuned_spec_digest"]
    assert Path(summary.cache) == Path(tuned["result"]["tuned_cache"])
    assert Path(summary.cache) != cache
    assert summary.computed == 2 * sum(SIZES.values())
    assert cache.is_file()
    old, new = load_dataset(cache), load_dataset(summary.cache)
    assert old.splits["train"].digests == new.splits["train"].digests
    assert not np.allclose(old.splits["train"].features, new.splits["train"].features, atol=1e-4)


def test_tuned_head_predicts_with_tuned_base(tuned: dict[str, Any], tree: Path) -> None:
    from pipeline.predict import predict_images

    photo = sorted((tree / "test" / "dogs").iterdir())[0]
    [prediction] = predict_images(tuned["output"], [photo])

    assert prediction["class"] in ("cats", "dogs")
    assert 0.5 <= prediction["probability"] <= 1.0


def test_head_of_other_cache_rejected(tuned: dict[str, Any], tree: Path, tmp_path: Path, spec) -> None:
    from pipeline.extract import extract_features
    from pipeline.spec import make_spec

    other = make_spec("mobilenet", spec.weights, SIZE, alpha=0.25, pooling="max")
    other_cache = Path(extract_features(tree, tmp_path / "cache", other).cache)
    settings = FinetuneSettings(trainable_from=TRAINABLE_FROM, epochs=1)

    with pytest.raises(FinetuneError, match="not a dense head trained on"):
        finetune_base(tree, other_cache, tuned["warm"]["model_path"], tmp_path / "out", settings)


def test_cache_without_validation_rejected(cats_vs_dogs: Path, tmp_path: Path, spec) -> None:
    from pipeline.extract import extract_features

    tree = copy_subset(cats_vs_dogs, tmp_path / "data", {"train": 3, "test": 2})
    cache = Path(extract_features(tree, tmp_path / "cache", spec).cache)
    settings = FinetuneSettings(trainable_from=TRAINABLE_FROM, epochs=1)

    with pytest.raises(FinetuneError, match="no validation images"):
        finetune_base(tree, cache, tmp_path / "no-head", tmp_path / "out", settings)


# ----------------------------------------------------------------------------- command line


def _cli_args(tree: Path, tmp_path: Path, weights: Path, *extra: str) -> list[str]:
    return ["finetune", str(tree), "--cache-dir", str(tmp_path / "cache"), "--models-dir", str(tmp_path / "models"),
            "--base", "mobilenet", "--alpha", "0.25", "--weights", str(weights), "--input-size", str(SIZE),
            "--json", *extra]


def test_finetune_command_runs_flow(tree: Path, tmp_path: Path, mobilenet_025_weights: Path, prefect_api: None) -> None:
    from flows.cli import main

    # Not capsys: Prefect may bind its log handler to the stderr of the test that first runs a flow.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(_cli_args(tree, tmp_path, mobilenet_025_weights, "--trainable", "conv_pw_13", "--epochs", "1",
                              "--batch-size", "8"))

    assert code == 0
    result = json.loads(out.getvalue())
    assert result["trainable_layers"] == ["conv_pw_13"]
    assert result["epochs_run"] == 1
    assert result["extract"]["computed"] == 2 * sum(SIZES.values())
    assert Path(result["output"]).parent == tmp_path / "models"
    assert Path(result["weights"]).is_file()
    assert result["after"]["test"]["n"] == 2 * SIZES["test"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trainable-from", "block5_conv1"], "layer 'block5_conv1' not found"),
        ([], "exactly one of --trainable-from LAYER or --trainable"),
        (["--trainable-from", "conv_pw_13", "--trainable", "conv_pw_13"], "exactly one of"),
        (["--trainable", "conv_pw_13_bn"], "no weights that fine-tuning trains"),
        (["--trainable-from", "conv_pw_13", "--learning-rate", "0"], "invalid learning rate 0.0"),
        (["--trainable-from", "conv_pw_13", "--epochs", "0"], "invalid number of epochs 0"),
        (["--trainable-from", "conv_pw_13", "--rotation", "-5"], "invalid augmentation rotation"),
        (["--trainable-from", "conv_pw_13", "--batch-size", "0"], "invalid batch size 0"),
    ],
    ids=["unknown-layer", "no-layer", "both", "batch-norm-only", "learning-rate", "epochs", "rotation",
         "batch-size"],
)
def test_finetune_command_rejects_bad_option(tree: Path, tmp_path: Path, mobilenet_025_weights: Path,
                                             extra: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    code = main(_cli_args(tree, tmp_path, mobilenet_025_weights, *extra))

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("convcache: error: ")
    assert message in err
    assert not (tmp_path / "models").exists()
    assert not list((tmp_path / "cache").glob("*.h5"))

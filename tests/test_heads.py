"""Head registry, import-path heads, probability paths and saved heads with real cached features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import CachedDataset, load_dataset
from pipeline.heads import (
    HEAD_NAMES,
    DenseHead,
    HeadError,
    SklearnHead,
    load_head,
    make_head,
    save_head,
    softmax_scores,
)
from pipeline.predict import predict_images
from pipeline.registry import GRID_SIZES, HEADS, get_entry, resolve_heads
from pipeline.streaming import build_streaming_head

REGISTERED = ("dense", "logreg", "linear_svm", "svm_rbf", "knn", "random_forest", "hist_gb", "mlp")


@pytest.fixture(scope="module")
def subset_data(mobilenet_cache: Path) -> CachedDataset:
    """Real MobileNetV2 features of the photo subset, by split."""
    return load_dataset(mobilenet_cache)


def test_registry_names_every_head() -> None:
    assert HEAD_NAMES == REGISTERED


@pytest.mark.parametrize("name", REGISTERED)
def test_registry_grids_merge_defaults(name: str) -> None:
    entry = HEADS[name]
    for size in GRID_SIZES:
        grid = entry.param_grid(size)
        assert grid, f"{name} has an empty {size} grid"
        for params in grid:
            assert set(params) == set(entry.defaults)
    assert len(entry.param_grid("default")) >= 2
    assert entry.param_grid("none") == [entry.defaults]


def test_registry_rejects_bad_grid_size() -> None:
    with pytest.raises(HeadError, match="invalid grid size 'huge'.*default, small, none"):
        HEADS["logreg"].param_grid("huge")


def test_make_head_keeps_logreg_defaults() -> None:
    head = make_head("logreg", 2)
    assert isinstance(head, SklearnHead)
    assert head.params == {"C": 1.0}
    assert head.estimator.named_steps["model"].C == 1.0


def test_make_head_rejects_unknown_parameter() -> None:
    with pytest.raises(HeadError, match="invalid parameters \\['depth'\\] for head 'knn'.*n_neighbors"):
        make_head("knn", 2, depth=3)


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(HeadError) as raised:
        make_head("xgboost", 2)
    message = str(raised.value)
    assert "unknown head 'xgboost'" in message
    for name in REGISTERED:
        assert name in message
    assert "module:Class" in message


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("no_such_module_for_convcache:Classifier", "module 'no_such_module_for_convcache' not found"),
        ("sklearn.linear_model:NoSuchClassifier", "has no attribute 'NoSuchClassifier'"),
        ("sklearn.linear_model:Ridge", "is not a scikit-learn classifier"),
        ("sklearn.linear_model:ridge_regression", "is not a class"),
        ("sklearn.linear_model:", "write it as 'module:Class'"),
        (":RidgeClassifier", "write it as 'module:Class'"),
    ],
)
def test_bad_import_path_rejected(path: str, reason: str) -> None:
    with pytest.raises(HeadError) as raised:
        get_entry(path)
    assert reason in str(raised.value)
    assert "logreg" in str(raised.value) or "module:Class" in str(raised.value)


def test_resolve_heads_defaults_to_all_and_dedupes() -> None:
    assert [e.name for e in resolve_heads(None)] == list(REGISTERED)
    assert [e.name for e in resolve_heads(["knn", "knn", " logreg "])] == ["knn", "logreg"]


def test_softmax_scores_binary_and_multiclass() -> None:
    binary = softmax_scores(np.array([-2.0, 0.0, 3.0]))
    assert binary.shape == (3, 2)
    np.testing.assert_allclose(binary.sum(axis=1), 1.0)
    assert binary[1, 1] == pytest.approx(0.5)
    assert list(binary.argmax(axis=1)) == [0, 0, 1]
    multi = softmax_scores(np.array([[1.0, 5.0, 2.0], [900.0, -900.0, 0.0]]))
    np.testing.assert_allclose(multi.sum(axis=1), 1.0)
    assert list(multi.argmax(axis=1)) == [1, 0]


def test_import_path_head_gets_decision_probabilities(subset_data: CachedDataset) -> None:
    train, test = subset_data.splits["train"], subset_data.splits["test"]
    head = make_head("sklearn.linear_model:RidgeClassifier", 2).fit(train.features, train.labels)
    assert isinstance(head, SklearnHead)
    assert head.proba_kind == "decision"
    assert not head.has_proba
    proba = head.predict_proba(test.features)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(proba.argmax(axis=1), head.predict(test.features))
    assert head.estimator.named_steps["scale"] is not None


def test_missing_train_class_gets_zero_column(subset_data: CachedDataset) -> None:
    train = subset_data.splits["train"]
    head = make_head("logreg", 3).fit(train.features, train.labels)
    proba = head.predict_proba(train.features[:5])
    assert proba.shape == (5, 3)
    np.testing.assert_array_equal(proba[:, 2], 0.0)


def _fit_kind(kind: str, data: CachedDataset) -> object:
    n_classes = len(data.classes)
    if kind.startswith("streamed "):
        name = kind.split()[1]
        return build_streaming_head(name, dict(HEADS[name].defaults), n_classes, 0, len(data.splits["train"]))
    params = HEADS[kind].param_grid("small")[0] if kind in HEADS else {}
    return make_head(kind, n_classes, **params)


@pytest.mark.parametrize(
    "kind", [*REGISTERED, "sklearn.linear_model:RidgeClassifier", "streamed logreg", "streamed linear_svm"]
)
def test_saved_head_of_every_kind_predicts(kind: str, subset_data: CachedDataset, photo_subset: Path,
                                           tmp_path: Path) -> None:
    train, test = subset_data.splits["train"], subset_data.splits["test"]
    head = _fit_kind(kind, subset_data)
    if isinstance(head, SklearnHead) and kind.startswith("streamed "):
        scaler, model = head.estimator.named_steps["scale"], head.estimator.named_steps["model"]
        scaler.partial_fit(train.features)
        for _ in range(5):
            model.partial_fit(scaler.transform(train.features), train.labels, classes=[0, 1])
    else:
        head.fit(train.features, train.labels)
    folder = save_head(head, tmp_path / "head", {
        "spec": subset_data.spec.to_json(), "spec_digest": subset_data.spec.digest,
        "classes": subset_data.classes, "cache": str(subset_data.cache_path), "metrics": {},
    })
    loaded, meta = load_head(folder)
    assert meta["head"] == head.name
    assert isinstance(loaded, DenseHead if kind == "dense" else SklearnHead)

    photos = [photo_subset / p for p in test.paths[:6]]
    records = predict_images(folder, photos)
    assert len(records) == len(photos)
    expected = loaded.predict_proba(test.features[:6]).argmax(axis=1)
    for record, want in zip(records, expected, strict=True):
        assert record["cached"] is True
        assert record["class"] == subset_data.classes[want]
        assert 0.0 <= record["probability"] <= 1.0

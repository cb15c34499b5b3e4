"""Head comparison on real cached features: results, selection, report, several caches, flow and CLI."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_subset
from PIL import Image, ImageDraw

from pipeline.compare import CompareError, plan_comparison, run_comparison
from pipeline.dataset import load_dataset
from pipeline.heads import HeadError
from pipeline.metrics import METRICS
from pipeline.predict import predict_images
from pipeline.registry import HEAD_NAMES
from pipeline.report import load_predictions, thumbnail_uri
from pipeline.report_html import render_html

SHAPES = ("circle", "square", "triangle")
PROBABILITY_RANGE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "brier")


def make_shapes_tree(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Write a three-class tree of 96 px JPEGs: reddish circles, greenish squares, bluish triangles.

    Position, size, colour and background noise vary per image, so the classes are
    learnable but not identical copies.
    """
    rng = np.random.default_rng(seed)
    tint = {"circle": (200, 60, 60), "square": (60, 180, 60), "triangle": (60, 80, 200)}
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True)
        for k in range(per_class):
            noise = rng.integers(90, 170, size=(96, 96, 3), dtype=np.uint8)
            image = Image.fromarray(noise, "RGB")
            draw = ImageDraw.Draw(image)
            size = int(rng.integers(30, 60))
            x, y = (int(v) for v in rng.integers(4, 92 - size, size=2))
            colour = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in tint[shape])
            if shape == "circle":
                draw.ellipse((x, y, x + size, y + size), fill=colour)
            elif shape == "square":
                draw.rectangle((x, y, x + size, y + size), fill=colour)
            else:
                draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
            image.save(folder / f"{shape}_{k:03d}.jpg", quality=90)
    return root


def _extract_025(tree: Path, cache_dir: Path, weights: Path) -> Path:
    from pipeline.extract import extract_features
    from pipeline.spec import make_spec

    spec = make_spec("mobilenet", str(weights), input_size=128, alpha=0.25)
    summary = extract_features(tree, cache_dir, spec)
    assert not summary.failed
    return Path(summary.cache)


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory, mobilenet_025_weights: Path) -> Path:
    """Real MobileNet 0.25 features of a synthetic three-class tree without split folders."""
    tree = make_shapes_tree(tmp_path_factory.mktemp("shapes") / "shapes")
    return _extract_025(tree, tmp_path_factory.mktemp("shapes_cache"), mobilenet_025_weights)


@pytest.fixture(scope="module")
def subset_025_cache(photo_subset: Path, tmp_path_factory: pytest.TempPathFactory,
                     mobilenet_025_weights: Path) -> Path:
    """Real MobileNet 0.25 features of the same photos as ``mobilenet_cache``."""
    return _extract_025(photo_subset, tmp_path_factory.mktemp("subset_025"), mobilenet_025_weights)


@pytest.fixture(scope="module")
def binary_summary(mobilenet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every registered head compared on real MobileNetV2 features of cats and dogs (small grids)."""
    out = tmp_path_factory.mktemp("compare_binary")
    return run_comparison([mobilenet_cache], grid="small", models_dir=out / "models", reports_dir=out / "reports")


def _check_metric_ranges(result: dict[str, Any], split: str) -> None:
    metrics = result[split]
    for name in PROBABILITY_RANGE:
        value = metrics[name]
        assert value is not None, f"{result['label']} has no {split} {name}"
        assert 0.0 <= value <= 1.0, f"{result['label']} {split} {name} = {value}"
    assert metrics["log_loss"] is not None and metrics["log_loss"] >= 0.0
    assert metrics["n"] > 0


def test_compare_returns_every_head(binary_summary: dict[str, Any]) -> None:
    labels = [r["label"] for r in binary_summary["results"]]
    assert sorted(labels) == sorted(HEAD_NAMES)
    for result in binary_summary["results"]:
        assert result["error"] is None, result["error"]
        _check_metric_ranges(result, "validation")
        _check_metric_ranges(result, "test")
        assert result["test"]["n"] == 40
        assert result["fit_seconds"] > 0.0
        assert result["predict_ms_per_1000"] > 0.0
        assert result["selection"] == "validation"
        assert result["train_rows"] == 60 + 30  # refit on train + validation
        assert isinstance(result["params"], dict) and result["params"]
        assert result["probabilities"] == "native"


def test_compare_heads_learn_cats_and_dogs(binary_summary: dict[str, Any]) -> None:
    best = max(r["test"]["accuracy"] for r in binary_summary["results"])
    assert best >= 0.85


def test_compare_best_is_argmax(binary_summary: dict[str, Any]) -> None:
    values = {r["label"]: r["validation"]["accuracy"] for r in binary_summary["results"]}
    best = binary_summary["best"]
    assert best["metric"] == "accuracy"
    assert best["split"] == "validation"
    assert best["value"] == max(values.values())
    assert values[best["label"]] == max(values.values())
    ranked = [r["validation"]["accuracy"] for r in binary_summary["results"]]
    assert ranked == sorted(ranked, reverse=True)


def test_compare_pca_recorded(binary_summary: dict[str, Any]) -> None:
    by_head = {r["head"]: r for r in binary_summary["results"]}
    assert by_head["hist_gb"]["pca"] == 64
    assert by_head["hist_gb"]["params"]["pca"] == 64
    assert by_head["logreg"]["pca"] is None


def test_saved_best_head_predicts(binary_summary: dict[str, Any], mobilenet_cache: Path, photo_subset: Path) -> None:
    model_path = Path(binary_summary["best"]["model_path"])
    meta = json.loads((model_path / "head.json").read_text())
    assert meta["head"] == binary_summary["best"]["head"]
    assert meta["compare"]["run"] == binary_summary["run"]
    data = load_dataset(mobilenet_cache)
    photos = [photo_subset / p for p in data.splits["test"].paths]
    records = predict_images(model_path, photos)
    predicted = [data.classes.index(r["class"]) for r in records]
    accuracy = float(np.mean(np.array(predicted) == data.splits["test"].labels))
    assert accuracy == pytest.approx(binary_summary["best"]["test_accuracy"])


def test_compare_writes_results_files(binary_summary: dict[str, Any]) -> None:
    folder = Path(binary_summary["report_dir"])
    record = json.loads((folder / "results.json").read_text())
    assert record["best"]["label"] == binary_summary["best"]["label"]
    assert record["report"] == binary_summary["report"]
    csv_lines = (folder / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(HEAD_NAMES)
    assert csv_lines[0].startswith("rank,label,head,cache,validation_accuracy,test_accuracy")
    assert not (folder / "heads").exists()  # only the best head is kept, under the models folder


def test_html_report_names_heads_and_embeds_images(binary_summary: dict[str, Any]) -> None:
    page = Path(binary_summary["report"])
    assert page.is_file()
    text = page.read_text()
    for result in binary_summary["results"]:
        assert result["label"] in text
    assert "mobilenet_v2" in text
    assert binary_summary["caches"][0]["data_root"] in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    # One confusion matrix per head, the accuracy/fit-time chart and the ROC chart.
    assert len(pngs) == len(HEAD_NAMES) + 2
    for encoded in pngs:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            assert image.format == "PNG"
    assert "http://" not in text
    assert "https://" not in text


def test_misclassified_lists_match_predictions(binary_summary: dict[str, Any], photo_subset: Path) -> None:
    wrong: dict[str, set[str]] = {}
    for result in binary_summary["results"]:
        data = load_predictions(result)
        wrong[result["label"]] = {str(p) for p, y, k in zip(data["paths"], data["y"], data["predicted"], strict=True)
                                  if y != k}
    found = binary_summary["misclassified"]
    expected_all = set.intersection(*wrong.values())
    assert {e["path"] for e in found["all_heads"]} == expected_all
    best = binary_summary["best"]["label"]
    others = set.union(*(v for k, v in wrong.items() if k != best))
    assert {e["path"] for e in found["only_best"]} == wrong[best] - others
    text = Path(binary_summary["report"]).read_text()
    jpegs = re.findall(r'src="data:image/jpeg;base64,', text)
    assert len(jpegs) == len(found["all_heads"]) + len(found["only_best"])
    for entry in found["all_heads"]:
        assert entry["path"] in text
        assert Path(entry["file"]).is_file()


def test_report_skips_moved_images(binary_summary: dict[str, Any], tmp_path: Path) -> None:
    summary = copy.deepcopy(binary_summary)
    summary["misclassified"] = {"heads": 2, "only_best": [], "all_heads": [
        {"path": "test/cats/gone.jpg", "file": str(tmp_path / "moved" / "gone.jpg"), "true": "cats",
         "predicted": {"logreg": "dogs"}},
    ]}
    text = render_html(summary, {})
    assert "test/cats/gone.jpg" in text
    assert "(image file not found)" in text


def test_thumbnail_is_small_jpeg(photo_subset: Path) -> None:
    photo = next((photo_subset / "test" / "cats").iterdir())
    uri = thumbnail_uri(photo)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert max(image.size) <= 112


def test_thumbnail_of_missing_or_broken_file(tmp_path: Path) -> None:
    assert thumbnail_uri(tmp_path / "missing.jpg") is None
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert thumbnail_uri(broken) is None


def test_compare_multiclass_end_to_end(shapes_cache: Path, tmp_path: Path) -> None:
    heads = ["logreg", "knn", "hist_gb", "dense", "linear_svm"]
    summary = run_comparison([shapes_cache], heads=heads, grid="small", models_dir=tmp_path / "models",
                             reports_dir=tmp_path / "reports")
    assert summary["caches"][0]["classes"] == list(SHAPES)
    assert summary["caches"][0]["derived_splits"] is True
    assert sorted(r["label"] for r in summary["results"]) == sorted(heads)
    for result in summary["results"]:
        assert result["error"] is None, result["error"]
        _check_metric_ranges(result, "test")
        data = load_predictions(result)
        assert data["proba"].shape[1] == 3
    assert summary["best"]["test_accuracy"] >= 0.8
    text = Path(summary["report"]).read_text()
    assert "ROC curves" not in text  # ROC charts are drawn for two-class caches only
    assert len(re.findall(r"data:image/png;base64,", text)) == len(heads) + 1


def test_compare_cross_validation(mobilenet_cache: Path, tmp_path: Path) -> None:
    summary = run_comparison([mobilenet_cache], heads=["logreg"], cv=3, models_dir=tmp_path / "models",
                             reports_dir=tmp_path / "reports")
    result = summary["results"][0]
    assert result["selection"] == "cv-3"
    assert result["refit"] == "train+validation"
    assert result["train_rows"] == 60 + 30
    assert len(result["grid"]) == 3
    assert result["validation"]["n"] == 60 + 30  # out-of-fold predictions of every train and validation row
    _check_metric_ranges(result, "validation")


def test_compare_is_reproducible(mobilenet_cache: Path, tmp_path: Path) -> None:
    runs = [run_comparison([mobilenet_cache], heads=["random_forest", "mlp"], grid="small", random_state=7,
                           models_dir=tmp_path / f"models{k}", reports_dir=tmp_path / f"reports{k}")
            for k in range(2)]
    for first, second in zip(runs[0]["results"], runs[1]["results"], strict=True):
        assert first["label"] == second["label"]
        assert first["params"] == second["params"]
        assert first["validation"] == second["validation"]
        assert first["test"] == second["test"]


@pytest.mark.parametrize("metric", ["log_loss", "brier"])
def test_probability_metric_skips_decision_heads(mobilenet_cache: Path, tmp_path: Path, metric: str) -> None:
    summary = run_comparison([mobilenet_cache], heads=["sklearn.linear_model:RidgeClassifier", "knn", "logreg"],
                             grid="small", metric=metric, models_dir=tmp_path / "models",
                             reports_dir=tmp_path / "reports")
    by_head = {r["head"]: r for r in summary["results"]}
    ridge = by_head["sklearn.linear_model:RidgeClassifier"]
    assert ridge["probabilities"] == "decision"
    assert ridge["validation"][metric] is None
    assert ridge["selected_by"] == "accuracy"
    assert summary["results"][-1]["head"] == ridge["head"]
    values = {h: r["validation"][metric] for h, r in by_head.items() if r["validation"][metric] is not None}
    assert summary["best"]["value"] == min(values.values())
    assert METRICS[metric] is False


def test_compare_selects_on_test_split(mobilenet_cache: Path, tmp_path: Path) -> None:
    summary = run_comparison([mobilenet_cache], heads=["logreg", "knn"], grid="small", select_split="test",
                             metric="roc_auc", models_dir=tmp_path / "models", reports_dir=tmp_path / "reports")
    values = [r["test"]["roc_auc"] for r in summary["results"]]
    assert summary["best"]["split"] == "test"
    assert summary["best"]["value"] == max(values)


def test_compare_several_caches(mobilenet_cache: Path, subset_025_cache: Path, tmp_path: Path) -> None:
    summary = run_comparison([mobilenet_cache, subset_025_cache], heads=["logreg", "knn"], grid="small",
                             models_dir=tmp_path / "models", reports_dir=tmp_path / "reports")
    cache_labels = {c["label"] for c in summary["caches"]}
    assert cache_labels == {mobilenet_cache.stem, subset_025_cache.stem}
    assert len(summary["results"]) == 4
    for result in summary["results"]:
        assert result["label"] == f"{result['cache_label']}/{result['head']}"
        assert result["error"] is None
    assert summary["misclassified"]["heads"] == 4
    text = Path(summary["report"]).read_text()
    assert "mobilenet_v2 alpha 1.0 160 px" in text
    assert "mobilenet alpha 0.25 128 px" in text


def test_unknown_head_rejected_before_fitting(mobilenet_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(HeadError) as raised:
        run_comparison([mobilenet_cache], heads=["logreg", "bogus_head"], reports_dir=tmp_path / "reports",
                       models_dir=tmp_path / "models")
    message = str(raised.value)
    assert "unknown head 'bogus_head'" in message
    for name in HEAD_NAMES:
        assert name in message
    assert not (tmp_path / "reports").exists()
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ("no_such_module_for_convcache:Classifier", "not found"),
        ("sklearn.ensemble:NoSuchForest", "has no attribute"),
        ("sklearn.linear_model:LinearRegression", "is not a scikit-learn classifier"),
    ],
)
def test_bad_import_path_rejected_before_fitting(mobilenet_cache: Path, tmp_path: Path, head: str,
                                                 reason: str) -> None:
    with pytest.raises(HeadError, match=reason):
        run_comparison([mobilenet_cache], heads=["logreg", head], reports_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"metric": "precision"}, "invalid selection metric 'precision'; valid metrics: accuracy"),
        ({"select_split": "train"}, "invalid selection split 'train'; valid splits: validation, test"),
        ({"grid": "large"}, "invalid grid size 'large'; valid choices: default, small, none"),
        ({"refit": "all"}, "invalid refit choice 'all'; valid choices: train+validation, train"),
        ({"cv": 1}, "invalid cross-validation fold count 1"),
        ({"pca": -3}, "invalid PCA component count -3"),
    ],
)
def test_invalid_setting_rejected(mobilenet_cache: Path, setting: dict[str, Any], message: str) -> None:
    with pytest.raises(CompareError, match=re.escape(message)):
        plan_comparison([mobilenet_cache], **setting)


def test_too_many_folds_rejected(mobilenet_cache: Path) -> None:
    # The subset has 45 train and validation rows per class.
    with pytest.raises(CompareError, match="46-fold cross-validation needs at least 46 rows of every class"):
        plan_comparison([mobilenet_cache], cv=46)


def test_missing_cache_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cache file not found"):
        plan_comparison([tmp_path / "none.h5"])


def test_no_cache_rejected() -> None:
    with pytest.raises(CompareError, match="no cache file given"):
        plan_comparison([])


def test_cache_without_test_rows_rejected(cats_vs_dogs: Path, tmp_path: Path, mobilenet_025_weights: Path) -> None:
    tree = copy_subset(cats_vs_dogs, tmp_path / "tree", {"train": 3, "validation": 2})
    cache = _extract_025(tree, tmp_path / "cache", mobilenet_025_weights)
    with pytest.raises(CompareError, match="contains no test rows"):
        plan_comparison([cache])


def test_compare_without_validation_uses_cv(cats_vs_dogs: Path, tmp_path: Path, mobilenet_025_weights: Path) -> None:
    tree = copy_subset(cats_vs_dogs, tmp_path / "tree", {"train": 10, "test": 4})
    cache = _extract_025(tree, tmp_path / "cache", mobilenet_025_weights)
    summary = run_comparison([cache], heads=["logreg"], grid="small", models_dir=tmp_path / "models",
                             reports_dir=tmp_path / "reports")
    result = summary["results"][0]
    assert result["selection"] == "cv-5"
    assert result["train_rows"] == 20
    assert result["validation"]["n"] == 20
    assert result["test"]["n"] == 8


def test_selections_carry_no_features(mobilenet_cache: Path) -> None:
    plan = plan_comparison([mobilenet_cache], heads=["logreg"])
    job = plan.jobs[0]
    assert set(job.cache.selections) == {"train", "validation", "test"}
    assert {k: len(v) for k, v in job.cache.selections.items()} == {"train": 60, "validation": 30, "test": 40}
    assert all(isinstance(i, int) for i in job.cache.selections["train"].rows)
    assert len(json.dumps([list(s.rows) for s in job.cache.selections.values()])) < 2000


def test_compare_flow_creates_artifacts(prefect_api: None, mobilenet_cache: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.compare import (
        MARKDOWN_ARTIFACT_KEY,
        TABLE_ARTIFACT_KEY,
        run_compare_flow,
    )

    state = run_compare_flow(workers=2, cache_paths=[str(mobilenet_cache)], heads=["logreg", "knn"], grid="small",
                             models_dir=str(tmp_path / "models"), reports_dir=str(tmp_path / "reports"),
                             return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert sorted(r["label"] for r in summary["results"]) == ["knn", "logreg"]
    assert Path(summary["report"]).is_file()
    assert Path(summary["best"]["model_path"], "head.json").is_file()

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        task_runs = client.read_task_runs()
    by_key = {a.key: a for a in artifacts}
    assert by_key[TABLE_ARTIFACT_KEY].type == "table"
    assert by_key[MARKDOWN_ARTIFACT_KEY].type == "markdown"
    table = by_key[TABLE_ARTIFACT_KEY].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["label"] for row in rows] == [r["label"] for r in summary["results"]]
    assert summary["best"]["label"] in by_key[MARKDOWN_ARTIFACT_KEY].data
    names = {t.name for t in task_runs if t.flow_run_id == flow_run_id}
    assert {"fit-logreg", "fit-knn"} <= names


def test_cli_compare_prints_json(prefect_api: None, mobilenet_cache: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    status = main(["compare", str(mobilenet_cache), "--heads", "logreg,sklearn.linear_model:RidgeClassifier",
                   "--grid", "none", "--json", "--models-dir", str(tmp_path / "models"),
                   "--reports-dir", str(tmp_path / "reports")])
    assert status == 0
    output = json.loads(capsys.readouterr().out)
    assert {r["head"] for r in output["results"]} == {"logreg", "sklearn.linear_model:RidgeClassifier"}
    assert output["best"]["label"] in {"logreg", "sklearn.linear_model:RidgeClassifier"}
    assert Path(output["report"]).is_file()
    assert output["report"].startswith(str(tmp_path / "reports"))


def test_cli_compare_rejects_unknown_head(mobilenet_cache: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    status = main(["compare", str(mobilenet_cache), "--heads", "logreg,svm", "--reports-dir",
                   str(tmp_path / "reports")])
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("convcache: error: unknown head 'svm'")
    assert "linear_svm, svm_rbf" in error
    assert not (tmp_path / "reports").exists()


def test_cli_compare_rejects_bad_metric(mobilenet_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["compare", str(mobilenet_cache), "--select", "speed"]) == 1
    assert "invalid selection metric 'speed'; valid metrics: accuracy, balanced_accuracy" in capsys.readouterr().err

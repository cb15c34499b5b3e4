"""Comparison report: results.json, results.csv and a self-contained HTML page.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas, which keeps
no pyplot state that other threads could disturb, and are embedded as base64 PNG data
URIs. Thumbnails of misclassified test images are small base64 JPEGs made with Pillow.
The page therefore opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 112
MAX_THUMBNAILS = 48
TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "brier")


def load_predictions(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Read the test predictions a head saved (rows, y, predicted, proba, paths, digests)."""
    with np.load(result["predictions"], allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _succeeded(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in summary["results"] if not r.get("error") and Path(r.get("predictions", "")).is_file()]


def find_misclassified(summary: dict[str, Any]) -> dict[str, Any]:
    """List the test images that every head got wrong, and those that only the best head got wrong.

    Images are matched across heads by content digest, and only images that every
    successful head predicted are considered (with several caches, their common test images).
    """
    results = _succeeded(summary)
    caches = {c["cache"]: c for c in summary["caches"]}
    if not results:
        return {"heads": 0, "all_heads": [], "only_best": []}
    wrong: dict[str, dict[str, bool]] = {}
    info: dict[str, dict[str, Any]] = {}
    for result in results:
        data = load_predictions(result)
        cache = caches[result["cache"]]
        for digest, path, y, predicted in zip(data["digests"], data["paths"], data["y"], data["predicted"],
                                              strict=True):
            wrong.setdefault(str(digest), {})[result["label"]] = bool(y != predicted)
            info.setdefault(str(digest), {
                "path": str(path), "file": str(Path(cache["data_root"]) / str(path)) if cache["data_root"] else "",
                "true": cache["classes"][int(y)], "predicted": {},
            })["predicted"][result["label"]] = cache["classes"][int(predicted)]
    labels = [r["label"] for r in results]
    common = [d for d, per_head in wrong.items() if len(per_head) == len(labels)]
    all_wrong = [info[d] for d in common if all(wrong[d].values())]
    best = (summary.get("best") or {}).get("label")
    only_best: list[dict[str, Any]] = []
    if best in labels and len(labels) > 1:
        only_best = [info[d] for d in common
                     if wrong[d][best] and not any(v for label, v in wrong[d].items() if label != best)]
    return {"heads": len(labels), "all_heads": sorted(all_wrong, key=lambda e: e["path"]),
            "only_best": sorted(only_best, key=lambda e: e["path"])}


def thumbnail_uri(path: str | Path, pixels: int = THUMBNAIL_PIXELS) -> str | None:
    """Return a small JPEG of an image file as a data URI, or None when it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (pixels * 2, pixels * 2))
            picture = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        logger.info("no thumbnail for %s: %s", path, error)
        return None
    picture.thumbnail((pixels, pixels))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_uri(y: np.ndarray, predicted: np.ndarray, classes: list[str], title: str) -> str:
    """Draw a confusion matrix (rows: true class, columns: predicted) and return it as a PNG data URI."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y, predicted, labels=list(range(len(classes))))
    size = 1.6 + 0.45 * len(classes)
    figure = Figure(figsize=(size + 0.6, size))
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(classes)), classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    return _png_uri(figure)


def roc_uri(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> str:
    """Draw binary ROC curves ``(label, y, positive-class score)`` and return a PNG data URI.

    The left panel shows the whole curve, the right one the top-left corner (false
    positive rate up to 0.2, true positive rate from 0.8), where good heads differ.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(10, 4.5))
    whole, corner = figure.subplots(1, 2)
    for label, y, score in curves:
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, score)
        whole.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, score):.4f})", linewidth=1.2)
        corner.plot(fpr, tpr, linewidth=1.2)
    whole.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    whole.set_title(title, fontsize=9)
    whole.legend(fontsize=7, loc="lower right")
    corner.set_xlim(0.0, 0.2)
    corner.set_ylim(0.8, 1.0)
    corner.set_title("top-left corner", fontsize=9)
    for axes in (whole, corner):
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
    return _png_uri(figure)


def timing_uri(results: list[dict[str, Any]]) -> str:
    """Draw test accuracy and fit seconds per head as two bar charts side by side; return a PNG data URI."""
    from matplotlib.figure import Figure

    labels = [r["label"] for r in results]
    accuracy = [r["test"].get("accuracy") or 0.0 for r in results]
    seconds = [r.get("fit_seconds") or 0.0 for r in results]
    height = 1.2 + 0.35 * len(results)
    figure = Figure(figsize=(9, height))
    left, right = figure.subplots(1, 2, sharey=True)
    positions = np.arange(len(results))
    left.barh(positions, accuracy, color="#4c72b0")
    low = min(accuracy) if accuracy else 0.0
    left.set_xlim(max(0.0, low - 0.05), 1.0)
    left.set_yticks(positions, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("test accuracy")
    right.barh(positions, seconds, color="#dd8452")
    right.set_xlabel("fit seconds (final fit)")
    for k, (a, s) in enumerate(zip(accuracy, seconds, strict=True)):
        left.text(a, k, f" {a:.4f}", va="center", fontsize=7)
        right.text(s, k, f" {s:.1f}", va="center", fontsize=7)
    return _png_uri(figure)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per head (best first) for a table artifact or a CSV file."""
    metric, split = summary["select"]["metric"], summary["select"]["split"]
    rows = []
    for rank, result in enumerate(summary["results"], start=1):
        row: dict[str, Any] = {"rank": rank, "label": result["label"], "head": result["head"],
                               "cache": result["cache_label"]}
        row[f"{split}_{metric}"] = (result.get(split) or {}).get(metric)
        for name in TABLE_METRICS:
            row[f"test_{name}"] = (result.get("test") or {}).get(name)
        row.update({
            "fit_seconds": result.get("fit_seconds"), "search_seconds": result.get("search_seconds"),
            "predict_ms_per_1000": result.get("predict_ms_per_1000"), "selection": result.get("selection"),
            "params": json.dumps(result.get("params", {}), sort_keys=True, default=str),
            "pca": result.get("pca"), "probabilities": result.get("probabilities"),
            "streaming": result.get("streaming"), "error": result.get("error"),
        })
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    """Return a short markdown summary: data, best head, and the ranked results table."""
    metric, split = summary["select"]["metric"], summary["select"]["split"]
    lines = [f"# Head comparison {summary['run']}", ""]
    for cache in summary["caches"]:
        rows = ", ".join(f"{k} {v}" for k, v in cache["rows"].items())
        lines.append(f"- **{cache['label']}**: {cache['description']}; data `{cache['data_root']}`; {rows}")
    best = summary.get("best")
    lines.append("")
    if best:
        lines.append(f"**Best:** `{best['label']}` ({split} {metric} {best['value']:.4f}, test accuracy "
                     f"{_format(best['test_accuracy'])}), saved to `{best['model_path']}`")
    else:
        lines.append("**Best:** none (no head has a value for the selection metric)")
    lines += ["", f"| rank | head | {split} {metric} | test accuracy | test ROC AUC | test log loss | fit s |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row in results_table(summary):
        lines.append(f"| {row['rank']} | {row['label']} | {_format(row[f'{split}_{metric}'])} | "
                     f"{_format(row['test_accuracy'])} | {_format(row['test_roc_auc'])} | "
                     f"{_format(row['test_log_loss'])} | {_format(row['fit_seconds'])} |")
    lines += ["", f"Report: `{summary.get('report', '')}`"]
    return "\n".join(lines)


def write_report(summary: dict[str, Any], report_dir: str | Path) -> Path:
    """Write ``results.json``, ``results.csv`` and ``report.html`` into ``report_dir``; return the HTML path."""
    from pipeline.report_html import render_html

    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "report.html"
    record = {**summary, "report": str(page)}
    (folder / "results.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    rows = results_table(summary)
    with open(folder / "results.csv", "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    page.write_text(render_html(summary, _figures(summary)))
    logger.info("comparison report written to %s", page)
    return page


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Draw every figure of the page: confusion matrices, ROC curves and the timing chart."""
    results = _succeeded(summary)
    caches = {c["cache"]: c for c in summary["caches"]}
    confusion: dict[str, str] = {}
    roc: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for result in results:
        data = load_predictions(result)
        cache = caches[result["cache"]]
        confusion[result["label"]] = confusion_uri(data["y"], data["predicted"], cache["classes"], result["label"])
        if len(cache["classes"]) == 2:
            roc.setdefault(cache["label"], []).append((result["label"], data["y"], data["proba"][:, 1]))
    return {
        "confusion": confusion,
        "roc": {label: roc_uri(curves, f"ROC on test, {label}") for label, curves in roc.items()},
        "timing": timing_uri(results) if results else None,
    }


__all__ = ["confusion_uri", "find_misclassified", "load_predictions", "results_table",
           "roc_uri", "summary_markdown", "thumbnail_uri", "timing_uri", "write_report"]

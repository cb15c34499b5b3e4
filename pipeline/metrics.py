"""Metrics of a fitted head on one split, and how to rank heads by them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# scikit-learn is imported inside the functions: importing sklearn.metrics takes seconds,
# and the command line reads METRICS for its help text.

# Metric name -> True where a larger value is better.
METRICS: dict[str, bool] = {
    "accuracy": True,
    "balanced_accuracy": True,
    "f1_macro": True,
    "roc_auc": True,
    "log_loss": False,
    "brier": False,
}
# Metrics that need calibrated probabilities; heads that only give decision scores lack them.
PROBABILITY_METRICS = ("log_loss", "brier")
PROBA_FLOOR = 1e-7
# Splits whose metrics can rank the heads of a comparison.
SELECT_SPLITS = ("validation", "test")


def split_metrics(head: Any, X: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Return ``accuracy``, ``loss`` (log loss, where the head gives probabilities) and ``n``."""
    from sklearn.metrics import accuracy_score, log_loss

    result: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return result
    if getattr(head, "has_proba", False):
        proba = head.predict_proba(X)
        predicted = proba.argmax(axis=1)
        result["loss"] = float(log_loss(y, np.clip(proba, PROBA_FLOOR, 1.0), labels=list(range(n_classes))))
    else:
        predicted = head.predict(X)
    result["accuracy"] = float(accuracy_score(y, predicted))
    return result


def classification_metrics(
    y: np.ndarray,
    predicted: np.ndarray,
    proba: np.ndarray,
    n_classes: int,
    calibrated: bool = True,
) -> dict[str, Any]:
    """Compute every metric of :data:`METRICS` for one split.

    Parameters
    ----------
    y, predicted : ndarray of int
        True and predicted class indices.
    proba : ndarray, shape (n_samples, n_classes)
        Class probabilities, or softmax-ed decision scores when ``calibrated`` is False.
    n_classes : int
        Number of classes of the cache (also those missing from ``y``).
    calibrated : bool
        Whether ``proba`` contains real probabilities. Log loss and Brier score are None otherwise.

    Returns
    -------
    dict
        ``n`` plus each metric as a float, or None where it is undefined: ROC AUC when
        ``y`` holds a single class, log loss and Brier score without probabilities.
        ROC AUC is one-vs-rest, macro-averaged, for more than two classes.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        brier_score_loss,
        f1_score,
        log_loss,
    )

    labels = list(range(n_classes))
    result: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return result | {name: None for name in METRICS}
    result["accuracy"] = float(accuracy_score(y, predicted))
    result["balanced_accuracy"] = float(balanced_accuracy_score(y, predicted))
    result["f1_macro"] = float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0))
    result["roc_auc"] = _roc_auc(y, proba, n_classes)
    if calibrated:
        clipped = np.clip(proba, PROBA_FLOOR, 1.0)
        result["log_loss"] = float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=labels))
        if n_classes == 2:
            result["brier"] = float(brier_score_loss(y, proba[:, 1], pos_label=1))
        else:
            result["brier"] = float(brier_score_loss(y, proba, labels=labels))
    else:
        result["log_loss"] = None
        result["brier"] = None
    return result


def _roc_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float | None:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    if len(present) < n_classes:
        # One-vs-rest AUC is undefined for a class without positives; average over the present ones.
        columns = proba[:, present]
        columns = columns / np.clip(columns.sum(axis=1, keepdims=True), PROBA_FLOOR, None)
        return float(roc_auc_score(y, columns, multi_class="ovr", labels=list(present)))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=list(range(n_classes))))


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known metric.

    Raises
    ------
    ValueError
        For an unknown metric, listing the valid ones.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    return name


def is_defined(value: Any) -> bool:
    """Return whether a metric value is a finite number (not None or NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def tie_breaker(metric: str) -> str:
    """Return the metric that orders heads whose ``metric`` values are equal.

    Accuracy-like metrics move in steps of one image, so ties are common; log loss (or
    accuracy, when log loss is the main metric) separates them.
    """
    return "accuracy" if metric == "log_loss" else "log_loss"


def rank_key(metrics: dict[str, Any] | None, metric: str) -> tuple[int, float, int, float]:
    """Return a sort key, smallest best: defined values first, then ``metric``, then the tie breaker."""
    metrics = metrics or {}
    keys: list[float | int] = []
    for name in (check_metric(metric), tie_breaker(metric)):
        value = metrics.get(name)
        if not is_defined(value):
            keys += [1, 0.0]
        else:
            keys += [0, -float(value) if METRICS[name] else float(value)]
    return (int(keys[0]), float(keys[1]), int(keys[2]), float(keys[3]))


def best_index(candidates: Sequence[dict[str, Any] | None], metric: str) -> int | None:
    """Return the position of the best metrics dictionary for ``metric``, or None if none defines it.

    Equal values are ordered by :func:`tie_breaker`, then by position (the first wins).
    """
    defined = [i for i, c in enumerate(candidates) if is_defined((c or {}).get(check_metric(metric)))]
    if not defined:
        return None
    return min(defined, key=lambda i: (rank_key(candidates[i], metric), i))

"""Metrics of a fitted head on one split."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, log_loss


def split_metrics(head: Any, X: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Return ``accuracy``, ``loss`` (log loss, where the head gives probabilities) and ``n``."""
    result: dict[str, Any] = {"n": int(len(y))}
    if len(y) == 0:
        return result
    if getattr(head, "has_proba", False):
        proba = head.predict_proba(X)
        predicted = proba.argmax(axis=1)
        result["loss"] = float(log_loss(y, np.clip(proba, 1e-7, 1.0), labels=list(range(n_classes))))
    else:
        predicted = head.predict(X)
    result["accuracy"] = float(accuracy_score(y, predicted))
    return result

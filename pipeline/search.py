"""One head of a comparison: hyperparameter search, refit, and a single evaluation on test.

:func:`run_head_job` receives a :class:`HeadJob`, which names the cache and the row
selections but carries no features. The job reads the features itself: all at once, or
in chunks when the cache exceeds the memory budget (see :mod:`pipeline.streaming`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from pipeline.heads import Head, save_head
from pipeline.metrics import PROBABILITY_METRICS, best_index, classification_metrics
from pipeline.registry import PCA_HEADS, HeadEntry, get_entry
from pipeline.selection import RowReader, RowSelection
from pipeline.streaming import StreamingData, build_streaming_head

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class CachePlan:
    """One cache of a comparison: its spec, classes and row selections (no features)."""

    cache_path: str
    label: str
    spec_json: str
    spec_digest: str
    classes: tuple[str, ...]
    data_root: str
    feature_shape: tuple[int, ...]
    derived_splits: bool
    selections: dict[str, RowSelection]
    streaming: bool
    memory_budget: int | None
    estimated_bytes: int
    class_counts: dict[str, tuple[int, ...]]  # rows per class, per split

    @property
    def feature_size(self) -> int:
        """Values per row once the features are flattened."""
        return int(np.prod(self.feature_shape))


@dataclass(frozen=True)
class HeadJob:
    """Everything one head task needs: the cache plan, the grid and how to select."""

    label: str
    head: str
    cache: CachePlan
    grid: tuple[dict[str, Any], ...]
    cv_folds: int | None  # None: select on the validation split
    metric: str
    refit: str
    random_state: int
    run: str

    @property
    def selection(self) -> str:
        """``validation`` or ``cv-N``."""
        return "validation" if self.cv_folds is None else f"cv-{self.cv_folds}"


class MemoryData:
    """Features of a set of rows held in memory, fitted and predicted by row index."""

    def __init__(self, reader: RowReader, rows: np.ndarray, random_state: int) -> None:
        # NOTE: every head task loads its own copy, so heads fitted at the same time need that
        # many times the memory estimate that the budget check uses.
        self.order = np.unique(rows)
        self.X = reader.features(self.order)
        self.y = reader.labels(self.order)
        self.random_state = random_state

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.order, rows)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """Return the class indices of ``rows``."""
        return self.y[self._positions(rows)]

    def fit(self, head: Head, rows: np.ndarray) -> None:
        """Fit ``head`` on ``rows`` in a seeded random order.

        The order matters for the dense head, which holds out the last tenth of its rows
        for early stopping.
        """
        positions = np.random.default_rng(self.random_state).permutation(self._positions(rows))
        head.fit(self.X[positions], self.y[positions])

    def predict_proba(self, head: Head, rows: np.ndarray) -> np.ndarray:
        """Return class probabilities of ``rows``, in the order given."""
        return head.predict_proba(self.X[self._positions(rows)])


Data = MemoryData | StreamingData


def safe_name(label: str) -> str:
    """Return ``label`` with characters unsafe in file names replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _is_calibrated(head: Head) -> bool:
    return getattr(head, "proba_kind", "native") == "native"


def _limit_pca(head: str, params: dict[str, Any], n_rows: int, feature_size: int) -> dict[str, Any]:
    """Clamp the PCA component count to what ``n_rows`` rows of ``feature_size`` values allow."""
    if head not in PCA_HEADS or not params.get("pca"):
        return params
    limit = max(1, min(n_rows, feature_size) - 1)
    return {**params, "pca": int(min(params["pca"], limit))}


def _build(job: HeadJob, entry: HeadEntry, params: dict[str, Any], n_rows: int) -> Head:
    n_classes = len(job.cache.classes)
    if job.cache.streaming:
        return build_streaming_head(entry.name, params, n_classes, job.random_state, n_rows)
    return entry.build(params, n_classes, job.random_state)


def _evaluate(head: Head, data: Data, rows: np.ndarray, n_classes: int) -> tuple[dict[str, Any], np.ndarray, float]:
    """Return the metrics of ``head`` on ``rows``, its probabilities and the seconds ``predict_proba`` took."""
    started = time.perf_counter()
    proba = data.predict_proba(head, rows)
    seconds = time.perf_counter() - started
    y = data.labels(rows)
    return classification_metrics(y, proba.argmax(axis=1), proba, n_classes, _is_calibrated(head)), proba, seconds


def _training_rows(job: HeadJob, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Return the rows that cross-validation folds and the final fit use.

    With cross-validation every non-test row takes part, the validation split included.
    With a validation-split search, the final fit uses train, or train and validation
    when ``job.refit`` is ``"train+validation"``.
    """
    if job.cv_folds is not None or job.refit == "train+validation":
        return np.sort(np.concatenate([rows["train"], rows.get("validation", np.zeros(0, np.int64))]))
    return rows["train"]


def _search(job: HeadJob, entry: HeadEntry, data: Data, rows: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Fit every grid point and score it on validation or by stratified cross-validation."""
    n_classes = len(job.cache.classes)
    train = rows["train"] if job.cv_folds is None else _training_rows(job, rows)
    candidates = []
    for requested in job.grid:
        started = time.perf_counter()
        fit_seconds = None
        if job.cv_folds is None:
            params = _limit_pca(job.head, requested, len(train), job.cache.feature_size)
            head = _build(job, entry, params, len(train))
            data.fit(head, train)
            fit_seconds = time.perf_counter() - started
            metrics, _, _ = _evaluate(head, data, rows["validation"], n_classes)
            calibrated = _is_calibrated(head)
            if job.refit == "train+validation":
                head = None  # refitted on more rows later; do not keep every candidate in memory
        else:
            folds = StratifiedKFold(n_splits=job.cv_folds, shuffle=True, random_state=job.random_state)
            smallest = len(train) - (len(train) + job.cv_folds - 1) // job.cv_folds
            params = _limit_pca(job.head, requested, smallest, job.cache.feature_size)
            oof = np.zeros((len(train), n_classes))
            head = None
            for fit_pos, held_pos in folds.split(train, data.labels(train)):
                head = _build(job, entry, params, len(fit_pos))
                data.fit(head, train[fit_pos])
                oof[held_pos] = data.predict_proba(head, train[held_pos])
            assert head is not None
            calibrated = _is_calibrated(head)
            y = data.labels(train)
            metrics = classification_metrics(y, oof.argmax(axis=1), oof, n_classes, calibrated)
            head = None  # a fold model is not the refit model
        seconds = time.perf_counter() - started
        candidates.append({"params": params, "requested": requested, "metrics": metrics, "head": head,
                           "seconds": round(seconds, 3), "fit_seconds": fit_seconds, "calibrated": calibrated})
        logger.info("%s %s: %s %s", job.label, params, job.metric, metrics.get(job.metric))
    return candidates


def run_head_job(job: HeadJob, work_dir: str | Path, threads: int | None = None) -> dict[str, Any]:
    """Search, refit and test one head; save its test predictions and fitted head under ``work_dir``.

    ``threads`` caps the OpenMP and BLAS threads of this head, for example to one per
    head when as many heads run at once as there are cores. OpenMP spin-waits badly when
    its threads outnumber the cores (histogram gradient boosting slowed down six-fold in
    a two-core test). The OpenMP cap holds for the calling thread only, the BLAS cap for
    the whole process. Results repeat for the same ``threads``. Another thread count can
    change them slightly: hist_gb's validation accuracy moved by one image in a test.

    Returns
    -------
    dict
        ``label``, ``head``, ``cache``, ``params`` (chosen), ``grid`` (every candidate's
        params, validation score and seconds), ``validation`` and ``test`` metrics,
        ``fit_seconds`` (final fit), ``search_seconds``, ``predict_ms_per_1000``,
        ``probabilities`` (``native`` or ``decision``), ``streaming``, ``predictions``
        (``.npz`` path) and ``model_dir``.
    """
    if threads is None:
        return _run_head_job(job, Path(work_dir))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(threads))):
        return _run_head_job(job, Path(work_dir))


def _run_head_job(job: HeadJob, work_dir: Path) -> dict[str, Any]:
    entry = get_entry(job.head)
    cache = job.cache
    n_classes = len(cache.classes)
    with RowReader(cache.cache_path, cache.spec_digest) as reader:
        rows = {name: reader.verify(selection) for name, selection in cache.selections.items()}
        data: Data
        if cache.streaming:
            assert cache.memory_budget is not None
            data = StreamingData(reader, cache.memory_budget, n_classes, job.random_state)
        else:
            data = MemoryData(reader, np.concatenate(list(rows.values())), job.random_state)

        search_started = time.perf_counter()
        candidates = _search(job, entry, data, rows)
        inner_metric = job.metric
        if job.metric in PROBABILITY_METRICS and not all(c["calibrated"] for c in candidates):
            inner_metric = "accuracy"  # decision scores give no log loss or Brier score
        chosen = candidates[best_index([c["metrics"] for c in candidates], inner_metric) or 0]
        search_seconds = time.perf_counter() - search_started

        head = chosen["head"]
        fit_seconds = chosen["fit_seconds"]
        refit_rows = _training_rows(job, rows)
        if head is None:
            params = _limit_pca(job.head, dict(chosen["requested"]), len(refit_rows), cache.feature_size)
            head = _build(job, entry, params, len(refit_rows))
            started = time.perf_counter()
            data.fit(head, refit_rows)
            fit_seconds = time.perf_counter() - started

        test_rows = rows["test"]
        test_metrics, proba, predict_seconds = _evaluate(head, data, test_rows, n_classes)
        paths = [reader.path_of(int(i)) for i in test_rows]
        digests = [reader.snapshot.columns.digest[int(i)] for i in test_rows]
        y_test = data.labels(test_rows)

    name = safe_name(job.label)
    predictions = work_dir / "predictions" / f"{name}.npz"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(predictions, rows=test_rows, y=y_test, predicted=proba.argmax(axis=1),
                        proba=proba.astype(np.float32), paths=np.array(paths, dtype=str),
                        digests=np.array(digests, dtype=str))
    model_dir = work_dir / "heads" / name
    validation_metrics = chosen["metrics"]
    save_head(head, model_dir, {
        "spec": cache.spec_json, "spec_digest": cache.spec_digest, "classes": list(cache.classes),
        "cache": str(Path(cache.cache_path).resolve()), "derived_splits": cache.derived_splits,
        "metrics": {"validation": validation_metrics, "test": test_metrics},
        "compare": {"run": job.run, "label": job.label, "selection": job.selection, "refit": job.refit,
                    "streaming": cache.streaming},
    })
    result = {
        "label": job.label,
        "head": job.head,
        "cache": cache.cache_path,
        "cache_label": cache.label,
        "params": head.params,
        "pca": head.params.get("pca"),
        "grid": [{"params": c["params"], "validation": c["metrics"].get(inner_metric), "seconds": c["seconds"]}
                 for c in candidates],
        "selection": job.selection,
        "selected_by": inner_metric,
        "refit": "train+validation" if len(refit_rows) > len(rows["train"]) else "train",
        "streaming": cache.streaming,
        "probabilities": "native" if _is_calibrated(head) else "decision",
        "validation": validation_metrics,
        "test": test_metrics,
        "fit_seconds": round(fit_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "predict_ms_per_1000": round(1000.0 * predict_seconds / max(1, len(test_rows)) * 1000.0, 3),
        "train_rows": len(refit_rows),
        "predictions": str(predictions),
        "model_dir": str(model_dir),
        "error": None,
    }
    logger.info("%s: test accuracy %.4f, fit %.1f s", job.label, test_metrics.get("accuracy") or float("nan"),
                fit_seconds)
    return result


def failed_result(job: HeadJob, error: BaseException) -> dict[str, Any]:
    """Return the result record of a head whose fit raised ``error``."""
    return {"label": job.label, "head": job.head, "cache": job.cache.cache_path, "cache_label": job.cache.label,
            "selection": job.selection, "streaming": job.cache.streaming, "validation": {}, "test": {},
            "error": f"{type(error).__name__}: {error}"}


__all__ = ["CachePlan", "HeadJob", "MemoryData", "failed_result", "run_head_job", "safe_name"]

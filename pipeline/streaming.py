"""Training and prediction for caches whose features do not fit in a memory budget.

The features of ``rows`` need about ``rows x feature size x 4`` bytes as float32. When
that estimate exceeds the budget, rows are read from the HDF5 cache in windows of
consecutive rows (:meth:`pipeline.selection.RowReader.chunks`) and heads learn
incrementally: ``logreg`` and ``linear_svm`` become ``StandardScaler`` plus an
``SGDClassifier`` trained with ``partial_fit``, and ``dense`` trains from a ``tf.data``
generator. Other heads have no incremental fit and are rejected, naming the budget.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset import plan_splits
from pipeline.heads import DenseHead, Head, SklearnHead, flatten, save_head
from pipeline.metrics import PROBA_FLOOR
from pipeline.registry import HEADS, HeadEntry, HeadError, get_entry
from pipeline.selection import RowReader

logger = logging.getLogger(__name__)

BYTES_PER_VALUE = 4  # features are read as float32
# A chunk may use a quarter of the budget: scaling and the learner copy it, and the
# reader decodes HDF5 chunks around it.
CHUNK_SHARE = 4
MAX_CHUNK_ROWS = 65536
# Passes over the train rows for partial_fit learners.
STREAM_EPOCHS = 10
STREAMING_HEADS = tuple(name for name, entry in HEADS.items() if entry.streaming)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class BudgetError(ValueError):
    """Raised for a memory budget that cannot be parsed."""


def parse_memory_budget(value: str | int | None) -> int | None:
    """Turn ``"2GB"``, ``"512MiB"``, ``"1.5G"`` or a byte count into bytes; None stays None.

    Decimal units (KB, MB, GB, TB, or K, M, G, T) are powers of 1000, binary units
    (KiB, MiB, GiB, TiB) powers of 1024.

    Raises
    ------
    BudgetError
        For text that is not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise BudgetError(f"invalid memory budget {value!r}; write a size such as 512MB, 2GB or 1.5GiB")
        number, unit = float(match.group(1)), match.group(2).lower()
    budget = int(number * _UNITS[unit])
    if budget <= 0:
        raise BudgetError(f"invalid memory budget {value!r}; it must be larger than zero bytes")
    return budget


def format_bytes(n: float) -> str:
    """Format a byte count with a decimal unit, for example ``16.4 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def estimate_bytes(n_rows: int, feature_size: int) -> int:
    """Estimate the bytes that ``n_rows`` rows of ``feature_size`` float32 values need."""
    return int(n_rows) * int(feature_size) * BYTES_PER_VALUE


def needs_streaming(n_rows: int, feature_size: int, budget: int | None) -> bool:
    """Return whether the features exceed ``budget`` (always False without a budget)."""
    return budget is not None and estimate_bytes(n_rows, feature_size) > budget


def rows_per_chunk(feature_size: int, budget: int) -> int:
    """Rows per window so that one window uses at most a quarter of the budget (at least one row)."""
    return int(max(1, min(MAX_CHUNK_ROWS, budget // (CHUNK_SHARE * feature_size * BYTES_PER_VALUE))))


def check_streamable(entries: Sequence[HeadEntry], budget: int, n_rows: int, feature_size: int) -> None:
    """Reject heads that cannot learn from chunks, before anything is fitted.

    Raises
    ------
    HeadError
        Naming the budget, the estimated size, the heads that cannot stream and those that can.
    """
    refused = [e.name for e in entries if not e.streaming]
    if refused:
        raise HeadError(
            f"head(s) {', '.join(refused)} cannot train in chunks, but the features need about "
            f"{format_bytes(estimate_bytes(n_rows, feature_size))} ({n_rows} rows x {feature_size} values x "
            f"{BYTES_PER_VALUE} bytes), more than the memory budget of {format_bytes(budget)}. "
            f"Heads that train in chunks: {', '.join(STREAMING_HEADS)}. Pick those, or raise --memory-budget."
        )


def build_streaming_head(name: str, params: dict[str, Any], n_classes: int, random_state: int,
                         n_rows: int) -> Head:
    """Create the incremental variant of a streaming head.

    ``logreg`` and ``linear_svm`` map their ``C`` to the SGD penalty ``alpha = 1 / (C x n_rows)``,
    the same objective scaled per sample; ``dense`` is the usual Keras head.
    """
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    entry = get_entry(name)
    if not entry.streaming:
        raise HeadError(f"head {name!r} cannot train in chunks; heads that can: {', '.join(STREAMING_HEADS)}")
    if name == "dense":
        return DenseHead(n_classes, random_state=random_state, **params)
    loss = "log_loss" if name == "logreg" else "hinge"
    model = SGDClassifier(loss=loss, alpha=1.0 / (params["C"] * max(1, n_rows)), average=True,
                          random_state=random_state)
    record = {**params, "solver": f"SGDClassifier({loss}) with partial_fit", "epochs": STREAM_EPOCHS}
    return SklearnHead(name, Pipeline([("scale", StandardScaler()), ("model", model)]), record, n_classes=n_classes)


class StreamingData:
    """Fit and predict heads from chunks of cache rows, never holding all features.

    Parameters
    ----------
    reader : RowReader
        Open cache reader.
    budget : int
        Memory budget in bytes; it sets the rows per chunk.
    n_classes : int
        Number of classes of the cache.
    random_state : int
        Seed of the chunk order and of the dense head's early-stopping holdout.
    """

    def __init__(self, reader: RowReader, budget: int, n_classes: int, random_state: int = 0) -> None:
        self.reader = reader
        self.chunk_rows = rows_per_chunk(reader.feature_size, budget)
        self.n_classes = n_classes
        self.random_state = random_state
        logger.info("streaming %s in windows of %d rows", reader.path, self.chunk_rows)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """Return the class indices of ``rows``."""
        return self.reader.labels(rows)

    def fit(self, head: Head, rows: np.ndarray, validation_rows: np.ndarray | None = None) -> None:
        """Fit ``head`` on ``rows`` in chunks.

        The dense head stops early on the loss over ``validation_rows``, or over a seeded
        tenth of ``rows`` held out from training when none are given.
        """
        if isinstance(head, DenseHead):
            self._fit_dense(head, rows, validation_rows)
        elif isinstance(head, SklearnHead):
            self._fit_sgd(head, rows)
        else:
            raise HeadError(f"head {head.name!r} cannot train in chunks; heads that can: {', '.join(STREAMING_HEADS)}")

    def _fit_sgd(self, head: SklearnHead, rows: np.ndarray) -> None:
        scaler = head.estimator.named_steps["scale"]
        model = head.estimator.named_steps["model"]
        for _, X, _ in self.reader.chunks(rows, self.chunk_rows):
            scaler.partial_fit(flatten(X))
        classes = np.arange(self.n_classes)
        rng = np.random.default_rng(self.random_state)
        for _ in range(STREAM_EPOCHS):
            for _, X, y in self.reader.chunks(rows, self.chunk_rows, rng):
                model.partial_fit(scaler.transform(flatten(X)), y, classes=classes)

    def _fit_dense(self, head: DenseHead, rows: np.ndarray, validation_rows: np.ndarray | None) -> None:
        import tensorflow as tf

        if validation_rows is None or len(validation_rows) == 0:
            # The rows that the in-memory path holds out: MemoryData shuffles with the same
            # seed and Keras's validation_split=0.1 takes the last rows after floor(0.9 n).
            shuffled = np.random.default_rng(self.random_state).permutation(rows)
            split_at = math.floor(len(rows) * 0.9)
            validation_rows, rows = np.sort(shuffled[split_at:]), np.sort(shuffled[:split_at])
        shape = tuple(self.reader.snapshot.feature_shape)
        signature = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.float32))
        batch = int(head.params["batch_size"])

        def batches(part: np.ndarray, shuffle: bool) -> Any:
            epoch_seeds = np.random.default_rng(self.random_state + 1)

            def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                # Called once per epoch: a new window order and row order each time.
                order = np.random.default_rng(epoch_seeds.integers(2**31)) if shuffle else None
                for _, X, y in self.reader.chunks(part, self.chunk_rows, order):
                    yield X, y.astype(np.float32)

            # Rebatch so that every batch has batch_size rows even when a window has fewer.
            # The known batch count tells Keras where an epoch ends.
            dataset = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch().batch(batch)
            return dataset.apply(tf.data.experimental.assert_cardinality(-(-len(part) // batch)))

        head.fit_dataset(batches(rows, True), batches(validation_rows, False), shape)

    def predict_proba(self, head: Head, rows: np.ndarray) -> np.ndarray:
        """Return class probabilities of ``rows`` (in sorted row order), predicted chunk by chunk."""
        parts = [head.predict_proba(X) for _, X, _ in self.reader.chunks(rows, self.chunk_rows)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes))


def _split_summary(proba: np.ndarray, y: np.ndarray, n_classes: int, calibrated: bool) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, log_loss

    result: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return result
    result["accuracy"] = float(accuracy_score(y, proba.argmax(axis=1)))
    if calibrated:
        result["loss"] = float(log_loss(y, np.clip(proba, PROBA_FLOOR, 1.0), labels=list(range(n_classes))))
    return result


def train_within_budget(
    cache_path: str | os.PathLike[str],
    head_name: str,
    models_dir: str | os.PathLike[str],
    memory_budget: str | int | None,
    random_state: int = 0,
    use_views: bool = False,
) -> dict[str, Any]:
    """Train one head like :func:`pipeline.training.train_head`, streaming when the features exceed the budget.

    Within the budget (or without one) this is ``train_head``. Above it, the train rows
    are streamed from the cache (see :class:`StreamingData`), every split is evaluated in
    chunks, and the head is saved in the same folder layout, so ``convcache predict``
    loads it as usual.

    Returns
    -------
    dict
        ``head``, ``model_path``, ``metrics`` (per split: ``accuracy``, ``loss`` where the
        head gives probabilities, ``n``), ``fit_seconds`` and ``streaming``.

    Raises
    ------
    HeadError
        When streaming is needed and the head has no incremental fit; the message names the budget.
    BudgetError
        For a budget that cannot be parsed.
    """
    from pipeline.training import model_folder_name, train_head

    budget = parse_memory_budget(memory_budget)
    entry = get_entry(head_name)
    with RowReader(cache_path) as reader:
        splits, derived = plan_splits(reader.snapshot, use_views=use_views, random_state=random_state)
        n_rows = sum(len(r) for r in splits.values())
        stream = budget is not None and needs_streaming(n_rows, reader.feature_size, budget)
        if stream:
            assert budget is not None
            check_streamable([entry], budget, n_rows, reader.feature_size)
            classes = list(reader.snapshot.classes)
            spec = reader.snapshot.spec
            data = StreamingData(reader, budget, len(classes), random_state)
            train_rows = splits["train"]
            head = build_streaming_head(head_name, dict(entry.defaults), len(classes), random_state, len(train_rows))
            started = time.perf_counter()
            # Like train_head, the dense head stops early on the validation split where there is one.
            data.fit(head, train_rows, splits.get("validation"))
            fit_seconds = time.perf_counter() - started
            calibrated = getattr(head, "has_proba", False)
            metrics = {name: _split_summary(data.predict_proba(head, np.sort(rows)), data.labels(np.sort(rows)),
                                            len(classes), calibrated)
                       for name, rows in splits.items()}
    if not stream:
        result = train_head(cache_path, head_name, models_dir, random_state=random_state, use_views=use_views)
        return {**result, "streaming": False}

    folder = Path(models_dir) / model_folder_name(Path(cache_path), head_name)
    save_head(head, folder, {
        "spec": spec.to_json(), "spec_digest": spec.digest, "classes": classes,
        "cache": str(Path(cache_path).resolve()), "metrics": metrics, "derived_splits": derived,
        "streaming": {"memory_budget": budget, "rows_per_chunk": data.chunk_rows},
    })
    logger.info("trained %s in chunks of %d rows in %.1f s: %s", head_name, data.chunk_rows, fit_seconds, metrics)
    return {"head": head_name, "model_path": str(folder), "metrics": metrics, "fit_seconds": round(fit_seconds, 3),
            "streaming": True}

"""Classifier heads trained on cached features: a Keras dense head and scikit-learn estimators."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.registry import HEAD_NAMES, HeadError, build_head

logger = logging.getLogger(__name__)

META_FILE = "head.json"
# Rows per forward pass when the dense head predicts; bounds the memory of one call.
PREDICT_BATCH = 4096


class Head(Protocol):
    """Interface of every head: scikit-learn's fit/predict conventions plus save."""

    name: str
    params: dict[str, Any]

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> Head: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def save(self, folder: Path) -> None: ...


def flatten(X: np.ndarray) -> np.ndarray:
    """Return features as a 2-D ``(n_samples, n_features)`` array."""
    return X.reshape(len(X), -1)


def softmax_scores(scores: np.ndarray) -> np.ndarray:
    """Turn decision-function scores into rows that sum to one.

    One column of binary scores goes through the logistic function, several columns
    through a softmax. The result ranks classes like the scores do, but it is not
    calibrated, so metrics that need probabilities are not computed from it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        positive = 1.0 / (1.0 + np.exp(-np.clip(scores, -500, 500)))
        return np.stack([1.0 - positive, positive], axis=1)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class SklearnHead:
    """A scikit-learn estimator (usually a pipeline) on flattened features.

    Parameters
    ----------
    name : str
        Registry name or import path the head was created from.
    estimator : sklearn estimator
        Unfitted estimator; it receives 2-D features.
    params : dict, optional
        Hyperparameters the head was built with, stored with the saved head.
    n_classes : int, optional
        Number of classes of the cache. Probability columns of classes that the train
        rows lack are filled with zeros so that column ``k`` is always class ``k``.
    """

    def __init__(self, name: str, estimator: Any, params: dict[str, Any] | None = None,
                 n_classes: int | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.params = dict(params or {})
        self.n_classes = n_classes

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> SklearnHead:
        """Fit on the train rows; the validation rows are not used by scikit-learn heads.

        A PCA step asking for more components than the rows or features allow is cut
        down to that limit, and ``params["pca"]`` records the count used.
        """
        X = flatten(X)
        steps = getattr(self.estimator, "named_steps", {})
        pca = steps.get("pca") if hasattr(steps, "get") else None
        if pca is not None and isinstance(pca.n_components, int) and pca.n_components > min(X.shape):
            logger.info("%s: PCA cut from %d to %d components for %d rows", self.name, pca.n_components,
                        min(X.shape), len(X))
            pca.set_params(n_components=min(X.shape))
            self.params["pca"] = min(X.shape)
        self.estimator.fit(X, y)
        return self

    @property
    def has_proba(self) -> bool:
        """Whether the estimator gives class probabilities of its own."""
        return hasattr(self.estimator, "predict_proba")

    @property
    def proba_kind(self) -> str:
        """``"native"`` for the estimator's probabilities, ``"decision"`` for softmax-ed decision scores."""
        return "native" if self.has_proba else "decision"

    def _full_columns(self, values: np.ndarray) -> np.ndarray:
        fitted = getattr(self.estimator, "classes_", None)
        if self.n_classes is None or fitted is None or len(fitted) == self.n_classes:
            return values
        full = np.zeros((len(values), self.n_classes), dtype=values.dtype)
        full[:, np.asarray(fitted, dtype=np.int64)] = values
        return full

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``.

        Estimators without ``predict_proba`` (``LinearSVC``, ``RidgeClassifier``) return
        :func:`softmax_scores` of their decision function instead.
        """
        if self.has_proba:
            return self._full_columns(np.asarray(self.estimator.predict_proba(flatten(X))))
        return self._full_columns(softmax_scores(self.estimator.decision_function(flatten(X))))

    def decision_scores(self, X: np.ndarray) -> np.ndarray:
        """Return probabilities where available, else decision-function scores."""
        if self.has_proba:
            return self.predict_proba(X)
        return self.estimator.decision_function(flatten(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Return predicted class indices."""
        return np.asarray(self.estimator.predict(flatten(X)))

    def save(self, folder: Path) -> None:
        """Write the fitted estimator to ``folder/model.joblib``."""
        import joblib

        joblib.dump(self.estimator, folder / "model.joblib")

    @classmethod
    def load(cls, folder: Path, name: str, params: dict[str, Any], n_classes: int | None = None) -> SklearnHead:
        """Read an estimator written by :meth:`save`."""
        import joblib

        return cls(name, joblib.load(folder / "model.joblib"), params, n_classes=n_classes)


class DenseHead:
    """The classic Keras head: flatten, Dense 256 ReLU, Dropout 0.5, sigmoid or softmax.

    Trained with Adam and early stopping on validation loss (the best epoch's weights
    are restored). Without validation rows, 10 % of the train rows are held out.
    """

    has_proba = True
    proba_kind = "native"

    def __init__(self, n_classes: int, epochs: int = 60, batch_size: int = 32, learning_rate: float = 1e-3,
                 units: int = 256, dropout: float = 0.5, patience: int = 6, random_state: int = 0) -> None:
        self.name = "dense"
        self.n_classes = n_classes
        self.params = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                       "units": units, "dropout": dropout, "patience": patience, "random_state": random_state}
        self.model: Any = None
        self.history: dict[str, list[float]] = {}

    def _build(self, feature_shape: tuple[int, ...]) -> Any:
        import keras

        binary = self.n_classes == 2
        layers = [keras.Input(shape=feature_shape)]
        if len(feature_shape) > 1:
            layers.append(keras.layers.Flatten())
        layers += [
            keras.layers.Dense(self.params["units"], activation="relu"),
            keras.layers.Dropout(self.params["dropout"]),
            keras.layers.Dense(1 if binary else self.n_classes, activation="sigmoid" if binary else "softmax"),
        ]
        model = keras.Sequential(layers, name="dense_head")
        model.compile(
            optimizer=keras.optimizers.Adam(self.params["learning_rate"]),
            loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> DenseHead:
        """Train with early stopping on ``(X_val, y_val)`` or a held-out tenth of the train rows."""
        import keras

        # NOTE: the seed is process-wide, so two dense heads fitted at the same time in threads
        # (a comparison of several caches) are not guaranteed to repeat their results.
        keras.utils.set_random_seed(self.params["random_state"])
        self.model = self._build(tuple(X.shape[1:]))
        validation: dict[str, Any]
        if X_val is not None and y_val is not None and len(y_val):
            validation = {"validation_data": (X_val, y_val.astype("float32"))}
        else:
            validation = {"validation_split": 0.1}
        history = self.model.fit(
            X, y.astype("float32"), epochs=self.params["epochs"], batch_size=self.params["batch_size"],
            callbacks=[self._early_stopping()], verbose=0, shuffle=True, **validation,
        )
        self._keep_history(history)
        return self

    def fit_dataset(self, train: Any, validation: Any, feature_shape: tuple[int, ...]) -> DenseHead:
        """Train from ``tf.data`` datasets of ``(features, labels)`` batches, for features that do not fit in memory.

        Keras iterates ``train`` once per epoch and stops early on the loss over
        ``validation``. The datasets shuffle themselves; Keras does not reorder them.
        """
        import keras

        keras.utils.set_random_seed(self.params["random_state"])
        self.model = self._build(tuple(feature_shape))
        history = self.model.fit(train, validation_data=validation, epochs=self.params["epochs"],
                                 callbacks=[self._early_stopping()], verbose=0, shuffle=False)
        self._keep_history(history)
        return self

    def _early_stopping(self) -> Any:
        import keras

        return keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.params["patience"],
                                             restore_best_weights=True)

    def _keep_history(self, history: Any) -> None:
        self.history = {k: [float(v) for v in values] for k, values in history.history.items()}
        logger.info("dense head stopped after %d epochs", len(self.history.get("loss", [])))

    @property
    def epochs_run(self) -> int:
        """Epochs the last fit ran before early stopping ended it."""
        return len(self.history.get("loss", []))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``, computed in batches of 4096 rows."""
        parts = [np.asarray(self.model(X[start : start + PREDICT_BATCH], training=False))
                 for start in range(0, len(X), PREDICT_BATCH)]
        out = np.concatenate(parts) if parts else np.zeros((0, 1 if self.n_classes == 2 else self.n_classes))
        if self.n_classes == 2:
            out = np.concatenate([1.0 - out, out], axis=1)
        return out

    decision_scores = predict_proba

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Return predicted class indices."""
        return self.predict_proba(X).argmax(axis=1)

    def save(self, folder: Path) -> None:
        """Write the Keras model to ``folder/model.keras``."""
        self.model.save(folder / "model.keras")

    @classmethod
    def load(cls, folder: Path, n_classes: int, params: dict[str, Any]) -> DenseHead:
        """Read a head written by :meth:`save`."""
        import keras

        head = cls(n_classes, **params)
        head.model = keras.saving.load_model(folder / "model.keras")
        return head


def make_logreg(random_state: int = 0, C: float = 1.0) -> SklearnHead:
    """Build ``StandardScaler`` + ``LogisticRegression``."""
    head = build_head("logreg", 2, random_state=random_state, C=C)
    assert isinstance(head, SklearnHead)
    head.n_classes = None  # the class count is unknown here; columns follow the fitted classes
    return head


def make_head(name: str, n_classes: int, random_state: int = 0, **params: Any) -> Head:
    """Create an unfitted head by registry name or ``module:Class`` import path.

    ``params`` override the registry defaults (see :mod:`pipeline.registry`).

    Raises
    ------
    HeadError
        For an unknown name, a bad import path or an unknown parameter, listing the valid choices.
    """
    return build_head(name, n_classes, random_state=random_state, **params)


def save_head(head: Head, folder: Path, meta: dict[str, Any]) -> Path:
    """Save a fitted head and its metadata (feature spec, classes, metrics) into ``folder``.

    The files are written to a temporary folder beside ``folder`` and swapped in by
    rename, so a crash never leaves a model that does not match its ``head.json``.
    Other files already in ``folder`` are kept.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        head.save(staging)
        record = dict(meta)
        kind = "keras" if isinstance(head, DenseHead) else "sklearn"
        record.update({"head": head.name, "params": head.params, "kind": kind})
        (staging / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        previous = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        if folder.exists():
            # Files that others keep beside the head (a fine-tuned base's weights) move along.
            for extra in folder.iterdir():
                target = staging / extra.name
                if target.exists():
                    continue
                if extra.is_dir():
                    shutil.copytree(extra, target, symlinks=True)
                else:
                    shutil.copy2(extra, target)
            folder.rename(previous)
        staging.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_head(folder: str | Path) -> tuple[Head, dict[str, Any]]:
    """Load a head saved by :func:`save_head`, returning it with its metadata."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise HeadError(f"no trained head found at {folder} (missing {META_FILE}). Pass a folder written by 'convcache train'.")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
        classes, params, name = list(meta["classes"]), dict(meta["params"]), str(meta["head"])
    except (ValueError, KeyError, TypeError) as error:
        raise HeadError(
            f"{meta_path} is not a valid head description ({type(error).__name__}: {error}). "
            "Train the head again with 'convcache train' or 'convcache compare'."
        ) from error
    if kind == "keras":
        return DenseHead.load(folder, len(classes), params), meta
    return SklearnHead.load(folder, name, params, n_classes=len(classes)), meta


__all__ = ["HEAD_NAMES", "DenseHead", "Head", "HeadError", "SklearnHead", "load_head", "make_head", "save_head",
           "softmax_scores"]

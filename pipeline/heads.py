"""Classifier heads trained on cached features: a Keras dense head and scikit-learn estimators."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

META_FILE = "head.json"


class HeadError(ValueError):
    """Raised for an unknown head name or an invalid head setting."""


class Head(Protocol):
    """What every head offers: scikit-learn's fit/predict conventions plus save."""

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


class SklearnHead:
    """A scikit-learn estimator (usually a pipeline) on flattened features.

    Parameters
    ----------
    name : str
        Registry name or import path the head was created from.
    estimator : sklearn estimator
        Unfitted estimator; it receives 2-D features.
    """

    def __init__(self, name: str, estimator: Any, params: dict[str, Any] | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.params = dict(params or {})

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> SklearnHead:
        """Fit on the train rows; the validation rows are not used by scikit-learn heads."""
        self.estimator.fit(flatten(X), y)
        return self

    @property
    def has_proba(self) -> bool:
        """Whether the estimator gives class probabilities."""
        return hasattr(self.estimator, "predict_proba")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``."""
        return self.estimator.predict_proba(flatten(X))

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
    def load(cls, folder: Path, name: str, params: dict[str, Any]) -> SklearnHead:
        """Read an estimator written by :meth:`save`."""
        import joblib

        return cls(name, joblib.load(folder / "model.joblib"), params)


class DenseHead:
    """The classic Keras head: flatten, Dense 256 ReLU, Dropout 0.5, sigmoid or softmax.

    Trained with Adam and early stopping on validation loss (the best epoch's weights
    are restored). Without validation rows, 10 % of the train rows are held out.
    """

    has_proba = True

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

        keras.utils.set_random_seed(self.params["random_state"])
        self.model = self._build(tuple(X.shape[1:]))
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=self.params["patience"], restore_best_weights=True
        )
        validation: dict[str, Any]
        if X_val is not None and y_val is not None and len(y_val):
            validation = {"validation_data": (X_val, y_val.astype("float32"))}
        else:
            validation = {"validation_split": 0.1}
        history = self.model.fit(
            X, y.astype("float32"), epochs=self.params["epochs"], batch_size=self.params["batch_size"],
            callbacks=[stop], verbose=0, shuffle=True, **validation,
        )
        self.history = {k: [float(v) for v in values] for k, values in history.history.items()}
        logger.info("dense head stopped after %d epochs", len(self.history.get("loss", [])))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``."""
        out = np.asarray(self.model(X, training=False))
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
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=random_state))
    return SklearnHead("logreg", estimator, {"C": C})


HEAD_NAMES = ("dense", "logreg")


def make_head(name: str, n_classes: int, random_state: int = 0, **params: Any) -> Head:
    """Create an unfitted head by registry name.

    Raises
    ------
    HeadError
        For a name that is not registered, listing the valid names.
    """
    if name == "dense":
        return DenseHead(n_classes, random_state=random_state, **params)
    if name == "logreg":
        return make_logreg(random_state=random_state, **params)
    raise HeadError(f"unknown head {name!r}; valid heads: {', '.join(HEAD_NAMES)}")


def save_head(head: Head, folder: Path, meta: dict[str, Any]) -> Path:
    """Save a fitted head and its metadata (feature spec, classes, metrics) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    head.save(folder)
    record = dict(meta)
    record.update({"head": head.name, "params": head.params, "kind": "keras" if isinstance(head, DenseHead) else "sklearn"})
    (folder / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return folder


def load_head(folder: str | Path) -> tuple[Head, dict[str, Any]]:
    """Load a head saved by :func:`save_head`, returning it with its metadata."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise HeadError(f"no trained head found at {folder} (missing {META_FILE}). Pass a folder written by 'convcache train'.")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "keras":
        return DenseHead.load(folder, len(meta["classes"]), meta["params"]), meta
    return SklearnHead.load(folder, meta["head"], meta["params"]), meta

"""Registry of classifier heads: defaults, hyperparameter grids, and import-path estimators.

Every head is a :class:`HeadEntry`. Its builder turns a parameter dictionary into an
unfitted head (see :mod:`pipeline.heads`). Heads that are sensitive to feature scale get a
``StandardScaler`` inside their pipeline. Slow heads may put a PCA step in front of the
estimator, and the component count is part of the parameters, so it is recorded with
every result. Any scikit-learn classifier can also be named by import path, for example
``sklearn.linear_model:RidgeClassifier``.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.heads import Head

# Grid sizes: "default" searches the whole grid, "small" a one- or two-point grid for
# tests and quick looks, "none" fits the defaults only.
GRID_SIZES = ("default", "small", "none")
# Rows that a head is refitted on once its hyperparameters are chosen on the validation split.
REFIT_CHOICES = ("train+validation", "train")


class HeadError(ValueError):
    """Raised for an unknown head name or an invalid head setting."""


Builder = Callable[[dict[str, Any], int, int], "Head"]


@dataclass(frozen=True)
class HeadEntry:
    """One named head: how to build it, its defaults and its hyperparameter grids.

    ``cost`` is a rough rank of fit time (higher is slower); a comparison starts the
    slow heads first. ``streaming`` marks heads that can train from chunks of rows
    (``partial_fit`` or a Keras generator) when the features exceed a memory budget.
    """

    name: str
    summary: str
    build: Builder
    defaults: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    small_grid: dict[str, list[Any]] = field(default_factory=dict)
    cost: int = 1
    streaming: bool = False
    import_path: str | None = None

    def param_grid(self, size: str = "default") -> list[dict[str, Any]]:
        """Return the parameter dictionaries to try, each merged over the defaults.

        Raises
        ------
        HeadError
            For a ``size`` that is not one of :data:`GRID_SIZES`.
        """
        if size not in GRID_SIZES:
            raise HeadError(f"invalid grid size {size!r}; valid choices: {', '.join(GRID_SIZES)}")
        grid = {"default": self.grid, "small": self.small_grid, "none": {}}[size]
        keys = sorted(grid)
        combos = itertools.product(*(grid[k] for k in keys)) if keys else [()]
        return [{**self.defaults, **dict(zip(keys, values, strict=True))} for values in combos]


def _scaled(estimator: Any, scale: bool = True, pca: int | None = None, random_state: int = 0) -> Any:
    """Return ``[StandardScaler] -> [PCA] -> estimator`` as one scikit-learn pipeline."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[tuple[str, Any]] = []
    if scale:
        steps.append(("scale", StandardScaler()))
    if pca:
        steps.append(("pca", PCA(n_components=int(pca), svd_solver="randomized", random_state=random_state)))
    steps.append(("model", estimator))
    return Pipeline(steps)


def _sklearn_head(name: str, estimator: Any, params: dict[str, Any], n_classes: int) -> Head:
    from pipeline.heads import SklearnHead

    return SklearnHead(name, estimator, params, n_classes=n_classes)


def _build_dense(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from pipeline.heads import DenseHead

    return DenseHead(n_classes, random_state=random_state, **params)


def _build_logreg(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=params["C"], max_iter=2000, random_state=random_state)
    return _sklearn_head("logreg", _scaled(model), params, n_classes)


def _build_linear_svm(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    # LinearSVC has no predict_proba; three-fold sigmoid calibration gives probabilities,
    # so log loss, Brier score and `convcache predict` work for this head.
    svm = LinearSVC(C=params["C"], max_iter=5000, random_state=random_state)
    model = CalibratedClassifierCV(svm, method="sigmoid", cv=3)
    return _sklearn_head("linear_svm", _scaled(model), params, n_classes)


def _build_svm_rbf(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    # Platt scaling fitted on three-fold out-of-fold scores, then one SVC on all rows
    # (scikit-learn 1.9 deprecates SVC(probability=True) in favour of this).
    model = CalibratedClassifierCV(SVC(C=params["C"], gamma="scale"), method="sigmoid", cv=3, ensemble=False)
    return _sklearn_head("svm_rbf", _scaled(model, pca=params.get("pca"), random_state=random_state), params, n_classes)


def _build_knn(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.neighbors import KNeighborsClassifier

    model = KNeighborsClassifier(n_neighbors=params["n_neighbors"], weights=params["weights"])
    return _sklearn_head("knn", _scaled(model, pca=params.get("pca"), random_state=random_state), params, n_classes)


def _build_random_forest(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(
        n_estimators=params["n_estimators"], max_features=params["max_features"],
        min_samples_leaf=params["min_samples_leaf"], n_jobs=-1, random_state=random_state,
    )
    pipeline = _scaled(model, scale=False, pca=params.get("pca"), random_state=random_state)
    return _sklearn_head("random_forest", pipeline, params, n_classes)


def _build_hist_gb(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        learning_rate=params["learning_rate"], max_iter=params["max_iter"], max_leaf_nodes=params["max_leaf_nodes"],
        early_stopping=True, random_state=random_state,
    )
    pipeline = _scaled(model, scale=False, pca=params.get("pca"), random_state=random_state)
    return _sklearn_head("hist_gb", pipeline, params, n_classes)


def _build_mlp(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(
        hidden_layer_sizes=(params["units"],), alpha=params["alpha"], early_stopping=True, max_iter=300,
        random_state=random_state,
    )
    return _sklearn_head("mlp", _scaled(model), params, n_classes)


HEADS: dict[str, HeadEntry] = {
    entry.name: entry
    for entry in (
        HeadEntry("dense", "Keras Dense-ReLU-Dropout-softmax head with early stopping", _build_dense,
                  {"units": 256, "dropout": 0.5, "learning_rate": 1e-3, "epochs": 60, "patience": 6, "batch_size": 32},
                  grid={"learning_rate": [1e-3, 1e-4]}, small_grid={"epochs": [20]}, cost=6, streaming=True),
        HeadEntry("logreg", "standardised logistic regression (L2)", _build_logreg, {"C": 1.0},
                  grid={"C": [0.001, 0.01, 0.1]}, small_grid={"C": [0.1]}, cost=3, streaming=True),
        HeadEntry("linear_svm", "standardised linear SVM with sigmoid-calibrated probabilities", _build_linear_svm,
                  {"C": 0.01}, grid={"C": [0.0003, 0.003, 0.03]}, small_grid={"C": [0.01]}, cost=3, streaming=True),
        HeadEntry("svm_rbf", "standardised RBF-kernel SVM with sigmoid-calibrated probabilities", _build_svm_rbf,
                  {"C": 1.0, "pca": None}, grid={"C": [1.0, 10.0]}, small_grid={"C": [1.0]}, cost=5),
        HeadEntry("knn", "standardised k-nearest neighbours", _build_knn,
                  {"n_neighbors": 15, "weights": "distance", "pca": None},
                  grid={"n_neighbors": [5, 15, 31]}, small_grid={"n_neighbors": [5]}, cost=2),
        HeadEntry("random_forest", "random forest", _build_random_forest,
                  {"n_estimators": 200, "max_features": "sqrt", "min_samples_leaf": 1, "pca": None},
                  grid={"min_samples_leaf": [1, 3]}, small_grid={"n_estimators": [50]}, cost=7),
        HeadEntry("hist_gb", "histogram gradient boosting on PCA components", _build_hist_gb,
                  {"learning_rate": 0.1, "max_iter": 200, "max_leaf_nodes": 15, "pca": 64},
                  grid={"learning_rate": [0.05, 0.1]}, small_grid={"max_iter": [30]}, cost=8),
        HeadEntry("mlp", "standardised one-hidden-layer perceptron (scikit-learn)", _build_mlp,
                  {"units": 256, "alpha": 1e-3}, grid={"alpha": [1e-4, 1e-2]}, small_grid={"alpha": [1e-3]}, cost=4),
    )
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)
# Heads that accept a PCA step; `--pca N` sets its component count for these.
PCA_HEADS = ("svm_rbf", "knn", "random_forest", "hist_gb")


def _valid_choices() -> str:
    return f"{', '.join(HEAD_NAMES)}, or a scikit-learn classifier as 'module:Class'"


def _import_entry(path: str) -> HeadEntry:
    """Resolve ``module:Class`` to a scikit-learn classifier and wrap it as a head entry."""
    from sklearn.base import is_classifier

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise HeadError(f"invalid head import path {path!r}: write it as 'module:Class', "
                        f"for example 'sklearn.linear_model:RidgeClassifier'. Valid heads: {_valid_choices()}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise HeadError(f"head {path!r}: module {module_name!r} not found ({error}). "
                        f"Check the spelling or install it. Valid heads: {_valid_choices()}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise HeadError(f"head {path!r}: module {module_name!r} has no attribute {attribute!r}. "
                            f"Valid heads: {_valid_choices()}")
        target = getattr(target, part)
    if not inspect.isclass(target):
        raise HeadError(f"head {path!r} is not a class; name a scikit-learn classifier class. "
                        f"Valid heads: {_valid_choices()}")
    try:
        probe = target()
    except TypeError as error:
        raise HeadError(f"head {path!r} cannot be created without arguments ({error}); "
                        "only classifiers with default settings can be named by import path") from None
    if not is_classifier(probe) or not hasattr(probe, "fit"):
        raise HeadError(f"head {path!r} is not a scikit-learn classifier (it is {type(probe).__name__}). "
                        f"Valid heads: {_valid_choices()}")
    accepts_seed = "random_state" in probe.get_params()

    def build(params: dict[str, Any], n_classes: int, random_state: int) -> Head:
        estimator = target()
        if accepts_seed:
            estimator.set_params(random_state=random_state)
        return _sklearn_head(path, _scaled(estimator), params, n_classes)

    return HeadEntry(path, f"{target.__name__} from {module_name} (standardised)", build, {}, cost=3,
                     import_path=path)


def get_entry(name: str) -> HeadEntry:
    """Return the registry entry for a head name or a ``module:Class`` import path.

    Raises
    ------
    HeadError
        For an unknown name, a module or attribute that does not exist, or a class that
        is not a scikit-learn classifier. The message lists the valid heads.
    """
    if name in HEADS:
        return HEADS[name]
    if ":" in name:
        return _import_entry(name)
    raise HeadError(f"unknown head {name!r}; valid heads: {_valid_choices()}")


def resolve_heads(names: Sequence[str] | None) -> list[HeadEntry]:
    """Resolve every head name up front, so a typo fails before any fitting starts.

    ``None`` or an empty sequence selects every registered head. Duplicates are dropped.
    """
    if not names:
        return list(HEADS.values())
    entries: list[HeadEntry] = []
    for name in dict.fromkeys(n.strip() for n in names):
        if not name:
            continue
        entries.append(get_entry(name))
    if not entries:
        raise HeadError(f"no head named in {list(names)!r}; valid heads: {_valid_choices()}")
    return entries


def build_head(name: str, n_classes: int, random_state: int = 0, **params: Any) -> Head:
    """Create an unfitted head from its registry defaults, overridden by ``params``."""
    entry = get_entry(name)
    unknown = set(params) - set(entry.defaults)
    if unknown:
        valid = ", ".join(sorted(entry.defaults)) or "none"
        raise HeadError(f"invalid parameters {sorted(unknown)} for head {name!r}; valid parameters: {valid}")
    return entry.build({**entry.defaults, **params}, n_classes, random_state)

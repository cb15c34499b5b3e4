"""Compare many classifier heads on one or more feature caches and keep the best.

The steps are separate so that a Prefect flow can run the heads as parallel tasks:

1. :func:`plan_comparison` validates every setting and head name, opens each cache once
   and cuts its rows into train, validation and test selections. It fits nothing, so a
   bad head name or import path fails here.
2. :func:`pipeline.search.run_head_job` fits one head: hyperparameter search on the
   validation split (or stratified cross-validation when there is no validation split,
   or when ``cv`` is given), a refit, and one evaluation on test.
3. :func:`finish_comparison` ranks the heads, saves the best under ``models_dir`` with
   :func:`pipeline.heads.save_head` and writes the report (see :mod:`pipeline.report`).

:func:`run_comparison` runs the three steps in this process without Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset import plan_splits
from pipeline.metrics import METRICS, SELECT_SPLITS, best_index, rank_key
from pipeline.registry import (
    GRID_SIZES,
    PCA_HEADS,
    REFIT_CHOICES,
    HeadEntry,
    resolve_heads,
)
from pipeline.search import CachePlan, HeadJob, failed_result, run_head_job
from pipeline.selection import RowReader, make_selection
from pipeline.spec import FeatureSpec
from pipeline.store import read_header
from pipeline.streaming import (
    STREAMING_HEADS,
    check_streamable,
    estimate_bytes,
    needs_streaming,
    parse_memory_budget,
)

logger = logging.getLogger(__name__)

DEFAULT_CV = 5


class CompareError(ValueError):
    """Raised for an invalid comparison setting or a cache that cannot be compared on."""


@dataclass
class ComparePlan:
    """Validated settings, caches and head jobs of one comparison run."""

    run: str
    caches: list[CachePlan]
    jobs: list[HeadJob]
    metric: str
    select_split: str
    models_dir: Path
    report_dir: Path
    keep_heads: bool
    settings: dict[str, Any]


def new_run_id() -> str:
    """Return a sortable, unique run name such as ``20250101-120000-3fa2c9``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def describe_spec(spec: FeatureSpec) -> str:
    """Return a one-line description of a feature spec, for example ``mobilenet_v2 160 px, top, avg pooling``."""
    alpha = f" alpha {spec.alpha}" if spec.alpha is not None else ""
    return (f"{spec.base}{alpha} {spec.input_size} px, layer {spec.layer or 'top'}, {spec.pooling} pooling, "
            f"weights {spec.weights} (sha256 {spec.weights_digest[:12]})")


def _check_settings(cv: int | None, metric: str, select_split: str, grid: str, refit: str, pca: int | None) -> None:
    if metric not in METRICS:
        raise CompareError(f"invalid selection metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if select_split not in SELECT_SPLITS:
        raise CompareError(f"invalid selection split {select_split!r}; valid splits: {', '.join(SELECT_SPLITS)}")
    if grid not in GRID_SIZES:
        raise CompareError(f"invalid grid size {grid!r}; valid choices: {', '.join(GRID_SIZES)}")
    if refit not in REFIT_CHOICES:
        raise CompareError(f"invalid refit choice {refit!r}; valid choices: {', '.join(REFIT_CHOICES)}")
    if cv is not None and cv < 2:
        raise CompareError(f"invalid cross-validation fold count {cv}; use 2 or more folds")
    if pca is not None and pca < 0:
        raise CompareError(f"invalid PCA component count {pca}; use 0 (no PCA) or a positive count")


def _cache_labels(paths: list[Path]) -> list[str]:
    labels: list[str] = []
    for path in paths:
        label = path.stem
        if label in labels:
            label = f"{label}-{len(labels) + 1}"
        labels.append(label)
    return labels


def _plan_cache(path: Path, label: str, use_views: bool, random_state: int, budget: int | None) -> CachePlan:
    if not path.is_file():
        raise FileNotFoundError(f"cache file not found: {path}. Run 'convcache extract' first, or check the path.")
    header = read_header(path)
    with RowReader(path, header.spec.digest) as reader:
        splits, derived = plan_splits(reader.snapshot, use_views=use_views, random_state=random_state)
        if len(splits.get("train", ())) == 0:
            raise CompareError(f"{path} contains no train rows; run 'convcache extract' on a tree with a train split")
        if len(splits.get("test", ())) == 0:
            raise CompareError(
                f"{path} contains no test rows, so no head could be evaluated. Add a test/ split folder to the "
                "tree, or use a tree without split folders (then train, validation and test are cut from it)."
            )
        selections = {name: make_selection(reader.snapshot, name, rows) for name, rows in splits.items()
                      if name in ("train", "validation", "test") and len(rows)}
        ignored = sorted(set(splits) - set(selections))
        if ignored:
            logger.warning("%s: split(s) %s are not used by the comparison", path, ", ".join(ignored))
        n_rows = sum(len(s) for s in selections.values())
        feature_size = reader.feature_size
        spec = reader.snapshot.spec
        n_classes = len(reader.snapshot.classes)
        counts = {name: tuple(int(c) for c in np.bincount(reader.labels(s.indices), minlength=n_classes))
                  for name, s in selections.items()}
        return CachePlan(
            cache_path=str(path), label=label, spec_json=spec.to_json(), spec_digest=spec.digest,
            classes=tuple(reader.snapshot.classes), data_root=str(reader.snapshot.attrs.get("data_root", "")),
            feature_shape=tuple(int(d) for d in reader.snapshot.feature_shape), derived_splits=derived,
            selections=selections, streaming=needs_streaming(n_rows, feature_size, budget), memory_budget=budget,
            estimated_bytes=estimate_bytes(n_rows, feature_size), class_counts=counts,
        )


def _grid(entry: HeadEntry, size: str, pca: int | None) -> tuple[dict[str, Any], ...]:
    grid = entry.param_grid(size)
    if pca is not None and entry.name in PCA_HEADS:
        grid = [{**params, "pca": pca or None} for params in grid]
    unique = {json.dumps(p, sort_keys=True): p for p in grid}
    return tuple(unique.values())


def plan_comparison(
    cache_paths: Sequence[str | os.PathLike[str]],
    heads: Sequence[str] | None = None,
    cv: int | None = None,
    metric: str = "accuracy",
    select_split: str = "validation",
    random_state: int = 0,
    grid: str = "default",
    refit: str = "train+validation",
    pca: int | None = None,
    memory_budget: str | int | None = None,
    use_views: bool = False,
    models_dir: str | os.PathLike[str] = "data/models",
    reports_dir: str | os.PathLike[str] = "data/reports",
    keep_heads: bool = False,
    run: str | None = None,
) -> ComparePlan:
    """Validate a comparison and cut each cache into row selections; nothing is fitted.

    Parameters
    ----------
    cache_paths : sequence of path
        One or more cache files; every head is fitted on each of them.
    heads : sequence of str, optional
        Registry names or ``module:Class`` import paths; default: every registered head.
    cv : int, optional
        Select hyperparameters by ``cv``-fold stratified cross-validation over the train and
        validation rows together, then refit on all of them. Without it the validation
        split is used, or 5-fold cross-validation on train where a cache has none.
    metric, select_split : str
        Metric (see :data:`pipeline.metrics.METRICS`) and split that rank the heads.
        Hyperparameters are always chosen by ``metric`` on validation (or cross-validation).
    grid : str
        ``default``, ``small`` or ``none`` (defaults only).
    refit : str
        After a validation-split search, refit the chosen parameters on ``train+validation``
        (default) or keep the model fitted on ``train``.
    pca : int, optional
        PCA components before the heads that accept them (svm_rbf, knn, random_forest,
        hist_gb); 0 turns their PCA off. Default: each head's registry default.
    memory_budget : str or int, optional
        Above this estimate of feature bytes a cache is streamed in chunks. Heads without an
        incremental fit are then rejected, or left out when ``heads`` is None.

    Raises
    ------
    CompareError, HeadError, BudgetError, FileNotFoundError, CacheFileError
        For any invalid setting, head, budget or cache, before anything is fitted.
    """
    _check_settings(cv, metric, select_split, grid, refit, pca)
    entries = resolve_heads(heads)
    budget = parse_memory_budget(memory_budget)
    paths = list(dict.fromkeys(Path(p) for p in cache_paths))
    if not paths:
        raise CompareError("no cache file given; pass at least one file written by 'convcache extract'")
    caches = [_plan_cache(path, label, use_views, random_state, budget)
              for path, label in zip(paths, _cache_labels(paths), strict=True)]

    run = run or new_run_id()
    jobs: list[HeadJob] = []
    for cache in caches:
        cache_entries = entries
        if cache.streaming:
            assert budget is not None
            n_rows = sum(len(s) for s in cache.selections.values())
            if heads:
                check_streamable(entries, budget, n_rows, cache.feature_size)
            else:
                cache_entries = [e for e in entries if e.streaming]
                logger.warning("%s exceeds the memory budget; comparing only the heads that train in chunks: %s",
                               cache.cache_path, ", ".join(STREAMING_HEADS))
        folds = cv
        if folds is None and "validation" not in cache.selections:
            folds = DEFAULT_CV
        if folds is not None:
            _check_folds(cache, folds, with_validation=cv is not None)
        for entry in cache_entries:
            label = entry.name if len(caches) == 1 else f"{cache.label}/{entry.name}"
            jobs.append(HeadJob(label=label, head=entry.name, cache=cache, grid=_grid(entry, grid, pca),
                                cv_folds=folds, metric=metric, refit=refit, random_state=random_state, run=run))
    jobs.sort(key=lambda job: -_cost(job.head, entries))
    settings = {"heads": [e.name for e in entries], "cv": cv, "metric": metric, "select_split": select_split,
                "random_state": random_state, "grid": grid, "refit": refit, "pca": pca, "memory_budget": budget,
                "use_views": use_views}
    return ComparePlan(run, caches, jobs, metric, select_split, Path(models_dir), Path(reports_dir) / run,
                       keep_heads, settings)


def _check_folds(cache: CachePlan, folds: int, with_validation: bool) -> None:
    """Reject a fold count larger than the rows of a class that cross-validation would split."""
    parts = ["train", "validation"] if with_validation else ["train"]
    totals = [sum(cache.class_counts.get(p, (0,) * len(cache.classes))[k] for p in parts)
              for k in range(len(cache.classes))]
    present = [(n, name) for n, name in zip(totals, cache.classes, strict=True) if n > 0]
    smallest, name = min(present)
    if smallest < 2:
        raise CompareError(f"class {name!r} of {cache.cache_path} has a single row, too few for cross-validation. "
                           "Add images of that class, or add a validation split to the tree.")
    if folds > smallest:
        raise CompareError(
            f"{folds}-fold cross-validation needs at least {folds} rows of every class, but class {name!r} of "
            f"{cache.cache_path} has {smallest}. Pass --cv {smallest} or fewer folds, or add images."
        )


def _cost(name: str, entries: list[HeadEntry]) -> int:
    return next((e.cost for e in entries if e.name == name), 1)


def selection_value(result: dict[str, Any], metric: str, split: str) -> float | None:
    """Return a result's ``metric`` on ``split``, or None where it is missing."""
    return (result.get(split) or {}).get(metric)


def sort_results(results: list[dict[str, Any]], metric: str, split: str) -> list[dict[str, Any]]:
    """Order results best first by ``metric`` on ``split`` (ties by :func:`pipeline.metrics.tie_breaker`).

    Failed heads and heads without a value go last.
    """
    return sorted(results, key=lambda r: (bool(r.get("error")), rank_key(r.get(split), metric)))


def _replace_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, replacing a previous folder only once the copy is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def finish_comparison(plan: ComparePlan, results: list[dict[str, Any]], seconds: float | None = None) -> dict[str, Any]:
    """Rank the results, save the best head under ``plan.models_dir`` and write the report.

    Returns
    -------
    dict
        ``run``, ``caches``, ``settings``, ``select``, ``results`` (best first), ``best``
        (label, head, cache, value, model_path; None when every head failed), ``misclassified``,
        ``report`` (HTML path) and ``report_dir``.
    """
    from pipeline.report import find_misclassified, write_report
    from pipeline.training import model_folder_name

    ordered = sort_results(results, plan.metric, plan.select_split)
    best_at = best_index([None if r.get("error") else r.get(plan.select_split) for r in ordered], plan.metric)
    best: dict[str, Any] | None = None
    if best_at is not None:
        winner = ordered[best_at]
        target = plan.models_dir / model_folder_name(Path(winner["cache"]), winner["head"])
        _replace_folder(Path(winner["model_dir"]), target)
        best = {"label": winner["label"], "head": winner["head"], "cache": winner["cache"],
                "metric": plan.metric, "split": plan.select_split,
                "value": selection_value(winner, plan.metric, plan.select_split),
                "test_accuracy": winner["test"].get("accuracy"), "model_path": str(target)}
        logger.info("best head %s (%s %s %.4f) saved to %s", winner["label"], plan.select_split, plan.metric,
                    best["value"], target)
    else:
        logger.warning("no head has a %s value on %s; no model was saved", plan.metric, plan.select_split)
    summary: dict[str, Any] = {
        "run": plan.run,
        "caches": [_cache_summary(c) for c in plan.caches],
        "settings": plan.settings,
        "select": {"metric": plan.metric, "split": plan.select_split},
        "results": ordered,
        "best": best,
        "seconds": round(seconds, 1) if seconds is not None else None,
        "report_dir": str(plan.report_dir),
    }
    summary["misclassified"] = find_misclassified(summary)
    summary["report"] = str(write_report(summary, plan.report_dir))
    if not plan.keep_heads:
        shutil.rmtree(plan.report_dir / "heads", ignore_errors=True)
        for result in ordered:
            result.pop("model_dir", None)
    return summary


def _cache_summary(cache: CachePlan) -> dict[str, Any]:
    spec = FeatureSpec.from_json(cache.spec_json)
    return {"cache": cache.cache_path, "label": cache.label, "spec": json.loads(cache.spec_json),
            "spec_digest": cache.spec_digest, "description": describe_spec(spec), "classes": list(cache.classes),
            "data_root": cache.data_root, "feature_shape": list(cache.feature_shape),
            "derived_splits": cache.derived_splits, "rows": {k: len(v) for k, v in cache.selections.items()},
            "streaming": cache.streaming, "estimated_bytes": cache.estimated_bytes}


def run_comparison(cache_paths: Sequence[str | os.PathLike[str]], **settings: Any) -> dict[str, Any]:
    """Plan, fit every head one after another in this process, and finish; see :func:`plan_comparison`.

    A head whose fit raises is reported with its error instead of ending the comparison.
    """
    started = time.perf_counter()
    plan = plan_comparison(cache_paths, **settings)
    plan.report_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for job in plan.jobs:
        try:
            results.append(run_head_job(job, plan.report_dir))
        except Exception as error:  # one failing head must not lose the others' results
            logger.exception("head %s failed", job.label)
            results.append(failed_result(job, error))
    return finish_comparison(plan, results, time.perf_counter() - started)


__all__ = [
    "DEFAULT_CV",
    "CompareError",
    "ComparePlan",
    "describe_spec",
    "finish_comparison",
    "new_run_id",
    "plan_comparison",
    "run_comparison",
    "selection_value",
    "sort_results",
]

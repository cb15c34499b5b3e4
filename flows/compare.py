"""Prefect flow that compares classifier heads on cached features and keeps the best one.

Each head is one task. A task receives its :class:`~pipeline.search.HeadJob`, which names
the cache path and row selections but contains no features. The task reads the features
itself, so nothing large passes through Prefect. Tasks run in parallel threads; the fitted heads
and their test predictions are written to the run's report folder.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.compare import finish_comparison, plan_comparison
from pipeline.report import results_table, summary_markdown
from pipeline.search import HeadJob, failed_result, run_head_job

# Heads fitted at the same time. scikit-learn, TensorFlow and BLAS release the GIL, so
# threads overlap; more threads than cores only add memory.
DEFAULT_WORKERS = max(2, os.cpu_count() or 2)
TABLE_ARTIFACT_KEY = "compare-results"
MARKDOWN_ARTIFACT_KEY = "compare-report"


@task(name="fit-head", task_run_name="fit-{job.label}", cache_policy=NO_CACHE)
def fit_head_task(job: HeadJob, work_dir: str, threads: int) -> dict[str, Any]:
    """Search, refit and test one head with at most ``threads`` OpenMP/BLAS threads; returns its result record."""
    logger = get_run_logger()
    logger.info("fitting %s: %d candidate(s), selection on %s", job.label, len(job.grid), job.selection)
    result = run_head_job(job, work_dir, threads=threads)
    logger.info("%s: validation %s %s, test accuracy %.4f, fit %.1f s", job.label, job.metric,
                result["validation"].get(job.metric), result["test"].get("accuracy") or float("nan"),
                result["fit_seconds"])
    return result


@flow(name="compare", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_WORKERS))
def compare_flow(
    cache_paths: list[str],
    heads: list[str] | None = None,
    cv: int | None = None,
    metric: str = "accuracy",
    select_split: str = "validation",
    random_state: int = 0,
    grid: str = "default",
    refit: str = "train+validation",
    pca: int | None = None,
    memory_budget: str | None = None,
    use_views: bool = False,
    models_dir: str = "data/models",
    reports_dir: str = "data/reports",
    keep_heads: bool = False,
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Fit every head on every cache, report the results and save the best head.

    See :func:`pipeline.compare.plan_comparison` for the parameters. ``workers`` must
    match the task runner's thread count (:func:`run_compare_flow` sets both); each head
    then gets ``CPU count // workers`` OpenMP/BLAS threads. Creates a table
    artifact (``compare-results``) and a markdown artifact (``compare-report``) and
    returns the comparison summary, with ``best`` and ``report`` (the HTML page).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    plan = plan_comparison(
        cache_paths, heads=heads, cv=cv, metric=metric, select_split=select_split, random_state=random_state,
        grid=grid, refit=refit, pca=pca, memory_budget=memory_budget, use_views=use_views, models_dir=models_dir,
        reports_dir=reports_dir, keep_heads=keep_heads,
    )
    plan.report_dir.mkdir(parents=True, exist_ok=True)
    logger.info("run %s: %d head job(s) on %d cache(s)", plan.run, len(plan.jobs), len(plan.caches))
    for cache in plan.caches:
        if cache.streaming:
            logger.info("%s exceeds the memory budget; its heads train in chunks", cache.cache_path)

    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    futures = [(job, fit_head_task.submit(job, str(plan.report_dir), threads)) for job in plan.jobs]
    results = []
    for job, future in futures:
        try:
            results.append(future.result())
        except Exception as error:  # noqa: BLE001 - one failing head must not lose the others' results
            logger.error("head %s failed: %s: %s", job.label, type(error).__name__, error)
            results.append(failed_result(job, error))

    summary = finish_comparison(plan, results, time.perf_counter() - started)
    create_table_artifact(results_table(summary), key=TABLE_ARTIFACT_KEY,
                          description=f"Head comparison {plan.run}, best first by {select_split} {metric}")
    create_markdown_artifact(summary_markdown(summary), key=MARKDOWN_ARTIFACT_KEY,
                             description=f"Head comparison {plan.run}")
    best = summary["best"]
    if best:
        logger.info("best head %s: %s %s %.4f, test accuracy %s; saved to %s", best["label"], select_split, metric,
                    best["value"], best["test_accuracy"], best["model_path"])
    logger.info("report: %s", summary["report"])
    return summary


def run_compare_flow(workers: int | None = None, **parameters: Any) -> Any:
    """Run :func:`compare_flow` with ``workers`` parallel head tasks (default: the CPU count, at least 2).

    Returns the flow's summary, or its final state when ``return_state=True`` is passed.
    """
    workers = workers or DEFAULT_WORKERS
    runner = ThreadPoolTaskRunner(max_workers=workers)
    return compare_flow.with_options(task_runner=runner)(workers=workers, **parameters)

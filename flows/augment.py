"""Prefect flow that extracts features of an image tree plus K cached augmented views of its train images."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task

from flows.extract import extract_task
from pipeline.augment import AugmentRecipe, extract_views
from pipeline.spec import FeatureSpec

PROGRESS_LOG_SECONDS = 15.0


class _ProgressLog:
    """Run-log line every ``PROGRESS_LOG_SECONDS`` while views are computed."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.started = time.monotonic()
        self.last_log = self.started

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_SECONDS or done == total:
            rate = done / max(now - self.started, 1e-9)
            left = (total - done) / rate if rate else float("inf")
            self.logger.info("%d/%d views, %.1f views/s, about %.0f s left", done, total, rate, left)
            self.last_log = now


@task(name="extract-views")
def views_task(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    views: int,
    recipe_json: str,
    replace_views: bool,
    batch_size: int,
    lock_timeout: float,
    use_lock: bool | None,
) -> dict[str, Any]:
    """Compute the augmented views that the cache lacks; returns the run summary."""
    logger = get_run_logger()
    summary = extract_views(
        data_dir, cache_dir, FeatureSpec.from_json(spec_json), views, AugmentRecipe.from_json(recipe_json),
        replace=replace_views, batch_size=batch_size, lock_timeout=lock_timeout, use_lock=use_lock,
        progress=_ProgressLog(),
    )
    for failure in summary.failed:
        logger.warning("view failed: %s: %s", failure["path"], failure["reason"])
    if summary.dropped:
        logger.warning("dropped %d views made with another augmentation recipe", summary.dropped)
    logger.info(
        "cache %s: %d train images x %d views, %d computed, %d reused in %.1f s; file %.1f MB",
        summary.cache, summary.images, summary.views, summary.computed, summary.reused, summary.seconds,
        summary.file_bytes / 1e6,
    )
    return summary.to_dict()


@flow(name="extract-views", log_prints=False)
def extract_views_flow(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    views: int,
    recipe_json: str | None = None,
    replace_views: bool = False,
    batch_size: int = 32,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
) -> dict[str, Any]:
    """Bring the spec's cache up to date with ``data_dir``, then add views 1..``views`` of every train image.

    Returns ``{"extract": <extraction summary>, "views": <views summary>}``.
    """
    recipe_json = recipe_json or AugmentRecipe().to_json()
    extracted = extract_task(data_dir, cache_dir, spec_json, batch_size, lock_timeout, use_lock)
    augmented = views_task(
        data_dir, cache_dir, spec_json, views, recipe_json, replace_views, batch_size, lock_timeout, use_lock
    )
    return {"extract": extracted, "views": augmented}

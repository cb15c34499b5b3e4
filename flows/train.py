"""Prefect flow that fits one head on cached features; the conv base is never built."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from pipeline.streaming import train_within_budget


@task(name="train-head")
def train_task(
    cache_path: str, head: str, models_dir: str, random_state: int, use_views: bool, memory_budget: str | None
) -> dict[str, Any]:
    """Fit, evaluate and save one head; returns its metrics and model path.

    Above ``memory_budget`` the features are streamed from the cache in chunks.
    """
    result = train_within_budget(
        cache_path, head, models_dir, memory_budget, random_state=random_state, use_views=use_views
    )
    logger = get_run_logger()
    for split, values in result["metrics"].items():
        logger.info("%s %s: %s", head, split, values)
    return result


@flow(name="train")
def train_flow(
    cache_path: str,
    head: str = "logreg",
    models_dir: str = "data/models",
    random_state: int = 0,
    use_views: bool = False,
    memory_budget: str | None = None,
) -> dict[str, Any]:
    """Train ``head`` on the cache at ``cache_path`` and save it under ``models_dir``."""
    return train_task(cache_path, head, models_dir, random_state, use_views, memory_budget)

"""Prefect flow that fits one head on cached features; the conv base is never built."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from pipeline.training import train_head


@task(name="train-head")
def train_task(cache_path: str, head: str, models_dir: str, random_state: int, use_views: bool) -> dict[str, Any]:
    """Fit, evaluate and save one head; returns its metrics and model path."""
    result = train_head(cache_path, head, models_dir, random_state=random_state, use_views=use_views)
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
) -> dict[str, Any]:
    """Train ``head`` on the cache at ``cache_path`` and save it under ``models_dir``."""
    return train_task(cache_path, head, models_dir, random_state, use_views)

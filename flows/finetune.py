"""Prefect flow that fine-tunes the top layers of a conv base, warm-started from cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.extract import extract_task
from pipeline.finetune import FinetuneSettings, finetune_base, finetune_folder, warm_start_head


@task(name="warm-start-head")
def warm_start_task(cache_path: str, output_dir: str, settings_json: str) -> dict[str, Any]:
    """Fit the dense head on the cached features; returns its metrics and folder."""
    result = warm_start_head(cache_path, output_dir, FinetuneSettings.from_json(settings_json))
    for split, values in result["metrics"].items():
        get_run_logger().info("warm-start head %s: %s", split, values)
    return result


@task(name="finetune-base")
def finetune_task(
    data_dir: str, cache_path: str, head_path: str, output_dir: str, settings_json: str
) -> dict[str, Any]:
    """Train the unfrozen top layers and the head end to end; returns accuracy before and after."""
    logger = get_run_logger()
    result = finetune_base(data_dir, cache_path, head_path, output_dir, FinetuneSettings.from_json(settings_json))
    logger.info("trained %s on the %s for %d epochs (best %d) in %.1f s",
                ", ".join(result["trainable_layers"]), result["device"], result["epochs_run"], result["best_epoch"],
                result["fit_seconds"])
    for split in result["after"]:
        logger.info("%s accuracy %.4f before, %.4f after", split, result["before"][split].get("accuracy", float("nan")),
                    result["after"][split].get("accuracy", float("nan")))
    logger.info("tuned base weights: %s", result["weights"])
    return result


@flow(name="finetune", log_prints=False)
def finetune_flow(
    data_dir: str,
    cache_dir: str,
    models_dir: str,
    spec_json: str,
    settings_json: str,
    output_dir: str | None = None,
    batch_size: int = 32,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
) -> dict[str, Any]:
    """Extract what the cache lacks, warm-start the head on cached features, then fine-tune.

    The result is :func:`pipeline.finetune.finetune_base`'s, plus ``extract`` (the
    extraction summary) and ``warm_start`` (the warm-start head's metrics).
    """
    extracted = extract_task(data_dir, cache_dir, spec_json, batch_size, lock_timeout, use_lock)
    cache_path = extracted["cache"]
    folder = output_dir or str(finetune_folder(models_dir, cache_path, FinetuneSettings.from_json(settings_json)))
    warm = warm_start_task(cache_path, folder, settings_json)
    result = finetune_task(data_dir, cache_path, warm["model_path"], folder, settings_json)
    return {**result, "extract": extracted, "warm_start": warm, "output": str(Path(folder))}

"""Prefect flow that brings a feature cache up to date with an image tree."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from tqdm import tqdm

from pipeline.extract import extract_features
from pipeline.spec import FeatureSpec

PROGRESS_LOG_SECONDS = 15.0


class _Progress:
    """Progress bar on stderr plus a run-log line every ``PROGRESS_LOG_SECONDS``."""

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.bar: tqdm | None = None
        self.started = time.monotonic()
        self.last_log = self.started

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="img", desc="extract", mininterval=1.0, leave=False)
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_SECONDS or done == total:
            rate = done / max(now - self.started, 1e-9)
            left = (total - done) / rate if rate else float("inf")
            self.logger.info("%d/%d images, %.1f images/s, about %.0f s left", done, total, rate, left)
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@task(name="extract-features")
def extract_task(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    batch_size: int,
    lock_timeout: float,
    use_lock: bool | None,
) -> dict[str, Any]:
    """Scan, compute what the cache lacks and publish the cache; returns the run summary."""
    logger = get_run_logger()
    spec = FeatureSpec.from_json(spec_json)
    progress = _Progress()
    try:
        summary = extract_features(
            data_dir, cache_dir, spec, batch_size=batch_size, lock_timeout=lock_timeout,
            use_lock=use_lock, progress=progress,
        )
    finally:
        progress.close()
    for failure in summary.failed:
        logger.warning("failed: %s: %s", failure["path"], failure["reason"])
    for warning in summary.warnings:
        logger.warning(warning)
    logger.info(
        "cache %s: %d images, %d computed, %d reused, %d failed in %.1f s",
        summary.cache, summary.images, summary.computed, summary.reused, len(summary.failed), summary.seconds,
    )
    return summary.to_dict()


@flow(name="extract", log_prints=False)
def extract_flow(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    batch_size: int = 32,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
) -> dict[str, Any]:
    """Extract conv-base features of the images under ``data_dir`` into the spec's HDF5 cache."""
    return extract_task(data_dir, cache_dir, spec_json, batch_size, lock_timeout, use_lock)

"""Prefect flow that classifies new images with a saved head."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pipeline.predict import predict_images


@flow(name="predict")
def predict_flow(
    model_path: str,
    images: list[str],
    base: str | None = None,
    weights: str | None = None,
) -> list[dict[str, Any]]:
    """Return class and probability per image, reusing cached features by digest."""
    results = predict_images(model_path, images, base=base, weights=weights)
    cached = sum(1 for r in results if r.get("cached"))
    get_run_logger().info("predicted %d images (%d from the cache)", len(results), cached)
    return results

"""Fit one head on a cache's train split, evaluate it and save it beside its feature spec."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from pipeline.dataset import CachedDataset, load_dataset
from pipeline.heads import Head, make_head, save_head
from pipeline.metrics import split_metrics

logger = logging.getLogger(__name__)


def model_folder_name(cache_path: Path, head_name: str) -> str:
    """Return ``<cache stem>-<head>``, with characters unsafe in file names replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{cache_path.stem}-{head_name}")


def train_head(
    cache_path: str | os.PathLike[str],
    head_name: str,
    models_dir: str | os.PathLike[str],
    random_state: int = 0,
    use_views: bool = False,
    dataset: CachedDataset | None = None,
) -> dict[str, Any]:
    """Fit ``head_name`` on the cached train rows and evaluate it on every split.

    Returns a dictionary with ``head``, ``model_path``, ``metrics`` (per split:
    ``accuracy``, ``loss`` where defined, ``n``) and ``fit_seconds``.
    """
    data = dataset or load_dataset(cache_path, use_views=use_views, random_state=random_state)
    head: Head = make_head(head_name, len(data.classes), random_state=random_state)
    train = data.splits["train"]
    validation = data.splits.get("validation")
    started = time.perf_counter()
    head.fit(
        train.features,
        train.labels,
        validation.features if validation is not None else None,
        validation.labels if validation is not None else None,
    )
    fit_seconds = time.perf_counter() - started
    metrics = {name: split_metrics(head, split.features, split.labels, len(data.classes))
               for name, split in data.splits.items()}
    folder = Path(models_dir).expanduser() / model_folder_name(data.cache_path, head_name)
    save_head(
        head,
        folder,
        {
            "spec": data.spec.to_json(),
            "spec_digest": data.spec.digest,
            "classes": data.classes,
            "cache": str(Path(data.cache_path).resolve()),
            "metrics": metrics,
            "derived_splits": data.derived_splits,
        },
    )
    logger.info("trained %s on %d rows in %.1f s: %s", head_name, len(train), fit_seconds, metrics)
    return {"head": head_name, "model_path": str(folder), "metrics": metrics, "fit_seconds": round(fit_seconds, 3)}

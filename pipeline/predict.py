"""Classify new images with a saved head, reusing cached features where the digest is known."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads import HeadError, load_head
from pipeline.images import IMAGE_SUFFIXES, ImageDecodeError, file_digest, load_image
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec, SpecError, make_spec, resolve_weights, sha256_file

logger = logging.getLogger(__name__)


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders (searched recursively, hidden entries skipped) into sorted image paths."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                relative = candidate.relative_to(path).parts
                if any(part.startswith(".") for part in relative):
                    continue
                if candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(candidate)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {str(item)!r}")
    if not found:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return found


def check_base(meta: dict[str, Any], base: str | None, weights: str | None) -> FeatureSpec:
    """Return the head's spec, rejecting a requested base or weights that differ from it."""
    spec = FeatureSpec.from_json(meta["spec"])
    if base is not None and base != spec.base:
        raise SpecError(
            f"this head was trained on {spec.base} features, not {base}. "
            f"Drop --base, or train a head on a {base} cache."
        )
    if weights is not None:
        requested = make_spec(spec.base, weights, spec.input_size, spec.layer, spec.pooling, spec.alpha,
                              spec.resize, spec.jpeg_draft, spec.exif_transpose, spec.precision, spec.store_dtype)
        if requested.weights_digest != spec.weights_digest:
            raise SpecError(
                f"weights {weights!r} differ from the weights this head was trained on "
                f"(sha256 {spec.weights_digest[:12]}). Pass the same weights file."
            )
    return spec


def head_weights_path(spec: FeatureSpec, weights: str | None = None) -> str | None:
    """Return the weights file to run the head's conv base with, or None for random weights.

    ``weights`` overrides where the head's own weights label points, which matters once
    that file has moved. The file must hash to the head's ``weights_digest``.

    Raises
    ------
    SpecError
        When the file is missing or contains other weights than the head was trained on.
    """
    if spec.weights_digest == "none":
        return None
    if weights is None and spec.weights not in ("imagenet", "none") and not Path(spec.weights).is_file():
        raise SpecError(
            f"the weights file this head was trained on is missing: {spec.weights!r}. "
            f"Pass --weights PATH to a copy of that file (sha256 {spec.weights_digest[:12]}...)."
        )
    source = weights if weights is not None else spec.weights
    path = resolve_weights(spec.base, source, spec.alpha, spec.input_size)
    if path is None or sha256_file(path) != spec.weights_digest:
        raise SpecError(
            f"weights {source!r} differ from the weights this head was trained on "
            f"(sha256 {spec.weights_digest[:12]}...). Pass --weights PATH to a copy of the original file."
        )
    return path


def predict_images(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    base: str | None = None,
    weights: str | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Return one ``{path, class, probability}`` record per image (or ``error`` where it failed)."""
    head, meta = load_head(model_path)
    spec = check_base(meta, base, weights)
    classes = meta["classes"]
    paths = collect_images(inputs)
    digests = [file_digest(p) for p in paths]

    features: dict[int, np.ndarray] = {}
    cache = Path(meta.get("cache", ""))
    if cache.is_file():
        with CacheSnapshot(cache, expected_digest=spec.digest) as snapshot:
            row_of = {d: i for i, (d, v) in enumerate(zip(snapshot.columns.digest, snapshot.columns.view, strict=True))
                      if v == 0}
            hits = [(k, row_of[d]) for k, d in enumerate(digests) if d in row_of]
            if hits:
                rows = snapshot.read_features([r for _, r in hits])
                for (k, _), row in zip(hits, rows, strict=True):
                    features[k] = row
    logger.info("%d of %d images found in the cache", len(features), len(paths))

    errors: dict[int, str] = {}
    missing = [k for k in range(len(paths)) if k not in features]
    if missing:
        from pipeline.extractor import FeatureExtractor

        extractor = FeatureExtractor(spec, weights_path=head_weights_path(spec, weights))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            images, kept = [], []
            for k in chunk:
                try:
                    images.append(load_image(paths[k], spec.input_size, resize=spec.resize, draft=spec.jpeg_draft,
                                             exif_transpose=spec.exif_transpose))
                    kept.append(k)
                except ImageDecodeError as error:
                    errors[k] = error.reason
            if images:
                for k, row in zip(kept, extractor(np.stack(images)), strict=True):
                    features[k] = row

    results: list[dict[str, Any]] = []
    ready = [k for k in range(len(paths)) if k in features]
    proba = head.predict_proba(np.stack([features[k] for k in ready])) if ready else np.zeros((0, len(classes)))
    by_index = dict(zip(ready, proba, strict=True))
    for k, path in enumerate(paths):
        if k in errors:
            results.append({"path": str(path), "error": errors[k]})
            continue
        p = by_index[k]
        best = int(np.argmax(p))
        results.append({"path": str(path), "class": classes[best], "probability": float(p[best]),
                        "cached": k not in missing})
    return results


__all__ = ["HeadError", "collect_images", "head_weights_path", "predict_images"]

"""Cached augmentation: seeded augmented views of train images, stored beside the originals.

A view is one random flip, rotation, zoom and crop of an image, drawn from a generator
seeded with (recipe seed, image digest, view index). The same recipe therefore gives
the same view of the same bytes in every run, so views are computed once and reused
like original features. Views are rows with ``view = 1..K`` in the cache file of the
feature spec, and the recipe that made them is the file attribute ``augmentation``.
K is not part of the recipe: raising K from 2 to 5 keeps views 1-2 and adds 3-5.

A run that requests another recipe than the stored one raises :class:`AugmentError`,
unless it passes ``replace=True``, which drops every stored view and computes new ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.compact import BLOCK_ROWS, RESERVED_ATTRS, compact
from pipeline.compute import Failure, ProgressCallback, WorkItem, compute_rows, decode_original
from pipeline.extract import (
    ExtractPlan,
    check_cache_dir,
    plan_extraction,
    publish_cache,
    remove_stale_temporaries,
    scan_attrs,
)
from pipeline.images import Manifest, scan_tree
from pipeline.locking import CacheLock
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec
from pipeline.store import Rows, list_segments, read_header, write_table

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
RECIPE_ATTR = "augmentation"
MAX_ROTATION = 180.0
MAX_ZOOM = 0.5
MAX_CROP = 0.5



class AugmentError(ValueError):
    """Raised for an invalid recipe or view count, or a cache whose views used another recipe."""


@dataclass(frozen=True)
class AugmentRecipe:
    """Random transform of one view, and the seed that makes it reproducible.

    Defaults are close to the classic Keras cats-vs-dogs recipe (horizontal flip,
    rotation, zoom 0.2, shifts), with the rotation and shift ranges halved.

    Attributes
    ----------
    flip : bool
        Mirror left-right with probability 0.5.
    rotation : float
        Largest rotation in degrees; the angle is uniform in ``[-rotation, rotation]``.
    zoom : float
        Scale factor uniform in ``[1 - zoom, 1 + zoom]``; above 1 zooms in.
    crop : float
        Largest shift of the crop window's centre, as a fraction of the image side,
        drawn independently for x and y.
    seed : int
        Recipe seed, combined with the image digest and view index.
    version : int
        Version of the transform code; a new version makes new views.
    """

    flip: bool = True
    rotation: float = 20.0
    zoom: float = 0.2
    crop: float = 0.1
    seed: int = 0
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        checks = (
            ("rotation", self.rotation, 0.0, MAX_ROTATION),
            ("zoom", self.zoom, 0.0, MAX_ZOOM),
            ("crop", self.crop, 0.0, MAX_CROP),
        )
        for name, value, low, high in checks:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise AugmentError(f"invalid augmentation {name} {value!r}; use a number from {low:g} to {high:g}")
        if not isinstance(self.flip, bool):
            raise AugmentError(f"invalid augmentation flip {self.flip!r}; use true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise AugmentError(f"invalid augmentation seed {self.seed!r}; use an integer of 0 or more")
        if self.version != RECIPE_VERSION:
            raise AugmentError(
                f"augmentation recipe version {self.version!r} is not supported; this convcache makes version "
                f"{RECIPE_VERSION}. Upgrade convcache, or pass --replace-views to compute version "
                f"{RECIPE_VERSION} views."
            )
        # Store ranges as floats, so a recipe given as 20 and one given as 20.0 serialise alike.
        for name in ("rotation", "zoom", "crop"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_json(self) -> str:
        """Serialise the recipe as sorted JSON, as stored in the cache attribute."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AugmentRecipe:
        """Rebuild a recipe written by :meth:`to_json`.

        Raises
        ------
        AugmentError
            For text that is not a recipe, or a recipe of an unsupported version.
        """
        try:
            data = json.loads(text)
        except ValueError as error:
            raise AugmentError(f"augmentation recipe is not valid JSON: {text[:80]!r}") from error
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise AugmentError(f"augmentation recipe has unknown fields: {text[:80]!r}")
        return cls(**data)


def view_rng(recipe: AugmentRecipe, digest: str, view: int) -> np.random.Generator:
    """Return the generator of one view, seeded with (recipe seed, view index, image digest)."""
    if view < 1:
        raise ValueError(f"view index must be 1 or more (0 is the original image), got {view}")
    return np.random.default_rng(np.random.SeedSequence([recipe.seed, view, int(digest, 16)]))


def _affine_coefficients(size: int, flip: bool, angle: float, scale: float, shift: np.ndarray) -> np.ndarray:
    """Return Pillow AFFINE coefficients that map an output point to its source point.

    Pillow samples the source at ``(a x + b y + c, d x + e y + f)`` for the output pixel
    centre ``(x, y)``. The output centre maps to the source centre plus ``shift``; around
    it the output is rotated by ``angle`` and magnified by ``scale``. A flip mirrors the
    source image left-right first.
    """
    centre = size / 2.0
    cos, sin = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
    a, b, d, e = cos, -sin, sin, cos
    c = centre + shift[0] - (a + b) * centre
    f = centre + shift[1] - (d + e) * centre
    if flip:
        a, b, c = -a, -b, size - c
    return np.array([a, b, c, d, e, f])


def augment_image(image: np.ndarray, recipe: AugmentRecipe, digest: str, view: int) -> np.ndarray:
    """Return view ``view`` of a square uint8 RGB image, reproducibly.

    The generator draws, in this order, the flip, angle, scale and the x and y shift, so
    a view depends only on the recipe, the image digest and the view index. Points that
    fall outside the image read its mirror image across the nearest edge, like the
    ``fill_mode="reflect"`` of the Keras preprocessing layers. Pixels are resampled
    bilinearly, once.

    Parameters
    ----------
    image : numpy.ndarray
        ``(size, size, 3)`` uint8 image as :func:`pipeline.images.load_image` returns it.
    recipe : AugmentRecipe
        Ranges of the random transform and its seed.
    digest : str
        Hex content digest of the image file (:func:`pipeline.images.file_digest`).
    view : int
        View index, 1 or more.
    """
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a square (size, size, 3) uint8 image, got {image.dtype} {image.shape}")
    rng = view_rng(recipe, digest, view)
    flip = bool(rng.random() < 0.5) and recipe.flip
    angle = float(rng.uniform(-recipe.rotation, recipe.rotation))
    scale = float(rng.uniform(1.0 - recipe.zoom, 1.0 + recipe.zoom))
    size = image.shape[0]
    shift = rng.uniform(-recipe.crop, recipe.crop, size=2) * size
    coefficients = _affine_coefficients(size, flip, angle, scale, shift)

    # Pad by reflection far enough that every source point of the output lies inside.
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float)
    source = corners @ coefficients.reshape(2, 3).T
    pad = int(math.ceil(max(0.0, -source.min(), source.max() - size))) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    coefficients[2] += pad
    coefficients[5] += pad
    out = Image.fromarray(padded).transform(
        (size, size), Image.Transform.AFFINE, tuple(coefficients), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(out)


class ViewDecoder:
    """Decode function for :func:`pipeline.compute.compute_rows` that returns augmented views.

    It decodes the image as the spec says (like the original row), then applies
    :func:`augment_image` with the work item's digest and view index.
    """

    def __init__(self, recipe: AugmentRecipe) -> None:
        self.recipe = recipe

    def __call__(self, item: WorkItem, spec: FeatureSpec) -> np.ndarray:
        """Return the augmented uint8 view of ``item``."""
        return augment_image(decode_original(item, spec), self.recipe, item.digest, item.view)


def stored_recipe(cache_path: str | os.PathLike[str]) -> AugmentRecipe | None:
    """Return the recipe recorded in a cache file, or None where it records none."""
    text = read_header(cache_path).attrs.get(RECIPE_ATTR)
    return None if text is None else AugmentRecipe.from_json(str(text))


def check_recipe(cache_path: str | os.PathLike[str], recipe: AugmentRecipe, replace: bool = False) -> int:
    """Return the number of stored views, raising unless they were made with ``recipe`` or ``replace`` is set.

    Reads the committed file and segments without a lock, so a command can reject a
    mismatch before it starts a flow; :func:`extract_views` checks again under the lock.
    """
    with CacheSnapshot(cache_path) as snapshot:
        count = int((snapshot.columns.view > 0).sum())
        text = snapshot.attrs.get(RECIPE_ATTR)
    stored = None if text is None else AugmentRecipe.from_json(str(text))
    if count and stored != recipe and not replace:
        raise _recipe_mismatch(Path(cache_path), count, stored, recipe)
    return count


def _recipe_mismatch(cache_path: Path, count: int, stored: AugmentRecipe | None, recipe: AugmentRecipe) -> AugmentError:
    return AugmentError(
        f"{cache_path} contains {count} views made with augmentation recipe "
        f"{stored.to_json() if stored else '(not recorded)'}, not the requested {recipe.to_json()}. "
        "Either pass the same augmentation options, or pass --replace-views to drop the stored views "
        "and compute new ones."
    )


@dataclass
class ViewsSummary:
    """Outcome of one :func:`extract_views` run."""

    cache: str
    views: int
    recipe: dict[str, Any]
    images: int
    computed: int
    reused: int
    dropped: int
    failed: list[dict[str, str]]
    seconds: float
    views_per_second: float
    rows: int
    file_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON-serialisable data."""
        return asdict(self)


def extract_views(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    spec: FeatureSpec,
    views: int,
    recipe: AugmentRecipe | None = None,
    replace: bool = False,
    batch_size: int = 32,
    commit_rows: int = 512,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
    decode_workers: int | None = None,
    progress: ProgressCallback | None = None,
    extractor_factory: Callable[[FeatureSpec], Callable[[np.ndarray], np.ndarray]] | None = None,
) -> ViewsSummary:
    """Add augmented views 1..``views`` of every train image to the spec's cache.

    Run :func:`pipeline.extract.extract_features` first: every image must already have
    its original row. Only (image, view) pairs that the cache lacks are computed, so a
    second run reuses the stored views, and new images get theirs. Images of the
    ``validation`` and ``test`` splits get no views. In a tree without split folders
    every image gets views, because the train part is only cut when a head is trained.

    Parameters
    ----------
    views : int
        Number of views per train image, 1 or more. Stored views above this number are kept.
    recipe : AugmentRecipe, optional
        The transform; defaults to ``AugmentRecipe()``.
    replace : bool
        Drop stored views made with another recipe and compute new ones, instead of
        raising :class:`AugmentError`.

    Raises
    ------
    AugmentError
        For a view count below 1, images without an original row, or stored views of
        another recipe (without ``replace``).
    """
    started = time.perf_counter()
    recipe = recipe or AugmentRecipe()
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise AugmentError(f"invalid number of views {views!r}; pass 1 or more")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    manifest = scan_tree(data_dir)
    check_cache_dir(cache_dir)
    cache_path = cache_dir / spec.cache_name
    if not cache_path.exists() and not list_segments(cache_path):
        raise AugmentError(f"no cache of this feature spec at {cache_path}. Run 'convcache extract' first.")

    with CacheLock(cache_path, timeout=lock_timeout, enabled=use_lock):
        remove_stale_temporaries(cache_path)
        with CacheSnapshot(cache_path, expected_digest=spec.digest) as snapshot:
            plan = plan_extraction(manifest, snapshot)
            columns = snapshot.columns
            existing = {(d, int(v)) for d, v in zip(columns.digest, columns.view, strict=True) if v > 0}
            stored_text = snapshot.attrs.get(RECIPE_ATTR)
            pending = bool(snapshot.segment_paths)  # rows a killed run committed but did not compact
        if plan.todo:
            raise AugmentError(
                f"{len(plan.todo)} images under {data_dir} have no cached features yet (first: {plan.todo[0].path}). "
                "Run 'convcache extract' with the same feature options first."
            )
        stored = AugmentRecipe.from_json(str(stored_text)) if stored_text is not None else None
        dropped = 0
        if existing and stored != recipe:
            if not replace:
                raise _recipe_mismatch(cache_path, len(existing), stored, recipe)
            dropped = _drop_views(cache_path, spec, manifest, plan, recipe)
            existing = set()
        elif stored != recipe:
            _publish(cache_path, spec, manifest, plan, recipe)

        work = _missing_views(manifest, plan, existing, views)
        targets = len({item.digest for item in work}) if work else 0
        failures: list[Failure] = []
        computed = 0
        if work:
            if extractor_factory is None:
                from pipeline.extractor import FeatureExtractor

                extractor_factory = FeatureExtractor
            logger.info("%s: computing %d views of %d images", cache_path.name, len(work), targets)
            failures, computed, _ = compute_rows(
                cache_path, spec, manifest.classes, work, extractor_factory(spec), batch_size=batch_size,
                commit_rows=commit_rows, decode_workers=decode_workers, progress=progress, decode=ViewDecoder(recipe),
            )
        if work or dropped or pending:
            rows = _publish(cache_path, spec, manifest, plan, recipe)
        else:
            rows = _row_count(cache_path)

    seconds = time.perf_counter() - started
    train_digests = {e.digest for e in plan.index if e.split in ("train", "")}
    reused = sum(1 for digest, view in existing if digest in train_digests and view <= views)
    return ViewsSummary(
        cache=str(cache_path),
        views=views,
        recipe=asdict(recipe),
        images=len(train_digests),
        computed=computed,
        reused=reused,
        dropped=dropped,
        failed=[{"path": f.path, "reason": f.reason} for f in failures],
        seconds=round(seconds, 3),
        views_per_second=round(computed / seconds, 2) if seconds > 0 else 0.0,
        rows=rows,
        file_bytes=cache_path.stat().st_size,
    )


def _missing_views(manifest: Manifest, plan: ExtractPlan, existing: set[tuple[str, int]], views: int) -> list[WorkItem]:
    """List the (image, view) pairs of train images that the cache lacks, one per digest."""
    entry_of = {entry.path: entry for entry in manifest.entries}
    work: list[WorkItem] = []
    seen: set[str] = set()
    for item in plan.index:
        if item.split not in ("train", "") or item.digest in seen:
            continue
        seen.add(item.digest)
        for view in range(1, views + 1):
            if (item.digest, view) not in existing:
                work.append(WorkItem(entry_of[item.path], item.digest, view))
    return work


def _row_count(cache_path: Path) -> int:
    return read_header(cache_path).n_rows


def _publish(cache_path: Path, spec: FeatureSpec, manifest: Manifest, plan: ExtractPlan, recipe: AugmentRecipe) -> int:
    """Compact the cache (views included) and record ``recipe``; call only while holding the lock."""
    attrs = scan_attrs(manifest, plan.failures, plan.conflicts)
    attrs[RECIPE_ATTR] = recipe.to_json()
    with CacheSnapshot(cache_path, expected_digest=spec.digest) as snapshot:
        return compact(cache_path, spec, snapshot, plan.index, manifest.classes, attrs)


def _drop_views(cache_path: Path, spec: FeatureSpec, manifest: Manifest, plan: ExtractPlan,
                recipe: AugmentRecipe) -> int:
    """Rewrite the cache without view rows, recording ``recipe``; returns the number of rows dropped.

    A normal compaction runs first, so the file contains every committed row and no pending
    segment is left; then the original rows are copied into the new file.
    """
    publish_cache(cache_path, spec, manifest, plan.index, plan.failures, plan.conflicts)
    with CacheSnapshot(cache_path, expected_digest=spec.digest) as snapshot:
        cols = snapshot.columns
        keep = np.flatnonzero(cols.view == 0)
        # absorbed_segments is copied as it is: it may still list segments that publish_cache could not delete.
        attrs = {key: value for key, value in snapshot.attrs.items() if key not in RESERVED_ATTRS}
        attrs[RECIPE_ATTR] = recipe.to_json()

        def blocks() -> Iterator[Rows]:
            for start in range(0, len(keep), BLOCK_ROWS):
                rows = keep[start : start + BLOCK_ROWS]
                yield Rows(
                    features=snapshot.read_features(rows, dtype=spec.store_dtype),
                    digest=[cols.digest[r] for r in rows],
                    path=[cols.path[r] for r in rows],
                    label=cols.label[rows],
                    split=[cols.split[r] for r in rows],
                    size=cols.size[rows],
                    mtime_ns=cols.mtime_ns[rows],
                    view=cols.view[rows],
                    present=cols.present[rows],
                )

        write_table(cache_path, spec, snapshot.classes, blocks(), len(keep), snapshot.feature_shape, attrs)
        dropped = len(cols) - len(keep)
    logger.info("dropped %d views of another recipe from %s", dropped, cache_path)
    return dropped

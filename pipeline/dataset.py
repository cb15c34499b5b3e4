"""Load cached features by split, ready for a classifier head, without building a conv base."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.snapshot import CacheSnapshot
from pipeline.spec import FeatureSpec

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test")


@dataclass
class SplitData:
    """Features, labels and identities of one split, aligned by row."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    digests: list[str]
    views: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CachedDataset:
    """The splits of one cache as a head sees them."""

    cache_path: Path
    spec: FeatureSpec
    classes: list[str]
    splits: dict[str, SplitData]
    data_root: str
    derived_splits: bool  # True when validation/test were cut from an unsplit tree


class DatasetError(ValueError):
    """Raised when a cache contains too few usable rows to train and evaluate a head."""


def _rows(snapshot: CacheSnapshot, indices: np.ndarray) -> SplitData:
    cols = snapshot.columns
    return SplitData(
        features=snapshot.read_features(indices),
        labels=cols.label[indices].astype(np.int64),
        paths=[cols.path[i] for i in indices],
        digests=[cols.digest[i] for i in indices],
        views=cols.view[indices],
    )


def plan_splits(
    snapshot: CacheSnapshot,
    use_views: bool = False,
    random_state: int = 0,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> tuple[dict[str, np.ndarray], bool]:
    """Choose the snapshot rows of every split from the columns alone, without reading features.

    Returns the row indices per split and whether the splits were derived from a tree
    without split folders. See :func:`load_dataset` for the rules.

    Raises
    ------
    DatasetError
        When no train rows remain, the train rows cover fewer than two classes, or an
        unsplit tree has fewer than three distinct images to cut into three parts.
    """
    cols = snapshot.columns
    conflicts = {c["digest"] for c in json.loads(str(snapshot.attrs.get("conflicts", "[]")))}
    present = snapshot.select(split=None, present_only=True, views=use_views)
    keep = np.array([i for i in present if cols.digest[i] not in conflicts and cols.label[i] >= 0], np.int64)
    if len(keep) < len(present):
        logger.warning("left out %d rows whose bytes appear under several classes", len(present) - len(keep))
    derived = {cols.split[i] for i in keep} == {""}
    if derived:
        indices = _derive_splits(snapshot, keep, random_state, validation_fraction, test_fraction)
    else:
        indices = {}
        # Rows without a split only come from a tree that gained split folders during a run. They join train.
        for name in sorted({cols.split[i] or "train" for i in keep}):
            chosen = [i for i in keep if (cols.split[i] or "train") == name]
            if name != "train":
                chosen = [i for i in chosen if cols.view[i] == 0]
            indices[name] = np.array(chosen, np.int64)
    train = indices.get("train", np.zeros(0, np.int64))
    if len(train) == 0:
        raise DatasetError(
            f"{snapshot.path} contains no train rows. Add images to the train split (train/<class>/ in a tree "
            "with split folders) and run 'convcache extract' again."
        )
    train_classes = sorted({snapshot.classes[cols.label[i]] for i in train})
    if len(train_classes) < 2:
        raise DatasetError(
            f"the train rows of {snapshot.path} contain only class {train_classes[0]!r}, but a head needs at least "
            "two classes. Add images of another class to the train split and run 'convcache extract' again."
        )
    return indices, derived


def check_dataset(cache_path: str | os.PathLike[str], use_views: bool = False, random_state: int = 0) -> dict[str, int]:
    """Return the number of rows per split that :func:`load_dataset` would return, reading no features.

    Raises
    ------
    DatasetError
        For the reasons that :func:`plan_splits` lists.
    """
    with CacheSnapshot(cache_path) as snapshot:
        indices, _ = plan_splits(snapshot, use_views=use_views, random_state=random_state)
    return {name: len(rows) for name, rows in indices.items()}


def load_dataset(
    cache_path: str | os.PathLike[str],
    use_views: bool = False,
    random_state: int = 0,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> CachedDataset:
    """Load every committed, present row of a cache grouped by split.

    Rows of images that left the tree and digests filed under two classes are left out.
    Augmented views (``view > 0``) join the train split only when ``use_views``; the
    evaluation splits always hold originals only. A tree without split folders is cut
    into seeded, stratified train, validation and test parts, grouped by digest so that
    one image never lands in two parts.

    Raises
    ------
    DatasetError
        For the reasons that :func:`plan_splits` lists.
    """
    with CacheSnapshot(cache_path) as snapshot:
        indices, derived = plan_splits(snapshot, use_views, random_state, validation_fraction, test_fraction)
        splits = {name: _rows(snapshot, rows) for name, rows in indices.items()}
        spec = snapshot.spec
        classes = list(snapshot.classes)
        root = str(snapshot.attrs.get("data_root", ""))
    return CachedDataset(Path(cache_path), spec, classes, splits, root, derived)


def _derive_splits(
    snapshot: CacheSnapshot, keep: np.ndarray, random_state: int, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    cols = snapshot.columns
    originals = np.array([i for i in keep if cols.view[i] == 0], np.int64)
    # Split unique digests, not rows, so two copies of one image never land in two parts.
    _, first = np.unique([cols.digest[i] for i in originals], return_index=True)
    unique_rows = originals[np.sort(first)]
    if len(unique_rows) < 3:
        raise DatasetError(
            f"{snapshot.path} contains {len(unique_rows)} distinct usable images, too few to cut into train, "
            "validation and test parts (at least 3). Add images and run 'convcache extract' again."
        )

    # NOTE: the cut depends on the number of images, so adding one image can move others between parts.
    # Metrics of heads trained before and after the change are therefore not comparable.
    labels = cols.label[unique_rows]
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 3 else None
    train_rows, rest_rows = train_test_split(
        unique_rows, test_size=validation_fraction + test_fraction, random_state=random_state, stratify=stratify
    )
    rest_labels = cols.label[rest_rows]
    rest_counts = np.bincount(rest_labels)
    stratify_rest = rest_labels if stratify is not None and rest_counts[rest_counts > 0].min() >= 2 else None
    val_rows, test_rows = train_test_split(
        rest_rows,
        test_size=test_fraction / (validation_fraction + test_fraction),
        random_state=random_state,
        stratify=stratify_rest,
    )

    part_of = {cols.digest[i]: name for name, rows in (("train", train_rows), ("validation", val_rows),
                                                       ("test", test_rows)) for i in rows}
    parts = {
        name: np.array([i for i in originals if part_of[cols.digest[i]] == name], np.int64)
        for name in ("train", "validation", "test")
    }
    train_digests = {cols.digest[i] for i in parts["train"]}
    views = np.array([i for i in keep if cols.view[i] > 0 and cols.digest[i] in train_digests], np.int64)
    parts["train"] = np.sort(np.concatenate([parts["train"], views]))
    return parts

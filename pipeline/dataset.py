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


def _rows(snapshot: CacheSnapshot, indices: np.ndarray) -> SplitData:
    cols = snapshot.columns
    return SplitData(
        features=snapshot.read_features(indices),
        labels=cols.label[indices].astype(np.int64),
        paths=[cols.path[i] for i in indices],
        digests=[cols.digest[i] for i in indices],
        views=cols.view[indices],
    )


def _subset(data: SplitData, keep: np.ndarray) -> SplitData:
    return SplitData(
        features=data.features[keep],
        labels=data.labels[keep],
        paths=[data.paths[i] for i in keep],
        digests=[data.digests[i] for i in keep],
        views=data.views[keep],
    )


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
    """
    with CacheSnapshot(cache_path) as snapshot:
        conflicts = {c["digest"] for c in json.loads(str(snapshot.attrs.get("conflicts", "[]")))}
        present = snapshot.select(split=None, present_only=True, views=use_views)
        cols = snapshot.columns
        keep = np.array([i for i in present if cols.digest[i] not in conflicts and cols.label[i] >= 0], np.int64)
        if len(keep) < len(present):
            logger.warning("left out %d rows whose bytes appear under several classes", len(present) - len(keep))
        split_names = sorted({cols.split[i] for i in keep})
        splits: dict[str, SplitData] = {}
        derived = split_names == [""]
        if derived:
            splits = _derive_splits(_rows(snapshot, keep), random_state, validation_fraction, test_fraction)
        else:
            for name in split_names:
                chosen = np.array([i for i in keep if cols.split[i] == name], np.int64)
                if name != "train":
                    chosen = np.array([i for i in chosen if cols.view[i] == 0], np.int64)
                splits[name or "train"] = _rows(snapshot, chosen)
        spec = snapshot.spec
        classes = list(snapshot.classes)
        root = str(snapshot.attrs.get("data_root", ""))
    if "train" not in splits or len(splits["train"]) == 0:
        raise ValueError(f"{cache_path} holds no train rows; run 'convcache extract' on a tree with a train split")
    return CachedDataset(Path(cache_path), spec, classes, splits, root, derived)


def _derive_splits(
    data: SplitData, random_state: int, validation_fraction: float, test_fraction: float
) -> dict[str, SplitData]:
    originals = np.flatnonzero(data.views == 0)
    # Split unique digests, not rows, so two copies of one image never land in two parts.
    _, first = np.unique([data.digests[i] for i in originals], return_index=True)
    unique_rows = originals[np.sort(first)]
    labels = data.labels[unique_rows]
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 3 else None
    train_rows, rest_rows = train_test_split(
        unique_rows, test_size=validation_fraction + test_fraction, random_state=random_state, stratify=stratify
    )
    rest_labels = data.labels[rest_rows]
    rest_counts = np.bincount(rest_labels)
    stratify_rest = rest_labels if stratify is not None and rest_counts[rest_counts > 0].min() >= 2 else None
    val_rows, test_rows = train_test_split(
        rest_rows,
        test_size=test_fraction / (validation_fraction + test_fraction),
        random_state=random_state,
        stratify=stratify_rest,
    )
    part_of = {data.digests[i]: name for name, rows in (("train", train_rows), ("validation", val_rows),
                                                         ("test", test_rows)) for i in rows}
    train_idx = np.array([i for i in originals if part_of[data.digests[i]] == "train"], np.int64)
    val_idx = np.array([i for i in originals if part_of[data.digests[i]] == "validation"], np.int64)
    test_idx = np.array([i for i in originals if part_of[data.digests[i]] == "test"], np.int64)
    train_digests = {data.digests[i] for i in train_idx}
    views = np.array([i for i in np.flatnonzero(data.views > 0) if data.digests[i] in train_digests], np.int64)
    return {
        "train": _subset(data, np.sort(np.concatenate([train_idx, views]).astype(np.int64))),
        "validation": _subset(data, np.sort(val_idx)),
        "test": _subset(data, np.sort(test_idx)),
    }

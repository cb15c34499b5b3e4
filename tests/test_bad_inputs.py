"""Extraction over a tree of every bad or unusual input: each ends in a row or a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from image_fixtures import BOMB_PIXEL_LIMIT, make_bad_input_tree
from pipeline.extract import extract_features
from pipeline.images import file_digest
from pipeline.snapshot import CacheSnapshot
from pipeline.spec import make_spec


def test_bad_input_tree_extracts_completely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_PIXEL_LIMIT)
    outcomes = make_bad_input_tree(tmp_path / "tree")
    spec = make_spec("mobilenet", "none", input_size=96, alpha=0.25)

    summary = extract_features(tmp_path / "tree", tmp_path / "cache", spec, batch_size=4)

    failed = {f["path"]: f["reason"] for f in summary.failed}
    with CacheSnapshot(summary.cache) as snapshot:
        stored = {snapshot.columns.path[i] for i in snapshot.select()}
    for path, outcome in outcomes.items():
        if outcome == "decoded":
            assert path in stored, f"{path} should have a row"
        elif outcome.startswith(("error: ", "skipped: ")):
            reason = outcome.split(": ", 1)[1]
            assert path in failed, f"{path} should be in the failed list"
            assert failed[path].startswith(reason), f"{path}: {failed[path]!r} does not start with {reason!r}"
        else:
            assert path not in stored and path not in failed, f"{path} should be ignored"

    decoded = [path for path, outcome in outcomes.items() if outcome == "decoded"]
    # A symlink and its target share bytes, so they share one computed row's features.
    unique_digests = {file_digest(tmp_path / "tree" / path) for path in decoded}
    assert summary.rows == len(decoded)
    assert summary.computed == len(unique_digests)
    assert len(summary.failed) == sum(1 for o in outcomes.values() if o.startswith(("error: ", "skipped: ")))
    assert any("empty_class" in warning for warning in summary.warnings)
    assert "empty_class" not in summary.classes


def test_bad_input_tree_rerun_computes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_PIXEL_LIMIT)
    make_bad_input_tree(tmp_path / "tree")
    spec = make_spec("mobilenet", "none", input_size=96, alpha=0.25)
    first = extract_features(tmp_path / "tree", tmp_path / "cache", spec, batch_size=4)

    def no_model(_spec: object) -> None:
        raise AssertionError("the conv base must not be built when nothing is new")

    second = extract_features(tmp_path / "tree", tmp_path / "cache", spec, extractor_factory=no_model)
    assert second.computed == 0
    assert second.failed == first.failed

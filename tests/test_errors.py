"""Bad inputs found by trying the tool as a new user: each fails early with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from pipeline.bases import WeightsMismatchError
from pipeline.extract import extract_features
from pipeline.heads import HeadError, load_head, make_head, save_head
from pipeline.maintenance import PruneError, prune_cache
from pipeline.spec import MAX_INPUT_SIZE, SpecError, make_spec

from conftest import copy_subset


def test_weights_of_other_base_rejected(mobilenet_025_weights: Path) -> None:
    from pipeline.extractor import FeatureExtractor

    spec = make_spec("mobilenet_v2", str(mobilenet_025_weights), input_size=96)
    with pytest.raises(WeightsMismatchError, match="does not fit mobilenet_v2"):
        FeatureExtractor(spec)


def test_input_size_above_limit_rejected() -> None:
    with pytest.raises(SpecError, match=f"larger than {MAX_INPUT_SIZE}"):
        make_spec("vgg16", "none", input_size=MAX_INPUT_SIZE + 1)


@pytest.mark.parametrize("text", ["{not json", "{}", '{"kind": "sklearn"}'])
def test_malformed_head_json_rejected(tmp_path: Path, text: str) -> None:
    (tmp_path / "head.json").write_text(text)
    with pytest.raises(HeadError, match="not a valid head description"):
        load_head(tmp_path)


def test_save_head_replaces_folder(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(40, 4))
    y = (X[:, 0] > 0).astype(int)
    folder = tmp_path / "models" / "head"
    for C in (0.1, 10.0):
        head = make_head("logreg", 2, C=C).fit(X, y)
        save_head(head, folder, {"spec": "{}", "classes": ["a", "b"]})
    _, meta = load_head(folder)
    assert meta["params"]["C"] == 10.0
    assert sorted(p.name for p in folder.parent.iterdir()) == ["head"]


def test_all_images_failed_writes_empty_cache(tmp_path: Path) -> None:
    for name in ("cats", "dogs"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        (tmp_path / "tree" / name / "broken.jpg").write_bytes(b"not an image")
    spec = make_spec("mobilenet", "none", input_size=96, alpha=0.25)
    summary = extract_features(tmp_path / "tree", tmp_path / "cache", spec)
    assert summary.computed == 0
    assert len(summary.failed) == 2
    assert Path(summary.cache).is_file()


def test_prune_of_other_folder_rejected(
    cats_vs_dogs: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    tree = copy_subset(cats_vs_dogs, tmp_path / "tree", {"train": 4})
    other = tmp_path / "other" / "train"
    for class_dir in sorted((tree / "train").iterdir()):
        (other / class_dir.name).mkdir(parents=True)
        first = sorted(class_dir.iterdir())[0]
        shutil.copy2(first, other / class_dir.name / first.name)
    spec = make_spec("mobilenet", str(mobilenet_025_weights), input_size=96, alpha=0.25)
    cache = Path(extract_features(tree, tmp_path / "cache", spec).cache)
    before = cache.read_bytes()

    with pytest.raises(PruneError, match="--force"):
        prune_cache(cache, tmp_path / "other")
    assert cache.read_bytes() == before

    result = prune_cache(cache, tmp_path / "other", force=True)
    assert result["rows_after"] == 2


def test_predict_exits_nonzero_when_all_fail(
    mobilenet_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], prefect_api: None
) -> None:
    from pipeline.training import train_head

    model = train_head(mobilenet_cache, "logreg", tmp_path / "models")["model_path"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff truncated")
    code = main(["predict", model, str(broken), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)[0]["error"]
    assert "no image could be classified" in captured.err


def test_extract_bad_dask_workers_rejected(photo_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["extract", str(photo_subset), "--cache-dir", str(tmp_path / "cache"), "--base", "mobilenet",
                 "--alpha", "0.25", "--weights", "none", "--input-size", "96",
                 "--task-runner", "dask", "--dask-workers", "0"])
    assert code == 1
    assert "--dask-workers must be at least 1, got 0" in capsys.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == []

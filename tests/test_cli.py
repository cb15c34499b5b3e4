"""The convcache command line: every bad input fails with one line and writes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest

from flows.cli import main
from pipeline.extract import extract_features
from pipeline.spec import FeatureSpec, make_spec
from pipeline.training import train_head
from pipeline.versions import library_versions

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = 96
PER_CLASS = 4


def spec_options(weights: Path | str) -> list[str]:
    """Command-line options of the tiny MobileNet 0.25 spec used throughout this module."""
    return ["--base", "mobilenet", "--alpha", "0.25", "--input-size", str(INPUT_SIZE), "--weights", str(weights)]


def extract_argv(data_dir: Path, cache_dir: Path, weights: Path | str) -> list[str]:
    """Return the arguments of ``convcache extract`` with the tiny MobileNet 0.25 spec."""
    return ["extract", str(data_dir), "--cache-dir", str(cache_dir), *spec_options(weights)]


def folder_state(folder: Path) -> dict[str, tuple[str, int]] | None:
    """Return ``relative path -> (sha256, mtime_ns)`` of everything under ``folder``, or None if it is missing."""
    if not folder.exists():
        return None
    state = {}
    for path in sorted(folder.rglob("*")):
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        state[path.relative_to(folder).as_posix()] = (content, path.stat().st_mtime_ns)
    return state


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, check that it failed with exactly one error line, and return that line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()

    assert code == 1, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("convcache: error: ")
    assert captured.out == ""
    return lines[0]


def run_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, check that it succeeded, and return its standard output."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def cli_tree(photo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat tree of real photos plus one truncated JPEG. Tests must not modify it."""
    root = tmp_path_factory.mktemp("cli_tree") / "photos"
    for class_name in ("cats", "dogs"):
        (root / class_name).mkdir(parents=True)
        for photo in sorted((photo_subset / "train" / class_name).iterdir())[:PER_CLASS]:
            shutil.copy2(photo, root / class_name / photo.name)
    first = sorted((root / "cats").iterdir())[0]
    (root / "cats" / "truncated.jpg").write_bytes(first.read_bytes()[:1500])
    return root


@pytest.fixture(scope="module")
def cli_spec(mobilenet_025_weights: Path) -> FeatureSpec:
    """The spec that :func:`spec_options` names."""
    return make_spec("mobilenet", str(mobilenet_025_weights), INPUT_SIZE, alpha=0.25)


@pytest.fixture(scope="module")
def cli_cache(cli_tree: Path, cli_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of :func:`cli_tree` under :func:`cli_spec`. Copy it before changing it."""
    summary = extract_features(cli_tree, tmp_path_factory.mktemp("cli_cache"), cli_spec)
    assert summary.computed == 2 * PER_CLASS
    return Path(summary.cache)


@pytest.fixture(scope="module")
def mobilenet_v2_model(mobilenet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logreg head trained on the MobileNetV2 cache."""
    return Path(train_head(mobilenet_cache, "logreg", tmp_path_factory.mktemp("v2_models"))["model_path"])


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """An empty folder that the current user cannot write, root included where possible."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # Root ignores permission bits, but not the immutable flag of ext4 and similar file systems.
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i, so no folder is read-only for root")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


# --------------------------------------------------------------------------- data folder


def test_extract_missing_data_folder(
    mobilenet_025_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such_folder"
    cache_dir = tmp_path / "cache"

    message = run_failing(extract_argv(missing, cache_dir, mobilenet_025_weights), capsys)

    assert "data folder not found" in message
    assert str(missing) in message
    assert not cache_dir.exists()


def test_extract_empty_data_folder(
    mobilenet_025_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cache_dir = tmp_path / "cache"

    message = run_failing(extract_argv(empty, cache_dir, mobilenet_025_weights), capsys)

    assert "data folder is empty" in message
    assert str(empty) in message
    assert not cache_dir.exists()


def test_extract_one_class_folder(
    mobilenet_025_weights: Path, cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "photos"
    shutil.copytree(cli_tree / "cats", tree / "cats")
    cache_dir = tmp_path / "cache"

    message = run_failing(extract_argv(tree, cache_dir, mobilenet_025_weights), capsys)

    assert "only one class ('cats')" in message
    assert str(tree) in message
    assert not cache_dir.exists()


# --------------------------------------------------------------------------- spec options


def test_extract_unknown_base(cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_dir = tmp_path / "cache"

    message = run_failing(["extract", str(cli_tree), "--cache-dir", str(cache_dir), "--base", "resnet9"], capsys)

    assert "'resnet9'" in message
    assert "mobilenet_v2" in message
    assert not cache_dir.exists()


def test_extract_weights_not_hdf5(cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights.h5"
    weights.write_text("not weights\n")
    cache_dir = tmp_path / "cache"

    message = run_failing(extract_argv(cli_tree, cache_dir, weights), capsys)

    assert "not an HDF5 file" in message
    assert str(weights) in message
    assert not cache_dir.exists()


def test_extract_weights_missing(cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "missing.h5"
    cache_dir = tmp_path / "cache"

    message = run_failing(extract_argv(cli_tree, cache_dir, weights), capsys)

    assert "weights file not found" in message
    assert str(weights) in message
    assert not cache_dir.exists()


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--input-size", "8", "input size 8 is too small"),
        ("--alpha", "0.3", "invalid alpha 0.3"),
        ("--resize", "sinc", "invalid resize method 'sinc'"),
        ("--batch-size", "0", "batch size 0"),
    ],
)
def test_extract_invalid_option(
    option: str, value: str, expected: str, mobilenet_025_weights: Path, cli_tree: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache_dir = tmp_path / "cache"
    argv = extract_argv(cli_tree, cache_dir, mobilenet_025_weights)

    message = run_failing([*argv, option, value], capsys)

    assert expected in message
    assert not cache_dir.exists()


def test_extract_unknown_layer(
    mobilenet_025_weights: Path, cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dir = tmp_path / "cache"
    argv = extract_argv(cli_tree, cache_dir, mobilenet_025_weights)

    message = run_failing([*argv, "--layer", "block5_pool"], capsys)

    assert "'block5_pool'" in message
    assert "conv_pw_13_relu" in message
    assert not cache_dir.exists()


# --------------------------------------------------------------------------- cache files that are not ours


def assert_cache_rejected(
    cli_tree: Path, weights: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> str:
    """Run extract into ``cache_dir`` and check that it fails and leaves every file as it was."""
    before = folder_state(cache_dir)

    message = run_failing(extract_argv(cli_tree, cache_dir, weights), capsys)

    assert folder_state(cache_dir) == before
    return message


def test_extract_cache_not_hdf5(
    cli_tree: Path, cli_spec: FeatureSpec, mobilenet_025_weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache_file = tmp_path / cli_spec.cache_name
    cache_file.write_bytes(b"my own notes, not a cache\n")

    message = assert_cache_rejected(cli_tree, mobilenet_025_weights, tmp_path, capsys)

    assert "not an HDF5 file" in message
    assert str(cache_file) in message


def test_extract_cache_hdf5_not_ours(
    cli_tree: Path, cli_spec: FeatureSpec, mobilenet_025_weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache_file = tmp_path / cli_spec.cache_name
    with h5py.File(cache_file, "w") as handle:
        handle["features"] = [[1.0, 2.0]]

    message = assert_cache_rejected(cli_tree, mobilenet_025_weights, tmp_path, capsys)

    assert "not a convcache cache" in message
    assert str(cache_file) in message


def test_extract_cache_of_other_spec(
    cli_tree: Path, cli_spec: FeatureSpec, mobilenet_025_weights: Path, mobilenet_cache: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache_file = tmp_path / cli_spec.cache_name
    shutil.copy2(mobilenet_cache, cache_file)

    message = assert_cache_rejected(cli_tree, mobilenet_025_weights, tmp_path, capsys)

    assert "belongs to feature spec" in message
    assert "mobilenet_v2" in message
    assert cli_spec.digest[:12] in message


def test_extract_cache_newer_schema(
    cli_tree: Path, cli_cache: Path, mobilenet_025_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_file = tmp_path / cli_cache.name
    shutil.copy2(cli_cache, cache_file)
    with h5py.File(cache_file, "r+") as handle:
        handle.attrs["schema_version"] = 99

    message = assert_cache_rejected(cli_tree, mobilenet_025_weights, tmp_path, capsys)

    assert "schema version 99" in message
    assert str(cache_file) in message


def test_info_newer_schema(cli_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_file = tmp_path / cli_cache.name
    shutil.copy2(cli_cache, cache_file)
    with h5py.File(cache_file, "r+") as handle:
        handle.attrs["schema_version"] = 99

    message = run_failing(["info", str(cache_file)], capsys)

    assert "schema version 99" in message


def test_train_newer_schema(cli_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_file = tmp_path / cli_cache.name
    shutil.copy2(cli_cache, cache_file)
    with h5py.File(cache_file, "r+") as handle:
        handle.attrs["schema_version"] = 99
    models_dir = tmp_path / "models"

    message = run_failing(["train", str(cache_file), "--models-dir", str(models_dir)], capsys)

    assert "schema version 99" in message
    assert not models_dir.exists()


# --------------------------------------------------------------------------- cache folder


def test_extract_cache_dir_under_file(
    cli_tree: Path, mobilenet_025_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "regular_file"
    blocker.write_text("a file where a folder should be\n")
    cache_dir = blocker / "cache"

    message = run_failing(extract_argv(cli_tree, cache_dir, mobilenet_025_weights), capsys)

    assert "cannot create cache folder" in message
    assert str(cache_dir) in message
    assert blocker.read_text() == "a file where a folder should be\n"


def test_extract_read_only_cache_dir(
    cli_tree: Path, mobilenet_025_weights: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not os.access(read_only_folder, os.W_OK)

    message = run_failing(extract_argv(cli_tree, read_only_folder, mobilenet_025_weights), capsys)

    assert "not writable" in message
    assert str(read_only_folder) in message
    assert list(read_only_folder.iterdir()) == []


def test_extract_cache_dir_in_read_only_folder(
    cli_tree: Path, mobilenet_025_weights: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dir = read_only_folder / "cache"

    message = run_failing(extract_argv(cli_tree, cache_dir, mobilenet_025_weights), capsys)

    assert "cannot create cache folder" in message
    assert str(cache_dir) in message
    assert list(read_only_folder.iterdir()) == []


# --------------------------------------------------------------------------- train, predict, info, prune


def test_train_unknown_head(cli_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models_dir = tmp_path / "models"

    message = run_failing(["train", str(cli_cache), "--head", "forest", "--models-dir", str(models_dir)], capsys)

    assert "'forest'" in message
    assert "logreg" in message
    assert not models_dir.exists()


def test_train_missing_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.h5"
    models_dir = tmp_path / "models"

    message = run_failing(["train", str(missing), "--models-dir", str(models_dir)], capsys)

    assert "cache file not found" in message
    assert str(missing) in message
    assert not models_dir.exists()


def extract_tree(layout: dict[str, int], source: Path, root: Path, spec: FeatureSpec) -> Path:
    """Build a tree of ``relative class folder -> photo count`` from ``source`` and return its cache."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        class_name = Path(folder).name
        for photo in sorted((source / class_name).iterdir())[:count]:
            shutil.copy2(photo, root / folder / photo.name)
    return Path(extract_features(root, root.parent / "cache", spec).cache)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"cats": 1, "dogs": 1}, "contains 2 distinct usable images, too few"),
        ({"train/cats": 2, "train/dogs": 0, "validation/cats": 1, "validation/dogs": 1}, "contain only class 'cats'"),
        ({"train/cats": 0, "validation/cats": 1, "validation/dogs": 1}, "contains no train rows"),
    ],
    ids=["too_few_images", "one_train_class", "no_train_rows"],
)
def test_train_unusable_cache(
    layout: dict[str, int], expected: str, cli_spec: FeatureSpec, photo_subset: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache_file = extract_tree(layout, photo_subset / "train", tmp_path / "photos", cli_spec)
    models_dir = tmp_path / "models"

    message = run_failing(["train", str(cache_file), "--models-dir", str(models_dir)], capsys)

    assert expected in message
    assert str(cache_file) in message
    assert not models_dir.exists()


def test_predict_other_base(
    mobilenet_v2_model: Path, photo_subset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = sorted((photo_subset / "test" / "cats").iterdir())[0]
    before = folder_state(mobilenet_v2_model)

    message = run_failing(["predict", str(mobilenet_v2_model), str(photo), "--base", "mobilenet"], capsys)

    assert "trained on mobilenet_v2 features, not mobilenet" in message
    assert folder_state(mobilenet_v2_model) == before


def test_predict_other_weights(
    mobilenet_v2_model: Path, mobilenet_025_weights: Path, photo_subset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = sorted((photo_subset / "test" / "cats").iterdir())[0]

    message = run_failing(
        ["predict", str(mobilenet_v2_model), str(photo), "--weights", str(mobilenet_025_weights)], capsys
    )

    assert str(mobilenet_025_weights) in message
    assert "differ from the weights" in message


def test_predict_missing_model(photo_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = sorted((photo_subset / "test" / "cats").iterdir())[0]
    missing = tmp_path / "no_model"

    message = run_failing(["predict", str(missing), str(photo)], capsys)

    assert "no trained head found" in message
    assert str(missing) in message


def test_predict_missing_image(mobilenet_v2_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_photo.jpg"

    message = run_failing(["predict", str(mobilenet_v2_model), str(missing)], capsys)

    assert "image or folder not found" in message
    assert str(missing) in message


def test_info_missing_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.h5"

    message = run_failing(["info", str(missing)], capsys)

    assert "cache file not found" in message
    assert str(missing) in message


def test_prune_missing_cache(cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.h5"

    message = run_failing(["prune", str(missing), str(cli_tree)], capsys)

    assert "cache file not found" in message
    assert str(missing) in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["info", "train", "prune"])
def test_command_rejects_non_hdf5_cache(
    command: str, cli_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_file = tmp_path / "notes.h5"
    cache_file.write_text("not a cache\n")
    argv = {
        "info": ["info", str(cache_file)],
        "train": ["train", str(cache_file), "--models-dir", str(tmp_path / "models")],
        "prune": ["prune", str(cache_file), str(cli_tree)],
    }[command]
    before = folder_state(tmp_path)

    message = run_failing(argv, capsys)

    assert "not an HDF5 file" in message
    assert str(cache_file) in message
    assert folder_state(tmp_path) == before


def test_info_json_fields(mobilenet_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = json.loads(run_ok(["info", str(mobilenet_cache), "--json"], capsys))

    assert info["spec"]["base"] == "mobilenet_v2"
    assert info["spec"]["input_size"] == 160
    assert info["rows_per_split"] == {
        "test": {"cats": 20, "dogs": 20},
        "train": {"cats": 30, "dogs": 30},
        "validation": {"cats": 15, "dogs": 15},
    }
    assert info["failed"] == 0
    assert info["file_bytes"] == mobilenet_cache.stat().st_size
    assert info["library_versions"] == library_versions()
    assert info["feature_shape"] == [1280]


def test_info_counts_failures(cli_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = json.loads(run_ok(["info", str(cli_cache), "--json"], capsys))
    human = run_ok(["info", str(cli_cache)], capsys)

    assert info["failed"] == 1
    assert info["rows_per_split"] == {"(none)": {"cats": PER_CLASS, "dogs": PER_CLASS}}
    assert "1 failed" in human
    assert "tensorflow" in human


# --------------------------------------------------------------------------- Prefect stays out of info and layers


def run_without_prefect(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``main(argv)`` in a fresh interpreter and fail there if Prefect was imported."""
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"code = main({argv!r})\n"
        "assert code == 0, code\n"
        "assert 'prefect' not in sys.modules, 'prefect was imported'\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_info_does_not_import_prefect(cli_cache: Path) -> None:
    result = run_without_prefect(["info", str(cli_cache)])

    assert result.returncode == 0, result.stderr
    assert "mobilenet" in result.stdout


def test_layers_does_not_import_prefect() -> None:
    result = run_without_prefect(["layers", "mobilenet", "--alpha", "0.25"])

    assert result.returncode == 0, result.stderr
    assert "conv_pw_13_relu" in result.stdout


# --------------------------------------------------------------------------- commands that run flows


def run_flow_command(argv: list[str]) -> Any:
    """Run a CLI command that starts a flow and return its parsed ``--json`` output.

    Only stdout is redirected. Replacing sys.stderr as capsys does would let Prefect's
    logging reconfiguration close absl's handler, and with it the stderr capture that
    pytest holds, once TensorFlow was imported earlier in the session.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    assert code == 0, argv
    return json.loads(out.getvalue())


def test_cli_extract_train_predict(
    prefect_api: None, cli_tree: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    models_dir = tmp_path / "models"
    extract = extract_argv(cli_tree, cache_dir, mobilenet_025_weights)

    first = run_flow_command(extract)
    second = run_flow_command(extract)
    trained = run_flow_command(["train", first["cache"], "--models-dir", str(models_dir)])
    photo = sorted((cli_tree / "dogs").iterdir())[0]
    predicted = run_flow_command(["predict", trained["model_path"], str(photo)])

    assert first["computed"] == 2 * PER_CLASS
    assert first["failed"] == [{"path": "cats/truncated.jpg", "reason": "truncated image data"}]
    assert second["computed"] == 0
    assert second["built_model"] is False
    assert Path(trained["model_path"]).parent == models_dir
    assert predicted == [
        {"path": str(photo), "class": predicted[0]["class"], "probability": predicted[0]["probability"],
         "cached": True}
    ]
    assert predicted[0]["class"] in ("cats", "dogs")

"""Shared fixtures: real photos, real ImageNet weights, a Prefect test API, a cached subset."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The temporary Prefect server must not try to send usage data: the test machines are offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

REPO = Path(__file__).resolve().parents[1]
# Real photos and weights live beside the repository; tests that need them skip without them.
SHARED = REPO.parent / "shared"
CATS_VS_DOGS = SHARED / "data" / "cats_vs_dogs"
MODELS = SHARED / "models"
MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MOBILENET_025_FILE = "mobilenet_2_5_224_tf_no_top.h5"

# Images per class copied from each split for the CI-sized subset.
SUBSET_SIZES = {"train": 30, "validation": 15, "test": 20}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}; the real-data tests need it")
    return path


@pytest.fixture(scope="session", autouse=True)
def _absl_logs_to_real_stderr() -> None:
    """Keep absl's log handler off pytest's captured stderr.

    Prefect reconfigures logging when a flow starts, which closes absl's handler; when
    that handler wrote to a captured stream, the capture closes with it and later tests
    fail with "I/O operation on closed file".
    """
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture(scope="session", autouse=True)
def _isolated_keras_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point KERAS_HOME at an empty folder so no test reads or writes the user's Keras cache."""
    previous = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras_home"))
    yield
    if previous is None:
        os.environ.pop("KERAS_HOME", None)
    else:
        os.environ["KERAS_HOME"] = previous


@pytest.fixture(scope="session")
def cats_vs_dogs() -> Path:
    """The full real photo set: train/validation/test, each with cats/ and dogs/."""
    return _require(CATS_VS_DOGS, "the cats_vs_dogs photo set")


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    """Real ImageNet MobileNetV2 (alpha 1.0, no top) weights file."""
    return _require(MODELS / MOBILENET_V2_FILE, "ImageNet MobileNetV2 weights")


@pytest.fixture(scope="session")
def mobilenet_025_weights() -> Path:
    """Real ImageNet MobileNet v1 (alpha 0.25, no top) weights file: the smallest real base."""
    return _require(MODELS / MOBILENET_025_FILE, "ImageNet MobileNet 0.25 weights")


def copy_subset(source: Path, target: Path, sizes: dict[str, int], offset: int = 0) -> Path:
    """Copy the first ``sizes[split]`` photos per class (after ``offset``) of each split."""
    for split, count in sizes.items():
        for class_dir in sorted((source / split).iterdir()):
            if not class_dir.is_dir():
                continue
            destination = target / split / class_dir.name
            destination.mkdir(parents=True, exist_ok=True)
            for photo in sorted(class_dir.iterdir())[offset : offset + count]:
                shutil.copy2(photo, destination / photo.name)
    return target


@pytest.fixture(scope="session")
def photo_subset(cats_vs_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CI-sized copy of the photo set (130 photos); tests must not modify it."""
    return copy_subset(cats_vs_dogs, tmp_path_factory.mktemp("photos") / "cats_vs_dogs", SUBSET_SIZES)


@pytest.fixture(scope="session")
def mobilenet_cache(photo_subset: Path, mobilenet_v2_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of real MobileNetV2 features of :func:`photo_subset`; tests must not modify it."""
    from pipeline.extract import extract_features
    from pipeline.spec import make_spec

    spec = make_spec("mobilenet_v2", str(mobilenet_v2_weights))
    summary = extract_features(photo_subset, tmp_path_factory.mktemp("cache"), spec)
    assert not summary.failed
    return Path(summary.cache)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary server and database) for tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.logging.configuration import setup_logging

        # Bind Prefect's console handler to the session's stderr now, not to the stderr
        # that pytest captures for (and closes after) the first test that runs a flow.
        setup_logging(incremental=False)
        yield

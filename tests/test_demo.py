"""The demo entry point: its inputs are checked before any flow starts.

No network: the sample download is pointed at a closed loopback port.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import flows.demo as demo

CLOSED_PORT_URL = "http://127.0.0.1:9/cats_and_dogs_filtered.zip"


def test_failed_download_exits_with_remedy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no data/images/cats_vs_dogs here
    monkeypatch.setattr(demo, "SAMPLE_ORIGIN", CLOSED_PORT_URL)
    assert demo.main(["--weights", "none"]) == 1
    error = capsys.readouterr().err
    assert f"downloading the cats-vs-dogs sample from {CLOSED_PORT_URL} failed" in error
    assert "make demo DATA=DIR" in error
    assert "Traceback" not in error


def test_missing_data_folder_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_tree"
    assert demo.main(["--data", str(missing), "--weights", "none"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("demo: error: ")
    assert str(missing) in error


def test_unknown_base_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--data", str(tmp_path), "--weights", "none", "--base", "vgg17"]) == 1
    error = capsys.readouterr().err
    assert "vgg17" in error
    assert "vgg16" in error

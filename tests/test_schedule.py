"""The nightly flow, its lock handling, and ``convcache serve`` against a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import copy_subset
from flows.cli import main
from flows.nightly import compare_flow_or_none
from pipeline.locking import CacheLock, CacheLockError
from pipeline.spec import make_spec

FIRST_SIZES = {"train": 4, "validation": 2, "test": 2}  # 16 photos
ADDED_SIZES = {"train": 2, "validation": 1, "test": 1}  # 8 more, taken after the first ones
SERVER_START_SECONDS = 120
SCHEDULE_SECONDS = 300


def _spec_args(weights: Path) -> list[str]:
    return ["--base", "mobilenet", "--weights", str(weights), "--input-size", "128", "--alpha", "0.25"]


def _options(weights: Path) -> Any:
    from flows.nightly import FeatureOptions

    return FeatureOptions(base="mobilenet", weights=str(weights), input_size=128, alpha=0.25)


def _cache_path(root: Path, weights: Path) -> Path:
    return root / make_spec("mobilenet", str(weights), input_size=128, alpha=0.25).cache_name


# --------------------------------------------------------------------------- nightly flow


def test_nightly_trains_on_new_cache(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from flows.nightly import nightly_flow

    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)

    result = nightly_flow(str(data), spec=_options(mobilenet_025_weights), heads=["logreg"],
                          cache_dir=str(tmp_path / "cache"), models_dir=str(tmp_path / "models"),
                          reports_dir=str(tmp_path / "reports"), shard_size=5)

    assert result["status"] == "completed"
    assert (result["extract"]["computed"], result["extract"]["shards"]) == (16, 4)
    assert _saved_heads(result["heads"]) == ["logreg"]


def _saved_heads(heads: Any) -> list[str]:
    """Return the heads that train_flow results or a compare_flow summary saved."""
    if compare_flow_or_none() is not None:
        best = heads["best"]
        assert (Path(best["model_path"]) / "head.json").is_file()
        return sorted({r["head"] for r in heads["results"]})
    for trained in heads:
        assert (Path(trained["model_path"]) / "head.json").is_file()
    return [trained["head"] for trained in heads]


def test_nightly_skips_locked_cache(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from flows.nightly import nightly_flow

    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()

    with CacheLock(_cache_path(cache_dir, mobilenet_025_weights), timeout=1):
        result = nightly_flow(str(data), spec=_options(mobilenet_025_weights), cache_dir=str(cache_dir),
                              models_dir=str(tmp_path / "models"), on_locked="skip")

    assert result["status"] == "skipped"
    assert f"pid {os.getpid()}" in result["reason"]
    assert not _cache_path(cache_dir, mobilenet_025_weights).exists()
    assert not (tmp_path / "models").exists()


def test_nightly_wait_times_out(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from flows.nightly import nightly_flow

    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()

    with CacheLock(_cache_path(cache_dir, mobilenet_025_weights), timeout=1):
        with pytest.raises(CacheLockError, match="timed out after"):
            nightly_flow(str(data), spec=_options(mobilenet_025_weights), cache_dir=str(cache_dir),
                         models_dir=str(tmp_path / "models"), lock_timeout=0.5)

    assert not _cache_path(cache_dir, mobilenet_025_weights).exists()


def test_nightly_waits_for_writer(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from flows.nightly import nightly_flow

    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    held = threading.Event()
    released_at: list[float] = []

    def hold_for_three_seconds() -> None:
        with CacheLock(_cache_path(cache_dir, mobilenet_025_weights), timeout=1):
            held.set()
            time.sleep(3)
            released_at.append(time.time())

    threading.Thread(target=hold_for_three_seconds, daemon=True).start()
    assert held.wait(timeout=10)
    result = nightly_flow(str(data), spec=_options(mobilenet_025_weights), cache_dir=str(cache_dir),
                          models_dir=str(tmp_path / "models"), reports_dir=str(tmp_path / "reports"), lock_timeout=60)

    assert result["extract"]["computed"] == 16
    assert Path(result["extract"]["cache"]).stat().st_mtime >= released_at[0], "published while the lock was held"


def test_nightly_rejects_bad_on_locked(
    prefect_api: None, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.nightly import nightly_flow

    with pytest.raises(ParameterTypeError, match="on_locked"):
        nightly_flow(str(photo_subset), spec=_options(mobilenet_025_weights), cache_dir=str(tmp_path),
                     on_locked="later")


def test_nightly_command_on_local_cluster(
    photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # the default 20 s is short on a busy CI host
    argv = [sys.executable, "-m", "flows.cli", "nightly", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--models-dir", str(tmp_path / "models"), "--reports-dir", str(tmp_path / "reports"), "--heads", "logreg",
            "--task-runner", "dask", "--dask-workers", "1", "--shard-size", "4", "--json",
            *_spec_args(mobilenet_025_weights)]

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["extract"]["computed"], result["extract"]["shards"]) == (16, 4)
    assert len(result["extract"]["workers"]) == 1
    assert _saved_heads(result["heads"]) == ["logreg"]
    # The workers report to the temporary server of the command instead of starting their own.
    assert done.stderr.count("Starting temporary server") == 1


# --------------------------------------------------------------------------- command-line errors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cron", "61 3 * * *"], "invalid --cron '61 3 * * *'"),
        (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "unknown --timezone 'Mars/Olympus'"),
        (["--interval", "0"], "--interval must be a positive number of seconds, got 0.0"),
        (["--interval", "-5"], "--interval must be a positive number of seconds, got -5.0"),
        (["--interval", "60", "--timezone", "UTC"], "--timezone applies to --cron only"),
        (["--interval", "60", "--heads", "logreg,forest"], "invalid --heads 'logreg,forest'; valid heads:"),
        (["--interval", "60", "--heads", ","], "invalid --heads ','"),
        (["--interval", "60", "--shard-size", "0"], "--shard-size must be at least 1 image, got 0"),
        (["--interval", "60", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--interval", "60", "--dask-workers", "2"], "--dask-address and --dask-workers need --task-runner dask"),
        (["--interval", "60", "--task-runner", "dask", "--dask-workers", "0"], "--dask-workers must be at least 1"),
        (["--interval", "60", "--task-runner", "dask", "--dask-workers", "2", "--dask-address", "tcp://127.0.0.1:1"],
         "not both"),
    ],
)
def test_serve_rejects_bad_option(
    extra: list[str], message: str, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", str(photo_subset), "--cache-dir", str(tmp_path), *_spec_args(mobilenet_025_weights), *extra]

    assert main(argv) == 1

    err = capsys.readouterr().err
    assert err.startswith("convcache: error: ")
    assert message in err


def test_serve_needs_schedule(photo_subset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(photo_subset)])

    assert exit_info.value.code == 2
    assert "one of the arguments --cron --interval is required" in capsys.readouterr().err


def test_serve_rejects_missing_data(mobilenet_025_weights: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", str(tmp_path / "nowhere"), "--interval", "60", "--cache-dir", str(tmp_path),
            *_spec_args(mobilenet_025_weights)]

    assert main(argv) == 1

    assert "nowhere" in capsys.readouterr().err


def test_serve_needs_prefect_server(photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    argv = [sys.executable, "-m", "flows.cli", "serve", str(photo_subset), "--interval", "60",
            "--cache-dir", str(tmp_path / "cache"), *_spec_args(mobilenet_025_weights)]

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "convcache serve needs a Prefect server" in done.stderr
    assert "prefect server start" in done.stderr


# --------------------------------------------------------------------------- scheduled runs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``prefect server start`` on loopback with its scheduler, which the test harness lacks."""
    home = tmp_path_factory.mktemp("prefect_server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
    )
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_SECONDS
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(server)
        log.close()


def _runs(client: Any, deployment_id: Any, states: list[str]) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state={"type": {"any_": states}}),
        sort="EXPECTED_START_TIME_ASC",
    )
    return list(runs)


def _completed_runs(client: Any, deployment_id: Any) -> list[Any]:
    failed = _runs(client, deployment_id, ["FAILED", "CRASHED"])
    if failed:
        pytest.fail(f"scheduled run {failed[0].name} ended {failed[0].state.name}: {failed[0].state.message}")
    return _runs(client, deployment_id, ["COMPLETED"])


def _extract_row(client: Any, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.nightly import EXTRACT_ARTIFACT

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[EXTRACT_ARTIFACT]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (row,) = json.loads(artifact.data)
    return row


def _wait_for(condition: Any, serve: subprocess.Popen[bytes], log: Path, deadline: float, what: str) -> Any:
    while True:
        value = condition()
        if value:
            return value
        if serve.poll() is not None:
            pytest.fail(f"convcache serve exited with {serve.returncode} before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_scheduled_runs_compute_new_images(
    prefect_server: str, photo_subset: Path, mobilenet_025_weights: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    data = copy_subset(photo_subset, tmp_path / "photos", FIRST_SIZES)
    cache = _cache_path(tmp_path / "cache", mobilenet_025_weights)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "prefect_home"),
               PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="INFO")
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "flows.cli", "serve", str(data), "--interval", "10", "--name", "test-nightly",
            "--cache-dir", str(tmp_path / "cache"), "--models-dir", str(tmp_path / "models"),
            "--reports-dir", str(tmp_path / "reports"), "--shard-size", "8", *_spec_args(mobilenet_025_weights)]
    deadline = time.monotonic() + SCHEDULE_SECONDS

    with open(log, "wb") as out:
        serve = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:

            def deployment() -> Any:
                try:
                    return client.read_deployment_by_name("nightly/test-nightly")
                except Exception:  # not registered yet
                    return None

            deployment_id = _wait_for(deployment, serve, log, deadline, "the deployment").id
            first = _wait_for(lambda: _completed_runs(client, deployment_id), serve, log, deadline, "a first run")[0]

            # Holding the writer lock makes the addition atomic for the runs, which scan under it.
            with CacheLock(cache, timeout=SCHEDULE_SECONDS):
                copy_subset(photo_subset, data, ADDED_SIZES, offset=FIRST_SIZES["train"])
            added = 2 * sum(ADDED_SIZES.values())

            def run_with_new_images() -> list[Any]:
                later = [r for r in _completed_runs(client, deployment_id) if r.id != first.id]
                return later if any(_extract_row(client, r.id)["images"] == 16 + added for r in later) else []

            later = _wait_for(run_with_new_images, serve, log, deadline, "a run that saw the new images")
            rows = {r.id: _extract_row(client, r.id) for r in [first, *later]}
    finally:
        _stop(serve, signal.SIGINT, wait=30)

    assert first.auto_scheduled and all(r.auto_scheduled for r in later)
    assert (rows[first.id]["images"], rows[first.id]["computed"]) == (16, 16)
    seen = [rows[r.id] for r in later if rows[r.id]["images"] == 16 + added]
    assert seen[0]["computed"] == added  # exactly the new images went through the conv base
    assert all(row["computed"] == 0 for row in seen[1:])
    assert all(rows[r.id]["computed"] == 0 for r in later if rows[r.id]["images"] == 16)
    assert (tmp_path / "models").is_dir()

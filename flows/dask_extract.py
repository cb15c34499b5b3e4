"""Prefect flow that extracts features shard by shard, on Dask workers or in this process.

``sharded_extract_flow`` holds the cache's writer lock, plans the run and submits one
``extract-shard`` task per shard to the flow's task runner. With ``prefect-dask``'s
``DaskTaskRunner`` the shards run on the workers of an existing cluster (``address``)
or of a local cluster that the runner starts. Each worker builds the conv base once
and writes each shard as one segment file, and the flow then compacts the segments
into the cache file. Shard results are small summaries, never features.

Dask runs a shard whose worker died again on another worker, and the flow submits a
shard that still has no result once more. Prefect retries a shard that raised (a file
that vanished between the scan and the read, say) with exponential backoff.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_logger
from prefect.runtime import task_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.serve_cli import check_task_runner_options
from pipeline.shards import DEFAULT_SHARD_SIZE, Shard, ShardResult, extract_sharded, run_shard
from pipeline.spec import FeatureSpec

# Prefect retries of a shard that raised, after 2, 4 and 8 s, each varied by up to 50 %.
SHARD_RETRIES = 3
# Submissions of a shard that ended without a result (its worker died more often than
# Dask's allowed-failures, or every Prefect retry failed).
SHARD_SUBMISSIONS = 2


@task(
    name="extract-shard",
    task_run_name="shard-{shard.index}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def extract_shard_task(
    cache_path: str,
    spec_json: str,
    shard: Shard,
    batch_size: int,
    decode_workers: int,
    tf_threads: int | None,
    resubmitted: bool,
) -> ShardResult:
    """Compute one shard on whichever worker runs this task; returns its summary."""
    attempt = task_run.run_count
    result = run_shard(
        cache_path,
        FeatureSpec.from_json(spec_json),
        shard,
        batch_size=batch_size,
        decode_workers=decode_workers,
        tf_threads=tf_threads,
        skip_committed=resubmitted or attempt > 1,
        final_attempt=attempt > SHARD_RETRIES,
    )
    logger = get_run_logger()
    for failure in result.failures:
        logger.warning("failed: %s: %s", failure["path"], failure["reason"])
    logger.info("shard %d on %s: %d computed, %d already committed in %.1f s%s", shard.index, result.worker,
                result.computed, result.skipped_committed, result.seconds,
                " (built the conv base)" if result.built_model else "")
    return result


class _ShardSubmitter:
    """Submit shards to the flow's task runner, collect results and resubmit lost shards."""

    def __init__(self, cache_path: str, spec_json: str, batch_size: int, decode_workers: int,
                 tf_threads: int | None) -> None:
        self.cache_path = cache_path
        self.spec_json = spec_json
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.tf_threads = tf_threads

    def __call__(self, shards: list[Shard]) -> list[ShardResult]:
        logger = get_run_logger()
        results: dict[int, ShardResult] = {}
        total = sum(len(s) for s in shards)
        started = time.monotonic()
        done_images = 0
        pending = list(shards)
        for submission in range(1, SHARD_SUBMISSIONS + 1):
            futures: dict[PrefectFuture[ShardResult], Shard] = {}
            for shard in pending:
                future = extract_shard_task.submit(
                    self.cache_path, self.spec_json, shard, self.batch_size, self.decode_workers,
                    self.tf_threads, submission > 1,
                )
                futures[future] = shard
            lost: list[Shard] = []
            for future in as_completed(list(futures)):
                shard = futures[future]
                try:
                    result = future.result()
                except Exception as error:  # KilledWorker, or the task failed after its retries
                    logger.warning("shard %d lost on submission %d of %d: %s: %s", shard.index, submission,
                                   SHARD_SUBMISSIONS, type(error).__name__, error)
                    lost.append(shard)
                    continue
                results[shard.index] = result
                done_images += len(shard)
                rate = done_images / max(time.monotonic() - started, 1e-9)
                logger.info("%d/%d shards, %d/%d images, %.1f images/s, about %.0f s left", len(results),
                            len(shards), done_images, total, rate, (total - done_images) / rate)
            pending = sorted(lost, key=lambda s: s.index)
            if not pending:
                break
            if submission < SHARD_SUBMISSIONS:
                logger.warning("submitting %d lost shards again: %s", len(pending), [s.index for s in pending])
        return [results[index] for index in sorted(results)]


@flow(name="extract-sharded")
def sharded_extract_flow(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    lock_timeout: float = 600.0,
    use_lock: bool | None = None,
    decode_workers: int = 2,
    tf_threads: int | None = None,
) -> dict[str, Any]:
    """Extract the features that the cache lacks, one task per shard of ``shard_size`` images.

    Run it with ``sharded_extract_flow.with_options(task_runner=make_task_runner(...))``
    (or :func:`run_sharded_extract`) to choose where the shards run. ``tf_threads``
    limits TensorFlow's threads in each worker process.
    """
    logger = get_run_logger()
    spec = FeatureSpec.from_json(spec_json)
    cache_path = Path(cache_dir) / spec.cache_name
    submitter = _ShardSubmitter(str(cache_path.resolve()), spec_json, batch_size, decode_workers, tf_threads)
    summary = extract_sharded(data_dir, cache_dir, spec, submitter, shard_size=shard_size,
                              lock_timeout=lock_timeout, use_lock=use_lock)
    for warning in summary.warnings:
        logger.warning(warning)
    logger.info(
        "cache %s: %d images, %d computed in %d shards on %d workers, %d reused, %d failed, %d vanished in %.1f s "
        "(%.1f images/s)", summary.cache, summary.images, summary.computed, summary.shards, len(summary.workers),
        summary.reused, len(summary.failed), len(summary.vanished), summary.seconds, summary.images_per_second,
    )
    return summary.to_dict()


def make_task_runner(
    kind: str = "local",
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> tuple[TaskRunner[Any], int | None]:
    """Build the task runner for the shards and the TensorFlow thread limit per worker.

    ``local`` runs the shards one at a time in this process. ``dask`` connects to the
    scheduler at ``dask_address``, or starts a local cluster of ``dask_workers``
    single-threaded worker processes on 127.0.0.1 (default: one per CPU core), whose
    workers share the cores: each gets ``cores // workers`` TensorFlow threads.

    Raises
    ------
    flows.serve_cli.TaskRunnerOptionError
        For an unknown ``kind`` or a combination of options that does not fit it.
    """
    check_task_runner_options(kind, dask_address, dask_workers)
    if kind == "local":
        return ThreadPoolTaskRunner(max_workers=1), None
    from prefect_dask import DaskTaskRunner

    if dask_address:
        # NOTE: the workers of an existing cluster keep TensorFlow's default thread count;
        # set it when starting them (docs/SCALING.md).
        return DaskTaskRunner(address=dask_address), None
    cores = os.cpu_count() or 1
    workers = cores if dask_workers is None else dask_workers
    cluster = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
    }
    return DaskTaskRunner(cluster_kwargs=cluster), max(1, cores // workers)


def run_sharded_extract(
    data_dir: str,
    cache_dir: str,
    spec_json: str,
    task_runner: str = "local",
    dask_address: str | None = None,
    dask_workers: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`sharded_extract_flow` on the task runner that the options name.

    ``options`` are passed to the flow (``shard_size``, ``batch_size``, ``lock_timeout``...).
    """
    runner, tf_threads = make_task_runner(task_runner, dask_address, dask_workers)
    options.setdefault("tf_threads", tf_threads)
    extract = sharded_extract_flow.with_options(task_runner=runner)
    url = _temporary_server_url() if task_runner == "dask" else None
    if url is None:
        return extract(data_dir, cache_dir, spec_json, **options)
    if dask_address:
        get_logger(__name__).warning(
            "no PREFECT_API_URL is set, so the workers of %s report to the temporary server at %s, which only "
            "workers on this host reach. Set PREFECT_API_URL to a Prefect server that every worker reaches.",
            dask_address, url,
        )
    # Dask workers are separate processes: without this they would each start a temporary
    # server of their own instead of reporting to the one this process runs.
    with temporary_settings(updates={PREFECT_API_URL: url}):
        return extract(data_dir, cache_dir, spec_json, **options)


def _temporary_server_url() -> str | None:
    """Return the API URL of the temporary server this process uses, or None with PREFECT_API_URL set.

    NOTE: that server listens on 127.0.0.1, so workers on other hosts cannot reach it.
    Runs on an existing cluster need a Prefect server that the workers reach (docs/SCALING.md).
    """
    if PREFECT_API_URL.value():
        return None
    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")

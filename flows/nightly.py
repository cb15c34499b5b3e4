"""Prefect flow for scheduled runs: extract the features of new images, then retrain the heads.

``nightly_flow`` runs two subflow steps. ``extract-sharded`` computes only the images
whose content digest the cache lacks, in this process or on Dask workers. Then
``compare`` fits the heads where ``flows.compare`` is installed; without it, one
``train`` subflow runs per head.

Artifacts: this flow publishes the table ``convcache-extract`` (what extraction
computed and reused). ``compare`` publishes its own, ``compare-results`` and
``compare-report``; without it, this flow publishes ``convcache-heads`` (the metrics of
every trained head). ``convcache serve`` serves the flow as a scheduled deployment.
"""

# No "from __future__ import annotations": Prefect builds the parameter model of a served
# run from these annotations, and string annotations such as "Literal[...]" fail there.
import inspect
from pathlib import Path
from typing import Any, Literal

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, State
from pydantic import BaseModel, ConfigDict

from flows.dask_extract import run_sharded_extract
from flows.train import train_flow
from pipeline.extract import check_cache_dir
from pipeline.locking import CacheLock, CacheLockError
from pipeline.shards import DEFAULT_SHARD_SIZE
from pipeline.spec import FeatureSpec, make_spec

EXTRACT_ARTIFACT = "convcache-extract"
HEADS_ARTIFACT = "convcache-heads"
ON_LOCKED = ("wait", "skip")


class FeatureOptions(BaseModel):
    """The feature spec options of ``convcache extract``, as one flow parameter."""

    model_config = ConfigDict(extra="forbid")

    base: str = "vgg16"
    weights: str = "imagenet"
    input_size: int | None = None
    layer: str | None = None
    pooling: str | None = None
    alpha: float | None = None
    resize: str = "bilinear"
    jpeg_draft: bool = True
    exif_transpose: bool = True
    precision: str = "float32"
    store_dtype: str = "float32"

    def to_spec(self) -> FeatureSpec:
        """Validate the options and resolve the weights into a :class:`FeatureSpec`."""
        return make_spec(**self.model_dump())


def compare_flow_or_none() -> Flow[..., Any] | None:
    """Return ``flows.compare.compare_flow`` where that module is installed, else None."""
    try:
        from flows.compare import compare_flow
    except ModuleNotFoundError as error:
        if error.name != "flows.compare":
            raise
        return None
    return compare_flow


def lock_holder(cache_path: Path) -> str | None:
    """Describe the process that holds the writer lock of ``cache_path``, or None if it is free."""
    lock = CacheLock(cache_path, timeout=0)
    try:
        with lock:
            return None
    except CacheLockError:
        return lock.holder()


def _skipped(cache_path: Path, reason: str) -> State[dict[str, Any]]:
    message = f"skipped: cache {cache_path} is being written by another run ({reason})"
    get_run_logger().warning("%s; the next run computes what this one would have", message)
    return Completed(name="Skipped", message=message, data={"status": "skipped", "reason": message})


def _train_or_compare(
    cache: str, heads: list[str], models_dir: str, reports_dir: str, random_state: int
) -> list[dict[str, Any]] | Any:
    """Run ``compare_flow`` where it is installed, else one ``train_flow`` per head."""
    compare = compare_flow_or_none()
    if compare is None:
        return [train_flow(cache, head, models_dir, random_state) for head in heads]
    # Pass only the keyword arguments that this version of compare_flow accepts.
    accepted = inspect.signature(compare.fn).parameters
    extra = {"models_dir": models_dir, "reports_dir": reports_dir, "random_state": random_state}
    return compare(cache_paths=[cache], heads=heads, **{k: v for k, v in extra.items() if k in accepted})


def _extract_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("images", "computed", "reused", "shards", "seconds", "images_per_second", "rows")
    row = {key: summary[key] for key in keys}
    row.update(failed=len(summary["failed"]), vanished=len(summary["vanished"]), workers=len(summary["workers"]),
               cache=summary["cache"])
    return [row]


def _heads_table(results: Any) -> list[dict[str, Any]]:
    """Return one row per head and split of ``train_flow`` results.

    Returns [] for a ``compare_flow`` summary, which publishes its own artifacts.
    """
    rows = []
    for result in results if isinstance(results, list) else []:
        for split, metrics in result["metrics"].items():
            rows.append({"head": result.get("head"), "split": split, "accuracy": metrics.get("accuracy"),
                         "loss": metrics.get("loss"), "n": metrics.get("n"), "model": result.get("model_path")})
    return rows


@flow(name="nightly")
def nightly_flow(
    data_dir: str,
    spec: FeatureOptions | None = None,
    heads: list[str] | None = None,
    cache_dir: str = "data/cache",
    models_dir: str = "data/models",
    reports_dir: str = "data/reports",
    task_runner: Literal["local", "dask"] = "local",
    dask_address: str | None = None,
    dask_workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    lock_timeout: float = 600.0,
    on_locked: Literal["wait", "skip"] = "wait",
    random_state: int = 0,
) -> dict[str, Any] | State[dict[str, Any]]:
    """Extract what the cache lacks, then train (or compare) ``heads`` on the updated cache.

    When another run holds the cache's writer lock, ``on_locked="wait"`` waits up to
    ``lock_timeout`` seconds and then fails; ``"skip"`` ends this run at once in a
    Completed state named Skipped, with the holder in its message.
    """
    logger = get_run_logger()
    if on_locked not in ON_LOCKED:
        raise ValueError(f"invalid on_locked {on_locked!r}; valid choices: {', '.join(ON_LOCKED)}")
    feature_spec = (spec or FeatureOptions()).to_spec()
    heads = list(heads or ["logreg"])
    check_cache_dir(Path(cache_dir))
    cache_path = Path(cache_dir) / feature_spec.cache_name
    if on_locked == "skip" and (holder := lock_holder(cache_path)) is not None:
        return _skipped(cache_path, holder)

    try:
        summary = run_sharded_extract(
            data_dir, cache_dir, feature_spec.to_json(), task_runner, dask_address, dask_workers,
            shard_size=shard_size, batch_size=batch_size, lock_timeout=0.0 if on_locked == "skip" else lock_timeout,
        )
    except CacheLockError as error:
        if on_locked == "wait":
            raise
        return _skipped(cache_path, str(error))
    create_table_artifact(_extract_table(summary), key=EXTRACT_ARTIFACT,
                          description=f"Features of {data_dir}: what this run computed and reused.")

    results = _train_or_compare(summary["cache"], heads, models_dir, reports_dir, random_state)
    table = _heads_table(results)
    if table:
        create_table_artifact(table, key=HEADS_ARTIFACT, description=f"Heads trained on {summary['cache']}.")
    logger.info("nightly run done: %d images computed, %d reused, heads %s", summary["computed"],
                summary["reused"], ", ".join(heads))
    return {"status": "completed", "extract": summary, "heads": results}

"""The ``convcache serve`` and ``convcache nightly`` commands.

``serve`` registers the nightly flow as a Prefect deployment with a cron or interval
schedule and runs its scheduled runs until interrupted. It needs a Prefect server
(``prefect server start``) named by ``PREFECT_API_URL``, because the server's scheduler
creates the runs. ``nightly`` runs the same flow once. Both validate every option
before Prefect starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flows.cli import DEFAULT_CACHE_DIR, DEFAULT_MODELS_DIR, DEFAULT_REPORTS_DIR, CommandError, add_spec_options
DEFAULT_DEPLOYMENT = "nightly"
TASK_RUNNERS = ("local", "dask")


class TaskRunnerOptionError(CommandError):
    """An invalid combination of task runner options."""


def register(subparsers: Any) -> None:
    """Add the ``serve`` and ``nightly`` sub-commands to the ``convcache`` parser."""
    p = subparsers.add_parser("serve", help="serve the nightly flow as a Prefect deployment on a schedule")
    p.add_argument("data_dir", help="root/<class>/<images> or root/{train,validation,test}/<class>/<images>")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", default=None, help='cron schedule, for example "0 3 * * *" for 03:00 every day')
    when.add_argument("--interval", type=float, default=None, help="seconds between runs")
    p.add_argument("--timezone", default=None, help="IANA time zone of --cron, for example Europe/Paris (default: UTC)")
    p.add_argument("--name", default=DEFAULT_DEPLOYMENT, help=f"deployment name (default: {DEFAULT_DEPLOYMENT})")
    _add_run_options(p)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("nightly", help="run the nightly flow once: extract new features, then fit the heads")
    p.add_argument("data_dir", help="root/<class>/<images> or root/{train,validation,test}/<class>/<images>")
    _add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_nightly)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", default="logreg",
                        help="comma-separated heads to train and compare, for example logreg,dense (default: logreg)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help=f"folder of cache files (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR,
                        help=f"where to save heads (default: {DEFAULT_MODELS_DIR})")
    parser.add_argument("--reports-dir", default=DEFAULT_REPORTS_DIR,
                        help=f"where the head comparison writes its reports (default: {DEFAULT_REPORTS_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the heads (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--lock-timeout", type=float, default=600.0,
                        help="seconds to wait for another writer of the same cache (default: 600)")
    parser.add_argument("--on-locked", choices=("wait", "skip"), default="wait",
                        help="when another run holds the cache: wait up to --lock-timeout, or skip this run "
                             "(default: wait)")
    add_task_runner_options(parser)
    add_spec_options(parser)


def add_task_runner_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--task-runner``, ``--dask-address``, ``--dask-workers`` and ``--shard-size``."""
    from pipeline.shards import DEFAULT_SHARD_SIZE

    group = parser.add_argument_group("where extraction runs")
    group.add_argument("--task-runner", choices=TASK_RUNNERS, default="local",
                       help="local: shards one after another in this process; dask: on Dask workers (default: local)")
    group.add_argument("--dask-address", default=None,
                       help="scheduler of an existing Dask cluster, for example tcp://10.0.0.5:8786")
    group.add_argument("--dask-workers", type=int, default=None,
                       help="start a local Dask cluster of this many worker processes (default: one per CPU core)")
    group.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                       help=f"images per shard; each shard is one task and one segment file "
                            f"(default: {DEFAULT_SHARD_SIZE})")


def check_task_runner_options(kind: str, dask_address: str | None, dask_workers: int | None) -> None:
    """Raise :class:`TaskRunnerOptionError` unless the task runner options fit together."""
    if kind not in TASK_RUNNERS:
        raise TaskRunnerOptionError(f"invalid task runner {kind!r}; valid choices: {', '.join(TASK_RUNNERS)}")
    if kind == "local" and (dask_address or dask_workers is not None):
        raise TaskRunnerOptionError("--dask-address and --dask-workers need --task-runner dask")
    if dask_address and dask_workers is not None:
        raise TaskRunnerOptionError(
            f"pass either --dask-address (an existing cluster, got {dask_address!r}) or --dask-workers "
            f"(a local cluster, got {dask_workers}), not both"
        )
    if dask_workers is not None and dask_workers < 1:
        raise TaskRunnerOptionError(f"--dask-workers must be at least 1, got {dask_workers}")


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the options and return the parameters of ``nightly_flow``, with absolute paths.

    Raises
    ------
    CommandError
        For an invalid head, batch size, shard size or task runner option; the spec
        options and the data folder raise their own user errors.
    """
    from pipeline.extract import check_cache_dir
    from pipeline.heads import HEAD_NAMES
    from pipeline.images import scan_tree

    from flows.cli import spec_from_args

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEAD_NAMES]
    if not heads or unknown:
        raise CommandError(f"invalid --heads {args.heads!r}; valid heads: {', '.join(HEAD_NAMES)}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.shard_size < 1:
        raise CommandError(f"--shard-size must be at least 1 image, got {args.shard_size}")
    check_task_runner_options(args.task_runner, args.dask_address, args.dask_workers)
    spec_from_args(args)
    scan_tree(args.data_dir)
    check_cache_dir(Path(args.cache_dir))

    weights = args.weights
    if weights not in ("imagenet", "none"):
        weights = str(Path(weights).expanduser().resolve())
    spec = {
        "base": args.base, "weights": weights, "input_size": args.input_size, "layer": args.layer,
        "pooling": args.pooling, "alpha": args.alpha, "resize": args.resize, "jpeg_draft": not args.no_jpeg_draft,
        "exif_transpose": not args.no_exif_transpose, "precision": args.precision, "store_dtype": args.store_dtype,
    }
    return {
        "data_dir": str(Path(args.data_dir).resolve()),
        "spec": spec,
        "heads": heads,
        "cache_dir": str(Path(args.cache_dir).resolve()),
        "models_dir": str(Path(args.models_dir).resolve()),
        "reports_dir": str(Path(args.reports_dir).resolve()),
        "task_runner": args.task_runner,
        "dask_address": args.dask_address,
        "dask_workers": args.dask_workers,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "lock_timeout": args.lock_timeout,
        "on_locked": args.on_locked,
        "random_state": args.seed,
    }


def schedule_from_args(args: argparse.Namespace) -> Any:
    """Build the Prefect schedule of ``--cron`` (with ``--timezone``) or ``--interval``."""
    from prefect.schedules import Cron, Interval

    if args.cron is not None:
        timezone = args.timezone or "UTC"
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise CommandError(
                f"unknown --timezone {timezone!r}; use an IANA name such as UTC or Europe/Paris"
            ) from error
        try:
            return Cron(args.cron, timezone=timezone)
        except ValueError as error:
            raise CommandError(
                f"invalid --cron {args.cron!r}: {error}. Use five fields (minute hour day month weekday), "
                'for example "0 3 * * *".'
            ) from error
    if args.timezone is not None:
        raise CommandError("--timezone applies to --cron only; drop it or use --cron")
    if not args.interval > 0:
        raise CommandError(f"--interval must be a positive number of seconds, got {args.interval}")
    return Interval(datetime.timedelta(seconds=args.interval), timezone="UTC")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the nightly flow on its schedule until interrupted."""
    schedule = schedule_from_args(args)
    parameters = flow_parameters(args)
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise CommandError(
                "convcache serve needs a Prefect server, which creates the scheduled runs. Start one with "
                "'prefect server start' and set PREFECT_API_URL, for example "
                "'prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api'."
            )

    from prefect.deployments.runner import EntrypointType

    from flows.nightly import nightly_flow

    # limit=1: this process starts a scheduled run only after the previous one ended.
    # The cache's writer lock covers every other writer (see --on-locked).
    nightly_flow.serve(
        name=args.name,
        schedules=[schedule],
        parameters=parameters,
        limit=1,
        description=f"Extract new features of {parameters['data_dir']}, then fit {', '.join(parameters['heads'])}.",
        tags=["convcache"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """Run the nightly flow once and print its result."""
    parameters = flow_parameters(args)

    from flows.nightly import nightly_flow

    result = nightly_flow(**parameters)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(_human_nightly(result))
    return 0


def _human_nightly(result: dict[str, Any]) -> str:
    if result.get("status") == "skipped":
        return result["reason"]
    s = result["extract"]
    lines = [
        f"cache     {s['cache']}",
        f"images    {s['images']}  computed {s['computed']}  reused {s['reused']}  failed {len(s['failed'])}",
        f"shards    {s['shards']} on {len(s['workers'])} workers  {s['seconds']:.1f} s "
        f"({s['images_per_second']:.1f} images/s computed)",
    ]
    heads = result["heads"]
    if isinstance(heads, dict):  # a compare_flow summary
        best = heads.get("best") or {}
        lines.append(f"best      {best.get('label')}: {best.get('split')} {best.get('metric')} {best.get('value')}"
                     f"  ->  {best.get('model_path')}")
        lines.append(f"report    {heads.get('report')}")
        return "\n".join(lines)
    for r in heads:
        accuracy = ", ".join(f"{split} {m.get('accuracy', float('nan')):.4f}" for split, m in r["metrics"].items())
        lines.append(f"head      {r['head']}: {accuracy}  ->  {r['model_path']}")
    return "\n".join(lines)

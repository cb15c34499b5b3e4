"""The ``convcache`` command line.

Commands that run a flow (``extract``, ``train``, ``predict``...) import Prefect; ``info``
and ``layers`` do not, so they start in about a second. Settings are validated before a
flow starts, so a bad value fails fast and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.spec import FeatureSpec

DEFAULT_CACHE_DIR = "data/cache"
DEFAULT_MODELS_DIR = "data/models"
DEFAULT_REPORTS_DIR = "data/reports"


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.bases import UnknownBaseError, WeightsMismatchError
    from pipeline.dataset import DatasetError
    from pipeline.extract import CacheFolderError
    from pipeline.heads import HeadError
    from pipeline.images import DataFolderError
    from pipeline.locking import CacheLockError
    from pipeline.maintenance import PruneError
    from pipeline.spec import SpecError
    from pipeline.store import CacheFileError, CacheWriteError
    from pipeline.streaming import BudgetError

    from flows.serve_cli import TaskRunnerOptionError

    return (CommandError, UnknownBaseError, CacheFolderError, HeadError, DataFolderError, CacheLockError,
            SpecError, CacheFileError, CacheWriteError, DatasetError, BudgetError, WeightsMismatchError,
            PruneError, TaskRunnerOptionError, FileNotFoundError, PermissionError)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that make up a feature spec."""
    from pipeline.bases import BASES
    from pipeline.spec import POOLINGS, PRECISIONS, STORE_DTYPES

    group = parser.add_argument_group("feature spec (every option here changes the cache key)")
    group.add_argument("--base", default="vgg16", help=f"conv base: {', '.join(sorted(BASES))} (default: vgg16)")
    group.add_argument("--weights", default="imagenet",
                       help="'imagenet' (Keras download and cache), 'none' (random) or a path to an .h5 file")
    group.add_argument("--input-size", type=int, default=None, help="input height and width in pixels (default: per base)")
    group.add_argument("--layer", default=None, help="take features from this layer (see 'convcache layers BASE')")
    group.add_argument("--pooling", choices=POOLINGS, default=None, help="global pooling of the feature map (default: per base)")
    group.add_argument("--alpha", type=float, default=None, help="width multiplier of the MobileNet bases")
    group.add_argument("--resize", default="bilinear", help="Pillow resize filter (default: bilinear)")
    group.add_argument("--no-jpeg-draft", action="store_true", help="decode JPEGs at full size before resizing")
    group.add_argument("--no-exif-transpose", action="store_true", help="ignore EXIF orientation")
    group.add_argument("--precision", choices=PRECISIONS, default="float32", help="compute precision of the base")
    group.add_argument("--store-dtype", choices=STORE_DTYPES, default="float32", help="dtype of stored features")


def spec_from_args(args: argparse.Namespace) -> Any:
    """Build and validate the feature spec named by the command-line options."""
    from pipeline.spec import make_spec

    return make_spec(
        base=args.base, weights=args.weights, input_size=args.input_size, layer=args.layer, pooling=args.pooling,
        alpha=args.alpha, resize=args.resize, jpeg_draft=not args.no_jpeg_draft,
        exif_transpose=not args.no_exif_transpose, precision=args.precision, store_dtype=args.store_dtype,
    )


def _print(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(human(result))


def cmd_extract(args: argparse.Namespace) -> int:
    if args.task_runner == "dask" and args.augment_views:
        raise CommandError("--augment-views runs in this process only; drop --task-runner dask")
    if args.augment_views:
        from flows.finetune_cli import cmd_augment

        args.views = args.augment_views
        return cmd_augment(args)  # extraction, then the missing views; prints both summaries
    from pipeline.extract import check_cache_dir
    from pipeline.images import scan_tree
    from pipeline.store import read_header

    spec = spec_from_args(args)
    if args.batch_size < 1:
        raise CommandError(f"invalid batch size {args.batch_size}; pass --batch-size 1 or more")
    scan_tree(args.data_dir)
    cache_dir = Path(args.cache_dir).expanduser()
    cache_file = cache_dir / spec.cache_name
    if cache_file.exists():
        read_header(cache_file, expected_digest=spec.digest)
    elif spec.layer:
        # An existing cache proves the layer exists, so only a new cache pays for building the base here.
        _check_layer(spec)
    check_cache_dir(cache_dir)

    from flows.serve_cli import check_task_runner_options

    check_task_runner_options(args.task_runner, args.dask_address, args.dask_workers)
    if args.shard_size < 1:
        raise CommandError(f"--shard-size must be at least 1 image, got {args.shard_size}")
    if args.task_runner == "dask":
        from flows.dask_extract import run_sharded_extract

        summary = run_sharded_extract(
            str(args.data_dir), str(cache_dir), spec.to_json(), "dask", args.dask_address, args.dask_workers,
            shard_size=args.shard_size, batch_size=args.batch_size, lock_timeout=args.lock_timeout,
            use_lock=False if args.no_lock else None,
        )
        _print(summary, args.json, _human_extract)
        return 0

    from flows.extract import extract_flow

    summary = extract_flow(
        str(args.data_dir), str(cache_dir), spec.to_json(), batch_size=args.batch_size,
        lock_timeout=args.lock_timeout, use_lock=False if args.no_lock else None,
    )
    _print(summary, args.json, _human_extract)
    return 0


def _check_layer(spec: FeatureSpec) -> None:
    """Raise SpecError unless the spec's base has a layer named ``spec.layer``."""
    from pipeline.layers import list_layers
    from pipeline.spec import SpecError

    names = [layer["name"] for layer in list_layers(spec.base, spec.input_size, spec.alpha)]
    if spec.layer not in names:
        raise SpecError(
            f"layer {spec.layer!r} not found in {spec.base}; valid layers: {', '.join(names)}. "
            f"Run 'convcache layers {spec.base}' to see their output shapes."
        )


def _human_extract(s: dict[str, Any]) -> str:
    lines = [
        f"cache     {s['cache']}",
        f"images    {s['images']}  computed {s['computed']}  reused {s['reused']}  failed {len(s['failed'])}",
        f"time      {s['seconds']:.1f} s  ({s['images_per_second']:.1f} images/s computed)",
    ]
    lines += [f"failed    {f['path']}: {f['reason']}" for f in s["failed"][:20]]
    if len(s["failed"]) > 20:
        lines.append(f"          ... and {len(s['failed']) - 20} more (see --json)")
    lines += [f"conflict  same bytes in {', '.join(sorted(c['paths']))}" for c in s["conflicts"]]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.dataset import check_dataset
    from pipeline.heads import HEAD_NAMES, make_head
    from pipeline.store import read_header

    if not Path(args.cache_file).exists():
        raise CommandError(f"cache file not found: {args.cache_file}. Run 'convcache extract' first.")
    read_header(args.cache_file)
    if args.head not in HEAD_NAMES:
        make_head(args.head, 2)  # raises HeadError naming the valid heads
    check_dataset(args.cache_file, use_views=args.use_views, random_state=args.seed)
    if args.memory_budget is not None:
        from pipeline.streaming import parse_memory_budget

        parse_memory_budget(args.memory_budget)

    from flows.train import train_flow

    result = train_flow(
        str(args.cache_file), args.head, str(args.models_dir), args.seed, args.use_views, args.memory_budget
    )
    _print(result, args.json, _human_train)
    return 0


def _human_train(r: dict[str, Any]) -> str:
    lines = [f"head      {r['head']}  (fit {r['fit_seconds']:.1f} s)", f"saved     {r['model_path']}"]
    order = ["train", "validation", "test"]
    for split in sorted(r["metrics"], key=lambda name: order.index(name) if name in order else len(order)):
        m = r["metrics"][split]
        loss = f"  loss {m['loss']:.4f}" if "loss" in m else ""
        lines.append(f"{split:<11}accuracy {m.get('accuracy', float('nan')):.4f}{loss}  n {m['n']}")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.heads import load_head
    from pipeline.predict import check_base, collect_images

    _, meta = load_head(args.model_path)
    check_base(meta, args.base, args.weights)
    collect_images(args.images)
    # NOTE: a missing weights file is only detected inside the flow, once an image turns out not to be
    # cached, so Prefect logs its traceback before the one-line error.

    from flows.predict import predict_flow

    results = predict_flow(str(args.model_path), [str(p) for p in args.images], args.base, args.weights)
    _print(results, args.json, _human_predict)
    if all("error" in r for r in results):
        print("convcache: error: no image could be classified; see the reasons above", file=sys.stderr)
        return 1
    return 0


def _human_predict(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['path']}\t{r['class']}\t{r['probability']:.4f}" if "class" in r else f"{r['path']}\terror: {r['error']}"
        for r in results
    )


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.maintenance import describe_cache

    info = describe_cache(args.cache_file)
    _print(info, args.json, _human_info)
    return 0


def _human_info(i: dict[str, Any]) -> str:
    spec = i["spec"]
    lines = [
        f"cache      {i['cache']}  ({i['file_bytes'] / 1e6:.1f} MB)",
        f"spec       {spec['base']} {spec['input_size']} px, layer {spec['layer'] or 'top'}, pooling {spec['pooling']}, "
        f"{spec['precision']}, stored as {spec['store_dtype']}, weights {spec['weights']} ({spec['weights_digest'][:12]})",
        f"features   {i['feature_shape']}  digest {i['spec_digest'][:12]}",
        f"images     {i['images']} present, {i['rows']} rows, {i['absent_rows']} absent, "
        f"{i['augmented_rows']} augmented, {i['failed']} failed, {i['conflicts']} conflicts",
    ]
    for split, counts in i["rows_per_split"].items():
        lines.append(f"  {split:<10} " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    versions = ", ".join(f"{k} {v}" for k, v in i["library_versions"].items())
    lines.append(f"written by {versions}")
    return "\n".join(lines)


def cmd_layers(args: argparse.Namespace) -> int:
    from pipeline.layers import list_layers

    layers = list_layers(args.base, args.input_size, args.alpha)
    _print(layers, args.json, lambda rows: "\n".join(f"{r['name']:<32}{tuple(r['shape'])}" for r in rows))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pipeline.maintenance import prune_cache

    result = prune_cache(args.cache_file, args.data_dir, lock_timeout=args.lock_timeout,
                         use_lock=False if args.no_lock else None, force=args.force)
    _print(result, args.json, lambda r: f"pruned {r['removed']} rows from {r['cache']} ({r['rows_after']} left)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``convcache`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="convcache",
        description="Cache frozen conv-base features of image folders in HDF5 and train classifiers on them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="cache conv-base features of an image tree")
    p.add_argument("data_dir", help="root/<class>/<images> or root/{train,validation,test}/<class>/<images>")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"folder of cache files (default: {DEFAULT_CACHE_DIR})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--augment-views", type=int, default=0, metavar="K",
                   help="also cache K augmented views of every train image (default: 0, none)")
    p.add_argument("--replace-views", action="store_true",
                   help="drop stored views made with another augmentation recipe and compute new ones")
    from flows.finetune_cli import add_augment_options

    add_augment_options(p)
    _add_lock_options(p)
    from flows.serve_cli import add_task_runner_options

    add_task_runner_options(p)
    add_spec_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="fit a head on cached features (no conv base is built)")
    p.add_argument("cache_file")
    p.add_argument("--head", default="logreg",
                   help="dense, logreg, linear_svm, svm_rbf, knn, random_forest, hist_gb, mlp, or an estimator "
                        "import path such as sklearn.linear_model:RidgeClassifier (default: logreg)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="stream features in chunks when they need more than SIZE, e.g. 2GB "
                        "(dense, logreg and linear_svm only)")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=f"where to save the head (default: {DEFAULT_MODELS_DIR})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--use-views", action="store_true", help="also train on cached augmented views")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify images with a trained head")
    p.add_argument("model_path", help="folder written by 'convcache train' or 'convcache compare'")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--base", default=None, help="reject the head unless it was trained on this base")
    p.add_argument("--weights", default=None, help="weights file to run the base with (must match the head's)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="describe a cache file")
    p.add_argument("cache_file")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("layers", help="list the layers of a conv base with their output shapes")
    p.add_argument("base")
    p.add_argument("--input-size", type=int, default=None, help="input size in pixels (default: per base)")
    p.add_argument("--alpha", type=float, default=None, help="width multiplier of the MobileNet bases")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("prune", help="remove rows of images that are no longer in the tree")
    p.add_argument("cache_file")
    p.add_argument("data_dir")
    p.add_argument("--force", action="store_true",
                   help="prune even when the folder differs from the one the cache was extracted from "
                        "and holds less than half of its images")
    _add_lock_options(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_prune)

    for register in _extra_commands():
        register(sub)
    return parser


def _add_lock_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lock-timeout", type=float, default=600.0,
                        help="seconds to wait for another writer of the same cache (default: 600)")
    parser.add_argument("--no-lock", action="store_true",
                        help="take no writer lock; only for file systems without fcntl locks")


def _extra_commands() -> list[Callable[[Any], None]]:
    """Register commands defined in their own modules (compare, serve, finetune)."""
    registrars = []
    for module_name in ("flows.compare_cli", "flows.serve_cli", "flows.finetune_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as error:
        print(f"convcache: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "ephemeral Prefect API server" not in str(error):
            raise
        print(
            "convcache: error: the temporary Prefect server did not start in time. Start one with "
            "'prefect server start' and set PREFECT_API_URL=http://127.0.0.1:4200/api, or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("convcache: interrupted; committed rows are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

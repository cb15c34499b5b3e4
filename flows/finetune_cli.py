"""The ``convcache augment`` and ``convcache finetune`` commands, registered by :mod:`flows.cli`.

Like the other commands, they validate every setting before a flow starts. Prefect and
TensorFlow are imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.cli import (
    DEFAULT_CACHE_DIR,
    DEFAULT_MODELS_DIR,
    CommandError,
    _add_lock_options,
    _check_layer,
    _print,
    add_spec_options,
    spec_from_args,
)


def add_augment_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of an augmentation recipe (see :class:`pipeline.augment.AugmentRecipe`)."""
    group = parser.add_argument_group("augmentation recipe (stored views are reused only with the same recipe)")
    group.add_argument("--no-flip", action="store_true", help="do not mirror images left-right")
    group.add_argument("--rotation", type=float, default=20.0, help="largest rotation in degrees (default: 20)")
    group.add_argument("--zoom", type=float, default=0.2,
                       help="zoom range: scale factor from 1-ZOOM to 1+ZOOM (default: 0.2)")
    group.add_argument("--crop", type=float, default=0.1,
                       help="largest shift of the crop window, as a fraction of the image side (default: 0.1)")
    group.add_argument("--augment-seed", type=int, default=0, help="seed of the random transforms (default: 0)")


def recipe_from_args(args: argparse.Namespace) -> Any:
    """Build the augmentation recipe named by :func:`add_augment_options`; raises CommandError if invalid."""
    from pipeline.augment import AugmentError, AugmentRecipe

    try:
        return AugmentRecipe(flip=not args.no_flip, rotation=args.rotation, zoom=args.zoom, crop=args.crop,
                             seed=args.augment_seed)
    except AugmentError as error:
        raise CommandError(str(error)) from error


def _check_tree_and_cache(args: argparse.Namespace, spec: Any) -> Path:
    """Run the checks of ``convcache extract`` and return the cache folder.

    They fail fast on an invalid batch size, a bad data folder, a cache file of another
    spec, an unknown ``--layer`` and an unwritable cache folder.
    """
    from pipeline.extract import check_cache_dir
    from pipeline.images import scan_tree
    from pipeline.store import read_header

    if args.batch_size < 1:
        raise CommandError(f"invalid batch size {args.batch_size}; pass --batch-size 1 or more")
    scan_tree(args.data_dir)
    cache_dir = Path(args.cache_dir).expanduser()
    cache_file = cache_dir / spec.cache_name
    if cache_file.exists():
        read_header(cache_file, expected_digest=spec.digest)
    elif spec.layer:
        _check_layer(spec)
    check_cache_dir(cache_dir)
    return cache_dir


def cmd_augment(args: argparse.Namespace) -> int:
    """Run ``convcache augment``: extraction followed by K cached views per train image."""
    from pipeline.augment import AugmentError, check_recipe

    if args.views < 1:
        raise CommandError(f"invalid number of views {args.views}; pass 1 or more augmented views per train image")
    recipe = recipe_from_args(args)
    spec = spec_from_args(args)
    cache_dir = _check_tree_and_cache(args, spec)
    try:
        if (cache_dir / spec.cache_name).exists():
            check_recipe(cache_dir / spec.cache_name, recipe, args.replace_views)

        from flows.augment import extract_views_flow

        result = extract_views_flow(
            str(args.data_dir), str(cache_dir), spec.to_json(), args.views, recipe.to_json(),
            replace_views=args.replace_views, batch_size=args.batch_size, lock_timeout=args.lock_timeout,
            use_lock=False if args.no_lock else None,
        )
    except AugmentError as error:
        raise CommandError(str(error)) from error
    _print(result, args.json, _human_augment)
    return 0


def _human_augment(result: dict[str, Any]) -> str:
    extract, views = result["extract"], result["views"]
    lines = [
        f"cache     {views['cache']}  ({views['file_bytes'] / 1e6:.1f} MB, {views['rows']} rows)",
        f"images    {extract['images']}  computed {extract['computed']}  reused {extract['reused']}  "
        f"failed {len(extract['failed'])}  ({extract['seconds']:.1f} s)",
        f"views     {views['views']} per train image, {views['images']} train images: computed {views['computed']}  "
        f"reused {views['reused']}  dropped {views['dropped']}  failed {len(views['failed'])}  "
        f"({views['seconds']:.1f} s, {views['views_per_second']:.1f} views/s)",
    ]
    lines += [f"failed    {f['path']}: {f['reason']}" for f in (extract["failed"] + views["failed"])[:20]]
    return "\n".join(lines)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``convcache finetune``: extraction, warm-start head, then end-to-end training of the top layers."""
    from pipeline.finetune import FinetuneError, FinetuneSettings, check_trainable_layers

    trainable = tuple(name.strip() for name in (args.trainable or "").split(",") if name.strip())
    recipe = recipe_from_args(args)
    spec = spec_from_args(args)
    try:
        settings = FinetuneSettings(
            trainable_from=args.trainable_from, trainable=trainable, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, patience=args.patience, recipe=recipe, random_state=args.seed,
            use_views=args.use_views,
        )
        cache_dir = _check_tree_and_cache(args, spec)
        check_trainable_layers(spec, settings)

        from flows.finetune import finetune_flow

        result = finetune_flow(
            str(args.data_dir), str(cache_dir), str(Path(args.models_dir).expanduser()), spec.to_json(),
            settings.to_json(), output_dir=str(Path(args.output).expanduser()) if args.output else None,
            lock_timeout=args.lock_timeout, use_lock=False if args.no_lock else None,
        )
    except FinetuneError as error:
        raise CommandError(str(error)) from error
    _print(result, args.json, _human_finetune)
    return 0


def _human_finetune(r: dict[str, Any]) -> str:
    lines = [
        f"trained   {', '.join(r['trainable_layers'])}",
        f"epochs    {r['epochs_run']} (best {r['best_epoch']}) on the {r['device']} in {r['fit_seconds']:.1f} s, "
        f"{r['train_images']} train images",
    ]
    for split, after in r["after"].items():
        before = r["before"][split]
        lines.append(f"{split:<10}accuracy {before.get('accuracy', float('nan')):.4f} -> "
                     f"{after.get('accuracy', float('nan')):.4f}  (n {after['n']})")
    lines += [
        f"weights   {r['weights']}",
        f"head      {r['output']}  (for 'convcache predict')",
        f"next      extract with --weights {r['weights']} to cache tuned features in {Path(r['tuned_cache']).name}",
    ]
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add the ``augment`` and ``finetune`` sub-commands to the ``convcache`` parser."""
    p = subparsers.add_parser("augment", help="cache features plus K augmented views of every train image")
    p.add_argument("data_dir", help="root/<class>/<images> or root/{train,validation,test}/<class>/<images>")
    p.add_argument("--views", type=int, required=True, help="augmented views per train image (1 or more)")
    p.add_argument("--replace-views", action="store_true",
                   help="drop stored views made with another augmentation recipe and compute new ones")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help=f"folder of cache files (default: {DEFAULT_CACHE_DIR})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    add_augment_options(p)
    _add_lock_options(p)
    add_spec_options(p)
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.set_defaults(func=cmd_augment)

    p = subparsers.add_parser(
        "finetune", help="fine-tune the top layers of a conv base, warm-started from cached features"
    )
    p.add_argument("data_dir", help="root/<class>/<images> or root/{train,validation,test}/<class>/<images>")
    p.add_argument("--trainable-from", default=None, metavar="LAYER",
                   help="train this layer and every later one (see 'convcache layers BASE')")
    p.add_argument("--trainable", default=None, metavar="LAYER,...", help="train exactly these comma-separated layers")
    p.add_argument("--epochs", type=int, default=20, help="largest number of fine-tuning epochs (default: 20)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="RMSprop learning rate (default: 1e-5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step (default: 32)")
    p.add_argument("--patience", type=int, default=4,
                   help="epochs without a lower validation loss before stopping (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--use-views", action="store_true", help="warm-start the head on cached augmented views too")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help=f"folder of cache files (default: {DEFAULT_CACHE_DIR})")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR,
                   help=f"parent folder of the output (default: {DEFAULT_MODELS_DIR})")
    p.add_argument("--output", default=None,
                   help="output folder (default: MODELS_DIR/<cache name>-finetune-<first named layer>)")
    add_augment_options(p)
    _add_lock_options(p)
    add_spec_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_finetune)

"""The ``convcache compare`` command: fit many heads on cached features and report the best.

:func:`register` only adds the sub-parser; Prefect and scikit-learn are imported when
the command runs, so other commands start as fast as before.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.cli import DEFAULT_MODELS_DIR, DEFAULT_REPORTS_DIR, CommandError
from pipeline.metrics import METRICS, SELECT_SPLITS
from pipeline.registry import GRID_SIZES, HEAD_NAMES, PCA_HEADS, REFIT_CHOICES


def register(subparsers: Any) -> None:
    """Add the ``compare`` sub-parser to the ``convcache`` command line."""
    p = subparsers.add_parser(
        "compare", help="fit many heads on cached features, report them and save the best",
        description="Fit classifier heads on one or more caches (no conv base is built), choose each head's "
                    "hyperparameters on the validation split, refit, evaluate once on test, write an HTML report "
                    "and save the best head for 'convcache predict'.",
    )
    p.add_argument("cache_files", nargs="+", metavar="CACHE_FILE",
                   help="cache file(s) written by 'convcache extract'; heads of several caches share one report")
    p.add_argument("--heads", default=None,
                   help=f"comma-separated heads (default: all): {', '.join(HEAD_NAMES)}, or a scikit-learn "
                        "classifier as module:Class, e.g. sklearn.linear_model:RidgeClassifier")

    # How hyperparameters are chosen and how heads are ranked.
    p.add_argument("--cv", type=int, default=None, metavar="N",
                   help="choose hyperparameters by N-fold stratified cross-validation over the train and "
                        "validation rows (default: on the validation split, or 5-fold cross-validation on train "
                        "where a cache has none)")
    p.add_argument("--select", default="accuracy", metavar="METRIC",
                   help=f"metric that ranks the heads and picks the best: {', '.join(METRICS)} (default: accuracy)")
    p.add_argument("--select-split", default="validation", metavar="SPLIT",
                   help=f"split whose metric ranks the heads: {', '.join(SELECT_SPLITS)} (default: validation)")
    p.add_argument("--grid", default="default", metavar="SIZE",
                   help=f"hyperparameter grid per head: {', '.join(GRID_SIZES)} (default: default)")
    p.add_argument("--refit", default="train+validation", metavar="ROWS",
                   help=f"rows the chosen parameters are refitted on: {', '.join(REFIT_CHOICES)} "
                        "(default: train+validation)")
    p.add_argument("--pca", type=int, default=None, metavar="N",
                   help=f"PCA components before {', '.join(PCA_HEADS)}; 0 turns PCA off (default: per head)")
    p.add_argument("--seed", type=int, default=0, help="random seed of splits, folds and heads (default: 0)")

    # Resources and data.
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="stream features from the cache in chunks when they need more than SIZE, e.g. 2GB "
                        "(only heads with an incremental fit: dense, logreg, linear_svm). Each head fitted at the "
                        "same time holds its own copy of in-memory features")
    p.add_argument("--use-views", action="store_true", help="also train on cached augmented views")
    p.add_argument("--workers", type=int, default=None, help="heads fitted at the same time (default: CPU count)")

    # Output.
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR,
                   help=f"where the best head is saved (default: {DEFAULT_MODELS_DIR})")
    p.add_argument("--reports-dir", default=DEFAULT_REPORTS_DIR,
                   help=f"where the run's report folder is written (default: {DEFAULT_REPORTS_DIR})")
    p.add_argument("--keep-heads", action="store_true", help="keep every fitted head in the report folder")
    p.add_argument("--json", action="store_true", help="print the results, best head and report path as JSON")
    p.set_defaults(func=cmd_compare)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    return {
        "heads": heads, "cv": args.cv, "metric": args.select, "select_split": args.select_split,
        "random_state": args.seed, "grid": args.grid, "refit": args.refit, "pca": args.pca,
        "memory_budget": args.memory_budget, "use_views": args.use_views, "models_dir": str(args.models_dir),
        "reports_dir": str(args.reports_dir), "keep_heads": args.keep_heads,
    }


def cmd_compare(args: argparse.Namespace) -> int:
    """Validate the settings (before Prefect starts), run the compare flow and print its summary."""
    from pipeline.compare import CompareError, plan_comparison
    from pipeline.dataset import DatasetError
    from pipeline.streaming import BudgetError

    settings = _settings(args)
    if args.workers is not None and args.workers < 1:
        raise CommandError(f"invalid --workers {args.workers}; use 1 or more")
    try:
        plan_comparison(args.cache_files, **settings)  # fits nothing; rejects bad heads, caches and settings
    except (CompareError, BudgetError, DatasetError) as error:
        raise CommandError(str(error)) from None

    from flows.compare import run_compare_flow

    summary = run_compare_flow(workers=args.workers, cache_paths=[str(p) for p in args.cache_files], **settings)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(human_summary(summary))
    return 0


def _number(value: Any, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def human_summary(summary: dict[str, Any]) -> str:
    """Format a comparison summary as a short ranked table for the terminal."""
    metric, split = summary["select"]["metric"], summary["select"]["split"]
    lines = [f"run       {summary['run']}  ({len(summary['results'])} heads, {summary['seconds']} s)"]
    for cache in summary["caches"]:
        lines.append(f"cache     {cache['cache']}: {cache['description']}")
    width = max([len(r["label"]) for r in summary["results"]] + [4])
    lines.append(f"{'rank':<5}{'head':<{width + 2}}{split[:3] + ' ' + metric:>16}{'test acc':>10}"
                 f"{'ROC AUC':>9}{'log loss':>10}{'fit s':>8}")
    for rank, r in enumerate(summary["results"], start=1):
        if r.get("error"):
            lines.append(f"{rank:<5}{r['label']:<{width + 2}}failed: {r['error']}")
            continue
        lines.append(f"{rank:<5}{r['label']:<{width + 2}}{_number((r.get(split) or {}).get(metric), 16)}"
                     f"{_number(r['test'].get('accuracy'), 10)}{_number(r['test'].get('roc_auc'), 9)}"
                     f"{_number(r['test'].get('log_loss'), 10)}{r['fit_seconds']:>8.1f}")
    best = summary.get("best")
    lines.append(f"best      {best['label']}  saved to {best['model_path']}" if best else "best      none")
    lines.append(f"report    {summary['report']}")
    return "\n".join(lines)

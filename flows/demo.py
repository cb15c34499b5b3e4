"""The main job end to end on a real photo set: extract, then train logreg and dense heads.

Run by ``make demo``. Without ``--data`` it uses ``data/images/cats_vs_dogs`` and, where that
folder is missing, the public cats-vs-dogs sample that TensorFlow's transfer-learning
tutorial uses (``cats_and_dogs_filtered.zip``), downloaded once into the Keras cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

DEFAULT_DATA = Path("data/images/cats_vs_dogs")
SPLIT_ORDER = ["train", "validation", "test"]
SAMPLE_FILE = "cats_and_dogs_filtered.zip"
SAMPLE_ORIGIN = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"


class SampleDownloadError(RuntimeError):
    """Error raised when the public cats-vs-dogs sample cannot be downloaded."""


def sample_photos() -> Path:
    """Return the public cats-vs-dogs sample, downloading it into the Keras cache once.

    Raises
    ------
    SampleDownloadError
        If the sample is not in the Keras cache and the download fails.
    """
    from keras.utils import get_file

    try:
        extracted = Path(get_file(SAMPLE_FILE, origin=SAMPLE_ORIGIN, extract=True))
    except Exception as error:  # get_file raises a bare Exception when the download fails
        raise SampleDownloadError(
            f"downloading the cats-vs-dogs sample from {SAMPLE_ORIGIN} failed ({error}). Either put a "
            f"class-folder photo tree at {DEFAULT_DATA}, or pass one with --data DIR "
            "(make demo DATA=DIR WEIGHTS=path/to/weights.h5)."
        ) from error
    for candidate in [extracted, *sorted(extracted.rglob("*"))]:
        if candidate.is_dir() and (candidate / "train").is_dir():
            return candidate
    raise FileNotFoundError(f"no train/ folder inside the downloaded sample at {extracted}")


@flow(name="demo")
def demo_flow(data_dir: str, spec_json: str, cache_dir: str, models_dir: str) -> dict[str, Any]:
    """Extract features of ``data_dir`` and train two heads on them."""
    from flows.extract import extract_flow
    from flows.train import train_flow

    logger = get_run_logger()
    started = time.perf_counter()
    summary = extract_flow(data_dir, cache_dir, spec_json)
    results = [train_flow(summary["cache"], head, models_dir) for head in ("logreg", "dense")]
    logger.info("demo finished in %.1f s", time.perf_counter() - started)
    return {"extract": summary, "heads": results}


def results_table(outcome: dict[str, Any]) -> str:
    """Format the demo outcome as a short plain-text table."""
    summary = outcome["extract"]
    lines = [
        f"cache: {summary['cache']}",
        f"images: {summary['images']}  computed: {summary['computed']}  reused: {summary['reused']}  "
        f"failed: {len(summary['failed'])}  extraction: {summary['seconds']:.1f} s",
        "",
        f"{'head':<8}{'split':<12}{'accuracy':>9}{'n':>6}",
    ]
    for result in outcome["heads"]:
        for split in sorted(result["metrics"], key=SPLIT_ORDER.index):
            metrics = result["metrics"][split]
            lines.append(f"{result['head']:<8}{split:<12}{metrics['accuracy']:>9.4f}{metrics['n']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help=f"labelled image tree (default: {DEFAULT_DATA}, else the public sample)")
    parser.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or an .h5 weights file")
    parser.add_argument("--base", default="mobilenet_v2", help="conv base (default: mobilenet_v2)")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--models-dir", default="data/models")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args(argv)

    if args.data:
        data = Path(args.data)
    elif DEFAULT_DATA.is_dir():
        data = DEFAULT_DATA
    else:
        print(f"{DEFAULT_DATA} not found; using the public cats-vs-dogs sample", file=sys.stderr)
        try:
            data = sample_photos()
        except SampleDownloadError as error:
            print(f"demo: error: {error}", file=sys.stderr)
            return 1
    from pipeline.bases import UnknownBaseError
    from pipeline.images import DataFolderError, scan_tree
    from pipeline.spec import SpecError, make_spec

    try:
        spec = make_spec(base=args.base, weights=args.weights)
        scan_tree(data)
    except (UnknownBaseError, SpecError, DataFolderError) as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    outcome = demo_flow(str(data), spec.to_json(), args.cache_dir, args.models_dir)
    print(json.dumps(outcome, indent=2, default=str) if args.json else results_table(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())

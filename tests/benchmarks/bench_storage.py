"""Benchmark reduced precision and the storage format of the feature cache.

Not collected by pytest. One command, ``run``, with three parts (``--parts``):

``precision``
    For each base, the forward-pass rate of the product's compiled function in float32
    and bfloat16 (``--precisions`` adds float16 where a GPU runs it), alternating them
    batch by batch. Then full caches of the
    photo tree in float32 and bfloat16, and the test accuracy of the ``logreg`` head and
    of the ``dense`` head (three seeds) trained on each.
``storage``
    The float32 cache rewritten with ``store_dtype="float16"`` by the product's own
    compaction: file size, time to read every train feature (from the page cache, and
    after ``posix_fadvise(DONTNEED)`` drops the file's pages), and head accuracy.
``chunks``
    The float32 features rewritten with several chunk sizes and HDF5 filters: write
    time, file size, time to read every train feature and time to read 64 random rows.

Example (from the repository root)::

    .venv/bin/python tests/benchmarks/bench_storage.py run --out data/reports/bench_storage.json

The photo tree defaults to the cats_vs_dogs tree beside the repository, and the ImageNet
MobileNetV2 weights to the models folder beside it. Pass ``--data`` and ``--models`` to
use others.
VGG16 runs with random weights (seed 0, saved once so that every precision runs the same
network), so its accuracy figures only compare precisions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import DEFAULT_DATA, REPO, machine_info  # noqa: E402

DEFAULT_MODELS = REPO.parent / "shared" / "models"
MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DEFAULT_BASES = ("mobilenet_v2:160", "vgg16:150")
DENSE_SEEDS = (0, 1, 2)
# (name, CHUNK_BYTES, FEATURE_FILTERS) variants of the chunks part.
CHUNK_VARIANTS: tuple[tuple[str, int, dict[str, Any]], ...] = (
    ("256k", 1 << 18, {}),
    ("1m", 1 << 20, {}),
    ("4m", 1 << 22, {}),
    ("16m", 1 << 24, {}),
    ("1m-lzf", 1 << 20, {"compression": "lzf"}),
    ("1m-shuffle-lzf", 1 << 20, {"compression": "lzf", "shuffle": True}),
    ("1m-gzip1", 1 << 20, {"compression": "gzip", "compression_opts": 1}),
    ("1m-shuffle-gzip1", 1 << 20, {"compression": "gzip", "compression_opts": 1, "shuffle": True}),
)
RANDOM_ROWS = 64


def weights_for(base: str, size: int, models: Path, work: Path) -> str:
    """Return a weights file for ``base``: the ImageNet file where there is one, else seeded random weights.

    ``--weights none`` draws new random weights on every build, so the float32 and the
    bfloat16 cache would come from two different networks. A saved file makes both
    precisions run the same weights.
    """
    if base == "mobilenet_v2" and (models / MOBILENET_V2_FILE).is_file():
        return str(models / MOBILENET_V2_FILE)
    import keras

    from pipeline.bases import build_conv_base

    path = work / f"{base}-{size}-random.weights.h5"
    if not path.exists():
        keras.utils.set_random_seed(0)
        build_conv_base(base, size, None).save_weights(path)
    return str(path)


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the cached pages of one file, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_train(cache: Path) -> tuple[float, int]:
    """Return the seconds to read every train feature of a cache as float32, and their count."""
    from pipeline.snapshot import CacheSnapshot

    started = time.perf_counter()
    with CacheSnapshot(cache) as snapshot:
        rows = snapshot.select("train")
        features = snapshot.read_features(rows)
    return time.perf_counter() - started, len(features)


def read_random(cache: Path, seed: int = 0) -> float:
    """Return the seconds to read ``RANDOM_ROWS`` random rows of a cache."""
    from pipeline.snapshot import CacheSnapshot

    with CacheSnapshot(cache) as snapshot:
        rows = np.random.default_rng(seed).choice(len(snapshot.columns), RANDOM_ROWS, replace=False)
        started = time.perf_counter()
        snapshot.read_features(np.sort(rows))
        return time.perf_counter() - started


def read_timings(cache: Path, rounds: int) -> dict[str, float]:
    """Median read times of a cache, from the page cache and after dropping it."""
    warm, cold, random_rows = [], [], []
    for _ in range(rounds):
        read_train(cache)
        warm.append(read_train(cache)[0])
        drop_page_cache(cache)
        cold.append(read_train(cache)[0])
        drop_page_cache(cache)
        random_rows.append(read_random(cache))
    return {
        "read_train_warm_seconds": round(statistics.median(warm), 4),
        "read_train_cold_seconds": round(statistics.median(cold), 4),
        "read_random_rows_cold_seconds": round(statistics.median(random_rows), 4),
    }


def head_accuracy(cache: Path, models_dir: Path) -> dict[str, Any]:
    """Train ``logreg`` once and ``dense`` once per seed; return their test accuracies."""
    from pipeline.dataset import load_dataset
    from pipeline.training import train_head

    dataset = load_dataset(cache)
    logreg = train_head(cache, "logreg", models_dir, dataset=dataset)["metrics"]["test"]["accuracy"]
    dense = [train_head(cache, "dense", models_dir, random_state=seed, dataset=dataset)["metrics"]["test"]["accuracy"]
             for seed in DENSE_SEEDS]
    return {"logreg": round(logreg, 4), "dense": [round(a, 4) for a in dense],
            "dense_mean": round(float(np.mean(dense)), 4), "test_images": len(dataset.splits["test"])}


def rewrite(source: Path, target_dir: Path, spec: Any) -> Path:
    """Rewrite every row of the cache ``source`` under ``spec`` with the product's compaction."""
    from pipeline.compact import IndexEntry, compact
    from pipeline.snapshot import CacheSnapshot

    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / spec.cache_name
    with CacheSnapshot(source) as snapshot:
        cols = snapshot.columns
        index = [IndexEntry(cols.path[i], int(cols.label[i]), cols.split[i], int(cols.size[i]), int(cols.mtime_ns[i]),
                            cols.digest[i]) for i in range(len(cols))]
        attrs = {key: value for key, value in snapshot.attrs.items() if key in ("data_root", "failed", "conflicts")}
        compact(target, spec, snapshot, index, snapshot.classes, attrs)
    return target


# --------------------------------------------------------------------------- parts


def forward_rates(spec: Any, photos: Sequence[Path], batch_size: int, rounds: int,
                  precisions: Sequence[str]) -> dict[str, float]:
    """Images per second of the compiled forward pass in each precision, alternated batch by batch."""
    from pipeline.decode import load_image
    from pipeline.extractor import FeatureExtractor

    batch = np.stack([load_image(path, spec.input_size) for path in photos[:batch_size]])
    extractors = {name: FeatureExtractor(dataclasses.replace(spec, precision=name)) for name in precisions}
    for extractor in extractors.values():
        extractor(batch)
        extractor(batch)
    seconds = dict.fromkeys(precisions, 0.0)
    for round_index in range(rounds):
        shift = round_index % len(precisions)
        for name in [*precisions[shift:], *precisions[:shift]]:
            started = time.perf_counter()
            extractors[name](batch)
            seconds[name] += time.perf_counter() - started
    return {name: round(rounds * len(batch) / seconds[name], 2) for name in precisions}


def precision_part(args: argparse.Namespace, base: str, size: int, work: Path) -> dict[str, Any]:
    """Forward-pass speed in each precision, then caches and head accuracy in float32 and bfloat16."""
    from pipeline.extract import extract_features
    from pipeline.images import scan_tree
    from pipeline.snapshot import CacheSnapshot
    from pipeline.spec import make_spec

    weights = weights_for(base, size, args.models, work)
    spec = make_spec(base, weights, size)
    photos = [entry.abs_path for entry in scan_tree(args.data).entries]
    result: dict[str, Any] = {"weights": "imagenet" if weights.endswith(MOBILENET_V2_FILE) else "random, seed 0"}
    result["forward_images_per_second"] = forward_rates(spec, photos, args.batch_size, args.forward_batches,
                                                        args.precisions.split(","))
    caches: dict[str, Path] = {}
    for precision in ("float32", "bfloat16"):
        summary = extract_features(args.data, work / f"{base}-{precision}", dataclasses.replace(spec, precision=precision),
                                   batch_size=args.batch_size)
        caches[precision] = Path(summary.cache)
        result[precision] = {"extract_seconds": summary.seconds, "extract_images_per_second": summary.images_per_second,
                             "accuracy": head_accuracy(caches[precision], work / "models")}
    with CacheSnapshot(caches["float32"]) as full, CacheSnapshot(caches["bfloat16"]) as reduced:
        order = {path: i for i, path in enumerate(reduced.columns.path)}
        reference = full.read_features(np.arange(len(full.columns)))
        other = reduced.read_features([order[path] for path in full.columns.path])
    errors = np.linalg.norm((other - reference).reshape(len(other), -1), axis=1) / np.maximum(
        np.linalg.norm(reference.reshape(len(other), -1), axis=1), 1e-12)
    result["bfloat16_feature_relative_error_median"] = round(float(np.median(errors)), 5)
    result["bfloat16_accuracy_change_points"] = {
        "logreg": round(100 * (result["bfloat16"]["accuracy"]["logreg"] - result["float32"]["accuracy"]["logreg"]), 2),
        "dense_mean": round(
            100 * (result["bfloat16"]["accuracy"]["dense_mean"] - result["float32"]["accuracy"]["dense_mean"]), 2),
    }
    result["float32_cache"] = str(caches["float32"])
    return result


def storage_part(args: argparse.Namespace, float32_cache: Path, work: Path) -> dict[str, Any]:
    """File size, read times and head accuracy of the float32 cache and its float16 rewrite."""
    from pipeline.snapshot import CacheSnapshot

    with CacheSnapshot(float32_cache) as snapshot:
        spec = snapshot.spec
    half = rewrite(float32_cache, work / f"{spec.base}-float16-store", dataclasses.replace(spec, store_dtype="float16"))
    result: dict[str, Any] = {}
    for name, cache in (("float32", float32_cache), ("float16", half)):
        result[name] = {"file_mb": round(cache.stat().st_size / 1e6, 2), **read_timings(cache, args.read_rounds),
                        "train_rows": read_train(cache)[1]}
    result["float16"]["accuracy"] = head_accuracy(half, work / "models")
    result["size_ratio"] = round(result["float16"]["file_mb"] / result["float32"]["file_mb"], 3)
    return result


def chunks_part(args: argparse.Namespace, float32_cache: Path, work: Path) -> dict[str, Any]:
    """Write time, size and read times of the features under each chunk size and filter."""
    import pipeline.store as store
    from pipeline.snapshot import CacheSnapshot

    with CacheSnapshot(float32_cache) as snapshot:
        spec = snapshot.spec
    saved = (store.CHUNK_BYTES, store.FEATURE_FILTERS)
    result: dict[str, Any] = {}
    try:
        for name, chunk_bytes, filters in CHUNK_VARIANTS:
            store.CHUNK_BYTES, store.FEATURE_FILTERS = chunk_bytes, filters
            folder = work / f"chunks-{spec.base}-{name}"
            started = time.perf_counter()
            cache = rewrite(float32_cache, folder, spec)
            write_seconds = time.perf_counter() - started
            with CacheSnapshot(cache) as snapshot:
                rows_per_chunk = snapshot.sources[0].handle["features"].chunks[0]
            result[name] = {"rows_per_chunk": rows_per_chunk, "write_seconds": round(write_seconds, 3),
                            "file_mb": round(cache.stat().st_size / 1e6, 2), **read_timings(cache, args.read_rounds)}
            shutil.rmtree(folder)
    finally:
        store.CHUNK_BYTES, store.FEATURE_FILTERS = saved
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen parts for every base and return the measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_storage-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"machine": machine_info(), "options": {k: str(v) for k, v in vars(args).items()
                                                                      if k != "func"}, "bases": {}}
    try:
        for entry in args.bases:
            base, _, size = entry.partition(":")
            record: dict[str, Any] = {}
            results["bases"][entry] = record
            record["precision"] = precision_part(args, base, int(size), work)
            print(json.dumps({entry: {"precision": record["precision"]}}), file=sys.stderr, flush=True)
            float32_cache = Path(record["precision"]["float32_cache"])
            if "storage" in parts:
                record["storage"] = storage_part(args, float32_cache, work)
                print(json.dumps({entry: {"storage": record["storage"]}}), file=sys.stderr, flush=True)
            if "chunks" in parts:
                record["chunks"] = chunks_part(args, float32_cache, work)
                print(json.dumps({entry: {"chunks": record["chunks"]}}), file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="precision, storage and chunk measurements")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-folder photo tree (default: %(default)s)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of ImageNet weights (default: %(default)s)")
    p.add_argument("--bases", type=lambda text: text.split(","), default=list(DEFAULT_BASES),
                   help="comma-separated BASE:SIZE list (default: %(default)s)")
    p.add_argument("--parts", default="precision,storage,chunks",
                   help="comma-separated parts; precision always runs because the others use its cache")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--precisions", default="float32,bfloat16",
                   help="precisions of the speed test; add float16 on a GPU (default: %(default)s)")
    p.add_argument("--forward-batches", type=int, default=30, help="batches per precision in the speed test (default: 30)")
    p.add_argument("--read-rounds", type=int, default=3, help="repetitions of each read measurement (default: 3)")
    p.add_argument("--work", type=Path, default=None, help="keep caches in this folder instead of a temporary one")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_storage: skipped, photo tree not found at {args.data}; pass --data DIR", file=sys.stderr)
        return 0
    results = args.func(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

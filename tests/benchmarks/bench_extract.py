"""Benchmark feature extraction against the speed of the conv base itself.

Not collected by pytest. Two commands:

``compare`` (the default)
    For each conv base, each round measures, one after another:

    (a) ``bound``: the compiled forward pass over a batch of photos already in memory.
        Three passes compete and the fastest counts: a plain ``tf.function``, the
        product's extractor, and the product's extractor called from two threads at once;
    (b) ``extract``: ``convcache extract`` end to end on a cold cache, in a subprocess.
        Its rate is rows computed over the ``seconds`` field of the JSON summary, which
        runs from the start of the scan to the summary and so includes importing
        TensorFlow and building the base. The "steady" rate leaves out the summary's
        ``build_seconds``;
    (c) ``classic``: a Python loop of ``conv_base.predict(batch)`` collected into a
        growing list of NumPy arrays, timed from before TensorFlow is imported, like (b).
        By default it runs twice, with batches from
        ``keras.utils.image_dataset_from_directory`` and with batches that
        ``keras.utils.load_img`` decodes in the loop, and the faster run counts;
    (d) ``cache hit``: the same ``convcache extract`` again on the now complete cache.

    The ratios b/a and b/c are taken within a round and the summary reports their
    medians, so a machine that other jobs slow down for a while shifts whole rounds
    instead of one side of a ratio. Peak resident memory of ``convcache extract`` is
    compared between a small copy of the tree and the full tree.

``levers``
    Measures each optimisation of the compute path with and without it. The variants
    alternate batch by batch or chunk by chunk, so a slow spell of the machine hits
    all of them. The levers are the batch size, the compiled and frozen function
    against ``Model.predict``, decoding on a thread pool against decoding in the
    inference thread, the number of decode threads and of inference streams, JPEG
    draft decoding, segment writes and change detection.

Examples (from the repository root)::

    .venv/bin/python tests/benchmarks/bench_extract.py compare --rounds 3 --out data/reports/bench.json
    .venv/bin/python tests/benchmarks/bench_extract.py levers --base mobilenet_v2 --input-size 160

The photo tree defaults to the cats_vs_dogs tree beside the repository; pass ``--data``.
The bases run with random weights, which cost the same time as trained ones.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cats_vs_dogs"
CONVCACHE = REPO / ".venv" / "bin" / "convcache"
DEFAULT_BASES = ("vgg16:150", "mobilenet_v2:160")
MEMORY_SAMPLE_SECONDS = 0.1
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- machine and data


def machine_info() -> dict[str, Any]:
    """Describe the CPU, the library versions and the time of the run."""
    from importlib import metadata

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("tensorflow", "keras", "pillow", "h5py", "numpy", "prefect"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def list_photos(root: Path) -> list[Path]:
    """Return the image files of a class-folder tree, in scan order (split, class, name)."""
    from pipeline.images import scan_tree

    return [entry.abs_path for entry in scan_tree(root).entries]


def subset_tree(source: Path, target: Path, count: int) -> Path:
    """Copy about ``count`` photos of ``source`` into ``target``, the same share of every class folder.

    Returns ``source`` itself when ``count`` covers the whole tree.
    """
    photos = list_photos(source)
    if count >= len(photos):
        return source
    by_folder: dict[Path, list[Path]] = {}
    for photo in photos:
        by_folder.setdefault(photo.parent, []).append(photo)
    for folder, members in by_folder.items():
        share = max(1, round(count * len(members) / len(photos)))
        destination = target / folder.relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for photo in members[:share]:
            shutil.copy2(photo, destination / photo.name)
    return target


def split_folders(root: Path) -> list[Path]:
    """Return the split folders of a tree, or the tree itself when it has none."""
    folders = [root / name for name in SPLITS if (root / name).is_dir()]
    return folders or [root]


# --------------------------------------------------------------------------- subprocess runs


class _PeakSampler(threading.Thread):
    """Sample the summed resident memory of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak_tree = 0
        self.peak_main = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.wait(MEMORY_SAMPLE_SECONDS):
            try:
                main = self.process.memory_info().rss
                tree = main + sum(child.memory_info().rss for child in self.process.children(recursive=True))
            except psutil.Error:
                continue
            self.peak_main = max(self.peak_main, main)
            self.peak_tree = max(self.peak_tree, tree)


def run_measured(command: Sequence[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a command, returning its stdout, wall time and peak memory.

    ``peak_rss_mb`` is ``ru_maxrss`` from ``wait4``: the peak of the process itself, or
    of a descendant it waited for when that one was larger. ``peak_tree_mb`` is the
    largest sum over the process tree seen by sampling every 0.1 s.
    """
    with tempfile.TemporaryFile() as stdout, open(log, "ab") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=stdout, stderr=stderr, env=env, cwd=REPO)
        sampler = _PeakSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        sampler.stopped.set()
        sampler.join()
        stdout.seek(0)
        output = stdout.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {process.returncode}; see {log}")
    return {
        "stdout": output,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_mb": round(sampler.peak_tree / 2**20, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def bench_env(prefect_home: Path, api_url: str | None) -> dict[str, str]:
    """Return the environment of the measured subprocesses."""
    env = dict(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def run_extract(data: Path, cache_dir: Path, base: str, size: int, env: dict[str, str], log: Path,
                extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``convcache extract --json`` and return its summary with timing and memory."""
    command = [str(CONVCACHE), "extract", str(data), "--base", base, "--weights", "none", "--input-size", str(size),
               "--cache-dir", str(cache_dir), "--json", *extra]
    result = run_measured(command, env, log)
    summary = json.loads(result.pop("stdout"))
    rate = summary["computed"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return {**result, "seconds": summary["seconds"], "computed": summary["computed"], "reused": summary["reused"],
            "failed": len(summary["failed"]), "built_model": summary["built_model"],
            "build_seconds": summary["build_seconds"], "images_per_second": round(rate, 2)}


def run_worker(worker: str, options: Sequence[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one of this script's worker commands in a subprocess and return its JSON line."""
    result = run_measured([sys.executable, str(Path(__file__).resolve()), worker, *options], env, log)
    lines = [line for line in result.pop("stdout").splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), **result}


class PrefectServer:
    """A ``prefect server start`` on a free loopback port, with its own database."""

    def __init__(self, home: Path, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = bench_env(home, None)
        self.log = open(log, "ab")
        self.process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(self.port)], stdout=self.log, stderr=self.log, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server responds to its health check."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1.0)
        raise RuntimeError(f"prefect server on port {self.port} did not respond within {timeout:.0f} s")

    def stop(self) -> None:
        """Terminate the server and close its log."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --------------------------------------------------------------------------- workers (run in subprocesses)


def worker_bound(args: argparse.Namespace) -> dict[str, Any]:
    """Time the compiled forward pass on one batch of photos held in memory.

    Three forward passes alternate batch by batch: ``plain``, a ``tf.function`` around the
    Keras model on preprocessed float32 input; ``product``, the
    :class:`~pipeline.extractor.FeatureExtractor` that ``convcache extract`` runs, on the
    uint8 batch; and ``product_two_streams``, two such calls at once from two threads,
    as ``convcache extract`` makes them. The bound is the fastest of the three.
    """
    started = time.perf_counter()
    import numpy as np
    import tensorflow as tf

    from pipeline.bases import build_conv_base, get_base, preprocess_function
    from pipeline.decode import load_image
    from pipeline.extractor import FeatureExtractor
    from pipeline.spec import make_spec

    imported = time.perf_counter()
    model = build_conv_base(args.base, args.input_size, None)
    built = time.perf_counter()
    pooling = get_base(args.base).default_pooling
    photos = list_photos(args.data)[: args.batch_size]
    while len(photos) < args.batch_size:
        photos += photos[: args.batch_size - len(photos)]
    batch = np.stack([load_image(photo, args.input_size) for photo in photos])
    inputs = tf.constant(preprocess_function(args.base)(batch.astype(np.float32)))

    @tf.function
    def forward(images: Any) -> Any:
        features = model(images, training=False)
        return tf.reduce_mean(features, axis=(1, 2)) if pooling == "avg" else features

    forward(inputs).numpy()
    traced = time.perf_counter()
    extractor = FeatureExtractor(make_spec(args.base, "none", args.input_size))
    product_built = time.perf_counter()
    extractor(batch)
    product_traced = time.perf_counter()

    pool = ThreadPoolExecutor(max_workers=2)

    def two_streams() -> int:
        list(pool.map(extractor, (batch, batch)))
        return 2 * len(batch)

    def one_call(function: Callable[[], Any]) -> Callable[[], int]:
        def run() -> int:
            function()
            return len(batch)
        return run

    passes = {"plain": one_call(lambda: forward(inputs).numpy()), "product": one_call(lambda: extractor(batch)),
              "product_two_streams": two_streams}
    two_streams()
    rates = _alternate_for(passes, args.seconds)
    pool.shutdown()
    return {
        "images_per_second": max(rates.values()),
        "plain_images_per_second": rates["plain"],
        "product_images_per_second": rates["product"],
        "product_two_streams_images_per_second": rates["product_two_streams"],
        "frozen": extractor.frozen,
        "import_seconds": round(imported - started, 2),
        "build_seconds": round(built - imported, 2),
        "first_call_seconds": round(traced - built, 2),
        "product_build_seconds": round(product_built - traced, 2),
        "product_first_call_seconds": round(product_traced - product_built, 2),
    }


def worker_classic(args: argparse.Namespace) -> dict[str, Any]:
    """Run the classic recipe: a ``conv_base.predict`` loop over batches, collected in a list.

    ``--loader dataset`` takes the batches from ``keras.utils.image_dataset_from_directory``
    (tf.data, which decodes on its own threads). ``--loader pil`` loads each batch in the
    loop with ``keras.utils.load_img`` and ``img_to_array``, as the ``DirectoryIterator`` of
    the removed ``ImageDataGenerator`` did.
    """
    started = time.perf_counter()
    import importlib

    import keras
    import numpy as np

    from pipeline.bases import get_base

    info = get_base(args.base)
    options: dict[str, Any] = {"include_top": False, "weights": None, "input_shape": (args.input_size,) * 2 + (3,)}
    if info.default_pooling != "none":
        options["pooling"] = info.default_pooling
    conv_base = getattr(keras.applications, info.constructor)(**options)
    preprocess_input = importlib.import_module(f"keras.applications.{info.module}").preprocess_input
    built = time.perf_counter()

    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    size = (args.input_size, args.input_size)
    for folder in split_folders(args.data):
        if args.loader == "dataset":
            dataset = keras.utils.image_dataset_from_directory(
                folder, image_size=size, batch_size=args.batch_size, shuffle=False, verbose=False
            )
            for images, batch_labels in dataset:
                features.append(conv_base.predict(preprocess_input(images), verbose=0))
                labels.append(batch_labels.numpy())
            continue
        files = [(path, label) for label, class_folder in enumerate(sorted(p for p in folder.iterdir() if p.is_dir()))
                 for path in sorted(class_folder.iterdir()) if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
        for start in range(0, len(files), args.batch_size):
            chosen = files[start : start + args.batch_size]
            images = np.stack([keras.utils.img_to_array(keras.utils.load_img(path, target_size=size))
                               for path, _ in chosen])
            features.append(conv_base.predict(preprocess_input(images), verbose=0))
            labels.append(np.array([label for _, label in chosen]))
    all_features = np.concatenate(features)
    np.concatenate(labels)
    finished = time.perf_counter()
    return {
        "images": len(all_features),
        "seconds": round(finished - started, 3),
        "loop_seconds": round(finished - built, 3),
        "images_per_second": round(len(all_features) / (finished - started), 2),
        "loop_images_per_second": round(len(all_features) / (finished - built), 2),
        "features_mb": round(all_features.nbytes / 2**20, 1),
    }


# --------------------------------------------------------------------------- compare


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rounds of (a) to (d) and the memory comparison; return every measurement."""
    work = Path(tempfile.mkdtemp(prefix="bench_extract-"))
    log = work / "subprocesses.log"
    print(f"working in {work}; subprocess output goes to {log}", file=sys.stderr)
    server = None
    api_url = None
    if args.prefect_server:
        server = PrefectServer(work / "prefect-server-home", work / "prefect-server.log")
        server.wait_ready()
        api_url = server.url
    env = bench_env(work / "prefect-home", api_url)
    results: dict[str, Any] = {"machine": machine_info(), "options": _options(args), "bases": {}}
    try:
        data = subset_tree(args.data, work / "photos", args.images)
        small = subset_tree(args.data, work / "photos-small", args.memory_images)
        for spec in args.bases:
            base, size = _base_and_size(spec)
            results["bases"][spec] = {"rounds": [], "memory": {}}
        for round_index in range(args.rounds):
            for spec in args.bases:
                base, size = _base_and_size(spec)
                record = _one_round(base, size, data, work / f"cache-{round_index}", env, log, args)
                results["bases"][spec]["rounds"].append(record)
                _print_round(spec, round_index, record)
        for spec in args.bases:
            base, size = _base_and_size(spec)
            small_run = run_extract(small, work / "cache-small", base, size, env, log)
            full_runs = [r["extract"] for r in results["bases"][spec]["rounds"]]
            results["bases"][spec]["memory"] = _memory_summary(small_run, full_runs)
            results["bases"][spec]["summary"] = _summary(results["bases"][spec]["rounds"])
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _one_round(base: str, size: int, data: Path, cache_dir: Path, env: dict[str, str], log: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    common = ["--base", base, "--input-size", str(size), "--batch-size", str(args.batch_size), "--data", str(data)]
    bound = run_worker("_bound", [*common, "--seconds", str(args.bound_seconds)], env, log)
    extract = run_extract(data, cache_dir, base, size, env, log, ["--batch-size", str(args.batch_size)])
    classic = {loader: run_worker("_classic", [*common, "--loader", loader], env, log) for loader in args.classic}
    hit = run_extract(data, cache_dir, base, size, env, log, ["--batch-size", str(args.batch_size)])
    shutil.rmtree(cache_dir, ignore_errors=True)
    # The classic loop that came out fastest in this round is the one (b) is compared with.
    fastest = max(classic, key=lambda loader: classic[loader]["images_per_second"])
    # (b) without its start-up: the seconds of the summary less the time spent importing
    # TensorFlow and building the base, which the summary reports as build_seconds.
    steady = extract["computed"] / (extract["seconds"] - extract["build_seconds"])
    return {
        "bound": bound,
        "extract": extract,
        "classic": classic,
        "cache_hit": hit,
        "fastest_classic": fastest,
        "b_over_a": round(extract["images_per_second"] / bound["images_per_second"], 3),
        "b_over_a_plain": round(extract["images_per_second"] / bound["plain_images_per_second"], 3),
        "b_over_c": round(extract["images_per_second"] / classic[fastest]["images_per_second"], 3),
        "c_over_a": round(classic[fastest]["images_per_second"] / bound["images_per_second"], 3),
        "steady_images_per_second": round(steady, 2),
        "steady_b_over_a": round(steady / bound["images_per_second"], 3),
        "steady_b_over_c": round(steady / classic[fastest]["loop_images_per_second"], 3),
        "hit_share_of_cold": round(hit["seconds"] / extract["seconds"], 4),
    }


def _memory_summary(small: dict[str, Any], full_runs: list[dict[str, Any]]) -> dict[str, Any]:
    full_peak = statistics.median(run["peak_rss_mb"] for run in full_runs)
    return {
        "small_images": small["computed"],
        "small_peak_rss_mb": small["peak_rss_mb"],
        "small_peak_tree_mb": small["peak_tree_mb"],
        "full_images": full_runs[0]["computed"],
        "full_peak_rss_mb": full_peak,
        "full_peak_tree_mb": statistics.median(run["peak_tree_mb"] for run in full_runs),
        "growth": round(full_peak / small["peak_rss_mb"] - 1, 4),
    }


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(get: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(get(r) for r in rounds), 3)

    def fastest(r: dict[str, Any]) -> dict[str, Any]:
        return r["classic"][r["fastest_classic"]]

    return {
        "bound_images_per_second": median(lambda r: r["bound"]["images_per_second"]),
        "plain_bound_images_per_second": median(lambda r: r["bound"]["plain_images_per_second"]),
        "product_bound_images_per_second": median(lambda r: r["bound"]["product_images_per_second"]),
        "extract_images_per_second": median(lambda r: r["extract"]["images_per_second"]),
        "steady_images_per_second": median(lambda r: r["steady_images_per_second"]),
        "classic_images_per_second": median(lambda r: fastest(r)["images_per_second"]),
        "classic_loop_images_per_second": median(lambda r: fastest(r)["loop_images_per_second"]),
        "b_over_a": median(lambda r: r["b_over_a"]),
        "b_over_a_plain": median(lambda r: r["b_over_a_plain"]),
        "steady_b_over_a": median(lambda r: r["steady_b_over_a"]),
        "b_over_c": median(lambda r: r["b_over_c"]),
        "steady_b_over_c": median(lambda r: r["steady_b_over_c"]),
        "c_over_a": median(lambda r: r["c_over_a"]),
        "cold_seconds": median(lambda r: r["extract"]["seconds"]),
        "cold_build_seconds": median(lambda r: r["extract"]["build_seconds"]),
        "cold_wall_seconds": median(lambda r: r["extract"]["wall_seconds"]),
        "hit_seconds": median(lambda r: r["cache_hit"]["seconds"]),
        "hit_wall_seconds": median(lambda r: r["cache_hit"]["wall_seconds"]),
        "hit_share_of_cold": median(lambda r: r["hit_share_of_cold"]),
    }


def _print_round(spec: str, index: int, r: dict[str, Any]) -> None:
    classic = ", ".join(f"classic {name} {run['images_per_second']:.1f}/s (peak {run['peak_rss_mb']:.0f} MB)"
                        for name, run in r["classic"].items())
    print(
        f"{spec} round {index}: bound {r['bound']['images_per_second']:.1f}/s, "
        f"extract {r['extract']['images_per_second']:.1f}/s ({r['extract']['seconds']:.1f} s, "
        f"build {r['extract']['build_seconds']:.1f} s, wall {r['extract']['wall_seconds']:.1f} s, "
        f"peak {r['extract']['peak_rss_mb']:.0f} MB), {classic}, "
        f"hit {r['cache_hit']['seconds']:.2f} s (wall {r['cache_hit']['wall_seconds']:.1f} s); "
        f"b/a {r['b_over_a']:.3f} (steady {r['steady_b_over_a']:.3f}), b/c {r['b_over_c']:.2f}, "
        f"load {r['extract']['load_average']:.1f}",
        flush=True,
    )


def _base_and_size(spec: str) -> tuple[str, int]:
    base, _, size = spec.partition(":")
    if not size.isdigit():
        raise SystemExit(f"bench_extract: invalid base {spec!r}; write BASE:SIZE, for example vgg16:150")
    return base, int(size)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
            if key not in ("func", "data")}


# --------------------------------------------------------------------------- levers


def levers(args: argparse.Namespace) -> dict[str, Any]:
    """Measure each optimisation of the compute path with and without it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from pipeline.compute import WorkItem, decode_original
    from pipeline.extractor import FeatureExtractor
    from pipeline.images import scan_tree
    from pipeline.spec import make_spec

    work = Path(tempfile.mkdtemp(prefix="bench_levers-"))
    spec = make_spec(args.base, "none", args.input_size)
    manifest = scan_tree(args.data)
    entries = manifest.entries[: args.images]
    items = [WorkItem(entry, f"{index:032x}") for index, entry in enumerate(entries)]
    extractor = FeatureExtractor(spec)
    images = np.stack([decode_original(item, spec) for item in items])
    extractor(images[: args.batch_size])
    results: dict[str, Any] = {"machine": machine_info(), "options": _options(args)}
    chosen = [name.strip() for name in args.only.split(",")] if args.only else list(LEVERS)
    try:
        for name in chosen:
            print(f"lever {name} ...", file=sys.stderr, flush=True)
            results[name] = LEVERS[name](args, spec, extractor, images, items, manifest.classes, work)
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _alternate_for(variants: dict[str, Callable[[], int]], seconds: float) -> dict[str, float]:
    """Call every variant in rotating order for at least ``seconds`` (at least 4 rounds); return items per second."""
    names = list(variants)
    spent = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    started = time.perf_counter()
    round_index = 0
    while round_index < 4 or time.perf_counter() - started < seconds:
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call_started = time.perf_counter()
            counts[name] += variants[name]()
            spent[name] += time.perf_counter() - call_started
        round_index += 1
    return {name: round(counts[name] / spent[name], 2) for name in names}


def _alternate(variants: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Call every variant once per round, in rotating order; return items per second of each.

    Each call returns how many items it processed. Every variant runs once untimed first.
    Rotating the order spreads a slow spell of the machine over all variants.
    """
    names = list(variants)
    seconds = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for name in names:  # untimed: first calls pay for thread pools and oneDNN primitives
        variants[name]()
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            counts[name] += variants[name]()
            seconds[name] += time.perf_counter() - started
    return {name: round(counts[name] / seconds[name], 2) for name in names}


def lever_batch_size(args: argparse.Namespace, spec: Any, extractor: Any, images: Any, *_: Any) -> dict[str, Any]:
    """Forward-pass rate of the product's compiled function at several batch sizes."""
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    per_call = max(sizes)

    def run(batch: int) -> Callable[[], int]:
        def call() -> int:
            for start in range(0, per_call, batch):
                extractor(images[start : start + batch])
            return per_call
        return call

    return {"images_per_second": _alternate({str(size): run(size) for size in sizes}, args.rounds)}


def lever_compiled(args: argparse.Namespace, spec: Any, extractor: Any, images: Any, *_: Any) -> dict[str, Any]:
    """``Model.predict`` per batch against the compiled function, unfrozen and frozen, on the same batch."""
    import numpy as np

    from pipeline.bases import preprocess_function
    from pipeline.extractor import FeatureExtractor, _frozen

    preprocess = preprocess_function(spec.base)
    batch = images[: args.batch_size]
    unfrozen = FeatureExtractor(spec, freeze=False)
    started = time.perf_counter()
    _frozen(unfrozen._forward)
    freeze_seconds = time.perf_counter() - started
    frozen = FeatureExtractor(spec, freeze=True)

    def predict() -> int:
        features = unfrozen.model.predict(preprocess(batch.astype(np.float32)), verbose=0)
        if spec.pooling == "avg":
            features.mean(axis=(1, 2))
        return len(batch)

    def call(function: Any) -> Callable[[], int]:
        def run() -> int:
            function(batch)
            return len(batch)
        return run

    variants = {"predict": predict, "function": call(unfrozen), "frozen": call(frozen)}
    rates = _alternate(variants, args.rounds * 4)
    return {"images_per_second": rates, "freeze_seconds": round(freeze_seconds, 2),
            "function_over_predict": round(rates["function"] / rates["predict"], 3),
            "frozen_over_function": round(rates["frozen"] / rates["function"], 3)}


def lever_decode(args: argparse.Namespace, spec: Any, extractor: Any, images: Any, items: Any, *_: Any) -> dict[str, Any]:
    """CPU time of one decode with and without JPEG draft mode, and how far the pixels move."""
    import numpy as np

    from pipeline.decode import load_image

    sample = [item.entry.abs_path for item in items[: args.decode_sample]]
    cpu: dict[str, float] = {}
    for draft in (False, True, False, True):
        started = time.process_time()
        for path in sample:
            load_image(path, spec.input_size, resize=spec.resize, draft=draft)
        key = "draft" if draft else "full"
        cpu[key] = min(cpu.get(key, float("inf")), (time.process_time() - started) / len(sample) * 1000)
    differences = [
        np.abs(load_image(path, spec.input_size, draft=True).astype(np.int16)
               - load_image(path, spec.input_size, draft=False).astype(np.int16)).mean()
        for path in sample
    ]
    return {
        "cpu_ms_per_image": {key: round(value, 3) for key, value in cpu.items()},
        "mean_abs_difference": round(float(np.mean(differences)), 3),
        "worst_image_mean_abs_difference": round(float(np.max(differences)), 3),
        "images": len(sample),
    }


def lever_pipeline(args: argparse.Namespace, spec: Any, extractor: Any, images: Any, items: Any, classes: Any,
                   work: Path) -> dict[str, Any]:
    """Compare decoding in the inference thread with ``compute_rows`` under several settings.

    The settings are 1 or 2 decode threads, 1 or 2 inference streams, and no draft mode.
    The forward pass alone, in 1 and in 2 streams, runs beside them as the reference.
    """
    import dataclasses

    import numpy as np

    from pipeline.compute import compute_rows, decode_original

    chunk = args.chunk
    full_decode = dataclasses.replace(spec, jpeg_draft=False)
    position = {"next": 0}

    def next_items() -> list[Any]:
        start = position["next"] % max(1, len(items) - chunk + 1)
        position["next"] += chunk
        return items[start : start + chunk]

    def serial() -> int:
        chosen = next_items()
        for start in range(0, len(chosen), args.batch_size):
            extractor(np.stack([decode_original(item, spec) for item in chosen[start : start + args.batch_size]]))
        return len(chosen)

    def pooled(workers: int, use_spec: Any, streams: int = 2) -> Callable[[], int]:
        def call() -> int:
            chosen = next_items()
            folder = Path(tempfile.mkdtemp(dir=work))
            compute_rows(folder / "bench.h5", use_spec, classes, chosen, extractor, batch_size=args.batch_size,
                         decode_workers=workers, streams=streams)
            shutil.rmtree(folder)
            return len(chosen)
        return call

    def bound() -> int:
        for start in range(0, chunk, args.batch_size):
            extractor(images[start : start + args.batch_size])
        return chunk

    inference = ThreadPoolExecutor(max_workers=2)

    def bound_two_streams() -> int:
        list(inference.map(extractor, [images[start : start + args.batch_size]
                                       for start in range(0, chunk, args.batch_size)]))
        return chunk

    rates = _alternate(
        {"bound": bound, "bound_two_streams": bound_two_streams, "serial": serial, "workers_1": pooled(1, spec),
         "workers_2": pooled(2, spec), "workers_2_one_stream": pooled(2, spec, streams=1),
         "workers_2_no_draft": pooled(2, full_decode)},
        args.rounds,
    )
    inference.shutdown()
    return {"images_per_second": rates,
            "share_of_bound": {name: round(rate / rates["bound"], 3) for name, rate in rates.items()}}


def lever_writes(args: argparse.Namespace, spec: Any, extractor: Any, images: Any, items: Any, classes: Any,
                 work: Path) -> dict[str, Any]:
    """Seconds that segment commits and the final compaction take for the rows of this run."""
    import numpy as np

    from pipeline.compact import IndexEntry, compact
    from pipeline.snapshot import CacheSnapshot
    from pipeline.store import Rows, publish_segment

    features = extractor(images[: args.batch_size])
    per_row = features.nbytes // len(features)
    commit_rows = 512
    cache = work / "writes" / spec.cache_name
    cache.parent.mkdir()
    timings = []
    for start in range(0, len(items), commit_rows):
        chosen = items[start : start + commit_rows]
        rows = Rows(
            features=np.repeat(features[:1], len(chosen), axis=0),
            digest=[item.digest for item in chosen],
            path=[item.entry.path for item in chosen],
            label=np.array([item.entry.label for item in chosen], np.int32),
            split=[item.entry.split for item in chosen],
            size=np.array([item.entry.size for item in chosen], np.int64),
            mtime_ns=np.array([item.entry.mtime_ns for item in chosen], np.int64),
            view=np.zeros(len(chosen), np.int16),
            present=np.ones(len(chosen), bool),
        )
        started = time.perf_counter()
        publish_segment(cache, spec, classes, rows)
        timings.append(time.perf_counter() - started)
    index = [IndexEntry(i.entry.path, i.entry.label, i.entry.split, i.entry.size, i.entry.mtime_ns, i.digest)
             for i in items]
    started = time.perf_counter()
    with CacheSnapshot(cache) as snapshot:
        compact(cache, spec, snapshot, index, classes, {})
    compaction = time.perf_counter() - started
    return {
        "rows": len(items),
        "row_bytes": int(per_row),
        "segment_seconds_total": round(sum(timings), 3),
        "segment_seconds_per_512_rows": round(statistics.median(timings), 4),
        "compaction_seconds": round(compaction, 3),
    }


def lever_change_detection(args: argparse.Namespace, spec: Any, *_: Any) -> dict[str, Any]:
    """A re-run's planning: size and modification time against hashing every file (xxh3 or sha256)."""
    import numpy as np

    from pipeline.extract import extract_features, plan_extraction
    from pipeline.images import file_digest, scan_tree
    from pipeline.snapshot import CacheSnapshot

    cache_dir = Path(tempfile.mkdtemp(prefix="bench_hash-"))
    try:
        # Rows need features of some shape; a one-value stand-in keeps this lever free of the conv base.
        summary = extract_features(args.data, cache_dir, spec,
                                   extractor_factory=lambda _spec: lambda batch: np.zeros((len(batch), 1), np.float32))
        manifest = scan_tree(args.data)
        paths = [entry.abs_path for entry in manifest.entries]
        total_bytes = sum(entry.size for entry in manifest.entries)

        def sha256(path: Path) -> str:
            return hashlib.sha256(path.read_bytes()).hexdigest()

        timings: dict[str, list[float]] = {"plan_size_mtime": [], "xxh3_all": [], "sha256_all": []}
        for _ in range(args.rounds):
            started = time.perf_counter()
            with CacheSnapshot(summary.cache) as snapshot:
                plan = plan_extraction(scan_tree(args.data), snapshot)
            timings["plan_size_mtime"].append(time.perf_counter() - started)
            for name, digest in (("xxh3_all", file_digest), ("sha256_all", sha256)):
                started = time.perf_counter()
                for path in paths:
                    digest(path)
                timings[name].append(time.perf_counter() - started)
        assert not plan.todo
        return {"files": len(paths), "megabytes": round(total_bytes / 1e6, 1),
                "seconds": {name: round(statistics.median(values), 3) for name, values in timings.items()}}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


LEVERS: dict[str, Callable[..., dict[str, Any]]] = {
    "batch_size": lever_batch_size,
    "compiled": lever_compiled,
    "decode": lever_decode,
    "pipeline": lever_pipeline,
    "writes": lever_writes,
    "change_detection": lever_change_detection,
}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the benchmark and its worker commands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-folder photo tree (default: %(default)s)")
    common.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", parents=[common],
                       help="(a) bound, (b) extract, (c) classic loop, (d) cache hit, and memory")
    p.add_argument("--bases", type=lambda text: text.split(","), default=list(DEFAULT_BASES),
                   help="comma-separated BASE:SIZE list (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a) to (d) per base (default: 3)")
    p.add_argument("--images", type=int, default=10**9, help="photos per round; default: the whole tree")
    p.add_argument("--memory-images", type=int, default=800, help="photos of the small tree (default: 800)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of (a), (b) and (c) (default: 32)")
    p.add_argument("--classic", type=lambda text: text.split(","), default=["dataset", "pil"],
                   help="classic loops to run: dataset, pil or both (default: dataset,pil)")
    p.add_argument("--bound-seconds", type=float, default=30.0, help="seconds the bound is timed (default: 30)")
    p.add_argument("--prefect-server", action="store_true",
                   help="start 'prefect server start' on loopback and point the CLI runs at it")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.set_defaults(func=compare)

    p = sub.add_parser("levers", parents=[common], help="each optimisation with and without it")
    p.add_argument("--base", default="mobilenet_v2", help="conv base (default: mobilenet_v2)")
    p.add_argument("--input-size", type=int, default=160, help="input size in pixels (default: 160)")
    p.add_argument("--images", type=int, default=640, help="photos decoded into memory (default: 640)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--batch-sizes", default="8,16,32,64,128", help="batch sizes to compare (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=320, help="photos per call in the pipeline lever (default: 320)")
    p.add_argument("--decode-sample", type=int, default=300, help="photos in the decode lever (default: 300)")
    p.add_argument("--rounds", type=int, default=3, help="alternations per lever (default: 3)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(LEVERS)}")
    p.set_defaults(func=levers)

    for name, func in (("_bound", worker_bound), ("_classic", worker_classic)):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--base", required=True)
        p.add_argument("--input-size", type=int, required=True)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--seconds", type=float, default=30.0)
        p.add_argument("--loader", choices=("dataset", "pil"), default="dataset")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark command named on the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_extract: skipped, photo tree not found at {args.data}; pass --data DIR", file=sys.stderr)
        return 0
    if args.command == "compare" and not CONVCACHE.exists():
        print(f"bench_extract: {CONVCACHE} not found; run 'make install' first", file=sys.stderr)
        return 1
    results = args.func(args)
    if args.command.startswith("_"):
        print(json.dumps(results))  # one line that run_worker reads
        return 0
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

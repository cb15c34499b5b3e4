"""Kill real extraction runs with SIGKILL at random moments and check the cache after each kill.

Not collected by pytest. Three commands:

``run``
    The stress test. It copies a few hundred real photos and computes reference
    features with a clean extraction. Then it starts extraction subprocesses and kills
    each one with SIGKILL, either after a random delay or at a random injected kill
    point: before or after a segment or cache rename, at a temporary-file write, or
    before an absorbed segment is deleted. After every kill it checks that the cache
    opens, that each row is aligned with its image and matches the reference features,
    and that no digest appears twice. Some kills are followed by a completing re-run
    that must compute exactly the rows that are missing. Prints a JSON report.

``extract``
    One extraction subprocess, used by ``run`` and by ``tests/test_crash.py`` and
    ``tests/test_concurrency.py``. It prints one JSON event per line on stdout
    (``locked``, ``computing``, ``segment``, ``compacting``, ``published``, ``summary``)
    and can kill itself at an injected point (``--kill-at EVENT:N``).

``hold-lock``
    Take a cache's writer lock, print ``locked`` and sleep, so tests can hold the lock
    from another process.

Example (from the repository root)::

    .venv/bin/python tests/benchmarks/stress_kill.py run --photos 300 --trials 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO.parent / "shared" / "data" / "cats_vs_dogs"
WEIGHTS = REPO.parent / "shared" / "models" / "mobilenet_2_5_224_tf_no_top.h5"

# Injected kill points. Each is counted per run; "EVENT:N" kills at the N-th occurrence.
KILL_EVENTS = (
    "batch",  # before the N-th inference batch, so that batch is lost
    "tmp_write",  # at the N-th write into any temporary file (segment or cache)
    "segment_rename",  # before the N-th segment's os.replace: its temporary file is left
    "segment_renamed",  # after the N-th segment's os.replace, before the folder fsync
    "cache_rename",  # compaction: before os.replace of the cache file
    "cache_renamed",  # compaction: after os.replace of the cache file, before the folder fsync
    "segment_unlink",  # compaction: before deleting the N-th absorbed segment
)


_EMIT_LOCK = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Write one JSON event line and flush, so that the parent reads it even if a kill follows."""
    with _EMIT_LOCK:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- extract child


class KillSwitch:
    """Count events and SIGKILL this process at the configured one."""

    def __init__(self, spec: str | None) -> None:
        self.event, self.at = None, 0
        if spec:
            event, _, count = spec.partition(":")
            if event not in KILL_EVENTS:
                raise SystemExit(f"unknown kill event {event!r}; valid events: {', '.join(KILL_EVENTS)}")
            self.event, self.at = event, int(count or 1)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, event: str) -> None:
        with self._lock:
            self.counts[event] += 1
            if event == self.event and self.counts[event] == self.at:
                emit("killing", at=f"{event}:{self.at}")
                os.kill(os.getpid(), signal.SIGKILL)


def install_hooks(cache_path: Path, kill: KillSwitch, gate: Path | None, batch_delay: float) -> Callable[..., Any]:
    """Patch os.replace, os.unlink and the temporary-file writer; return an extractor factory."""
    import pipeline.extract
    import pipeline.store
    from pipeline.extractor import FeatureExtractor

    parts = pipeline.store.parts_dir(cache_path)
    real_replace, real_unlink = os.replace, os.unlink
    real_write = pipeline.store._LatchingFile.write
    real_publish = pipeline.extract.publish_cache
    segments = Counter[str]()

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        target = Path(dst)
        kind = None
        if target == cache_path:
            kind = "cache"
        elif target.parent == parts:
            kind = "segment"
        if kind:
            kill.hit(f"{kind}_rename")
        real_replace(src, dst, *args, **kwargs)
        if kind:
            kill.hit(f"{kind}_renamed")
        if kind == "segment":
            segments["n"] += 1
            emit("segment", n=segments["n"])
            if gate is not None and segments["n"] == 1:
                emit("gated")
                while not gate.exists():
                    time.sleep(0.02)
        elif kind == "cache":
            emit("published")

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        target = Path(path)
        if target.parent == parts and target.name.startswith("seg-"):
            kill.hit("segment_unlink")
        real_unlink(path, *args, **kwargs)

    def write(self: Any, data: Any) -> int:
        kill.hit("tmp_write")
        return real_write(self, data)

    def publish(*args: Any, **kwargs: Any) -> int:
        emit("compacting")
        return real_publish(*args, **kwargs)

    os.replace, os.unlink = replace, unlink
    pipeline.store._LatchingFile.write = write
    pipeline.extract.publish_cache = publish

    def factory(spec: Any) -> Callable[[Any], Any]:
        extractor = warmed_up(FeatureExtractor(spec), spec.input_size)

        def run(images: Any) -> Any:
            kill.hit("batch")
            if batch_delay:
                time.sleep(batch_delay)
            return extractor(images)

        emit("computing")
        return run

    return factory


def warmed_up(extractor: Any, input_size: int) -> Any:
    """Trace the extractor's function once, so that timing starts with real batches."""
    import numpy as np

    extractor(np.zeros((1, input_size, input_size, 3), np.uint8))
    return extractor


def kill_phase(events: list[dict[str, Any]]) -> str:
    """Name the step a run had reached when it was killed, from its events."""
    names = {e["event"] for e in events}
    for event, phase in (
        ("summary", "after the run finished"),
        ("published", "after the cache rename"),
        ("compacting", "during compaction"),
        ("segment", "between segment commits"),
        ("computing", "before the first commit"),
    ):
        if event in names:
            return phase
    return "before computing"


def command_extract(args: argparse.Namespace) -> int:
    """Run one extraction with the requested kill point, gate and limits."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.max_file_bytes:
        # A write past the limit then fails with EFBIG, the same path as a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_bytes, resource.RLIM_INFINITY))

    import pipeline.extract
    from pipeline.locking import CacheLock
    from pipeline.spec import make_spec

    spec = make_spec("mobilenet", str(args.weights), input_size=args.input_size, alpha=args.alpha)
    cache_path = Path(args.cache).resolve() / spec.cache_name
    factory = install_hooks(cache_path, KillSwitch(args.kill_at), args.gate, args.batch_delay)

    class ReportingLock(CacheLock):
        def __enter__(self) -> CacheLock:
            emit("lock-wait", pid=os.getpid())
            super().__enter__()
            emit("locked", pid=os.getpid())
            return self

    pipeline.extract.CacheLock = ReportingLock  # type: ignore[misc]
    summary = pipeline.extract.extract_features(
        args.data,
        Path(args.cache).resolve(),
        spec,
        batch_size=args.batch_size,
        commit_rows=args.commit_rows,
        lock_timeout=args.lock_timeout,
        decode_workers=2,
        extractor_factory=factory,
    )
    emit("summary", **summary.to_dict())
    return 0


def command_hold_lock(args: argparse.Namespace) -> int:
    """Hold the writer lock of a cache file for ``--seconds``."""
    from pipeline.locking import CacheLock

    with CacheLock(Path(args.cache_file), timeout=5):
        emit("locked", pid=os.getpid())
        time.sleep(args.seconds)
    return 0


# --------------------------------------------------------------------------- stress run


def copy_photos(target: Path, per_class: dict[str, int]) -> Path:
    """Copy the first photos of each class of each split into ``target``."""
    for split, count in per_class.items():
        for class_dir in sorted((PHOTOS / split).iterdir()):
            destination = target / split / class_dir.name
            destination.mkdir(parents=True, exist_ok=True)
            for photo in sorted(class_dir.iterdir())[:count]:
                shutil.copy2(photo, destination / photo.name)
    return target


def check_cache(cache_path: Path, spec: Any, tree: Path, reference: dict[str, Any]) -> int:
    """Check a cache against the photos and the reference features; return its row count.

    Raises AssertionError for a misaligned row, a wrong feature vector, a duplicate
    digest or a temporary file left behind while no writer runs.
    """
    import numpy as np

    from pipeline.images import file_digest
    from pipeline.snapshot import CacheSnapshot
    from pipeline.store import list_segments

    if not cache_path.exists() and not list_segments(cache_path):
        return 0
    with CacheSnapshot(cache_path, expected_digest=spec.digest) as snapshot:
        cols = snapshot.columns
        originals = [i for i in range(len(cols)) if cols.view[i] == 0]
        digests = [cols.digest[i] for i in originals]
        assert len(set(digests)) == len(digests), f"duplicate digests among {len(digests)} rows"
        features = snapshot.read_features(originals)
        for k, i in enumerate(originals):
            path = cols.path[i]
            split, class_name, _ = path.split("/")
            assert file_digest(tree / path) == cols.digest[i], f"row {i}: digest does not match {path}"
            assert snapshot.classes[cols.label[i]] == class_name, f"row {i}: label does not match {path}"
            assert cols.split[i] == split, f"row {i}: split does not match {path}"
            assert np.allclose(features[k], reference[cols.digest[i]], rtol=1e-4, atol=1e-5), f"row {i}: features"
        return len(originals)


def reference_features(
    tree: Path, workdir: Path, spec: Any, extractor: Any, batch_size: int
) -> tuple[dict[str, Any], float]:
    """Extract the tree cleanly in this process; return features by digest and rows per second.

    The rate covers scan, hashing, decoding, inference and compaction, like the part of
    a child run after it built its model.
    """
    from pipeline.extract import extract_features
    from pipeline.snapshot import CacheSnapshot

    summary = extract_features(tree, workdir / "reference", spec, batch_size=batch_size, commit_rows=10_000,
                               decode_workers=2, extractor_factory=lambda _spec: extractor)
    with CacheSnapshot(summary.cache) as snapshot:
        rows = snapshot.select()
        features = snapshot.read_features(rows)
        reference = {snapshot.columns.digest[i]: features[k] for k, i in enumerate(rows)}
    return reference, summary.images_per_second


def run_child(args: list[str], kill_after: Callable[[list[dict[str, Any]]], float | None]) -> tuple[int, list[dict]]:
    """Start an ``extract`` child; SIGKILL it ``kill_after(events)`` seconds after it starts computing."""
    process = subprocess.Popen(
        [sys.executable, __file__, "extract", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    events: list[dict[str, Any]] = []
    timer: threading.Timer | None = None
    assert process.stdout is not None
    for line in process.stdout:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if timer is None and events[-1]["event"] in ("computing", "compacting"):
            delay = kill_after(events)
            if delay is not None:
                timer = threading.Timer(delay, process.send_signal, (signal.SIGKILL,))
                timer.start()
    returncode = process.wait()
    if timer is not None:
        timer.cancel()
    return returncode, events


def command_run(args: argparse.Namespace) -> int:
    """Run the stress test and print a JSON report."""
    from pipeline.extract import extract_features
    from pipeline.extractor import FeatureExtractor
    from pipeline.spec import make_spec

    if not PHOTOS.is_dir() or not WEIGHTS.is_file():
        print(f"photos ({PHOTOS}) or weights ({WEIGHTS}) not found; nothing to run", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="convcache-stress-"))
    per_split = {"train": args.photos * 2 // 6, "validation": args.photos // 12, "test": args.photos // 12}
    tree = copy_photos(workdir / "photos", per_split)
    total = sum(1 for _ in tree.rglob("*.jpg"))
    spec = make_spec("mobilenet", str(WEIGHTS), input_size=args.input_size, alpha=0.25)
    started = time.time()
    extractor = warmed_up(FeatureExtractor(spec), args.input_size)
    reference, rows_per_second = reference_features(tree, workdir, spec, extractor, args.batch_size)
    cache_dir = workdir / "cache"
    cache_path = cache_dir / spec.cache_name
    child_args = [
        "--data", str(tree), "--cache", str(cache_dir), "--weights", str(WEIGHTS),
        "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
        "--commit-rows", str(args.commit_rows),
    ]

    modes = ["delay"] * args.delay_trials + ["inject"] * (args.trials - args.delay_trials)
    rng.shuffle(modes)
    trials: list[dict[str, Any]] = []
    committed = 0
    reruns = 0
    for number, mode in enumerate(modes, 1):
        if committed == total:
            shutil.rmtree(cache_dir)
            committed = 0
        missing = total - committed
        trial: dict[str, Any] = {"trial": number, "mode": mode, "committed_before": committed}
        extra: list[str] = []
        if mode == "inject":
            event = rng.choice(KILL_EVENTS)
            limits = {
                "batch": max(1, missing // args.batch_size),
                "tmp_write": 40,
                "segment_rename": max(1, missing // args.commit_rows),
                "segment_renamed": max(1, missing // args.commit_rows),
                "segment_unlink": max(1, missing // args.commit_rows),
            }
            trial["kill_at"] = f"{event}:{rng.randint(1, limits.get(event, 1))}"
            extra = ["--kill-at", trial["kill_at"]]

        def delay_for(events: list[dict[str, Any]], trial: dict[str, Any] = trial, missing: int = missing) -> float | None:
            if trial["mode"] != "delay":
                return None
            trial["delay_s"] = round(rng.uniform(0.0, 1.1 * missing / rows_per_second + 0.2), 3)
            return trial["delay_s"]

        returncode, events = run_child(child_args + extra, delay_for)
        trial["killed"] = returncode == -signal.SIGKILL
        trial["returncode"] = returncode
        trial["phase"] = kill_phase(events)
        trial["segments_seen"] = sum(1 for e in events if e["event"] == "segment")
        after = check_cache(cache_path, spec, tree, reference)
        assert after >= committed, f"trial {number}: {committed} committed rows before the kill, {after} after"
        trial["committed_after"] = committed = after
        if trial["killed"] and rng.random() < args.rerun_fraction:
            summary = extract_features(tree, cache_dir, spec, batch_size=args.batch_size,
                                       commit_rows=args.commit_rows, extractor_factory=lambda _spec: extractor)
            assert summary.computed == total - committed, f"re-run computed {summary.computed}, {total - committed} missing"
            committed = check_cache(cache_path, spec, tree, reference)
            assert committed == total, f"re-run left {total - committed} rows missing"
            trial["rerun_computed"] = summary.computed
            reruns += 1
        trials.append(trial)
        print(json.dumps(trial), file=sys.stderr, flush=True)

    summary = extract_features(tree, cache_dir, spec, batch_size=args.batch_size, commit_rows=args.commit_rows,
                               extractor_factory=lambda _spec: extractor)
    assert summary.computed == total - committed, f"final re-run computed {summary.computed}, {total - committed} missing"
    final_rows = check_cache(cache_path, spec, tree, reference)
    assert final_rows == total, f"final cache holds {final_rows} of {total} rows"
    leftovers = [p.name for p in cache_dir.rglob(".*tmp-*")]
    killed = [t for t in trials if t["killed"]]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "photos": total,
        "commit_rows": args.commit_rows,
        "batch_size": args.batch_size,
        "trials": len(trials),
        "kills": len(killed),
        "kills_by_mode": dict(Counter(t["mode"] for t in killed)),
        "kills_by_phase": dict(Counter(t["phase"] for t in killed)),
        "kills_by_injected_point": dict(Counter(t["kill_at"].split(":")[0] for t in killed if "kill_at" in t)),
        "not_killed": len(trials) - len(killed),
        "completing_reruns": reruns + 1,
        "final_rerun_computed": summary.computed,
        "final_rows": final_rows,
        "temporary_files_left": leftovers,
        "seconds": round(time.time() - started, 1),
        "failures": 0,
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one of the commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="kill extraction runs at random and check the cache after each kill")
    run.add_argument("--photos", type=int, default=300, help="number of photos to copy (default: 300)")
    run.add_argument("--trials", type=int, default=30, help="number of extraction runs to start (default: 30)")
    run.add_argument("--delay-trials", type=int, default=20,
                     help="how many of the trials are killed after a random delay; the rest at an injected point")
    run.add_argument("--rerun-fraction", type=float, default=0.3,
                     help="share of kills followed by a completing re-run (default: 0.3)")
    run.add_argument("--commit-rows", type=int, default=8, help="rows per committed segment (default: 8)")
    run.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default: 8)")
    run.add_argument("--input-size", type=int, default=96, help="input size in pixels (default: 96)")
    run.add_argument("--seed", type=int, default=0, help="random seed of delays and kill points (default: 0)")
    run.add_argument("--keep", action="store_true", help="keep the work folder")
    run.set_defaults(func=command_run)

    extract = commands.add_parser("extract", help="one extraction subprocess with optional injected faults")
    extract.add_argument("--data", type=Path, required=True, help="image tree")
    extract.add_argument("--cache", type=Path, required=True, help="cache folder")
    extract.add_argument("--weights", type=Path, default=WEIGHTS, help="MobileNet alpha 0.25 weights file")
    extract.add_argument("--input-size", type=int, default=96, help="input size in pixels (default: 96)")
    extract.add_argument("--alpha", type=float, default=0.25, help="MobileNet width multiplier (default: 0.25)")
    extract.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default: 8)")
    extract.add_argument("--commit-rows", type=int, default=8, help="rows per committed segment (default: 8)")
    extract.add_argument("--lock-timeout", type=float, default=120.0, help="seconds to wait for the lock")
    extract.add_argument("--kill-at", default=None, help=f"EVENT:N with EVENT one of {', '.join(KILL_EVENTS)}")
    extract.add_argument("--gate", type=Path, default=None,
                         help="after the first segment, wait until this file exists")
    extract.add_argument("--batch-delay", type=float, default=0.0, help="seconds to sleep before each batch")
    extract.add_argument("--max-file-bytes", type=int, default=0,
                         help="RLIMIT_FSIZE for this process, so larger writes fail with EFBIG")
    extract.set_defaults(func=command_extract)

    hold = commands.add_parser("hold-lock", help="hold a cache's writer lock")
    hold.add_argument("--cache-file", type=Path, required=True, help="cache file whose lock to take")
    hold.add_argument("--seconds", type=float, default=60.0, help="how long to hold it (default: 60)")
    hold.set_defaults(func=command_hold_lock)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Feature spec: every setting that changes the cached features, and its digest.

Two runs reuse each other's rows only when their specs have the same digest. Library
versions are stored beside the spec as metadata and are not part of the digest, so an
upgrade of TensorFlow or Pillow keeps the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bases import get_base
from pipeline.images import RESIZE_METHODS

SPEC_VERSION = 1
POOLINGS = ("none", "avg", "max")
PRECISIONS = ("float32", "bfloat16", "float16")
STORE_DTYPES = ("float32", "float16")
# Upper bound on --input-size, against typos like 99999 that would exhaust memory.
MAX_INPUT_SIZE = 1024
# Decoding settings that are part of the spec: JPEG draft decoding changes pixels slightly.
DEFAULT_RESIZE = "bilinear"


class SpecError(ValueError):
    """Raised for an invalid feature spec setting."""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes the features of one image.

    ``weights`` is how the user named the weights (``imagenet``, ``none`` or a path)
    and is kept for display only; ``weights_digest`` is what identifies them.
    """

    base: str
    weights: str
    weights_digest: str
    input_size: int
    layer: str | None = None
    pooling: str = "avg"
    alpha: float | None = None
    preprocessing: str = ""
    resize: str = DEFAULT_RESIZE
    jpeg_draft: bool = True
    exif_transpose: bool = True
    precision: str = "float32"
    store_dtype: str = "float32"
    augmentation: str | None = None
    version: int = SPEC_VERSION

    def key_fields(self) -> dict[str, Any]:
        """Return the fields that enter the digest (everything except the weights label)."""
        fields = dataclasses.asdict(self)
        fields.pop("weights")
        return fields

    @property
    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of :meth:`key_fields`."""
        payload = json.dumps(self.key_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def cache_name(self) -> str:
        """File name of this spec's cache, for example ``vgg16-150-none-3fa2c91b0d7e.h5``."""
        layer = f"-{self.layer}" if self.layer else ""
        return f"{self.base}-{self.input_size}{layer}-{self.pooling}-{self.digest[:12]}.h5"

    def to_json(self) -> str:
        """Serialise the spec, including the weights label, as sorted JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        """Rebuild a spec written by :meth:`to_json`."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"feature spec has unknown fields {sorted(unknown)}; it was written by a newer convcache")
        return cls(**data)


def check_geometry(base: str, input_size: int | None, alpha: float | None) -> tuple[int, float | None]:
    """Validate input size and width multiplier for ``base``; returns them with defaults filled in."""
    info = get_base(base)
    size = info.default_size if input_size is None else int(input_size)
    if size < info.min_size:
        raise SpecError(f"input size {size} is too small for {base}; use at least {info.min_size} pixels")
    if size > MAX_INPUT_SIZE:
        raise SpecError(
            f"input size {size} is larger than {MAX_INPUT_SIZE} pixels; the ImageNet bases were trained at "
            f"600 px or less, and larger inputs only multiply memory. Pass --input-size {MAX_INPUT_SIZE} or less."
        )
    if info.alphas:
        alpha = 1.0 if alpha is None else float(alpha)
        if alpha not in info.alphas:
            valid = ", ".join(str(a) for a in info.alphas)
            raise SpecError(f"invalid alpha {alpha} for {base}; valid choices: {valid}")
    elif alpha is not None:
        raise SpecError(f"base {base!r} has no width multiplier; drop --alpha")
    return size, alpha


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_spec(
    base: str = "vgg16",
    weights: str = "imagenet",
    input_size: int | None = None,
    layer: str | None = None,
    pooling: str | None = None,
    alpha: float | None = None,
    resize: str = DEFAULT_RESIZE,
    jpeg_draft: bool = True,
    exif_transpose: bool = True,
    precision: str = "float32",
    store_dtype: str = "float32",
    augmentation: str | None = None,
) -> FeatureSpec:
    """Validate the settings and build a :class:`FeatureSpec`.

    The weights are resolved to a file and hashed here (``imagenet`` is looked up in,
    or downloaded into, the Keras cache), but no model is built.

    Raises
    ------
    UnknownBaseError, SpecError
        For an unknown base or an invalid value, naming the valid choices.
    """
    info = get_base(base)
    size, alpha = check_geometry(base, input_size, alpha)
    pooling = info.default_pooling if pooling is None else pooling
    if pooling not in POOLINGS:
        raise SpecError(f"invalid pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
    if resize not in RESIZE_METHODS:
        raise SpecError(f"invalid resize method {resize!r}; valid choices: {', '.join(RESIZE_METHODS)}")
    if precision not in PRECISIONS:
        raise SpecError(f"invalid precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    if store_dtype not in STORE_DTYPES:
        raise SpecError(f"invalid store dtype {store_dtype!r}; valid choices: {', '.join(STORE_DTYPES)}")

    weights_path = resolve_weights(base, weights, alpha, size)
    if weights_path is None:
        weights_digest = "none"
    else:
        weights_digest = sha256_file(weights_path)
    # resolve_weights expanded "~" and resolved the path, so a path label always points at the file read.
    label = weights if weights in ("imagenet", "none") or weights_path is None else weights_path
    return FeatureSpec(
        base=base,
        weights=label,
        weights_digest=weights_digest,
        input_size=size,
        layer=layer,
        pooling=pooling,
        alpha=alpha,
        preprocessing=info.preprocessing,
        resize=resize,
        jpeg_draft=jpeg_draft,
        exif_transpose=exif_transpose,
        precision=precision,
        store_dtype=store_dtype,
        augmentation=augmentation,
    )


def _is_hdf5(path: Path) -> bool:
    import h5py

    return bool(h5py.is_hdf5(path))


def keras_home() -> Path:
    """Return Keras's cache folder: ``$KERAS_HOME`` or ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def resolve_weights(base: str, weights: str, alpha: float | None, input_size: int) -> str | None:
    """Turn ``imagenet``, ``none`` or a path into a local weights file, or None.

    ``imagenet`` is looked up in ``$KERAS_HOME/models`` first, so a pre-filled cache
    needs neither TensorFlow nor a network; only a missing file is downloaded, with
    ``keras.utils.get_file`` and the hash Keras pins for it.
    """
    if weights == "none":
        return None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SpecError(
                f"weights file not found: {weights!r}. Pass an existing .h5 file, 'imagenet' or 'none'."
            )
        if not os.access(path, os.R_OK):
            raise SpecError(f"weights file is not readable: {weights!r}. Check its permissions.")
        if not _is_hdf5(path):
            raise SpecError(
                f"weights file {weights!r} is not an HDF5 file. Pass a Keras .h5 or .weights.h5 file, "
                "'imagenet' or 'none'."
            )
        return str(path.resolve())
    known = get_base(base).imagenet_file(alpha, input_size)
    cached = keras_home() / "models" / known.file_name
    if cached.is_file():
        return str(cached)
    from keras.utils import get_file  # deferred: importing Keras costs seconds

    try:
        return str(get_file(known.file_name, known.origin, cache_subdir="models", file_hash=known.file_hash))
    except Exception as error:  # Keras raises plain Exception on a failed download
        raise SpecError(
            f"could not download ImageNet weights {known.file_name} for {base}: {error}. "
            f"Either 1) place the file in {cached.parent}, or 2) pass --weights PATH to a local copy."
        ) from error

"""Fine-tuning: train the top layers of a conv base end to end, starting from a head fitted on cached features.

The recipe is the classic one for pretrained convnets. A dense head is first fitted on
cached features (warm start), because a randomly initialised head would send large
gradients into the pretrained layers. Then the chosen top layers of the base are
unfrozen and the stacked model is trained on augmented images with a low learning rate
and early stopping. BatchNormalization layers stay frozen and run in inference mode.
The tuned base is saved as a Keras weights file. Extraction with it gets a new feature
spec (the spec digest includes the weights' sha256) and so its own cache file.

TensorFlow runs this on a GPU when one is visible, and otherwise on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.augment import AugmentRecipe
from pipeline.bases import build_conv_base, preprocess_function
from pipeline.dataset import load_dataset
from pipeline.heads import DenseHead, load_head, save_head
from pipeline.images import ImageDecodeError, load_image
from pipeline.metrics import split_metrics
from pipeline.spec import FeatureSpec, make_spec, resolve_weights, sha256_file
from pipeline.training import train_head

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "base.weights.h5"
REPORT_FILE = "finetune.json"
WARM_START_DIR = "warm-start"
EVAL_SPLITS = ("validation", "test")


class FinetuneError(ValueError):
    """Raised for invalid fine-tuning settings, unknown layer names or unusable data."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Layers to unfreeze and the settings to train them with.

    Exactly one of ``trainable_from`` (that layer and every later one) and
    ``trainable`` (exactly these layers) names the layers to train.
    """

    trainable_from: str | None = None
    trainable: tuple[str, ...] = ()
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-5
    patience: int = 4
    recipe: AugmentRecipe = field(default_factory=AugmentRecipe)
    random_state: int = 0
    use_views: bool = False  # warm-start head also trains on cached augmented views

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainable", tuple(self.trainable))
        if bool(self.trainable_from) == bool(self.trainable):
            raise FinetuneError(
                "name the layers to fine-tune with exactly one of --trainable-from LAYER or --trainable LAYER,...; "
                "'convcache layers BASE' lists the layer names"
            )
        if self.epochs < 1:
            raise FinetuneError(f"invalid number of epochs {self.epochs}; pass 1 or more")
        if self.batch_size < 1:
            raise FinetuneError(f"invalid batch size {self.batch_size}; pass 1 or more")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise FinetuneError(f"invalid learning rate {self.learning_rate}; pass a positive number such as 1e-5")
        if self.patience < 0:
            raise FinetuneError(f"invalid patience {self.patience}; pass 0 or more epochs")

    def to_json(self) -> str:
        """Serialise the settings, recipe included, as sorted JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinetuneSettings:
        """Rebuild settings written by :meth:`to_json`."""
        data = json.loads(text)
        data["recipe"] = AugmentRecipe(**data["recipe"])
        data["trainable"] = tuple(data["trainable"])
        return cls(**data)


def _is_batch_norm(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def select_trainable_layers(model: Any, trainable_from: str | None, trainable: tuple[str, ...] = ()) -> list[str]:
    """Return the names of the layers of ``model`` that fine-tuning will train, in model order.

    With ``trainable_from`` these are that layer and all later ones; with ``trainable``
    the named layers. Layers without weights, and BatchNormalization layers (which
    stay frozen), are left out of the result.

    Raises
    ------
    FinetuneError
        For a name that is not a layer of ``model``, or a choice without trainable weights.
    """
    names = [layer.name for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    requested = [trainable_from] if trainable_from else list(trainable)
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise FinetuneError(
            f"layer {', '.join(map(repr, unknown))} not found in {model.name}; valid layers: {', '.join(names)}"
        )
    chosen = names[names.index(trainable_from):] if trainable_from else [n for n in names if n in set(trainable)]
    with_weights = [n for n in chosen if model.get_layer(n).weights and not _is_batch_norm(model.get_layer(n))]
    if not with_weights:
        raise FinetuneError(
            f"layers {', '.join(chosen)} have no weights that fine-tuning trains (BatchNormalization layers stay "
            "frozen). Name a convolution or dense layer; 'convcache layers BASE' lists them."
        )
    return with_weights


def freeze_layers(base: Any, trainable: list[str]) -> None:
    """Make exactly the ``trainable`` layers of ``base`` trainable; BatchNormalization layers stay frozen."""
    base.trainable = True  # Keras propagates this to every layer, so each one is set below.
    wanted = set(trainable)
    for layer in base.layers:
        layer.trainable = layer.name in wanted and not _is_batch_norm(layer)


def feature_model_of(base: Any, spec: FeatureSpec) -> Any:
    """Return ``base``, or the model cut at ``spec.layer``, sharing the base's layers."""
    import keras

    if not spec.layer:
        return base
    return keras.Model(base.input, base.get_layer(spec.layer).output, name=f"{spec.base}_{spec.layer}")


def check_trainable_layers(spec: FeatureSpec, settings: FinetuneSettings) -> list[str]:
    """Validate the layer names of ``settings`` against the spec's base, built with random weights."""
    base = build_conv_base(spec.base, spec.input_size, None, spec.alpha)
    return select_trainable_layers(feature_model_of(base, spec), settings.trainable_from, settings.trainable)


def augmentation_layers(recipe: AugmentRecipe, seed: int) -> Any:
    """Return Keras random preprocessing layers for ``recipe``, or None for a recipe that changes nothing.

    They are active only while training and draw a new transform every epoch. The
    ranges follow the recipe, but the pixels differ from cached views, which
    :func:`pipeline.augment.augment_image` makes with Pillow.
    """
    import keras

    layers: list[Any] = []
    if recipe.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if recipe.rotation:
        layers.append(keras.layers.RandomRotation(recipe.rotation / 360.0, fill_mode="reflect", seed=seed + 1))
    if recipe.zoom:
        layers.append(keras.layers.RandomZoom((-recipe.zoom, recipe.zoom), fill_mode="reflect", seed=seed + 2))
    if recipe.crop:
        layers.append(keras.layers.RandomTranslation(recipe.crop, recipe.crop, fill_mode="reflect", seed=seed + 3))
    return keras.Sequential(layers, name="augmentation") if layers else None


def build_finetune_model(feature_model: Any, head_model: Any, spec: FeatureSpec, recipe: AugmentRecipe,
                         seed: int = 0) -> Any:
    """Stack uint8 input, augmentation, preprocessing, the base (inference mode), pooling and the head."""
    import keras

    size = spec.input_size
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.ops.cast(inputs, "float32")
    augmentation = augmentation_layers(recipe, seed)
    if augmentation is not None:
        x = augmentation(x)
    x = preprocess_function(spec.base)(x)
    # training=False keeps BatchNormalization on its moving statistics even while fitting.
    x = feature_model(x, training=False)
    if len(x.shape) == 4 and spec.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D()(x)
    elif len(x.shape) == 4 and spec.pooling == "max":
        x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, head_model(x), name=f"{spec.base}_finetune")


def decode_images(data_dir: str | os.PathLike[str], paths: list[str], spec: FeatureSpec) -> np.ndarray:
    """Decode images of a cache split (paths relative to ``data_dir``) as the spec decodes them."""
    root = Path(data_dir)

    def one(path: str) -> np.ndarray:
        try:
            return load_image(root / path, spec.input_size, resize=spec.resize, draft=spec.jpeg_draft,
                              exif_transpose=spec.exif_transpose)
        except ImageDecodeError as error:
            raise FinetuneError(
                f"{error} It decoded when its features were cached; run 'convcache extract' again."
            ) from error

    size = spec.input_size
    if not paths:
        return np.zeros((0, size, size, 3), np.uint8)
    # NOTE: every split is held in memory as uint8, n * size * size * 3 bytes (150 MB for 2000 images at 160 px).
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return np.stack(list(pool.map(one, paths)))


class _StackedHead:
    """Adapter that lets :func:`pipeline.metrics.split_metrics` score the stacked model on images."""

    has_proba = True

    def __init__(self, model: Any, n_classes: int, batch_size: int) -> None:
        self.model = model
        self.n_classes = n_classes
        self.batch_size = batch_size

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        out = np.asarray(self.model.predict(X, batch_size=self.batch_size, verbose=0))
        return np.concatenate([1.0 - out, out], axis=1) if self.n_classes == 2 else out


def finetune_folder(models_dir: str | os.PathLike[str], cache_path: str | os.PathLike[str],
                    settings: FinetuneSettings) -> Path:
    """Return ``<models_dir>/<cache stem>-finetune-<first named layer>``."""
    first = settings.trainable_from or settings.trainable[0]
    return Path(models_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(cache_path).stem}-finetune-{first}")


def warm_start_head(cache_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                    settings: FinetuneSettings) -> dict[str, Any]:
    """Fit the dense head on cached features into ``<output_dir>/warm-start``; returns train_head's result."""
    return train_head(cache_path, "dense", Path(output_dir) / WARM_START_DIR, random_state=settings.random_state,
                      use_views=settings.use_views)


def finetune_base(
    data_dir: str | os.PathLike[str],
    cache_path: str | os.PathLike[str],
    head_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    settings: FinetuneSettings,
) -> dict[str, Any]:
    """Fine-tune the top layers of the cache's base together with a warm-started dense head.

    Train, validation and test images are the original rows of the cache's splits,
    decoded from ``data_dir``. Early stopping watches the validation loss and restores
    the best epoch. Accuracy is measured on the validation and test images before
    and after training, with the same stacked model.

    Writes into ``output_dir``: ``base.weights.h5`` (the tuned base), the tuned head
    (``head.json`` and ``model.keras``, usable by ``convcache predict``, whose spec
    names the tuned weights) and ``finetune.json`` (this function's result).

    Returns
    -------
    dict
        ``weights``, ``tuned_spec_digest``, ``tuned_cache``, ``trainable_layers``,
        ``before`` and ``after`` (per split: ``accuracy``, ``loss``, ``n``),
        ``epochs_run``, ``best_epoch``, ``history``, ``fit_seconds`` and ``device``.
    """
    import keras
    import tensorflow as tf

    data = load_dataset(cache_path, use_views=False, random_state=settings.random_state)
    spec = data.spec
    if "validation" not in data.splits or not len(data.splits["validation"]):
        raise FinetuneError(
            f"{cache_path} has no validation images, which early stopping needs. Add a validation/ split folder, "
            "or use a tree without split folders (convcache cuts validation and test parts from it)."
        )
    head, meta = load_head(head_path)
    if not isinstance(head, DenseHead) or meta.get("spec_digest") != spec.digest:
        raise FinetuneError(
            f"{head_path} is not a dense head trained on {Path(cache_path).name}; "
            "pass the folder that warm_start_head wrote"
        )
    weights_path = resolve_weights(spec.base, "none" if spec.weights_digest == "none" else spec.weights,
                                   spec.alpha, spec.input_size)
    if weights_path is not None and sha256_file(weights_path) != spec.weights_digest:
        raise FinetuneError(
            f"weights file {weights_path} changed since {Path(cache_path).name} was extracted (sha256 differs). "
            "Extract again with the current file, or restore the original one."
        )

    keras.utils.set_random_seed(settings.random_state)
    base = build_conv_base(spec.base, spec.input_size, weights_path, spec.alpha)
    feature_model = feature_model_of(base, spec)
    trainable = select_trainable_layers(feature_model, settings.trainable_from, settings.trainable)
    freeze_layers(base, trainable)
    model = build_finetune_model(feature_model, head.model, spec, settings.recipe, settings.random_state)
    binary = len(data.classes) == 2
    model.compile(
        optimizer=keras.optimizers.RMSprop(settings.learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    logger.info("fine-tuning %d layers of %s on the %s: %s", len(trainable), spec.base, device, ", ".join(trainable))

    images = {name: decode_images(data_dir, data.splits[name].paths, spec) for name in ("train", *EVAL_SPLITS)
              if name in data.splits}
    labels = {name: data.splits[name].labels for name in images}
    scorer = _StackedHead(model, len(data.classes), settings.batch_size)
    before = {name: split_metrics(scorer, images[name], labels[name], len(data.classes))
              for name in EVAL_SPLITS if name in images}

    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True)
    started = time.perf_counter()
    history = model.fit(
        images["train"], labels["train"].astype("float32"), epochs=settings.epochs, batch_size=settings.batch_size,
        validation_data=(images["validation"], labels["validation"].astype("float32")), callbacks=[stop],
        shuffle=True, verbose=0,
    )
    fit_seconds = time.perf_counter() - started
    after = {name: split_metrics(scorer, images[name], labels[name], len(data.classes))
             for name in EVAL_SPLITS if name in images}
    val_losses = history.history.get("val_loss", [])
    logger.info("fine-tuned for %d epochs in %.1f s: before %s, after %s", len(val_losses), fit_seconds, before, after)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tuned_weights = output_dir / WEIGHTS_FILE
    base.save_weights(tuned_weights)
    tuned_spec = make_spec(spec.base, str(tuned_weights), spec.input_size, spec.layer, spec.pooling, spec.alpha,
                           spec.resize, spec.jpeg_draft, spec.exif_transpose, spec.precision, spec.store_dtype)
    tuned_cache = Path(cache_path).parent / tuned_spec.cache_name
    result: dict[str, Any] = {
        "output": str(output_dir),
        "weights": str(tuned_weights),
        "spec_digest": spec.digest,
        "tuned_spec_digest": tuned_spec.digest,
        "tuned_cache": str(tuned_cache),
        "warm_start_head": str(head_path),
        "trainable_layers": trainable,
        "settings": json.loads(settings.to_json()),
        "before": before,
        "after": after,
        "epochs_run": len(val_losses),
        "best_epoch": int(np.argmin(val_losses)) + 1 if val_losses else 0,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "fit_seconds": round(fit_seconds, 3),
        "device": device,
        "train_images": len(labels["train"]),
    }
    save_head(head, output_dir, {
        "spec": tuned_spec.to_json(),
        "spec_digest": tuned_spec.digest,
        "classes": data.classes,
        "cache": str(tuned_cache),
        "metrics": after,
        "derived_splits": data.derived_splits,
    })
    (output_dir / REPORT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result

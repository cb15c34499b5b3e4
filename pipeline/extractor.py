"""Frozen conv base wrapped as one compiled function from uint8 images to feature rows."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.bases import build_conv_base, preprocess_function
from pipeline.spec import FeatureSpec, resolve_weights

logger = logging.getLogger(__name__)


class FeatureExtractor:
    """Run a feature spec's conv base on batches of ``(n, size, size, 3)`` uint8 images.

    Preprocessing, the forward pass, the optional layer cut and pooling all run inside
    one ``tf.function`` traced once for any batch size, which avoids the per-call
    overhead of ``Model.predict``.

    A base with batch normalization is also frozen: its weights become graph constants,
    so TensorFlow's graph optimizer folds each normalization into the convolution before
    it and fuses the activation. On two Xeon cores this made MobileNetV2 at 160 pixels
    1.29 times faster, for 0.66 s of freezing, and the features stay within 1e-4 of the
    unfrozen model's. VGG16 has no normalization and is not frozen, because freezing it
    gained nothing (``tests/benchmarks/bench_extract.py levers``).

    Parameters
    ----------
    spec : FeatureSpec
        The spec whose base, weights, layer, pooling and precision to use.
    weights_path : str or None, optional
        Overrides the weights file that :func:`pipeline.spec.resolve_weights` finds.
    freeze : bool or None, optional
        Whether to run the frozen graph. None (the default) freezes bases that contain a
        ``BatchNormalization`` layer.
    """

    def __init__(self, spec: FeatureSpec, weights_path: str | None = None, freeze: bool | None = None) -> None:
        import keras
        import tensorflow as tf

        self.spec = spec
        if weights_path is None:
            weights_path = resolve_weights(spec.base, "none" if spec.weights_digest == "none" else spec.weights,
                                           spec.alpha, spec.input_size)
        previous_policy = keras.config.dtype_policy()
        if spec.precision != "float32":
            keras.config.set_dtype_policy(f"mixed_{spec.precision}")
        try:
            base = build_conv_base(spec.base, spec.input_size, weights_path, spec.alpha)
        finally:
            keras.config.set_dtype_policy(previous_policy)
        self.base = base
        if spec.layer:
            try:
                output = base.get_layer(spec.layer).output
            except ValueError as error:
                names = ", ".join(layer.name for layer in base.layers[1:])
                raise ValueError(f"layer {spec.layer!r} not found in {spec.base}; valid layers: {names}") from error
            model = keras.Model(base.input, output, name=f"{spec.base}_{spec.layer}")
        else:
            model = base
        model.trainable = False
        self.model = model
        preprocess = preprocess_function(spec.base)
        pooling = spec.pooling
        rank = len(model.output.shape)
        # A float16 base can overflow inside, and oneDNN's ReLU turns the NaN that follows
        # into 0, so the output alone can look finite. In float16 every layer's output is
        # checked instead, and the rows of images that overflowed come out as NaN.
        # NOTE: what this check costs on a GPU (it may prevent layer fusion) is not measured.
        watched = _every_layer_output(model) if spec.precision == "float16" else None

        def forward(images: Any) -> Any:
            x = preprocess(tf.cast(images, tf.float32))
            finite = None
            if watched is None:
                y = model(x, training=False)
            else:
                y, *inner = watched(x, training=False)
                finite = tf.ones(tf.shape(x)[:1], tf.bool)
                for value in inner:
                    axes = list(range(1, len(value.shape)))
                    finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(value), axis=axes))
            # Cast before pooling, so that a reduced-precision base is averaged in float32.
            y = tf.cast(y, tf.float32)
            if pooling != "none" and rank == 4:
                y = tf.reduce_mean(y, axis=(1, 2)) if pooling == "avg" else tf.reduce_max(y, axis=(1, 2))
            if finite is not None:
                mask = tf.reshape(finite, [-1] + [1] * (len(y.shape) - 1))
                y = tf.where(mask, y, tf.constant(float("nan"), tf.float32))
            return y

        size = spec.input_size
        self._forward = tf.function(
            forward,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True,
        )
        if freeze is None:
            freeze = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
        self.frozen = freeze
        if freeze:
            self._run, self.graph = _frozen(self._forward)
        else:
            self._run, self.graph = self._forward, self._forward.get_concrete_function().graph
        out_shape = tuple(int(d) for d in model.output.shape[1:])
        if pooling != "none" and rank == 4:
            out_shape = (out_shape[-1],)
        self.feature_shape: tuple[int, ...] = out_shape
        logger.info("built %s (%s, %d px, %s%s) -> features %s", spec.base, spec.layer or "top", size,
                    spec.precision, ", frozen" if freeze else "", out_shape)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Return float32 features for a batch of uint8 images."""
        return self._run(images).numpy()


def _frozen(function: Any) -> tuple[Any, Any]:
    """Return ``function`` with every variable it reads replaced by a constant, and its graph."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # NOTE: convert_variables_to_constants_v2 lives in TensorFlow's private python package,
    # because TensorFlow 2.21 offers no public function that freezes a concrete function.
    # Frozen features differ from unfrozen ones by up to 1e-4, and caches written before
    # bases were frozen are not invalidated, so such a cache can hold rows of both.
    graph_function = convert_variables_to_constants_v2(function.get_concrete_function())

    def run(images: np.ndarray) -> Any:
        return graph_function(tf.convert_to_tensor(images))[0]

    return run, graph_function.graph


def _every_layer_output(model: Any) -> Any:
    """Return a model with the outputs of ``model`` followed by the output of each of its layers."""
    import keras

    inner = [
        tensor
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
        for tensor in keras.tree.flatten(layer.output)
    ]
    return keras.Model(model.input, [model.output, *inner], name=f"{model.name}_watched")

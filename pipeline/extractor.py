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

    Parameters
    ----------
    spec : FeatureSpec
        The spec whose base, weights, layer, pooling and precision to use.
    weights_path : str or None, optional
        Overrides the weights file that :func:`pipeline.spec.resolve_weights` finds.
    """

    def __init__(self, spec: FeatureSpec, weights_path: str | None = None) -> None:
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

        def forward(images: Any) -> Any:
            x = preprocess(tf.cast(images, tf.float32))
            y = model(x, training=False)
            if pooling != "none" and rank == 4:
                y = tf.reduce_mean(y, axis=(1, 2)) if pooling == "avg" else tf.reduce_max(y, axis=(1, 2))
            return tf.cast(y, tf.float32)

        size = spec.input_size
        self._forward = tf.function(
            forward,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True,
        )
        out_shape = tuple(int(d) for d in model.output.shape[1:])
        if pooling != "none" and rank == 4:
            out_shape = (out_shape[-1],)
        self.feature_shape: tuple[int, ...] = out_shape
        logger.info("built %s (%s, %d px) -> features %s", spec.base, spec.layer or "top", size, out_shape)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Return float32 features for a batch of uint8 images."""
        return self._forward(images).numpy()

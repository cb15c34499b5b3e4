"""Layers of a conv base that can serve as feature sources."""

from __future__ import annotations

from typing import Any

from pipeline.bases import build_conv_base, get_base


def list_layers(base: str, input_size: int | None = None, alpha: float | None = None) -> list[dict[str, Any]]:
    """Return ``{name, shape}`` for every layer after the input, in model order.

    The base is built with random weights: names and shapes do not depend on them.
    """
    info = get_base(base)
    model = build_conv_base(base, input_size or info.default_size, None, alpha if info.alphas else None)
    return [
        {"name": layer.name, "shape": [int(d) for d in layer.output.shape[1:]]}
        for layer in model.layers[1:]
    ]

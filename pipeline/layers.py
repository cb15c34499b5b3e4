"""Layers of a conv base that can serve as feature sources."""

from __future__ import annotations

from typing import Any

from pipeline.bases import build_conv_base
from pipeline.spec import check_geometry


def list_layers(base: str, input_size: int | None = None, alpha: float | None = None) -> list[dict[str, Any]]:
    """Return ``{name, shape}`` for every layer after the input, in model order.

    The base is built with random weights: names and shapes do not depend on them.

    Raises
    ------
    UnknownBaseError, SpecError
        For an unknown base, an input size below the base's minimum, or an invalid alpha.
    """
    size, alpha = check_geometry(base, input_size, alpha)
    model = build_conv_base(base, size, None, alpha)
    return [
        {"name": layer.name, "shape": [int(d) for d in layer.output.shape[1:]]}
        for layer in model.layers[1:]
    ]

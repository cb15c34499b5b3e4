"""Registry of the frozen ``keras.applications`` conv bases that convcache can run.

Each entry names the Keras constructor, its own ``preprocess_input``, a default input
size and where Keras keeps its ImageNet weights, so a feature spec can be built and
compared with a cache without importing TensorFlow.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

KERAS_WEIGHTS_ROOT = "https://storage.googleapis.com/tensorflow/keras-applications/"
EFFICIENTNET_WEIGHTS_ROOT = "https://storage.googleapis.com/keras-applications/"
MOBILENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


@dataclass(frozen=True)
class ImagenetFile:
    """Name, download address and pinned hash of one Keras ImageNet weights file."""

    file_name: str
    origin: str
    file_hash: str | None  # md5 as pinned in Keras 3.15; None where Keras pins none


@dataclass(frozen=True)
class BaseInfo:
    """One conv base: its Keras constructor, preprocessing and defaults."""

    name: str
    module: str
    constructor: str
    default_size: int
    min_size: int
    default_pooling: str
    alphas: tuple[float, ...] = ()
    # Input sizes for which Keras publishes separate ImageNet files; others fall back to 224.
    weight_sizes: tuple[int, ...] = ()

    @property
    def preprocessing(self) -> str:
        """Dotted name of the ``preprocess_input`` function this base expects."""
        return f"keras.applications.{self.module}.preprocess_input"

    def imagenet_file(self, alpha: float | None, input_size: int) -> ImagenetFile:
        """Return the Keras cache file that ``weights="imagenet"`` loads for this base."""
        if self.name in ("vgg16", "vgg19"):
            file_name = f"{self.name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
            hashes = {"vgg16": "6d6bbae143d832006294945121d1f1fc", "vgg19": "253f8cb515780f3b799900260a226db6"}
            return ImagenetFile(file_name, f"{KERAS_WEIGHTS_ROOT}{self.name}/{file_name}", hashes[self.name])
        if self.name == "resnet50":
            file_name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
            return ImagenetFile(file_name, f"{KERAS_WEIGHTS_ROOT}resnet/{file_name}", "4d473c1dd8becc155b73f8504c6f6626")
        if self.name == "efficientnet_b0":
            file_name = "efficientnetb0_notop.h5"
            return ImagenetFile(file_name, f"{EFFICIENTNET_WEIGHTS_ROOT}{file_name}", "50bc09e76180e00e4465e1a485ddc09d")
        rows = input_size if input_size in self.weight_sizes else 224
        if self.name == "mobilenet":
            alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}[float(alpha or 1.0)]
            file_name = f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
            return ImagenetFile(file_name, f"{KERAS_WEIGHTS_ROOT}mobilenet/{file_name}", None)
        if self.name == "mobilenet_v2":
            file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha or 1.0)}_{rows}_no_top.h5"
            return ImagenetFile(file_name, f"{KERAS_WEIGHTS_ROOT}mobilenet_v2/{file_name}", None)
        raise ValueError(f"no ImageNet weights are registered for base {self.name!r}")


BASES: dict[str, BaseInfo] = {
    info.name: info
    for info in (
        BaseInfo("vgg16", "vgg16", "VGG16", 150, 32, "none"),
        BaseInfo("vgg19", "vgg19", "VGG19", 150, 32, "none"),
        BaseInfo("resnet50", "resnet50", "ResNet50", 224, 32, "avg"),
        BaseInfo("mobilenet", "mobilenet", "MobileNet", 160, 32, "avg", MOBILENET_ALPHAS, (128, 160, 192, 224)),
        BaseInfo(
            "mobilenet_v2", "mobilenet_v2", "MobileNetV2", 160, 32, "avg", MOBILENET_V2_ALPHAS, (96, 128, 160, 192, 224)
        ),
        BaseInfo("efficientnet_b0", "efficientnet", "EfficientNetB0", 224, 32, "avg"),
    )
}


class UnknownBaseError(ValueError):
    """Raised for a base name that is not in :data:`BASES`."""


class WeightsMismatchError(ValueError):
    """Raised when a weights file does not match the architecture of the requested base."""


def get_base(name: str) -> BaseInfo:
    """Look up a conv base by its registry name."""
    try:
        return BASES[name]
    except KeyError:
        valid = ", ".join(sorted(BASES))
        raise UnknownBaseError(f"unknown conv base {name!r}; valid bases: {valid}") from None


def build_conv_base(
    name: str,
    input_size: int,
    weights_path: str | None,
    alpha: float | None = None,
) -> keras.Model:
    """Build the frozen conv base without its classifier top.

    Parameters
    ----------
    name : str
        Registry name, for example ``"vgg16"``.
    input_size : int
        Height and width of the square input in pixels.
    weights_path : str or None
        A local ``.h5``/``.weights.h5`` file, or None for random initialisation.
    alpha : float, optional
        Width multiplier for the MobileNet bases.
    """
    info = get_base(name)
    applications = importlib.import_module("keras.applications")
    constructor = getattr(applications, info.constructor)
    kwargs: dict[str, Any] = {
        "include_top": False,
        "weights": None,
        "input_shape": (input_size, input_size, 3),
    }
    if info.alphas:
        kwargs["alpha"] = float(alpha or 1.0)
    model = constructor(**kwargs)
    if weights_path is not None:
        try:
            model.load_weights(weights_path)
        except ValueError as error:  # Keras raises ValueError when layers or shapes differ
            raise WeightsMismatchError(
                f"weights file {weights_path} does not fit {name} (alpha {alpha}, {input_size} px): {error}. "
                f"Pass weights saved from a {name} model without its top, 'imagenet' or 'none'."
            ) from error
    model.trainable = False
    return model


def preprocess_function(name: str) -> Any:
    """Return the base's own ``keras.applications.<module>.preprocess_input``."""
    info = get_base(name)
    module = importlib.import_module(f"keras.applications.{info.module}")
    return module.preprocess_input

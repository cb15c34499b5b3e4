"""Robust decoding of one image file into the uint8 RGB array that a conv base expects.

Pillow is the only decoder, so one code path sees every format. Every failure becomes an
:class:`ImageDecodeError` with a short reason, and no input makes :func:`load_image` hang.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Keys are the names load_image accepts, in the order error messages list them.
_RESAMPLING: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
RESIZE_METHODS: tuple[str, ...] = tuple(_RESAMPLING)

# Image.open tries only these Pillow plugins, so content decides the format among the
# IMAGE_SUFFIXES families, and a renamed EPS file can never start Ghostscript.
# The JPEG plugin also opens MPO, the multi-picture JPEG variant that many cameras write.
_PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Filters for which a JPEG draft decode stays close to a full decode. The table gives the
# mean absolute difference between draft and full decode on the 0..255 scale. It was
# measured on 60 Kaggle cats-vs-dogs JPEGs of about 500x375 pixels, which draft decodes
# at 1/2 scale for 150 px and at 1/4 scale for 64 px (Pillow 13.0, libjpeg-turbo 3.2).
#   filter    150 px  64 px  worst image
#   bilinear  0.51    0.86   2.1
#   bicubic   0.53    0.95   2.5
#   lanczos   0.56    1.02   2.7
#   area      1.73    3.06   7.0   (draft not used)
#   nearest   2.56    6.42   15.9  (draft not used)
# BOX ("area") and NEAREST sample a narrower footprint than the DCT scaling averages
# over, so they decode at full scale. test_draft_close_to_full_decode checks the bound.
_DRAFT_FILTERS = frozenset(
    {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS}
)

# EXIF Orientation value (tag 0x0112) -> transpose that displays the image upright. It is
# the table of PIL.ImageOps.exif_transpose, which load_image uses to find the draft box
# in the transposed image.
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BOMB_HINT = "Remove the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."

class ImageDecodeError(Exception):
    """Image file that cannot be decoded.

    Parameters
    ----------
    reason : str
        Short description of the failure, e.g. ``"truncated image data"``.
    path : str or os.PathLike, optional
        File that failed, included in the message when given.
    hint : str, optional
        What the user can do about it, appended to the message.
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike[str] | None = None,
        hint: str = "Replace or remove the file.",
    ) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        where = "" if self.path is None else f" '{self.path}'"
        super().__init__(f"cannot decode image{where}: {reason}. {hint}")





def stat_failure_reason(exc: OSError, is_symlink: bool) -> str:
    """Return a short reason for an ``os.stat`` failure (broken symlink, symlink loop...)."""
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if is_symlink else "file not found"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _resample_filter(resize: str) -> Image.Resampling:
    try:
        return _RESAMPLING[resize]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown resize method {resize!r}; use one of: {', '.join(RESIZE_METHODS)}"
        ) from None


def _check_file(path: str | os.PathLike[str]) -> None:
    """Raise ImageDecodeError for files that Pillow must never open."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageDecodeError(stat_failure_reason(exc, os.path.islink(path)), path) from exc
    # A FIFO named x.jpg would block open() forever.
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError("not a regular file", path)
    if info.st_size == 0:
        raise ImageDecodeError("empty file", path)


def _reject_decompression_bomb(img: Image.Image, path: str | os.PathLike[str]) -> None:
    """Raise ImageDecodeError when the image has more pixels than Image.MAX_IMAGE_PIXELS.

    Pillow only warns between the limit and twice the limit. Turning that warning into an
    error with ``warnings.catch_warnings`` would change process-wide state from many
    threads at once, so the size is checked here instead.
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = max(1, img.width) * max(1, img.height)
    if limit is not None and pixels > limit:
        reason = f"decompression bomb: {pixels} pixels > limit {limit}"
        raise ImageDecodeError(reason, path, _BOMB_HINT)


def _bomb_reason(exc: Exception) -> str:
    # Pillow's message: "Image size (N pixels) exceeds limit of M pixels, ..."
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = match.group(1) if match else "too many"
    return f"decompression bomb: {pixels} pixels > limit {Image.MAX_IMAGE_PIXELS}"


def _error_reason(exc: Exception) -> str:
    message = str(exc)
    if "truncated" in message.lower():
        return "truncated image data"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {message}"[:200]


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit grayscale image to 8 bits, mapping 0..65535 onto 0..255 with rounding.

    Pillow's own ``convert("L")`` clips values above 255 instead of scaling them.
    """
    # NOTE: mode "I" is 32-bit signed. It is assumed to carry 16-bit samples, as it does
    # for PNG and TIFF, and values outside 0..65535 are clipped.
    values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _to_rgb(
    img: Image.Image,
    size: int,
    resample: Image.Resampling,
    box: tuple[float, float, float, float] | None,
) -> Image.Image:
    """Convert to RGB and resize the ``box`` region to ``(size, size)``.

    Grayscale images are resized before they are expanded to 3 channels. Transparent
    images are resized as RGBA, which Pillow does with premultiplied alpha, and then
    composited over white.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        # NOTE: transparency of 16-bit grayscale images is dropped here.
        img = _sixteen_bit_to_l(img)
    elif img.has_transparency_data:
        if img.mode != "RGBA":
            img = img.convert("RGBA")
    elif img.mode not in ("RGB", "L"):
        # Covers 1, P, CMYK, YCbCr, LAB, HSV and F, whose values Pillow clips to 0..255.
        img = img.convert("RGB")

    if box == (0, 0, *img.size):
        box = None
    if box is not None or img.size != (size, size):
        img = img.resize((size, size), resample, box=box)

    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode == "L":
        return img.convert("RGB")
    return img


def _transpose_box(
    box: tuple[float, float, float, float], width: int, height: int, method: Image.Transpose
) -> tuple[float, float, float, float]:
    """Map a box of a ``width`` x ``height`` image onto the image after ``method``."""
    x0, y0, x1, y1 = box
    if method == Image.Transpose.FLIP_LEFT_RIGHT:
        return (width - x1, y0, width - x0, y1)
    if method == Image.Transpose.FLIP_TOP_BOTTOM:
        return (x0, height - y1, x1, height - y0)
    if method == Image.Transpose.ROTATE_180:
        return (width - x1, height - y1, width - x0, height - y0)
    if method == Image.Transpose.ROTATE_90:  # counter-clockwise: (x, y) -> (y, width - x)
        return (y0, width - x1, y1, width - x0)
    if method == Image.Transpose.ROTATE_270:  # clockwise: (x, y) -> (height - y, x)
        return (height - y1, x0, height - y0, x1)
    if method == Image.Transpose.TRANSPOSE:  # (x, y) -> (y, x)
        return (y0, x0, y1, x1)
    # TRANSVERSE: (x, y) -> (height - y, width - x)
    return (height - y1, width - x1, height - y0, width - x0)


def _apply_exif_orientation(
    img: Image.Image, box: tuple[float, float, float, float] | None
) -> tuple[float, float, float, float] | None:
    """Transpose ``img`` in place as its EXIF Orientation tag specifies and return the moved box."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return box

    width, height = img.size
    ImageOps.exif_transpose(img, in_place=True)
    return None if box is None else _transpose_box(box, width, height, method)


def load_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    resize: str = "bilinear",
    draft: bool = True,
    exif_transpose: bool = True,
) -> np.ndarray:
    """Decode an image file into a ``(size, size, 3)`` uint8 RGB array.

    The format is detected from the content, not the suffix, among JPEG (and MPO), PNG,
    BMP, GIF, TIFF and WEBP. Multi-frame files (animated GIF or WEBP, multi-page TIFF)
    give their first frame. Every mode becomes RGB: 16-bit grayscale is scaled to 8 bits,
    and transparent pixels are composited over a white background. The image is resized
    to exactly ``size`` x ``size`` without keeping the aspect ratio, like the Keras
    ``image_dataset_from_directory`` default. Safe to call from many threads at once.

    Parameters
    ----------
    path : str or os.PathLike
        Image file.
    size : int
        Output height and width in pixels.
    resize : str, default "bilinear"
        Pillow resampling filter, one of :data:`RESIZE_METHODS`. "area" is Pillow's BOX.
    draft : bool, default True
        Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale, never below ``size``.
        This is faster, and the result differs from a full decode by a mean absolute
        difference of about 1 on the 0..255 scale. Only the "bilinear", "bicubic" and
        "lanczos" filters use it, because "nearest" and "area" differ by up to 16.
    exif_transpose : bool, default True
        Rotate or flip the image with ``PIL.ImageOps.exif_transpose`` as its EXIF
        Orientation tag specifies, before resizing.

    Returns
    -------
    numpy.ndarray
        C-contiguous uint8 array of shape ``(size, size, 3)``. It is read-only because it
        wraps Pillow's output bytes without copying them. Copy it before writing into it.

    Raises
    ------
    ImageDecodeError
        If the file is missing, empty, not a regular file, a broken symlink or symlink
        loop, not an image, truncated, larger than ``PIL.Image.MAX_IMAGE_PIXELS``, or
        Pillow fails to decode or convert it. ``reason`` names the cause.
    ValueError
        If ``resize`` is not in :data:`RESIZE_METHODS` or ``size`` is below 1.
    TypeError
        If ``size`` is not an int.
    """
    resample = _resample_filter(resize)
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int number of pixels, got {size!r}")
    if size < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")

    # NOTE: truncated files are rejected only while PIL.ImageFile.LOAD_TRUNCATED_IMAGES
    # keeps its default of False. This module never sets it.
    _check_file(path)
    try:
        with Image.open(path, formats=_PILLOW_FORMATS) as img:
            _reject_decompression_bomb(img, path)
            box = None
            if draft and resample in _DRAFT_FILTERS:
                # For JPEG, Pillow picks the largest DCT scale (1/2, 1/4, 1/8) that keeps
                # both sides >= size, and returns the box of the source image that the
                # reduced image covers. Resizing that box keeps the geometry of a full
                # decode. Other formats ignore draft() and return None.
                drafted = img.draft("RGB", (size, size))
                if drafted is not None:
                    box = drafted[1]
            img.load()
            if exif_transpose:
                box = _apply_exif_orientation(img, box)
            rgb = _to_rgb(img, size, resample, box)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image file (cannot identify format)", path) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception when a warnings filter has the action "error".
        raise ImageDecodeError(_bomb_reason(exc), path, _BOMB_HINT) from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageDecodeError(_error_reason(exc), path) from exc

    array = np.asarray(rgb)
    if array.shape != (size, size, 3) or array.dtype != np.uint8:
        raise ImageDecodeError(f"unexpected decoded array {array.dtype} {array.shape}", path)
    return array

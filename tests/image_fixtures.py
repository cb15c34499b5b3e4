"""Builder for a class-folder tree that contains every kind of bad or unusual image input.

Outcome strings returned by :func:`make_bad_input_tree`:

- ``"decoded"``: ``scan_tree`` lists the file and ``load_image`` decodes it.
- ``"error: <reason>"``: ``scan_tree`` lists the file and ``load_image`` raises
  ``ImageDecodeError`` whose ``reason`` starts with ``<reason>``.
- ``"skipped: <reason>"``: ``scan_tree`` puts ``(path, <reason>)`` in ``Manifest.skipped``.
- ``"ignored"``: neither an entry nor a skipped item, and no warning names it.
- ``"warning"``: a folder that a ``Manifest.warnings`` line names.

The outcomes hold while ``PIL.Image.MAX_IMAGE_PIXELS`` is :data:`BOMB_PIXEL_LIMIT`
(monkeypatch it): ``bomb.png`` is the only image above that limit.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_PIXEL_LIMIT = 10_000
BOMB_SIZE = (120, 100)  # 12_000 pixels: above the limit, below twice the limit

DECODABLE = "decodable"
UNDECODABLE = "undecodable"
EMPTY_CLASS = "empty_class"
UNICODE_NAME = f"{DECODABLE}/photo été Ünïcode 1.png"

# Single-colour images: relative path -> RGB that load_image must return everywhere.
SOLID_COLOURS: dict[str, tuple[int, int, int]] = {
    f"{DECODABLE}/png_bytes.jpg": (10, 200, 30),
    f"{DECODABLE}/bitmap.bmp": (0, 160, 0),
    f"{DECODABLE}/static.gif": (0, 0, 255),
    f"{DECODABLE}/tagged.tiff": (255, 255, 0),
    f"{DECODABLE}/lossless.webp": (255, 0, 255),
    f"{DECODABLE}/one_pixel.png": (12, 34, 56),
    f"{DECODABLE}/UPPER.JPG": (128, 128, 128),
    f"{DECODABLE}/link_to_bitmap.bmp": (0, 160, 0),
    UNICODE_NAME: (200, 100, 50),
}

ANIMATED_FRAMES = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
GRAY_VALUE = 77
SIXTEEN_BIT_VALUES = (0, 1000, 12345, 32896, 65535)
EXIF_STORED_SIZE = (64, 32)  # width, height before the orientation 6 rotation
EXIF_PATCH_SIZE = (32, 8)  # red patch in the stored top-left corner, the rest is blue


def _save(image: Image.Image, path: Path, format: str | None = None, **params: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format, **params)


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def _noise_jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_decodable(folder: Path) -> dict[str, str]:
    colours = {Path(rel).name: rgb for rel, rgb in SOLID_COLOURS.items()}
    _save(_solid(colours["png_bytes.jpg"]), folder / "png_bytes.jpg", "PNG")
    _save(_solid(colours["bitmap.bmp"]), folder / "bitmap.bmp")
    _save(_solid(colours["static.gif"]), folder / "static.gif")
    _save(_solid(colours["tagged.tiff"]), folder / "tagged.tiff")
    _save(_solid(colours["lossless.webp"]), folder / "lossless.webp", lossless=True)
    _save(_solid(colours["one_pixel.png"], (1, 1)), folder / "one_pixel.png")
    _save(_solid(colours["UPPER.JPG"]), folder / "UPPER.JPG", "JPEG", quality=95)
    _save(_solid(colours[Path(UNICODE_NAME).name]), folder / Path(UNICODE_NAME).name)
    os.symlink("bitmap.bmp", folder / "link_to_bitmap.bmp")

    frames = [_solid(rgb) for rgb in ANIMATED_FRAMES]
    _save(frames[0], folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    # Adobe-style CMYK JPEG of pure red: no cyan, full magenta and yellow, no black.
    _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), folder / "cmyk.jpg", quality=95)
    _save(Image.new("L", (16, 16), GRAY_VALUE), folder / "gray.png")

    # Five constant columns, one per 16-bit value. Pillow reads this back as mode I;16.
    columns = np.array(SIXTEEN_BIT_VALUES, dtype=np.uint16)
    _save(Image.fromarray(np.tile(columns, (5, 1))), folder / "gray16.png")

    # Palette image: index 0 (transparent black) on the left half, index 1 (red) on the right.
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0])
    palette_image.paste(1, (8, 0, 16, 16))
    _save(palette_image, folder / "palette_transparent.png", transparency=0)

    # RGBA bands: columns 0-5 transparent blue, 6-10 black at alpha 128, 11-15 opaque red.
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, 0:6] = (0, 0, 255, 0)
    rgba[:, 6:11] = (0, 0, 0, 128)
    rgba[:, 11:16] = (255, 0, 0, 255)
    _save(Image.fromarray(rgba), folder / "rgba.png")

    stored = Image.new("RGB", EXIF_STORED_SIZE, (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, *EXIF_PATCH_SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _save(stored, folder / "exif_rotated.jpg", quality=100, subsampling=0, exif=exif)

    _save(_solid((90, 90, 90), BOMB_SIZE), folder / "bomb.png")

    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "._bitmap.bmp").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    (folder / "Thumbs.db").write_bytes(bytes(32))
    _save(_solid((1, 2, 3)), folder / ".ipynb_checkpoints" / "bitmap-checkpoint.png")
    _save(_solid((4, 5, 6)), folder / "nested" / "inner.png")

    outcomes = {f"{DECODABLE}/{name}": "decoded" for name in colours}
    outcomes.update(
        {
            f"{DECODABLE}/{name}": "decoded"
            for name in (
                "animated.gif",
                "cmyk.jpg",
                "gray.png",
                "gray16.png",
                "palette_transparent.png",
                "rgba.png",
                "exif_rotated.jpg",
            )
        }
    )
    outcomes[f"{DECODABLE}/bomb.png"] = (
        f"error: decompression bomb: {BOMB_SIZE[0] * BOMB_SIZE[1]} pixels > limit {BOMB_PIXEL_LIMIT}"
    )
    for name in (
        "notes.txt",
        ".DS_Store",
        "._bitmap.bmp",
        "Thumbs.db",
        ".ipynb_checkpoints/bitmap-checkpoint.png",
        "nested/inner.png",
    ):
        outcomes[f"{DECODABLE}/{name}"] = "ignored"
    outcomes[f"{DECODABLE}/nested"] = "warning"
    return outcomes


def _write_undecodable(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "truncated.jpg").write_bytes(_noise_jpeg_bytes(seed=1)[:1500])
    os.symlink("does_not_exist.jpg", folder / "broken_link.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")

    outcomes = {
        f"{UNDECODABLE}/empty.jpg": "error: empty file",
        f"{UNDECODABLE}/text.jpg": "error: not an image file (cannot identify format)",
        f"{UNDECODABLE}/truncated.jpg": "error: truncated image data",
        f"{UNDECODABLE}/broken_link.jpg": "skipped: broken symlink",
        f"{UNDECODABLE}/loop.jpg": "skipped: symlink loop",
    }
    if hasattr(os, "mkfifo"):
        # Opening a FIFO for reading blocks until a writer appears, so it must never be opened.
        os.mkfifo(folder / "fifo.jpg")
        outcomes[f"{UNDECODABLE}/fifo.jpg"] = "skipped: not a regular file"
    return outcomes


def make_bad_input_tree(root: Path) -> dict[str, str]:
    """Write the bad-input tree under ``root`` and return relative path -> expected outcome.

    The tree has no split folders. Classes ``decodable`` and ``undecodable`` contain
    images. ``empty_class`` contains only a text file. Hidden folders and files sit both
    at the top level and inside a class folder. See the module docstring for the
    outcome strings.
    """
    root.mkdir(parents=True, exist_ok=True)
    outcomes = _write_decodable(root / DECODABLE)
    outcomes.update(_write_undecodable(root / UNDECODABLE))

    (root / EMPTY_CLASS).mkdir()
    (root / EMPTY_CLASS / "readme.txt").write_text("no images here\n")
    outcomes[EMPTY_CLASS] = "warning"

    _save(_solid((7, 8, 9)), root / ".ipynb_checkpoints" / "cats" / "a.png")
    (root / "__MACOSX" / DECODABLE).mkdir(parents=True)
    (root / "__MACOSX" / DECODABLE / "._bitmap.bmp").write_bytes(b"\x00\x05\x16\x07junk")
    (root / "Thumbs.db").write_bytes(bytes(32))
    outcomes[".ipynb_checkpoints/cats/a.png"] = "ignored"
    outcomes[f"__MACOSX/{DECODABLE}/._bitmap.bmp"] = "ignored"
    outcomes["Thumbs.db"] = "ignored"
    return outcomes

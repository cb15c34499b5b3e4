"""Tests for pipeline.images: tree scanning, content digests and decoding of good and bad files.

Every input is written with Pillow under tmp_path, except the draft-tolerance test, which
uses real cats_vs_dogs photos and skips when they are missing.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xxhash
from image_fixtures import (
    ANIMATED_FRAMES,
    BOMB_PIXEL_LIMIT,
    BOMB_SIZE,
    DECODABLE,
    EMPTY_CLASS,
    EXIF_PATCH_SIZE,
    EXIF_STORED_SIZE,
    GRAY_VALUE,
    SIXTEEN_BIT_VALUES,
    SOLID_COLOURS,
    UNDECODABLE,
    UNICODE_NAME,
    make_bad_input_tree,
)
from PIL import Image, ImageFile, ImageOps

from pipeline.images import (
    IMAGE_SUFFIXES,
    RESIZE_METHODS,
    SPLITS,
    DataFolderError,
    ImageDecodeError,
    Manifest,
    file_digest,
    load_image,
    scan_tree,
)

WHITE = (255, 255, 255)
RED = (255, 0, 0)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The bad-input tree and its expected outcomes; tests must not modify it."""
    root = tmp_path_factory.mktemp("bad_inputs") / "data"
    return root, make_bad_input_tree(root)


@pytest.fixture(scope="module")
def bad_manifest(bad_tree: tuple[Path, dict[str, str]]) -> Manifest:
    return scan_tree(bad_tree[0])


def _decode(root: Path, rel: str, size: int = 16, **options: object) -> np.ndarray:
    return load_image(root / rel, size, **options)


def _decode_error(root: Path, rel: str, size: int = 16) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        load_image(root / rel, size)
    return info.value


def _write_images(root: Path, relative_paths: Iterable[str]) -> None:
    """Write a small PNG at each path, creating files and folders in the order given.

    The colour depends only on the path, so the same paths give the same bytes.
    """
    for rel in relative_paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        red = zlib.crc32(rel.encode()) % 256
        Image.new("RGB", (4, 4), (red, 0, 0)).save(path, format="PNG")


def _manifest_summary(manifest: Manifest) -> tuple[object, ...]:
    """Everything in a manifest except the root, absolute paths and mtimes."""
    entries = [(e.path, e.label, e.class_name, e.split, e.size) for e in manifest.entries]
    return (manifest.classes, entries, manifest.has_splits, manifest.warnings, manifest.skipped)


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint16 array as a 16-bit RGB PNG, which Pillow cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width, _ = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random texture, so resampling differences show up as pixel differences."""
    coarse = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------- bad-input tree


def test_bad_tree_scan_matches_outcomes(
    bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest
) -> None:
    _, outcomes = bad_tree
    entry_paths = {entry.path for entry in bad_manifest.entries}
    skipped = dict(bad_manifest.skipped)

    for rel, outcome in outcomes.items():
        named_in_warning = any(f"'{rel}'" in warning for warning in bad_manifest.warnings)
        if outcome == "decoded" or outcome.startswith("error: "):
            assert rel in entry_paths, f"{rel} ({outcome}) missing from entries"
        elif outcome.startswith("skipped: "):
            assert skipped.get(rel) == outcome.removeprefix("skipped: "), rel
        elif outcome == "ignored":
            assert rel not in entry_paths, rel
            assert rel not in skipped, rel
            assert not named_in_warning, rel
        else:
            assert outcome == "warning", f"unknown outcome {outcome!r} for {rel}"
            assert named_in_warning, f"no warning names {rel}: {bad_manifest.warnings}"

    listed = {rel for rel, outcome in outcomes.items() if outcome == "decoded" or outcome.startswith("error: ")}
    assert entry_paths == listed
    assert set(skipped) == {rel for rel, outcome in outcomes.items() if outcome.startswith("skipped: ")}
    assert len(bad_manifest.warnings) == sum(outcome == "warning" for outcome in outcomes.values())


def test_bad_tree_decode_matches_outcomes(
    bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outcomes = bad_tree
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_PIXEL_LIMIT)

    for entry in bad_manifest.entries:
        outcome = outcomes[entry.path]
        if outcome == "decoded":
            assert load_image(entry.abs_path, 24).shape == (24, 24, 3), entry.path
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(ImageDecodeError) as info:
                load_image(entry.abs_path, 24)
        assert info.value.reason.startswith(outcome.removeprefix("error: ")), entry.path


def test_bad_tree_classes_and_labels(bad_manifest: Manifest) -> None:
    assert bad_manifest.classes == [DECODABLE, UNDECODABLE]
    assert not bad_manifest.has_splits
    for entry in bad_manifest.entries:
        assert bad_manifest.classes[entry.label] == entry.class_name
        assert entry.split == ""


# --------------------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("rel", sorted(SOLID_COLOURS))
def test_solid_image_decoded(bad_tree: tuple[Path, dict[str, str]], rel: str) -> None:
    root, _ = bad_tree
    with Image.open(root / rel) as img:
        lossy = img.format == "JPEG"
    image = _decode(root, rel)

    assert image.shape == (16, 16, 3)
    assert image.dtype == np.uint8
    tolerance = 2 if lossy else 0
    assert np.abs(image.astype(int) - SOLID_COLOURS[rel]).max() <= tolerance


def test_png_bytes_named_jpg_decoded(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    rel = f"{DECODABLE}/png_bytes.jpg"
    with Image.open(root / rel) as img:
        assert img.format == "PNG"

    assert tuple(_decode(root, rel)[0, 0]) == SOLID_COLOURS[rel]


def test_animated_gif_uses_first_frame(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    rel = f"{DECODABLE}/animated.gif"
    with Image.open(root / rel) as img:
        assert img.n_frames == len(ANIMATED_FRAMES)

    image = _decode(root, rel)
    assert np.all(image == ANIMATED_FRAMES[0])


def test_animated_webp_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((0, 200, 0), (200, 0, 0))]
    path = tmp_path / "animated.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with Image.open(path) as img:
        assert img.n_frames == 2

    assert np.all(load_image(path, 16) == (0, 200, 0))


def test_cmyk_jpeg_converted_to_rgb(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    rel = f"{DECODABLE}/cmyk.jpg"
    with Image.open(root / rel) as img:
        assert img.mode == "CMYK"

    image = _decode(root, rel)
    assert np.abs(image.astype(int) - RED).max() <= 8


def test_grayscale_png_expanded_to_rgb(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    assert np.all(_decode(root, f"{DECODABLE}/gray.png") == GRAY_VALUE)


def test_sixteen_bit_png_scaled_to_eight_bits(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    rel = f"{DECODABLE}/gray16.png"
    with Image.open(root / rel) as img:
        assert img.mode.startswith("I")

    image = _decode(root, rel, size=len(SIXTEEN_BIT_VALUES), resize="nearest")
    expected = [round(value / 257) for value in SIXTEEN_BIT_VALUES]
    assert image[0, :, 0].tolist() == expected
    assert np.all(image == image[:, :, :1])


def test_sixteen_bit_rgb_png_within_one_level(tmp_path: Path) -> None:
    values = np.array([[[1000, 30000, 65535], [40000, 0, 12345]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_rgb16(values))

    image = load_image(path, 2, resize="nearest")
    # Pillow keeps the high byte of each 16-bit sample, which is within 1 of value / 257.
    assert np.abs(image.astype(float) - values / 257).max() <= 1.0


def test_palette_transparency_over_white(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    image = _decode(root, f"{DECODABLE}/palette_transparent.png")

    assert np.all(image[:, :8] == WHITE)
    assert np.all(image[:, 8:] == RED)


def test_rgba_transparent_pixels_become_white(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    image = _decode(root, f"{DECODABLE}/rgba.png")

    assert np.all(image[:, 0:6] == WHITE)
    # Black at alpha 128 over white: 255 * (1 - 128 / 255) = 127.
    assert np.abs(image[:, 6:11].astype(int) - 127).max() <= 1
    assert np.all(image[:, 11:16] == RED)


def test_rgba_resize_hides_transparent_colour(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    image = _decode(root, f"{DECODABLE}/rgba.png", size=7).astype(int)

    # The transparent pixels are pure blue. Without premultiplied alpha their blue would
    # bleed into neighbours, which are otherwise white, grey or red (green == blue).
    assert np.abs(image[..., 1] - image[..., 2]).max() <= 1


def test_one_bit_png_converted_to_rgb(tmp_path: Path) -> None:
    image = Image.new("1", (16, 16), 0)
    image.paste(1, (0, 0, 16, 8))
    path = tmp_path / "bits.png"
    image.save(path)

    decoded = load_image(path, 16)
    assert np.all(decoded[:8] == WHITE)
    assert np.all(decoded[8:] == 0)


def test_gray_alpha_png_over_white(tmp_path: Path) -> None:
    pixels = np.zeros((16, 16, 2), dtype=np.uint8)
    pixels[:, :8] = (0, 0)  # transparent black
    pixels[:, 8:] = (60, 255)  # opaque dark grey
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as img:
        assert img.mode == "LA"

    decoded = load_image(path, 16)
    assert np.all(decoded[:, :8] == WHITE)
    assert np.all(decoded[:, 8:] == 60)


def test_one_pixel_image_upsampled(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    rel = f"{DECODABLE}/one_pixel.png"
    image = _decode(root, rel, size=32)

    assert image.shape == (32, 32, 3)
    assert np.all(image == SOLID_COLOURS[rel])


def test_unlisted_format_with_image_suffix_rejected(tmp_path: Path) -> None:
    path = tmp_path / "icon.png"
    Image.new("RGB", (16, 16), RED).save(path, format="ICO")

    with pytest.raises(ImageDecodeError) as info:
        load_image(path, 16)
    assert info.value.reason == "not an image file (cannot identify format)"


# --------------------------------------------------------------------------- EXIF orientation


def _red_mask(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 128) & (image[..., 2] < 128)


def _assert_red_exactly_in(mask: np.ndarray, rows: slice, cols: slice) -> None:
    inside = np.zeros_like(mask)
    inside[rows, cols] = True
    # JPEG blurs the patch edge by a pixel or two, so only count pixels 2 px from it.
    core = np.zeros_like(mask)
    core[rows.start + 2 : rows.stop - 2, cols.start + 2 : cols.stop - 2] = True
    grown = np.zeros_like(mask)
    grown[max(rows.start - 2, 0) : rows.stop + 2, max(cols.start - 2, 0) : cols.stop + 2] = True
    assert mask[core].all()
    assert not mask[~grown].any()


def test_exif_orientation_6_rotated_upright(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    width, height = EXIF_STORED_SIZE
    patch_width, patch_height = EXIF_PATCH_SIZE
    image = _decode(root, f"{DECODABLE}/exif_rotated.jpg", size=width, resize="nearest")

    # Upright the image is height x width wide/tall, so x scales by width/height and y by 1.
    # The stored top-left patch ends up at the top-right, patch_height wide, patch_width tall.
    scale_x = width // height
    cols = slice(width - patch_height * scale_x, width)
    _assert_red_exactly_in(_red_mask(image), slice(0, patch_width), cols)


def test_exif_transpose_false_keeps_stored(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    width, height = EXIF_STORED_SIZE
    patch_width, patch_height = EXIF_PATCH_SIZE
    image = _decode(
        root, f"{DECODABLE}/exif_rotated.jpg", size=width, resize="nearest", exif_transpose=False
    )

    scale_y = width // height
    _assert_red_exactly_in(_red_mask(image), slice(0, patch_height * scale_y), slice(0, patch_width))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_imageops(tmp_path: Path, orientation: int) -> None:
    # 1001 x 757 is not a multiple of 8, so the draft box has a fractional edge to move.
    path = tmp_path / "oriented.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _textured_image(1001, 757).save(path, quality=95, exif=exif)
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")
    expected = np.asarray(upright.resize((64, 64), Image.Resampling.BILINEAR))

    full = load_image(path, 64, draft=False)
    drafted = load_image(path, 64, draft=True)

    assert np.array_equal(full, expected)
    assert _mean_abs_diff(drafted, expected) < 3.0


# --------------------------------------------------------------------------- decode errors


def test_zero_byte_file_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    assert _decode_error(root, f"{UNDECODABLE}/empty.jpg").reason == "empty file"


def test_truncated_jpeg_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    error = _decode_error(root, f"{UNDECODABLE}/truncated.jpg")

    assert error.reason == "truncated image data"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_rejected(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _textured_image(64, 64).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with pytest.raises(ImageDecodeError) as info:
        load_image(path, 16)
    assert info.value.reason == "truncated image data"


def test_text_file_named_jpg_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    error = _decode_error(root, f"{UNDECODABLE}/text.jpg")

    assert error.reason == "not an image file (cannot identify format)"
    assert str(root / UNDECODABLE / "text.jpg") in str(error)


def test_bomb_over_limit_rejected(
    bad_tree: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = bad_tree
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_PIXEL_LIMIT)
    pixels = BOMB_SIZE[0] * BOMB_SIZE[1]
    assert BOMB_PIXEL_LIMIT < pixels <= 2 * BOMB_PIXEL_LIMIT  # Pillow only warns here

    with pytest.warns(Image.DecompressionBombWarning):
        error = _decode_error(root, f"{DECODABLE}/bomb.png")
    assert error.reason == f"decompression bomb: {pixels} pixels > limit {BOMB_PIXEL_LIMIT}"
    assert "MAX_IMAGE_PIXELS" in str(error)


def test_bomb_over_twice_limit_rejected(
    bad_tree: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = bad_tree
    limit = BOMB_PIXEL_LIMIT // 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    pixels = BOMB_SIZE[0] * BOMB_SIZE[1]
    assert pixels > 2 * limit  # Pillow raises DecompressionBombError here

    error = _decode_error(root, f"{DECODABLE}/bomb.png")
    assert error.reason == f"decompression bomb: {pixels} pixels > limit {limit}"


def test_bomb_warning_filter_error_rejected(
    bad_tree: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = bad_tree
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_PIXEL_LIMIT)
    pixels = BOMB_SIZE[0] * BOMB_SIZE[1]

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        error = _decode_error(root, f"{DECODABLE}/bomb.png")
    assert error.reason == f"decompression bomb: {pixels} pixels > limit {BOMB_PIXEL_LIMIT}"


def test_bomb_decoded_below_limit(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > BOMB_SIZE[0] * BOMB_SIZE[1]
    assert np.all(_decode(root, f"{DECODABLE}/bomb.png") == 90)


def test_broken_symlink_load_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    assert _decode_error(root, f"{UNDECODABLE}/broken_link.jpg").reason == "broken symlink"


def test_symlink_loop_load_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    assert _decode_error(root, f"{UNDECODABLE}/loop.jpg").reason == "symlink loop"


@pytest.mark.timeout(20)
def test_fifo_load_rejected_without_blocking(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    if not (root / UNDECODABLE / "fifo.jpg").exists():
        pytest.skip("os.mkfifo is not available on this platform")
    assert _decode_error(root, f"{UNDECODABLE}/fifo.jpg").reason == "not a regular file"


def test_missing_file_load_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "gone.jpg", 16)
    assert info.value.reason == "file not found"


# --------------------------------------------------------------------------- load_image options


def test_output_is_contiguous_uint8(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    image = _decode(root, f"{DECODABLE}/bitmap.bmp", size=20)

    assert image.shape == (20, 20, 3)
    assert image.dtype == np.uint8
    assert image.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("method", RESIZE_METHODS)
def test_every_resize_method_accepted(tmp_path: Path, method: str) -> None:
    path = tmp_path / "texture.png"
    _textured_image(90, 60).save(path)

    assert load_image(path, 33, resize=method).shape == (33, 33, 3)


def test_resize_methods_differ(tmp_path: Path) -> None:
    path = tmp_path / "texture.png"
    _textured_image(90, 60).save(path)
    outputs = [load_image(path, 33, resize=method).tobytes() for method in RESIZE_METHODS]

    assert len(set(outputs)) == len(RESIZE_METHODS)


def test_unknown_resize_method_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    with pytest.raises(ValueError) as info:
        _decode(root, f"{DECODABLE}/bitmap.bmp", resize="cubic")

    assert "'cubic'" in str(info.value)
    for method in RESIZE_METHODS:
        assert method in str(info.value)


def test_size_below_one_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    with pytest.raises(ValueError, match="got 0"):
        _decode(root, f"{DECODABLE}/bitmap.bmp", size=0)


def test_non_int_size_rejected(bad_tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_tree
    with pytest.raises(TypeError, match="got 16.0"):
        load_image(root / DECODABLE / "bitmap.bmp", 16.0)  # type: ignore[arg-type]


def test_draft_unused_for_nearest_and_area(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    _textured_image(1001, 757).save(path, quality=90)

    for method in ("nearest", "area"):
        drafted = load_image(path, 64, resize=method, draft=True)
        full = load_image(path, 64, resize=method, draft=False)
        assert np.array_equal(drafted, full), method


def test_draft_used_for_bilinear(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    _textured_image(1001, 757).save(path, quality=90)

    drafted = load_image(path, 64, draft=True)
    full = load_image(path, 64, draft=False)
    assert not np.array_equal(drafted, full)


def test_parallel_decoding_matches_sequential(
    bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest
) -> None:
    root, outcomes = bad_tree
    paths = [e.abs_path for e in bad_manifest.entries if outcomes[e.path] == "decoded"] * 4
    sequential = [load_image(path, 40).tobytes() for path in paths]

    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda path: load_image(path, 40).tobytes(), paths))
    assert parallel == sequential


def test_draft_close_to_full_decode(cats_vs_dogs: Path) -> None:
    """Pin the draft tolerance stated next to _DRAFT_FILTERS in pipeline/images.py."""
    photos = sorted((cats_vs_dogs / "train" / "cats").glob("*.jpg"))[:30]
    photos += sorted((cats_vs_dogs / "train" / "dogs").glob("*.jpg"))[:30]
    assert len(photos) == 60

    # About 500x375 photos: 150 px uses 1/2 DCT scale and 64 px uses 1/4.
    for size in (150, 64):
        for method in ("bilinear", "bicubic", "lanczos"):
            diffs = [
                _mean_abs_diff(
                    load_image(photo, size, resize=method, draft=True),
                    load_image(photo, size, resize=method, draft=False),
                )
                for photo in photos
            ]
            label = f"{method} at {size} px"
            assert max(diffs) < 3.0, label
            assert float(np.mean(diffs)) < 1.5, label
            assert sum(diff > 0 for diff in diffs) >= len(photos) // 2, f"draft unused: {label}"


# --------------------------------------------------------------------------- scan_tree: bad entries


def test_broken_symlink_skipped(bad_manifest: Manifest) -> None:
    assert (f"{UNDECODABLE}/broken_link.jpg", "broken symlink") in bad_manifest.skipped


def test_symlink_loop_skipped(bad_manifest: Manifest) -> None:
    assert (f"{UNDECODABLE}/loop.jpg", "symlink loop") in bad_manifest.skipped


def test_fifo_skipped(bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest) -> None:
    root, _ = bad_tree
    if not (root / UNDECODABLE / "fifo.jpg").exists():
        pytest.skip("os.mkfifo is not available on this platform")
    assert (f"{UNDECODABLE}/fifo.jpg", "not a regular file") in bad_manifest.skipped


def test_symlink_to_file_followed(bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest) -> None:
    root, _ = bad_tree
    by_path = {entry.path: entry for entry in bad_manifest.entries}
    link = by_path[f"{DECODABLE}/link_to_bitmap.bmp"]

    assert link.abs_path.is_symlink()
    assert link.size == (root / DECODABLE / "bitmap.bmp").stat().st_size


def test_unicode_file_name_listed(bad_tree: tuple[Path, dict[str, str]], bad_manifest: Manifest) -> None:
    root, _ = bad_tree
    by_path = {entry.path: entry for entry in bad_manifest.entries}

    assert UNICODE_NAME in by_path
    assert by_path[UNICODE_NAME].abs_path == root.resolve() / UNICODE_NAME
    assert np.all(load_image(by_path[UNICODE_NAME].abs_path, 8) == SOLID_COLOURS[UNICODE_NAME])


def test_empty_class_folder_warned(bad_manifest: Manifest) -> None:
    assert f"class folder '{EMPTY_CLASS}' contains no images and is ignored" in bad_manifest.warnings
    assert EMPTY_CLASS not in bad_manifest.classes


def test_hidden_names_ignored(bad_manifest: Manifest) -> None:
    hidden = (".DS_Store", "._bitmap.bmp", "Thumbs.db", ".ipynb_checkpoints", "__MACOSX")
    listed = [entry.path for entry in bad_manifest.entries] + [path for path, _ in bad_manifest.skipped]

    for name in hidden:
        assert not any(name in path for path in listed), name
        assert not any(name in warning for warning in bad_manifest.warnings), name
        assert name not in bad_manifest.classes


def test_nested_folder_in_class_warned(bad_manifest: Manifest) -> None:
    nested = f"{DECODABLE}/nested"

    assert any(f"'{nested}'" in warning for warning in bad_manifest.warnings)
    assert not any(entry.path.startswith(nested) for entry in bad_manifest.entries)


def test_non_image_files_ignored_silently(bad_manifest: Manifest) -> None:
    listed = [entry.path for entry in bad_manifest.entries] + [path for path, _ in bad_manifest.skipped]

    assert not any(path.endswith(".txt") for path in listed)
    assert not any(".txt" in warning for warning in bad_manifest.warnings)


def test_uppercase_suffix_listed(bad_manifest: Manifest) -> None:
    assert f"{DECODABLE}/UPPER.JPG" in {entry.path for entry in bad_manifest.entries}


def test_image_suffixes_are_lowercase() -> None:
    assert IMAGE_SUFFIXES == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# --------------------------------------------------------------------------- scan_tree: layout


SPLIT_TREE = (
    "train/dogs/b.png",
    "train/cats/b.png",
    "train/cats/a.png",
    "validation/dogs/c.png",
    "validation/cats/z.png",
    "test/cats/y.png",
)


def test_manifest_independent_of_creation_order(tmp_path: Path) -> None:
    files = (*SPLIT_TREE, "test/birds/x.png", "train/birds/q r.png", "train/cats/é.png")
    _write_images(tmp_path / "forward", files)
    _write_images(tmp_path / "backward", reversed(files))

    forward = scan_tree(tmp_path / "forward")
    backward = scan_tree(tmp_path / "backward")
    assert _manifest_summary(forward) == _manifest_summary(backward)


def test_manifest_independent_of_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_images(tmp_path / "data", (*SPLIT_TREE, "train/cats/c d.png", "test/birds/x.png"))
    for rel in ("train/cats/broken 1.png", "train/cats/broken 2.png", "train/dogs/broken.png"):
        (tmp_path / "data" / rel).symlink_to("missing.png")
    for rel in ("train/cats/nested", "train/dogs/nested", "validation/birds"):
        (tmp_path / "data" / rel).mkdir()
    expected = scan_tree(tmp_path / "data")

    # Another machine or file system may list folders in any order.
    real_scandir = os.scandir

    class ReversedScandir:
        def __init__(self, path: Path) -> None:
            with real_scandir(path) as iterator:
                self.entries = list(iterator)[::-1]

        def __enter__(self) -> list[os.DirEntry[str]]:
            return self.entries

        def __exit__(self, *exc_info: object) -> None:
            return None

    monkeypatch.setattr(os, "scandir", ReversedScandir)
    assert _manifest_summary(scan_tree(tmp_path / "data")) == _manifest_summary(expected)


def test_entries_sorted_by_split_class_name(tmp_path: Path) -> None:
    _write_images(tmp_path, SPLIT_TREE)
    manifest = scan_tree(tmp_path)

    assert [entry.path for entry in manifest.entries] == [
        "train/cats/a.png",
        "train/cats/b.png",
        "train/dogs/b.png",
        "validation/cats/z.png",
        "validation/dogs/c.png",
        "test/cats/y.png",
    ]


def test_split_tree_detected(tmp_path: Path) -> None:
    _write_images(tmp_path, SPLIT_TREE)
    manifest = scan_tree(tmp_path)

    assert manifest.has_splits
    assert manifest.classes == ["cats", "dogs"]
    assert {entry.split for entry in manifest.entries} == set(SPLITS)
    for entry in manifest.entries:
        assert entry.path.split("/")[0] == entry.split
        assert manifest.classes[entry.label] == entry.class_name
    # dogs has no test images, which is fine and not worth a warning.
    assert manifest.warnings == []


def test_class_only_outside_train_warned(tmp_path: Path) -> None:
    _write_images(tmp_path, (*SPLIT_TREE, "test/birds/x.png"))
    manifest = scan_tree(tmp_path)

    assert manifest.classes == ["birds", "cats", "dogs"]
    assert any("'birds'" in warning and "train" in warning for warning in manifest.warnings)


def test_flat_tree_entry_fields(tmp_path: Path) -> None:
    _write_images(tmp_path, ("dogs/d.png", "cats/c.png"))
    manifest = scan_tree(tmp_path)

    assert not manifest.has_splits
    assert manifest.root == tmp_path.resolve()
    assert manifest.classes == ["cats", "dogs"]
    first = manifest.entries[0]
    stat = (tmp_path / "cats" / "c.png").stat()
    assert (first.path, first.label, first.class_name, first.split) == ("cats/c.png", 0, "cats", "")
    assert first.abs_path == tmp_path.resolve() / "cats" / "c.png"
    assert (first.size, first.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_stray_images_in_root_warned(tmp_path: Path) -> None:
    _write_images(tmp_path, ("dogs/d.png", "cats/c.png", "loose.png"))
    manifest = scan_tree(tmp_path)

    assert [entry.path for entry in manifest.entries] == ["cats/c.png", "dogs/d.png"]
    assert any("'loose.png'" in warning for warning in manifest.warnings)


def test_mixed_top_level_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path, ("train/cats/a.png", "train/dogs/b.png", "dogs/c.png", "val/cats/d.png"))

    with pytest.raises(DataFolderError) as info:
        scan_tree(tmp_path)
    message = str(info.value)
    assert "dogs" in message
    assert "val" in message
    assert str(tmp_path) in message


def test_splits_without_train_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path, ("validation/cats/a.png", "test/dogs/b.png"))

    with pytest.raises(DataFolderError, match="no 'train' folder"):
        scan_tree(tmp_path)


def test_missing_root_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    with pytest.raises(DataFolderError) as info:
        scan_tree(missing)
    assert str(info.value) == (
        f"data folder not found: '{missing}'. Pass the folder that holds one sub-folder per class,"
        " or train/validation/test folders."
    )


def test_file_as_root_rejected(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(path)

    with pytest.raises(DataFolderError, match="not a directory") as info:
        scan_tree(path)
    assert str(path) in str(info.value)


def test_empty_root_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataFolderError, match="empty") as info:
        scan_tree(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_root_with_only_hidden_files_rejected(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"x")
    _write_images(tmp_path, (".ipynb_checkpoints/cats/a.png",))

    with pytest.raises(DataFolderError, match="empty"):
        scan_tree(tmp_path)


def test_no_images_rejected(tmp_path: Path) -> None:
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("text\n")

    with pytest.raises(DataFolderError, match="no images found") as info:
        scan_tree(tmp_path)
    assert ".jpg" in str(info.value)


def test_one_class_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path, ("cats/a.png", "cats/b.png"))
    (tmp_path / "dogs").mkdir()

    with pytest.raises(DataFolderError, match="only one class") as info:
        scan_tree(tmp_path)
    assert "'cats'" in str(info.value)


def test_one_class_across_splits_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path, ("train/cats/a.png", "validation/cats/b.png"))

    with pytest.raises(DataFolderError, match="only one class"):
        scan_tree(tmp_path)


# --------------------------------------------------------------------------- file_digest


def test_digest_equal_for_equal_bytes(tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "other name.png").write_bytes(data)

    assert file_digest(tmp_path / "a.jpg") == file_digest(tmp_path / "other name.png")


def test_digest_differs_for_one_byte(tmp_path: Path) -> None:
    data = bytearray(os.urandom(5000))
    (tmp_path / "a.jpg").write_bytes(data)
    data[2500] ^= 1
    (tmp_path / "b.jpg").write_bytes(data)

    assert file_digest(tmp_path / "a.jpg") != file_digest(tmp_path / "b.jpg")


@pytest.mark.parametrize("length", [0, 1, 1 << 20, (1 << 20) + 1, 5 * (1 << 19)])
def test_digest_matches_one_shot_hash(tmp_path: Path, length: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)

    digest = file_digest(path)
    assert digest == xxhash.xxh3_128(data).hexdigest()
    assert len(digest) == 32


def test_digest_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        file_digest(tmp_path / "gone.jpg")


@pytest.mark.timeout(20)
def test_digest_of_fifo_raises_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("os.mkfifo is not available on this platform")
    os.mkfifo(tmp_path / "pipe.jpg")

    with pytest.raises(OSError, match="not a regular file"):
        file_digest(tmp_path / "pipe.jpg")


def test_digest_of_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        file_digest(tmp_path)
    assert str(tmp_path) in str(info.value)

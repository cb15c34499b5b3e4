"""Image discovery and content digests for class-folder image trees.

A data folder is either ``<root>/<class>/<image>`` or
``<root>/{train,validation,test}/<class>/<image>``. :func:`scan_tree` turns it into a
deterministic :class:`Manifest`, :func:`file_digest` fingerprints file contents, and
:func:`load_image` (from :mod:`pipeline.decode`, re-exported here) decodes one file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import xxhash

from pipeline.decode import RESIZE_METHODS, ImageDecodeError, load_image, stat_failure_reason

__all__ = [
    "IMAGE_SUFFIXES", "RESIZE_METHODS", "SPLITS", "DataFolderError", "ImageDecodeError", "ImageEntry", "Manifest",
    "file_digest", "load_image", "scan_tree",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
SPLITS = ("train", "validation", "test")

# Names compared in lowercase. Names starting with "." are ignored too (.DS_Store,
# AppleDouble "._x.jpg" files, .ipynb_checkpoints/). "__MACOSX" is the folder that
# macOS Archive Utility adds to zip files.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

_DIGEST_BLOCK_BYTES = 1 << 20
_FOLDER_HINT = "Pass the folder that holds one sub-folder per class, or train/validation/test folders."


class DataFolderError(ValueError):
    """Data folder that cannot be used as a class-folder image tree."""


@dataclass(frozen=True)
class ImageEntry:
    """One image file of a scanned data folder."""

    path: str
    abs_path: Path
    label: int
    class_name: str
    split: str
    size: int
    mtime_ns: int


@dataclass
class Manifest:
    """Result of :func:`scan_tree`: classes, image entries and everything left out."""

    root: Path
    classes: list[str]
    entries: list[ImageEntry]
    has_splits: bool
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- discovery


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@dataclass
class _Listing:
    """Visible sub-folders and regular image files of one folder, sorted by name."""

    folders: list[str] = field(default_factory=list)
    images: list[tuple[str, os.stat_result]] = field(default_factory=list)
    has_entries: bool = False


def _list_folder(folder: Path, rel: str, manifest: Manifest) -> _Listing:
    """List one folder, recording entries that cannot be used in ``manifest``.

    Image-named entries that cannot be stat'ed or are not regular files (FIFOs, sockets)
    go to ``manifest.skipped``. Other entries that cannot be stat'ed get a warning.
    """
    listing = _Listing()
    with os.scandir(folder) as iterator:
        entries = sorted(iterator, key=lambda entry: entry.name)

    for entry in entries:
        if _is_ignored(entry.name):
            continue
        listing.has_entries = True
        entry_rel = _join(rel, entry.name)
        try:
            info = entry.stat()
        except OSError as exc:
            reason = stat_failure_reason(exc, entry.is_symlink())
            if _is_image_name(entry.name):
                manifest.skipped.append((entry_rel, reason))
            else:
                manifest.warnings.append(f"cannot read '{entry_rel}' ({reason}); ignored")
            continue

        if stat.S_ISDIR(info.st_mode):
            listing.folders.append(entry.name)
        elif not _is_image_name(entry.name):
            continue
        elif stat.S_ISREG(info.st_mode):
            listing.images.append((entry.name, info))
        else:
            manifest.skipped.append((entry_rel, "not a regular file"))
    return listing


def _warn_stray_images(listing: _Listing, rel: str, manifest: Manifest) -> None:
    """Warn about images in a folder that should contain only class or split folders."""
    if not listing.images:
        return
    names = ", ".join(f"'{name}'" for name, _ in listing.images[:3])
    more = ", ..." if len(listing.images) > 3 else ""
    where = f"'{rel}'" if rel else "the data folder"
    manifest.warnings.append(
        f"{len(listing.images)} image file(s) directly in {where} ignored ({names}{more}):"
        " move them into a class folder"
    )


def _scan_class_folder(
    folder: Path, rel: str, split: str, class_name: str, manifest: Manifest
) -> list[ImageEntry]:
    """Return the entries of one class folder with label -1, which scan_tree sets later."""
    try:
        listing = _list_folder(folder, rel, manifest)
    except OSError as exc:
        reason = stat_failure_reason(exc, is_symlink=False)
        manifest.warnings.append(f"cannot read class folder '{rel}' ({reason}); ignored")
        return []

    for name in listing.folders:
        manifest.warnings.append(
            f"folder '{_join(rel, name)}' ignored: images must sit directly in the class folder"
        )
    if not listing.images:
        manifest.warnings.append(f"class folder '{rel}' contains no images and is ignored")

    return [
        ImageEntry(
            path=_join(rel, name),
            abs_path=folder / name,
            label=-1,
            class_name=class_name,
            split=split,
            size=info.st_size,
            mtime_ns=info.st_mtime_ns,
        )
        for name, info in listing.images
    ]


def _check_split_folders(folders: list[str], root_text: str) -> bool:
    """Return whether the top-level folders form a split tree, or raise DataFolderError."""
    split_folders = [name for name in folders if name in SPLITS]
    if not split_folders:
        return False

    other_folders = [name for name in folders if name not in SPLITS]
    if other_folders:
        raise DataFolderError(
            f"data folder '{root_text}' mixes split folders ({', '.join(split_folders)}) with other"
            f" folders ({', '.join(other_folders)}). Use only class folders, or only"
            f" {'/'.join(SPLITS)} folders: move or rename {', '.join(other_folders)}."
        )
    if "train" not in split_folders:
        raise DataFolderError(
            f"data folder '{root_text}' has split folders ({', '.join(split_folders)}) but no"
            " 'train' folder. Add train/<class>/ folders, or put class folders directly in"
            " the data folder."
        )
    return True


def scan_tree(root: str | os.PathLike[str]) -> Manifest:
    """Scan a class-folder image tree into a deterministic manifest.

    The tree is ``root/<class>/<image>`` or ``root/{train,validation,test}/<class>/<image>``.
    Folders and files are visited in sorted order, so equal trees give equal manifests on
    any machine. Classes are the class folder names that contain images in any split,
    sorted and numbered from 0. Only files with a suffix in :data:`IMAGE_SUFFIXES` that
    sit directly in a class folder count. Hidden names (starting with "."), ``Thumbs.db``,
    ``desktop.ini`` and ``__MACOSX`` are ignored. Symlinks to files are followed.

    Parameters
    ----------
    root : str or os.PathLike
        Data folder. A leading ``~`` is expanded.

    Returns
    -------
    Manifest
        Entries sorted by split (train, validation, test), class name and file name.
        ``warnings`` lists empty class folders, nested folders and misplaced images, and
        ``skipped`` lists image-named entries that cannot be stat'ed or are not regular
        files, with reasons such as "broken symlink" or "symlink loop".

    Raises
    ------
    DataFolderError
        If the root is missing, not a folder, empty or unreadable, mixes split folders
        with class folders, has split folders without ``train``, or contains images of
        fewer than two classes.
    """
    root_text = os.fspath(root)
    root_path = Path(root_text).expanduser()
    if not root_path.exists():
        raise DataFolderError(f"data folder not found: '{root_text}'. {_FOLDER_HINT}")
    if not root_path.is_dir():
        raise DataFolderError(f"data folder is not a directory: '{root_text}'. {_FOLDER_HINT}")

    root_path = root_path.resolve()
    manifest = Manifest(root=root_path, classes=[], entries=[], has_splits=False)
    try:
        top = _list_folder(root_path, "", manifest)
    except OSError as exc:
        raise DataFolderError(
            f"cannot read data folder '{root_text}': {exc.strerror or exc}. Check its permissions."
        ) from exc
    if not top.has_entries:
        raise DataFolderError(
            f"data folder is empty: '{root_text}'. Add one sub-folder of images per class,"
            " or train/validation/test folders that each contain class folders."
        )

    _warn_stray_images(top, "", manifest)
    manifest.has_splits = _check_split_folders(top.folders, root_text)

    # Each item is (split name, folder relative to root, its class folder names).
    class_folders: list[tuple[str, str, list[str]]] = []
    if manifest.has_splits:
        for split in SPLITS:
            if split not in top.folders:
                continue
            try:
                listing = _list_folder(root_path / split, split, manifest)
            except OSError as exc:
                reason = stat_failure_reason(exc, is_symlink=False)
                manifest.warnings.append(f"cannot read split folder '{split}' ({reason}); ignored")
                continue
            _warn_stray_images(listing, split, manifest)
            if not listing.folders:
                manifest.warnings.append(f"split folder '{split}' contains no class folders")
            class_folders.append((split, split, listing.folders))
    else:
        class_folders.append(("", "", top.folders))

    entries: list[ImageEntry] = []
    for split, split_rel, names in class_folders:
        for class_name in names:
            rel = _join(split_rel, class_name)
            entries.extend(_scan_class_folder(root_path / rel, rel, split, class_name, manifest))

    if not entries:
        layout = "train/<class>/<image>" if manifest.has_splits else "<class>/<image>"
        raise DataFolderError(
            f"no images found in data folder '{root_text}'. Put image files"
            f" ({', '.join(sorted(IMAGE_SUFFIXES))}) directly in each class folder: {layout}."
        )

    classes = sorted({entry.class_name for entry in entries})
    if len(classes) < 2:
        raise DataFolderError(
            f"data folder '{root_text}' contains images of only one class ('{classes[0]}')."
            " A classifier needs at least two class folders with images: add another one."
        )
    if manifest.has_splits:
        train_classes = {entry.class_name for entry in entries if entry.split == "train"}
        for class_name in classes:
            if class_name not in train_classes:
                manifest.warnings.append(
                    f"class '{class_name}' has no images in train/, so a classifier never learns it"
                )

    label_of = {name: index for index, name in enumerate(classes)}
    split_order = {name: index for index, name in enumerate(("",) + SPLITS)}
    entries.sort(key=lambda entry: (split_order[entry.split], entry.class_name, entry.abs_path.name))
    manifest.classes = classes
    manifest.entries = [replace(entry, label=label_of[entry.class_name]) for entry in entries]
    logger.debug(
        "scanned %s: %d images, %d classes, %d warnings, %d skipped",
        root_path,
        len(manifest.entries),
        len(classes),
        len(manifest.warnings),
        len(manifest.skipped),
    )
    return manifest


# --------------------------------------------------------------------------- digests


def file_digest(path: str | os.PathLike[str]) -> str:
    """Hash the bytes of a file with xxHash XXH3-128.

    Parameters
    ----------
    path : str or os.PathLike
        File to hash. It is read in 1 MiB blocks, so memory use stays flat.

    Returns
    -------
    str
        32-character lowercase hex digest.

    Raises
    ------
    OSError
        If the file cannot be opened or read, or is not a regular file.
    """
    # O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer.
    # It changes nothing for regular files.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    hasher = xxhash.xxh3_128()
    buffer = bytearray(_DIGEST_BLOCK_BYTES)
    view = memoryview(buffer)
    descriptor = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        with open(descriptor, "rb", buffering=0, closefd=False) as file:
            while count := file.readinto(buffer):
                hasher.update(view[:count])
    finally:
        os.close(descriptor)
    return hasher.hexdigest()

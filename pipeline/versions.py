"""Versions of the libraries that shape features, stored beside the spec as metadata."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("convcache", "tensorflow", "keras", "numpy", "pillow", "h5py", "scikit-learn")


def library_versions() -> dict[str, str]:
    """Return installed versions of the libraries in :data:`TRACKED`, without importing them."""
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions

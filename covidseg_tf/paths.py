"""Files on disk: content digests and TF Serving's integer version folders."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes in memory (the same digest `sha256_file` gives for a file holding them)."""
    return hashlib.sha256(data).hexdigest()


def integer_versions(base: str | Path) -> dict[int, Path]:
    """{version: folder} of the integer-named sub-folders of a model base path (TF Serving ignores other names,
    such as `.tmp-*`); empty when `base` is not a folder."""
    base = Path(base)
    if not base.is_dir():
        return {}
    return {int(d.name): d for d in base.iterdir() if d.is_dir() and d.name.isdigit()}

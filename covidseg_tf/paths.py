"""Files on disk: content digests, TF Serving's integer version folders, atomic replacement of written files."""

from __future__ import annotations

import hashlib
import os
import tempfile
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


def fsync_path(path: str | Path) -> None:
    """Flush a written file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: str | Path) -> Path:
    """The temporary name `path` is written under before `replace_atomically` (same folder and extension)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def replace_atomically(tmp: str | Path, path: str | Path) -> None:
    """Make the fully written file `tmp` (same folder) `path` in one step: fsync it, os.replace, fsync the folder.
    A kill at any point leaves either the old `path` or the new one, never a part of a file."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def remove_partials(path: str | Path) -> None:
    """Delete what a killed writer of `path` left (`partial_path` names of any process)."""
    path = Path(path)
    for p in path.parent.glob(f".{path.stem}.partial-*{path.suffix}"):
        p.unlink(missing_ok=True)


def unwritable_reason(out_dir: Path) -> str | None:
    """Why the folder `out_dir` cannot be created or written (None when it can): tried with a temporary file in
    it or, when it does not exist yet, in its nearest existing parent (removed at once; nothing is left)."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=probe)
    except OSError as e:
        where = "it" if probe == out_dir else probe
        return f"cannot write a file in {where} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None

"""Files on disk: content digests, TF Serving's integer version folders, atomic replacement of written files, and
folder walks that name what they cannot use (`walk_files`)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Unusable:
    """A path that a folder walk (`walk_files`) or a check of an explicit input (`path_problem`) cannot use."""

    path: Path
    reason: str  # e.g. "a dangling symbolic link (to x.png, which does not exist)"
    error: bool = True  # False: a note only (a symbolic link to a folder, which is not followed)


def path_problem(path: str | Path) -> str | None:
    """Why `path` (an input named on a command line, or an entry of a folder) cannot be read, or None: a dangling
    symbolic link, a symbolic link loop, a path a folder above denies access to, something that is neither a
    regular file nor a folder (a FIFO would block the reader forever). A path that does not exist gives None
    (the caller says "does not exist")."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (it never reaches a file)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return f"cannot access it ({e.strerror or e})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind})"


def walk_files(root: str | Path, keep: Callable[[str], bool] = lambda name: True) -> tuple[list[Path], list[Unusable]]:
    """The regular files below the folder `root` whose names `keep` accepts (recursively, sorted; symbolic links to
    files followed) and, instead of skipping them without a word, what the walk could not use: folders that
    cannot be listed (with the reason, e.g. permission denied), entries `keep` accepts that are dangling or looping
    symbolic links or not regular files (`path_problem`), and, as notes (``error=False``), symbolic links to
    folders, which are not followed (as pathlib's rglob and os.walk do not)."""
    files: list[Path] = []
    unusable: list[Unusable] = []
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            unusable.append(Unusable(folder, f"cannot list the folder ({e.strerror or e})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                    continue
                linked_dir = entry.is_symlink() and entry.is_dir()
            except OSError:
                linked_dir = False
            if linked_dir:
                unusable.append(Unusable(path, "a symbolic link to a folder: not followed (give the folder itself "
                                               "as an input to include it)", error=False))
                continue
            if not keep(entry.name):
                continue
            problem = path_problem(path)
            if problem is not None:
                unusable.append(Unusable(path, problem))
            elif path.is_file():
                files.append(path)
    return sorted(files), sorted(unusable, key=lambda u: u.path)

"""Every file tritonsd writes goes through `atomic_write`: written beside its target under a temporary name, synced
and renamed over the target, so it appears whole or not at all, and removed on any failure, Ctrl-C included.
`check_output` finds the problems a write would meet, before the work that produces the file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_name() -> str:
    # Independent of the target's name, so it is no longer than any name the file system allows.
    return f".tritonsd-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _writable(folder) -> bool:
    # With the ids the process writes with: its effective ones, which differ from the real ones under set-user-ID.
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def check_output(path) -> Path:
    """Refuse an output path that cannot be written: a folder, a missing or unwritable parent folder, or a name
    longer than the file system allows."""
    path = Path(path)
    parent = path.parent
    # os.path.isdir, unlike Path.is_dir, answers False rather than raising for a name that is too long.
    if not os.path.isdir(parent):
        raise ValueError(f"output folder {parent} does not exist")
    if not _writable(parent):
        raise ValueError(f"output folder {parent} is not writable")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):  # not known here: the usual limit
        limit = 255
    longest = max(len(os.fsencode(path.name)), len(_temporary_name()))
    if longest > limit:
        raise ValueError(f"output name {path.name[:32]}... is {longest} bytes; the file system allows {limit}")
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a folder")
    return path


def check_output_folder(path) -> Path:
    """Refuse a folder to write into (made if missing) that is a file or cannot be made or written."""
    path = Path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output folder {path} is not a folder")
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    if not os.path.isdir(existing) or not _writable(existing):
        raise ValueError(f"output folder {path} cannot be written: {existing} is not a writable folder")
    return path


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write the file at `tmp`; it becomes `path` when the block ends. The file
    gets the mode new files get under the umask (0666 & ~umask), whatever mode the writer gives `tmp`."""
    path = check_output(path)
    tmp = path.parent / _temporary_name()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode & 0o777  # what the umask left
        os.close(fd)
        yield tmp
        # Some writers (safetensors) write their own temporary file, mode 0600, and rename it onto tmp.
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

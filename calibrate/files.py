"""Outputs written whole or not at all: a temporary name in the same folder, renamed when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calibrate.errors import GluPruneError


def check_output(path: str | Path, force: bool = False) -> Path:
    """Refuse an output path before any work: it exists (without ``force``), or its folder is
    missing or not writable."""
    path = Path(path)
    if path.exists() and not force:
        raise GluPruneError(f"{path} already exists: pass --force to overwrite it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise GluPruneError(f"folder {parent} does not exist: create it or choose another output")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise GluPruneError(f"folder {parent} is not writable: choose another output") from None
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    except OSError as exc:
        raise GluPruneError(f"cannot write in {path.absolute().parent} ({exc.strerror}): choose another output") \
            from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; an output gets the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise GluPruneError(f"could not write {path} ({exc.strerror or exc}); nothing was written") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (an old ``out`` only
    with ``force``, removed once the new one is in place); on any error nothing changes."""
    out = Path(out)
    if out.exists() and not force:
        raise GluPruneError(f"{out} already exists: pass --force to overwrite it")
    if not out.absolute().parent.is_dir():
        raise GluPruneError(f"folder {out.absolute().parent} does not exist: create it or choose another output")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    except OSError as exc:
        raise GluPruneError(f"cannot write in {out.absolute().parent} ({exc.strerror}): choose another output") \
            from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        replace_dir(tmp, out)
    except OSError as exc:
        raise GluPruneError(f"could not save to {out} ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def drop_cached(*roots: Path) -> None:
    """Write the files under ``roots`` to disk and drop them from the page cache: a cached page stays
    charged to the memory cgroup that touched it, and counts as in use until the kernel reclaims it."""
    for root in roots:
        for path in ([root] if root.is_file() else root.rglob("*") if root.exists() else []):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

"""Atomic outputs: every file or folder this tool writes appears complete or not at all.

A writer fills a hidden sibling (``.<name>.partial-<pid>-XXXX``) and renames it into place only when it is
complete, so a crash, a full disk or Ctrl-C never leaves a half-written artifact that looks valid; the sibling is
removed on failure. Replacing an existing output renames the old one aside first (``.<name>.old-<pid>``) and
deletes it after. ``kill -9`` runs no cleanup, so the writer's process id is in the sibling's name: the next write
of the same output removes the siblings of processes that no longer run (``remove_stale_siblings``).
Temporary files get the permissions a plain ``open()`` would give (0666 minus the umask): ``tempfile`` creates them
0600, which would leave models unreadable to other users and to web servers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# ".<name>.partial-<pid>-XXXX" / ".<name>.old-<pid>"; older writers left ".<name>.partial-XXXX" (no pid)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:partial-(?:(?P<pid>\d+)-)?[^.]*|old-(?P<old_pid>\d+))$")


class OutputError(ValueError):
    """An output path that cannot be written; one line naming the problem and the fix."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the partial / old siblings of ``path`` that killed runs left behind (their process is gone); return
    them. Siblings of a live process are another run's work in progress and stay."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for sibling in path.parent.iterdir():
        m = _SIBLING.match(sibling.name)
        if not m or m["name"] != path.name:
            continue
        pid = m["pid"] or m["old_pid"]
        if pid is not None and _alive(int(pid)):
            continue
        _remove(sibling)
        removed.append(sibling)
    if removed:
        log.warning("removed %d partial file(s) of an interrupted earlier run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def check_output(path: str | os.PathLike, overwrite: bool, folder: bool = False) -> Path:
    """Cheap checks before any expensive work: ``path`` can be created (its nearest existing parent is a writable
    folder) and does not already exist (unless ``overwrite``; an empty folder counts as absent for ``folder``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        if not (folder and path.is_dir() and not any(path.iterdir())):
            raise OutputError(f"output {path} exists: pass --overwrite or choose another -o")
    if path.exists() and overwrite and folder != path.is_dir():
        kind = "a folder" if path.is_dir() else "a file"
        raise OutputError(f"output {path} is {kind}, --overwrite would replace it with "
                          f"{'a folder' if folder else 'a file'}: choose another -o")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file, not a folder; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no write permission in {parent}; choose another -o")
    return path


def _sibling(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def _replace_into(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing folder (or a file in a folder's place) is moved aside first."""
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        trash = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(trash)
        tmp.rename(path)
        _remove(trash)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it becomes ``path`` (replacing any old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, name = tempfile.mkstemp(prefix=_sibling(path, "partial"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _replace_into(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on a clean exit it becomes ``path`` (an old folder is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling(path, "partial"), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for inner in tmp.rglob("*"):  # writers that go through tempfile (or umask-less libraries) leave 0600
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~_umask())
        _replace_into(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(staged: Path, path: Path) -> Path:
    """Move a finished output from a staging folder of the same file system to its final name, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_into(staged, path)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

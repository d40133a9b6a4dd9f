"""Atomic writes: the one way lorakit puts a file or folder on disk.

Every write follows the same steps: the content goes to a hidden temporary name in the
target's own folder (so the rename cannot cross file systems), is flushed to disk with
`fsync`, is renamed over the target with `os.replace`, and the folder is flushed so the rename
itself survives a power cut. A process killed at any moment leaves each target either as it
was or as it is meant to be, never torn; at most a hidden `.<name>.<pid>.<random>.tmp` entry
stays behind. Three shapes share these steps:

- `write_file`/`write_text`: one file (summaries, label maps, plots, rewritten logs);
- `replace_files`: several files staged together, each renamed over its namesake once all of
  them are on disk; other files in the folder are kept (adapter folders, merged models);
- `replace_folder`: a whole folder built under a temporary name and renamed into place; a
  folder is either absent, the old one or the whole new one (checkpoints).

`remove_folder` deletes a folder the same way, renaming it away first, so a half-deleted
folder is never seen under its name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
STAGING_NAME = "staging"

PathLike = str | os.PathLike[str]


def temp_path(target: Path) -> Path:
    """A fresh hidden name next to `target`, unique to this process and call."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one `temp_path` makes (what a killed write may leave behind)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a folder's entries, to disk.

    Folders cannot be opened for syncing on Windows, where renames are durable without it.
    """
    if path.is_dir():
        if os.name == "nt":
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDWR)  # Windows syncs only files opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(source: Path, target: Path) -> None:
    """The rename that ends every write; `source` is already on disk."""
    os.replace(source, target)


def write_file(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Writes one file atomically: `write(temp)` fills a temporary file that then replaces it.

    Args:
        path: The file to write; its folder is created if missing.
        write: Writes the whole content to the path it is given. It must not infer the format
            from the file name (the temporary name ends with `.tmp`): pass it explicitly.

    Returns:
        `path`, as a `Path`.

    Raises:
        Whatever `write` raises, or an `OSError` from the rename; the old file is then kept
        and the temporary file removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(target)
    try:
        write(temp)
        _fsync(temp)
        _put_in_place(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _fsync(target.parent)
    return target


def write_text(path: PathLike, text: str) -> Path:
    """Writes `text` as UTF-8 to `path` atomically (see `write_file`)."""
    return write_file(path, lambda temp: temp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def replace_files(folder: PathLike) -> Iterator[Path]:
    """Stages files in a hidden folder, then renames each over its namesake in `folder`.

    Whatever the `with` body writes under the yielded folder (subfolders included) lands at the
    same relative path in `folder` once the body has finished and every staged file is on
    disk; files of `folder` that were not staged are left alone. If the body raises, nothing in
    `folder` changes. The renames run one after another, each atomic: a process killed among
    them leaves every file whole, some old and some new.

    Args:
        folder: The destination folder; created if missing.

    Yields:
        The staging folder to write into (inside `folder`, removed afterwards).

    Raises:
        FileExistsError: `folder` is an existing file.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"Cannot write into {target}: it is a file, not a folder. Fix: choose another path."
        )
    target.mkdir(parents=True, exist_ok=True)
    staging = temp_path(target / STAGING_NAME)
    staging.mkdir()
    try:
        yield staging
        staged = sorted(path for path in staging.rglob("*") if path.is_file())
        for path in staged:
            _fsync(path)
        folders = {target}
        for path in staged:
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            _put_in_place(path, destination)
            folders.add(destination.parent)
        for synced in sorted(folders):
            _fsync(synced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replace_folder(path: PathLike) -> Iterator[Path]:
    """Builds a folder under a temporary name, then renames it into place as a whole.

    An existing folder at `path` is renamed away just before and deleted after, so a process
    killed in between leaves neither (never a mix of the two). If the `with` body raises,
    `path` is untouched and the temporary folder is removed.

    Args:
        path: The folder to create or replace; its parent is created if missing.

    Yields:
        The temporary folder to fill (a sibling of `path`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(target)
    staging.mkdir()
    try:
        yield staging
        for entry in sorted(staging.rglob("*")):
            _fsync(entry)
        _fsync(staging)
        doomed = temp_path(target)
        if target.exists():
            os.replace(target, doomed)
        try:
            _put_in_place(staging, target)
        except BaseException:
            if doomed.exists():  # the rename failed: put the old folder back
                os.replace(doomed, target)
            raise
        _fsync(target.parent)
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_folder(path: PathLike) -> None:
    """Deletes a folder by renaming it to a hidden name first, so it vanishes at once."""
    target = Path(path)
    doomed = temp_path(target)
    os.replace(target, doomed)
    _fsync(target.parent)
    shutil.rmtree(doomed, ignore_errors=True)

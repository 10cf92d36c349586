"""What a data folder may contain, decided once for every command that lists images.

A data folder is a tree of regular files. Symbolic links are followed only when they resolve inside the folder
(``ROOT``) and do not lead back to a folder already listed: a link to a parent or to a sibling class folder would
list the same images again, under another label, as many times as the loop goes round. Special files (FIFOs,
sockets, devices) are never opened (reading a FIFO blocks forever). Hidden entries (``.cache``, ``.ipynb_checkpoints``)
are not data. Breaking a rule is a one-line :class:`~rapidnet.errors.DataError` naming the entry and the fix, not a
silent skip: a data set that lists differently from what its owner thinks is the bug these rules exist to catch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from rapidnet.errors import DataError, file_kind

__all__ = ["MAX_FILES", "check_member", "check_regular", "data_folder", "list_files", "walk_folder"]

#: the most files one listing returns: far above ImageNet's 1.28 M, far below what fills memory with paths
MAX_FILES = 20_000_000


def data_folder(path: str | os.PathLike[str], what: str = "data folder", fix: str = "pass a folder of images") -> Path:
    """``path`` as an existing folder, or a one-line error saying what it is instead."""
    folder = Path(path).expanduser()
    try:
        mode = folder.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{what} {folder} does not exist: {fix}") from None
    except OSError as e:
        raise DataError(f"{what} {folder} cannot be read ({e.strerror}): {fix}") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"{what} {folder} is {file_kind(mode)}, not a folder: {fix}")
    return folder


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _require_regular(path: Path, target: str | Path, missing_fix: str, kind_fix: str) -> Path:
    """``path`` if ``target`` (what it resolves to) is a regular file; else a one-line error saying what it is."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise DataError(f"{path} is missing (or a broken link): {missing_fix}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is {file_kind(mode)}, not an image file: {kind_fix}")
    return path


def check_regular(path: Path) -> Path:
    """``path`` (a file named on the command line) as a regular file: a FIFO or device would block or never end."""
    return _require_regular(path, path, "check the path", "name an image file")


def check_member(path: Path, root: Path) -> Path:
    """``path`` (a file a data set names, e.g. a COCO ``file_name``) as a regular file inside ``root``.

    Names that climb out of the folder (``../``, absolute paths, links to elsewhere) and special files are refused.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        raise DataError(f"{path} resolves to {real}, outside the data folder {root}: keep the data inside it")
    return _require_regular(path, real, "restore the file or remove its entry", "remove it from the data folder")


def walk_folder(root: Path, recursive: bool = True) -> Iterator[tuple[Path, bool]]:
    """``(path, is_folder)`` for every non-hidden entry under ``root`` (sorted by name, folders descended into when
    ``recursive``), enforcing the module's rules; ``root`` itself is not yielded."""
    real_root = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    root_stat = os.stat(root)
    seen.add((root_stat.st_dev, root_stat.st_ino))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {folder} ({e.strerror}): check its permissions") from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = os.path.realpath(path)
                if not _inside(target, real_root):
                    raise DataError(
                        f"{path} links to {target}, outside the data folder {root}: copy the files in, or point the "
                        "command at a folder that holds them"
                    )
            try:
                info = os.stat(path)  # follows links: what the entry is
            except OSError:
                raise DataError(f"{path} is a broken link: remove it or restore its target") from None
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    raise DataError(
                        f"{path} leads back to a folder already listed ({os.path.realpath(path)}): a link loop or a "
                        "second way to the same images; remove the link"
                    )
                seen.add(key)
                yield path, True
                if recursive:
                    subfolders.append(path)
            else:
                if not stat.S_ISREG(info.st_mode):
                    raise DataError(f"{path} is {file_kind(info.st_mode)}, not a file: remove it from the data folder")
                yield path, False
        stack.extend(reversed(subfolders))


def list_files(
    root: str | os.PathLike[str],
    suffixes: Iterable[str],
    *,
    recursive: bool = True,
    what: str = "data folder",
    fix: str = "pass a folder of images",
) -> list[Path]:
    """The regular files under ``root`` whose names end in one of ``suffixes`` (any case), in sorted order."""
    folder = data_folder(root, what, fix)
    wanted = tuple(s.lower() for s in suffixes)
    found: list[Path] = []
    for path, is_folder in walk_folder(folder, recursive):
        if not is_folder and path.name.lower().endswith(wanted):
            found.append(path)
            if len(found) > MAX_FILES:
                raise DataError(f"{folder} holds more than {MAX_FILES:,} image files: split the data set")
    return sorted(found)

"""An index folder on disk: writing it atomically, and checking its files against the sizes and sha256 sums
listed in ``index_config.json``.

Saving writes a temporary sibling folder and swaps it in with renames, so an interrupted save leaves a
previously saved index untouched. Loading hashes every file the first time a folder is opened here and
then trusts it while the files' stamps are unchanged (`verification`).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..constants import INDEX_CONFIG_NAME
from ..errors import IndexIntegrityError, RagInputError
from ..utils.hashing import sha256_file
from .verification import is_trusted

__all__ = ["safe_relpath", "swap_in_folder", "verify_files", "write_folder_atomically"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a fresh temporary sibling of `target`, then swaps it in with renames.

    If `write` raises (or the process dies), the temporary folder is removed (or left behind as
    a hidden ``.name.tmp-*`` sibling) and whatever was at `target` before is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise RagInputError(f"Cannot save an index to {target}: it exists and is not a folder; choose another path.")
    if target.is_dir() and any(target.iterdir()) and not (target / INDEX_CONFIG_NAME).exists():
        raise RagInputError(
            f"Cannot save an index to {target}: the folder is not empty and holds no {INDEX_CONFIG_NAME}, "
            "so it is not an index folder; choose a new or empty folder."
        )
    swap_in_folder(target, write)


def swap_in_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary sibling of `target`, whose files are synced and which then replaces
    `target` by renames: a crash leaves the old folder or the new one, never a mix (no checks of `target`)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    old = target.parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def safe_relpath(folder: Path, rel: Any) -> Path:
    """Resolves a path from a config, refusing anything that leaves `folder`."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise IndexIntegrityError(f"{INDEX_CONFIG_NAME} in {folder} lists an invalid file path {rel!r}.")
    # A lexical check: the Hub cache stores files as symlinks into its blob store, so resolving
    # links would wrongly put every downloaded file "outside" the folder.
    parts = posixpath.normpath(rel).split("/")
    if parts[0] in ("..", "") or ".." in parts:
        raise IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} in {folder} lists {rel!r}, which points outside the index folder; "
            "refusing to read it. Rebuild the index."
        )
    return folder / posixpath.normpath(rel)


def list_files(tmp: Path) -> dict[str, dict[str, Any]]:
    """The sha256 and size of every file in a freshly written folder but its config, as ``files`` records them."""
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name != INDEX_CONFIG_NAME:
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def verify_files(folder: Path, cfg: dict[str, Any], verify: bool | None) -> bool:
    """Checks the files `cfg` lists: sizes always, sha256 unless trusted (see `PassageIndex.verify_files`).

    Returns whether the files were hashed.
    """
    files = cfg["files"]
    for rel, meta in files.items():
        path = safe_relpath(folder, rel)
        if not path.is_file():
            raise IndexIntegrityError(
                f"{rel} is missing from the index folder {folder}; rebuild or re-download the index."
            )
        size = path.stat().st_size
        if size != meta["size"]:
            raise IndexIntegrityError(
                f"{rel} in {folder} has {size} bytes but {meta['size']} were saved (truncated or modified); "
                "rebuild or re-download the index."
            )
    if verify is False or (verify is None and is_trusted(folder, list(files))):
        return False
    for rel, meta in files.items():
        if sha256_file(safe_relpath(folder, rel)) != meta["sha256"]:
            raise IndexIntegrityError(
                f"{rel} in {folder} fails its sha256 checksum (corrupted or modified); rebuild or re-download the index."
            )
    return True

"""Checking an index folder against the sha256 sums of its ``index_config.json``, once.

Hashing every file at every start costs a full read (minutes for a Wikipedia-sized corpus). A folder
is therefore hashed in full the first time it is opened here; a *stamp* then records, for each file,
its size, modification time, status-change time and inode. While every stamp is unchanged the folder
is trusted without reading it. Writing a file changes its ctime (which no program can set back), so
any modification, even one that restores the mtime, is hashed again.

Stamps live outside the folder, under ``<MODELING_RAG_HOME>/verified/``, keyed by the folder's
absolute path and the sha256 of its config: a folder copied from elsewhere, or a stamp shipped inside
one, is never trusted. Files downloaded from the Hub are checked when downloaded (`hub_utils`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..assets import home_dir
from ..utils.atomic import atomic_write_text
from ..utils.hashing import sha256_file

logger = logging.getLogger(__name__)

__all__ = ["file_stamp", "folder_stamp", "is_trusted", "remember_verified", "sha256_file"]

VERIFIED_DIR = "verified"


def file_stamp(path: Path) -> list[int]:
    """Size, mtime, ctime (ns) and inode of `path` (following links, as the Hub cache uses them)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp_path(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.absolute()).encode("utf-8")).hexdigest()
    return home_dir() / VERIFIED_DIR / f"{key}.json"


def folder_stamp(folder: Path, rels: list[str]) -> dict:
    """The stamp of `folder`: the config's sha256 and each listed file's `file_stamp`."""
    from ..constants import INDEX_CONFIG_NAME

    return {
        "folder": str(folder.absolute()),
        "config_sha256": sha256_file(folder / INDEX_CONFIG_NAME),
        "files": {rel: file_stamp(folder / rel) for rel in sorted(rels)},
    }


def is_trusted(folder: Path, rels: list[str]) -> bool:
    """Whether `folder` was fully verified here and none of its files changed since."""
    path = _stamp_path(folder)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved == folder_stamp(folder, rels)
    except (OSError, ValueError):
        return False


def remember_verified(folder: Path, rels: list[str]) -> None:
    """Records that `folder` passed a full verification (best effort: an unwritable home only costs time)."""
    path = _stamp_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(folder_stamp(folder, rels)))
    except OSError as exc:
        logger.debug("Could not record the verification of %s (%s); it will be hashed again next time.", folder, exc)

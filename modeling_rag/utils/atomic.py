"""Crash-safe writes: files through a temp file and a rename, folders through a journaled swap.

Every atomic file write of the package and its scripts goes through [`atomic_open`] (or its two
shorthands [`atomic_write_bytes`] / [`atomic_write_text`]).

`commit_staged_folder` moves a fully written staging folder's entries into a target folder. It
first records a journal; each existing entry is moved to a backup before the new one takes its
place. A process killed at any point leaves a journal behind, and `recover_interrupted_commit`
(called by loaders) puts the previous entries back, so a reader sees the old artifact or the new
one, never a mix. Files in the target that the commit does not touch are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".modeling_rag_incomplete"
STAGING_PREFIX = ".staging-"
BACKUP_PREFIX = ".backup-"
# mkstemp creates files readable by their owner only; a saved model is meant to be shared, so written
# files get the mode a plain open() would give them (read once, at import, while no thread writes)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file to write `path` through: a temp file beside it, fsynced and renamed over `path` when the
    block ends without an error (removed otherwise), so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temp file beside `path`, fsyncs it, then renames it over `path`."""
    with atomic_open(path, binary=True) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8 (newlines written as given)."""
    with atomic_open(path) as f:
        f.write(text)


def new_staging_folder(target: str | os.PathLike) -> Path:
    """A fresh staging folder inside `target` (same filesystem, so renames are atomic)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit_staged_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Installs every entry of `staging` into `target`, all or nothing (see the module docstring)."""
    staging, target = Path(staging), Path(target)
    recover_interrupted_commit(target, keep=(staging.name,))
    entries = sorted(p.name for p in staging.iterdir())
    backup = target / f"{BACKUP_PREFIX}{uuid.uuid4().hex[:8]}"
    journal = {
        "staging": staging.name,
        "backup": backup.name,
        "entries": entries,
        "previously_missing": [name for name in entries if not (target / name).exists()],
    }
    atomic_write_text(target / JOURNAL_NAME, json.dumps(journal))
    backup.mkdir()
    for name in entries:
        if (target / name).exists() or (target / name).is_symlink():
            os.replace(target / name, backup / name)
        os.replace(staging / name, target / name)
    (target / JOURNAL_NAME).unlink()
    shutil.rmtree(backup, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted_commit(target: str | os.PathLike, keep: tuple[str, ...] = ()) -> bool:
    """Rolls back a commit that a killed process left half-done; returns whether there was one.

    Also removes leftover staging and backup folders of earlier, finished or abandoned saves.
    """
    target = Path(target)
    journal_path = target / JOURNAL_NAME
    recovered = False
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text())
            entries = list(journal["entries"])
            backup = target / journal["backup"]
            missing = set(journal.get("previously_missing", []))
        except (ValueError, KeyError, TypeError) as err:
            from .errors import IndexIntegrityError

            raise IndexIntegrityError(
                f"{target} holds an interrupted save whose journal is unreadable ({err}); save the model again."
            ) from None
        for name in entries:
            if Path(name).name != name:  # the journal names direct children only
                continue
            if (backup / name).exists() or (backup / name).is_symlink():
                _remove(target / name)
                os.replace(backup / name, target / name)
            elif name in missing:
                _remove(target / name)
        journal_path.unlink()
        recovered = True
        logger.warning("%s held an interrupted save; the previous files were restored.", target)
    if target.is_dir():
        for leftover in target.iterdir():
            if leftover.name in keep:
                continue
            if leftover.is_dir() and leftover.name.startswith((STAGING_PREFIX, BACKUP_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)
    return recovered

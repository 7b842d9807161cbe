"""``index_config.json``: what it holds, how it is written with the file checksums, and how it is read and
validated before any other file of an index folder is touched.

The config records the format version, dim, metric, kind (+ params), count, encoder name and
fingerprint, chunking, the next row id, deleted row ids (hnsw), how exact vectors are kept, the FAISS
version, and the sha256 + size of every other file. Keys it does not know (e.g. the retriever's
settings) are kept and written back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss

from ..constants import (
    EMBEDDINGS_NAME,
    EXACT_VECTORS_NAME,
    FAISS_INDEX_NAME,
    INDEX_CONFIG_NAME,
    INDEX_FORMAT_VERSION,
    LEGACY_PASSAGES_NAME,
    PASSAGES_NAME,
)
from ..errors import IndexIntegrityError, RagConfigError
from .folder import list_files, safe_relpath
from .kinds import KIND_PARAM_NAMES, KINDS, METRICS

logger = logging.getLogger(__name__)

__all__ = ["EXACT_VECTOR_DTYPES", "config_dict", "read_config", "validate_config", "write_config"]

EXACT_VECTOR_DTYPES = ("float16",)

KNOWN_CONFIG_KEYS = {
    "format_version",
    "dim",
    "metric",
    "kind",
    "kind_params",
    "count",
    "normalized",
    "encoder_name",
    "encoder_fingerprint",
    "chunking",
    "next_row_id",
    "deleted_row_ids",
    "exact_vectors",
    "faiss_version",
    "files",
}


def check_exact_vectors(exact_vectors: str | None, kind: str) -> str | None:
    """How `kind` keeps exact vectors apart from FAISS: the dtype for ivf_pq, None for the others."""
    if kind != "ivf_pq":
        return None  # the FAISS index holds them at full precision
    if exact_vectors is not None and exact_vectors not in EXACT_VECTOR_DTYPES:
        raise RagConfigError(f"exact_vectors must be None or one of {EXACT_VECTOR_DTYPES}, got {exact_vectors!r}.")
    return exact_vectors


def config_dict(
    *,
    dim: int,
    metric: str,
    kind: str,
    kind_params: dict[str, int],
    count: int,
    normalized: bool,
    encoder_name: str | None,
    encoder_fingerprint: str | None,
    chunking: dict | None,
    next_row_id: int,
    deleted: Iterable[int],
    exact_vectors: str | None,
) -> dict[str, Any]:
    """The config of an index (without ``files``, which `write_config` adds)."""
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "dim": int(dim),
        "metric": metric,
        "kind": kind,
        "kind_params": dict(kind_params),
        "count": int(count),
        "normalized": bool(normalized),
        "encoder_name": encoder_name,
        "encoder_fingerprint": encoder_fingerprint,
        "chunking": chunking,
        "next_row_id": int(next_row_id),
        "deleted_row_ids": [int(i) for i in deleted],
        "exact_vectors": exact_vectors,
        "faiss_version": faiss.__version__,
    }


def write_config(tmp: Path, cfg: dict[str, Any]) -> None:
    """Writes ``index_config.json`` with the sha256 and size of every other file in `tmp`."""
    cfg = dict(cfg)
    cfg["files"] = list_files(tmp)
    with open(tmp / INDEX_CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``index_config.json`` of an index folder (no other file is read)."""
    folder = Path(folder)
    if not folder.is_dir() and folder.parent.is_dir():
        # a save killed between its two renames leaves the previous index as a hidden backup
        backups = sorted(folder.parent.glob(f".{folder.name}.old-*"))
        if len(backups) == 1 and (backups[0] / INDEX_CONFIG_NAME).is_file():
            logger.warning("Restoring the index at %s from %s (a save was interrupted).", folder, backups[0])
            os.rename(backups[0], folder)
    if not folder.is_dir():
        raise IndexIntegrityError(f"No index folder at {folder}.")
    path = folder / INDEX_CONFIG_NAME
    if not path.is_file():
        raise IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} is missing from {folder}; it is not an index folder or the save did not finish. "
            "Rebuild the index with scripts/build_index.py."
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} in {folder} is not valid JSON ({exc}); rebuild the index."
        ) from exc
    validate_config(cfg, folder)
    return cfg


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: Any, folder: Path) -> None:
    """Raises `IndexIntegrityError` saying which entry of a read config is wrong."""

    def bad(msg: str) -> IndexIntegrityError:
        return IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} in {folder}: {msg}. Rebuild the index with scripts/build_index.py."
        )

    if not isinstance(cfg, dict):
        raise bad("the top level must be a JSON object")
    version = cfg.get("format_version")
    if not _is_int(version):
        raise bad("format_version is missing or not an integer")
    if version > INDEX_FORMAT_VERSION:
        raise IndexIntegrityError(
            f"The index at {folder} has format version {version}, newer than this modeling_rag supports "
            f"({INDEX_FORMAT_VERSION}); upgrade modeling_rag."
        )
    problem = _settings_problem(cfg) or _files_problem(cfg, folder)
    if problem:
        raise bad(problem)


def _settings_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with the index settings of `cfg`, or None."""
    for key in ("dim", "count", "next_row_id"):
        if not _is_int(cfg.get(key)) or cfg[key] < (1 if key == "dim" else 0):
            return f"{key} must be a {'positive' if key == 'dim' else 'non-negative'} integer, got {cfg.get(key)!r}"
    if cfg.get("metric") not in METRICS:
        return f"metric must be one of {METRICS}, got {cfg.get('metric')!r}"
    if cfg.get("kind") not in KINDS:
        return f"kind must be one of {KINDS}, got {cfg.get('kind')!r}"
    params = cfg.get("kind_params")
    if not isinstance(params, dict) or set(params) != set(KIND_PARAM_NAMES[cfg["kind"]]):
        return f"kind_params must hold exactly {list(KIND_PARAM_NAMES[cfg['kind']])}"
    if not all(_is_int(v) and v > 0 for v in params.values()):
        return "kind_params values must be positive integers"
    if not isinstance(cfg.get("normalized"), bool):
        return "normalized must be true or false"
    for key in ("encoder_name", "encoder_fingerprint"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return f"{key} must be a string or null"
    if cfg.get("chunking") is not None and not isinstance(cfg["chunking"], dict):
        return "chunking must be an object or null"
    deleted = cfg.get("deleted_row_ids", [])
    if not isinstance(deleted, list) or not all(_is_int(v) and v >= 0 for v in deleted):
        return "deleted_row_ids must be a list of non-negative integers"
    return None


def _files_problem(cfg: dict[str, Any], folder: Path) -> str | None:
    """What is wrong with the ``files`` entry of `cfg` (and ``exact_vectors``), or None."""
    files = cfg.get("files")
    if not isinstance(files, dict):
        return "files must be an object mapping file names to sha256 and size"
    if cfg["format_version"] >= 2:
        if cfg.get("exact_vectors") not in (None, *EXACT_VECTOR_DTYPES):
            return f"exact_vectors must be null or one of {EXACT_VECTOR_DTYPES}"
        required = [FAISS_INDEX_NAME, PASSAGES_NAME] + ([EXACT_VECTORS_NAME] if cfg.get("exact_vectors") else [])
    else:
        required = [FAISS_INDEX_NAME, LEGACY_PASSAGES_NAME, EMBEDDINGS_NAME]
    for name in required:
        if name not in files:
            return f"files does not list {name}"
    for rel, meta in files.items():
        safe_relpath(folder, rel)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("sha256"), str)
            or len(meta["sha256"]) != 64
            or not _is_int(meta.get("size"))
            or meta["size"] < 0
        ):
            return f"the entry for {rel!r} in files must hold a sha256 hex digest and a size"
    return None

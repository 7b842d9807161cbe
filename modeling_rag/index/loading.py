"""Opening a saved index folder: checking it fits the encoder, reading each file, and checking the files agree.

`open_index_folder` returns the keyword arguments of `PassageIndex(...)`; `PassageIndex.load` is its
public face. Format 1 folders (``passages.jsonl`` + ``embeddings.npy``) are still read, with a warning
that gives the command converting them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from ..constants import (
    EMBEDDINGS_NAME,
    EXACT_VECTORS_NAME,
    FAISS_INDEX_NAME,
    INDEX_CONFIG_NAME,
    LEGACY_PASSAGES_NAME,
    PASSAGES_NAME,
)
from ..errors import IndexIntegrityError, IndexMismatchError
from .config import KNOWN_CONFIG_KEYS, read_config
from .folder import verify_files
from .kinds import IVF_KINDS, needs_direct_map, stored_ids
from .npy_files import map_npy
from .passage_store import PASSAGE_FIELDS, clean_passage, open_passage_store, passages_to_table, row_ids_of
from .verification import remember_verified

logger = logging.getLogger(__name__)

__all__ = ["CONVERT_COMMAND", "open_index_folder"]

CONVERT_COMMAND = "python scripts/verify_index.py {folder} --convert"


def open_index_folder(
    folder: Path,
    *,
    mmap: bool,
    verify: bool | None,
    expected_dim: int | None,
    expected_fingerprint: str | None,
) -> dict[str, Any]:
    """Reads and checks the folder (see `PassageIndex.load`); returns the `PassageIndex` constructor's arguments."""
    cfg = read_config(folder)
    check_encoder(cfg, folder, expected_dim, expected_fingerprint)
    hashed = verify_files(folder, cfg, verify)
    legacy = cfg["format_version"] < 2
    if legacy:
        logger.warning(
            "The index at %s is in the old format %d (passages.jsonl + embeddings.npy): it is parsed whole into "
            "memory at every load. Convert it once with `%s`.",
            folder,
            cfg["format_version"],
            CONVERT_COMMAND.format(folder=folder),
        )
    index, mmap_index = read_faiss(folder, cfg["kind"], mmap and not legacy)
    if index.d != cfg["dim"]:
        raise IndexIntegrityError(f"{FAISS_INDEX_NAME} in {folder} has dimension {index.d}, config says {cfg['dim']}.")
    deleted = np.asarray(cfg.get("deleted_row_ids", []), dtype=np.int64)
    if index.ntotal - len(deleted) != cfg["count"]:
        raise IndexIntegrityError(
            f"{FAISS_INDEX_NAME} in {folder} holds {index.ntotal - len(deleted)} live vectors but the config says "
            f"{cfg['count']}; rebuild the index."
        )
    table = _read_passage_table(folder, cfg, legacy, full_check=hashed)
    row_ids = row_ids_of(table)
    # the row ids FAISS holds against the store's: checked when the files were hashed (or not checked
    # at all); a folder trusted by its stamps is byte for byte one that passed (0.3 s per 1M rows saved)
    _check_row_ids(folder, cfg, index, row_ids, deleted, trusted=not hashed and verify is not False)
    if needs_direct_map(index):
        # format 1 IVF indexes have none; building it reads only the ids of the inverted lists
        faiss.downcast_index(index).set_direct_map_type(faiss.DirectMap.Hashtable)
    exact = _read_exact_vectors(folder, cfg, legacy, mmap)
    if hashed:
        remember_verified(folder, list(cfg["files"]))
    return {
        "faiss_index": index,
        "passages": table,
        "row_ids": row_ids,
        "exact_vectors": exact,
        "metric": cfg["metric"],
        "kind": cfg["kind"],
        "kind_params": cfg["kind_params"],
        "next_row_id": cfg["next_row_id"],
        "normalized": cfg["normalized"],
        "encoder_name": cfg.get("encoder_name"),
        "encoder_fingerprint": cfg.get("encoder_fingerprint"),
        "chunking": cfg.get("chunking"),
        "deleted_row_ids": deleted,
        "extra_config": {k: v for k, v in cfg.items() if k not in KNOWN_CONFIG_KEYS},
        "mmapped": mmap_index or (mmap and exact is not None and not legacy),
    }


def check_encoder(
    cfg: dict[str, Any], folder: Path, expected_dim: int | None, expected_fingerprint: str | None
) -> None:
    """Raises `IndexMismatchError` when the question encoder's size or fingerprint is not the index's."""
    if expected_dim is not None and int(expected_dim) != cfg["dim"]:
        raise IndexMismatchError(
            f"The index at {folder} holds vectors of dimension {cfg['dim']} but the encoder produces dimension "
            f"{expected_dim}; rebuild the index with this encoder (scripts/build_index.py) or use the encoder it "
            f"was built with ({cfg.get('encoder_name') or 'unknown'})."
        )
    fp = cfg.get("encoder_fingerprint")
    if expected_fingerprint is None:
        return
    if fp is None:
        logger.warning("The index at %s records no encoder fingerprint; cannot check it matches the encoder.", folder)
    elif fp != expected_fingerprint:
        raise IndexMismatchError(
            f"The index at {folder} was built with a different encoder (fingerprint {fp[:12]}…, "
            f"name {cfg.get('encoder_name')!r}) than the one given (fingerprint {expected_fingerprint[:12]}…); "
            "rebuild the index with this encoder (scripts/build_index.py), or load the encoder it was built with."
        )


def read_faiss(folder: Path, kind: str, mmap: bool) -> tuple[faiss.Index, bool]:
    """Reads ``index.faiss``; maps it when `mmap` and the kind is IVF (FAISS maps only inverted lists)."""
    path = str(folder / FAISS_INDEX_NAME)
    use_mmap = mmap and kind in IVF_KINDS
    try:
        if use_mmap:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
        return faiss.read_index(path), False
    except RuntimeError as exc:
        raise IndexIntegrityError(f"{FAISS_INDEX_NAME} in {folder} cannot be read by FAISS: {exc}") from exc


def _read_passage_table(folder: Path, cfg: dict[str, Any], legacy: bool, *, full_check: bool) -> pa.Table:
    """The passage store (mapped), or for format 1 the JSON lines as a table; its row ids checked for order."""
    store_name = LEGACY_PASSAGES_NAME if legacy else PASSAGES_NAME
    if legacy:
        passages = _read_legacy_passages(folder / LEGACY_PASSAGES_NAME)
        found = len(passages)
        table = passages_to_table(
            [clean_passage(p, i) for i, p in enumerate(passages)], [p["row_id"] for p in passages]
        )
    else:
        table = open_passage_store(folder / PASSAGES_NAME, full_check=full_check)
        found = table.num_rows
    if found != cfg["count"]:
        raise IndexIntegrityError(
            f"{store_name} in {folder} holds {found} passages but the index holds {cfg['count']} vectors; "
            "the folder is inconsistent, rebuild the index."
        )
    row_ids = row_ids_of(table)
    if len(row_ids) > 1 and not np.all(np.diff(row_ids) > 0):
        raise IndexIntegrityError(f"{store_name} in {folder} has row ids out of order or repeated; rebuild the index.")
    return table


def _check_row_ids(
    folder: Path, cfg: dict[str, Any], index: faiss.Index, row_ids: np.ndarray, deleted: np.ndarray, *, trusted: bool
) -> None:
    """Checks that FAISS holds exactly the store's row ids (unless `trusted`) and that next_row_id is above them."""
    store_name = LEGACY_PASSAGES_NAME if cfg["format_version"] < 2 else PASSAGES_NAME
    if not trusted:
        id_map = stored_ids(index, cfg["kind"])
        if id_map is None:
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} in {folder} is not a {cfg['kind']} index with row ids; rebuild it."
            )
        live = id_map if not len(deleted) else np.setdiff1d(id_map, deleted, assume_unique=True)
        if not np.array_equal(live, row_ids):
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} and {store_name} in {folder} hold different row ids; rebuild."
            )
    if len(row_ids) and row_ids[-1] >= cfg["next_row_id"]:
        raise IndexIntegrityError(f"{INDEX_CONFIG_NAME} in {folder} has next_row_id below an existing row id.")


def _read_exact_vectors(folder: Path, cfg: dict[str, Any], legacy: bool, mmap: bool) -> np.ndarray | None:
    """The float16 exact vectors kept apart from FAISS (ivf_pq), or None."""
    if legacy:
        vectors = _load_npy(folder, EMBEDDINGS_NAME, np.float32, (cfg["count"], cfg["dim"]), mmap)
        return vectors.astype(np.float16) if cfg["kind"] == "ivf_pq" else None
    if cfg.get("exact_vectors") == "float16":
        return _load_npy(folder, EXACT_VECTORS_NAME, np.float16, (cfg["count"], cfg["dim"]), mmap)
    return None


def _load_npy(folder: Path, name: str, dtype: Any, shape: tuple[int, int], mmap: bool) -> np.ndarray:
    try:
        arr = map_npy(folder / name) if mmap else np.load(folder / name, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexIntegrityError(f"{name} in {folder} cannot be read: {exc}") from exc
    if arr.dtype != dtype or arr.shape != shape:
        raise IndexIntegrityError(
            f"{name} in {folder} has shape {arr.shape} / dtype {arr.dtype}, expected {shape} {np.dtype(dtype)}; "
            "rebuild the index."
        )
    return arr


def _read_legacy_passages(path: Path) -> list[dict[str, Any]]:
    """The passages of a format 1 ``passages.jsonl``, each checked for a row id and the passage fields."""
    passages = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    passages.append(_legacy_passage(path, line_no, line))
    except UnicodeDecodeError as exc:
        raise IndexIntegrityError(f"{path.name} is not valid UTF-8 ({exc}); rebuild the index.") from exc
    return passages


def _legacy_passage(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        p = json.loads(line)
    except json.JSONDecodeError as exc:
        raise IndexIntegrityError(f"{path.name} line {line_no} is not valid JSON ({exc}); rebuild the index.") from exc
    if not isinstance(p, dict) or isinstance(p.get("row_id"), bool) or not isinstance(p.get("row_id"), int):
        raise IndexIntegrityError(f"{path.name} line {line_no} has no integer row_id; rebuild the index.")
    for field in PASSAGE_FIELDS:
        if field not in p:
            raise IndexIntegrityError(f"{path.name} line {line_no} lacks the field {field!r}; rebuild the index.")
    return p

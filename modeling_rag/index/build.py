"""Building an index from passage vectors: in memory (`build_in_memory`) or batch by batch straight into a
folder (`build_streaming_into`), training the IVF kinds on a sample first.

`PassageIndex.build` and `PassageIndex.build_streaming` are their public faces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..constants import EXACT_VECTORS_NAME, FAISS_INDEX_NAME, PASSAGES_NAME
from ..errors import IndexMismatchError, RagConfigError, RagInputError
from .arrays import as_matrix, embeddings_normalized
from .config import check_exact_vectors, config_dict, write_config
from .folder import write_folder_atomically
from .kinds import ADD_BATCH, IVF_KINDS, METRICS, default_kind_params, make_faiss_index, resolve_kind, train_size
from .npy_files import NpyAppender
from .passage_store import PassageStoreWriter, clean_passage, passages_to_table

logger = logging.getLogger(__name__)

__all__ = ["build_in_memory", "build_streaming_into"]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise RagConfigError(f"metric must be one of {METRICS}, got {metric!r}.")


def build_in_memory(
    embeddings: Any,
    passages: Sequence[dict[str, Any]],
    *,
    metric: str,
    kind: str,
    normalized: bool | None,
    exact_vectors: str | None,
    memory_budget_bytes: int | None,
    show_progress: bool,
    kind_params: dict[str, Any],
) -> dict[str, Any]:
    """Builds the FAISS index and the passage table; returns the `PassageIndex` constructor's arguments
    (but the encoder and chunking records, which the caller adds)."""
    _check_metric(metric)
    emb = as_matrix(embeddings, "embeddings")
    if not isinstance(passages, Sequence) or isinstance(passages, (str, bytes)):
        raise RagInputError("passages must be a list of dicts.")
    if len(passages) == 0 or len(emb) == 0:
        raise RagInputError("Cannot build an index over zero passages; check that the corpus is not empty.")
    if len(passages) != len(emb):
        raise RagInputError(f"Got {len(emb)} embeddings but {len(passages)} passages; they must match one to one.")
    clean = [clean_passage(p, i) for i, p in enumerate(passages)]
    n, dim = emb.shape
    resolved = resolve_kind(kind, n, dim, memory_budget_bytes)
    exact_dtype = check_exact_vectors(exact_vectors, resolved)
    params = default_kind_params(resolved, n, dim, **kind_params)
    index = make_faiss_index(resolved, dim, metric, params)
    if resolved in IVF_KINDS:
        n_train = train_size(resolved, n, params)
        sample = emb if n_train >= n else emb[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))]
        if show_progress:
            logger.info("Training %s on %d vectors", resolved, len(sample))
        index.train(sample)
    row_ids = np.arange(n, dtype=np.int64)
    for start in tqdm(range(0, n, ADD_BATCH), desc="Indexing", unit="batch", disable=not show_progress):
        index.add_with_ids(emb[start : start + ADD_BATCH], row_ids[start : start + ADD_BATCH])
    return {
        "faiss_index": index,
        "passages": passages_to_table(clean, row_ids),
        "exact_vectors": emb.astype(np.float16) if exact_dtype else None,
        "metric": metric,
        "kind": resolved,
        "kind_params": params,
        "next_row_id": n,
        "normalized": embeddings_normalized(emb) if normalized is None else bool(normalized),
    }


def build_streaming_into(
    folder: str | os.PathLike,
    batches: Iterable[tuple[Any, Sequence[dict[str, Any]]]],
    *,
    total: int,
    dim: int,
    metric: str,
    kind: str,
    encoder_name: str | None,
    encoder_fingerprint: str | None,
    chunking: dict | None,
    normalized: bool,
    exact_vectors: str | None,
    memory_budget_bytes: int | None,
    show_progress: bool,
    kind_params: dict[str, Any],
) -> None:
    """Writes an index folder over `total` passages given as `(embeddings, passages)` batches, atomically."""
    _check_metric(metric)
    if total <= 0:
        raise RagInputError("Cannot build an index over zero passages; check that the corpus is not empty.")
    resolved = resolve_kind(kind, total, dim, memory_budget_bytes)
    exact_dtype = check_exact_vectors(exact_vectors, resolved)
    params = default_kind_params(resolved, total, dim, **kind_params)
    n_train = train_size(resolved, total, params) if resolved in IVF_KINDS else 0
    index = make_faiss_index(resolved, dim, metric, params)

    def write(tmp: Path) -> None:
        # written in order with plain writes (a writable memmap would keep every page resident)
        exact = NpyAppender(tmp / EXACT_VECTORS_NAME, np.float16, (total, dim)) if exact_dtype else None
        try:
            with PassageStoreWriter(tmp / PASSAGES_NAME) as store:
                count = _add_batches(
                    index, store, exact, batches, total=total, dim=dim, n_train=n_train, show=show_progress
                )
        finally:
            if exact is not None:
                exact.close()
        if count != total:
            raise RagInputError(f"The batches held {count} passages, not total={total}.")
        faiss.write_index(index, str(tmp / FAISS_INDEX_NAME))
        cfg = config_dict(
            dim=dim,
            metric=metric,
            kind=resolved,
            kind_params=params,
            count=total,
            normalized=normalized,
            encoder_name=encoder_name,
            encoder_fingerprint=encoder_fingerprint,
            chunking=chunking,
            next_row_id=total,
            deleted=[],
            exact_vectors=exact_dtype,
        )
        write_config(tmp, cfg)

    write_folder_atomically(folder, write)


def _add_batches(
    index: faiss.Index,
    store: PassageStoreWriter,
    exact: NpyAppender | None,
    batches: Iterable[tuple[Any, Sequence[dict[str, Any]]]],
    *,
    total: int,
    dim: int,
    n_train: int,
    show: bool,
) -> int:
    """Puts every batch into the store, the exact vectors and FAISS (training it once `n_train` vectors
    have come); returns how many passages the batches held."""
    count = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    bar = tqdm(total=total, desc="Indexing", unit="passage", disable=not show)
    for emb, passages in batches:
        emb = as_matrix(emb, "embeddings")
        if len(emb) != len(passages):
            raise RagInputError(f"A batch has {len(emb)} embeddings but {len(passages)} passages; they must match.")
        if emb.shape[1] != dim:
            raise IndexMismatchError(f"A batch has vectors of dimension {emb.shape[1]}, expected {dim}.")
        if count + len(emb) > total:
            raise RagInputError(f"The batches hold more than total={total} passages.")
        ids = np.arange(count, count + len(emb), dtype=np.int64)
        store.write([clean_passage(p, count + i) for i, p in enumerate(passages)], ids)
        if exact is not None:
            exact.append(emb)
        if not index.is_trained:
            pending.append((emb, ids))
            if sum(len(e) for e, _ in pending) >= n_train:
                _train_and_flush(index, pending, n_train)
        else:
            index.add_with_ids(emb, ids)
        count += len(emb)
        bar.update(len(emb))
    bar.close()
    if pending:
        _train_and_flush(index, pending, n_train)
    return count


def _train_and_flush(index: faiss.Index, pending: list[tuple[np.ndarray, np.ndarray]], n_train: int) -> None:
    """Trains `index` on the first `n_train` pending vectors, then adds every pending batch."""
    vectors = np.concatenate([e for e, _ in pending])
    index.train(vectors[:n_train] if n_train else vectors)
    for emb, ids in pending:
        index.add_with_ids(emb, ids)
    pending.clear()

"""The pieces of a search that are not FAISS's own: per-kind search parameters with removed rows masked,
exact re-scoring of candidates, and the exact fallback that completes rows FAISS leaves short.

Scores are always "larger is better": the inner product for ``metric="ip"``, the negative squared L2
distance for ``metric="l2"`` (`utils.similarity`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from ..utils.similarity import pairwise_scores
from .kinds import ADD_BATCH, IVF_KINDS

__all__ = ["exact_scores", "exact_top_k", "search_params"]


def exact_scores(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """Scores of `queries` [B, d] against `vectors` [..., d] broadcast per query ([B, K, d] or [N, d])."""
    if vectors.ndim == 2:
        return pairwise_scores(queries, vectors, metric)
    ip = np.einsum("bd,bkd->bk", queries, vectors)
    if metric == "ip":
        return ip
    return -(np.sum(queries**2, axis=1)[:, None] - 2 * ip + np.sum(vectors**2, axis=2))


def search_params(
    kind: str, kind_params: dict[str, int], deleted: np.ndarray, k: int
) -> tuple[faiss.SearchParameters | None, Any]:
    """The FAISS search parameters for `kind` fetching `k`, excluding the `deleted` row ids.

    Returns `(params, keep_alive)`: FAISS does not own the id selector, so the caller holds on to
    `keep_alive` for as long as `params` is used.
    """
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(kind_params["ef_search"], k)
    elif kind in IVF_KINDS:
        params = faiss.SearchParametersIVF()
        params.nprobe = kind_params["nprobe"]
    else:
        params = faiss.SearchParameters() if len(deleted) else None
    keep_alive = None
    if len(deleted) and params is not None:
        batch = faiss.IDSelectorBatch(deleted)
        selector = faiss.IDSelectorNot(batch)
        params.sel = selector
        keep_alive = (batch, selector)
    return params, keep_alive


def exact_top_k(
    queries: np.ndarray,
    row_ids: np.ndarray,
    get_embeddings: Callable[[np.ndarray], np.ndarray],
    metric: str,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-`k` of every query over all `row_ids`, reading their vectors a block at a time."""
    s = np.full((len(queries), len(row_ids)), -np.inf, dtype=np.float32)
    for start in range(0, len(row_ids), ADD_BATCH):
        block = get_embeddings(row_ids[start : start + ADD_BATCH])
        s[:, start : start + len(block)] = exact_scores(queries, block, metric)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for b in range(len(queries)):
        top = np.argpartition(-s[b], k - 1)[:k] if k < s.shape[1] else np.arange(s.shape[1])
        top = top[np.argsort(-s[b, top], kind="stable")]
        scores[b], ids[b] = s[b, top], row_ids[top]
    return scores, ids


def refine_with_exact(
    queries: np.ndarray, labels: np.ndarray, vectors: np.ndarray, metric: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranks FAISS' candidate `labels` [B, K] (−1: none) by exact scores on their `vectors` [B, K, d]; top `k`."""
    valid = labels >= 0
    exact = exact_scores(queries, vectors, metric).astype(np.float32)
    exact[~valid] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    ids = np.take_along_axis(labels, order, axis=1)
    ids[~np.isfinite(scores)] = -1
    return scores, ids

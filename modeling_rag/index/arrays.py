"""Turning what callers pass (lists, NumPy arrays, torch tensors) into the arrays FAISS takes, with clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import IndexMismatchError, RagInputError

__all__ = ["as_matrix", "as_queries", "as_row_ids", "embeddings_normalized"]


def as_matrix(x: Any, name: str) -> np.ndarray:
    """`x` as a contiguous float32 `[n, dim]` matrix of finite values (a 1-D vector is one row)."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu").float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RagInputError(f"{name} must be a float array of shape [n, dim]: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RagInputError(f"{name} must have shape [n, dim], got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise RagInputError(f"{name} contain NaN or infinite values; check the encoder output.")
    return np.ascontiguousarray(arr)


def as_queries(queries: Any, dim: int) -> np.ndarray:
    """Query vectors as a contiguous float32 `[batch, dim]` matrix; a wrong size raises `IndexMismatchError`."""
    if hasattr(queries, "detach"):
        queries = queries.detach().to("cpu").float().numpy()
    arr = np.asarray(queries, dtype=np.float32) if not isinstance(queries, np.ndarray) else queries
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RagInputError(f"queries must have shape [batch, dim], got shape {arr.shape}.")
    if arr.shape[1] != dim:
        raise IndexMismatchError(
            f"Query vectors have dimension {arr.shape[1]} but the index holds vectors of dimension {dim}; "
            "use the question encoder that matches the index, or rebuild the index with this encoder."
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise RagInputError("queries contain NaN or infinite values; check the question encoder output.")
    return arr


def as_row_ids(row_ids: Any) -> np.ndarray:
    """`row_ids` (any shape) as int64; anything but integers raises `RagInputError`."""
    try:
        arr = np.asarray(row_ids)
    except (TypeError, ValueError) as exc:
        raise RagInputError(f"row_ids must be integers: {exc}") from exc
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise RagInputError(f"row_ids must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def embeddings_normalized(emb: np.ndarray) -> bool:
    """Whether the vectors have unit L2 norm (judged on the first 10,000)."""
    if len(emb) == 0:
        return False
    sample = emb[: min(len(emb), 10_000)]
    norms = np.linalg.norm(sample, axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))

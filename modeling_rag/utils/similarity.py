"""The similarity of question and passage vectors, for both index metrics, in one place.

`"ip"`: the inner product (cosine for normalised vectors). `"l2"`: the negative squared Euclidean
distance, `-(|q|^2 - 2 q.p + |p|^2)`, so that for both metrics a higher score is a better passage.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["METRICS", "pairwise_scores", "per_question_scores"]

METRICS = ("ip", "l2")


def pairwise_scores(queries: np.ndarray, vectors: np.ndarray, metric: str = "ip") -> np.ndarray:
    """Scores `[B, N]` of every query `[B, d]` against every vector `[N, d]` (NumPy)."""
    scores = queries @ vectors.T
    if metric == "l2":
        scores = -(np.sum(queries**2, axis=1)[:, None] - 2 * scores + np.sum(vectors**2, axis=1)[None, :])
    elif metric != "ip":
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    return scores


def per_question_scores(questions: torch.Tensor, passages: torch.Tensor, metric: str = "ip") -> torch.Tensor:
    """Scores `[B, n]` of each question `[B, d]` against its own passages `[B, n, d]` (torch, differentiable)."""
    passages = passages.to(questions.dtype)
    if metric == "ip":
        return torch.bmm(passages, questions.unsqueeze(-1)).squeeze(-1)
    if metric == "l2":
        return -((passages - questions.unsqueeze(1)) ** 2).sum(-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")

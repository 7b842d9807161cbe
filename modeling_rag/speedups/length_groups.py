"""Rows of different context lengths, sorted into chunks and groups so that little compute goes to padding.

RAG runs one generator input per (question, document), whose lengths differ widely (57 to 300
tokens in the benchmark). An encoder-decoder generator's encoder and cross-attention then spend
most of their work on padding if every row is padded to the batch's longest. These functions cut
right-padded rows into pieces of similar length; the generator runners run each piece trimmed to
its own width and put the results back in row order.
"""

from __future__ import annotations

import torch

__all__ = ["is_right_padded", "length_chunks", "length_groups"]


def is_right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of `mask` `[R, L]` is ones then zeros."""
    mask_long = mask.long()
    return torch.equal(mask_long.cumprod(-1).sum(-1), mask_long.sum(-1))


def length_chunks(mask: torch.Tensor | None, chunk_tokens: int) -> list[tuple[torch.Tensor, int]] | None:
    """Right-padded rows `[R, L]` sorted by length into chunks of about `chunk_tokens` padded tokens.

    Returns `(row_indices, chunk_length)` pairs covering every row once, or None when one batch is as
    good (chunking off with 0, few tokens, a single chunk, or rows that are not right-padded).
    """
    if mask is None or chunk_tokens <= 0:
        return None
    rows, width = mask.shape
    if rows * width <= chunk_tokens or not is_right_padded(mask):
        return None
    lengths = mask.long().sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    chunks, start = [], 0
    while start < rows:
        length = max(int(sorted_lengths[start]), 1)
        end = min(rows, start + max(1, chunk_tokens // length))
        chunks.append((order[start:end], length))
        start = end
    return chunks if len(chunks) > 1 else None


def length_groups(
    mask: torch.Tensor, n_docs: int, expand: int, max_groups: int, min_rows: int
) -> list[tuple[torch.Tensor, int]]:
    """Groups the decoding rows by the length of their context: `[(row indices, group width)]`.

    `mask` `[B * n, L]` holds the right-padded contexts; decoding row `(q * expand + e) * n + j`
    (question q, beam e, document j) reads context `q * n + j`. The contexts are split by length
    into up to `max_groups` groups of at least `min_rows` rows, so all beams of one context, which may
    trade places, stay in one group.
    """
    contexts, width = mask.shape
    device = mask.device
    every = [(torch.arange(contexts * expand, device=device), width)]
    n_groups = min(max_groups, contexts * expand // min_rows, contexts)
    if n_groups < 2 or not is_right_padded(mask):
        return every
    lengths = mask.long().sum(-1)
    order = torch.argsort(lengths, stable=True)
    beams = torch.arange(expand, device=device)
    groups = []
    for part in torch.tensor_split(order, n_groups):
        q, j = torch.div(part, n_docs, rounding_mode="floor"), part % n_docs
        idx = ((q.unsqueeze(1) * expand + beams) * n_docs + j.unsqueeze(1)).reshape(-1).sort().values
        groups.append((idx, max(int(lengths[part].max()), 1)))
    return groups

r"""The RAG marginal likelihoods (Lewis et al., 2020, section 2.1), in one place.

With retrieval scores `s(d, x)` of the top-k documents of question `x`, `p(d | x) = softmax_d s(d, x)`,
and the generator's `p(y_t | x, d, y_<t)`:

- RAG-Sequence, one document for the whole answer:
  `p(y | x) = sum_d p(d | x) prod_t p(y_t | x, d, y_<t)`            ([`sequence_nll`])
- RAG-Token, a document per token:
  `p(y | x) = prod_t sum_d p(d | x) p(y_t | x, d, y_<t)`            ([`token_nll`], [`next_token_logprobs`])
- the posterior of each document given the answer, reported by `answer()`:
  `p(d | x, y) = p(d | x) p(y | x, d) / sum_d' p(d' | x) p(y | x, d')`  ([`document_posteriors`])

Everything is in log space: `doc_logprobs` `[B, n]` = log p(d | x); `token_logprobs` `[B, n, T]` =
log p(y_t | x, d, y_<t) with `token_mask` `[B, T]` marking real answer tokens.
"""

from __future__ import annotations

import torch

__all__ = ["answer_logprob", "doc_log_probs", "document_posteriors", "next_token_logprobs", "sequence_nll", "token_nll"]


def doc_log_probs(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(d | x) `[B, n]` from retrieval scores."""
    return torch.log_softmax(doc_scores.float(), dim=-1)


def answer_logprob(token_logprobs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """log p(y | x, d) = sum_t log p(y_t | x, d, y_<t): `[B, n]`."""
    return (token_logprobs * token_mask.unsqueeze(1)).sum(-1)


def sequence_nll(doc_logprobs, token_logprobs, token_mask) -> torch.Tensor:
    """RAG-Sequence: -log sum_d p(d | x) p(y | x, d), per question `[B]`."""
    return -torch.logsumexp(doc_logprobs + answer_logprob(token_logprobs, token_mask), dim=-1)


def token_nll(doc_logprobs, token_logprobs, token_mask) -> torch.Tensor:
    """RAG-Token: -sum_t log sum_d p(d | x) p(y_t | x, d, y_<t), per question `[B]`."""
    per_token = torch.logsumexp(doc_logprobs.unsqueeze(-1) + token_logprobs, dim=1)  # [B, T]
    return -(per_token * token_mask).sum(-1)


def document_posteriors(doc_logprobs, answer_logprobs) -> torch.Tensor:
    """p(d | x, y) `[B, n]` from log p(d | x) and log p(y | x, d)."""
    return torch.softmax(doc_logprobs + answer_logprobs, dim=-1)


def next_token_logprobs(logits: torch.Tensor, doc_logprobs: torch.Tensor) -> torch.Tensor:
    """RAG-Token's next-token distribution `log sum_d p(d | x) softmax(logits_d)`: `[rows, V]`.

    `logits` `[rows * n, V]`, `doc_logprobs` `[rows, n]`. One `[rows * n, V]` tensor is allocated (the
    log-softmax); the rest runs in place on it (`torch.logsumexp` would allocate three more, each 32 MB
    per step with 160 rows and BART's vocabulary).
    """
    rows, n = doc_logprobs.shape
    logprobs = torch.log_softmax(logits.float(), dim=-1).view(rows, n, -1)
    logprobs.add_(doc_logprobs.unsqueeze(-1))
    peak = logprobs.amax(dim=1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # all -inf: exp gives 0, log -inf
    return logprobs.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))

r"""RagSequenceMode: one document for the whole answer, `p(y | x) = sum_d p(d | x) p(y | x, d)`.

Generation decodes from each document's input separately (the generator's own `generate`), then
ranks the distinct hypotheses of each question by their marginal likelihood. Two scorers decide
which `p(y | x, d)` enter that sum (`RagConfig.sequence_decoding`):

- [`FastScorer`] (`"fast"`): each hypothesis only under the documents that produced it (the paper's
  "fast decoding"); identical hypotheses from several documents pool their mass;
- [`ThoroughScorer`] (`"thorough"`): every distinct hypothesis under every document, rescored by
  teacher forcing where decoding did not already give the score.
"""

from __future__ import annotations

import torch

from ..errors import RagConfigError
from .base import MarginalMode
from .marginals import doc_log_probs, sequence_nll

__all__ = ["FastScorer", "RagSequenceMode", "ThoroughScorer", "same_hypothesis"]


def same_hypothesis(cands: torch.Tensor) -> torch.Tensor:
    """`[B, c, c]`: whether hypotheses i and j of a question (`cands` `[B, c, T]`) are the same token sequence."""
    return (cands.unsqueeze(2) == cands.unsqueeze(1)).all(-1)


class FastScorer:
    """log p(y | x) summed over the documents that produced each hypothesis."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, ids, mask, cands, doc_logprobs, same, first, per_doc, own_lp, encoder_states):
        batch_size, c = same.shape[:2]
        if own_lp is not None:  # greedy: each hypothesis was scored under its document while decoding
            seq_lp = own_lp.view(batch_size, c)
        else:
            ctx_index = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(per_doc)
            seq_lp = self.runner.sequence_logprobs(ids, mask, cands, encoder_states, ctx_index).view(batch_size, c)
        joint = doc_logprobs.repeat_interleave(per_doc, dim=1) + seq_lp  # [B, c]
        return torch.logsumexp(joint.unsqueeze(1).masked_fill(~same, float("-inf")), dim=-1)


class ThoroughScorer:
    """log p(y | x) summed over every document of the question."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, ids, mask, cands, doc_logprobs, same, first, per_doc, own_lp, encoder_states):
        batch_size, c = same.shape[:2]
        n = doc_logprobs.shape[1]
        # every distinct hypothesis of a question under every document of that question; a repeated
        # hypothesis takes the scores of its first occurrence (the same tokens score the same)
        flat_first = first.reshape(-1)
        unique = flat_first.nonzero().squeeze(-1)  # [U] indices into B * c
        q_of = torch.div(unique, c, rounding_mode="floor")
        cand_rows = cands[unique].repeat_interleave(n, dim=0)  # [U * n, T]
        ctx_index = (q_of.unsqueeze(1) * n + torch.arange(n, device=ids.device)).reshape(-1)  # [U * n]
        if own_lp is None:
            seq_lp_u = self.runner.sequence_logprobs(ids, mask, cand_rows, encoder_states, ctx_index).view(-1, n)
        else:
            # greedy, one hypothesis per document (c == n): a hypothesis that document j produced itself
            # already has its score under j from decoding; rescore only the other pairs
            known = same.reshape(batch_size * c, c)[unique]  # [U, n]
            seq_lp_u = torch.where(known, own_lp.view(batch_size, n)[q_of], torch.zeros_like(known, dtype=torch.float))
            missing = (~known).reshape(-1).nonzero().squeeze(-1)
            if missing.numel():
                seq_lp_u.view(-1)[missing] = self.runner.sequence_logprobs(
                    ids, mask, cand_rows[missing], encoder_states, ctx_index[missing]
                )
        position = (flat_first.long().cumsum(0) - 1).view(batch_size, c)  # row of each first occurrence
        first_of = same.long().argmax(-1)  # [B, c]: index of the first identical hypothesis
        seq_lp = seq_lp_u[position.gather(1, first_of)]  # [B, c, n]
        return torch.logsumexp(doc_logprobs.unsqueeze(1) + seq_lp, dim=-1)  # [B, c]


SCORERS = {"fast": FastScorer, "thorough": ThoroughScorer}


class RagSequenceMode(MarginalMode):
    name = "rag_sequence"

    def nll(self, doc_logprobs, token_logprobs, token_mask):
        return sequence_nll(doc_logprobs, token_logprobs, token_mask)

    def generate(self, ids, mask, doc_scores, gen_kwargs, encoder_states=None, sequence_decoding=None):
        decoding = sequence_decoding or self.config.sequence_decoding
        if decoding not in SCORERS:
            raise RagConfigError(f"sequence_decoding must be 'fast' or 'thorough', got {decoding!r}.")
        runner = self.runner
        batch_size, n = doc_scores.shape
        gen_kwargs = dict(gen_kwargs)
        num_return = gen_kwargs.pop("num_return_sequences", 1) or 1
        num_beams = gen_kwargs.get("num_beams", 1) or 1
        per_doc = max(num_beams, 1) if not gen_kwargs.get("do_sample") else max(num_return, 1)
        gen_kwargs = runner.generation_kwargs({**gen_kwargs, "num_return_sequences": per_doc})
        cfg = gen_kwargs["generation_config"]
        greedy = (cfg.num_beams or 1) == 1 and not cfg.do_sample and per_doc == 1
        out, own_lp = runner.generate_per_context(ids, mask, gen_kwargs, per_doc, encoder_states, own_scores=greedy)
        cands = runner.trim_after_eos(runner.strip_prompt(out, ids.shape[1]))  # [B * n * per_doc, T]
        c = n * per_doc
        same = same_hypothesis(cands.view(batch_size, c, -1))  # [B, c, c]
        first = ~torch.tril(same, diagonal=-1).any(-1)  # [B, c]: first occurrence of each distinct hypothesis
        scorer = SCORERS[decoding](runner)
        marginal = scorer(ids, mask, cands, doc_log_probs(doc_scores), same, first, per_doc, own_lp, encoder_states)
        # keep distinct hypotheses only, then the best num_return of each question
        cands = cands.view(batch_size, c, -1)
        ranked = marginal.masked_fill(~first, float("-inf"))
        k = min(num_return, c)
        top = ranked.topk(k, dim=-1)
        picked = cands.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, cands.shape[-1]))
        return picked.reshape(batch_size * k, -1), top.values.reshape(-1)

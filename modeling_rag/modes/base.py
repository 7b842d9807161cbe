"""RagMode: the way passages reach the generator, with its loss and its generation.

A mode is built per call from the model and a generator runner (`generators/`), and answers two
questions: what is the loss of these answers given the packed inputs ([`RagMode.forward`]), and
what answers does it generate ([`RagMode.generate`]). `concat` feeds all passages in one input;
the marginalised modes ([`MarginalMode`]) feed one input per passage and combine the generator's
likelihoods with the passage scores (`marginals.py`).
"""

from __future__ import annotations

import torch

from ..errors import RagInputError
from .marginals import answer_logprob, doc_log_probs, document_posteriors

__all__ = ["MarginalMode", "RagMode"]


class RagMode:
    """Base class of the modes; `name` is the value of `RagConfig.generation_mode` that selects it."""

    name: str = ""
    #: whether the inputs hold one generator row per passage (`[B * n, L]`) rather than one per question
    one_input_per_passage: bool = False

    def __init__(self, model, runner):
        self.model = model
        self.runner = runner
        self.config = model.config

    def _reduce(self, nll: torch.Tensor) -> torch.Tensor:
        return nll.mean() if self.config.loss_reduction == "mean" else nll.sum()

    def forward(self, context_input_ids, context_attention_mask, labels, doc_scores):
        """`(logits, loss or None, doc posteriors or None)` of teacher-forced answers."""
        raise NotImplementedError

    def generate(self, ids, mask, doc_scores, gen_kwargs: dict, encoder_states=None, sequence_decoding=None):
        """`(answer token ids [B * num_return_sequences, T], sequence scores or None)`."""
        raise NotImplementedError

    def answer_posteriors(self, ids, mask, doc_scores, sequences, encoder_states=None):
        """p(document | question, answer) of the first answer of each question, or None where it has no meaning."""
        return None


class MarginalMode(RagMode):
    """One generator input per passage; the answer's likelihood is marginalised over the passages."""

    one_input_per_passage = True

    def nll(self, doc_logprobs, token_logprobs, token_mask) -> torch.Tensor:
        """The negative marginal log-likelihood per question `[B]` (`marginals.sequence_nll` / `token_nll`)."""
        raise NotImplementedError

    def forward(self, context_input_ids, context_attention_mask, labels, doc_scores):
        if doc_scores is None:
            raise RagInputError(f"{self.name} mode needs doc_scores (or doc_embeddings and question input_ids).")
        batch_size, n = doc_scores.shape
        if context_input_ids.shape[0] != batch_size * n:
            raise RagInputError(
                f"{self.name} mode needs one generator input per document: context_input_ids has "
                f"{context_input_ids.shape[0]} rows, expected batch_size * n_docs = {batch_size * n}."
            )
        with self.runner.training_context(labels):
            logits, token_logprobs, token_mask = self.runner.answer_logprobs(
                context_input_ids, context_attention_mask, labels, batch_size, n
            )
        if token_logprobs is None:
            return logits, None, None
        doc_logprobs = doc_log_probs(doc_scores)  # [B, n]
        token_logprobs = token_logprobs.view(batch_size, n, -1)  # [B, n, T]
        token_mask = token_mask.view(batch_size, n, -1)[:, 0]  # [B, T]
        loss = self._reduce(self.nll(doc_logprobs, token_logprobs, token_mask))
        posteriors = document_posteriors(doc_logprobs, answer_logprob(token_logprobs, token_mask)).detach()
        return logits, loss, posteriors

    def answer_posteriors(self, ids, mask, doc_scores, sequences, encoder_states=None):
        batch_size, n = doc_scores.shape
        per_q = sequences.shape[0] // batch_size
        first = self.runner.trim_after_eos(sequences.view(batch_size, per_q, -1)[:, 0])
        seq_lp = self.runner.sequence_logprobs(ids, mask, first.repeat_interleave(n, dim=0), encoder_states)
        return document_posteriors(doc_log_probs(doc_scores), seq_lp.view(batch_size, n))

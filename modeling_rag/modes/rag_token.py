r"""RagTokenMode: a document per token, `p(y | x) = prod_t sum_d p(d | x) p(y_t | x, d, y_<t)`.

Generation runs transformers' `GenerationMixin.generate` on the RAG model itself, so beam search,
sampling and every logits processor work unchanged: each step, the model's forward (given the
`rag_state`) asks the generator runner for the next-token logits of every (row, document) pair and
returns their mixture ([`marginals.next_token_logprobs`]). The generator's cache lives in the state,
across steps, not in GenerationMixin.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin

from ..generators.base import StepState
from .base import MarginalMode
from .marginals import doc_log_probs, next_token_logprobs, token_nll

__all__ = ["RagTokenMode", "RagTokenState"]


class RagTokenState(StepState):
    """Per-`generate` state of RAG-Token decoding: the runner and its cache over (question, beam, document) rows."""

    def __init__(self, runner, context_ids, context_mask, doc_logprobs, n_docs, encoder_states=None):
        super().__init__(context_ids, context_mask, doc_logprobs, n_docs, encoder_states)
        self.runner = runner

    def next_token_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """log p(y_t | x, y_<t) = logsumexp_d log p(d | x) + log p(y_t | x, d, y_<t): `[rows, V]`."""
        logits = self.runner.step_logits(input_ids, self)
        self.prev_ids = input_ids
        return next_token_logprobs(logits, self.doc_logprobs)


class RagTokenMode(MarginalMode):
    name = "rag_token"

    def nll(self, doc_logprobs, token_logprobs, token_mask):
        return token_nll(doc_logprobs, token_logprobs, token_mask)

    def generate(self, ids, mask, doc_scores, gen_kwargs, encoder_states=None, sequence_decoding=None):
        batch_size, n = doc_scores.shape
        runner = self.runner
        # a placeholder first token for GenerationMixin, removed from the output; not pad, so that no
        # padding is suspected
        pad = runner.pad_id()
        placeholder = self.model.generation_config.bos_token_id
        if placeholder is None or placeholder == pad:
            placeholder = 1 if pad != 1 else 2
        state = RagTokenState(
            runner, ids.view(batch_size, n, -1), mask.view(batch_size, n, -1), doc_log_probs(doc_scores), n
        )
        state.encoder_states = encoder_states
        dummy = torch.full((batch_size, 1), placeholder, dtype=torch.long, device=ids.device)
        gen_kwargs = runner.generation_kwargs({**gen_kwargs, "use_cache": False})  # the cache lives in rag_state
        out = GenerationMixin.generate(self.model, input_ids=dummy, rag_state=state, **gen_kwargs)
        return out[:, 1:], None

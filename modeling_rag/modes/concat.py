"""ConcatMode: all top-k passages and the question in one generator input.

The loss is the generator's cross-entropy on the answer tokens only (the prompt is masked), and
generation is the generator's own `generate` on the packed prompt.
"""

from __future__ import annotations

from .base import RagMode

__all__ = ["ConcatMode"]


class ConcatMode(RagMode):
    name = "concat"

    def forward(self, context_input_ids, context_attention_mask, labels, doc_scores):
        with self.runner.training_context(labels):
            logits, loss = self.runner.lm_loss(context_input_ids, context_attention_mask, labels)
        return logits, loss, None

    def generate(self, ids, mask, doc_scores, gen_kwargs, encoder_states=None, sequence_decoding=None):
        return self.runner.generate(ids, mask, gen_kwargs, encoder_states), None

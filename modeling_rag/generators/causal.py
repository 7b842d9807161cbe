"""CausalRunner: driving a decoder-only generator (GPT-2, Llama, SmolLM2, ...).

Prompts are left-padded, so every row's answer ends in the last column; position ids follow the
mask. In training only the positions that predict an answer token get logits (`logits_to_keep`):
the answer is a few tokens after a context of hundreds, and the vocabulary projection over every
position would cost a fifth of the compute and most of the memory of a step.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..context import generator_window
from ..errors import RagInputError
from ..losses import label_log_probs
from .base import GeneratorRunner, StepState

__all__ = ["CausalRunner"]


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class CausalRunner(GeneratorRunner):
    is_encoder_decoder = False

    def forward(self, ids, mask, **kwargs):
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.generator(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)

    def answer_positions(self, labels) -> torch.Tensor | None:
        """Positions whose logits the training loss needs (those predicting an answer token), or None.

        Only in training, with `speed.answer_logits_only`, and for generators whose forward takes
        `logits_to_keep`; else logits cover every position.
        """
        if labels is None or not self.speed.answer_logits_only or not self.model.training or not self._keeps_logits():
            return None
        return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)

    def _keeps_logits(self) -> bool:
        generator = self.generator
        base = generator.get_base_model() if hasattr(generator, "get_base_model") else generator  # peft
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def _shifted_logits(self, ids, mask, labels):
        """Logits, and the (logits, labels) pairs that predict each next token (None without labels)."""
        keep = self.answer_positions(labels)
        if keep is None:
            logits = self.forward(ids, mask, use_cache=False).logits
            if labels is None:
                return logits, None, None
            return logits, logits[:, :-1], labels[:, 1:]
        logits = self.forward(ids, mask, use_cache=False, logits_to_keep=keep).logits
        return logits, logits, labels[:, keep + 1]

    def lm_loss(self, ids, mask, labels):
        logits, shift_logits, shift_labels = self._shifted_logits(ids, mask, labels)
        if labels is None:
            return logits, None
        shift_logits = shift_logits.float()
        loss = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.label_smoothing,
        )
        return logits, loss

    def answer_logprobs(self, ids, mask, labels, batch_size, n):
        logits, shift_logits, shift_labels = self._shifted_logits(ids, mask, labels)
        if labels is None:
            return logits, None, None
        # answer tokens sit at different positions in each row: gather them into aligned columns
        valid = shift_labels != -100  # [R, L-1] (or [R, K] over the kept positions)
        lp = label_log_probs(shift_logits, shift_labels)  # [R, L-1]
        counts = valid.sum(-1)
        t_max = int(counts.max().item()) if counts.numel() else 0
        column = (valid.long().cumsum(-1) - 1).clamp(min=0)
        aligned = lp.new_zeros(lp.shape[0], t_max + 1)
        target_col = torch.where(valid, column, torch.full_like(column, t_max))
        aligned.scatter_add_(1, target_col, lp)
        aligned = aligned[:, :t_max]
        token_mask = (torch.arange(t_max, device=lp.device).unsqueeze(0) < counts.unsqueeze(1)).float()
        return logits, aligned, token_mask

    def sequence_logprobs(self, ctx_ids, ctx_mask, answer_ids, encoder_states=None, ctx_index=None):
        ans_mask = self.answer_token_mask(answer_ids)
        if ctx_index is not None:
            ctx_ids, ctx_mask = ctx_ids[ctx_index], ctx_mask[ctx_index]
        # left-padded context followed by the answer
        ids = torch.cat([ctx_ids, answer_ids], dim=1)
        mask = torch.cat([ctx_mask, ans_mask.long()], dim=1)
        logits = self.forward(ids, mask, use_cache=False).logits[:, ctx_ids.shape[1] - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        return (lp * ans_mask).sum(-1)

    def check_generation_length(self, context_input_ids, max_new_tokens) -> None:
        super().check_generation_length(context_input_ids, max_new_tokens)
        tokenizer = self.model.tokenizer.generator if self.model.tokenizer else None
        window = generator_window(self.generator.config, tokenizer)
        longest = context_input_ids.shape[1]
        if longest + max_new_tokens > window:
            raise RagInputError(
                f"The longest input has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"generator window of {window}. Lower max_new_tokens, or set config.max_new_tokens to at least "
                f"{max_new_tokens} so packing keeps room for it."
            )

    def strip_prompt(self, sequences, prompt_length):
        return sequences[:, prompt_length:]

    def step_logits(self, input_ids, state: StepState) -> torch.Tensor:
        rows, n = input_ids.shape[0], state.n_docs
        if state.cache is None:  # the first step reads the contexts, each expanded to its question's beams
            expand = rows // state.doc_logprobs.shape[0]
            state.expand = expand
            ctx = state.context_ids.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
            ctx_mask = state.context_mask.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
            state.doc_logprobs = state.doc_logprobs.repeat_interleave(expand, dim=0)
            positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.generator(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True)
            state.mask = ctx_mask
            state.positions = positions[:, -1:]
            state.cache = _cache_of(out)
            return out.logits[:, -1]
        row_idx = self.reordered_rows(input_ids, state)  # beams may have been reordered
        if row_idx is not None:
            state.cache.reorder_cache(row_idx)
            state.mask = state.mask.index_select(0, row_idx)
            state.positions = state.positions.index_select(0, row_idx)
        token = input_ids[:, -1:].repeat_interleave(n, dim=0)
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
        state.positions = state.positions + 1
        out = self.generator(
            input_ids=token, attention_mask=state.mask, position_ids=state.positions, cache=state.cache, use_cache=True
        )
        state.cache = _cache_of(out)
        return out.logits[:, -1]

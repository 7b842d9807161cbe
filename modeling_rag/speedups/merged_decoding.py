"""Driving an encoder-decoder generator through `grouped_decoding`: merged decoding and packed teacher forcing.

`grouped_decoding` provides the mechanism (a cross-attention plan, merged caches, the grouped
attention function); this module uses it the two ways the generator runners need:

- [`MergedDecoding`]: after a first decoding step run group by group, the groups become one batch
  whose later steps read the decoder's weights once, each group attending to its own context;
- [`packed_decoder_logits`]: a teacher-forced decoder and LM head run once over the rows of all
  length chunks, each chunk attending to its own encoder states.

Both end with [`check_served`]: every cross-attention layer must have gone through the grouped
function, or the generator attended to the wrong keys (a transformers version that runs its
decoder differently), which is an error, never a silently wrong answer.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

from .grouped_decoding import (
    CrossAttentionPlan,
    group_slices,
    grouped_cross_attention,
    grouped_cross_attention_modules,
    merge_group_caches,
    pack_encoder_states,
)

__all__ = ["MergedDecoding", "check_served", "packed_decoder_logits"]


def check_served(plan: CrossAttentionPlan, what: str) -> None:
    """After a grouped generator call: every cross-attention layer must have gone through the grouped function."""
    served, expected = plan.take_served(), len(plan.layers)
    if served != expected:
        raise RuntimeError(
            f"grouped {what}: {served} of the generator's {expected} cross-attention layers went through the "
            "grouped attention function, so the others attended to the wrong keys. This transformers version "
            "runs its decoder differently; pass speed_options=RagSpeedOptions(merge_decode_groups=False) (or set "
            "it in model.config.speed_options) and report it."
        )


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class MergedDecoding:
    """The length groups of a decoding merged into one batch after their first step.

    Attributes: `cache` (an `EncoderDecoderCache` of the rows in merged order, cross-attention holding
    stand-ins), `plan` (each group's rows, width and cross-attention keys/values), `order` (merged
    position -> row), `position` (row -> merged position), `mask` (`[rows, width]` context mask in
    merged order) and `encoder_states` (a zero-sized stand-in of the merged encoder states' shape).
    """

    def __init__(self, cache, plan, order, mask, encoder_states):
        self.cache = cache
        self.plan = plan
        self.order = order
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(len(order), device=order.device)
        self.mask = mask
        self.encoder_states = encoder_states

    @classmethod
    def from_groups(cls, generator, groups) -> MergedDecoding | None:
        """`groups`: `[row indices, encoder outputs, mask, cache]` per group, after one step each.

        Returns None if the generator or its caches do not allow merging; otherwise the groups' caches
        move into the merged decoding (their entries are cleared).
        """
        layers = grouped_cross_attention_modules(generator)
        if layers is None:
            return None
        merged = merge_group_caches([g[3] for g in groups], [len(g[0]) for g in groups])
        if merged is None:
            return None
        cache, keys_values = merged
        slices = group_slices([g[2].shape for g in groups])  # each group's mask is [group rows, group width]
        width = max(width for _, _, width in slices)
        order = torch.cat([g[0] for g in groups])
        mask = torch.zeros(len(order), width, dtype=groups[0][2].dtype, device=order.device)
        for (first, end, w), g in zip(slices, groups):
            mask[first:end, :w] = g[2]
        states = groups[0][1].last_hidden_state
        stand_in = states.new_zeros(()).expand(len(order), width, states.shape[-1])
        for g in groups:  # their caches now live in the merged cache and the plan
            g[1] = g[3] = None
        plan = CrossAttentionPlan(slices=slices, keys_values=keys_values, layers=layers)
        return cls(cache, plan, order, mask, stand_in)

    def step(self, generator, tokens: torch.Tensor, source_rows: torch.Tensor | None) -> torch.Tensor:
        """One step: `tokens` `[rows, 1]` in row order; `source_rows` the previous row of each row when beams
        were reordered (else None). Returns the next-token logits `[rows, V]` in row order."""
        if source_rows is not None:
            self.cache.self_attention_cache.reorder_cache(self.position[source_rows[self.order]])
        with grouped_cross_attention(generator, self.plan):
            out = generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
                attention_mask=self.mask,
                decoder_input_ids=tokens[self.order],
                cache=self.cache,
                use_cache=True,
            )
        check_served(self.plan, "RAG-Token decoding")
        self.cache = _cache_of(out)
        return out.logits[:, -1].index_select(0, self.position)


def packed_decoder_logits(generator, encoder_states, chunk_masks, decoder_inputs, layers) -> torch.Tensor:
    """The decoder and LM head once over the rows of all chunks (in chunk order): logits `[R, T, V]`.

    `encoder_states` holds each chunk's encoder output `[chunk rows, chunk width, d]` and `chunk_masks`
    its context mask (or None); the states are packed back to back (no padding between chunks) so that
    each cross-attention layer projects them in one matrix product, and the grouped attention function
    attends each chunk's rows to their own part. `layers` comes from `grouped_cross_attention_modules`.
    """
    slices = group_slices([s.shape[:2] for s in encoder_states])
    key_masks = [
        None if m is None or bool(m.all()) else m.bool()[:, None, None, :]  # [rows, 1, 1, width], as SDPA takes
        for m in chunk_masks
    ]
    plan = CrossAttentionPlan(slices=slices, keys_values=None, layers=layers, key_masks=key_masks)
    packed = pack_encoder_states(encoder_states, slices[-1][1])
    with grouped_cross_attention(generator, plan):
        out = generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=packed),
            attention_mask=None,
            use_cache=False,
            **decoder_inputs,
        )
    check_served(plan, "teacher-forced decoding")
    return out.logits

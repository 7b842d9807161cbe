"""Seq2SeqRunner: driving an encoder-decoder generator (BART, T5, ...).

Contexts are right-padded and encoded once per call; every beam, hypothesis and rescoring pass
reuses the states. The plain path runs the generator on the whole batch. The fast paths, each
switched by `RagSpeedOptions` and equal to it up to float rounding, cut the rows into pieces of
similar context length (`speedups.length_groups`) so neither the encoder nor the cross-attention
reads padding, and, where the generator allows it (`speedups.merged_decoding`), run the decoder
once over all pieces, each attending to its own context.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..losses import label_log_probs
from ..speedups.grouped_decoding import grouped_cross_attention_modules
from ..speedups.length_groups import is_right_padded, length_chunks, length_groups
from ..speedups.merged_decoding import MergedDecoding, packed_decoder_logits
from ..speedups.support import exact_embedding_lookup, uses_activation_checkpointing
from .base import GeneratorRunner, StepState

__all__ = ["Seq2SeqRunner"]


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class Seq2SeqRunner(GeneratorRunner):
    is_encoder_decoder = True

    # -- encoder --------------------------------------------------------------------------------
    def encode_context(self, ids, mask) -> torch.Tensor:
        """The generator's encoder over context rows `[R, L]`: states `[R, L, d]` (zeros at padding).

        Right-padded rows are sorted by length and encoded in chunks of about
        `speed.encoder_chunk_tokens` tokens, each padded only to its own longest row.
        """
        encoder = self.generator.get_encoder()
        rows, width = ids.shape
        chunks = length_chunks(mask, self.speed.encoder_chunk_tokens)
        if chunks is None:
            return encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        hidden = None
        for idx, length in chunks:
            states = encoder(input_ids=ids[idx, :length], attention_mask=mask[idx, :length], return_dict=True)
            states = states.last_hidden_state
            if hidden is None:
                hidden = states.new_zeros(rows, width, states.shape[-1])
            hidden.index_put_((idx.unsqueeze(1), torch.arange(length, device=ids.device)), states)
        return hidden

    # -- teacher forcing ------------------------------------------------------------------------
    def teacher_forced(self, ids, mask, labels, encoder_states=None):
        """Teacher-forced forward (no loss computed inside the generator)."""
        if labels is None:
            return self.generator(input_ids=ids, attention_mask=mask, use_cache=False)
        prepare = getattr(self.generator, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            return self.generator(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        if encoder_states is None:
            encoder_states = self.encode_context(ids, mask)
        return self.generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            attention_mask=mask,
            decoder_input_ids=prepare(labels=labels),
            use_cache=False,
        )

    def lm_loss(self, ids, mask, labels):
        logits = self.teacher_forced(ids, mask, labels).logits
        if labels is None:
            return logits, None
        loss = nn.functional.cross_entropy(
            logits.float().view(-1, logits.shape[-1]),
            labels.view(-1),
            ignore_index=-100,
            label_smoothing=self.config.label_smoothing,
        )
        return logits, loss

    def answer_logprobs(self, ids, mask, labels, batch_size, n):
        if labels is None:
            return self.teacher_forced(ids, mask, None).logits, None, None
        if labels.shape[0] == batch_size:
            labels = labels.repeat_interleave(n, dim=0)
        logits, lp = self.label_logprobs(ids, mask, labels)
        return logits, lp, (labels != -100).float()

    def _packed_decoder_layers(self) -> dict[int, int] | None:
        """The cross-attention modules when the teacher-forced decoder can run once over all length chunks.

        Not with activation checkpointing: its recomputation in the backward pass would run the
        cross-attention outside the grouped attention function.
        """
        if not self.speed.merge_decode_groups or uses_activation_checkpointing(self.generator):
            return None
        return grouped_cross_attention_modules(self.generator)

    def label_logprobs(self, ids, mask, labels):
        """Teacher-forced pass: logits `[R, T, V]` and log p(label) `[R, T]` (0 where -100).

        Rows run in length-sorted chunks, each trimmed to its own longest context, so neither the encoder
        nor the cross-attention spends compute (or activation memory, in training) on padding; results
        are put back in row order. Where the generator allows it only the encoder runs per chunk, and the
        decoder and LM head run once over all rows, each chunk's rows attending to their own states.
        """
        prepare = getattr(self.generator, "prepare_decoder_input_ids_from_labels", None)
        chunk_tokens = self.speed.train_chunk_tokens if torch.is_grad_enabled() else self.speed.encoder_chunk_tokens
        chunks = length_chunks(mask, chunk_tokens) if prepare is not None else None
        if chunks is None:
            chunks = [(torch.arange(ids.shape[0], device=ids.device), ids.shape[1])]
        if prepare is None:  # the generator builds its own decoder inputs (and loss) from labels
            logits = self.generator(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits
            return logits, label_log_probs(logits, labels)
        decoder_input_ids = prepare(labels=labels)
        encoder = self.generator.get_encoder()
        # with gradients and several chunks, look the embeddings up once: each lookup's backward
        # writes a dense [vocabulary, d] gradient (154 MB for BART-base), once per chunk otherwise
        embeds = decoder_embeds = None
        if len(chunks) > 1 and torch.is_grad_enabled() and self.speed.shared_embedding_lookup:
            lookup = exact_embedding_lookup(encoder)
            embeds = lookup(ids) if lookup is not None else None
            lookup = exact_embedding_lookup(self.generator.get_decoder())
            decoder_embeds = lookup(decoder_input_ids) if lookup is not None else None

        def decoder_inputs(rows):
            if decoder_embeds is None:
                return {"decoder_input_ids": decoder_input_ids[rows]}
            return {"decoder_inputs_embeds": decoder_embeds[rows]}

        packed_layers = self._packed_decoder_layers() if len(chunks) > 1 else None
        logits_parts, order, encoder_states, chunk_masks = [], [], [], []
        for idx, length in chunks:
            order.append(idx)
            chunk_mask = None if mask is None else mask[idx, :length]
            if embeds is None:
                states = encoder(input_ids=ids[idx, :length], attention_mask=chunk_mask, return_dict=True)
            else:
                states = encoder(inputs_embeds=embeds[idx, :length], attention_mask=chunk_mask, return_dict=True)
            if packed_layers is not None:
                encoder_states.append(states.last_hidden_state)
                chunk_masks.append(chunk_mask)
                continue
            out = self.generator(
                encoder_outputs=states, attention_mask=chunk_mask, use_cache=False, **decoder_inputs(idx)
            )
            logits_parts.append(out.logits)
            del out
        if packed_layers is not None:
            inputs = decoder_inputs(torch.cat(order))
            logits_parts = [packed_decoder_logits(self.generator, encoder_states, chunk_masks, inputs, packed_layers)]
            del encoder_states
        if len(chunks) == 1:
            logits = logits_parts[0]
        else:
            # one row-ordered logits tensor, returned and also the only [R, T, V] tensor the loss saves
            inverse = torch.argsort(torch.cat(order))
            logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
            del logits_parts
            logits = logits[inverse]
        return logits, label_log_probs(logits, labels)

    def sequence_logprobs(self, ctx_ids, ctx_mask, answer_ids, encoder_states=None, ctx_index=None):
        """The contexts' encoder states are reused for every answer; the decoder runs in chunks of at most
        `speed.rescore_chunk_logits` logits, answers sorted by the length of their context."""
        ans_mask = self.answer_token_mask(answer_ids)
        labels = answer_ids.masked_fill(~ans_mask, -100)
        if encoder_states is None:
            encoder_states = self.encode_context(ctx_ids, ctx_mask)
        if ctx_index is None:
            ctx_index = torch.arange(answer_ids.shape[0], device=answer_ids.device)
        vocab = self.generator.get_output_embeddings().weight.shape[0]
        step = max(1, self.speed.rescore_chunk_logits // max(1, labels.shape[1] * vocab))
        # each chunk's cross-attention covers only its own longest (right-padded) context
        ctx_lengths = ctx_mask.long().sum(-1)
        order = torch.argsort(ctx_lengths[ctx_index], stable=True) if is_right_padded(ctx_mask) else None
        sums = torch.zeros(labels.shape[0], dtype=torch.float, device=labels.device)
        for start in range(0, labels.shape[0], step):
            if order is not None:
                answer_rows = order[start : start + step]
                rows = ctx_index[answer_rows]
                width = max(int(ctx_lengths[rows].max()), 1)
            else:
                answer_rows = torch.arange(start, min(start + step, labels.shape[0]), device=labels.device)
                rows = ctx_index[answer_rows]
                width = ctx_mask.shape[1]
            lab = labels[answer_rows]
            out = self.teacher_forced(
                ctx_ids[rows, :width], ctx_mask[rows, :width], lab, encoder_states=encoder_states[rows, :width]
            )
            lp = torch.log_softmax(out.logits.float(), -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums[answer_rows] = (lp * ans_mask[answer_rows]).sum(-1)
        return sums

    # -- generation -----------------------------------------------------------------------------
    def strip_prompt(self, sequences, prompt_length):
        return sequences[:, 1:]  # the decoder start token

    def _generate_kwargs_for(self, rows, width, encoder_states):
        if encoder_states is None:
            return {}
        states = encoder_states if rows is None else encoder_states[rows, :width]
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=states)}

    def _generation_groups(self, mask, cfg):
        if cfg.do_sample:  # sampled rows would draw differently in other groups
            return super()._generation_groups(mask, cfg)
        return self._length_groups(mask, n_docs=1, expand=1)

    def _length_groups(self, mask, n_docs: int, expand: int):
        return length_groups(mask, n_docs, expand, self.speed.decode_groups, self.speed.decode_group_min_rows)

    def _start_groups(self, rows: int, state: StepState) -> None:
        """First step: the `[B * n]` contexts' encoder states (beams share their question's), cut into groups."""
        n, device = state.n_docs, state.context_ids.device
        expand = rows // state.doc_logprobs.shape[0]
        state.expand = expand
        state.doc_logprobs = state.doc_logprobs.repeat_interleave(expand, dim=0)
        flat_mask = state.context_mask.reshape(-1, state.context_mask.shape[-1])
        ctx_mask = state.context_mask.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
        base = state.encoder_states
        if base is None:
            flat_ids = state.context_ids.reshape(-1, state.context_ids.shape[-1])
            base = state.encoder_states = self.encode_context(flat_ids, flat_mask)
        if expand > 1:
            base = base.view(-1, n, *base.shape[1:]).repeat_interleave(expand, dim=0)
            base = base.reshape(rows * n, *base.shape[2:])
        state.groups = []
        state.local_pos = torch.empty(rows * n, dtype=torch.long, device=device)
        for idx, width in self._length_groups(flat_mask, n, expand):
            state.local_pos[idx] = torch.arange(len(idx), device=device)
            if len(idx) == rows * n and width == ctx_mask.shape[1]:
                states, mask = base, ctx_mask
            else:
                states, mask = base[idx, :width], ctx_mask[idx, :width]
            state.groups.append([idx, BaseModelOutput(last_hidden_state=states), mask, None])

    def step_logits(self, input_ids, state: StepState) -> torch.Tensor:
        """The first step runs the rows in groups of similar context length, each with its own cache; later
        steps run the groups as one batch where the generator allows it (`MergedDecoding`), else group by group."""
        rows, n = input_ids.shape[0], state.n_docs
        if state.groups is None:
            self._start_groups(rows, state)
            start = self.generator.config.decoder_start_token_id
            start = self.generator.config.pad_token_id if start is None else start
            token = torch.full((rows * n, 1), start, dtype=torch.long, device=input_ids.device)
        else:
            row_idx = self.reordered_rows(input_ids, state)
            token = input_ids[:, -1:].repeat_interleave(n, dim=0)
            if state.merged is not None:
                return state.merged.step(self.generator, token, row_idx)
            if row_idx is not None:
                # a row's source holds the same document of the same question, so it is in the same group
                for g in state.groups:
                    g[3].reorder_cache(state.local_pos[row_idx[g[0]]])
        logits = None
        for g in state.groups:
            idx, encoder_outputs, mask, cache = g
            out = self.generator(
                encoder_outputs=encoder_outputs,
                attention_mask=mask,
                decoder_input_ids=token if len(state.groups) == 1 else token[idx],
                cache=cache,
                use_cache=True,
            )
            g[3] = _cache_of(out)
            if len(state.groups) == 1:
                logits = out.logits[:, -1]
            else:
                if logits is None:
                    logits = out.logits.new_empty(rows * n, out.logits.shape[-1])
                logits[idx] = out.logits[:, -1]
        if len(state.groups) > 1 and input_ids.shape[1] == 1 and self.speed.merge_decode_groups:
            state.merged = MergedDecoding.from_groups(self.generator, state.groups)
        return logits

"""GeneratorRunner: how the model drives its generator, whatever the RAG mode.

A mode (`modes/`) says *what* to compute: a loss over answer tokens, sequences from each context,
the next-token distribution of a decoding step. A runner says *how* a given generator computes it:
a decoder-only generator reads left-padded prompts followed by the answer (`causal.py`); an
encoder-decoder generator encodes right-padded contexts once and decodes from the states
(`seq2seq.py`). The runner is built per call with the speed options of that call.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig

from ..errors import RagInputError
from ..speedups import RagSpeedOptions
from ..speedups.activation_recompute import recompute_feed_forward_activations

__all__ = ["GeneratorRunner", "StepState"]


class StepState:
    """Per-`generate` state of step-by-step decoding over (question, beam, document) rows (RAG-Token).

    `context_ids` / `context_mask` `[B, n, L]`, `doc_logprobs` `[B, n]` (expanded to `[B * beams, n]` by
    the first step). The runner keeps its cache and bookkeeping in the other attributes.
    """

    def __init__(self, context_ids, context_mask, doc_logprobs, n_docs, encoder_states=None):
        self.context_ids = context_ids
        self.context_mask = context_mask
        self.doc_logprobs = doc_logprobs
        self.n_docs = n_docs
        self.encoder_states = encoder_states  # encoder-decoder generators: encoder outputs of the [B * n] contexts
        self.prev_ids = None  # the token ids the last step saw, to detect reordered beams
        self.expand = None  # beams per question
        self.cache = None  # decoder-only: the generator's cache
        self.mask = None
        self.positions = None
        self.groups = None  # encoder-decoder: per length group [row index, encoder outputs, mask, cache]
        self.local_pos = None  # each row's position inside its group
        self.merged = None  # after the first step, the groups decoded as one batch (MergedDecoding), where possible


class GeneratorRunner:
    """The calls a mode makes on the generator. Subclasses: `CausalRunner`, `Seq2SeqRunner`."""

    is_encoder_decoder = False

    def __init__(self, model, speed: RagSpeedOptions):
        self.model = model
        self.generator = model.generator
        self.config = model.config
        self.speed = speed

    # -- tokens ---------------------------------------------------------------------------------
    def pad_id(self) -> int:
        cfg = self.model.generation_config
        pad = cfg.pad_token_id
        if pad is None:
            eos = cfg.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        return 0 if pad is None else pad

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])

    def _is_eos(self, ids: torch.Tensor) -> torch.Tensor:
        is_eos = torch.zeros_like(ids, dtype=torch.bool)
        for e in self._eos_ids():
            is_eos |= ids == e
        return is_eos

    def answer_token_mask(self, answer_ids: torch.Tensor) -> torch.Tensor:
        """True for answer tokens up to and including the first eos (padding after it is ignored)."""
        is_eos = self._is_eos(answer_ids)
        before_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        return before_eos & ((answer_ids != self.pad_id()) | is_eos)

    def trim_after_eos(self, seqs: torch.Tensor) -> torch.Tensor:
        """Everything after each row's first eos replaced by padding."""
        if not self._eos_ids():
            return seqs
        is_eos = self._is_eos(seqs)
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        return seqs.masked_fill(after, self.pad_id())

    @staticmethod
    def reordered_rows(input_ids: torch.Tensor, state: StepState) -> torch.Tensor | None:
        """`[rows * n]` previous row of each (row, document) when beams were reordered, else None.

        Rows are found by their token prefix, among the rows of the same question.
        """
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, state.prev_ids):
            return None
        rows, n, device = input_ids.shape[0], state.n_docs, input_ids.device
        group = torch.arange(rows, device=device) // state.expand
        same_group = group.unsqueeze(1) == group.unsqueeze(0)
        matches = (prefix.unsqueeze(1) == state.prev_ids.unsqueeze(0)).all(-1) & same_group
        source = matches.float().argmax(dim=1)
        return (source.unsqueeze(1) * n + torch.arange(n, device=device)).reshape(-1)

    # -- generation -----------------------------------------------------------------------------
    def generation_kwargs(self, gen_kwargs: dict) -> dict:
        """One GenerationConfig holding the model's defaults updated with the caller's arguments."""
        cfg = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        cfg.max_length = None
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.pad_id()
        unused = cfg.update(**gen_kwargs)
        cfg.validate()
        return {"generation_config": cfg, **unused}

    def check_generation_length(self, context_input_ids: torch.Tensor, max_new_tokens) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise RagInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")

    def encode_context(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Encoder states of the contexts, reused by every beam and rescoring pass (None: no encoder)."""
        return None

    def strip_prompt(self, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
        raise NotImplementedError

    def _generate_kwargs_for(self, rows, width, encoder_states) -> dict:
        """Extra `generate` arguments for the context rows `rows` trimmed to `width` (encoder states)."""
        return {}

    def _generation_groups(self, mask: torch.Tensor, cfg) -> list[tuple[torch.Tensor, int]]:
        """Context rows run by one `generate` call each, `(row indices, width)`: all rows by default."""
        return [(torch.arange(mask.shape[0], device=mask.device), mask.shape[1])]

    def generate(self, ids, mask, gen_kwargs: dict, encoder_states=None) -> torch.Tensor:
        """The generator's own `generate` on the prompts `ids`; returns the new tokens only."""
        kwargs = self.generation_kwargs(gen_kwargs)
        kwargs.update(self._generate_kwargs_for(None, None, encoder_states))
        out = self.generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return self.strip_prompt(out, ids.shape[1])

    def generate_per_context(self, ids, mask, gen_kwargs, per_doc, encoder_states=None, own_scores=False):
        """The generator's own `generate` on every context row, `per_doc` sequences each, in row order.

        Returns the full sequences and, with `own_scores` (greedy), each sequence's log-likelihood under
        its own context from the raw logits of decoding (what `sequence_logprobs` would recompute); None
        otherwise or when those logits would exceed `speed.own_scores_max_logits`. Encoder-decoder
        generators decoding deterministically run rows in groups of similar context length.
        """
        cfg = gen_kwargs["generation_config"]
        groups = self._generation_groups(mask, cfg)
        vocab = self.generator.get_output_embeddings().weight.shape[0]
        largest = max(len(idx) for idx, _ in groups) * per_doc * (cfg.max_new_tokens or 1) * vocab
        own_scores = own_scores and largest <= self.speed.own_scores_max_logits  # step logits held to the end
        if own_scores:
            own_cfg = copy.deepcopy(cfg)
            own_cfg.output_logits = own_cfg.return_dict_in_generate = True
        pieces, rows, scores = [], [], []
        for idx, width in groups:
            kwargs = {**gen_kwargs, **self._generate_kwargs_for(idx, width, encoder_states)}
            if own_scores:
                kwargs["generation_config"] = own_cfg
            if len(groups) == 1:
                out = self.generator.generate(input_ids=ids, attention_mask=mask, **kwargs)
            else:
                out = self.generator.generate(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], **kwargs)
            if own_scores:
                steps = torch.stack(out.logits, dim=1)  # [rows, T, V], raw (before logits processors)
                tokens = out.sequences[:, -steps.shape[1] :]
                lp = torch.log_softmax(steps.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                scores.append((lp * self.answer_token_mask(tokens)).sum(-1))
                out = out.sequences
            pieces.append(out)
            rows.append((idx.unsqueeze(1) * per_doc + torch.arange(per_doc, device=idx.device)).reshape(-1))
        if len(groups) == 1:
            return pieces[0], (scores[0] if own_scores else None)
        length = max(p.shape[1] for p in pieces)
        out = pieces[0].new_full((ids.shape[0] * per_doc, length), self.pad_id())
        own = torch.zeros(ids.shape[0] * per_doc, device=ids.device) if own_scores else None
        for i, (piece, r) in enumerate(zip(pieces, rows)):
            out[r, : piece.shape[1]] = piece
            if own_scores:
                own[r] = scores[i]
        return out, own

    # -- what each runner implements ---------------------------------------------------------------
    def lm_loss(self, ids, mask, labels):
        """Logits and the answer-token cross-entropy (None without labels) of single inputs (`concat`)."""
        raise NotImplementedError

    def answer_logprobs(self, ids, mask, labels, batch_size: int, n: int):
        """Logits, log p(answer token | context) `[B * n, T]` aligned by answer position, and the token mask."""
        raise NotImplementedError

    def sequence_logprobs(self, ctx_ids, ctx_mask, answer_ids, encoder_states=None, ctx_index=None):
        """Sum of log p(answer tokens | context) per answer row; row `i` under context `ctx_index[i]` (default i)."""
        raise NotImplementedError

    def step_logits(self, input_ids, state: StepState) -> torch.Tensor:
        """One decoding step over (row, document) pairs: the generator's next-token logits `[rows * n, V]`."""
        raise NotImplementedError

    def training_context(self, labels):
        """Around a teacher-forced pass: in training, BART-family feed-forward layers recompute their
        activation in the backward pass instead of keeping it (the largest activations of a step)."""
        enabled = (
            self.speed.recompute_activations and self.model.training and torch.is_grad_enabled() and labels is not None
        )
        return recompute_feed_forward_activations(self.generator, enabled=enabled)

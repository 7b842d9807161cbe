"""RagForGeneration: a question encoder, a generator and an index, as one transformers model."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput

from .activation_recompute import recompute_feed_forward_activations
from .atomic import JOURNAL_NAME, commit_staged_folder, new_staging_folder, recover_interrupted_commit
from .configuration_rag import RagConfig
from .constants import CONFIG_NAME, GENERATOR_TOKENIZER_DIR, QUESTION_ENCODER_TOKENIZER_DIR
from .context import ContextPacker, generator_window, pad_batch
from .encoders import encoder_forward, weights_fingerprint
from .errors import IndexMismatchError, RagConfigError, RagInputError
from .grouped_decoding import (
    CrossAttentionPlan,
    group_slices,
    grouped_cross_attention,
    grouped_cross_attention_modules,
    merge_group_caches,
    pack_encoder_states,
)
from .introspection import forward_source, uses_activation_checkpointing
from .library_output import quiet_library_output
from .losses import label_log_probs
from .modeling_outputs import RagAnswer, RagGenerateOutput, RagOutput, RagSource
from .passage_tokens import tokenizer_fingerprint
from .saved_model import check_saved_model, record_saved_parts
from .text_checks import check_encodable
from .tokenization_rag import RagTokenizer

logger = logging.getLogger(__name__)


# The generator's encoder runs on length-sorted chunks of about this many (padded) tokens, so that
# each chunk pads only to its own longest row (see RagForGeneration._encode_context).
ENCODER_CHUNK_TOKENS = 2048  # RAG-Token benchmark, BART-base encoder: 2048 was 5-10% faster than 4096
# with gradients, smaller chunks: padding inside a chunk costs saved activations, not just compute
# (RAG-Token training step, BART-base, 40 contexts of 57-300 tokens: 4.1 GB at 4096, 3.5 GB at 1024)
TRAIN_CHUNK_TOKENS = 1024
# Teacher-forced rescoring (RAG-Sequence, posteriors) runs in chunks of at most this many logits.
RESCORE_CHUNK_LOGITS = 1 << 25
# RAG-Token decoding with an encoder-decoder generator splits the (question, beam, document) rows into
# up to this many groups of similar context length (each at least DECODE_GROUP_MIN_ROWS rows), so the
# cross-attention of each group covers only its own longest context, not the batch's.
DECODE_GROUPS = 4
DECODE_GROUP_MIN_ROWS = 32
# After the first step (which computes each group's cross-attention keys and values over its own
# width), decode the groups as one batch, each group still attending only to its own context
# (`grouped_decoding`): the decoder's and LM head's weights are then read once per step, not per group.
# The same switch runs a teacher-forced decoder (training, rescoring) once over all length chunks.
MERGE_DECODE_GROUPS = True
# RAG-Sequence greedy decoding keeps each step's logits to score the hypotheses under their own
# documents; above this many logits per generate call it rescores instead
OWN_SCORES_MAX_LOGITS = 2**27


def _check_served(plan: CrossAttentionPlan, what: str) -> None:
    """After a grouped generator call: every cross-attention layer must have gone through the grouped function."""
    served, expected = plan.take_served(), len(plan.layers)
    if served != expected:
        raise RuntimeError(
            f"grouped {what}: {served} of the generator's {expected} cross-attention layers went through the "
            "grouped attention function, so the others attended to the wrong keys. This transformers version "
            "runs its decoder differently; set modeling_rag.modeling_rag.MERGE_DECODE_GROUPS = False and report it."
        )


class RagPreTrainedModel(PreTrainedModel):
    """Base class: the RagConfig contract, weight loading and saving."""

    config_class = RagConfig
    base_model_prefix = "rag"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # RAG adds no layers of its own: the question encoder and generator initialise themselves.
        return


def _embedding_lookup(stack: nn.Module) -> nn.Module | None:
    """`stack.embed_tokens` when `stack(inputs_embeds=stack.embed_tokens(ids))` equals `stack(input_ids=ids)`.

    That holds when the forward turns ids into embeddings with exactly ``inputs_embeds =
    self.embed_tokens(input_ids)`` (BART's encoder and decoder, T5's stacks, the decoders of Marian
    and Pegasus); not where a scale is applied to looked-up ids only (Marian's and Pegasus' encoders).
    """
    embed = getattr(stack, "embed_tokens", None)
    exact = "inputs_embeds = self.embed_tokens(input_ids)\n" in forward_source(type(stack))
    return embed if exact and isinstance(embed, nn.Module) else None


def _token_marginal(logits: torch.Tensor, doc_logprobs: torch.Tensor) -> torch.Tensor:
    """RAG-Token's next-token distribution: `log sum_d p(d | x) softmax(logits_d)`, `[rows, V]`.

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


class _RagTokenState:
    """Per-`generate` state of RAG-Token decoding: the generator's cache over (question, beam, document) rows."""

    def __init__(self, context_ids, context_mask, doc_logprobs, n_docs, is_encoder_decoder, start_id):
        self.context_ids = context_ids  # [B, n, L]
        self.context_mask = context_mask  # [B, n, L]
        self.doc_logprobs = doc_logprobs  # [B, n]
        self.n_docs = n_docs
        self.is_encoder_decoder = is_encoder_decoder
        self.start_id = start_id
        self.cache = None
        self.mask = None
        self.positions = None
        self.encoder_outputs = None
        self.prev_ids = None
        self.expand = None
        self.encoder_states = None  # encoder-decoder generators: encoder outputs of the [B * n] contexts
        self.groups = None  # encoder-decoder generators: per length group (row index, encoder outputs, mask, cache)
        self.local_pos = None  # each row's position inside its group
        self.merged = None  # after the first step, the groups decoded as one batch (_MergedDecoding), where possible


class _MergedDecoding:
    """The length groups of RAG-Token decoding merged into one batch (see `grouped_decoding`)."""

    def __init__(self, cache, plan, order, mask, encoder_states):
        self.cache = cache  # EncoderDecoderCache of the rows in merged order (cross-attention: stand-ins)
        self.plan = plan  # CrossAttentionPlan: each group's rows, width and cross-attention keys/values
        self.order = order  # merged position -> row
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(len(order), device=order.device)  # row -> merged position
        self.mask = mask  # [rows, width] context mask in merged order
        self.encoder_states = encoder_states  # zero-sized stand-in of the merged encoder states' shape


class RagForGeneration(RagPreTrainedModel, GenerationMixin):
    r"""Retrieval-augmented generation with any question encoder and any generator.

    The model holds `question_encoder` (an `AutoModel`), `generator` (an `AutoModelForCausalLM` or
    `AutoModelForSeq2SeqLM`), optionally a separate `context_encoder`, and two non-parameter parts:
    `retriever` (a [`RagRetriever`] over a FAISS index) and `tokenizer` (a [`RagTokenizer`]).

    Typical use:

    ```python
    model = RagForGeneration.from_pretrained("my-rag")
    print(model.answer("What is our mobile phone policy?")[0].answer)
    ```

    `config.generation_mode` picks how passages reach the generator: `"concat"` (one input holding all
    passages and the question), `"rag_sequence"` or `"rag_token"` (one input per passage, marginalised
    with the passage scores).
    """

    def __init__(
        self,
        config: RagConfig,
        question_encoder: PreTrainedModel | None = None,
        generator: PreTrainedModel | None = None,
        context_encoder: PreTrainedModel | None = None,
        retriever=None,
        tokenizer: RagTokenizer | None = None,
    ):
        super().__init__(config)
        if question_encoder is None:
            question_encoder = AutoModel.from_config(config.question_encoder)
        if generator is None:
            auto = AutoModelForSeq2SeqLM if config.generator_is_encoder_decoder else AutoModelForCausalLM
            try:
                generator = auto.from_config(config.generator)
            except ValueError as err:
                raise RagConfigError(
                    f"generator: {type(config.generator).__name__} has no language-model head "
                    f"({auto.__name__} does not support it); use a causal LM or a seq2seq LM config."
                ) from err
        if generator.get_output_embeddings() is None:
            raise RagConfigError(
                f"generator: {type(generator).__name__} has no language-model head; pass a model loaded with "
                "AutoModelForCausalLM or AutoModelForSeq2SeqLM."
            )
        self.question_encoder = question_encoder
        self.generator = generator
        if context_encoder is None and config.context_encoder is not None:
            context_encoder = AutoModel.from_config(config.context_encoder)
        self.context_encoder = context_encoder
        self.retriever = None
        self.reranker = None  # a CrossEncoderReranker (not a submodule: it saves into config.reranker)
        self.tokenizer = None
        self._packer = None
        self._packer_key = None
        self.post_init()
        self.generation_config = self._default_generation_config()
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        if retriever is not None:
            self.set_retriever(retriever)

    # ---------------------------------------------------------------------------------------------
    # parts
    # ---------------------------------------------------------------------------------------------
    def _default_generation_config(self) -> GenerationConfig:
        gen_cfg = getattr(self.generator, "generation_config", None)
        gen_cfg = GenerationConfig.from_dict(gen_cfg.to_dict()) if gen_cfg is not None else GenerationConfig()
        g = self.config.generator
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
            if getattr(gen_cfg, name, None) is None and getattr(g, name, None) is not None:
                setattr(gen_cfg, name, getattr(g, name))
        gen_cfg.max_new_tokens = self.config.max_new_tokens
        gen_cfg.max_length = None
        return gen_cfg

    @property
    def passage_encoder(self) -> PreTrainedModel:
        """The encoder of passages: `context_encoder` when there is one, else the question encoder."""
        return self.context_encoder if self.context_encoder is not None else self.question_encoder

    @property
    def is_generator_encoder_decoder(self) -> bool:
        return bool(getattr(self.generator.config, "is_encoder_decoder", False))

    def set_tokenizer(self, tokenizer: RagTokenizer) -> None:
        """Attaches the tokenizers; checks their vocabularies fit the models."""
        if not isinstance(tokenizer, RagTokenizer):
            raise RagInputError(f"tokenizer must be a RagTokenizer, got {type(tokenizer).__name__}.")
        for name, tok, model in (
            ("question_encoder", tokenizer.question_encoder, self.question_encoder),
            ("generator", tokenizer.generator, self.generator),
        ):
            emb = model.get_input_embeddings()
            if emb is not None and len(tok) > emb.num_embeddings:
                raise RagInputError(
                    f"The {name} tokenizer has {len(tok)} tokens but the {name} model's embedding has only "
                    f"{emb.num_embeddings} rows: they do not belong together. Load the tokenizer saved with the "
                    "model, or call resize_token_embeddings on the model."
                )
        self.tokenizer = tokenizer
        self._packer = None

    def set_retriever(self, retriever, check_fingerprint: bool = True) -> None:
        """Attaches a [`RagRetriever`]; its index must match this model's passage encoder."""
        index = retriever.index
        expected = self.config.retrieval_vector_size
        if index.dim != expected:
            raise IndexMismatchError(
                f"The index holds {index.dim}-dimensional vectors but the question encoder produces {expected}: "
                "rebuild the index with this model's encoder (model.build_index(...))."
            )
        if index.metric != self.config.similarity:
            raise IndexMismatchError(
                f"The index uses metric {index.metric!r} but config.similarity is {self.config.similarity!r}; "
                "set config.similarity to match, or rebuild the index."
            )
        if check_fingerprint and index.encoder_fingerprint:
            fingerprint = weights_fingerprint(self.passage_encoder)
            if fingerprint != index.encoder_fingerprint:
                raise IndexMismatchError(
                    "The index was built with a different passage encoder than this model's (weight fingerprints "
                    "differ), so its vectors do not match the questions' vectors. Rebuild it with "
                    "model.build_index(...), or pass check_fingerprint=False if you know they are compatible."
                )
        self.retriever = retriever

    def build_index(self, corpus, **kwargs):
        """Reads, chunks and encodes `corpus` with this model's passage encoder and attaches the index.

        `corpus` is a folder of .txt/.md files, a .jsonl / .csv file or a `datasets.Dataset`; keyword
        arguments go to [`RagRetriever.from_corpus`] (kind, max_tokens, overlap, bm25, ...), except
        `passage_tokens` (default True): store the passages' generator token ids with the index
        ([`store_passage_tokens`]).
        """
        from .retrieval_rag import RagRetriever

        if self.tokenizer is None:
            raise RagInputError("build_index needs the model's tokenizer: call model.set_tokenizer(...) first.")
        kwargs.setdefault("pooling", self.config.question_pooling)
        kwargs.setdefault("normalize", self.config.normalize_embeddings)
        kwargs.setdefault("metric", self.config.similarity)
        kwargs.setdefault("retrieval", self.config.retrieval)
        kwargs.setdefault("encoder_name", self.config.question_encoder._name_or_path or None)
        store_tokens = kwargs.pop("passage_tokens", True)
        retriever = RagRetriever.from_corpus(corpus, self.passage_encoder, self.tokenizer.question_encoder, **kwargs)
        self.set_retriever(retriever, check_fingerprint=False)
        if store_tokens:
            self.store_passage_tokens(show_progress=kwargs.get("show_progress", True))
        return retriever

    def store_passage_tokens(self, show_progress: bool = True) -> int:
        """Stores the generator token ids of the attached index's passages with it (those not stored yet).

        Inputs are then packed from stored ids: no passage goes through the tokenizer when answering,
        also right after loading. `build_index` does this; call it after adding passages to the index,
        or for an index built without this model's generator tokenizer (e.g. by scripts/build_index.py).
        Returns how many passages were tokenised; 0 (with a log line) for a tokenizer that is not fast.
        """
        if self.retriever is None:
            raise RagInputError("This model has no index attached: build or attach one first.")
        if self.tokenizer is None:
            raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
        tokenizer = self.tokenizer.generator
        if tokenizer_fingerprint(tokenizer) is None:
            logger.info("Passage tokens are not stored: the generator tokenizer is not a fast tokenizer.")
            return 0
        return self.retriever.store_passage_tokens(tokenizer, show_progress=show_progress)

    def packer(self) -> ContextPacker:
        """The context packer for the current tokenizer and settings (built once, passages cached)."""
        if self.tokenizer is None:
            raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
        c = self.config
        key = (
            id(self.tokenizer.generator),
            c.max_input_tokens,
            c.max_new_tokens,
            c.prompt_template,
            c.passage_template,
            c.passage_separator,
            c.instruction,
            c.use_chat_template,
            c.max_passage_tokens,
            c.min_passage_tokens,
        )
        if self._packer is None or self._packer_key != key:
            window = generator_window(self.generator.config, self.tokenizer.generator)
            budget = window if self.is_generator_encoder_decoder else window - c.max_new_tokens
            if c.max_input_tokens is not None:
                budget = min(budget, c.max_input_tokens)
            self._packer = ContextPacker(
                self.tokenizer.generator,
                budget=budget,
                prompt_template=c.prompt_template,
                passage_template=c.passage_template,
                passage_separator=c.passage_separator,
                instruction=c.instruction,
                use_chat_template=c.use_chat_template,
                max_passage_tokens=c.max_passage_tokens,
                min_passage_tokens=c.min_passage_tokens,
            )
            self._packer_key = key
        return self._packer

    # ---------------------------------------------------------------------------------------------
    # questions → vectors → passages
    # ---------------------------------------------------------------------------------------------
    def encode_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Pooled question vectors `[batch, hidden]` (with gradients unless called under no_grad)."""
        return encoder_forward(
            self.question_encoder,
            input_ids,
            attention_mask,
            self.config.question_pooling,
            self.config.normalize_embeddings,
            token_type_ids=kwargs.get("token_type_ids"),
        )

    def tokenize_questions(self, questions: Sequence[str]) -> dict:
        """Question-encoder inputs, truncated to `config.question_max_length` (with a warning)."""
        tok = self.tokenizer.question_encoder
        ids = tok(list(questions), truncation=False, verbose=False)["input_ids"]  # cut below, with our warning
        limit = min(self.config.question_max_length, generator_window(self.question_encoder.config, tok))
        out = []
        for q, row in zip(questions, ids):
            if len(row) > limit:
                if self.config.question_overflow == "error":
                    raise RagInputError(
                        f"A question has {len(row)} tokens, more than the question encoder reads ({limit}): "
                        f"{q[:60]!r}... Shorten it, or set config.question_overflow='truncate'."
                    )
                logger.warning(
                    "A question has %d tokens, more than the question encoder keeps (%d); its end is not used "
                    "for retrieval: %.60s...",
                    len(row),
                    limit,
                    q,
                )
                row = row[: limit - 1] + row[-1:]
            out.append(row)
        input_ids, attention_mask = pad_batch(out, tok.pad_token_id or 0, side="right")
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def _check_questions(self, questions) -> list[str]:
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, (list, tuple)):
            raise RagInputError(f"questions must be a string or a list of strings, got {type(questions).__name__}.")
        if len(questions) == 0:
            raise RagInputError("The list of questions is empty; pass at least one question.")
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise RagInputError(f"questions[{i}] is a {type(q).__name__}, not a string.")
            if not q.strip():
                raise RagInputError(f"questions[{i}] is empty or only whitespace; give the text of the question.")
            check_encodable(q, f"questions[{i}]")
        return [q.strip() for q in questions]

    @torch.no_grad()
    def retrieve(self, questions: Sequence[str] | str, n_docs: int | None = None):
        """Retrieves passages for `questions` with the attached retriever. Returns a `RetrievalOutput`."""
        questions = self._check_questions(questions)
        if self.retriever is None:
            raise RagInputError(
                "This model has no index attached: build one with model.build_index(corpus), load a model saved "
                "with its index, or pass passages= yourself."
            )
        n_docs = self._check_n_docs(n_docs)
        return self._retrieve(questions, n_docs)

    @torch.no_grad()
    def _retrieve(self, questions: list[str], n_docs: int, enc: dict | None = None):
        """`retrieve` for checked questions; `enc` (their question-encoder inputs) is reused when given."""
        embeddings = None
        if self.config.retrieval != "bm25" or self.config.generation_mode != "concat":
            if enc is None:
                enc = self.tokenize_questions(questions)
            embeddings = self.encode_questions(**enc).float().cpu().numpy()
            if not np.isfinite(embeddings).all():
                raise RagInputError("The question encoder produced NaN or infinite vectors; check its weights.")
        self.retriever.use_fusion_settings(self.config)  # the config is where a model keeps them
        if self.reranker is not None:
            from .reranker import retrieve_and_rerank

            return retrieve_and_rerank(self, embeddings, questions, n_docs)
        return self.retriever.retrieve(embeddings, n_docs, questions=questions)

    def set_reranker(self, reranker) -> None:
        """Attaches a [`CrossEncoderReranker`] (or detaches with `None`); it is saved in `config.reranker`."""
        from .reranker import attach_reranker

        attach_reranker(self, reranker)

    def _check_n_docs(self, n_docs):
        n_docs = self.config.n_docs if n_docs is None else n_docs
        if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs <= 0:
            raise RagInputError(f"n_docs must be a positive integer, got {n_docs!r}.")
        return n_docs

    # ---------------------------------------------------------------------------------------------
    # text → tensors
    # ---------------------------------------------------------------------------------------------
    def prepare_inputs(
        self,
        questions: Sequence[str] | str,
        answers: Sequence[str] | None = None,
        *,
        passages: Sequence[Sequence[dict | str]] | None = None,
        doc_scores=None,
        n_docs: int | None = None,
        generation_mode: str | None = None,
        for_generation: bool = False,
    ) -> dict:
        """Retrieves (unless `passages` are given), packs and tokenises a batch.

        Returns a dict for `model(**batch)`: question-encoder `input_ids` / `attention_mask`, generator
        `context_input_ids` / `context_attention_mask` (`[B, L]` in `concat` mode, `[B * n_docs, L]` in
        the marginalised modes), `doc_scores` `[B, n_docs]`, `doc_embeddings` `[B, n_docs, d]` (when an
        index is attached), `retrieved_doc_ids` `[B, n_docs]`, `labels` (with `answers`) and `passages`
        (the passage dicts used, for the caller).
        """
        questions = self._check_questions(questions)
        mode = generation_mode or self.config.generation_mode
        if mode not in ("concat", "rag_sequence", "rag_token"):
            raise RagConfigError(f"generation_mode must be 'concat', 'rag_sequence' or 'rag_token', got {mode!r}.")
        if self.tokenizer is None:
            raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
        if answers is not None:
            if isinstance(answers, str):
                answers = [answers]
            if len(answers) != len(questions):
                raise RagInputError(f"Got {len(questions)} questions but {len(answers)} answers; give one answer each.")
            for i, a in enumerate(answers):
                if not isinstance(a, str) or not a.strip():
                    raise RagInputError(f"answers[{i}] must be a non-empty string.")
                check_encodable(a, f"answers[{i}]")
        batch: dict = {}
        enc = self.tokenize_questions(questions)
        batch.update(enc)
        if passages is None:
            if self.retriever is None:
                raise RagInputError(
                    "This model has no index attached: build one with model.build_index(corpus), load a model "
                    "saved with its index, or pass passages= yourself."
                )
            retrieved = self._retrieve(questions, self._check_n_docs(n_docs), enc)
            passage_lists = retrieved.passages
            scores = torch.as_tensor(np.asarray(retrieved.doc_scores, dtype=np.float32))
            ids = torch.as_tensor(np.asarray(retrieved.row_ids, dtype=np.int64))
            if retrieved.doc_embeddings is not None:
                batch["doc_embeddings"] = torch.as_tensor(np.asarray(retrieved.doc_embeddings, dtype=np.float32)).to(
                    self.device
                )
        else:
            passage_lists = self._check_passages(passages, len(questions), mode)
            n = max(len(p) for p in passage_lists)
            if doc_scores is None:
                scores = torch.zeros(len(questions), n)
            else:
                scores = torch.as_tensor(doc_scores, dtype=torch.float32)
                if scores.shape != (len(questions), n):
                    raise RagInputError(
                        f"doc_scores has shape {tuple(scores.shape)} but the passages need ({len(questions)}, {n})."
                    )
            ids = torch.full((len(questions), n), -1, dtype=torch.long)
        batch["doc_scores"] = scores.to(self.device)
        batch["retrieved_doc_ids"] = ids.to(self.device)
        batch["passages"] = passage_lists
        packer = self.packer()
        flat = [p for plist in passage_lists for p in plist]
        # retrieved just now: their row ids name index passages, whose stored ids are these texts' ids
        known = self._stored_passage_ids(flat, packer.tokenizer) if passages is None else None
        packer.prefetch([p.get("text") or "" for p in flat], known)
        if mode == "concat":
            packed = [packer.pack(q, p) for q, p in zip(questions, passage_lists)]
            rows = [x.input_ids for x in packed]
            row_answers = answers
        else:
            n = scores.shape[1]
            packed = [x for q, p in zip(questions, passage_lists) for x in packer.pack_each(q, p)]
            rows = [x.input_ids for x in packed]
            row_answers = None if answers is None else [a for a in answers for _ in range(n)]
        batch.update(self._tensorize(rows, row_answers, answers, for_generation))
        return batch

    def _stored_passage_ids(self, passages: list[dict], tokenizer) -> list[list[int] | None] | None:
        """The token ids of retrieved `passages` stored with the index for `tokenizer`, or None if there are none."""
        store = getattr(self.retriever, "passage_tokens", None)
        if store is None or not passages or not store.matches(tokenizer):
            return None
        row_ids = [p.get("row_id") for p in passages]
        if any(not isinstance(r, (int, np.integer)) or r < 0 for r in row_ids):
            return None
        return store.lookup(row_ids)

    def _check_passages(self, passages, batch_size: int, mode: str) -> list[list[dict]]:
        if not isinstance(passages, (list, tuple)) or len(passages) != batch_size:
            raise RagInputError(
                f"passages must be a list with one list of passages per question ({batch_size}), got "
                f"{len(passages) if isinstance(passages, (list, tuple)) else type(passages).__name__}."
            )
        out = []
        for i, plist in enumerate(passages):
            if isinstance(plist, (str, dict)):
                plist = [plist]
            if not isinstance(plist, (list, tuple)) or not plist:
                raise RagInputError(f"passages[{i}] must be a non-empty list of passages (strings or dicts).")
            items = []
            for p in plist:
                if isinstance(p, str):
                    p = {"id": None, "title": "", "text": p}
                elif not isinstance(p, dict) or not isinstance(p.get("text"), str):
                    raise RagInputError(f"passages[{i}] holds an item that is neither a string nor a dict with 'text'.")
                check_encodable(p["text"], f"A passage of passages[{i}]")
                items.append(p)
            out.append(items)
        if mode != "concat" and len({len(p) for p in out}) != 1:
            raise RagInputError(
                f"In {mode} mode every question needs the same number of passages; got {[len(p) for p in out]}."
            )
        return out

    def _tensorize(self, prompt_rows, row_answers, answers, for_generation) -> dict:
        gen_tok = self.tokenizer.generator
        pad_id = gen_tok.pad_token_id
        device = self.device
        out = {}
        if self.is_generator_encoder_decoder:
            ids, mask = pad_batch(prompt_rows, pad_id, side="right")
            out["context_input_ids"], out["context_attention_mask"] = ids.to(device), mask.to(device)
            if answers is not None:
                label_rows = [self._answer_ids(a, with_eos=True) for a in answers]
                labels, lmask = pad_batch(label_rows, pad_id, side="right")
                labels[lmask == 0] = -100
                out["labels"] = labels.to(device)
            return out
        if row_answers is None or for_generation:
            ids, mask = pad_batch(prompt_rows, pad_id, side="left" if for_generation else "right")
            out["context_input_ids"], out["context_attention_mask"] = ids.to(device), mask.to(device)
            return out
        seqs, labels = [], []
        for prompt, answer in zip(prompt_rows, row_answers):
            a_ids = self._answer_ids(answer, with_eos=True)
            seqs.append(prompt + a_ids)
            labels.append([-100] * len(prompt) + a_ids)
        # left-padded: every row's answer ends in the last column, so the positions that training computes
        # logits for (`_answer_positions`, the union over rows) span the longest answer, not the spread
        # of context lengths
        ids, mask = pad_batch(seqs, pad_id, side="left")
        lab, _ = pad_batch(labels, -100, side="left")
        out["context_input_ids"], out["context_attention_mask"], out["labels"] = (
            ids.to(device),
            mask.to(device),
            lab.to(device),
        )
        return out

    def _answer_ids(self, answer: str, with_eos: bool) -> list[int]:
        tok = self.tokenizer.generator
        ids = list(
            tok(
                " " + answer.strip() if not self.is_generator_encoder_decoder else answer.strip(),
                add_special_tokens=False,
            )["input_ids"]
        )
        ids = ids[: self.config.max_new_tokens - 1] if with_eos else ids[: self.config.max_new_tokens]
        if with_eos and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return ids

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------
    def _doc_scores(self, question_embeddings, doc_embeddings, doc_scores):
        if question_embeddings is None or doc_embeddings is None:
            return doc_scores
        doc_embeddings = doc_embeddings.to(question_embeddings.dtype)
        if self.config.similarity == "ip":
            return torch.bmm(doc_embeddings, question_embeddings.unsqueeze(-1)).squeeze(-1)
        return -((doc_embeddings - question_embeddings.unsqueeze(1)) ** 2).sum(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        doc_scores: torch.FloatTensor | None = None,
        doc_embeddings: torch.FloatTensor | None = None,
        retrieved_doc_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        question_embeddings: torch.FloatTensor | None = None,
        questions: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        passages: list | None = None,
        n_docs: int | None = None,
        generation_mode: str | None = None,
        rag_state: _RagTokenState | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RagOutput:
        r"""Scores answers given questions and passages.

        Either pass text (`questions`, optional `answers` and `passages`), or the tensors that
        [`prepare_inputs`] returns. With `labels`, `loss` is the answer-token cross-entropy (`concat`)
        or the marginal negative log-likelihood over documents (`rag_sequence` / `rag_token`), whose
        gradient reaches the question encoder through `doc_scores` when `doc_embeddings` are given.
        """
        if rag_state is not None:
            return self._rag_token_step(input_ids, rag_state)
        mode = generation_mode or self.config.generation_mode
        if questions is not None:
            batch = self.prepare_inputs(
                questions, answers, passages=passages, doc_scores=doc_scores, n_docs=n_docs, generation_mode=mode
            )
            batch.pop("passages")
            return self.forward(**batch, generation_mode=mode)
        if context_input_ids is None:
            raise RagInputError(
                "forward needs either questions= (text) or context_input_ids (see RagForGeneration.prepare_inputs)."
            )
        if question_embeddings is None and input_ids is not None and doc_embeddings is not None:
            question_embeddings = self.encode_questions(input_ids, attention_mask)
        scores = self._doc_scores(question_embeddings, doc_embeddings, doc_scores)

        # training: BART-family feed-forward layers recompute their activation in the backward pass
        # instead of keeping it (the largest activations of a step; gradients unchanged)
        recompute = recompute_feed_forward_activations(
            self.generator, enabled=self.training and torch.is_grad_enabled() and labels is not None
        )
        if mode == "concat":
            with recompute:
                logits, loss = self._concat_forward(context_input_ids, context_attention_mask, labels)
            return RagOutput(
                loss=loss,
                logits=logits,
                doc_scores=scores,
                retrieved_doc_ids=retrieved_doc_ids,
                question_embeddings=question_embeddings,
            )

        if scores is None:
            raise RagInputError(f"{mode} mode needs doc_scores (or doc_embeddings and question input_ids).")
        batch_size, n = scores.shape
        if context_input_ids.shape[0] != batch_size * n:
            raise RagInputError(
                f"{mode} mode needs one generator input per document: context_input_ids has "
                f"{context_input_ids.shape[0]} rows, expected batch_size * n_docs = {batch_size * n}."
            )
        with recompute:
            logits, token_logprobs, token_mask = self._per_doc_token_logprobs(
                context_input_ids, context_attention_mask, labels, batch_size, n
            )
        loss = posteriors = None
        if token_logprobs is not None:
            doc_logprobs = torch.log_softmax(scores.float(), dim=-1)  # [B, n]
            tok_lp = token_logprobs.view(batch_size, n, -1)  # [B, n, T]
            mask = token_mask.view(batch_size, n, -1)[:, 0]  # [B, T]
            seq_lp = (tok_lp * mask.unsqueeze(1)).sum(-1)  # [B, n]
            if mode == "rag_sequence":
                nll = -torch.logsumexp(doc_logprobs + seq_lp, dim=-1)
            else:
                per_token = torch.logsumexp(doc_logprobs.unsqueeze(-1) + tok_lp, dim=1)  # [B, T]
                nll = -(per_token * mask).sum(-1)
            loss = nll.mean() if self.config.loss_reduction == "mean" else nll.sum()
            posteriors = torch.softmax(doc_logprobs + seq_lp, dim=-1).detach()
        return RagOutput(
            loss=loss,
            logits=logits,
            doc_scores=scores,
            retrieved_doc_ids=retrieved_doc_ids,
            question_embeddings=question_embeddings,
            doc_posteriors=posteriors,
        )

    def _answer_positions(self, labels) -> torch.Tensor | None:
        """Positions whose logits the training loss needs (those predicting an answer token), or None.

        In training, a decoder-only generator computes logits only there (`logits_to_keep`): the answer
        is a few tokens after a context of hundreds, and the vocabulary projection and its float copy
        over every position cost a fifth of the compute and most of the memory of a step. Outside
        training, or for generators without `logits_to_keep`, logits cover every position.
        """
        if labels is None or not self.training or not self._generator_keeps_logits:
            return None
        return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)

    @property
    def _generator_keeps_logits(self) -> bool:
        generator = self.generator
        base = generator.get_base_model() if hasattr(generator, "get_base_model") else generator  # peft
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def _decoder_only_forward(self, ids, mask, **kwargs):
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.generator(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)

    @staticmethod
    def _length_chunks(mask, chunk_tokens: int | None = None) -> list[tuple[torch.Tensor, int]] | None:
        """Right-padded rows `[R, L]` sorted by length into chunks of about `chunk_tokens` tokens
        (default `ENCODER_CHUNK_TOKENS`).

        Returns `(row_indices, chunk_length)` pairs covering every row once, or None when one batch is as
        good (few tokens, a single chunk, or rows that are not right-padded).
        """
        if mask is None:
            return None
        chunk_tokens = chunk_tokens or ENCODER_CHUNK_TOKENS
        rows, width = mask.shape
        if rows * width <= chunk_tokens:
            return None
        mask_long = mask.long()
        lengths = mask_long.sum(-1)
        if not torch.equal(mask_long.cumprod(-1).sum(-1), lengths):  # not right-padded
            return None
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_lengths = lengths[order].tolist()
        chunks, start = [], 0
        while start < rows:
            length = max(int(sorted_lengths[start]), 1)
            end = min(rows, start + max(1, chunk_tokens // length))
            chunks.append((order[start:end], length))
            start = end
        return chunks if len(chunks) > 1 else None

    def _seq2seq_label_logprobs(self, ids, mask, labels):
        """Teacher-forced encoder-decoder pass: logits `[R, T, V]` and log p(label) `[R, T]` (0 where -100).

        Rows are run in length-sorted chunks (`_length_chunks`), each trimmed to its own longest context,
        so neither the encoder nor the decoder's cross-attention spends compute (or activation memory, in
        training) on padding; the results are put back in row order. Where the generator allows it
        (`_packed_decoder_layers`), only the encoder runs per chunk: the decoder and the LM head then
        run once over all rows, each chunk's rows attending to their own encoder states.
        """
        prepare = getattr(self.generator, "prepare_decoder_input_ids_from_labels", None)
        chunk_tokens = TRAIN_CHUNK_TOKENS if torch.is_grad_enabled() else ENCODER_CHUNK_TOKENS
        chunks = self._length_chunks(mask, chunk_tokens) if prepare is not None else None
        if chunks is None:
            chunks = [(torch.arange(ids.shape[0], device=ids.device), ids.shape[1])]
        decoder_input_ids = prepare(labels=labels) if prepare is not None else None
        encoder = self.generator.get_encoder()
        # with gradients and several chunks, look the embeddings up once: each lookup's backward
        # writes a dense [vocabulary, d] gradient (154 MB for BART-base), once per chunk otherwise
        embeds = decoder_embeds = None
        if prepare is not None and len(chunks) > 1 and torch.is_grad_enabled():
            lookup = _embedding_lookup(encoder)
            embeds = lookup(ids) if lookup is not None else None
            lookup = _embedding_lookup(self.generator.get_decoder())
            decoder_embeds = lookup(decoder_input_ids) if lookup is not None else None

        def decoder_inputs(rows):
            if decoder_embeds is None:
                return {"decoder_input_ids": decoder_input_ids[rows]}
            return {"decoder_inputs_embeds": decoder_embeds[rows]}

        packed_layers = self._packed_decoder_layers() if prepare is not None and len(chunks) > 1 else None
        logits_parts, order, encoder_states, chunk_masks = [], [], [], []
        for idx, length in chunks:
            order.append(idx)
            if prepare is None:  # the generator builds its own decoder inputs (and loss) from labels
                out = self.generator(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx], use_cache=False)
                logits_parts.append(out.logits)
                del out
                continue
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
            logits_parts = [self._packed_decoder_logits(encoder_states, chunk_masks, inputs, packed_layers)]
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

    def _packed_decoder_layers(self) -> dict[int, int] | None:
        """The generator's cross-attention modules when its teacher-forced decoder can run once over all
        length chunks (`grouped_decoding`, packed encoder states), else None.

        Not with activation checkpointing: its recomputation in the backward pass would run the
        cross-attention outside the grouped attention function.
        """
        if not MERGE_DECODE_GROUPS or uses_activation_checkpointing(self.generator):
            return None
        return grouped_cross_attention_modules(self.generator)

    def _packed_decoder_logits(self, encoder_states, chunk_masks, decoder_inputs, layers) -> torch.Tensor:
        """The decoder and LM head once over the rows of all chunks (in chunk order): logits `[R, T, V]`.

        `encoder_states` holds each chunk's encoder output `[chunk rows, chunk width, d]` and `chunk_masks`
        its context mask (or None); the states are packed back to back (no padding between chunks) so that
        each cross-attention layer projects them in one matrix product, and the grouped attention function
        attends each chunk's rows to their own part.
        """
        slices = group_slices([s.shape[:2] for s in encoder_states])
        key_masks = [
            None if m is None or bool(m.all()) else m.bool()[:, None, None, :]  # [rows, 1, 1, width], as SDPA takes
            for m in chunk_masks
        ]
        plan = CrossAttentionPlan(slices=slices, keys_values=None, layers=layers, key_masks=key_masks)
        packed = pack_encoder_states(encoder_states, slices[-1][1])
        with grouped_cross_attention(self.generator, plan):
            out = self.generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=packed),
                attention_mask=None,
                use_cache=False,
                **decoder_inputs,
            )
        _check_served(plan, "teacher-forced decoding")
        return out.logits

    def _encode_context(self, ids, mask) -> BaseModelOutput:
        """The generator's encoder over context rows `[R, L]` (encoder-decoder generators).

        Right-padded rows are sorted by length and encoded in chunks of about `ENCODER_CHUNK_TOKENS`
        tokens, each padded only to its own longest row, so little compute goes to padding; the
        states are put back in row order, `[R, L, d]` (zeros at padded positions, which the
        attention mask hides).
        """
        encoder = self.generator.get_encoder()
        rows, width = ids.shape
        chunks = self._length_chunks(mask)
        if chunks is None:
            return encoder(input_ids=ids, attention_mask=mask, return_dict=True)
        hidden = None
        for idx, length in chunks:
            out = encoder(input_ids=ids[idx, :length], attention_mask=mask[idx, :length], return_dict=True)
            states = out.last_hidden_state
            if hidden is None:
                hidden = states.new_zeros(rows, width, states.shape[-1])
            hidden.index_put_((idx.unsqueeze(1), torch.arange(length, device=ids.device)), states)
        return BaseModelOutput(last_hidden_state=hidden)

    def _seq2seq_forward(self, ids, mask, labels, encoder_states=None):
        """Teacher-forced encoder-decoder forward (no loss computed inside the generator)."""
        if labels is None:
            return self.generator(input_ids=ids, attention_mask=mask, use_cache=False)
        prepare = getattr(self.generator, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            return self.generator(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        if encoder_states is None:
            encoder_states = self._encode_context(ids, mask).last_hidden_state
        return self.generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            attention_mask=mask,
            decoder_input_ids=prepare(labels=labels),
            use_cache=False,
        )

    def _concat_forward(self, ids, mask, labels):
        if self.is_generator_encoder_decoder:
            out = self._seq2seq_forward(ids, mask, labels)
            logits = out.logits
            if labels is None:
                return logits, None
            loss = nn.functional.cross_entropy(
                logits.float().view(-1, logits.shape[-1]),
                labels.view(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
            return logits, loss
        keep = self._answer_positions(labels)
        if keep is None:
            out = self._decoder_only_forward(ids, mask, use_cache=False)
            logits = out.logits
            if labels is None:
                return logits, None
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:]
        else:
            logits = self._decoder_only_forward(ids, mask, use_cache=False, logits_to_keep=keep).logits
            shift_logits, shift_labels = logits.float(), labels[:, keep + 1]
        loss = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.label_smoothing,
        )
        return logits, loss

    def _per_doc_token_logprobs(self, ids, mask, labels, batch_size, n):
        """Log-probabilities of the answer tokens under each document: `[B * n, T]` plus the token mask."""
        if self.is_generator_encoder_decoder:
            if labels is None:
                return self._seq2seq_forward(ids, mask, None).logits, None, None
            if labels.shape[0] == batch_size:
                labels = labels.repeat_interleave(n, dim=0)
            logits, lp = self._seq2seq_label_logprobs(ids, mask, labels)
            return logits, lp, (labels != -100).float()
        keep = self._answer_positions(labels)
        if keep is None:
            logits = self._decoder_only_forward(ids, mask, use_cache=False).logits
            if labels is None:
                return logits, None, None
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        else:
            logits = self._decoder_only_forward(ids, mask, use_cache=False, logits_to_keep=keep).logits
            shift_logits, shift_labels = logits, labels[:, keep + 1]
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

    # ---------------------------------------------------------------------------------------------
    # generation
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str] | str | None = None,
        *,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        passages: Sequence[Sequence[dict | str]] | None = None,
        doc_scores=None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        n_docs: int | None = None,
        generation_mode: str | None = None,
        sequence_decoding: str | None = None,
        return_dict_in_generate: bool = False,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ):
        r"""Generates answers. Returns answer token ids `[B * num_return_sequences, T]` (prompt excluded),
        or a [`RagGenerateOutput`] with `return_dict_in_generate=True`.

        Give `questions` as text (retrieval and packing happen here), or question-encoder `input_ids`
        (decoded back to text for the generator), or pre-packed `context_input_ids` with `doc_scores`.
        `passages` (one list per question) and `doc_scores` replace retrieval, so the model works
        without an index. Generation arguments (`max_new_tokens`, `num_beams`, `do_sample`, `top_p`,
        `num_return_sequences`, ...) are those of transformers' `generate`.
        """
        mode = generation_mode or self.config.generation_mode
        if mode not in ("concat", "rag_sequence", "rag_token"):
            raise RagConfigError(f"generation_mode must be 'concat', 'rag_sequence' or 'rag_token', got {mode!r}.")
        passage_lists = None
        retrieved_ids = None
        doc_embeddings = None
        if context_input_ids is None:
            if questions is None:
                if input_ids is None:
                    raise RagInputError("generate needs questions (text), input_ids or context_input_ids.")
                questions = self.tokenizer.question_encoder.batch_decode(input_ids, skip_special_tokens=True)
            batch = self.prepare_inputs(
                questions,
                passages=passages,
                doc_scores=doc_scores,
                n_docs=n_docs,
                generation_mode=mode,
                for_generation=True,
            )
            context_input_ids = batch["context_input_ids"]
            context_attention_mask = batch["context_attention_mask"]
            doc_scores = batch["doc_scores"]
            retrieved_ids = batch["retrieved_doc_ids"]
            passage_lists = batch["passages"]
            doc_embeddings = batch.get("doc_embeddings")
        else:
            if context_attention_mask is None:
                context_attention_mask = (context_input_ids != self.tokenizer.generator.pad_token_id).long()
            if doc_scores is not None:
                doc_scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=self.device)
        if doc_scores is not None and doc_embeddings is not None and self.config.retrieval == "dense":
            doc_scores = doc_scores.float()
        gen_kwargs = dict(kwargs)
        if generation_config is not None:
            gen_kwargs = {**generation_config.to_diff_dict(), **gen_kwargs}
        gen_kwargs.setdefault("max_new_tokens", self.config.max_new_tokens)
        self._check_generation_length(context_input_ids, gen_kwargs["max_new_tokens"])

        posteriors = seq_scores = None
        # encoder-decoder generators: the contexts are encoded once, and the states reused by every
        # beam, hypothesis and rescoring pass below
        enc = None
        if self.is_generator_encoder_decoder:
            enc = self._encode_context(context_input_ids, context_attention_mask).last_hidden_state
        if mode == "concat":
            sequences = self._generate_concat(context_input_ids, context_attention_mask, gen_kwargs, enc)
        elif mode == "rag_token":
            sequences = self._generate_rag_token(context_input_ids, context_attention_mask, doc_scores, gen_kwargs, enc)
        else:
            sequences, seq_scores = self._generate_rag_sequence(
                context_input_ids, context_attention_mask, doc_scores, gen_kwargs, sequence_decoding, enc
            )
        if mode != "concat" and doc_scores is not None and return_dict_in_generate:
            posteriors = self._answer_posteriors(context_input_ids, context_attention_mask, doc_scores, sequences, enc)
        if not return_dict_in_generate:
            return sequences
        return RagGenerateOutput(
            sequences=sequences,
            doc_scores=doc_scores,
            retrieved_doc_ids=retrieved_ids,
            doc_posteriors=posteriors,
            sequences_scores=seq_scores,
            passages=passage_lists,
        )

    def _check_generation_length(self, context_input_ids, max_new_tokens):
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise RagInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if self.is_generator_encoder_decoder:
            return
        window = generator_window(self.generator.config, self.tokenizer.generator if self.tokenizer else None)
        longest = context_input_ids.shape[1]
        if longest + max_new_tokens > window:
            raise RagInputError(
                f"The longest input has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"generator window of {window}. Lower max_new_tokens, or set config.max_new_tokens to at least "
                f"{max_new_tokens} so packing keeps room for it."
            )

    def _strip_prompt(self, sequences, prompt_length):
        if self.is_generator_encoder_decoder:
            return sequences[:, 1:]
        return sequences[:, prompt_length:]

    def _pad_id(self):
        pad = self.generation_config.pad_token_id
        if pad is None:
            eos = self.generation_config.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        return 0 if pad is None else pad

    def _generate_concat(self, ids, mask, gen_kwargs, encoder_states=None):
        gen_kwargs = self._generation_kwargs(gen_kwargs)
        if encoder_states is not None:
            gen_kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states)
        out = self.generator.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        return self._strip_prompt(out, ids.shape[1])

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        """One GenerationConfig holding the model's defaults updated with the caller's arguments."""
        cfg = GenerationConfig.from_dict(self.generation_config.to_dict())
        cfg.max_length = None
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self._pad_id()
        unused = cfg.update(**gen_kwargs)
        cfg.validate()
        return {"generation_config": cfg, **unused}

    def _generate_rag_sequence(self, ids, mask, doc_scores, gen_kwargs, sequence_decoding, encoder_states=None):
        decoding = sequence_decoding or self.config.sequence_decoding
        if decoding not in ("fast", "thorough"):
            raise RagConfigError(f"sequence_decoding must be 'fast' or 'thorough', got {decoding!r}.")
        batch_size, n = doc_scores.shape
        num_return = gen_kwargs.pop("num_return_sequences", 1) or 1
        num_beams = gen_kwargs.get("num_beams", 1) or 1
        per_doc = max(num_beams, 1) if not gen_kwargs.get("do_sample") else max(num_return, 1)
        gen_kwargs = self._generation_kwargs({**gen_kwargs, "num_return_sequences": per_doc})
        cfg = gen_kwargs["generation_config"]
        greedy = (cfg.num_beams or 1) == 1 and not cfg.do_sample and per_doc == 1
        out, own_lp = self._generate_per_context(ids, mask, gen_kwargs, per_doc, encoder_states, own_scores=greedy)
        cands = self._strip_prompt(out, ids.shape[1])  # [B * n * per_doc, T]
        cands = self._trim_after_eos(cands)
        c = n * per_doc
        doc_logprobs = torch.log_softmax(doc_scores.float(), dim=-1)  # [B, n]
        same = self._same_hypothesis(cands.view(batch_size, c, -1))  # [B, c, c]
        first = ~torch.tril(same, diagonal=-1).any(-1)  # [B, c]: first occurrence of each distinct hypothesis
        if decoding == "thorough":
            # every distinct hypothesis of a question under every document of that question; a repeated
            # hypothesis takes the scores of its first occurrence (the same tokens score the same)
            flat_first = first.reshape(-1)
            unique = flat_first.nonzero().squeeze(-1)  # [U] indices into B * c
            q_of = torch.div(unique, c, rounding_mode="floor")
            cand_rows = cands[unique].repeat_interleave(n, dim=0)  # [U * n, T]
            ctx_index = (q_of.unsqueeze(1) * n + torch.arange(n, device=ids.device)).reshape(-1)  # [U * n]
            if own_lp is None:
                seq_lp_u = self._sequence_logprobs(ids, mask, cand_rows, encoder_states, ctx_index).view(-1, n)
            else:
                # greedy, one hypothesis per document (c == n): a hypothesis that document j produced itself
                # already has its score under j from decoding; rescore only the other pairs
                known = same.reshape(batch_size * c, c)[unique]  # [U, n]
                seq_lp_u = torch.where(
                    known, own_lp.view(batch_size, n)[q_of], torch.zeros_like(known, dtype=torch.float)
                )
                missing = (~known).reshape(-1).nonzero().squeeze(-1)
                if missing.numel():
                    seq_lp_u.view(-1)[missing] = self._sequence_logprobs(
                        ids, mask, cand_rows[missing], encoder_states, ctx_index[missing]
                    )
            position = (flat_first.long().cumsum(0) - 1).view(batch_size, c)  # row of each first occurrence
            first_of = same.long().argmax(-1)  # [B, c]: index of the first identical hypothesis
            seq_lp = seq_lp_u[position.gather(1, first_of)]  # [B, c, n]
            marginal = torch.logsumexp(doc_logprobs.unsqueeze(1) + seq_lp, dim=-1)  # [B, c]
        else:
            # each hypothesis under the document that produced it; identical hypotheses pool their mass
            ctx_index = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(per_doc)
            if own_lp is not None:  # greedy: each hypothesis was scored under its document while decoding
                seq_lp = own_lp.view(batch_size, c)
            else:
                seq_lp = self._sequence_logprobs(ids, mask, cands, encoder_states, ctx_index).view(batch_size, c)
            joint = doc_logprobs.repeat_interleave(per_doc, dim=1) + seq_lp  # [B, c]
            marginal = torch.logsumexp(joint.unsqueeze(1).masked_fill(~same, float("-inf")), dim=-1)
        cands = cands.view(batch_size, c, -1)
        # keep distinct hypotheses only, then the best num_return of each question
        ranked = marginal.masked_fill(~first, float("-inf"))
        k = min(num_return, c)
        top = ranked.topk(k, dim=-1)
        picked = cands.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, cands.shape[-1]))
        return picked.reshape(batch_size * k, -1), top.values.reshape(-1)

    def _generate_per_context(self, ids, mask, gen_kwargs, per_doc, encoder_states=None, own_scores=False):
        """The generator's own `generate` on every context row, `per_doc` sequences each, in row order.

        For an encoder-decoder generator decoding deterministically (greedy or beam), rows run in groups
        of similar context length (`_length_groups`), each trimmed to its own longest context, so the
        cross-attention of every step reads no padding; the sequences are padded back to one length.
        With `own_scores` (greedy), also returns each sequence's log-likelihood under its own context, from
        the raw logits of decoding (what `_sequence_logprobs` would recompute); otherwise None.
        """
        cfg = gen_kwargs["generation_config"]
        groups = [(torch.arange(ids.shape[0], device=ids.device), ids.shape[1])]
        if self.is_generator_encoder_decoder and not cfg.do_sample:
            groups = self._length_groups(mask, n_docs=1, expand=1)
        vocab = self.generator.get_output_embeddings().weight.shape[0]
        largest = max(len(idx) for idx, _ in groups) * per_doc * (cfg.max_new_tokens or 1) * vocab
        own_scores = own_scores and largest <= OWN_SCORES_MAX_LOGITS  # the step logits are held until the end
        if own_scores:
            own_cfg = copy.deepcopy(cfg)
            own_cfg.output_logits = own_cfg.return_dict_in_generate = True
        pieces, rows, scores = [], [], []
        for idx, width in groups:
            kwargs = dict(gen_kwargs)
            if encoder_states is not None:
                kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states[idx, :width])
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
                scores.append((lp * self._answer_token_mask(tokens)).sum(-1))
                out = out.sequences
            pieces.append(out)
            rows.append((idx.unsqueeze(1) * per_doc + torch.arange(per_doc, device=idx.device)).reshape(-1))
        if len(groups) == 1:
            return pieces[0], (scores[0] if own_scores else None)
        length = max(p.shape[1] for p in pieces)
        out = pieces[0].new_full((ids.shape[0] * per_doc, length), self._pad_id())
        own = torch.zeros(ids.shape[0] * per_doc, device=ids.device) if own_scores else None
        for i, (piece, r) in enumerate(zip(pieces, rows)):
            out[r, : piece.shape[1]] = piece
            if own_scores:
                own[r] = scores[i]
        return out, own

    def _answer_token_mask(self, answer_ids):
        """True for answer tokens up to and including the first eos (padding after it is ignored)."""
        pad = self._pad_id()
        eos = self.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        is_eos = torch.zeros_like(answer_ids, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= answer_ids == e
        before_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        return before_eos & ((answer_ids != pad) | is_eos)

    def _trim_after_eos(self, seqs):
        eos = self.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if not eos_ids:
            return seqs
        is_eos = torch.zeros_like(seqs, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= seqs == e
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        return seqs.masked_fill(after, self._pad_id())

    @staticmethod
    def _same_hypothesis(cands):
        """`[B, c, c]`: whether hypotheses i and j of a question are the same token sequence."""
        return (cands.unsqueeze(2) == cands.unsqueeze(1)).all(-1)

    def _sequence_logprobs(self, ctx_ids, ctx_mask, answer_ids, encoder_states=None, ctx_index=None):
        """Sum of log p(answer tokens | context) for each answer row; answers are right-padded with pad/eos.

        Answer row `i` is scored under context row `ctx_index[i]` (default: row `i`). For an
        encoder-decoder generator the encoder states of the contexts (`encoder_states`, computed here
        when not given) are reused for every answer, and the decoder runs in chunks.
        """
        ans_mask = self._answer_token_mask(answer_ids)
        if self.is_generator_encoder_decoder:
            labels = answer_ids.masked_fill(~ans_mask, -100)
            if encoder_states is None:
                encoder_states = self._encode_context(ctx_ids, ctx_mask).last_hidden_state
            if ctx_index is None:
                ctx_index = torch.arange(answer_ids.shape[0], device=answer_ids.device)
            vocab = self.generator.get_output_embeddings().weight.shape[0]
            step = max(1, RESCORE_CHUNK_LOGITS // max(1, labels.shape[1] * vocab))
            # answers sorted by the length of their context, so that each chunk's cross-attention covers
            # only its own longest (right-padded) context
            mask_long = ctx_mask.long()
            ctx_lengths = mask_long.sum(-1)
            right_padded = torch.equal(mask_long.cumprod(-1).sum(-1), ctx_lengths)
            order = torch.argsort(ctx_lengths[ctx_index], stable=True) if right_padded else None
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
                out = self._seq2seq_forward(
                    ctx_ids[rows, :width], ctx_mask[rows, :width], lab, encoder_states=encoder_states[rows, :width]
                )
                lp = torch.log_softmax(out.logits.float(), -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                sums[answer_rows] = (lp * ans_mask[answer_rows]).sum(-1)
            return sums
        if ctx_index is not None:
            ctx_ids, ctx_mask = ctx_ids[ctx_index], ctx_mask[ctx_index]
        # decoder-only: left-padded context followed by the answer
        ids = torch.cat([ctx_ids, answer_ids], dim=1)
        mask = torch.cat([ctx_mask, ans_mask.long()], dim=1)
        out = self._decoder_only_forward(ids, mask, use_cache=False)
        logits = out.logits[:, ctx_ids.shape[1] - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        return (lp * ans_mask).sum(-1)

    def _answer_posteriors(self, ids, mask, doc_scores, sequences, encoder_states=None):
        """p(document | question, answer) for the first returned answer of each question."""
        batch_size, n = doc_scores.shape
        per_q = sequences.shape[0] // batch_size
        first = sequences.view(batch_size, per_q, -1)[:, 0]
        first = self._trim_after_eos(first)
        seq_lp = self._sequence_logprobs(ids, mask, first.repeat_interleave(n, dim=0), encoder_states).view(
            batch_size, n
        )
        return torch.softmax(torch.log_softmax(doc_scores.float(), -1) + seq_lp, dim=-1)

    def _generate_rag_token(self, ids, mask, doc_scores, gen_kwargs, encoder_states=None):
        batch_size, n = doc_scores.shape
        start = None
        if self.is_generator_encoder_decoder:
            start = self.generator.config.decoder_start_token_id
            if start is None:
                start = self.generator.config.pad_token_id
        # a placeholder first token for GenerationMixin, removed from the output; not pad, so that no
        # padding is suspected
        placeholder = self.generation_config.bos_token_id
        if placeholder is None or placeholder == self._pad_id():
            placeholder = 1 if self._pad_id() != 1 else 2
        state = _RagTokenState(
            ids.view(batch_size, n, -1),
            mask.view(batch_size, n, -1),
            torch.log_softmax(doc_scores.float(), dim=-1),
            n,
            self.is_generator_encoder_decoder,
            start,
        )
        state.encoder_states = encoder_states
        dummy = torch.full((batch_size, 1), placeholder, dtype=torch.long, device=self.device)
        gen_kwargs = self._generation_kwargs({**gen_kwargs, "use_cache": False})  # the cache lives in rag_state
        out = GenerationMixin.generate(self, input_ids=dummy, rag_state=state, **gen_kwargs)
        return out[:, 1:]

    def prepare_inputs_for_generation(self, input_ids, rag_state=None, **kwargs):
        if rag_state is None:
            raise RagInputError("RagForGeneration.generate drives generation; call it rather than GenerationMixin.")
        return {"input_ids": input_ids, "rag_state": rag_state}

    @staticmethod
    def _length_groups(mask, n_docs: int, expand: int) -> list[tuple[torch.Tensor, int]]:
        """Groups the decoding rows by the length of their context: `[(row indices, group width)]`.

        `mask` `[B * n, L]` holds the right-padded contexts; decoding row `(q * expand + e) * n + j`
        (question q, beam e, document j) reads context `q * n + j`. The contexts are split by length,
        so all beams of one context, which may trade places, stay in one group.
        """
        contexts, width = mask.shape
        device = mask.device
        every = [(torch.arange(contexts * expand, device=device), width)]
        n_groups = min(DECODE_GROUPS, contexts * expand // DECODE_GROUP_MIN_ROWS, contexts)
        if n_groups < 2:
            return every
        mask_long = mask.long()
        lengths = mask_long.sum(-1)
        if not torch.equal(mask_long.cumprod(-1).sum(-1), lengths):
            return every
        order = torch.argsort(lengths, stable=True)
        beams = torch.arange(expand, device=device)
        groups = []
        for part in torch.tensor_split(order, n_groups):
            q, j = torch.div(part, n_docs, rounding_mode="floor"), part % n_docs
            idx = ((q.unsqueeze(1) * expand + beams) * n_docs + j.unsqueeze(1)).reshape(-1).sort().values
            groups.append((idx, max(int(lengths[part].max()), 1)))
        return groups

    def _rag_token_step_seq2seq(self, input_ids, state: _RagTokenState):
        """The generator's next-token logits `[rows * n, V]` for an encoder-decoder generator.

        The `[B * n]` contexts are encoded once (beams share their question's states); the first step
        runs the rows in groups of similar context length, each with its own cache; later steps run
        the groups as one batch where the generator allows it (`_merge_decode_groups`), else group
        by group.
        """
        rows = input_ids.shape[0]
        n = state.n_docs
        device = input_ids.device
        if state.groups is None:
            expand = rows // state.doc_logprobs.shape[0]
            state.expand = expand
            state.doc_logprobs = state.doc_logprobs.repeat_interleave(expand, dim=0)
            ctx_mask = state.context_mask.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
            base = state.encoder_states
            if base is None:
                flat_ids = state.context_ids.reshape(-1, state.context_ids.shape[-1])
                flat_mask = state.context_mask.reshape(-1, state.context_mask.shape[-1])
                base = self._encode_context(flat_ids, flat_mask).last_hidden_state
                state.encoder_states = base
            if expand > 1:
                base = base.view(-1, n, *base.shape[1:]).repeat_interleave(expand, dim=0)
                base = base.reshape(rows * n, *base.shape[2:])
            state.groups = []
            state.local_pos = torch.empty(rows * n, dtype=torch.long, device=device)
            flat_mask = state.context_mask.reshape(-1, state.context_mask.shape[-1])
            for idx, width in self._length_groups(flat_mask, n, expand):
                state.local_pos[idx] = torch.arange(len(idx), device=device)
                if len(idx) == rows * n and width == ctx_mask.shape[1]:
                    states, mask = base, ctx_mask
                else:
                    states, mask = base[idx, :width], ctx_mask[idx, :width]
                state.groups.append([idx, BaseModelOutput(last_hidden_state=states), mask, None])
            token = torch.full((rows * n, 1), state.start_id, dtype=torch.long, device=device)
        else:
            row_idx = self._reordered_rows(input_ids, state)
            if state.merged is not None:
                return self._rag_token_step_merged(input_ids, state, row_idx)
            if row_idx is not None:
                # a row's source holds the same document of the same question, so it is in the same group
                for g in state.groups:
                    g[3].reorder_cache(state.local_pos[row_idx[g[0]]])
            token = input_ids[:, -1:].repeat_interleave(n, dim=0)
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
            g[3] = out.cache if hasattr(out, "cache") else out.past_key_values
            if len(state.groups) == 1:
                logits = out.logits[:, -1]
            else:
                if logits is None:
                    logits = out.logits.new_empty(rows * n, out.logits.shape[-1])
                logits[idx] = out.logits[:, -1]
        if len(state.groups) > 1 and input_ids.shape[1] == 1 and MERGE_DECODE_GROUPS:
            state.merged = self._merge_decode_groups(state)
        return logits

    @staticmethod
    def _reordered_rows(input_ids, state: _RagTokenState) -> torch.Tensor | None:
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

    def _merge_decode_groups(self, state: _RagTokenState) -> _MergedDecoding | None:
        """After the first step: the length groups as one batch, or None if the generator does not allow it."""
        layers = grouped_cross_attention_modules(self.generator)
        if layers is None:
            return None
        groups = state.groups
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
        return _MergedDecoding(cache, plan, order, mask, stand_in)

    def _rag_token_step_merged(self, input_ids, state: _RagTokenState, row_idx) -> torch.Tensor:
        """A decoding step of the merged groups: `[rows * n, V]` next-token logits in row order."""
        merged = state.merged
        if row_idx is not None:
            merged.cache.self_attention_cache.reorder_cache(merged.position[row_idx[merged.order]])
        token = input_ids[:, -1:].repeat_interleave(state.n_docs, dim=0)[merged.order]
        with grouped_cross_attention(self.generator, merged.plan):
            out = self.generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=merged.encoder_states),
                attention_mask=merged.mask,
                decoder_input_ids=token,
                cache=merged.cache,
                use_cache=True,
            )
        _check_served(merged.plan, "RAG-Token decoding")
        merged.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].index_select(0, merged.position)

    def _rag_token_step(self, input_ids, state: _RagTokenState) -> RagOutput:
        """One RAG-Token decoding step: log p(y_t | x, y_<t) = logsumexp_d log p(d|x) + log p(y_t | x, d, y_<t)."""
        rows = input_ids.shape[0]
        n = state.n_docs
        if state.is_encoder_decoder:
            logits = self._rag_token_step_seq2seq(input_ids, state)
            state.prev_ids = input_ids
            return RagOutput(logits=_token_marginal(logits, state.doc_logprobs).unsqueeze(1))
        if state.cache is None:
            expand = rows // state.doc_logprobs.shape[0]
            state.expand = expand
            ctx = state.context_ids.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
            ctx_mask = state.context_mask.repeat_interleave(expand, dim=0).reshape(rows * n, -1)
            state.doc_logprobs = state.doc_logprobs.repeat_interleave(expand, dim=0)
            positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.generator(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True)
            state.mask = ctx_mask
            state.positions = positions[:, -1:]
            state.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        else:
            row_idx = self._reordered_rows(input_ids, state)  # beams may have been reordered
            if row_idx is not None:
                state.cache.reorder_cache(row_idx)
                state.mask = state.mask.index_select(0, row_idx)
                if state.positions is not None:
                    state.positions = state.positions.index_select(0, row_idx)
            token = input_ids[:, -1:].repeat_interleave(n, dim=0)
            state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
            state.positions = state.positions + 1
            out = self.generator(
                input_ids=token,
                attention_mask=state.mask,
                position_ids=state.positions,
                cache=state.cache,
                use_cache=True,
            )
            state.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        state.prev_ids = input_ids
        return RagOutput(logits=_token_marginal(out.logits[:, -1], state.doc_logprobs).unsqueeze(1))

    # ---------------------------------------------------------------------------------------------
    # the friendly path: questions in, answers with sources out
    # ---------------------------------------------------------------------------------------------
    def answer(
        self,
        questions: Sequence[str] | str,
        *,
        passages: Sequence[Sequence[dict | str]] | None = None,
        doc_scores=None,
        n_docs: int | None = None,
        generation_mode: str | None = None,
        abstention_threshold: float | None = None,
        streamer=None,
        **generate_kwargs,
    ) -> list[RagAnswer]:
        """Answers each question and returns the text with its sources (id, title, score, posterior),
        whether the model abstained ("the documents don't say") and its confidence.

        `abstention_threshold` replaces the config's calibrated threshold for this call (0: abstain only
        when the reader itself says the documents don't answer). `streamer` (e.g. transformers'
        `TextIteratorStreamer(tokenizer.generator, skip_prompt=True)`) receives the answer's tokens as they
        are generated; it takes one question at a time.
        """
        from .abstention import judge_answers, recorder_for

        questions = self._check_questions(questions)
        if streamer is not None:
            if len(questions) != 1:
                raise RagInputError(f"A streamer follows one answer: pass one question, got {len(questions)}.")
            generate_kwargs["streamer"] = streamer
        recorder = recorder_for(self, generation_mode or self.config.generation_mode, generate_kwargs)
        out = self.generate(
            questions,
            passages=passages,
            doc_scores=doc_scores,
            n_docs=n_docs,
            generation_mode=generation_mode,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        per_q = out.sequences.shape[0] // len(questions)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        firsts = [texts[i * per_q] for i in range(len(questions))]
        abstained, confidence, signals = judge_answers(
            self, questions, firsts, out, recorder, per_q, abstention_threshold
        )
        signal_rows = signals.to_rows()
        answers = []
        for i, q in enumerate(questions):
            sources = []
            for rank, p in enumerate(out.passages[i]):
                score = float(out.doc_scores[i, rank]) if out.doc_scores is not None else float("nan")
                post = float(out.doc_posteriors[i, rank]) if out.doc_posteriors is not None else None
                sources.append(
                    RagSource(
                        id=str(p.get("id")) if p.get("id") is not None else f"passage-{rank + 1}",
                        title=p.get("title") or "",
                        text=p.get("text") or "",
                        score=score,
                        source=p.get("source"),
                        rank=rank + 1,
                        posterior=post,
                    )
                )
            answers.append(
                RagAnswer(
                    question=q,
                    answer=self.config.no_answer_text if abstained[i] else firsts[i],
                    sources=sources,
                    abstained=bool(abstained[i]),
                    confidence=float(confidence[i]),
                    reader_answer=firsts[i] if abstained[i] else None,
                    signals=signal_rows[i],
                )
            )
        return answers

    # ---------------------------------------------------------------------------------------------
    # construction, saving, loading
    # ---------------------------------------------------------------------------------------------
    @classmethod
    @quiet_library_output()
    def from_pretrained_question_encoder_generator(
        cls,
        question_encoder_name_or_path: str,
        generator_name_or_path: str,
        context_encoder_name_or_path: str | None = None,
        *,
        retriever=None,
        dtype: torch.dtype | None = None,
        reader_adapter: str | os.PathLike | None = "auto",
        **config_kwargs,
    ) -> RagForGeneration:
        """Builds a model from two existing checkpoints (local folders or Hub ids), with their tokenizers.

        `reader_adapter`: a reader folder (a LoRA adapter trained for this generator, `modeling_rag.readers`)
        merged into the generator, with the settings it was trained and calibrated with; ``"auto"`` (default)
        applies the reader the package ships for the default generator (SmolLM2-135M-Instruct), when the
        generator is that one; ``None`` keeps the generator untuned.
        """
        qe = AutoModel.from_pretrained(question_encoder_name_or_path, dtype=dtype)
        gen_config = AutoConfig.from_pretrained(generator_name_or_path)
        auto = AutoModelForSeq2SeqLM if getattr(gen_config, "is_encoder_decoder", False) else AutoModelForCausalLM
        try:
            gen = auto.from_pretrained(generator_name_or_path, dtype=dtype)
        except ValueError as err:
            raise RagConfigError(
                f"generator: {generator_name_or_path} has no language-model head usable by {auto.__name__}."
            ) from err
        ce = (
            AutoModel.from_pretrained(context_encoder_name_or_path, dtype=dtype)
            if context_encoder_name_or_path
            else None
        )
        config = RagConfig.from_question_encoder_generator_configs(
            qe.config, gen.config, ce.config if ce is not None else None, **config_kwargs
        )
        config.question_encoder._name_or_path = str(question_encoder_name_or_path)
        config.generator._name_or_path = str(generator_name_or_path)
        tokenizer = RagTokenizer(
            AutoTokenizer.from_pretrained(question_encoder_name_or_path),
            AutoTokenizer.from_pretrained(generator_name_or_path),
        )
        model = cls(config, question_encoder=qe, generator=gen, context_encoder=ce, tokenizer=tokenizer)
        reader = _reader_folder(reader_adapter, generator_name_or_path)
        if reader is not None:
            from .readers import apply_reader

            apply_reader(model, reader)
            model.config.update(config_kwargs)  # the caller's settings win over the reader's
            model.config.validate_rag()
        if retriever is not None:
            model.set_retriever(retriever)
        return model

    @quiet_library_output()
    def save_pretrained(self, save_directory: str | os.PathLike, *, save_index: bool = True, **kwargs):
        """Saves config, safetensors weights, tokenizers and the index (in `config.index_path`).

        Everything is written into a staging folder first and then swapped in with a journal, so a
        process killed mid-save leaves the previous model (restored on the next load), never a mix;
        files of your own in the folder are kept.
        """
        if kwargs.pop("safe_serialization", True) is False:
            raise RagInputError("RagForGeneration saves weights only as safetensors (no pickle).")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise RagInputError(f"save_pretrained needs a folder, but {save_directory} is a file.")
        staging = new_staging_folder(save_directory)
        saves_index = save_index and self.retriever is not None and self.config.index_repo_id is None
        record_saved_parts(self.config, tokenizer=self.tokenizer is not None, index=saves_index)
        try:
            super().save_pretrained(staging, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            if saves_index:
                self.retriever.save(os.path.join(staging, self.config.index_path))
            if self.reranker is not None:
                self.reranker.save(os.path.join(staging, self.config.reranker))
            commit_staged_folder(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Publishes the whole model (weights, tokenizers, index, model card) in one commit; returns its URL."""
        from .hub_utils import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)

    @classmethod
    @quiet_library_output()
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        load_index: bool = True,
        mmap_index: bool = False,
        verify_index: bool = True,
        **kwargs,
    ) -> RagForGeneration:
        """Loads a saved model from a local folder or a Hub repo (pinned with `revision`), with its
        tokenizers and index. `load_index=False` skips the index; `mmap_index=True` memory-maps it."""
        from .hub_utils import resolve_model_folder

        if kwargs.pop("trust_remote_code", False):
            raise RagConfigError(
                "RagForGeneration never runs code from a model repo, so trust_remote_code is refused. "
                "Everything a RAG model needs loads from config, safetensors and data files."
            )
        folder = resolve_model_folder(
            os.fspath(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        if os.path.exists(os.path.join(folder, JOURNAL_NAME)):
            # a save_pretrained was killed half-way: put the previous files back first
            recover_interrupted_commit(folder)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise OSError(f"{pretrained_model_name_or_path} has no {CONFIG_NAME}; it is not a saved RAG model.")
        check_saved_model(folder, load_index=load_index)  # a broken folder is refused now, not at the first question
        model = super().from_pretrained(folder, *model_args, **kwargs)
        if os.path.isdir(os.path.join(folder, QUESTION_ENCODER_TOKENIZER_DIR)) and os.path.isdir(
            os.path.join(folder, GENERATOR_TOKENIZER_DIR)
        ):
            model.set_tokenizer(RagTokenizer.from_pretrained(folder))
        if model.config.reranker is not None:
            from .reranker import load_model_reranker

            load_model_reranker(model, folder)
        if load_index:
            model._load_index(
                folder,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                mmap=mmap_index,
                verify=verify_index,
            )
        return model

    def _load_index(self, folder, *, cache_dir, token, local_files_only, mmap, verify):
        from .hub_utils import resolve_model_folder

        c = self.config
        if c.index_repo_id:
            index_folder = resolve_model_folder(
                c.index_repo_id,
                revision=c.index_revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                repo_type=c.index_repo_type,
            )
        else:
            index_folder = os.path.join(folder, c.index_path)
            if not os.path.isdir(index_folder):
                return
        from .retrieval_rag import RagRetriever

        retriever = RagRetriever.load(
            index_folder,
            mmap=mmap,
            verify_checksums=verify,
            expected_dim=c.retrieval_vector_size,
            expected_fingerprint=weights_fingerprint(self.passage_encoder) if verify else None,
        )
        self.set_retriever(retriever, check_fingerprint=False)


def _reader_folder(reader_adapter, generator_name_or_path) -> str | None:
    """The reader folder `from_pretrained_question_encoder_generator` applies (``None``: none)."""
    if reader_adapter is None:
        return None
    if reader_adapter == "auto":
        from .assets import DEFAULT_GENERATOR, is_default_generator
        from .readers import shipped_reader_path

        return shipped_reader_path(DEFAULT_GENERATOR) if is_default_generator(generator_name_or_path) else None
    return os.fspath(reader_adapter)


AutoModel.register(RagConfig, RagForGeneration, exist_ok=True)

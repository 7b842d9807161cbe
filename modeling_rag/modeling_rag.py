"""RagForGeneration: a question encoder, a generator and an index, as one transformers model.

The class is a facade. It holds the parts (question encoder, generator, optional context encoder,
retriever, tokenizer) and saves and loads them; the work of a call is done elsewhere:

- `inputs.py`: questions (and answers) to a batch of tensors, retrieving and packing passages;
- `modes/`: the RAG mode of the call (`concat`, `rag_sequence`, `rag_token`), its loss and its generation;
- `generators/`: how the generator is driven (decoder-only or encoder-decoder), with the speed
  options of the call (`speedups/`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence

import torch
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

from . import inputs
from .configuration_rag import RagConfig
from .constants import CONFIG_NAME, GENERATOR_TOKENIZER_DIR, QUESTION_ENCODER_TOKENIZER_DIR
from .context import ContextPacker
from .encoders import encoder_forward, weights_fingerprint
from .errors import IndexMismatchError, RagConfigError, RagInputError
from .generators import GeneratorRunner, runner_for
from .library_output import quiet_library_output
from .modeling_outputs import RagAnswer, RagGenerateOutput, RagOutput, RagSource
from .modes import MODES, RagMode, RagTokenState
from .passage_tokens import tokenizer_fingerprint
from .saved_model import check_saved_model, record_saved_parts
from .speedups import RagSpeedOptions
from .tokenization_rag import RagTokenizer
from .utils.atomic import JOURNAL_NAME, commit_staged_folder, new_staging_folder, recover_interrupted_commit
from .utils.similarity import per_question_scores

logger = logging.getLogger(__name__)


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
        return inputs.packer_for(self)

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
        return inputs.tokenize_questions(self, questions)

    def _check_questions(self, questions) -> list[str]:
        return inputs.check_questions(questions)

    @torch.no_grad()
    def retrieve(self, questions: Sequence[str] | str, n_docs: int | None = None):
        """Retrieves passages for `questions` with the attached retriever. Returns a `RetrievalOutput`."""
        questions = inputs.check_questions(questions)
        if self.retriever is None:
            raise RagInputError(inputs._NO_INDEX)
        return inputs.retrieve(self, questions, inputs.check_n_docs(n_docs, self.config.n_docs))

    def set_reranker(self, reranker) -> None:
        """Attaches a [`CrossEncoderReranker`] (or detaches with `None`); it is saved in `config.reranker`."""
        from .reranker import attach_reranker

        attach_reranker(self, reranker)

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
    ) -> inputs.RagBatch:
        """Retrieves (unless `passages` are given), packs and tokenises a batch.

        Returns a [`RagBatch`] for `model(**batch)`: question-encoder `input_ids` / `attention_mask`,
        generator `context_input_ids` / `context_attention_mask` (`[B, L]` in `concat` mode,
        `[B * n_docs, L]` in the marginalised modes), `doc_scores` `[B, n_docs]`, `doc_embeddings`
        `[B, n_docs, d]` (when an index is attached), `retrieved_doc_ids` `[B, n_docs]` and `labels`
        (with `answers`); the passage dicts used are `batch.passages`, not a key.
        """
        return inputs.prepare_inputs(
            self,
            questions,
            answers,
            passages=passages,
            doc_scores=doc_scores,
            n_docs=n_docs,
            generation_mode=generation_mode,
            for_generation=for_generation,
        )

    def clear_caches(self) -> None:
        """Drops the context packer and its cache of tokenised passages; the next call builds it afresh
        (after a change the packer cannot see, such as the generator's window)."""
        self._packer = None
        self._packer_key = None

    # ---------------------------------------------------------------------------------------------
    # a call's mode and generator runner
    # ---------------------------------------------------------------------------------------------
    def runner(self, speed_options: RagSpeedOptions | None = None) -> GeneratorRunner:
        """The generator runner with `speed_options` (default: `config.speed_options`)."""
        speed = self.config.speed_options if speed_options is None else speed_options
        if not isinstance(speed, RagSpeedOptions):
            raise RagInputError(f"speed_options must be a RagSpeedOptions, got {type(speed).__name__}.")
        return runner_for(self, speed)

    def mode(self, generation_mode: str | None = None, speed_options: RagSpeedOptions | None = None) -> RagMode:
        """The [`RagMode`] object of `generation_mode` (default: `config.generation_mode`)."""
        name = generation_mode or self.config.generation_mode
        if name not in MODES:
            raise RagConfigError(f"generation_mode must be one of {list(MODES)}, got {name!r}.")
        return MODES[name](self, self.runner(speed_options))

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------
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
        speed_options: RagSpeedOptions | None = None,
        rag_state: RagTokenState | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RagOutput:
        r"""Scores answers given questions and passages.

        Either pass text (`questions`, optional `answers` and `passages`), or the tensors that
        [`prepare_inputs`] returns. With `labels`, `loss` is the answer-token cross-entropy (`concat`)
        or the marginal negative log-likelihood over documents (`rag_sequence` / `rag_token`), whose
        gradient reaches the question encoder through `doc_scores` when `doc_embeddings` are given.
        `speed_options` replaces `config.speed_options` for this call.
        """
        if rag_state is not None:  # a RAG-Token decoding step, called by GenerationMixin
            return RagOutput(logits=rag_state.next_token_logprobs(input_ids).unsqueeze(1))
        mode = self.mode(generation_mode, speed_options)
        if questions is not None:
            batch = self.prepare_inputs(
                questions, answers, passages=passages, doc_scores=doc_scores, n_docs=n_docs, generation_mode=mode.name
            )
            return self.forward(**batch, generation_mode=mode.name, speed_options=speed_options)
        if context_input_ids is None:
            raise RagInputError(
                "forward needs either questions= (text) or context_input_ids (see RagForGeneration.prepare_inputs)."
            )
        if question_embeddings is None and input_ids is not None and doc_embeddings is not None:
            question_embeddings = self.encode_questions(input_ids, attention_mask)
        scores = doc_scores
        if question_embeddings is not None and doc_embeddings is not None:
            # recomputed from the question vectors, so the loss trains the question encoder too
            scores = per_question_scores(question_embeddings, doc_embeddings, self.config.similarity)
        logits, loss, posteriors = mode.forward(context_input_ids, context_attention_mask, labels, scores)
        return RagOutput(
            loss=loss,
            logits=logits,
            doc_scores=scores,
            retrieved_doc_ids=retrieved_doc_ids,
            question_embeddings=question_embeddings,
            doc_posteriors=posteriors,
        )

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
        speed_options: RagSpeedOptions | None = None,
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
        `num_return_sequences`, ...) are those of transformers' `generate`; `speed_options` replaces
        `config.speed_options` for this call.
        """
        mode = self.mode(generation_mode, speed_options)
        passage_lists = retrieved_ids = None
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
                generation_mode=mode.name,
                for_generation=True,
            )
            context_input_ids, context_attention_mask = batch["context_input_ids"], batch["context_attention_mask"]
            doc_scores, retrieved_ids, passage_lists = batch["doc_scores"], batch["retrieved_doc_ids"], batch.passages
        else:
            if context_attention_mask is None:
                context_attention_mask = (context_input_ids != self.tokenizer.generator.pad_token_id).long()
            if doc_scores is not None:
                doc_scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=self.device)
        gen_kwargs = dict(kwargs)
        if generation_config is not None:
            gen_kwargs = {**generation_config.to_diff_dict(), **gen_kwargs}
        gen_kwargs.setdefault("max_new_tokens", self.config.max_new_tokens)
        runner = mode.runner
        runner.check_generation_length(context_input_ids, gen_kwargs["max_new_tokens"])
        # encoder-decoder generators: the contexts are encoded once, and the states reused by every
        # beam, hypothesis and rescoring pass
        states = runner.encode_context(context_input_ids, context_attention_mask)
        sequences, seq_scores = mode.generate(
            context_input_ids, context_attention_mask, doc_scores, gen_kwargs, states, sequence_decoding
        )
        if not return_dict_in_generate:
            return sequences
        posteriors = None
        if doc_scores is not None:
            posteriors = mode.answer_posteriors(
                context_input_ids, context_attention_mask, doc_scores, sequences, states
            )
        return RagGenerateOutput(
            sequences=sequences,
            doc_scores=doc_scores,
            retrieved_doc_ids=retrieved_ids,
            doc_posteriors=posteriors,
            sequences_scores=seq_scores,
            passages=passage_lists,
        )

    def prepare_inputs_for_generation(self, input_ids, rag_state=None, **kwargs):
        if rag_state is None:
            raise RagInputError("RagForGeneration.generate drives generation; call it rather than GenerationMixin.")
        return {"input_ids": input_ids, "rag_state": rag_state}

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
        from .abstention import decline_before_generating, judge_answers, recorder_for

        questions = self._check_questions(questions)
        if streamer is not None:
            if len(questions) != 1:
                raise RagInputError(f"A streamer follows one answer: pass one question, got {len(questions)}.")
            declined = (
                None
                if passages is not None
                else decline_before_generating(self, questions[0], n_docs, abstention_threshold)
            )
            if declined is not None:  # nothing the reader could guess reaches the stream
                if hasattr(streamer, "on_finalized_text"):
                    streamer.on_finalized_text(declined.answer, stream_end=True)
                else:
                    streamer.end()
                return [declined]
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
                sources.append(RagSource.from_passage(p, rank + 1, score, post))
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

"""RagForGeneration: a question encoder, a generator and an index, as one transformers model.

The class is a facade. It holds the parts (question encoder, generator, optional context encoder,
retriever, tokenizer) and saves and loads them; the work of a call is done elsewhere:

- `inputs.py`: questions (and answers) to a batch of tensors, retrieving and packing passages;
- `modes/`: the RAG mode of the call (`concat`, `rag_sequence`, `rag_token`), its loss and its generation;
- `generators/`: how the generator is driven (decoder-only or encoder-decoder), with the speed
  options of the call (`speedups/`);
- `answering.py`: `answer()`, from questions to `RagAnswer`s with sources and abstention;
- `model_parts.py`: the checks made when a tokenizer or an index is attached, and `build_index`;
- `model_io.py`: building from two checkpoints, the journaled save, loading a saved folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)

from . import inputs
from .configuration_rag import RagConfig
from .context import ContextPacker
from .encoders import encoder_forward
from .errors import RagConfigError, RagInputError
from .generators import GeneratorRunner, runner_for
from .library_output import quiet_library_output
from .model_io import attach_saved_parts, build_from_checkpoints, open_saved_folder, save_model
from .model_parts import (
    build_model_index,
    check_index_fits,
    check_tokenizer_fits,
    default_generation_config,
    store_model_passage_tokens,
)
from .modeling_outputs import RagAnswer, RagGenerateOutput, RagOutput
from .modes import MODES, RagMode, RagTokenState
from .speedups import RagSpeedOptions
from .tokenization_rag import RagTokenizer
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
        self.generation_config = default_generation_config(self)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        if retriever is not None:
            self.set_retriever(retriever)

    # ---------------------------------------------------------------------------------------------
    # parts
    # ---------------------------------------------------------------------------------------------
    @property
    def passage_encoder(self) -> PreTrainedModel:
        """The encoder of passages: `context_encoder` when there is one, else the question encoder."""
        return self.context_encoder if self.context_encoder is not None else self.question_encoder

    @property
    def is_generator_encoder_decoder(self) -> bool:
        return bool(getattr(self.generator.config, "is_encoder_decoder", False))

    def set_tokenizer(self, tokenizer: RagTokenizer) -> None:
        """Attaches the tokenizers; checks their vocabularies fit the models."""
        check_tokenizer_fits(self, tokenizer)
        self.tokenizer = tokenizer
        self._packer = None

    def set_retriever(self, retriever, check_fingerprint: bool = True) -> None:
        """Attaches a [`RagRetriever`]; its index must match this model's passage encoder."""
        check_index_fits(self, retriever.index, check_fingerprint)
        self.retriever = retriever

    def build_index(self, corpus, **kwargs):
        """Reads, chunks and encodes `corpus` with this model's passage encoder and attaches the index.

        `corpus` is a folder of .txt/.md files, a .jsonl / .csv file or a `datasets.Dataset`; keyword
        arguments go to [`RagRetriever.from_corpus`] (kind, max_tokens, overlap, bm25, ...), except
        `passage_tokens` (default True): store the passages' generator token ids with the index
        ([`store_passage_tokens`]).
        """
        return build_model_index(self, corpus, **kwargs)

    def store_passage_tokens(self, show_progress: bool = True) -> int:
        """Stores the generator token ids of the attached index's passages with it (those not stored yet).

        Inputs are then packed from stored ids: no passage goes through the tokenizer when answering,
        also right after loading. `build_index` does this; call it after adding passages to the index,
        or for an index built without this model's generator tokenizer (e.g. by scripts/build_index.py).
        Returns how many passages were tokenised; 0 (with a log line) for a tokenizer that is not fast.
        """
        return store_model_passage_tokens(self, show_progress)

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
        context_input_ids, context_attention_mask, doc_scores, retrieved_ids, passage_lists = inputs.generation_inputs(
            self,
            mode.name,
            questions=questions,
            input_ids=input_ids,
            passages=passages,
            doc_scores=doc_scores,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            n_docs=n_docs,
        )
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
        from .answering import answer_questions

        return answer_questions(
            self,
            questions,
            passages=passages,
            doc_scores=doc_scores,
            n_docs=n_docs,
            generation_mode=generation_mode,
            abstention_threshold=abstention_threshold,
            streamer=streamer,
            generate_kwargs=generate_kwargs,
        )

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
        reranker: str | os.PathLike | None = "auto",
        **config_kwargs,
    ) -> RagForGeneration:
        """Builds a model from two existing checkpoints (local folders or Hub ids), with their tokenizers.

        `reader_adapter`: a reader folder (a LoRA adapter trained for this generator, `modeling_rag.readers`)
        merged into the generator, with the settings it was trained and calibrated with; ``"auto"`` (default)
        applies the reader the package ships for the default generator (SmolLM2-135M-Instruct), when the
        generator is that one; ``None`` keeps the generator untuned.

        `reranker`: a saved reranker folder (`modeling_rag.reranker.CrossEncoderReranker`) to attach, with the
        settings it was tuned with (`n_candidates`, `rerank_first_stage_weight`) unless `config_kwargs` set
        them; ``"auto"`` (default) attaches the reranker the package ships for the default question encoder
        (all-MiniLM-L6-v2), when the question encoder is that one; ``None`` retrieves without reranking.
        """
        return build_from_checkpoints(
            cls,
            question_encoder_name_or_path,
            generator_name_or_path,
            context_encoder_name_or_path,
            retriever=retriever,
            dtype=dtype,
            reader_adapter=reader_adapter,
            config_kwargs=config_kwargs,
            reranker=reranker,
        )

    @quiet_library_output()
    def save_pretrained(self, save_directory: str | os.PathLike, *, save_index: bool = True, **kwargs):
        """Saves config, safetensors weights, tokenizers and the index (in `config.index_path`).

        Everything is written into a staging folder first and then swapped in with a journal, so a
        process killed mid-save leaves the previous model (restored on the next load), never a mix;
        files of your own in the folder are kept.
        """
        if kwargs.pop("safe_serialization", True) is False:
            raise RagInputError("RagForGeneration saves weights only as safetensors (no pickle).")
        save_model(
            self,
            save_directory,
            save_index=save_index,
            save_weights=lambda staging: super(RagForGeneration, self).save_pretrained(staging, **kwargs),
        )

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
        if kwargs.pop("trust_remote_code", False):
            raise RagConfigError(
                "RagForGeneration never runs code from a model repo, so trust_remote_code is refused. "
                "Everything a RAG model needs loads from config, safetensors and data files."
            )
        folder = open_saved_folder(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            load_index=load_index,
        )
        model = super().from_pretrained(folder, *model_args, **kwargs)
        attach_saved_parts(
            model,
            folder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            load_index=load_index,
            mmap_index=mmap_index,
            verify_index=verify_index,
        )
        return model


AutoModel.register(RagConfig, RagForGeneration, exist_ok=True)

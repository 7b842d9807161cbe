"""The parts a `RagForGeneration` holds besides its weights, and the checks made when one is attached:
the tokenizers must fit the models' embeddings, the index must fit the passage encoder (size, metric,
weights fingerprint). Also building an index with the model's own encoder and its default generation config.

The methods of the same names on `RagForGeneration` (`set_tokenizer`, `set_retriever`, `build_index`,
`store_passage_tokens`) are their public faces.
"""

from __future__ import annotations

import logging

from transformers import GenerationConfig

from .encoders import weights_fingerprint
from .errors import IndexMismatchError, RagInputError
from .passage_tokens import tokenizer_fingerprint
from .tokenization_rag import RagTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "build_model_index",
    "check_index_fits",
    "check_tokenizer_fits",
    "default_generation_config",
    "store_model_passage_tokens",
]


def default_generation_config(model) -> GenerationConfig:
    """The generator's generation config, with the special tokens of its model config filled in and
    `config.max_new_tokens` as the length."""
    gen_cfg = getattr(model.generator, "generation_config", None)
    gen_cfg = GenerationConfig.from_dict(gen_cfg.to_dict()) if gen_cfg is not None else GenerationConfig()
    g = model.config.generator
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
        if getattr(gen_cfg, name, None) is None and getattr(g, name, None) is not None:
            setattr(gen_cfg, name, getattr(g, name))
    gen_cfg.max_new_tokens = model.config.max_new_tokens
    gen_cfg.max_length = None
    return gen_cfg


def check_tokenizer_fits(model, tokenizer) -> None:
    """Raises `RagInputError` unless `tokenizer` is a `RagTokenizer` whose vocabularies fit the models."""
    if not isinstance(tokenizer, RagTokenizer):
        raise RagInputError(f"tokenizer must be a RagTokenizer, got {type(tokenizer).__name__}.")
    for name, tok, part in (
        ("question_encoder", tokenizer.question_encoder, model.question_encoder),
        ("generator", tokenizer.generator, model.generator),
    ):
        emb = part.get_input_embeddings()
        if emb is not None and len(tok) > emb.num_embeddings:
            raise RagInputError(
                f"The {name} tokenizer has {len(tok)} tokens but the {name} model's embedding has only "
                f"{emb.num_embeddings} rows: they do not belong together. Load the tokenizer saved with the "
                "model, or call resize_token_embeddings on the model."
            )


def check_index_fits(model, index, check_fingerprint: bool) -> None:
    """Raises `IndexMismatchError` unless `index` holds vectors of the model's size and metric, made by its
    passage encoder (when the index records a fingerprint and `check_fingerprint`)."""
    expected = model.config.retrieval_vector_size
    if index.dim != expected:
        raise IndexMismatchError(
            f"The index holds {index.dim}-dimensional vectors but the question encoder produces {expected}: "
            "rebuild the index with this model's encoder (model.build_index(...))."
        )
    if index.metric != model.config.similarity:
        raise IndexMismatchError(
            f"The index uses metric {index.metric!r} but config.similarity is {model.config.similarity!r}; "
            "set config.similarity to match, or rebuild the index."
        )
    if check_fingerprint and index.encoder_fingerprint:
        fingerprint = weights_fingerprint(model.passage_encoder)
        if fingerprint != index.encoder_fingerprint:
            raise IndexMismatchError(
                "The index was built with a different passage encoder than this model's (weight fingerprints "
                "differ), so its vectors do not match the questions' vectors. Rebuild it with "
                "model.build_index(...), or pass check_fingerprint=False if you know they are compatible."
            )


def build_model_index(model, corpus, **kwargs):
    """Builds a `RagRetriever` over `corpus` with the model's passage encoder and settings and attaches it
    (see `RagForGeneration.build_index`)."""
    from .retrieval_rag import RagRetriever

    if model.tokenizer is None:
        raise RagInputError("build_index needs the model's tokenizer: call model.set_tokenizer(...) first.")
    kwargs.setdefault("pooling", model.config.question_pooling)
    kwargs.setdefault("normalize", model.config.normalize_embeddings)
    kwargs.setdefault("metric", model.config.similarity)
    kwargs.setdefault("retrieval", model.config.retrieval)
    kwargs.setdefault("encoder_name", model.config.question_encoder._name_or_path or None)
    store_tokens = kwargs.pop("passage_tokens", True)
    retriever = RagRetriever.from_corpus(corpus, model.passage_encoder, model.tokenizer.question_encoder, **kwargs)
    model.set_retriever(retriever, check_fingerprint=False)
    if store_tokens:
        model.store_passage_tokens(show_progress=kwargs.get("show_progress", True))
    return retriever


def store_model_passage_tokens(model, show_progress: bool) -> int:
    """Stores the generator token ids of the attached index's passages (see `RagForGeneration.store_passage_tokens`)."""
    if model.retriever is None:
        raise RagInputError("This model has no index attached: build or attach one first.")
    if model.tokenizer is None:
        raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
    tokenizer = model.tokenizer.generator
    if tokenizer_fingerprint(tokenizer) is None:
        logger.info("Passage tokens are not stored: the generator tokenizer is not a fast tokenizer.")
        return 0
    return model.retriever.store_passage_tokens(tokenizer, show_progress=show_progress)

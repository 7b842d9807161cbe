"""Building, saving and loading a `RagForGeneration`: from two existing checkpoints, into a folder with a
journaled swap, and from a saved folder (local or Hub) with its tokenizers, reranker and index.

`RagForGeneration.from_pretrained_question_encoder_generator`, `save_pretrained` and `from_pretrained`
are the public faces; what a saved folder must hold is checked by `saved_model.py`, Hub downloads and
uploads are `hub_utils.py`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from .configuration_rag import RagConfig
from .constants import CONFIG_NAME, GENERATOR_TOKENIZER_DIR, QUESTION_ENCODER_TOKENIZER_DIR
from .encoders import weights_fingerprint
from .errors import RagConfigError, RagInputError
from .saved_model import check_saved_model, record_saved_parts
from .tokenization_rag import RagTokenizer
from .utils.atomic import JOURNAL_NAME, commit_staged_folder, new_staging_folder, recover_interrupted_commit
from .utils.names import portable_name

__all__ = ["attach_saved_parts", "build_from_checkpoints", "open_saved_folder", "save_model"]


def build_from_checkpoints(
    cls,
    question_encoder_name_or_path: str,
    generator_name_or_path: str,
    context_encoder_name_or_path: str | None,
    *,
    retriever: Any,
    dtype: torch.dtype | None,
    reader_adapter: str | os.PathLike | None,
    config_kwargs: dict[str, Any],
    reranker: str | os.PathLike | None = None,
):
    """A `cls` model from two checkpoints with their tokenizers (see
    `RagForGeneration.from_pretrained_question_encoder_generator`)."""
    qe = AutoModel.from_pretrained(question_encoder_name_or_path, dtype=dtype)
    gen_config = AutoConfig.from_pretrained(generator_name_or_path)
    auto = AutoModelForSeq2SeqLM if getattr(gen_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        gen = auto.from_pretrained(generator_name_or_path, dtype=dtype)
    except ValueError as err:
        raise RagConfigError(
            f"generator: {generator_name_or_path} has no language-model head usable by {auto.__name__}."
        ) from err
    ce = AutoModel.from_pretrained(context_encoder_name_or_path, dtype=dtype) if context_encoder_name_or_path else None
    config = RagConfig.from_question_encoder_generator_configs(
        qe.config, gen.config, ce.config if ce is not None else None, **config_kwargs
    )
    # saved with the model: a Hub id or a short name, never this machine's folder
    config.question_encoder._name_or_path = portable_name(question_encoder_name_or_path)
    config.generator._name_or_path = portable_name(generator_name_or_path)
    if config.context_encoder is not None:
        config.context_encoder._name_or_path = portable_name(context_encoder_name_or_path)
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
    reranker_folder = _reranker_folder(reranker, question_encoder_name_or_path)
    if reranker_folder is not None:
        from .reranker import CrossEncoderReranker

        loaded = CrossEncoderReranker.load(reranker_folder)
        for key, value in loaded.settings.items():  # what it was tuned with, unless the caller said otherwise
            if key not in config_kwargs:
                setattr(model.config, key, value)
        model.config.validate_rag()
        model.set_reranker(loaded)
    if retriever is not None:
        model.set_retriever(retriever)
    return model


def _reader_folder(reader_adapter, generator_name_or_path) -> str | None:
    """The reader folder `build_from_checkpoints` applies (``None``: none)."""
    if reader_adapter is None:
        return None
    if reader_adapter == "auto":
        from .assets import DEFAULT_GENERATOR, is_default_generator
        from .readers import shipped_reader_path

        return shipped_reader_path(DEFAULT_GENERATOR) if is_default_generator(generator_name_or_path) else None
    return os.fspath(reader_adapter)


def _reranker_folder(reranker, question_encoder_name_or_path) -> str | None:
    """The reranker folder `build_from_checkpoints` attaches (``None``: none)."""
    if reranker is None:
        return None
    if reranker == "auto":
        from .assets import DEFAULT_QUESTION_ENCODER, is_default_question_encoder
        from .reranker import shipped_reranker_path

        if not is_default_question_encoder(question_encoder_name_or_path):
            return None
        return shipped_reranker_path(DEFAULT_QUESTION_ENCODER)
    return os.fspath(reranker)


def save_model(
    model, save_directory: str | os.PathLike, *, save_index: bool, save_weights: Callable[[str], None]
) -> None:
    """Writes the model into a staging folder (`save_weights(staging)` for config and weights, then the
    tokenizers, the index and the reranker) and swaps it into `save_directory` with a journal."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise RagInputError(f"save_pretrained needs a folder, but {save_directory} is a file.")
    staging = new_staging_folder(save_directory)
    saves_index = save_index and model.retriever is not None and model.config.index_repo_id is None
    record_saved_parts(model.config, tokenizer=model.tokenizer is not None, index=saves_index)
    try:
        save_weights(staging)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
        if saves_index:
            model.retriever.save(os.path.join(staging, model.config.index_path))
        if model.reranker is not None:
            model.reranker.save(os.path.join(staging, model.config.reranker))
        commit_staged_folder(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_saved_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None,
    cache_dir: str | None,
    token: str | None,
    local_files_only: bool,
    load_index: bool,
) -> str:
    """The local folder of a saved model (downloaded from the Hub if need be), an interrupted save rolled
    back and its parts checked, before any weights are read."""
    from .hub_utils import resolve_model_folder

    folder = resolve_model_folder(
        os.fspath(name_or_path),
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
    )
    if os.path.exists(os.path.join(folder, JOURNAL_NAME)):
        # a save_pretrained was killed half-way: put the previous files back first
        recover_interrupted_commit(folder)
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise OSError(f"{name_or_path} has no {CONFIG_NAME}; it is not a saved RAG model.")
    check_saved_model(folder, load_index=load_index)  # a broken folder is refused now, not at the first question
    return folder


def attach_saved_parts(
    model,
    folder: str,
    *,
    cache_dir: str | None,
    token: str | None,
    local_files_only: bool,
    load_index: bool,
    mmap_index: bool,
    verify_index: bool,
) -> None:
    """Attaches to a model whose weights were loaded from `folder` its tokenizers, reranker and index."""
    if os.path.isdir(os.path.join(folder, QUESTION_ENCODER_TOKENIZER_DIR)) and os.path.isdir(
        os.path.join(folder, GENERATOR_TOKENIZER_DIR)
    ):
        model.set_tokenizer(RagTokenizer.from_pretrained(folder))
    if model.config.reranker is not None:
        from .reranker import load_model_reranker

        load_model_reranker(model, folder)
    if load_index:
        _load_index(
            model,
            folder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            mmap=mmap_index,
            verify=verify_index,
        )


def _load_index(model, folder, *, cache_dir, token, local_files_only, mmap, verify) -> None:
    """Attaches the index saved with the model (or in its own Hub repo, `config.index_repo_id`), if any."""
    from .hub_utils import resolve_model_folder

    c = model.config
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
        expected_fingerprint=weights_fingerprint(model.passage_encoder) if verify else None,
    )
    model.set_retriever(retriever, check_fingerprint=False)

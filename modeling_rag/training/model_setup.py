"""The model a training run starts from and ends with: loading, freezing, LoRA, checkpointing, saving."""

from __future__ import annotations

import argparse
import copy
import logging
import os

import torch

from ..constants import FINAL_MODEL_DIR
from ..errors import RagConfigError

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices) for a reproducible run."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


def load_rag_model(
    args: argparse.Namespace,
    *,
    dtype: torch.dtype = torch.float32,
    build_index: bool = True,
    reader_adapter: str | None = "auto",
    reranker: str | None = "auto",
):
    """The model named by ``--model`` (or assembled from ``--question-encoder`` / ``--generator``), in
    `dtype`, with its index (rebuilt from ``--corpus`` when given). Returns `(model, original_dtype)`.

    `reader_adapter` / `reranker` are passed to `from_pretrained_question_encoder_generator` when the model is
    assembled: a reader trained as an adapter must start from the generator's own weights (``None``), not from
    the shipped reader merged into them."""
    from .. import RagForGeneration

    if args.model:
        model = RagForGeneration.from_pretrained(args.model, load_index=not (build_index and args.corpus))
    elif args.question_encoder and args.generator:
        from ..assets import resolve_model

        model = RagForGeneration.from_pretrained_question_encoder_generator(
            resolve_model(args.question_encoder, "question_encoder"),
            resolve_model(args.generator, "generator"),
            reader_adapter=reader_adapter,
            reranker=reranker,
        )
    else:
        raise RagConfigError("Give --model (a saved RAG model) or both --question-encoder and --generator.")
    original = next(model.generator.parameters()).dtype
    model.to(dtype)
    if build_index and args.corpus:
        logger.info("Building the index from %s", args.corpus)
        model.build_index(args.corpus, max_tokens=args.index_max_tokens, show_progress=False)
    return model, original


def freeze_passage_side(model) -> None:
    """Keeps passages encoded as the index has them: the model gets a frozen `context_encoder`.

    When the model has no separate context encoder, a copy of the question encoder becomes one and
    ``config.context_encoder`` gets a copy of the question encoder's sub-config, so that a saved model
    rebuilds the two encoders separately (weights ``context_encoder.*``) and the index fingerprint,
    taken from the passage encoder, still matches.
    """
    if model.context_encoder is None:
        model.context_encoder = copy.deepcopy(model.question_encoder)
        model.config.context_encoder = copy.deepcopy(model.config.question_encoder)
    model.context_encoder.requires_grad_(False)
    model.context_encoder.eval()


def freeze_unused_pooler(model) -> None:
    """Freezes the encoders' pooler layers when pooling does not use them ("mean" / "cls"), so that no
    trainable parameter goes without a gradient (DDP would otherwise need find_unused_parameters)."""
    if model.config.question_pooling == "pooler":
        return
    for enc in (model.question_encoder, model.context_encoder):
        pooler = getattr(enc, "pooler", None) if enc is not None else None
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(False)


def untie_passage_side(model) -> None:
    """Gives the model a separate, trainable context encoder (a copy of the question encoder)."""
    if model.context_encoder is None:
        model.context_encoder = copy.deepcopy(model.question_encoder)
        model.config.context_encoder = copy.deepcopy(model.config.question_encoder)
    model.context_encoder.requires_grad_(True)


def cast_for_saving(model, save_dtype: str, original: torch.dtype) -> None:
    """Casts the generator to the dtype named by ``--save-dtype`` before `save_pretrained`.

    The encoders stay in float32: the index records the passage encoder's weight fingerprint, which
    includes the dtype.
    """
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(save_dtype, original)
    model.generator.to(target)


def enable_gradient_checkpointing(*modules) -> None:
    """Non-reentrant gradient checkpointing (safe with DDP and with frozen inputs) on each module."""
    for m in modules:
        if m is None:
            continue
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_final_model(accelerator, model, args, original_dtype) -> str | None:
    """`save_pretrained` of the model (index included) into ``output-dir/final`` on the main process."""
    if args.no_save:
        return None
    out = os.path.join(args.output_dir, FINAL_MODEL_DIR)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cast_for_saving(model, args.save_dtype, original_dtype)
        model.save_pretrained(out)
        accelerator.print(f"Saved the model to {out}")
    accelerator.wait_for_everyone()
    return out


def apply_context_args(model, args: argparse.Namespace) -> None:
    """Writes ``--n-docs`` / ``--max-input-tokens`` / ``--max-passage-tokens`` into the model's config."""
    for name in ("n_docs", "max_input_tokens", "max_passage_tokens"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise RagConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
            setattr(model.config, name, int(value))
    model.config.validate_rag()


def apply_lora(model, args: argparse.Namespace) -> None:
    """Wraps `model.generator` in a peft LoRA model (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
    task = "SEQ_2_SEQ_LM" if model.is_generator_encoder_decoder else "CAUSAL_LM"
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type=task,
    )
    model.generator = get_peft_model(model.generator, config)


def merge_lora(model) -> None:
    """Merges LoRA adapters into the generator's weights (a plain transformers model again)."""
    if hasattr(model.generator, "merge_and_unload"):
        model.generator = model.generator.merge_and_unload()

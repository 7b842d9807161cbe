"""Reader adapters: a trained generator shipped as a small LoRA adapter (peft) over base weights that an
installed package provides, never as a full copy of the weights.

A reader folder holds peft's ``adapter_config.json`` and ``adapter_model.safetensors`` and our
``reader_config.json`` (a settings-only reader, ``"adapter": false``, has just the latter: the base
generator as it is, with settings fitted for it, such as an abstention rule): the base generator it was trained on, the no-answer response it was taught, the
context it was trained with (passages, token budget, prompt) and, when fitted, the abstention calibration
(`modeling_rag.abstention`). `apply_reader` merges the adapter into a model's generator and copies those
settings into the model's config, so the model answers as the reader was trained and evaluated.

``train_generator.py --lora --save-adapter DIR`` writes such a folder; ``scripts/calibrate_abstention.py
--reader DIR`` adds the calibration. The package ships its readers under ``modeling_rag/readers/`` (see
`SHIPPED_READERS`); `from_pretrained_question_encoder_generator` applies the one trained for the default
generator unless told ``reader_adapter=None``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import RagConfigError
from .utils.peft_adapters import ADAPTER_FILES

__all__ = [
    "READER_CONFIG_NAME",
    "READER_SETTINGS",
    "SHIPPED_READERS",
    "apply_reader",
    "read_reader_config",
    "save_reader",
    "save_reader_settings",
    "shipped_reader_path",
]

READER_CONFIG_NAME = "reader_config.json"
READER_FORMAT_VERSION = 1
# RagConfig fields a reader carries: how it was trained to read, and when it abstains
READER_SETTINGS = (
    "no_answer_text",
    "n_docs",
    "max_input_tokens",
    "max_passage_tokens",
    "instruction",
    "prompt_template",
    "passage_template",
    "use_chat_template",
    "abstention",
)
# base generator name (modeling_rag.assets) -> the reader shipped for it, a folder inside this package
SHIPPED_READERS = {"SmolLM2-135M-Instruct": "readers_data/smollm2-135m-instruct"}


def shipped_reader_path(base_generator: str) -> str | None:
    """The folder of the reader the package ships for `base_generator`, or ``None`` when it ships none."""
    relative = SHIPPED_READERS.get(base_generator)
    if relative is None:
        return None
    folder = Path(__file__).parent / relative
    return str(folder) if (folder / READER_CONFIG_NAME).is_file() else None


def read_reader_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The reader's ``reader_config.json``; raises `RagConfigError` saying what is missing or wrong."""
    folder = Path(folder)
    missing = [f for f in (READER_CONFIG_NAME,) if not (folder / f).is_file()]
    if (folder / READER_CONFIG_NAME).is_file():
        try:
            has_adapter = json.loads((folder / READER_CONFIG_NAME).read_text(encoding="utf-8")).get("adapter", True)
        except (OSError, ValueError):
            has_adapter = True  # reported below
        missing += [f for f in ADAPTER_FILES if has_adapter and not (folder / f).is_file()]
    if missing:
        raise RagConfigError(
            f"{folder} is not a reader adapter folder: {', '.join(missing)} missing. A reader folder is written by "
            "`train_generator.py --lora --save-adapter DIR`."
        )
    try:
        config = json.loads((folder / READER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RagConfigError(f"{folder / READER_CONFIG_NAME} is not valid JSON ({err}); re-save the reader.") from None
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise RagConfigError(f"{folder / READER_CONFIG_NAME} must be an object with a 'settings' object.")
    unknown = sorted(set(config["settings"]) - set(READER_SETTINGS))
    if unknown:
        raise RagConfigError(
            f"{folder / READER_CONFIG_NAME}: unknown settings {unknown}; known: {list(READER_SETTINGS)}."
        )
    return config


def save_reader(model, folder: str | os.PathLike, *, base_generator: str, notes: dict | None = None) -> str:
    """Saves `model.generator`'s LoRA adapter (a peft model, before merging) and the reader settings of
    `model.config` into `folder`; returns the folder."""
    from .utils.atomic import atomic_write_bytes, atomic_write_text
    from .utils.peft_adapters import adapter_files

    if not hasattr(model.generator, "peft_config"):
        raise RagConfigError("save_reader needs a generator with LoRA adapters (train with --lora).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the adapter names its base generator, not the local folder peft records; and no placeholder card from
    # peft (a reader's card is written from measured results)
    for name, data in adapter_files(model.generator, base_generator).items():
        atomic_write_bytes(folder / name, data)
    settings = {name: getattr(model.config, name) for name in READER_SETTINGS}
    config = {
        "format_version": READER_FORMAT_VERSION,
        "base_generator": base_generator,
        "base_model_type": model.config.generator.model_type,
        "base_vocab_size": int(model.config.generator.vocab_size),
        "settings": settings,
        "notes": notes or {},
    }
    atomic_write_text(str(folder / READER_CONFIG_NAME), json.dumps(config, indent=2, ensure_ascii=False))
    return str(folder)


def save_reader_settings(model, folder: str | os.PathLike, *, base_generator: str, notes: dict | None = None) -> str:
    """Saves a settings-only reader: the base generator as it is, with the reader settings of `model.config`
    (e.g. an abstention rule fitted for the untuned generator). `apply_reader` merges no adapter for it."""
    from .utils.atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": READER_FORMAT_VERSION,
        "adapter": False,
        "base_generator": base_generator,
        "base_model_type": model.config.generator.model_type,
        "base_vocab_size": int(model.config.generator.vocab_size),
        "settings": {name: getattr(model.config, name) for name in READER_SETTINGS},
        "notes": notes or {},
    }
    atomic_write_text(str(folder / READER_CONFIG_NAME), json.dumps(config, indent=2, ensure_ascii=False))
    return str(folder)


def apply_reader(model, folder: str | os.PathLike, *, trainable: bool = False) -> dict[str, Any]:
    """Merges the reader adapter in `folder` into `model.generator` and sets its settings on `model.config`.

    With `trainable`, the adapter is not merged: `model.generator` becomes a peft model whose LoRA weights
    train (to continue training a reader, ``train_generator.py --init-reader``); its abstention rule is
    dropped, since it was fitted for the adapter as it was.

    Raises `RagConfigError` when the adapter was trained on another kind of generator. Returns the reader's
    config (base, settings, notes).
    """
    config = read_reader_config(folder)
    gen_config = model.config.generator
    if config.get("base_model_type") != gen_config.model_type or int(config.get("base_vocab_size", -1)) != int(
        gen_config.vocab_size
    ):
        raise RagConfigError(
            f"The reader in {folder} was trained on a {config.get('base_model_type')} generator with a vocabulary of "
            f"{config.get('base_vocab_size')} ({config.get('base_generator')}), but this model's generator is a "
            f"{gen_config.model_type} with {gen_config.vocab_size}; use the generator it was trained on."
        )
    if config.get("adapter", True):
        try:
            from peft import PeftModel
        except ImportError:
            raise RagConfigError(
                f"The reader in {folder} is a LoRA adapter, merged with peft, which is not installed: "
                'pip install "peft>=0.12" (or build the model with reader_adapter=None for the untuned generator).'
            ) from None
        adapted = PeftModel.from_pretrained(model.generator, str(folder), is_trainable=trainable)
        model.generator = adapted if trainable else adapted.merge_and_unload()
    elif trainable:
        raise RagConfigError(f"The reader in {folder} has settings only, no adapter to train: give an adapter folder.")
    for name, value in config["settings"].items():
        setattr(model.config, name, value)
    if trainable:
        model.config.abstention = None
    model.config.validate_rag()
    model.clear_caches()  # the prompt settings may have changed
    return config

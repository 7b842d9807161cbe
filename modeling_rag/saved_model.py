"""What a saved RagForGeneration folder must hold, checked when it is loaded.

`save_pretrained` records in the config which parts it wrote ([`record_saved_parts`]: the
tokenizers, the index). `from_pretrained` calls [`check_saved_model`] before it reads any weights,
so a folder that lacks a part its config names, or whose weights file is cut short, is refused at
load time with the file named and what to do, instead of loading "fine" and failing at the first
question (or with safetensors' raw ``SafetensorError``).
"""

from __future__ import annotations

import json
import os

from .constants import (
    CONFIG_NAME,
    GENERATOR_TOKENIZER_DIR,
    INDEX_CONFIG_NAME,
    INDEX_DIR,
    QUESTION_ENCODER_TOKENIZER_DIR,
    SAFE_WEIGHTS_NAME,
    SHARD_MANIFEST_NAME,
)
from .errors import SavedModelError

# transformers' name for the index of a sharded safetensors checkpoint
SAFE_WEIGHTS_INDEX_NAME = SAFE_WEIGHTS_NAME + ".index.json"
TOKENIZER_DIRS = (QUESTION_ENCODER_TOKENIZER_DIR, GENERATOR_TOKENIZER_DIR)

_RESAVE = (
    "If the folder came from the Hub, delete it from the Hub cache and load it again to download it afresh; "
    "if you saved it, save the model again with save_pretrained (or copy the whole folder again)."
)


def record_saved_parts(config, *, tokenizer: bool, index: bool) -> None:
    """Notes in `config` (before it is written) whether the tokenizers and the index are saved with it."""
    config.saved_with_tokenizer = bool(tokenizer)
    config.saved_with_index = bool(index)


def _read_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SavedModelError(f"{os.path.join(folder, CONFIG_NAME)} cannot be read as JSON ({err}). {_RESAVE}") from err
    if not isinstance(config, dict):
        raise SavedModelError(f"{os.path.join(folder, CONFIG_NAME)} does not hold a JSON object. {_RESAVE}")
    return config


def _check_tokenizers(folder: str, config: dict) -> None:
    present = [d for d in TOKENIZER_DIRS if os.path.isdir(os.path.join(folder, d))]
    # a folder saved without tokenizers holds neither; one of the two alone is always a damaged folder
    if not (config.get("saved_with_tokenizer") or present):
        return
    missing = [d for d in TOKENIZER_DIRS if d not in present]
    if missing:
        names = " and ".join(f"{d}/" for d in missing)
        raise SavedModelError(
            f"The saved model in {folder} has no {names} folder, though it was saved with its tokenizers: "
            f"the folder is incomplete. {_RESAVE}"
        )


def _check_index(folder: str, config: dict) -> None:
    if not config.get("saved_with_index") or config.get("index_repo_id"):
        return
    index_path = config.get("index_path") or INDEX_DIR
    index_folder = os.path.join(folder, index_path)
    if os.path.isfile(os.path.join(index_folder, INDEX_CONFIG_NAME)):
        return
    if os.path.isfile(os.path.join(index_folder, SHARD_MANIFEST_NAME)):  # a sharded index (index/sharded.py)
        return
    what = "folder" if not os.path.isdir(index_folder) else f"{INDEX_CONFIG_NAME} in its folder"
    raise SavedModelError(
        f"The saved model in {folder} was saved with its index in {index_path}/, but that {what} is missing. "
        f"{_RESAVE} To use the model without its index, load it with load_index=False and pass passages= "
        "or call model.build_index(corpus)."
    )


def _weight_files(folder: str) -> list[str]:
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index):
        raise SavedModelError(f"The saved model in {folder} has no {SAFE_WEIGHTS_NAME}. {_RESAVE}")
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise SavedModelError(f"{index} cannot be read ({err}). {_RESAVE}") from err
    return [os.path.join(folder, name) for name in shards]


def _check_weights(folder: str) -> None:
    from safetensors import SafetensorError, safe_open

    for path in _weight_files(folder):
        if not os.path.isfile(path):
            raise SavedModelError(f"The weights file {path} is missing. {_RESAVE}")
        try:
            # reads the header and checks that the data it lists covers the file exactly: a cut-short file fails
            with safe_open(path, framework="numpy"):
                pass
        except (SafetensorError, OSError) as err:
            raise SavedModelError(
                f"The weights file {path} is damaged or incomplete ({err}); an interrupted download, copy or "
                f"save leaves it so. {_RESAVE}"
            ) from err


def check_saved_model(folder: str, *, load_index: bool = True) -> None:
    """Raises [`SavedModelError`] unless `folder` holds every part its config says was saved.

    Checked: both tokenizer folders (when the config records them, or when one of the two is there),
    the index folder (when the config records it and `load_index`), and that every safetensors
    weights file is complete. Cheap: only headers are read.
    """
    config = _read_config(folder)
    _check_tokenizers(folder, config)
    if load_index:
        _check_index(folder, config)
    _check_weights(folder)

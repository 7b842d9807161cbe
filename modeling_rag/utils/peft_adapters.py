"""A peft adapter as the package ships it (readers, rerankers): its two files, naming the base model it
applies to by a portable name, never by a folder of the machine that trained it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files(peft_model: Any, base_model: str) -> dict[str, bytes]:
    """`peft_model`'s adapter as `{file name: bytes}` (`ADAPTER_FILES`), its config naming `base_model`."""
    with tempfile.TemporaryDirectory() as tmp:
        # no embedding matrix is saved: our vocabularies are never resized, and peft's "auto" would look the
        # base model up on the Hub to decide (a request at every save, a warning offline)
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        files = {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}
    config = json.loads(files[ADAPTER_FILES[0]])
    config["base_model_name_or_path"] = base_model
    files[ADAPTER_FILES[0]] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files

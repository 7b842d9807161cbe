"""Reading question files: every accepted format, and a clear DataFormatError for every bad input."""

import json
import os

import datasets
import pytest
from conftest import DATA_DIR

from modeling_rag.errors import DataFormatError, RagInputError
from modeling_rag.qa_data import QAExample, check_passage_ids, load_qa_examples

REAL_DEV = os.path.join(DATA_DIR, "squad_v2_5articles", "dev.jsonl")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- accepted formats ----------------------------------------------------------------------------------


def test_jsonl_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"id": "q1", "question": " Who? ", "answers": ["Rollo", "rollo"], "positive_passage_ids": ["p1"]})
        + "\n\n"  # blank lines are skipped
        + json.dumps({"question": "When?", "answers": "911", "extra": 1})
        + "\n",
        encoding="utf-8",
    )
    examples = load_qa_examples(path)  # a PathLike works, as does a str
    assert examples == load_qa_examples(str(path))
    assert examples[0] == QAExample(
        id="q1",
        question="Who?",
        answers=["Rollo", "rollo"],
        positive_passage_ids=["p1"],
        positive_passages=[],
        hard_negative_passage_ids=[],
    )
    assert examples[1].id == "1"  # defaults to the row number
    assert examples[1].answers == ["911"]


def test_json_array_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "a?", "answers": ["x"]}, {"question": "b?", "answers": ["y"]}]))
    examples = load_qa_examples(path)
    assert [e.id for e in examples] == ["0", "1"]
    assert [e.answers for e in examples] == [["x"], ["y"]]


def test_list_of_dicts_and_answer_shapes():
    rows = [
        {"id": 7, "question": "q0", "answers": "a string"},
        {"question": "q1", "answers": {"text": ["squad", "style"], "answer_start": [0, 5]}},
        {"question": "q2", "answers": [{"text": "list of", "answer_start": 0}, {"text": "objects"}]},
        {"question": "q3", "answer": 1911},
        {"query": "q4", "answers": ["", "  kept  "]},
    ]
    examples = load_qa_examples(rows)
    assert examples[0].id == "7"
    assert [e.answers for e in examples] == [
        ["a string"],
        ["squad", "style"],
        ["list of", "objects"],
        ["1911"],
        ["kept"],
    ]
    assert examples[4].question == "q4"


def test_dpr_style_contexts():
    row = {
        "question": "who was the norse leader?",
        "answers": ["Rollo"],
        "positive_ctxs": [
            {"passage_id": "p1", "title": "Normans", "text": "Rollo led the Norse."},
            {"id": "p2", "title": "Normans", "text": "More on Rollo."},
        ],
        "hard_negative_ctxs": [{"psg_id": 9, "text": "Vikings"}, {"id": "p8", "text": "Saxons"}],
        "negative_ctxs": [{"id": "random"}],  # random negatives are ignored
    }
    (example,) = load_qa_examples([row])
    assert example.positive_passage_ids == ["p1", "p2"]
    assert example.positive_passages == ["Rollo led the Norse.", "More on Rollo."]
    assert example.hard_negative_passage_ids == ["9", "p8"]


def test_dpr_contexts_merge_with_plain_fields_and_columnar_contexts():
    row = {
        "question": "q",
        "answers": ["a"],
        "positive_passage_ids": "p0",
        "positive_passages": ["text zero"],
        "positive_ctxs": {"passage_id": ["p0", "p1"], "text": ["text zero", "text one"]},  # dict of lists
        "hard_negative_passage_ids": ["n1"],
    }
    (example,) = load_qa_examples([row])
    assert example.positive_passage_ids == ["p0", "p1"]
    assert example.positive_passages == ["text zero", "text one"]
    assert example.hard_negative_passage_ids == ["n1"]


def test_datasets_dataset():
    dataset = datasets.Dataset.from_list(
        [
            {
                "id": "a",
                "question": "q?",
                "answers": {"text": ["x", "y"], "answer_start": [1, 2]},
                "positive_ctxs": [{"passage_id": "p1", "text": "t", "title": "T"}],
            },
            {
                "id": None,
                "question": "r?",
                "answers": {"text": ["z"], "answer_start": [0]},
                "positive_ctxs": [],
            },
        ]
    )
    examples = load_qa_examples(dataset)
    assert examples[0] == QAExample("a", "q?", ["x", "y"], ["p1"], ["t"], [])
    assert examples[1].id == "1"
    assert examples[1].answers == ["z"]


def test_missing_answers_allowed_and_missing_question_allowed():
    rows = [{"question": "q"}, {"question": "r", "answers": []}, {"question": "s", "answers": {"text": []}}]
    examples = load_qa_examples(rows, require_answers=False)
    assert [e.answers for e in examples] == [[], [], []]
    (example,) = load_qa_examples([{"answers": ["a"]}], require_question=False)
    assert example.question == ""


def test_real_squad_dev_file():
    examples = load_qa_examples(REAL_DEV)
    assert len(examples) == 120
    assert all(e.question and e.answers and e.positive_passage_ids for e in examples)
    assert len({e.id for e in examples}) == 120
    assert examples[0].answers == ["10th and 11th centuries", "in the 10th and 11th centuries"]
    assert examples[0].positive_passage_ids == ["Normans-0"]
    passages = os.path.join(os.path.dirname(REAL_DEV), "passages.jsonl")
    with open(passages, encoding="utf-8") as f:
        known = [json.loads(line)["id"] for line in f if line.strip()]
    check_passage_ids(examples, known)


# --- bad inputs ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_qa_examples(tmp_path / "nope.jsonl")


def test_directory(tmp_path):
    with pytest.raises(DataFormatError, match="is a directory"):
        load_qa_examples(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answers": ["x"]}\n')
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_qa_examples(path)


@pytest.mark.parametrize("content", ["", "\n  \n\t\n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match="empty"):
        load_qa_examples(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answers": ["x"]}\n\n{"question": "b", "answers": [\n')
    with pytest.raises(DataFormatError, match="line 3 is not valid JSON"):
        load_qa_examples(path)


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"question": "a", "answers": ["x"]},\n{"question": "b" "answers": []}\n]')
    with pytest.raises(DataFormatError, match="line 3"):
        load_qa_examples(path)


def test_row_without_question_names_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answers": ["x"]}, {"id": "q2", "answers": ["y"]}])
    with pytest.raises(DataFormatError, match=r"line 2 .*\(id 'q2'\) has no question"):
        load_qa_examples(path)
    with pytest.raises(DataFormatError, match="row 0 .* has no question"):
        load_qa_examples([{"question": "   ", "answers": ["y"]}])


def test_row_without_answers_names_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answers": ["x"]}, {"question": "b", "answers": []}])
    with pytest.raises(DataFormatError, match="line 2 .* has no answers.*require_answers=False"):
        load_qa_examples(path)
    with pytest.raises(DataFormatError, match="row 1 .* has no answers"):
        load_qa_examples([{"question": "a", "answers": "x"}, {"question": "b"}])


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answers": ["x"]}\n["not", "an", "object"]\n')
    with pytest.raises(DataFormatError, match="line 2 .*expected a JSON object"):
        load_qa_examples(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": ["a list"], "answers": ["x"]}, "'question' must be a string"),
        ({"question": "q", "answers": {"answer_start": [0]}}, "without a 'text' field"),
        ({"question": "q", "answers": [["nested"]]}, "each answer must be a string"),
        ({"question": "q", "answers": ["x"], "positive_passage_ids": {"a": 1}}, "'positive_passage_ids' must be"),
        ({"question": "q", "answers": ["x"], "positive_ctxs": ["p1"]}, "'positive_ctxs' must be a list of objects"),
        ({"question": "q", "answers": ["x"], "hard_negative_ctxs": "p1"}, "'hard_negative_ctxs' must be"),
    ],
)
def test_fields_of_the_wrong_type(row, message):
    with pytest.raises(DataFormatError, match=message):
        load_qa_examples([row])


def test_empty_sources_and_wrong_types():
    with pytest.raises(DataFormatError, match="empty"):
        load_qa_examples([])
    with pytest.raises(DataFormatError, match="empty"):
        load_qa_examples(datasets.Dataset.from_list([]))
    with pytest.raises(RagInputError, match="got int"):
        load_qa_examples(3)
    with pytest.raises(RagInputError, match="pass one split"):
        load_qa_examples(datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": "q"}])}))


def test_check_passage_ids():
    examples = load_qa_examples(
        [
            {"id": "a", "question": "q", "answers": ["x"], "positive_passage_ids": ["p1"]},
            {"id": "b", "question": "q", "answers": ["x"], "positive_passage_ids": ["p1", "u1", "u2"]},
            {
                "id": "c",
                "question": "q",
                "answers": ["x"],
                "hard_negative_passage_ids": ["u3", "u4", "u5", "u6", "u1"],
            },
        ]
    )
    check_passage_ids(examples[:1], ["p1", "p2"])  # all known: no error
    with pytest.raises(DataFormatError) as info:
        check_passage_ids(examples, {"p1"}, max_listed=3)
    message = str(info.value)
    assert message.startswith("6 passage id(s) used by 2 question(s)")
    assert "'u1' (question 'b'), 'u2' (question 'b'), 'u3' (question 'c') and 3 more" in message
    assert "'u4'" not in message

"""scripts/split_by_article.py: held-out articles share no passage with training; bad input is refused."""

import importlib.util
import json
import os

import pytest

from modeling_rag.errors import DataFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "split_by_article", os.path.join(ROOT, "scripts", "split_by_article.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def data(tmp_path):
    passages = [{"id": f"{a}-{i}", "title": a, "text": f"{a} paragraph {i}"} for a in "ABCDE" for i in range(2)]
    questions = [
        {"question": f"q {a}{i}{j}", "answers": ["x"], "positive_passage_ids": [f"{a}-{i}"]}
        for a in "ABCDE"
        for i in range(2)
        for j in range(3)
    ]
    extra_p = [{"id": "Z-0", "title": "Z", "text": "z"}]
    extra_q = [{"question": "q z", "answers": ["z"], "positive_passage_ids": ["Z-0"]}]
    return {
        "passages": _jsonl(tmp_path / "p.jsonl", passages),
        "questions": _jsonl(tmp_path / "q.jsonl", questions),
        "extra_p": _jsonl(tmp_path / "xp.jsonl", extra_p),
        "extra_q": _jsonl(tmp_path / "xq.jsonl", extra_q),
    }


def test_split_keeps_articles_apart(tmp_path, data):
    out = tmp_path / "out"
    argv = ["--questions", data["questions"], "--passages", data["passages"], "--held-out", "2", "--seed", "3"]
    argv += ["--also-train", data["extra_q"], "--also-passages", data["extra_p"], "--output-dir", str(out)]
    summary = _script().main(argv)
    held = set(summary["held_out_articles"])
    assert len(held) == 2 and summary == json.loads((out / "split.json").read_text())
    train, held_out = _read(out / "train.jsonl"), _read(out / "held_out.jsonl")
    assert len(held_out) == 12 and len(train) == 18 + 1
    assert {q["positive_passage_ids"][0].split("-")[0] for q in held_out} == held
    assert not any(q["positive_passage_ids"][0].split("-")[0] in held for q in train)
    assert {p["title"] for p in _read(out / "held_out_passages.jsonl")} == held
    assert len(_read(out / "passages.jsonl")) == 11
    again = _script().main([*argv[:-1], str(tmp_path / "again")])
    assert again["held_out_articles"] == summary["held_out_articles"]  # the seed decides


@pytest.mark.parametrize(
    "change, message",
    [
        ({"held_out": "5"}, "between 1 and 4"),
        ({"questions_rows": [{"question": "q", "answers": ["a"]}]}, "no positive_passage_ids"),
        (
            {"questions_rows": [{"question": "q", "answers": ["a"], "positive_passage_ids": ["nope"]}]},
            "not in --passages",
        ),
        ({"questions_rows": []}, "has no rows"),
    ],
)
def test_bad_input_is_refused(tmp_path, data, change, message):
    questions = data["questions"]
    if "questions_rows" in change:
        questions = _jsonl(tmp_path / "bad.jsonl", change["questions_rows"])
    argv = ["--questions", questions, "--passages", data["passages"], "--held-out", change.get("held_out", "1")]
    with pytest.raises(DataFormatError, match=message):
        _script().main([*argv, "--output-dir", str(tmp_path / "o")])


def test_train_sample_keeps_every_also_train_row(tmp_path, data):
    out = tmp_path / "out"
    argv = ["--questions", data["questions"], "--passages", data["passages"], "--held-out", "1"]
    argv += ["--also-train", data["extra_q"], "--train-sample", "5", "--output-dir", str(out)]
    summary = _script().main(argv)
    sample, train = _read(out / "train_sample.jsonl"), _read(out / "train.jsonl")
    assert summary["train_sample_questions"] == len(sample) == 5
    assert {"question": "q z", "answers": ["z"], "positive_passage_ids": ["Z-0"]} in sample
    assert all(row in train for row in sample) and len({r["question"] for r in sample}) == 5
    with pytest.raises(DataFormatError, match="--train-sample must be between 1"):
        _script().main([*argv[:-4], "--train-sample", "0", "--output-dir", str(tmp_path / "o")])

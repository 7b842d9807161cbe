"""Checks of the bundled sample corpus (an employee handbook) and its questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "modeling_rag" / "sample_data"
HANDBOOK_DIR = SAMPLE_DIR / "handbook"
QUESTIONS_FILE = SAMPLE_DIR / "handbook_questions.jsonl"


def _documents() -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(HANDBOOK_DIR.glob("*.md"))}


def _questions() -> list[dict]:
    with open(QUESTIONS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_document_count() -> None:
    assert 25 <= len(_documents()) <= 40


@pytest.mark.parametrize("stem", sorted(_documents()))
def test_document_shape(stem: str) -> None:
    text = _documents()[stem]
    first_line = text.splitlines()[0]
    assert re.fullmatch(r"# \S.*", first_line), f"{stem}.md must start with a '# Title' heading"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", stem), f"{stem}.md: file names are lower-case words joined by '-'"
    words = len(text.split())
    assert 120 <= words <= 500, f"{stem}.md has {words} words"


def test_questions_are_well_formed() -> None:
    questions = _questions()
    assert 40 <= len(questions) <= 60
    ids = [q["id"] for q in questions]
    assert len(set(ids)) == len(ids), "question ids must be unique"
    assert len({q["question"] for q in questions}) == len(questions), "questions must be unique"
    stems = set(_documents())
    for q in questions:
        assert re.fullmatch(r"hb-\d{3}", q["id"]), q["id"]
        assert isinstance(q["question"], str) and q["question"].strip().endswith("?"), q["id"]
        assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"]), q["id"]
        assert q["positive_passage_ids"], q["id"]
        unknown = set(q["positive_passage_ids"]) - stems
        assert not unknown, f"{q['id']} names documents that do not exist: {unknown}"


def test_gold_answers_appear_in_positive_documents() -> None:
    documents = {stem: text.lower() for stem, text in _documents().items()}
    for q in _questions():
        for answer in q["answers"]:
            assert any(answer.lower() in documents[stem] for stem in q["positive_passage_ids"]), (
                f"{q['id']}: answer {answer!r} is in none of {q['positive_passage_ids']}"
            )


def test_every_question_topic_is_covered() -> None:
    """Most documents should be the positive passage of at least one question."""
    covered = {stem for q in _questions() for stem in q["positive_passage_ids"]}
    assert len(covered) >= 0.8 * len(_documents())

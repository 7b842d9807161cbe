"""Reading question files for evaluation and training.

A question row is a JSON object. The fields read (others are ignored):

* ``id`` (or ``qid`` / ``question_id``): defaults to the row's position (``"0"``, ``"1"``, ...).
* ``question`` (or ``query``): the question text.
* ``answers`` (or ``answer``): a string, a list of strings, SQuAD's ``{"text": [...], ...}``, or a list
  of ``{"text": ...}`` objects.
* ``positive_passage_ids``: gold passage ids (a list, or one id).
* ``positive_passages``: gold passage texts (a list, or one text).
* ``hard_negative_passage_ids``: ids of passages that look relevant but are not.
* ``asked_about_passage_id``: SQuAD v2's unanswerable questions name the passage they were written
  against, which does not answer them; it is read as one more hard-negative passage id.
* DPR style: ``positive_ctxs`` / ``hard_negative_ctxs``, lists of objects with ``passage_id`` (or ``id``
  or ``psg_id``), ``text`` and ``title``; their ids and texts are added to the fields above.

Example::

    from modeling_rag.qa_data import load_qa_examples

    examples = load_qa_examples("data/dev.jsonl")
    examples[0].question, examples[0].answers
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataFormatError, RagInputError

__all__ = ["QAExample", "check_passage_ids", "load_qa_examples"]

_ID_FIELDS = ("id", "qid", "question_id")
_QUESTION_FIELDS = ("question", "query")
_ANSWER_FIELDS = ("answers", "answer")
_CTX_ID_FIELDS = ("passage_id", "id", "psg_id")


@dataclass
class QAExample:
    """One question with its gold answers and, where known, its gold and hard-negative passages.

    Attributes:
        id: The question's id (the row position as a string when the source has none).
        question: The question text.
        answers: Gold answer strings (empty when the source has none and answers were not required).
        positive_passage_ids: Ids of passages that answer the question.
        positive_passages: Texts of passages that answer the question, when the source gives them (not
            necessarily aligned with ``positive_passage_ids``).
        hard_negative_passage_ids: Ids of passages that look relevant but do not answer the question.
    """

    id: str
    question: str
    answers: list[str] = field(default_factory=list)
    positive_passage_ids: list[str] = field(default_factory=list)
    positive_passages: list[str] = field(default_factory=list)
    hard_negative_passage_ids: list[str] = field(default_factory=list)


def load_qa_examples(
    source: str | os.PathLike | Any | Sequence[Mapping[str, Any]],
    *,
    require_answers: bool = True,
    require_question: bool = True,
) -> list[QAExample]:
    """Read questions from a JSON-lines file, a ``datasets.Dataset`` or a list of dicts.

    A file whose first non-blank character is ``[`` is read as one JSON array (as DPR ships its files);
    otherwise each non-blank line is one JSON object.

    Args:
        source: A path to a ``.jsonl`` (or JSON array) file, a ``datasets.Dataset``, or a list of dicts.
        require_answers: Raise for a row without answers; when ``False`` such rows get ``answers=[]``.
        require_question: Raise for a row without a question; when ``False`` such rows get ``question=""``.

    Returns:
        One :class:`QAExample` per row, in order.

    Raises:
        DataFormatError: The file cannot be read, is empty or is not valid JSON (the line is named), or a
            row is not an object, lacks a required question or answers, or has a field of the wrong type
            (the row is named: ``line N`` for files, ``row N`` (0-based) otherwise).
        RagInputError: ``source`` is none of the accepted types.
    """
    rows = _read_rows(source)
    examples = []
    for position, (where, row) in enumerate(rows):
        examples.append(
            _parse_row(row, position, where, require_answers=require_answers, require_question=require_question)
        )
    return examples


def check_passage_ids(examples: Iterable[QAExample], known_ids: Iterable[str], *, max_listed: int = 5) -> None:
    """Check that every positive and hard-negative passage id of the questions is in ``known_ids``.

    Args:
        examples: Questions, as returned by :func:`load_qa_examples`.
        known_ids: The passage ids of the corpus (or index).
        max_listed: How many unknown ids the error message names.

    Raises:
        DataFormatError: Some ids are unknown; the message names the first few (with a question that
            uses each) and gives the total count.
    """
    known = {str(pid) for pid in known_ids}
    unknown: dict[str, str] = {}  # unknown id -> first question id that uses it
    num_questions = 0
    for example in examples:
        missing = [
            pid for pid in (*example.positive_passage_ids, *example.hard_negative_passage_ids) if pid not in known
        ]
        if missing:
            num_questions += 1
        for pid in missing:
            unknown.setdefault(pid, example.id)
    if unknown:
        listed = ", ".join(f"{pid!r} (question {qid!r})" for pid, qid in list(unknown.items())[:max_listed])
        more = f" and {len(unknown) - max_listed} more" if len(unknown) > max_listed else ""
        raise DataFormatError(
            f"{len(unknown)} passage id(s) used by {num_questions} question(s) are not in the corpus "
            f"({len(known)} known ids): {listed}{more}. Check that the questions and the corpus/index match."
        )


# --- reading -------------------------------------------------------------------------------------------


def _read_rows(source: Any) -> list[tuple[str, Any]]:
    """``(location, row)`` pairs from any accepted source; raises for an empty one."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(os.fspath(source))
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise RagInputError(
            f"Got a DatasetDict with splits {list(source.keys())}; pass one split, e.g. dataset['validation']."
        )
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        rows = [(f"row {i}", row) for i, row in enumerate(source)]
        kind = "dataset"
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        rows = [(f"row {i}", row) for i, row in enumerate(source)]
        kind = "list"
    else:
        raise RagInputError(
            "load_qa_examples expects a path to a JSON-lines file, a datasets.Dataset or a list of dicts, "
            f"got {type(source).__name__}."
        )
    if not rows:
        raise DataFormatError(f"The question {kind} is empty: it holds no rows.")
    return rows


def _read_file(path: str) -> list[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise DataFormatError(f"Question file {path} does not exist.") from e
    except IsADirectoryError as e:
        raise DataFormatError(f"Question file {path} is a directory; give the path of a .jsonl file.") from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"Question file {path} is not UTF-8 text: {e}.") from e
    except OSError as e:
        raise DataFormatError(f"Question file {path} cannot be read: {e}.") from e

    if text.startswith("\ufeff"):  # a byte-order mark
        text = text[1:]
    if not text.strip():
        raise DataFormatError(f"Question file {path} is empty.")

    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"Question file {path} is not valid JSON at line {e.lineno}: {e.msg}.") from e
        if not data:
            raise DataFormatError(f"Question file {path} is empty: its JSON array holds no rows.")
        return [(f"row {i} of {path}", row) for i, row in enumerate(data)]

    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {lineno} of {path}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"Question file {path}: line {lineno} is not valid JSON ({e.msg}).") from e
    return rows


# --- parsing -------------------------------------------------------------------------------------------


def _first_present(row: Mapping[str, Any], names: Sequence[str]) -> Any:
    """The value of the first of ``names`` present in ``row`` and not ``None``."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _as_text(value: Any, what: str, where: str) -> str:
    """A scalar as a stripped string (numbers are allowed: ids and answers like 1911)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataFormatError(f"{where}: {what} must be a string, got {type(value).__name__} ({value!r:.60}).")


def _as_text_list(value: Any, what: str, where: str) -> list[str]:
    """A string or a list of strings as a list of non-empty stripped strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise DataFormatError(f"{where}: {what} must be a string or a list of strings, got {type(value).__name__}.")
    texts = [_as_text(item, what, where) for item in items]
    return [text for text in texts if text]


def _parse_answers(value: Any, where: str) -> list[str]:
    """Answers given as a string, a list, SQuAD's ``{"text": [...]}`` or a list of ``{"text": ...}``."""
    if isinstance(value, Mapping):
        if "text" not in value:
            raise DataFormatError(f"{where}: 'answers' is an object without a 'text' field (SQuAD style).")
        value = value["text"]
    if isinstance(value, (list, tuple)):
        value = [item.get("text") if isinstance(item, Mapping) else item for item in value]
        value = [item for item in value if item is not None]
    return _as_text_list(value, "each answer", where)


def _ctx_list(value: Any, what: str, where: str) -> list[Mapping[str, Any]]:
    """DPR contexts as a list of dicts (``datasets`` may hand them over as a dict of lists)."""
    if value is None:
        return []
    if isinstance(value, Mapping):  # columnar: {"text": [...], "passage_id": [...]}
        columns = {k: list(v) for k, v in value.items() if isinstance(v, (list, tuple))}
        n = max((len(v) for v in columns.values()), default=0)
        return [{k: v[i] for k, v in columns.items() if i < len(v)} for i in range(n)]
    if not isinstance(value, (list, tuple)) or not all(isinstance(ctx, Mapping) for ctx in value):
        raise DataFormatError(f"{where}: {what!r} must be a list of objects with 'passage_id'/'id' and 'text'.")
    return list(value)


def _ctx_ids(ctxs: list[Mapping[str, Any]], what: str, where: str) -> list[str]:
    ids = []
    for ctx in ctxs:
        pid = _first_present(ctx, _CTX_ID_FIELDS)
        if pid is not None:
            ids.append(_as_text(pid, f"a passage id in {what!r}", where))
    return [pid for pid in ids if pid]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _parse_row(row: Any, position: int, where: str, *, require_answers: bool, require_question: bool) -> QAExample:
    if not isinstance(row, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object with a 'question', got {type(row).__name__}.")

    raw_id = _first_present(row, _ID_FIELDS)
    qid = _as_text(raw_id, "'id'", where) if raw_id is not None else ""
    qid = qid or str(position)

    raw_question = _first_present(row, _QUESTION_FIELDS)
    question = _as_text(raw_question, "'question'", where) if raw_question is not None else ""
    if not question and require_question:
        raise DataFormatError(f"{where} (id {qid!r}) has no question: give a non-empty 'question' field.")

    raw_answers = _first_present(row, _ANSWER_FIELDS)
    answers = _unique(_parse_answers(raw_answers, where)) if raw_answers is not None else []
    if not answers and require_answers:
        raise DataFormatError(
            f"{where} (id {qid!r}) has no answers: give 'answers' (a string or a list of strings), "
            "or load with require_answers=False."
        )

    positive_ctxs = _ctx_list(row.get("positive_ctxs"), "positive_ctxs", where)
    negative_ctxs = _ctx_list(row.get("hard_negative_ctxs"), "hard_negative_ctxs", where)

    positive_ids = _as_text_list(row.get("positive_passage_ids"), "'positive_passage_ids'", where)
    positive_ids += _ctx_ids(positive_ctxs, "positive_ctxs", where)
    positive_texts = _as_text_list(row.get("positive_passages"), "'positive_passages'", where)
    positive_texts += [
        _as_text(ctx["text"], "a text in 'positive_ctxs'", where) for ctx in positive_ctxs if ctx.get("text")
    ]
    negative_ids = _as_text_list(row.get("hard_negative_passage_ids"), "'hard_negative_passage_ids'", where)
    negative_ids += _ctx_ids(negative_ctxs, "hard_negative_ctxs", where)
    negative_ids += _as_text_list(row.get("asked_about_passage_id"), "'asked_about_passage_id'", where)

    return QAExample(
        id=qid,
        question=question,
        answers=answers,
        positive_passage_ids=_unique(positive_ids),
        positive_passages=_unique(positive_texts),
        hard_negative_passage_ids=_unique(negative_ids),
    )

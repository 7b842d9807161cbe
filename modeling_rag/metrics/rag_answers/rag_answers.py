"""Exact match and token F1 of generated answers, with SQuAD normalisation (an ``evaluate`` metric).

This file is self-contained on purpose: ``evaluate.load`` copies it into its module cache and imports it
from there, where the ``modeling_rag`` package cannot be imported relatively. The text functions are
kept identical to those in ``modeling_rag.metrics`` (a test checks this).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP",
    year = "2016",
}
"""

_DESCRIPTION = """\
Exact match (EM) and token-level F1 between predicted answers and one or more gold answers per question,
after SQuAD normalisation (lowercase, remove punctuation, remove the articles a/an/the, collapse
whitespace). Each question scores the maximum over its gold answers; the corpus scores are means, in
percent (0-100), as the SQuAD evaluation script reports them.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one predicted answer per question.
    references (`list[list[str]]`): the gold answers of each question (a single string per question is
        accepted too). An empty list means the question is unanswerable: it is scored against `""`, so
        only an empty prediction scores on it (as SQuAD v2 does).
    return_per_example (`bool`, defaults to `False`): also return `exact_match_per_example` and
        `f1_per_example`, the per-question scores (in percent, so their means are the corpus scores).

Returns:
    exact_match (`float`): mean exact match, 0-100.
    f1 (`float`): mean token F1, 0-100.
    count (`int`): number of questions scored.

An empty prediction scores 0 unless one of the gold answers normalises to the empty string.

Examples:
    >>> metric = evaluate.load("modeling_rag/metrics/rag_answers")
    >>> metric.compute(predictions=["The Eiffel tower!"], references=[["Eiffel Tower", "a tower"]])
    {'exact_match': 100.0, 'f1': 100.0, 'count': 1}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the two strings are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 (0-1) between the normalised strings, as in the SQuAD v2 evaluation script.

    When either side normalises to no tokens, the score is 1.0 if both do and 0.0 otherwise.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: Iterable[str]) -> float:
    """Best score of ``metric_fn(prediction, gold)`` over the gold answers (``[]`` counts as ``[""]``)."""
    golds = list(ground_truths) or [""]
    return max(metric_fn(prediction, gold) for gold in golds)


def score_examples(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, list[float]]:
    """Per-question exact match and F1 in percent: ``{"exact_match": [...], "f1": [...]}``.

    Args:
        predictions: One predicted answer per question.
        references: The gold answers of each question (a list, or one string).

    Raises:
        ValueError: The two lists differ in length, or an entry is not a string.
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists.")
    exact, f1 = [], []
    for i, (prediction, golds) in enumerate(zip(predictions, references)):
        if isinstance(golds, str):
            golds = [golds]
        if not isinstance(prediction, str) or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"Question {i}: predictions and gold answers must be strings.")
        exact.append(100.0 * metric_max_over_ground_truths(exact_match_score, prediction, golds))
        f1.append(100.0 * metric_max_over_ground_truths(f1_score, prediction, golds))
    return {"exact_match": exact, "f1": f1}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RagAnswers(evaluate.Metric):
    """SQuAD exact match and F1 over several gold answers per question."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Value("string"),
                    }
                ),
            ],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references, return_per_example: bool = False) -> dict:
        per_example = score_examples(predictions, references)
        count = len(predictions)
        result = {
            "exact_match": sum(per_example["exact_match"]) / count if count else 0.0,
            "f1": sum(per_example["f1"]) / count if count else 0.0,
            "count": count,
        }
        if return_per_example:
            result["exact_match_per_example"] = per_example["exact_match"]
            result["f1_per_example"] = per_example["f1"]
        return result

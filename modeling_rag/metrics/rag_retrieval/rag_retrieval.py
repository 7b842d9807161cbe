"""Retrieval quality of a RAG retriever: top-k accuracy, recall@k, MRR, mean rank (an ``evaluate`` metric).

This file is self-contained on purpose: ``evaluate.load`` copies it into its module cache and imports it
from there, where the ``modeling_rag`` package cannot be imported relatively. The text functions are
kept identical to those in ``modeling_rag.metrics`` (a test checks this).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

import datasets
import evaluate

DEFAULT_K_VALUES: tuple[int, ...] = (1, 5, 10, 20)
INPUT_NAMES: tuple[str, ...] = ("predictions", "references", "retrieved_texts", "answers")

_CITATION = """\
@inproceedings{karpukhin-etal-2020-dense,
    title = "Dense Passage Retrieval for Open-Domain Question Answering",
    author = "Karpukhin, Vladimir and Oguz, Barlas and Min, Sewon and Lewis, Patrick and Wu, Ledell and
              Edunov, Sergey and Chen, Danqi and Yih, Wen-tau",
    booktitle = "Proceedings of EMNLP",
    year = "2020",
}
"""

_DESCRIPTION = """\
Scores ranked passage retrieval for a set of questions. By gold passage id: top-k accuracy (a gold passage
is among the first k retrieved), recall@k (the fraction of a question's gold passages among the first k),
mean reciprocal rank of the first gold passage, and its mean rank. By gold answer, DPR-style: top-k
accuracy where a hit is a retrieved passage whose text contains a gold answer (both SQuAD-normalised,
matched as whole tokens). All rates are fractions in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Every input is a list with one entry per question; give at least `predictions` or `retrieved_texts`, and
`references` and/or `answers`. An input left out counts as an empty list for every question.

Args:
    predictions (`list[list[str]]`): the retrieved passage ids of each question, best first.
    references (`list[list[str]]`): the gold passage ids of each question. Questions with none are
        skipped by the id metrics and counted in `num_without_gold_ids`.
    retrieved_texts (`list[list[str]]`, optional): the texts of the retrieved passages, in the same order
        as `predictions` (same length when both are given). Needed for the answer metrics.
    answers (`list[list[str]]`, optional): the gold answers of each question, for the answer metrics.
        Questions without answers or without retrieved texts are skipped by them and counted in
        `num_without_answers`.
    k_values (`list[int]`, optional): the cut-offs k; defaults to the `k_values` given to `evaluate.load`,
        else [1, 5, 10, 20].

Returns (a key is left out when no question can be scored for it):
    top_{k}_accuracy (`float`): questions with a gold id in the top k / questions with gold ids.
    recall_at_{k} (`float`): mean over questions with gold ids of |gold ids in top k| / |gold ids|.
    mrr (`float`): mean of 1 / rank of the first gold id (0 when no gold id is retrieved).
    mean_rank (`float`): mean rank (1 = first) of the first gold id, over the questions whose gold passage
        was retrieved at all.
    answer_top_{k}_accuracy (`float`): questions with a gold answer in one of the top k texts / questions
        scored by the answer metrics.
    num_questions, num_with_gold_ids, num_without_gold_ids, num_gold_not_retrieved, num_with_answers,
    num_without_answers (`int`): the counts behind the rates.

Examples:
    >>> metric = evaluate.load("modeling_rag/metrics/rag_retrieval", k_values=[1, 2])
    >>> metric.compute(predictions=[["p3", "p1"]], references=[["p1"]])["mrr"]
    0.5
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_in_text(answers: Iterable[str], text: str) -> bool:
    """Whether any answer, normalised, occurs in the normalised ``text`` as a whole-token sequence.

    Matching whole tokens (not raw substrings) means "911" is not found in "1911". Answers that normalise
    to nothing never match.
    """
    haystack = f" {normalize_answer(text)} "
    for answer in answers:
        needle = normalize_answer(answer)
        if needle and f" {needle} " in haystack:
            return True
    return False


def check_k_values(k_values: Iterable[int] | None) -> list[int]:
    """Sorted, de-duplicated cut-offs; ``None`` gives :data:`DEFAULT_K_VALUES`.

    Raises:
        ValueError: A cut-off is not a positive integer, or the list is empty.
    """
    if k_values is None:
        return list(DEFAULT_K_VALUES)
    if isinstance(k_values, int):
        k_values = [k_values]
    values = list(k_values)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"k_values must be a non-empty list of positive integers, got {values!r}.")
    return sorted(set(values))


def fill_missing_inputs(inputs: dict) -> dict:
    """Replace inputs that were left out (``None``) by one empty list per question.

    A single string given for a question (e.g. one gold answer) becomes a list of one.

    Raises:
        ValueError: Every input is missing, or the given inputs differ in length.
    """
    given = {name: value for name, value in inputs.items() if value is not None}
    if not given:
        raise ValueError(f"Give at least one of {', '.join(INPUT_NAMES)}.")
    lengths = {name: len(value) for name, value in given.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"All inputs need one entry per question; got lengths {lengths}.")
    n = next(iter(lengths.values()))
    filled = {}
    for name in INPUT_NAMES:
        value = inputs.get(name)
        if value is None:
            filled[name] = [[] for _ in range(n)]
        else:  # one string for a question means a list of one
            filled[name] = [[entry] if isinstance(entry, str) else entry for entry in value]
    return filled


def compute_retrieval_metrics(
    predictions: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    retrieved_texts: Sequence[Sequence[str]] | None = None,
    answers: Sequence[Sequence[str]] | None = None,
    k_values: Iterable[int] | None = None,
) -> dict:
    """The metric's computation on plain lists (see the module description for inputs and outputs)."""
    ks = check_k_values(k_values)
    filled = fill_missing_inputs(
        {"predictions": predictions, "references": references, "retrieved_texts": retrieved_texts, "answers": answers}
    )
    predictions, references = filled["predictions"], filled["references"]
    retrieved_texts, answers = filled["retrieved_texts"], filled["answers"]
    n = len(predictions)

    id_hits = {k: 0 for k in ks}
    recall_sums = {k: 0.0 for k in ks}
    answer_hits = {k: 0 for k in ks}
    reciprocal_ranks: list[float] = []
    first_ranks: list[int] = []
    num_with_gold_ids = num_gold_not_retrieved = num_with_answers = 0

    for i in range(n):
        ids, gold, texts, golds = list(predictions[i]), list(references[i]), list(retrieved_texts[i]), answers[i]
        if isinstance(golds, str):
            golds = [golds]
        if ids and texts and len(ids) != len(texts):
            raise ValueError(f"Question {i}: {len(ids)} retrieved ids but {len(texts)} retrieved texts.")

        gold_set = set(gold)
        if gold_set:
            num_with_gold_ids += 1
            first = next((rank for rank, pid in enumerate(ids, start=1) if pid in gold_set), None)
            if first is None:
                num_gold_not_retrieved += 1
                reciprocal_ranks.append(0.0)
            else:
                reciprocal_ranks.append(1.0 / first)
                first_ranks.append(first)
            for k in ks:
                found = gold_set.intersection(ids[:k])
                id_hits[k] += bool(found)
                recall_sums[k] += len(found) / len(gold_set)

        if golds and texts:
            num_with_answers += 1
            first_text = next((r for r, text in enumerate(texts, start=1) if answer_in_text(golds, text)), None)
            for k in ks:
                answer_hits[k] += first_text is not None and first_text <= k

    result: dict = {}
    if num_with_gold_ids:
        for k in ks:
            result[f"top_{k}_accuracy"] = id_hits[k] / num_with_gold_ids
        for k in ks:
            result[f"recall_at_{k}"] = recall_sums[k] / num_with_gold_ids
        result["mrr"] = sum(reciprocal_ranks) / num_with_gold_ids
        if first_ranks:
            result["mean_rank"] = sum(first_ranks) / len(first_ranks)
    if num_with_answers:
        for k in ks:
            result[f"answer_top_{k}_accuracy"] = answer_hits[k] / num_with_answers
    result.update(
        {
            "num_questions": n,
            "num_with_gold_ids": num_with_gold_ids,
            "num_without_gold_ids": n - num_with_gold_ids,
            "num_gold_not_retrieved": num_gold_not_retrieved,
            "num_with_answers": num_with_answers,
            "num_without_answers": n - num_with_answers,
        }
    )
    return result


_STRING_LIST = datasets.Sequence(datasets.Value("string"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RagRetrieval(evaluate.Metric):
    """Top-k accuracy (by id and by answer), recall@k, MRR and mean rank of ranked retrieval."""

    def __init__(self, *args, k_values: Iterable[int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_values = check_k_values(k_values)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: _STRING_LIST for name in INPUT_NAMES}),
            reference_urls=["https://arxiv.org/abs/2004.04906"],
        )

    @staticmethod
    def _fill(predictions, references, kwargs: dict) -> dict:
        inputs = {"predictions": predictions, "references": references}
        inputs.update({name: kwargs.pop(name) for name in INPUT_NAMES[2:] if name in kwargs})
        return fill_missing_inputs({name: inputs.get(name) for name in INPUT_NAMES})

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of questions; any input left out counts as empty lists."""
        super().add_batch(**self._fill(predictions, references, kwargs), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one question; any input left out counts as an empty list."""
        inputs = {"predictions": prediction, "references": reference}
        inputs.update({name: kwargs.pop(name) for name in INPUT_NAMES[2:] if name in kwargs})
        example = {}
        for name in INPUT_NAMES:
            value = inputs.get(name)
            example[name] = [] if value is None else [value] if isinstance(value, str) else value
        super().add(
            prediction=example["predictions"],
            reference=example["references"],
            retrieved_texts=example["retrieved_texts"],
            answers=example["answers"],
            **kwargs,
        )

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict | None:
        """Compute the metrics (see the module description); inputs left out count as empty lists."""
        given = [predictions, references] + [kwargs.get(name) for name in INPUT_NAMES[2:]]
        if any(value is not None for value in given):
            kwargs = dict(kwargs)
            return super().compute(**self._fill(predictions, references, kwargs), **kwargs)
        return super().compute(**kwargs)

    def _compute(self, predictions, references, retrieved_texts, answers, k_values=None) -> dict:
        return compute_retrieval_metrics(
            predictions,
            references,
            retrieved_texts,
            answers,
            k_values=self.k_values if k_values is None else k_values,
        )

"""Local ``evaluate`` metric modules for RAG, and the pure-python scoring functions they use.

Two metric folders ship with the package, each loadable with ``evaluate.load(path)`` and needing no
network:

* ``rag_answers``: SQuAD exact match and token F1 (maximum over several gold answers), in percent.
* ``rag_retrieval``: top-k accuracy by gold passage id, DPR-style top-k accuracy by answer string,
  recall@k, MRR and mean rank of the first gold hit.

``evaluate`` copies a metric script into its own module cache and imports it from there, so the scripts
cannot import this package relatively. Each script therefore carries its own copy of the text functions
below; ``tests/test_metrics.py`` checks that the copies agree with these.

Example::

    from modeling_rag.metrics import load_metric

    squad = load_metric("rag_answers")
    squad.compute(predictions=["Paris"], references=[["Paris", "the city of Paris"]])
    # {'exact_match': 100.0, 'f1': 100.0, 'count': 1}
"""

from __future__ import annotations

import collections
import functools
import os
import re
import string
from collections.abc import Iterable
from typing import Any

from ..errors import RagInputError

__all__ = [
    "AVAILABLE_METRICS",
    "answer_in_text",
    "exact_match_score",
    "f1_score",
    "load_metric",
    "metric_max_over_ground_truths",
    "metric_path",
    "metric_script",
    "normalize_answer",
]

#: Names of the metric folders shipped in this package.
AVAILABLE_METRICS: tuple[str, ...] = ("rag_answers", "rag_retrieval")

_METRICS_DIR = os.path.dirname(os.path.abspath(__file__))

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def metric_path(name: str) -> str:
    """Absolute path of the folder of the local metric ``name`` (pass it to ``evaluate.load``).

    Args:
        name: One of :data:`AVAILABLE_METRICS` (``"rag_answers"`` or ``"rag_retrieval"``).

    Raises:
        RagInputError: ``name`` is not a metric shipped with the package.
    """
    if name not in AVAILABLE_METRICS:
        raise RagInputError(f"Unknown metric {name!r}; available metrics: {', '.join(AVAILABLE_METRICS)}.")
    path = os.path.join(_METRICS_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):  # pragma: no cover - broken install
        raise RagInputError(f"The metric script {name}.py is missing from {path}; reinstall modeling_rag.")
    return path


def load_metric(name: str, **kwargs: Any):
    """Load a local metric with ``evaluate.load`` (no network).

    Args:
        name: One of :data:`AVAILABLE_METRICS`.
        **kwargs: Passed on to ``evaluate.load`` (e.g. ``experiment_id``, ``keep_in_memory``, or the
            metric's own settings such as ``k_values=[1, 3]`` for ``rag_retrieval``).

    Returns:
        The ``evaluate.EvaluationModule``.
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


@functools.cache
def metric_script(name: str):
    """The metric script ``name`` imported as a module, for its plain functions (e.g. ``rag_retrieval``'s
    ``compute_retrieval_metrics``, the one computation of the retrieval metrics that training also uses)."""
    import importlib.util

    path = os.path.join(metric_path(name), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"modeling_rag.metrics._{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """Best score of ``metric_fn(prediction, gold)`` over the gold answers.

    An empty list of gold answers is treated as ``[""]`` (an unanswerable question, as SQuAD v2 does),
    so only an empty prediction scores on it.
    """
    golds = list(ground_truths) or [""]
    return max(metric_fn(prediction, gold) for gold in golds)


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

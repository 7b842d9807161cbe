"""The numbers of an evaluation: answer metrics (``rag_answers``: SQuAD exact match and F1, an abstention
scoring 0), retrieval metrics (``rag_retrieval``), abstention rates, the risk-coverage curve and latency.

`compute_metrics` takes the per-question records the evaluation loop gathered (dicts with ``answer``,
``reader_answer``, ``abstained``, ``confidence``, ``unanswerable``, ``gold_answers``,
``gold_passage_ids``, ``retrieved_ids``, ``retrieved_texts``) and fills in each record's ranks and scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics import load_metric
from .gold import answer_rank, gold_rank, match_gold

__all__ = ["compute_metrics", "percentiles", "risk_coverage", "timing_summary"]


def compute_metrics(records: list[dict], *, k_values: Sequence[int], retriever_only: bool) -> dict[str, Any]:
    """Answer metrics (``rag_answers``) and retrieval metrics (``rag_retrieval``); fills per-row EM/F1 and ranks."""
    for r in records:
        r["gold_rank"] = gold_rank(r["retrieved_ids"], r["gold_passage_ids"])
        r["answer_rank"] = answer_rank(r["retrieved_texts"], r["gold_answers"])
        r["exact_match"] = r["f1"] = None

    retrieval = load_metric("rag_retrieval", k_values=list(k_values), keep_in_memory=True).compute(
        predictions=[[match_gold(pid, r["gold_passage_ids"]) for pid in r["retrieved_ids"]] for r in records],
        references=[r["gold_passage_ids"] for r in records],
        retrieved_texts=[r["retrieved_texts"] for r in records],
        answers=[r["gold_answers"] for r in records],
    )
    metrics: dict[str, Any] = {"retrieval": retrieval}
    if retriever_only:
        return metrics
    scored = [r for r in records if r["gold_answers"]]
    answers = answer_metrics(scored, num_records=len(records))
    metrics["answers"] = answers
    unanswerable = [r for r in records if r["unanswerable"]]
    if unanswerable:
        metrics["abstention"] = {
            "num_unanswerable": len(unanswerable),
            "unanswerable_abstained": float(np.mean([bool(r["abstained"]) for r in unanswerable])),
            "num_answerable": len(scored),
            "answerable_abstained": answers.get("wrongly_abstained"),
        }
    metrics["risk_coverage"] = risk_coverage(scored + unanswerable)
    return metrics


def answer_metrics(scored: list[dict], *, num_records: int) -> dict[str, Any]:
    """EM / F1 of the records with gold answers (`scored`), overall and over the answered ones; fills each
    record's ``exact_match``, ``f1`` (0 for an abstention) and ``reader_f1`` (the reader's own answer)."""
    answers: dict[str, Any] = {"num_scored": len(scored), "num_skipped_without_answers": num_records - len(scored)}
    if not scored:
        return answers
    answer_metric = load_metric("rag_answers", keep_in_memory=True)
    result = answer_metric.compute(
        predictions=[r["answer"] for r in scored],
        references=[r["gold_answers"] for r in scored],
        return_per_example=True,
    )
    # an abstention answers nothing: it scores 0, whatever words the no-answer response shares
    for r, em, f1 in zip(scored, result["exact_match_per_example"], result["f1_per_example"]):
        r["exact_match"], r["f1"] = (0.0, 0.0) if r["abstained"] else (em, f1)
    reader = answer_metric.compute(
        predictions=[r["reader_answer"] for r in scored],
        references=[r["gold_answers"] for r in scored],
        return_per_example=True,
    )
    for r, f1 in zip(scored, reader["f1_per_example"]):
        r["reader_f1"] = f1
    answered = [r for r in scored if not r["abstained"]]
    answers.update(
        exact_match=float(np.mean([r["exact_match"] for r in scored])),
        f1=float(np.mean([r["f1"] for r in scored])),
        wrongly_abstained=float(np.mean([bool(r["abstained"]) for r in scored])),
        num_answered=len(answered),
        answered_exact_match=float(np.mean([r["exact_match"] for r in answered])) if answered else None,
        answered_f1=float(np.mean([r["f1"] for r in answered])) if answered else None,
    )
    return answers


def risk_coverage(records: list[dict]) -> dict[str, Any]:
    """Accuracy against coverage when answering only the most confident questions first.

    A question's utility is the F1 (0-1) of the reader's own answer when it has gold answers, and 0 for an
    unanswerable question (answering it is wrong); abstaining has no utility and no risk. Returns the curve
    (coverage, accuracy of the answered) and its area (higher is better).
    """
    if not records:
        return {"coverage": [], "accuracy": [], "area": None}
    order = sorted(records, key=lambda r: -(r["confidence"] if r["confidence"] is not None else 0.0))
    utility = np.array([(r.get("reader_f1") or 0.0) / 100.0 if not r["unanswerable"] else 0.0 for r in order])
    answered = np.arange(1, len(order) + 1)
    accuracy = np.cumsum(utility) / answered
    coverage = answered / len(order)
    return {
        "coverage": [round(float(c), 4) for c in coverage],
        "accuracy": [round(float(a), 4) for a in accuracy],
        "area": float(np.mean(accuracy)),
        "how": "questions sorted by confidence; accuracy = mean F1 (0-1) of the answered, unanswerable answered = 0",
    }


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / mean of ``values`` (None when empty)."""
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
    }


def timing_summary(records: list[dict], wall_seconds: float, latency_batch_size: int) -> dict[str, Any]:
    """Per-question latency p50/p95 (retrieval, generation, both) and throughput."""
    retrieval = [r["retrieval_seconds"] for r in records]
    generation = [r["generation_seconds"] for r in records if r["generation_seconds"] is not None]
    total = [r["retrieval_seconds"] + (r["generation_seconds"] or 0.0) for r in records]
    return {
        "latency_batch_size": latency_batch_size,
        "how": "seconds per question = time of a (sub-)batch / its size, measured in each process after one "
        "untimed warm-up question",
        "retrieval_seconds": percentiles(retrieval),
        "generation_seconds": percentiles(generation),
        "total_seconds": percentiles(total),
        "wall_seconds": wall_seconds,
        "questions_per_second": len(records) / wall_seconds if wall_seconds > 0 else None,
    }

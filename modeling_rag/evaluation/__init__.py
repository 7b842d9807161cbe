"""Evaluating a RAG model on questions, the reusable parts of ``scripts/evaluate_rag.py``:

    gold.py      where the gold passage and the first answer-bearing passage rank (chunks ``doc#n`` count)
    scoring.py   answer, retrieval and abstention metrics, the risk-coverage curve, latency percentiles
    plots.py     ``recall_at_k.png`` and ``risk_coverage.png``
    report.py    ``results.json`` / ``predictions.jsonl`` writing, the machine facts, model-card entries,
                 the printed summary

The script keeps the command line, loading and the accelerate loop over questions.
"""

from .gold import answer_rank, gold_rank, match_gold
from .plots import plot_recall, plot_risk_coverage
from .report import (
    eval_result_entries,
    machine_info,
    prediction_rows,
    summary_text,
    update_model_card,
    write_json,
    write_predictions,
)
from .scoring import compute_metrics, percentiles, risk_coverage, timing_summary

__all__ = [
    "answer_rank",
    "compute_metrics",
    "eval_result_entries",
    "gold_rank",
    "machine_info",
    "match_gold",
    "percentiles",
    "plot_recall",
    "plot_risk_coverage",
    "prediction_rows",
    "risk_coverage",
    "summary_text",
    "timing_summary",
    "update_model_card",
    "write_json",
    "write_predictions",
]

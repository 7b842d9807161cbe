"""What an evaluation writes and prints: ``results.json`` and ``predictions.jsonl`` (atomically), the facts
of the machine the numbers were measured on, the model card's eval-result entries (merged into
``eval_results.json``), and the short summary printed at the end."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch
import transformers

from .. import __version__
from ..constants import EVAL_RESULTS_NAME
from ..errors import DataFormatError
from ..utils.atomic import atomic_open, atomic_write_text

__all__ = [
    "eval_result_entries",
    "machine_info",
    "prediction_rows",
    "summary_text",
    "update_model_card",
    "write_json",
    "write_predictions",
]

PREDICTION_KEYS = (
    "id",
    "question",
    "answer",
    "abstained",
    "confidence",
    "reader_answer",
    "signals",
    "unanswerable",
    "gold_answers",
    "gold_passage_ids",
    "retrieved_ids",
    "retrieved_scores",
    "gold_rank",
    "answer_rank",
    "exact_match",
    "f1",
    "retrieval_seconds",
    "generation_seconds",
)


def write_json(path: str, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def prediction_rows(records: list[dict]) -> list[dict]:
    """The rows of predictions.jsonl (records without the passage texts)."""
    return [{k: r[k] for k in PREDICTION_KEYS} for r in records]


def write_predictions(path: str, records: list[dict]) -> None:
    """predictions.jsonl, one JSON object per question, atomically."""
    with atomic_open(path) as f:
        for row in prediction_rows(records):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def machine_info(accelerator) -> dict[str, Any]:
    """Where the numbers were measured (an `accelerate.Accelerator` gives the device and processes)."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modeling_rag": __version__,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }
    if accelerator.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(accelerator.device)
    return info


def eval_result_entries(metrics: dict, dataset_name: str, split: str, k_values: list[int]) -> list[dict]:
    """Model-card eval results (``model-index`` entries) for the main scores."""
    base = {"task_type": "question-answering", "dataset_name": dataset_name, "dataset_type": dataset_name}
    base["dataset_split"] = split

    def entry(key: str, name: str, value: float) -> dict:
        return {**base, "metric_type": key, "metric_name": name, "metric_value": value}

    entries = []
    answers = metrics.get("answers") or {}
    for key, name in (("exact_match", "Exact match"), ("f1", "F1"), ("answered_f1", "F1 over answered questions")):
        if answers.get(key) is not None:
            entries.append(entry(key, name, round(answers[key], 2)))
    abstention = metrics.get("abstention") or {}
    for key, name in (
        ("unanswerable_abstained", "Unanswerable questions abstained (%)"),
        ("answerable_abstained", "Answerable questions abstained (%)"),
    ):
        if abstention.get(key) is not None:
            entries.append(entry(key, name, round(100 * abstention[key], 2)))
    retrieval = metrics["retrieval"]
    for k in k_values:
        key = f"top_{k}_accuracy"
        if retrieval.get(key) is not None:
            entries.append(entry(key, f"Top-{k} retrieval accuracy", round(100 * retrieval[key], 2)))
    if retrieval.get("mrr") is not None:
        entries.append(entry("mrr", "MRR", round(retrieval["mrr"], 4)))
    return entries


def update_model_card(folder: str, entries: list[dict]) -> str:
    """Merges ``entries`` into ``folder/eval_results.json`` (same dataset, split and metric replaced) and
    regenerates the model card; returns the card's path."""
    from ..model_card import card_data_from_model_folder, write_model_card

    path = os.path.join(folder, EVAL_RESULTS_NAME)
    existing: list[dict] = []
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
        if isinstance(stored, dict):
            stored = stored.get("eval_results") or stored.get("results") or []
        existing = [r for r in stored if isinstance(r, dict)] if isinstance(stored, list) else []

    def key(r: dict) -> tuple:
        return (r.get("dataset_name"), r.get("dataset_split"), r.get("metric_type"))

    new_keys = {key(r) for r in entries}
    merged = [r for r in existing if key(r) not in new_keys] + entries
    write_json(path, {"eval_results": merged})
    return write_model_card(folder, card_data_from_model_folder(folder))


def _line(key: str, value: Any, digits: int) -> str:
    return f"  {key:28s} {value:.{digits}f}" if isinstance(value, float) else f"  {key:28s} {value}"


def summary_text(results: dict) -> str:
    """A short table of the main numbers of `results` (as written to results.json)."""
    m = results["metrics"]
    lines = [f"Evaluated {results['questions']['count']} questions ({results['settings']['retriever']} retrieval)"]
    for key, value in m["retrieval"].items():
        if isinstance(value, float):
            lines.append(f"  {key:28s} {value:.4f}")
    for key in (
        "exact_match",
        "f1",
        "answered_exact_match",
        "answered_f1",
        "wrongly_abstained",
        "num_scored",
        "num_skipped_without_answers",
    ):
        if key in m.get("answers", {}):
            lines.append(_line(key, m["answers"][key], 2))
    for key, value in (m.get("abstention") or {}).items():
        lines.append(_line(key, value, 3))
    t = results["timing"]
    for part in ("retrieval_seconds", "generation_seconds", "total_seconds"):
        p = t[part]
        if p["p50"] is not None:
            lines.append(f"  latency {part:20s} p50 {1000 * p['p50']:.1f} ms  p95 {1000 * p['p95']:.1f} ms")
    return "\n".join(lines)

"""The evaluation's figures: ``recall_at_k.png`` (top-k accuracy against k) and ``risk_coverage.png``
(accuracy of the answered questions against the share answered, most confident first). Written atomically;
matplotlib is imported only here, with the Agg backend (no display needed)."""

from __future__ import annotations

from typing import Any

from ..utils.atomic import atomic_open

__all__ = ["plot_recall", "plot_risk_coverage"]

_RECALL_LINES = (
    ("top_{k}_accuracy", "gold passage in top k", "-", "o"),
    ("answer_top_{k}_accuracy", "answer in a top-k passage (DPR)", "-", "s"),
    ("recall_at_{k}", "recall@k (share of gold passages)", "--", "x"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    fig.tight_layout()
    try:
        with atomic_open(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def plot_recall(path: str, retrieval: dict[str, Any], k_values: list[int], title: str) -> None:
    """recall_at_k.png: top-k accuracy (gold passage, answer in passage) and recall@k against k."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label, style, marker in _RECALL_LINES:
        values = [retrieval.get(key.format(k=k)) for k in k_values]
        if all(v is not None for v in values):
            ax.plot(k_values, values, linestyle=style, marker=marker, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(k_values)
    ax.set_xticklabels([str(k) for k in k_values])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    _save(fig, path)


def plot_risk_coverage(path: str, curve: dict[str, Any], title: str) -> None:
    """risk_coverage.png: accuracy of the answered questions against the share answered (by confidence)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(curve["coverage"], curve["accuracy"], "-")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of questions answered, most confident first)")
    ax.set_ylabel("accuracy of the answered (F1)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _save(fig, path)

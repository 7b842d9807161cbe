"""Checks that both sides did the same work; a failed one stops the run, naming its phase.

A speed ratio means something only if both sides computed the same thing. Each phase's outputs are
compared: the weights every wrapper holds, the retrieved document ids and scores, the generator
inputs (token for token, padding aside), the generated tokens, and the training loss and gradient
norms. Every check is recorded (and printed under the results table), passed or not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


class BenchmarkMismatch(RuntimeError):
    """The two sides of the benchmark did not compute the same thing; the message names the phase."""


@dataclass
class Check:
    phase: str
    name: str
    passed: bool
    detail: str


class CheckLog:
    """The checks of one run, in order; `require` records one and raises on a failure."""

    def __init__(self):
        self.checks: list[Check] = []

    def require(self, phase: str, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append(Check(phase, name, bool(passed), detail))
        if not passed:
            raise BenchmarkMismatch(
                f"benchmark stopped in phase {phase!r}: {name} failed ({detail}). The two sides did not do the "
                "same work, so their times cannot be compared."
            )

    def as_list(self) -> list[dict]:
        return [asdict(c) for c in self.checks]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for values both sides compute with different chunking and summation order."""
    return 1e-3 if dtype == torch.float32 else 3e-2


def check_weights(log: CheckLog, weights: dict[str, dict[str, str]]) -> None:
    """Every wrapper holds the seeded weights (nothing re-initialised or altered on wrapping)."""
    seeded = weights["seeded"]
    for holder, parts in weights.items():
        for part, value in parts.items():
            log.require("setup", f"{holder} {part} weights equal the seeded ones", value == seeded[part], value)


def real_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's token ids without its padding."""
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


def check_retrieval(log: CheckLog, ours: dict, theirs: dict, dtype: torch.dtype, variants: dict | None = None) -> None:
    """Same documents, same scores and the same generator inputs on both sides (and in our variants)."""
    ours_ids, theirs_ids = ours["retrieved_doc_ids"].cpu(), theirs["doc_ids"].cpu()
    log.require(
        "retrieval",
        "same retrieved document ids",
        ours_ids.shape == theirs_ids.shape and torch.equal(ours_ids, theirs_ids.to(ours_ids.dtype)),
        f"{int((ours_ids != theirs_ids).sum()) if ours_ids.shape == theirs_ids.shape else 'shapes differ'} differ"
        f" of {ours_ids.numel()}",
    )
    a, b = ours["doc_scores"].float().cpu(), theirs["doc_scores"].float().cpu()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    log.require("retrieval", "same document scores", err <= tolerance(dtype), f"max relative difference {err:.2e}")
    o_rows = real_rows(ours["context_input_ids"], ours["context_attention_mask"])
    t_rows = real_rows(theirs["context_input_ids"], theirs["context_attention_mask"])
    differing = sum(x != y for x, y in zip(o_rows, t_rows)) + abs(len(o_rows) - len(t_rows))
    log.require(
        "retrieval",
        "identical generator inputs (padding aside)",
        differing == 0,
        f"{differing} of {len(t_rows)} rows differ",
    )
    for name, out in (variants or {}).items():
        rows = real_rows(out["context_input_ids"], out["context_attention_mask"])
        log.require("retrieval", f"{name} packs the same generator inputs", rows == o_rows, name)


def check_tokens(log: CheckLog, phase: str, outputs: dict[str, list[torch.Tensor]]) -> None:
    """Every call of every side generated the same tokens."""
    reference = outputs["ours"][0].cpu()
    for side, calls in outputs.items():
        same = [tuple(o.shape) == tuple(reference.shape) and torch.equal(o.cpu(), reference) for o in calls]
        detail = f"{sum(same)} of {len(same)} calls give the tokens of ours' first call {tuple(reference.shape)}"
        what = "deterministic generated tokens" if side == "ours" else f"{side}: identical generated tokens"
        log.require(phase, what, all(same), detail)


def check_training(log: CheckLog, outputs: dict[str, list[dict]], dtype: torch.dtype) -> None:
    """Loss and gradient norms of every step equal ours' first step, within float tolerance."""
    reference = outputs["ours"][0]
    tol = tolerance(dtype)
    for key in ("loss", "generator_grad_norm", "question_encoder_grad_norm"):
        worst = max(
            abs(step[key] - reference[key]) / max(abs(reference[key]), 1e-12)
            for calls in outputs.values()
            for step in calls
        )
        log.require(
            "train",
            f"equal {key.replace('_', ' ')} on both sides",
            worst <= tol,
            f"ours {reference[key]:.6g}, theirs {outputs['theirs'][0][key]:.6g}, max relative difference {worst:.1e}",
        )

"""Where the gold passage, and the first passage holding a gold answer, rank among the retrieved ones.

A retrieved chunk ``"<gold id>#<n>"`` counts as the gold passage ``"<gold id>"`` (`utils.chunk_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..metrics import answer_in_text
from ..utils.chunk_ids import is_part_of

__all__ = ["answer_rank", "gold_rank", "match_gold"]


def gold_rank(retrieved_ids: Sequence[str], gold_ids: Sequence[str]) -> int | None:
    """1-based rank of the first retrieved passage that is a gold passage (or a chunk of one), else None."""
    for rank, pid in enumerate(retrieved_ids, start=1):
        if match_gold(pid, gold_ids) in gold_ids:
            return rank
    return None


def match_gold(passage_id: str, gold_ids: Sequence[str]) -> str:
    """The gold id that ``passage_id`` is (exactly, or as a chunk ``gold#n``), else ``passage_id`` itself."""
    for gold in gold_ids:
        if is_part_of(passage_id, gold):
            return gold
    return passage_id


def answer_rank(texts: Sequence[str], answers: Sequence[str]) -> int | None:
    """1-based rank of the first passage text that contains a gold answer (DPR-style), else None."""
    if not answers:
        return None
    for rank, text in enumerate(texts, start=1):
        if answer_in_text(answers, text):
            return rank
    return None

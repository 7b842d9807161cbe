"""The passage-id rule of chunked documents: a document that fits is one passage with the document's
id; a longer one becomes passages ``doc#0``, ``doc#1``, ... Questions may name either a passage or a
document, so gold ids are matched through these helpers.
"""

from __future__ import annotations

__all__ = ["chunk_id", "document_id", "is_part_of"]

SEPARATOR = "#"


def chunk_id(document: str, n: int) -> str:
    """The id of chunk `n` (0-based) of `document`."""
    return f"{document}{SEPARATOR}{n}"


def document_id(passage_id: str) -> str | None:
    """The document a chunk id belongs to (``"doc#3"`` -> ``"doc"``), or None for an id that is not a chunk's."""
    if SEPARATOR not in passage_id:
        return None
    return passage_id.rsplit(SEPARATOR, 1)[0]


def is_part_of(passage_id: str, gold_id: str) -> bool:
    """Whether `passage_id` is the passage `gold_id` or one of the chunks of the document `gold_id`."""
    return passage_id == gold_id or passage_id.startswith(gold_id + SEPARATOR)

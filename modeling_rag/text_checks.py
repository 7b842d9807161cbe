"""Checks on text handed to the public entry points, before it reaches a tokenizer.

A Python ``str`` may hold a lone surrogate (``"\\ud800"``), left by decoding bytes with
``errors="surrogateescape"`` or by a JSON ``\\u`` escape of half a character. It is not text: it
cannot be written as UTF-8, and the tokenizers library refuses it with a ``TypeError`` that names
none of this.
"""

from __future__ import annotations

from .errors import RagInputError


def check_encodable(text: str, what: str) -> None:
    """Raises [`RagInputError`] naming `what` if `text` cannot be encoded as UTF-8 (a lone surrogate)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RagInputError(
            f"{what} holds {text[err.start : err.end]!r} at character {err.start}, a lone surrogate that is not "
            "valid Unicode text (often left by decoding bytes with errors='surrogateescape', or by a JSON "
            "\\u escape of half a character). Remove it, or clean the text first, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None

"""Passage token ids kept with the index, so that answering a question never tokenises a passage.

Packing a generator input needs the token ids of every retrieved passage. The `ContextPacker`
tokenises a passage the first time it sees it and caches the ids, so a passage costs a tokenizer
call once per process: for 32 questions x 5 fresh passages that is ~40 ms, a fifth of the whole
retrieval (`docs/benchmarks.md`). A [`PassageTokens`] store tokenises the corpus once, when the index
is built, with the generator's tokenizer, and is saved in the index folder (``passage_tokens/``), so a
model loaded from disk or the Hub packs its first answers from stored ids.

The ids are those of ``tokenizer(passage["text"], add_special_tokens=False)``, keyed by the index's
row ids (which never change); the store records a fingerprint of the tokenizer and is only used with
a tokenizer that has the same one. Rows added to the index later are tokenised on demand, as before,
until [`PassageTokens.update`] covers them.

Files (names from `constants.py`), JSON and ``.npy`` only (read with ``allow_pickle=False``)::

    passage_tokens.json   format version, tokenizer fingerprint, row count, token count
    row_ids.npy           int64 [rows], strictly increasing
    offsets.npy           int64 [rows + 1]: row i's ids are ids[offsets[i]:offsets[i + 1]]
    ids.npy               int32 [tokens]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .constants import (
    PASSAGE_TOKENS_CONFIG_NAME,
    PASSAGE_TOKENS_FORMAT_VERSION,
    PASSAGE_TOKENS_IDS_NAME,
    PASSAGE_TOKENS_OFFSETS_NAME,
    PASSAGE_TOKENS_ROW_IDS_NAME,
)
from .errors import IndexIntegrityError, RagInputError

__all__ = ["PassageTokens", "tokenizer_fingerprint"]

TOKENIZE_BATCH = 1024


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A sha256 of a fast tokenizer's definition (vocabulary, merges, normaliser, added tokens...).

    The padding and truncation settings, which transformers changes from call to call, are left out.
    None for a tokenizer without a `backend_tokenizer` (nothing can be stored for it then).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    size = len(tokenizer)  # changes with `add_tokens`, which would make a cached fingerprint stale
    cached = getattr(tokenizer, "_rag_fingerprint", None)
    if cached is not None and cached[0] == size:
        return cached[1]
    digest = hashlib.sha256(type(tokenizer).__name__.encode("utf-8"))
    digest.update(_definition(backend).encode("utf-8"))
    fingerprint = digest.hexdigest()
    try:  # once per tokenizer object (26 ms for SmolLM2's 49k vocabulary)
        tokenizer._rag_fingerprint = (size, fingerprint)
    except AttributeError:
        pass
    return fingerprint


def _definition(backend: Any) -> str:
    """The backend's JSON definition as it reads with padding and truncation off (their state is restored)."""
    padding, truncation = backend.padding, backend.truncation
    if padding is None and truncation is None:
        return backend.to_str()
    try:
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


class PassageTokens:
    """Token ids of passage texts by index row id, for one tokenizer (see the module docstring).

    Args:
        fingerprint: `tokenizer_fingerprint` of the tokenizer that produced the ids.
        row_ids: int64 `[rows]`, strictly increasing.
        offsets: int64 `[rows + 1]`, from 0 to `len(ids)`, non-decreasing.
        ids: int32 `[tokens]`, every row's ids back to back.
    """

    def __init__(self, fingerprint: str, row_ids: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> None:
        self.fingerprint = fingerprint
        self.row_ids = row_ids
        self.offsets = offsets
        self.ids = ids

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, passages: Sequence[dict[str, Any]], tokenizer: Any, *, show_progress: bool = True) -> PassageTokens:
        """Tokenises the ``text`` of `passages` (dicts with ``row_id``, as `PassageIndex.get_passages` gives)."""
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is None:
            raise RagInputError(
                f"Passage tokens can be stored only for a fast (Rust) tokenizer; {type(tokenizer).__name__} has no "
                "backend_tokenizer. Load the generator tokenizer with use_fast=True, or skip storing passage tokens."
            )
        rows = sorted(passages, key=lambda p: p["row_id"])
        row_ids = np.asarray([p["row_id"] for p in rows], dtype=np.int64)
        if len(row_ids) > 1 and not np.all(np.diff(row_ids) > 0):
            raise RagInputError("Passages to tokenise have repeated row ids; give each passage once.")
        lengths, parts = [], []
        bar = tqdm(total=len(rows), desc="Tokenising passages", unit="passage", disable=not show_progress)
        for start in range(0, len(rows), TOKENIZE_BATCH):
            texts = [p.get("text") or "" for p in rows[start : start + TOKENIZE_BATCH]]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for ids in encoded:
                lengths.append(len(ids))
                parts.append(np.asarray(ids, dtype=np.int32))
            bar.update(len(texts))
        bar.close()
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(fingerprint, row_ids, offsets, ids)

    def update(self, passages: Sequence[dict[str, Any]], tokenizer: Any, *, show_progress: bool = True) -> int:
        """Adds the passages whose row ids are not stored yet (rows added to the index); returns how many."""
        if tokenizer_fingerprint(tokenizer) != self.fingerprint:
            raise RagInputError(
                "These passage tokens were made with a different tokenizer; build new ones with "
                "PassageTokens.build(passages, tokenizer)."
            )
        stored = np.isin(np.asarray([p["row_id"] for p in passages], dtype=np.int64), self.row_ids)
        new = [p for p, known in zip(passages, stored.tolist()) if not known]
        if not new:
            return 0
        more = PassageTokens.build(new, tokenizer, show_progress=show_progress)
        row_ids = np.concatenate([self.row_ids, more.row_ids])
        order = np.argsort(row_ids, kind="stable")
        lengths = np.concatenate([np.diff(self.offsets), np.diff(more.offsets)])[order]
        starts = np.concatenate([self.offsets[:-1], more.offsets[:-1] + len(self.ids)])[order]
        flat = np.concatenate([np.asarray(self.ids), more.ids])
        offsets = np.zeros(len(row_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self.ids = _gather(flat, starts, lengths, int(offsets[-1]))
        self.row_ids, self.offsets = row_ids[order], offsets
        return len(new)

    def keep(self, row_ids: np.ndarray) -> None:
        """Drops the rows not in `row_ids` (passages removed from the index)."""
        kept = np.isin(self.row_ids, np.asarray(row_ids, dtype=np.int64))
        if kept.all():
            return
        starts, lengths = self.offsets[:-1][kept], np.diff(self.offsets)[kept]
        offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self.ids = _gather(np.asarray(self.ids), starts, lengths, int(offsets[-1]))
        self.row_ids, self.offsets = self.row_ids[kept], offsets

    # ------------------------------------------------------------------ lookup
    @property
    def count(self) -> int:
        return len(self.row_ids)

    def matches(self, tokenizer: Any) -> bool:
        """Whether the ids are those `tokenizer` would produce (same fingerprint)."""
        return tokenizer_fingerprint(tokenizer) == self.fingerprint

    def lookup(self, row_ids: Sequence[int]) -> list[list[int] | None]:
        """The stored ids of each row id, or None for a row that is not stored."""
        wanted = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if not len(self.row_ids):
            return [None] * len(wanted)
        pos = np.minimum(np.searchsorted(self.row_ids, wanted), len(self.row_ids) - 1)
        found = self.row_ids[pos] == wanted
        starts, ends = self.offsets[pos], self.offsets[pos + 1]
        return [
            self.ids[s:e].tolist() if ok else None for ok, s, e in zip(found.tolist(), starts.tolist(), ends.tolist())
        ]

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike) -> None:
        """Writes the store into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (
            (PASSAGE_TOKENS_ROW_IDS_NAME, self.row_ids),
            (PASSAGE_TOKENS_OFFSETS_NAME, self.offsets),
            (PASSAGE_TOKENS_IDS_NAME, np.asarray(self.ids, dtype=np.int32)),
        ):
            with open(folder / name, "wb") as f:
                np.save(f, array, allow_pickle=False)
        config = {
            "format_version": PASSAGE_TOKENS_FORMAT_VERSION,
            "tokenizer_fingerprint": self.fingerprint,
            "count": self.count,
            "tokens": int(len(self.ids)),
        }
        with open(folder / PASSAGE_TOKENS_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, folder: str | os.PathLike, *, mmap: bool = False) -> PassageTokens:
        """Opens a folder written by `save`; raises `IndexIntegrityError` if it is missing or inconsistent."""
        folder = Path(folder)

        def broken(what: str) -> IndexIntegrityError:
            return IndexIntegrityError(
                f"The passage tokens in {folder} are unusable: {what}. Delete that folder (the model then "
                "tokenises passages as it needs them) or store new ones with model.store_passage_tokens()."
            )

        try:
            config = json.loads((folder / PASSAGE_TOKENS_CONFIG_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise broken(f"{PASSAGE_TOKENS_CONFIG_NAME} is missing") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise broken(f"{PASSAGE_TOKENS_CONFIG_NAME} is not valid JSON ({exc})") from exc
        if (
            not isinstance(config, dict)
            or config.get("format_version") != PASSAGE_TOKENS_FORMAT_VERSION
            or not isinstance(config.get("tokenizer_fingerprint"), str)
            or not isinstance(config.get("count"), int)
            or not isinstance(config.get("tokens"), int)
        ):
            raise broken(f"{PASSAGE_TOKENS_CONFIG_NAME} is malformed or from an unsupported version")
        try:
            # with mmap, all three arrays are mapped: resident memory does not grow with the corpus
            mode = "r" if mmap else None
            row_ids = np.load(folder / PASSAGE_TOKENS_ROW_IDS_NAME, allow_pickle=False, mmap_mode=mode)
            offsets = np.load(folder / PASSAGE_TOKENS_OFFSETS_NAME, allow_pickle=False, mmap_mode=mode)
            ids = np.load(folder / PASSAGE_TOKENS_IDS_NAME, allow_pickle=False, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as exc:
            raise broken(f"a file cannot be read ({exc})") from exc
        count, tokens = config["count"], config["tokens"]
        if row_ids.dtype != np.int64 or row_ids.shape != (count,) or (count > 1 and not np.all(np.diff(row_ids) > 0)):
            raise broken(f"{PASSAGE_TOKENS_ROW_IDS_NAME} must hold {count} increasing int64 row ids")
        if (
            offsets.dtype != np.int64
            or offsets.shape != (count + 1,)
            or offsets[0] != 0
            or offsets[-1] != tokens
            or np.any(np.diff(offsets) < 0)
        ):
            raise broken(f"{PASSAGE_TOKENS_OFFSETS_NAME} must run from 0 to {tokens} without going back")
        if ids.dtype != np.int32 or ids.shape != (tokens,):
            raise broken(f"{PASSAGE_TOKENS_IDS_NAME} must hold {tokens} int32 token ids")
        return cls(config["tokenizer_fingerprint"], row_ids, offsets, ids)


def _gather(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """The runs `flat[start:start + length]`, back to back, as one int32 array of `total` ids."""
    out = np.empty(total, dtype=np.int32)
    at = 0
    for start, length in zip(starts.tolist(), lengths.tolist()):
        out[at : at + length] = flat[start : start + length]
        at += length
    return out

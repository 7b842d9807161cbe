"""A BM25 keyword index over the same row ids as the dense `PassageIndex` (via `bm25s`).

Saved files (in an index folder's ``bm25/`` subfolder, `constants.BM25_DIR`) are JSON and
``.npy`` arrays only, written and read with ``allow_pickle=False``:

    bm25_config.json                         format version, tokenisation settings, count
    row_ids.npy                              the PassageIndex row id of each BM25 document
    params.index.json, vocab.index.json,     bm25s' own files (scores as a sparse CSC matrix)
    data/indices/indptr.csc.index.npy
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from ..corpus import passage_text
from ..errors import IndexIntegrityError, RagInputError
from ..library_output import library_output_shown

BM25_CONFIG_NAME = "bm25_config.json"
BM25_ROW_IDS_NAME = "row_ids.npy"
BM25_FORMAT_VERSION = 1
DEFAULT_STOPWORDS = "en"


class BM25Index:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over passages, returning PassageIndex row ids."""

    def __init__(self, model: bm25s.BM25, row_ids: np.ndarray, *, stopwords: str | None = DEFAULT_STOPWORDS) -> None:
        self._model = model
        self._row_ids = np.asarray(row_ids, dtype=np.int64)
        self._stopwords = stopwords

    @classmethod
    def build(
        cls,
        passages: Sequence[dict[str, Any]],
        row_ids: Sequence[int] | np.ndarray | None = None,
        *,
        stopwords: str | None = DEFAULT_STOPWORDS,
        k1: float = 1.5,
        b: float = 0.75,
        show_progress: bool = False,
    ) -> BM25Index:
        """Indexes `passages` (title + text). Row ids come from `row_ids`, else each passage's
        ``row_id`` key, else ``0..N-1`` (the ids `PassageIndex.build` gives)."""
        if not passages:
            raise RagInputError("Cannot build a BM25 index over zero passages; check that the corpus is not empty.")
        if row_ids is None:
            if all("row_id" in p for p in passages):
                row_ids = [int(p["row_id"]) for p in passages]
            else:
                row_ids = range(len(passages))
        ids = np.asarray(list(row_ids), dtype=np.int64)
        if len(ids) != len(passages):
            raise RagInputError(f"Got {len(ids)} row ids for {len(passages)} passages; they must match one to one.")
        # bm25s' own bars ("Split strings", "BM25S Count Tokens") sit beside ours: only on request
        bars = show_progress and library_output_shown()
        tokens = bm25s.tokenize(
            [passage_text(p) for p in passages], stopwords=stopwords, show_progress=bars, allow_empty=True
        )
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=bars)
        return cls(model, ids, stopwords=stopwords)

    @property
    def count(self) -> int:
        """Number of indexed passages."""
        return len(self._row_ids)

    def __len__(self) -> int:
        return self.count

    @property
    def row_ids(self) -> np.ndarray:
        """Row ids of the indexed passages (copy)."""
        return self._row_ids.copy()

    def __repr__(self) -> str:
        return f"BM25Index(count={self.count})"

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` passages per question: `(scores float32 [B, k'], row_ids int64 [B, k'])`, k' = min(k, count).

        Ties (e.g. passages sharing no word with the question, score 0) are ordered by row id.
        """
        if isinstance(questions, str):
            raise RagInputError("BM25Index.search expects a list of questions, got a single string.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        questions = list(questions)
        if not all(isinstance(q, str) for q in questions):
            raise RagInputError("BM25Index.search expects every question to be a string.")
        kk = min(int(k), self.count)
        scores = np.zeros((len(questions), kk), dtype=np.float32)
        ids = np.zeros((len(questions), kk), dtype=np.int64)
        if not questions:
            return scores, ids
        query_tokens = bm25s.tokenize(questions, stopwords=self._stopwords, return_ids=False, show_progress=False)
        for b, tokens in enumerate(query_tokens):
            if tokens:
                s = np.asarray(self._model.get_scores(tokens), dtype=np.float32)
            else:
                s = np.zeros(self.count, dtype=np.float32)
            if kk < len(s):
                cand = np.argpartition(-s, kk - 1)[:kk]
                # include every passage tied with the k-th score, then order by (score desc, position)
                cand = np.union1d(cand, np.nonzero(s == s[cand].min())[0])
            else:
                cand = np.arange(len(s))
            order = cand[np.lexsort((cand, -s[cand]))][:kk]
            scores[b], ids[b] = s[order], self._row_ids[order]
        return scores, ids

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the BM25 files into `folder` (created if needed); JSON and npy only, no pickle."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._model.save(str(folder), allow_pickle=False, show_progress=False)
        with open(folder / BM25_ROW_IDS_NAME, "wb") as f:
            np.save(f, self._row_ids, allow_pickle=False)
        config = {"format_version": BM25_FORMAT_VERSION, "count": self.count, "stopwords": self._stopwords}
        with open(folder / BM25_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, mmap: bool = False) -> BM25Index:
        """Opens a folder written by `save`; raises `IndexIntegrityError` if it is missing or inconsistent."""
        folder = Path(folder)
        config_path = folder / BM25_CONFIG_NAME
        if not config_path.is_file():
            raise IndexIntegrityError(f"{BM25_CONFIG_NAME} is missing from {folder}; rebuild the BM25 index.")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexIntegrityError(f"{config_path} is not valid JSON ({exc}); rebuild the BM25 index.") from exc
        if (
            not isinstance(config, dict)
            or config.get("format_version") != BM25_FORMAT_VERSION
            or not isinstance(config.get("count"), int)
            or not (config.get("stopwords") is None or isinstance(config.get("stopwords"), str))
        ):
            raise IndexIntegrityError(
                f"{config_path} is malformed or from an unsupported version; rebuild the BM25 index."
            )
        try:
            row_ids = np.load(folder / BM25_ROW_IDS_NAME, allow_pickle=False)
            model = bm25s.BM25.load(str(folder), mmap=mmap, allow_pickle=False, show_progress=False, verbosity=0)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise IndexIntegrityError(f"The BM25 index in {folder} cannot be read ({exc}); rebuild it.") from exc
        if row_ids.ndim != 1 or not np.issubdtype(row_ids.dtype, np.integer) or len(row_ids) != config["count"]:
            raise IndexIntegrityError(
                f"{BM25_ROW_IDS_NAME} in {folder} does not match its config; rebuild the BM25 index."
            )
        if int(model.scores.get("num_docs", -1)) != len(row_ids):
            raise IndexIntegrityError(
                f"The BM25 index in {folder} holds {model.scores.get('num_docs')} documents but {len(row_ids)} row ids; "
                "rebuild it."
            )
        return cls(model, row_ids, stopwords=config["stopwords"])

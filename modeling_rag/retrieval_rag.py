"""RagRetriever: question vectors (and/or question texts) to passages.

Dense retrieval searches the FAISS `PassageIndex`; BM25 retrieval searches the `BM25Index`;
hybrid retrieval takes the top ``max(fusion_depth, n_docs)`` of each and fuses the two rankings,
either by a weighted sum of per-query normalised scores (``fusion="weighted"``, the default:
``hybrid_alpha * dense + (1 - hybrid_alpha) * bm25``, each side z-scored over its own top
``fusion_depth`` scores, or min-max scaled with ``fusion_normalization="minmax"``; a passage only
one side found gets the other side's lowest normalised score) or by reciprocal rank fusion
(``fusion="rrf"``: score = sum over rankings of 1 / (rrf_k + rank), rank from 1). Normalising per
query is what lets a fixed weight work: raw BM25 scores vary several-fold from one question to the
next while cosines do not. The default weight was chosen on training questions (docs/benchmarks.md).
Whatever the retrieval, the exact stored dense vectors of the chosen rows come back too, so a model
can recompute differentiable document scores.

A saved retriever is an index folder (see `index/__init__.py`) whose ``index_config.json`` also
holds a ``"retriever"`` entry (retrieval settings) and an ``"encoding"`` entry (pooling,
normalisation), plus a ``bm25/`` subfolder when a BM25 index is kept and a ``passage_tokens/``
subfolder when the passages' generator token ids are stored (`passage_tokens.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .constants import BM25_DIR, PASSAGE_TOKENS_DIR
from .corpus import chunk_documents, chunking_config, passage_text, read_corpus
from .encoders import POOLING_METHODS, encode_texts, encode_texts_resumable, weights_fingerprint
from .errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError
from .index.bm25 import BM25Index
from .index.passage_index import PassageIndex
from .passage_tokens import PassageTokens

RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
FUSION_SETTINGS = ("fusion", "rrf_k", "hybrid_alpha", "fusion_normalization", "fusion_depth")
FUSION_METHODS = ("rrf", "weighted")
FUSION_NORMALIZATIONS = ("zscore", "minmax")


@dataclass
class RetrievalOutput:
    """What `RagRetriever.retrieve` returns for a batch of `B` questions and `k` passages each.

    Attributes:
        row_ids: int64 `[B, k]`, the index row ids, best first.
        doc_scores: float32 `[B, k]`, the retrieval scores (dense: inner product or negative squared
            L2 distance; bm25: BM25 scores; hybrid: fused scores), larger is better.
        doc_embeddings: float32 `[B, k, d]`, the exact stored passage vectors, or None if not asked for.
        passages: `B` lists of `k` passage dicts (`row_id`, `id`, `title`, `text`, `source`, `position`).
    """

    row_ids: np.ndarray
    doc_scores: np.ndarray
    doc_embeddings: np.ndarray | None
    passages: list[list[dict[str, Any]]]


def _check_settings(
    retrieval: str, fusion: str, rrf_k: Any, hybrid_alpha: Any, normalization: str = "zscore", depth: Any = 100
) -> None:
    if retrieval not in RETRIEVAL_MODES:
        raise RagConfigError(f"retrieval must be one of {RETRIEVAL_MODES}, got {retrieval!r}.")
    if fusion not in FUSION_METHODS:
        raise RagConfigError(f"fusion must be one of {FUSION_METHODS}, got {fusion!r}.")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 0:
        raise RagConfigError(f"rrf_k must be a non-negative integer, got {rrf_k!r}.")
    if isinstance(hybrid_alpha, bool) or not isinstance(hybrid_alpha, (int, float)) or not 0 <= hybrid_alpha <= 1:
        raise RagConfigError(f"hybrid_alpha must be a number between 0 and 1, got {hybrid_alpha!r}.")
    if normalization not in FUSION_NORMALIZATIONS:
        raise RagConfigError(f"fusion_normalization must be one of {FUSION_NORMALIZATIONS}, got {normalization!r}.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise RagConfigError(f"fusion_depth must be a positive integer, got {depth!r}.")


def normalize_scores(scores: np.ndarray, how: str = "zscore") -> np.ndarray:
    """One query's scores on a common scale: z-scores, or min-max to [0, 1]; all equal -> zeros."""
    x = scores.astype(np.float64)
    if how == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return np.zeros_like(x) if hi - lo <= 1e-12 else (x - lo) / (hi - lo)
    std = float(x.std())
    return np.zeros_like(x) if std <= 1e-12 else (x - float(x.mean())) / std


class RagRetriever:
    """Finds passages for questions in a `PassageIndex` (dense), a `BM25Index` (keywords) or both."""

    def __init__(
        self,
        index: PassageIndex,
        bm25: BM25Index | None = None,
        *,
        retrieval: str = "dense",
        fusion: str = "weighted",
        rrf_k: int = 60,
        hybrid_alpha: float = 0.55,
        fusion_normalization: str = "zscore",
        fusion_depth: int = 100,
        passage_tokens: PassageTokens | None = None,
    ) -> None:
        if not isinstance(index, PassageIndex) and not getattr(index, "is_sharded_index", False):
            raise RagInputError(
                "index must be a PassageIndex or a sharded index (ShardedPassageIndex, DistributedShardedIndex, "
                f"RayShardedIndex), got {type(index).__name__}."
            )
        if bm25 is not None and not isinstance(bm25, BM25Index):
            raise RagInputError(f"bm25 must be a BM25Index or None, got {type(bm25).__name__}.")
        if passage_tokens is not None and not isinstance(passage_tokens, PassageTokens):
            raise RagInputError(f"passage_tokens must be a PassageTokens or None, got {type(passage_tokens).__name__}.")
        _check_settings(retrieval, fusion, rrf_k, hybrid_alpha, fusion_normalization, fusion_depth)
        if retrieval != "dense" and bm25 is None:
            raise RagConfigError(
                f"retrieval={retrieval!r} needs a BM25 index; build the retriever with bm25=True or use retrieval='dense'."
            )
        self._index = index
        self._bm25 = bm25
        self.retrieval = retrieval
        self.fusion = fusion
        self.rrf_k = int(rrf_k)
        self.hybrid_alpha = float(hybrid_alpha)
        self.fusion_normalization = fusion_normalization
        self.fusion_depth = int(fusion_depth)
        self.passage_tokens = passage_tokens

    # ------------------------------------------------------------------ properties
    @property
    def index(self) -> PassageIndex:
        """The dense index and passage store."""
        return self._index

    @property
    def bm25(self) -> BM25Index | None:
        """The BM25 index, if any."""
        return self._bm25

    @property
    def n_passages(self) -> int:
        """Number of passages in the index."""
        return self._index.count

    @property
    def settings(self) -> dict[str, Any]:
        """The retrieval settings saved with the index."""
        return {
            "retrieval": self.retrieval,
            "fusion": self.fusion,
            "rrf_k": self.rrf_k,
            "hybrid_alpha": self.hybrid_alpha,
            "fusion_normalization": self.fusion_normalization,
            "fusion_depth": self.fusion_depth,
            "bm25": self._bm25 is not None,
        }

    def use_fusion_settings(self, config: Any) -> None:
        """Takes the fusion settings (fusion, rrf_k, hybrid_alpha, fusion_normalization, fusion_depth) of a
        `RagConfig`, the place a model keeps them."""
        for name in FUSION_SETTINGS:
            setattr(self, name, getattr(config, name))

    def __repr__(self) -> str:
        return f"RagRetriever(retrieval={self.retrieval!r}, index={self._index!r}, bm25={self._bm25!r})"

    def store_passage_tokens(self, tokenizer: Any, *, show_progress: bool = True) -> int:
        """Stores the `tokenizer` token ids of the passages not stored yet (all of them for a new tokenizer).

        Returns how many passages were tokenised. Saved with the index, they spare the tokenizer call
        for each passage when a model packs its inputs (see `passage_tokens.py`).
        """
        passages = self._index.get_passages(self._index.row_ids)
        if self.passage_tokens is None or not self.passage_tokens.matches(tokenizer):
            self.passage_tokens = PassageTokens.build(passages, tokenizer, show_progress=show_progress)
            return len(passages)
        return self.passage_tokens.update(passages, tokenizer, show_progress=show_progress)

    def rebuild_bm25(self) -> BM25Index:
        """Rebuilds the BM25 index from the current passages (after `index.add` / `index.remove`)."""
        self._bm25 = BM25Index.build(self._index.get_passages(self._index.row_ids))
        return self._bm25

    # ------------------------------------------------------------------ retrieval
    def retrieve(
        self,
        question_embeddings: np.ndarray | torch.Tensor | None,
        n_docs: int,
        questions: Sequence[str] | None = None,
        *,
        return_embeddings: bool = True,
    ) -> RetrievalOutput:
        """Retrieves `n_docs` passages per question (fewer only if the index holds fewer).

        Dense retrieval needs `question_embeddings` `[B, d]`; BM25 needs `questions` (B strings);
        hybrid needs both, in the same order.
        """
        _check_settings(
            self.retrieval, self.fusion, self.rrf_k, self.hybrid_alpha, self.fusion_normalization, self.fusion_depth
        )
        if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs <= 0:
            raise RagInputError(f"n_docs must be a positive integer, got {n_docs!r}.")
        mode = self.retrieval
        if mode in ("dense", "hybrid") and question_embeddings is None:
            raise RagInputError(f"retrieval={mode!r} needs question_embeddings (the encoded questions).")
        if mode in ("bm25", "hybrid"):
            if questions is None:
                raise RagInputError(f"retrieval={mode!r} needs the question texts (questions=[...]).")
            if self._bm25 is None:
                raise RagConfigError(f"retrieval={mode!r} needs a BM25 index; build the retriever with bm25=True.")
            if self._bm25.count != self._index.count:
                raise IndexMismatchError(
                    f"The BM25 index holds {self._bm25.count} passages but the dense index {self._index.count}; "
                    "call retriever.rebuild_bm25() after adding or removing passages."
                )
        if isinstance(questions, str):
            raise RagInputError("questions must be a list of strings, got a single string.")
        q = None
        if question_embeddings is not None:
            if isinstance(question_embeddings, torch.Tensor):
                question_embeddings = question_embeddings.detach().to("cpu").float().numpy()
            q = np.asarray(question_embeddings, dtype=np.float32)
            if q.ndim != 2:
                raise RagInputError(f"question_embeddings must have shape [batch, dim], got {q.shape}.")
        if q is not None and questions is not None and mode != "dense" and len(questions) != len(q):
            raise RagInputError(f"Got {len(q)} question embeddings but {len(questions)} questions; they must match.")

        n_docs = int(n_docs)
        if mode == "dense":
            scores, ids = self._index.search(q, n_docs)
        elif mode == "bm25":
            scores, ids = self._bm25.search(list(questions), n_docs)
        else:
            scores, ids = self._hybrid(q, list(questions), n_docs)
        embeddings = self._index.get_embeddings(ids) if return_embeddings else None
        passages = self._index.get_passages(ids) if ids.size else [[] for _ in range(len(ids))]
        return RetrievalOutput(row_ids=ids, doc_scores=scores, doc_embeddings=embeddings, passages=passages)

    def _hybrid(self, q: np.ndarray, questions: list[str], n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        count = self._index.count
        kk = min(n_docs, count)
        pool = min(count, max(self.fusion_depth, n_docs))
        d_scores, d_ids = self._index.search(q, pool)
        b_scores, b_ids = self._bm25.search(questions, pool)
        out_scores = np.zeros((len(q), kk), dtype=np.float32)
        out_ids = np.zeros((len(q), kk), dtype=np.int64)
        for b in range(len(q)):
            fused: dict[int, float] = {}
            dense_rank: dict[int, int] = {}
            bm25_rank: dict[int, int] = {}
            if self.fusion == "rrf":
                d_part = [1.0 / (self.rrf_k + r + 1) for r in range(len(d_ids[b]))]
                b_part = [1.0 / (self.rrf_k + r + 1) for r in range(len(b_ids[b]))]
                d_floor = b_floor = 0.0
            else:
                d_norm = normalize_scores(d_scores[b], self.fusion_normalization)
                b_norm = normalize_scores(b_scores[b], self.fusion_normalization)
                d_part = (self.hybrid_alpha * d_norm).tolist()
                b_part = ((1.0 - self.hybrid_alpha) * b_norm).tolist()
                # a passage one side did not return scores at most that side's lowest in the pool
                d_floor = self.hybrid_alpha * float(d_norm.min()) if d_norm.size else 0.0
                b_floor = (1.0 - self.hybrid_alpha) * float(b_norm.min()) if b_norm.size else 0.0
            for r, (rid, s) in enumerate(zip(d_ids[b].tolist(), d_part)):
                fused[rid] = s
                dense_rank[rid] = r
            for r, (rid, s) in enumerate(zip(b_ids[b].tolist(), b_part)):
                fused[rid] = fused.get(rid, d_floor) + s
                bm25_rank[rid] = r
            for rid in fused:
                if rid not in bm25_rank:
                    fused[rid] += b_floor
            order = sorted(
                fused,
                key=lambda rid: (-fused[rid], dense_rank.get(rid, math.inf), bm25_rank.get(rid, math.inf), rid),
            )[:kk]
            out_ids[b] = order
            out_scores[b] = [fused[rid] for rid in order]
        return out_scores, out_ids

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> None:
        """Saves the index, the BM25 index (``bm25/``), the passage tokens (``passage_tokens/``) and the
        retrieval settings to `folder`, atomically."""
        self._index.set_extra_config("retriever", self.settings)
        bm25, tokens = self._bm25, self.passage_tokens
        if tokens is not None:
            tokens.keep(self._index.row_ids)  # rows removed from the index since

        def extra(tmp: Path) -> None:
            if bm25 is not None:
                bm25.save(tmp / BM25_DIR)
            if tokens is not None:
                tokens.save(tmp / PASSAGE_TOKENS_DIR)

        self._index.save(folder, extra_files=extra)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        mmap: bool = False,
        verify_checksums: bool = True,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
        verify: bool | None = None,
    ) -> RagRetriever:
        """Opens a folder written by `save` (or a plain `PassageIndex` folder, as dense retrieval).

        A folder holding a shard manifest (``shards.json``) opens as a `ShardedPassageIndex` over all its shards.

        See `PassageIndex.load` for the checks (and `verify`); a missing or broken ``bm25/`` that the settings
        require, or a broken ``passage_tokens/``, raises `IndexIntegrityError`.
        """
        from .index.sharded import ShardedPassageIndex, is_sharded_folder

        # a manifest marks a sharded folder: the same retriever over all its shards
        opener = ShardedPassageIndex.open if is_sharded_folder(folder) else PassageIndex.load
        index = opener(
            folder,
            mmap=mmap,
            verify=verify,
            verify_checksums=verify_checksums,
            expected_dim=expected_dim,
            expected_fingerprint=expected_fingerprint,
        )
        settings = index.config.get("retriever") or {}
        if not isinstance(settings, dict):
            raise IndexIntegrityError(f"The 'retriever' entry of the index config in {folder} must be an object.")
        bm25_folder = Path(folder) / BM25_DIR
        bm25 = None
        if settings.get("bm25", False):
            if not bm25_folder.is_dir():
                raise IndexIntegrityError(
                    f"{BM25_DIR}/ is missing from {folder} but the retriever was saved with BM25."
                )
            bm25 = BM25Index.load(bm25_folder, mmap=mmap)
            if bm25.count != index.count or not np.array_equal(np.sort(bm25.row_ids), index.row_ids):
                raise IndexIntegrityError(
                    f"The BM25 index in {bm25_folder} does not cover the same passages as the dense index; rebuild it."
                )
        tokens = None
        if (Path(folder) / PASSAGE_TOKENS_DIR).is_dir():
            tokens = PassageTokens.load(Path(folder) / PASSAGE_TOKENS_DIR, mmap=mmap)
            if not np.isin(tokens.row_ids, index.row_ids).all():
                raise IndexIntegrityError(
                    f"The passage tokens in {Path(folder) / PASSAGE_TOKENS_DIR} hold rows the index does not; delete "
                    "that folder (passages are then tokenised as needed) or store new ones."
                )
        try:
            return cls(
                index,
                bm25,
                retrieval=settings.get("retrieval", "dense"),
                fusion=settings.get("fusion", "rrf"),
                rrf_k=settings.get("rrf_k", 60),
                hybrid_alpha=settings.get("hybrid_alpha", 0.5),
                # saved before normalisation was a setting: min-max was the only one
                fusion_normalization=settings.get("fusion_normalization", "minmax"),
                fusion_depth=settings.get("fusion_depth", 100),
                passage_tokens=tokens,
            )
        except RagConfigError as exc:
            raise IndexIntegrityError(f"The retriever settings saved in {folder} are invalid: {exc}") from exc

    # ------------------------------------------------------------------ building
    @classmethod
    def from_corpus(
        cls,
        source: Any,
        encoder: torch.nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        normalize: bool = True,
        max_tokens: int | None = None,
        overlap: int | None = None,
        kind: str = "auto",
        metric: str = "ip",
        bm25: bool = True,
        retrieval: str = "dense",
        batch_size: int = 64,
        show_progress: bool = True,
        encoder_name: str | None = None,
        accelerator: Any = None,
        work_dir: str | None = None,
        shard_size: int = 4096,
        **retriever_kwargs: Any,
    ) -> RagRetriever:
        """Reads, chunks and encodes a corpus, then builds the dense index (and BM25 when `bm25`).

        `source` is anything `read_corpus` reads. Passages are encoded as title + text with
        `encode_texts` (`pooling`, `normalize`); the encoder's `weights_fingerprint` is recorded.
        With an `accelerate.Accelerator`, each process encodes a contiguous shard and the vectors
        are gathered, so every process ends with the same index. With `work_dir`, vectors are encoded
        in shards of `shard_size` saved there (`encode_texts_resumable`): a build that was killed
        resumes from its finished shards (the processes must share `work_dir`). `retriever_kwargs` go
        to `RagRetriever` (fusion, rrf_k, hybrid_alpha, fusion_normalization, fusion_depth).
        """
        if pooling not in POOLING_METHODS:
            raise RagConfigError(f"pooling must be one of {POOLING_METHODS}, got {pooling!r}.")
        if retrieval != "dense" and not bm25:
            raise RagConfigError(f"retrieval={retrieval!r} needs bm25=True.")
        is_main = accelerator is None or accelerator.is_main_process
        progress = show_progress and is_main
        documents = read_corpus(source)
        passages = chunk_documents(documents, tokenizer, max_tokens, overlap, show_progress=progress)
        texts = [passage_text(p) for p in passages]
        max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        encode_kwargs = {
            "pooling": pooling,
            "normalize": normalize,
            "batch_size": batch_size,
            "max_length": max_length,
            "show_progress": progress,
            "desc": "Encoding passages",
        }
        fingerprint = weights_fingerprint(encoder)
        embeddings = _encode_corpus(
            texts, encoder, tokenizer, encode_kwargs, accelerator, work_dir, shard_size, fingerprint
        )
        if encoder_name is None:
            encoder_name = getattr(getattr(encoder, "config", None), "_name_or_path", None) or None
        index = PassageIndex.build(
            embeddings,
            passages,
            metric=metric,
            kind=kind,
            encoder_name=encoder_name,
            encoder_fingerprint=fingerprint,
            chunking=chunking_config(tokenizer, max_tokens, overlap),
            show_progress=progress,
        )
        index.set_extra_config("encoding", {"pooling": pooling, "normalize": normalize, "max_length": max_length})
        bm25_index = BM25Index.build(index.get_passages(index.row_ids), show_progress=progress) if bm25 else None
        return cls(index, bm25_index, retrieval=retrieval, **retriever_kwargs)


def _encode_corpus(
    texts: list[str],
    encoder: torch.nn.Module,
    tokenizer: Any,
    encode_kwargs: dict,
    accelerator: Any,
    work_dir: str | None,
    shard_size: int,
    fingerprint: str,
) -> np.ndarray:
    """The passage vectors of `texts`: in resumable shards under `work_dir`, split over the processes of
    `accelerator`, or in one go (see `RagRetriever.from_corpus`)."""
    if work_dir is not None:
        if accelerator is not None:
            encoder = encoder.to(accelerator.device)
        return encode_texts_resumable(
            texts,
            encoder,
            tokenizer,
            work_dir,
            shard_size=shard_size,
            rank=0 if accelerator is None else accelerator.process_index,
            world_size=1 if accelerator is None else accelerator.num_processes,
            barrier=None if accelerator is None else accelerator.wait_for_everyone,
            fingerprint=fingerprint,
            **encode_kwargs,
        )
    if accelerator is not None and accelerator.num_processes > 1:
        return _encode_sharded(texts, encoder, tokenizer, accelerator, encode_kwargs)
    if accelerator is not None:
        encoder = encoder.to(accelerator.device)
    return encode_texts(texts, encoder, tokenizer, **encode_kwargs)


def _encode_sharded(
    texts: list[str], encoder: torch.nn.Module, tokenizer: Any, accelerator: Any, encode_kwargs: dict
) -> np.ndarray:
    """Encodes a contiguous shard per process and gathers all shards, in order, on every process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per = math.ceil(len(texts) / world)
    shard = texts[rank * per : (rank + 1) * per]
    encoder = encoder.to(accelerator.device)
    local = encode_texts(shard, encoder, tokenizer, device=accelerator.device, **encode_kwargs)
    dim = torch.tensor([local.shape[1]], device=accelerator.device)
    dims = accelerator.gather(dim).cpu().tolist()
    if len(set(dims)) != 1:
        raise IndexMismatchError(
            f"Processes produced vectors of different sizes {dims}; use the same encoder everywhere."
        )
    size = torch.tensor([len(local)], device=accelerator.device)
    sizes = accelerator.gather(size).cpu().tolist()
    padded = torch.zeros((per, dims[0]), dtype=torch.float32, device=accelerator.device)
    padded[: len(local)] = torch.from_numpy(local).to(accelerator.device)
    gathered = accelerator.gather(padded).cpu().numpy()  # [world * per, d], equal shapes for gloo
    parts = [gathered[i * per : i * per + sizes[i]] for i in range(world)]
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)

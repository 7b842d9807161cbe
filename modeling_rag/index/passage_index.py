"""`PassageIndex`: a FAISS index over passage vectors plus the memory-mapped passage store, and what a
caller does with one: search, look up passages and vectors by row id, add, remove, save and load.

Every passage has a stable int64 *row id*; `add` gives new rows the next ids and `remove` leaves the
others alone. How the index is built (`build`), how a folder is read and checked (`loading`), the kinds
(`kinds`) and the search helpers (`search`) live in their own modules of this package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from ..constants import EXACT_VECTORS_NAME, FAISS_INDEX_NAME, PASSAGES_NAME
from ..errors import IndexIntegrityError, IndexMismatchError, RagInputError
from ..utils.names import portable_name
from .arrays import as_matrix, as_queries, as_row_ids
from .build import build_in_memory, build_streaming_into
from .config import config_dict, read_config, write_config
from .folder import verify_files, write_folder_atomically
from .kinds import IVF_KINDS, check_search_param, copy_invlists_to_memory
from .loading import open_index_folder
from .passage_store import (
    PassageStoreWriter,
    clean_passage,
    iter_table_batches,
    passages_to_table,
    row_ids_of,
    table_rows,
)
from .search import exact_top_k, refine_with_exact, search_params

__all__ = ["PassageIndex"]


class PassageIndex:
    """A FAISS index over passage vectors plus the passages (an Arrow table, memory-mapped when loaded).

    Build with `PassageIndex.build` (in memory) or `PassageIndex.build_streaming` (batch by batch into a
    folder), open a saved one with `PassageIndex.load`.
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        passages: pa.Table,
        *,
        row_ids: np.ndarray | None = None,
        metric: str,
        kind: str,
        kind_params: dict[str, int],
        next_row_id: int,
        normalized: bool,
        exact_vectors: np.ndarray | None = None,
        encoder_name: str | None = None,
        encoder_fingerprint: str | None = None,
        chunking: dict | None = None,
        deleted_row_ids: np.ndarray | None = None,
        extra_config: dict | None = None,
        mmapped: bool = False,
    ) -> None:
        self._faiss = faiss_index
        self._table = passages
        self._row_ids = row_ids_of(passages) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
        self._exact = exact_vectors
        self._metric = metric
        self._kind = kind
        self._kind_params = dict(kind_params)
        self._next_row_id = int(next_row_id)
        self._normalized = bool(normalized)
        self._encoder_name = portable_name(encoder_name)  # recorded in index_config.json
        self._encoder_fingerprint = encoder_fingerprint
        self._chunking = dict(chunking) if chunking else None
        self._deleted = np.asarray(deleted_row_ids if deleted_row_ids is not None else [], dtype=np.int64)
        self._extra_config = dict(extra_config or {})
        self._mmapped = mmapped

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        passages: list[dict[str, Any]],
        *,
        metric: str = "ip",
        kind: str = "auto",
        encoder_name: str | None = None,
        encoder_fingerprint: str | None = None,
        chunking: dict | None = None,
        normalized: bool | None = None,
        exact_vectors: str | None = "float16",
        memory_budget_bytes: int | None = None,
        show_progress: bool = False,
        **kind_params: Any,
    ) -> PassageIndex:
        """Builds an index over `embeddings` `[N, d]` (float32) and their `passages` (same order).

        `metric` is ``"ip"`` (inner product; cosine when the vectors are L2-normalised) or ``"l2"``.
        `kind` is ``"auto"``, ``"flat"``, ``"hnsw"``, ``"ivf_flat"`` or ``"ivf_pq"``; extra keyword
        arguments set that kind's parameters (see `kinds.KIND_PARAM_NAMES`). Rows get ids ``0..N-1``.
        `normalized=None` records whether the vectors have unit norm. `exact_vectors` (ivf_pq only):
        ``"float16"`` keeps the exact vectors for re-ranking and the losses, None keeps only PQ codes.
        `memory_budget_bytes` is the budget ``kind="auto"`` fits the float32 vectors into.
        """
        built = build_in_memory(
            embeddings,
            passages,
            metric=metric,
            kind=kind,
            normalized=normalized,
            exact_vectors=exact_vectors,
            memory_budget_bytes=memory_budget_bytes,
            show_progress=show_progress,
            kind_params=kind_params,
        )
        return cls(**built, encoder_name=encoder_name, encoder_fingerprint=encoder_fingerprint, chunking=chunking)

    @classmethod
    def build_streaming(
        cls,
        folder: str | os.PathLike,
        batches: Iterable[tuple[Any, Sequence[dict[str, Any]]]],
        *,
        total: int,
        dim: int,
        metric: str = "ip",
        kind: str = "auto",
        encoder_name: str | None = None,
        encoder_fingerprint: str | None = None,
        chunking: dict | None = None,
        normalized: bool = True,
        exact_vectors: str | None = "float16",
        memory_budget_bytes: int | None = None,
        mmap: bool = True,
        show_progress: bool = False,
        **kind_params: Any,
    ) -> PassageIndex:
        """Builds and saves an index over `total` passages given as `(embeddings [b, dim], passages)` batches.

        Only one batch of texts is held at a time: passages go straight into the Arrow store and the
        vectors into FAISS (IVF kinds are trained on the first vectors, up to the training size, so
        the batches should come in no particular order). The folder is written atomically as by `save`;
        the saved index is then opened with `load(mmap=mmap)` and returned.
        """
        build_streaming_into(
            folder,
            batches,
            total=total,
            dim=dim,
            metric=metric,
            kind=kind,
            encoder_name=encoder_name,
            encoder_fingerprint=encoder_fingerprint,
            chunking=chunking,
            normalized=normalized,
            exact_vectors=exact_vectors,
            memory_budget_bytes=memory_budget_bytes,
            show_progress=show_progress,
            kind_params=kind_params,
        )
        return cls.load(folder, mmap=mmap)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Vector size."""
        return int(self._faiss.d)

    @property
    def metric(self) -> str:
        """``"ip"`` or ``"l2"``."""
        return self._metric

    @property
    def kind(self) -> str:
        """The concrete index kind (never ``"auto"``)."""
        return self._kind

    @property
    def kind_params(self) -> dict[str, int]:
        """Build and search parameters of the kind (copy)."""
        return dict(self._kind_params)

    @property
    def count(self) -> int:
        """Number of live passages."""
        return len(self._row_ids)

    def __len__(self) -> int:
        return self.count

    @property
    def normalized(self) -> bool:
        """Whether the indexed vectors have unit L2 norm."""
        return self._normalized

    @property
    def encoder_name(self) -> str | None:
        """Name of the encoder that produced the passage vectors, if recorded."""
        return self._encoder_name

    @property
    def encoder_fingerprint(self) -> str | None:
        """`weights_fingerprint` of the encoder that produced the passage vectors, if recorded."""
        return self._encoder_fingerprint

    @property
    def chunking(self) -> dict | None:
        """The chunking settings the passages were made with, if recorded."""
        return dict(self._chunking) if self._chunking else None

    @property
    def row_ids(self) -> np.ndarray:
        """The live row ids, ascending (copy)."""
        return self._row_ids.copy()

    @property
    def exact_vectors(self) -> str | None:
        """How exact vectors are kept apart from FAISS: ``"float16"`` (ivf_pq) or None (in FAISS, or not kept)."""
        return "float16" if self._exact is not None else None

    @property
    def passages_table(self) -> pa.Table:
        """The passage store as an Arrow table (memory-mapped when loaded); one row per live passage."""
        return self._table

    @property
    def config(self) -> dict[str, Any]:
        """What `save` writes to ``index_config.json`` (without the file checksums)."""
        cfg = config_dict(
            dim=self.dim,
            metric=self._metric,
            kind=self._kind,
            kind_params=self._kind_params,
            count=self.count,
            normalized=self._normalized,
            encoder_name=self._encoder_name,
            encoder_fingerprint=self._encoder_fingerprint,
            chunking=self.chunking,
            next_row_id=self._next_row_id,
            deleted=self._deleted,
            exact_vectors=self.exact_vectors,
        )
        for key, value in self._extra_config.items():
            cfg.setdefault(key, value)
        return cfg

    def __repr__(self) -> str:
        return f"PassageIndex(kind={self._kind!r}, metric={self._metric!r}, dim={self.dim}, count={self.count})"

    def set_extra_config(self, key: str, value: Any) -> None:
        """Stores an extra JSON-serialisable entry in ``index_config.json`` (e.g. retriever settings)."""
        self._extra_config[key] = value

    def set_search_params(self, **params: int) -> None:
        """Changes search-time parameters: ``ef_search`` (hnsw), ``nprobe`` (ivf_*), ``refine_factor`` (ivf_pq)."""
        for name, value in params.items():
            self._kind_params[name] = check_search_param(self._kind, name, value)

    # ------------------------------------------------------------------ lookups
    def _positions(self, row_ids: np.ndarray) -> np.ndarray:
        flat = row_ids.reshape(-1)
        pos = np.searchsorted(self._row_ids, flat)
        pos_c = np.minimum(pos, max(len(self._row_ids) - 1, 0))
        bad = (
            (pos >= len(self._row_ids)) | (self._row_ids[pos_c] != flat)
            if len(self._row_ids)
            else np.ones_like(flat, bool)
        )
        if bad.any():
            missing = flat[bad][:5].tolist()
            raise RagInputError(f"Unknown row id(s) {missing}: they were never added or have been removed.")
        return pos_c.reshape(row_ids.shape)

    def get_passages(self, row_ids: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The passages of `row_ids` (1-D: a list of dicts; 2-D: a list of lists), each with its ``row_id``.

        Only the rows asked for are read from the (memory-mapped) store.
        """
        ids = as_row_ids(row_ids)
        if ids.ndim > 2:
            raise RagInputError(f"row_ids must be 1-D or 2-D, got shape {ids.shape}.")
        pos = self._positions(ids)
        rows = table_rows(self._table, pos.reshape(-1))
        if ids.ndim == 2:
            width = ids.shape[1]
            return [rows[i * width : (i + 1) * width] for i in range(ids.shape[0])]
        return rows

    def iter_passages(self, batch_size: int = 65_536) -> Iterable[list[dict[str, Any]]]:
        """Every live passage, in row id order, a batch of dicts at a time (memory stays one batch)."""
        for start in range(0, self.count, batch_size):
            yield table_rows(self._table, np.arange(start, min(start + batch_size, self.count)))

    def get_embeddings(self, row_ids: Any) -> np.ndarray:
        """The stored vectors of `row_ids` (any shape `S`), as float32 `[*S, dim]`.

        Exact for flat, HNSW and IVF-Flat (reconstructed from FAISS) and for ivf_pq with float16 exact
        vectors (to float16 precision); the PQ reconstruction for ivf_pq without them.
        """
        ids = as_row_ids(row_ids)
        pos = self._positions(ids).reshape(-1)
        if self._exact is not None:
            out = np.asarray(self._exact[pos], dtype=np.float32)
        elif len(pos) == 0:
            out = np.zeros((0, self.dim), dtype=np.float32)
        else:
            out = self._faiss.reconstruct_batch(np.ascontiguousarray(ids.reshape(-1), dtype=np.int64))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(*ids.shape, self.dim)

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` passages for each query vector.

        Returns `(scores float32 [B, k'], row_ids int64 [B, k'])` with ``k' = min(k, count)``,
        best first; every returned id is a live row (rows FAISS leaves short are completed by an
        exact search). Scores: inner product (``ip``) or negative squared L2 distance (``l2``).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        q = as_queries(queries, self.dim)
        n = self.count
        kk = min(int(k), n)
        if kk == 0 or len(q) == 0:
            return np.zeros((len(q), kk), dtype=np.float32), np.zeros((len(q), kk), dtype=np.int64)
        refine = self._kind == "ivf_pq" and self._exact is not None
        fetch = min(n, kk * self._kind_params["refine_factor"]) if refine else kk
        params, _selector = search_params(self._kind, self._kind_params, self._deleted, fetch)
        distances, labels = self._faiss.search(q, fetch, params=params)
        if refine:
            vectors = self.get_embeddings(np.where(labels >= 0, labels, self._row_ids[0]))
            scores, ids = refine_with_exact(q, labels, vectors, self._metric, kk)
        else:
            scores = distances[:, :kk] if self._metric == "ip" else -distances[:, :kk]
            ids = labels[:, :kk]
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        short = np.nonzero((ids < 0).any(axis=1))[0]
        if len(short):
            s2, i2 = exact_top_k(q[short], self._row_ids, self.get_embeddings, self._metric, kk)
            scores[short], ids[short] = s2, i2
        return scores, ids

    # ------------------------------------------------------------------ add / remove
    def _ensure_writable(self) -> None:
        if self._mmapped:
            # a memory-mapped FAISS index must not grow in place: take an in-memory copy first
            if self._kind in IVF_KINDS:
                copy_invlists_to_memory(self._faiss)
            if self._exact is not None:
                self._exact = np.array(self._exact, dtype=np.float16)
            self._mmapped = False

    def add(self, embeddings: Any, passages: list[dict[str, Any]]) -> np.ndarray:
        """Adds passages with their vectors without rebuilding; returns their new row ids (int64)."""
        emb = as_matrix(embeddings, "embeddings")
        if len(passages) != len(emb):
            raise RagInputError(f"Got {len(emb)} embeddings but {len(passages)} passages; they must match one to one.")
        if emb.shape[1] != self.dim:
            raise IndexMismatchError(
                f"New embeddings have dimension {emb.shape[1]} but the index holds dimension {self.dim}; "
                "encode them with the encoder the index was built with."
            )
        if len(emb) == 0:
            return np.zeros(0, dtype=np.int64)
        clean = [clean_passage(p, i) for i, p in enumerate(passages)]
        self._ensure_writable()
        new_ids = np.arange(self._next_row_id, self._next_row_id + len(emb), dtype=np.int64)
        self._faiss.add_with_ids(emb, new_ids)
        # concatenating tables is zero-copy: the mapped rows stay mapped
        self._table = pa.concat_tables([self._table, passages_to_table(clean, new_ids)])
        if self._exact is not None:
            self._exact = np.concatenate([np.asarray(self._exact), emb.astype(np.float16)], axis=0)
        self._row_ids = np.concatenate([self._row_ids, new_ids])
        self._next_row_id += len(emb)
        return new_ids

    def remove(self, row_ids: Iterable[int] | np.ndarray) -> int:
        """Removes rows by id (other ids are unchanged); returns how many were removed.

        Unknown ids raise `RagInputError`. HNSW graphs cannot drop nodes, so for ``kind="hnsw"``
        removed rows are masked at search time (recorded in ``deleted_row_ids``).
        """
        ids = np.unique(as_row_ids(list(row_ids) if not isinstance(row_ids, np.ndarray) else row_ids).reshape(-1))
        if len(ids) == 0:
            return 0
        pos = self._positions(ids)
        self._ensure_writable()
        if self._kind == "hnsw":
            self._deleted = np.union1d(self._deleted, ids).astype(np.int64)
        else:
            # an IVF hash-table direct map removes only through an IDSelectorArray
            selector = faiss.IDSelectorArray(ids) if self._kind in IVF_KINDS else faiss.IDSelectorBatch(ids)
            removed = self._faiss.remove_ids(selector)
            if removed != len(ids):
                raise IndexIntegrityError(f"FAISS removed {removed} of {len(ids)} rows; the index is inconsistent.")
        keep = np.ones(len(self._row_ids), dtype=bool)
        keep[pos] = False
        self._table = self._table.filter(pa.array(keep))
        if self._exact is not None:
            self._exact = np.asarray(self._exact)[keep]
        self._row_ids = self._row_ids[keep]
        return len(ids)

    # ------------------------------------------------------------------ save / load
    def write_files(self, folder: str | os.PathLike) -> None:
        """Writes ``index.faiss``, ``passages.arrow`` (and ``vectors.f16.npy``) into an existing folder."""
        folder = Path(folder)
        faiss.write_index(self._faiss, str(folder / FAISS_INDEX_NAME))
        with PassageStoreWriter(folder / PASSAGES_NAME) as store:
            for batch in iter_table_batches(self._table):
                store.write_table(batch)
        if self._exact is not None:
            with open(folder / EXACT_VECTORS_NAME, "wb") as f:
                np.save(f, np.asarray(self._exact, dtype=np.float16), allow_pickle=False)

    def save(self, folder: str | os.PathLike, *, extra_files: Callable[[Path], None] | None = None) -> None:
        """Saves the index to `folder` atomically (temp sibling folder, then renames).

        `extra_files(tmp_folder)` may write more files (e.g. the BM25 index); they are covered by
        the checksums in ``index_config.json`` like the others.
        """

        def write(tmp: Path) -> None:
            self.write_files(tmp)
            if extra_files is not None:
                extra_files(tmp)
            write_config(tmp, self.config)

        write_folder_atomically(folder, write)

    @staticmethod
    def read_config(folder: str | os.PathLike) -> dict[str, Any]:
        """Reads and validates ``index_config.json`` of an index folder (no other file is read)."""
        return read_config(folder)

    @staticmethod
    def verify_files(folder: str | os.PathLike, *, verify: bool | None = None) -> bool:
        """Checks that every file listed in ``index_config.json`` exists with its size and sha256.

        `verify=None` hashes the files unless this folder passed a full check here and no file has
        changed since (`verification`); True always hashes them; False checks sizes only.
        Returns whether the files were hashed. Raises `IndexIntegrityError` naming the bad file.
        """
        folder = Path(folder)
        return verify_files(folder, read_config(folder), verify)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        mmap: bool = False,
        verify: bool | None = None,
        verify_checksums: bool | None = None,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> PassageIndex:
        """Opens a saved index folder, checking its config, checksums, counts and compatibility.

        `mmap=True` memory-maps ``index.faiss`` for the IVF kinds (FAISS reads flat and HNSW into
        memory) and ``vectors.f16.npy``; the passage store is always memory-mapped.
        `verify`: None (default) hashes the files the first time and trusts them while their stamps are
        unchanged; True always hashes them; False checks only sizes. `verify_checksums=False` is the
        older spelling of `verify=False`.
        `expected_dim` / `expected_fingerprint` are the question encoder's hidden size and
        `weights_fingerprint`; a mismatch raises `IndexMismatchError`.
        """
        if verify_checksums is False and verify is None:
            verify = False
        opened = open_index_folder(
            Path(folder),
            mmap=mmap,
            verify=verify,
            expected_dim=expected_dim,
            expected_fingerprint=expected_fingerprint,
        )
        return cls(**opened)

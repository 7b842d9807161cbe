"""Retrieval across the processes of a torch.distributed job, each holding only its shards of the index.

Under ``accelerate launch`` (or any initialised ``torch.distributed`` group) rank ``r`` of ``W`` opens the
shards ``r, r + W, ...`` of a sharded index folder (`index/sharded.py`), so each process holds about
``1/W`` of the vectors and passages. `DistributedShardedIndex.search` is a *collective* call, as in Atlas:

1. every rank's question vectors are all-gathered (ranks may have different batch sizes, even 0: the
   batches are padded to the largest and the true sizes gathered first);
2. every rank searches all the questions in its own shards;
3. the per-rank top-k (scores and global row ids) are all-gathered and merged the same way on every rank
   (score, then the smaller row id), so each rank gets exactly what one process holding every shard gets;
4. each rank sends, for the merged top-k of all questions, the passages (small JSON-safe dicts, through
   ``all_gather_object``) and the exact vectors (a padded tensor ``all_gather``) of the rows it holds.

Each rank keeps its own questions' results; `get_passages` / `get_embeddings` then answer from the rows of
the last search (or the local shards) without talking to the others, which is the order `RagRetriever`
calls them in. So `RagRetriever(DistributedShardedIndex.open(folder))` retrieves, and the training losses
get their document vectors, as with a local index, provided every rank calls `retrieve` the same number of
times (as the ranks of a data-parallel loop do). The gathers run on the group's device: CPU tensors with
gloo, the current CUDA device with NCCL.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import IndexMismatchError, RagConfigError, RagInputError
from .index.sharded import ShardedPassageIndex, merge_topk, read_manifest, rows_like, shards_of_rank

logger = logging.getLogger(__name__)

__all__ = ["DistributedShardedIndex", "open_distributed_retriever", "use_distributed_index"]


class DistributedShardedIndex:
    """The shards of this rank, searched together with the other ranks' (see the module docstring)."""

    is_sharded_index = True

    def __init__(self, local: ShardedPassageIndex, *, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RagConfigError(
                "DistributedShardedIndex needs an initialised torch.distributed process group (run under "
                "accelerate launch, or call torch.distributed.init_process_group first)."
            )
        self._local = local
        self._group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        self._cache_passages: dict[int, dict[str, Any]] = {}
        self._cache_rows = np.zeros(0, dtype=np.int64)
        self._cache_vectors = np.zeros((0, local.dim), dtype=np.float32)

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        *,
        group: Any = None,
        mmap: bool = False,
        verify: bool | None = None,
        verify_checksums: bool | None = None,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> DistributedShardedIndex:
        """Opens this rank's shards (``rank, rank + world_size, ...``) of the sharded index in `folder`."""
        if not dist.is_available() or not dist.is_initialized():
            raise RagConfigError(
                "DistributedShardedIndex.open needs an initialised torch.distributed process group; for one process "
                "use ShardedPassageIndex.open (or RagRetriever.load)."
            )
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        num_shards = read_manifest(folder)["num_shards"]
        mine = shards_of_rank(num_shards, rank, world)
        if not mine:
            logger.warning("Rank %d holds no shard: the index has %d shards for %d ranks.", rank, num_shards, world)
        local = ShardedPassageIndex.open(
            folder,
            shards=mine,
            mmap=mmap,
            verify=verify,
            verify_checksums=verify_checksums,
            expected_dim=expected_dim,
            expected_fingerprint=expected_fingerprint,
        )
        return cls(local, group=group)

    # ------------------------------------------------------------------ properties
    @property
    def local(self) -> ShardedPassageIndex:
        """The shards this rank holds."""
        return self._local

    @property
    def shard_ids(self) -> list[int]:
        """The shards this rank holds."""
        return self._local.shard_ids

    @property
    def num_shards(self) -> int:
        return self._local.num_shards

    @property
    def count(self) -> int:
        """Passages in the whole index (all ranks together): what `search` searches."""
        return self._local.total_count

    @property
    def local_count(self) -> int:
        """Passages this rank holds."""
        return self._local.count

    def __len__(self) -> int:
        return self.count

    @property
    def row_ids(self) -> np.ndarray:
        """Every global row id of the index (the manifest's ranges are consecutive from 0)."""
        return np.arange(self.count, dtype=np.int64)

    dim = property(lambda self: self._local.dim, doc="Vector size.")
    metric = property(lambda self: self._local.metric, doc="``ip`` or ``l2``.")
    kind = property(lambda self: self._local.kind, doc="FAISS index kind of the shards.")
    normalized = property(lambda self: self._local.normalized, doc="Whether the vectors have unit norm.")
    encoder_name = property(lambda self: self._local.encoder_name, doc="Encoder name, if recorded.")
    encoder_fingerprint = property(lambda self: self._local.encoder_fingerprint, doc="Encoder fingerprint.")
    chunking = property(lambda self: self._local.chunking, doc="Chunking settings, if recorded.")
    config = property(lambda self: self._local.config, doc="Index-level settings and extra entries.")

    def __repr__(self) -> str:
        return (
            f"DistributedShardedIndex(rank={self.rank} of {self.world_size}, shards={self.shard_ids} of "
            f"{self.num_shards}, rows held={self.local_count} of {self.count})"
        )

    def set_search_params(self, **params: int) -> None:
        self._local.set_search_params(**params)

    # ------------------------------------------------------------------ collectives
    def _gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.to(self._device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self._group)
        return [x.cpu() for x in out]

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` of this rank's `queries` over every rank's shards (collective: every rank must call it).

        Returns `(scores float32 [B, k'], global row ids int64 [B, k'])` exactly as one process holding all
        shards would, ``k' = min(k, count)``; the passages and vectors of those rows are kept for
        `get_passages` / `get_embeddings`.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        # a rank with bad queries must not leave the others blocked in the gathers: it says so in the first one
        error: Exception | None = None
        try:
            q = _as_queries(queries, self.dim)
        except (RagInputError, IndexMismatchError) as exc:
            error, q = exc, np.zeros((0, self.dim), dtype=np.float32)
        k = int(k)
        flags = torch.tensor([len(q), k, error is None], dtype=torch.int64)
        meta = [m.tolist() for m in self._gather_tensor(flags)]
        sizes, ks = [m[0] for m in meta], {m[1] for m in meta}
        if error is not None:
            raise error
        failed = [r for r, m in enumerate(meta) if not m[2]]
        if failed:
            raise RagInputError(
                f"Rank(s) {failed} passed invalid question vectors; no rank searched (see their error)."
            )
        if len(ks) != 1:
            raise RagInputError(f"Every rank must search with the same k, got {sorted(ks)} across ranks.")
        widest = max(sizes)
        if widest == 0:  # every rank knows: no question anywhere, nothing more to exchange
            width = min(k, self.count)
            return np.zeros((0, width), dtype=np.float32), np.zeros((0, width), dtype=np.int64)
        padded = torch.zeros((widest, self.dim), dtype=torch.float32)
        padded[: len(q)] = torch.from_numpy(q)
        gathered = self._gather_tensor(padded)
        everyone = np.concatenate([g[:n].numpy() for g, n in zip(gathered, sizes)]) if sum(sizes) else q[:0]

        # this rank's top-k of everyone's questions, padded to width k (ranks may hold fewer rows than k)
        scores = np.full((len(everyone), k), -np.inf, dtype=np.float32)
        ids = np.full((len(everyone), k), -1, dtype=np.int64)
        if self._local.shard_ids and len(everyone):
            s, i = self._local.search(everyone, k)
            scores[:, : s.shape[1]], ids[:, : i.shape[1]] = s, i
        all_scores = self._gather_tensor(torch.from_numpy(scores))
        all_ids = self._gather_tensor(torch.from_numpy(ids))
        merged_s, merged_i = merge_topk([x.numpy() for x in all_scores], [x.numpy() for x in all_ids], k)
        width = min(k, self.count)
        if merged_i.shape[1] != width:
            raise IndexMismatchError(
                f"The ranks together returned {merged_i.shape[1]} passages per question, expected {width}; every "
                "shard of the index must be held by one rank (check that all ranks opened the same folder)."
            )
        self._fetch_rows(np.unique(merged_i))
        start = sum(sizes[: self.rank])
        return merged_s[start : start + len(q)], merged_i[start : start + len(q)]

    def _fetch_rows(self, needed: np.ndarray) -> None:
        """Every rank sends the passages and vectors of the `needed` rows it holds; all keep all of them."""
        held = np.zeros(len(needed), dtype=bool)
        if self._local.shard_ids and len(needed):
            held = np.isin(self._local.shard_of(needed), self._local.shard_ids)
        mine = needed[held]
        passages = self._local.get_passages(mine) if len(mine) else []
        answers: list[Any] = [None] * self.world_size
        dist.all_gather_object(answers, (mine.tolist(), passages), group=self._group)
        counts = [len(rows) for rows, _ in answers]
        padded = torch.zeros((max(counts) if counts else 0, self.dim), dtype=torch.float32)
        if len(mine):
            padded[: len(mine)] = torch.from_numpy(self._local.get_embeddings(mine))
        vectors = self._gather_tensor(padded)
        rows = np.asarray([r for rs, _ in answers for r in rs], dtype=np.int64)
        self._cache_passages = {int(r): p for rs, ps in answers for r, p in zip(rs, ps)}
        stacked = np.concatenate([v[:n].numpy() for v, n in zip(vectors, counts)]) if len(rows) else None
        order = np.argsort(rows)
        self._cache_rows = rows[order]
        self._cache_vectors = stacked[order] if stacked is not None else np.zeros((0, self.dim), np.float32)

    # ------------------------------------------------------------------ lookups (local)
    def _cached_positions(self, flat: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._cache_rows, flat)
        pos_c = np.minimum(pos, max(len(self._cache_rows) - 1, 0))
        ok = (pos < len(self._cache_rows)) & (self._cache_rows[pos_c] == flat) if len(self._cache_rows) else pos < 0
        if not ok.all():
            raise RagInputError(
                f"Row id(s) {flat[~ok][:5].tolist()} are neither in this rank's shards {self.shard_ids} nor among the "
                "rows of its last search; a DistributedShardedIndex fetches other ranks' rows only as part of search."
            )
        return pos_c

    def _local_mask(self, flat: np.ndarray) -> np.ndarray:
        if not self._local.shard_ids or not len(flat):
            return np.zeros(len(flat), dtype=bool)
        return np.isin(self._local.shard_of(flat), self._local.shard_ids)

    def get_passages(self, row_ids: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Passages of `row_ids` (1-D or 2-D): this rank's own rows, or rows its last `search` returned."""
        ids = np.asarray(row_ids, dtype=np.int64)
        if ids.ndim > 2:
            raise RagInputError(f"row_ids must be 1-D or 2-D, got shape {ids.shape}.")
        flat = ids.reshape(-1)
        local = self._local_mask(flat)
        out: list[Any] = [None] * len(flat)
        if local.any():
            for slot, p in zip(np.nonzero(local)[0].tolist(), self._local.get_passages(flat[local])):
                out[slot] = p
        remote = np.nonzero(~local)[0]
        if len(remote):
            self._cached_positions(flat[remote])
            for slot in remote.tolist():
                out[slot] = dict(self._cache_passages[int(flat[slot])])
        return rows_like(out, ids)

    def get_embeddings(self, row_ids: Any) -> np.ndarray:
        """Vectors of `row_ids` (any shape), float32 `[*S, dim]`: own rows, or rows of the last `search`."""
        ids = np.asarray(row_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        local = self._local_mask(flat)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        if local.any():
            out[local] = self._local.get_embeddings(flat[local])
        if (~local).any():
            out[~local] = self._cache_vectors[self._cached_positions(flat[~local])]
        return out.reshape(*ids.shape, self.dim)

    def all_passage_ids(self) -> list[str]:
        """The ``id`` of every passage of the index, in global row order (collective: each rank sends its shards')."""
        mine = [(s, idx.passages_table.column("id").to_pylist()) for s, idx in self._local.shards.items()]
        answers: list[Any] = [None] * self.world_size
        dist.all_gather_object(answers, mine, group=self._group)
        by_shard = dict(item for part in answers for item in part)
        if sorted(by_shard) != list(range(self.num_shards)):
            raise IndexMismatchError(
                f"The ranks hold shards {sorted(by_shard)} of {self.num_shards}; some are missing."
            )
        return [pid for s in range(self.num_shards) for pid in by_shard[s]]

    def add(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RagInputError("A sharded index cannot grow in place; rebuild it (scripts/build_index.py --num-shards).")

    def remove(self, *args: Any, **kwargs: Any) -> int:
        raise RagInputError("Rows cannot be removed from a sharded index in place; rebuild it without them.")

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RagInputError(
            "A DistributedShardedIndex holds only this rank's shards and cannot be saved; the sharded folder it was "
            "opened from is already the saved index (copy that folder)."
        )


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().to("cpu").float().numpy()
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1 and q.size == dim:
        q = q[None, :]
    if q.ndim == 1 and q.size == 0:
        q = q.reshape(0, dim)
    if q.ndim != 2 or q.shape[1] != dim:
        raise IndexMismatchError(
            f"Query vectors must have shape [batch, {dim}] to match the index, got {q.shape}; use the question "
            "encoder that matches the index."
        )
    if not np.isfinite(q).all():
        raise RagInputError("queries contain NaN or infinite values; check the question encoder output.")
    return np.ascontiguousarray(q)


def use_distributed_index(index_folder: str | os.PathLike) -> bool:
    """Whether `index_folder` is a sharded index and this process is one of several torch.distributed ranks."""
    from .index.sharded import is_sharded_folder

    return (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded_folder(index_folder)
    )


def open_distributed_retriever(
    index_folder: str | os.PathLike,
    *,
    expected_dim: int | None = None,
    expected_fingerprint: str | None = None,
    mmap: bool = False,
    verify: bool | None = None,
) -> Any:
    """A dense `RagRetriever` over this rank's shards of `index_folder` (see `DistributedShardedIndex`)."""
    from .retrieval_rag import RagRetriever

    index = DistributedShardedIndex.open(
        index_folder, mmap=mmap, verify=verify, expected_dim=expected_dim, expected_fingerprint=expected_fingerprint
    )
    return RagRetriever(index, retrieval="dense")

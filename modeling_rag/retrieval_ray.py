"""Retrieval across the machines of a Ray cluster: shard-holding actors, fanned out to and merged.

`RayShardedIndex(folder)` starts one actor per group of shards of a sharded index folder
(`index/sharded.py`; default one shard per actor), spread over the cluster's nodes
(``scheduling_strategy="SPREAD"``). Each actor opens only its shards, from the same path on its node (a
shared file system, or each node's own download of its shards: `hub_utils.download_index_shards`).
`search` sends the question batch to every actor at once (``ray.get`` on all the futures), merges the
per-actor top-k by score, then the smaller global row id, exactly as one process holding every shard
would. `get_passages` / `get_embeddings` ask the actors holding the rows. The object offers the read side
of `PassageIndex`, so ``RagRetriever(RayShardedIndex(folder))`` attached to a model makes
``model.answer(...)`` work unchanged.

Results are never short of a shard: an actor that has died (killed, its node lost) is restarted once and
asked again (``max_restarts=1``); if it cannot answer, `ShardUnavailableError` names the shards it held.
Install with ``pip install -e ".[ray]"``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError('modeling_rag.retrieval_ray needs Ray: pip install -e ".[ray]" (or pip install ray).') from exc

from .errors import IndexMismatchError, RagConfigError, RagInputError, ShardUnavailableError
from .index.sharded import ShardedPassageIndex, merge_topk, read_manifest, rows_like

logger = logging.getLogger(__name__)

__all__ = ["RayShardedIndex"]


class ShardActor:
    """Holds some shards of a sharded index (a Ray actor: see `RayShardedIndex`)."""

    def __init__(self, folder: str, shards: list[int], mmap: bool, verify: bool | None) -> None:
        self.index = ShardedPassageIndex.open(folder, shards=shards, mmap=mmap, verify=verify)

    def info(self) -> dict[str, Any]:
        return {
            "shards": self.index.shard_ids,
            "count": self.index.count,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def passages(self, row_ids: np.ndarray) -> list[dict[str, Any]]:
        return self.index.get_passages(row_ids)

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        return self.index.get_embeddings(row_ids)


class RayShardedIndex:
    """A sharded index whose shards live in Ray actors (see the module docstring)."""

    is_sharded_index = True

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        shards_per_actor: int = 1,
        num_cpus: float = 1.0,
        max_restarts: int = 1,
        scheduling_strategy: str = "SPREAD",
        mmap: bool = False,
        verify: bool | None = None,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Starts the actors (Ray must be initialised, `ray.init(...)`) and waits until each has opened its shards.

        `shards_per_actor` groups consecutive shards in one actor; `num_cpus` is reserved per actor;
        `max_restarts` is how often a dead actor is restarted and asked again (0: fail at once);
        `timeout_s` bounds each wait for the actors (None: no bound).
        """
        if not ray.is_initialized():
            raise RagConfigError("RayShardedIndex needs a running Ray: call ray.init(...) (or ray.init(address=...)).")
        if isinstance(shards_per_actor, bool) or not isinstance(shards_per_actor, int) or shards_per_actor < 1:
            raise RagConfigError(f"shards_per_actor must be a positive integer, got {shards_per_actor!r}.")
        self._folder = os.path.abspath(os.fspath(folder))  # the actors may start in another directory
        self._manifest = read_manifest(self._folder)
        m = self._manifest
        if expected_dim is not None and int(expected_dim) != m["dim"]:
            raise IndexMismatchError(
                f"The sharded index at {folder} holds vectors of dimension {m['dim']} but the encoder produces "
                f"{expected_dim}; rebuild the index with this encoder."
            )
        fp = m.get("encoder_fingerprint")
        if expected_fingerprint is not None and fp is not None and fp != expected_fingerprint:
            raise IndexMismatchError(f"The sharded index at {folder} was built with a different encoder.")
        n = m["num_shards"]
        self._groups = [list(range(s, min(s + shards_per_actor, n))) for s in range(0, n, shards_per_actor)]
        self._group_of_shard = np.asarray([g for g, shards in enumerate(self._groups) for _ in shards])
        self._starts = np.asarray([s["row_start"] for s in m["shards"]], dtype=np.int64)
        self._stops = np.asarray([s["row_stop"] for s in m["shards"]], dtype=np.int64)
        self._options = {"num_cpus": num_cpus, "scheduling_strategy": scheduling_strategy}
        self._open_args = (mmap, verify)
        self.max_restarts = int(max_restarts)
        self.timeout_s = timeout_s
        self._remote = ray.remote(ShardActor)
        self._actors = [self._start(g) for g in range(len(self._groups))]
        self._infos = self._call_all("info", [() for _ in self._groups])

    def _start(self, group: int) -> Any:
        return self._remote.options(**self._options).remote(self._folder, self._groups[group], *self._open_args)

    # ------------------------------------------------------------------ fan-out with restarts
    def _call_all(self, method: str, args: list[tuple]) -> list[Any]:
        """Calls `method(*args[g])` on every actor g at once; a dead actor is restarted and asked again."""
        futures = {
            g: getattr(self._actors[g], method).remote(*args[g]) for g in range(len(args)) if args[g] is not None
        }
        results: dict[int, Any] = {}
        restarts = dict.fromkeys(futures, 0)
        while futures:
            g, fut = next(iter(futures.items()))
            try:
                results[g] = ray.get(fut, timeout=self.timeout_s)
                del futures[g]
            except (RayActorError, GetTimeoutError) as exc:
                shards = self._groups[g]
                if restarts[g] >= self.max_restarts:
                    raise ShardUnavailableError(
                        f"Shard(s) {shards} of the sharded index {self._folder} could not answer: their Ray actor "
                        f"{'did not answer in time' if isinstance(exc, GetTimeoutError) else 'died'} "
                        f"({type(exc).__name__}){' after a restart' if restarts[g] else ''}; the results would miss "
                        "their passages. Check the Ray nodes (ray status) and retry.",
                        shard=shards[0],
                    ) from exc
                restarts[g] += 1
                logger.warning("The Ray actor of shard(s) %s died (%s); restarting it.", shards, type(exc).__name__)
                ray.kill(self._actors[g], no_restart=True)
                self._actors[g] = self._start(g)
                futures[g] = getattr(self._actors[g], method).remote(*args[g])
        return [results.get(g) for g in range(len(args))]

    # ------------------------------------------------------------------ properties
    @property
    def actors(self) -> list[Any]:
        """The actor handles, one per group of shards (`groups`)."""
        return list(self._actors)

    @property
    def groups(self) -> list[list[int]]:
        """The shards each actor holds."""
        return [list(g) for g in self._groups]

    @property
    def actor_infos(self) -> list[dict[str, Any]]:
        """What each actor reported when it started: shards, count, node id, pid."""
        return [dict(i) for i in self._infos]

    num_shards = property(lambda self: int(self._manifest["num_shards"]), doc="Number of shards.")
    count = property(lambda self: int(self._manifest["count"]), doc="Passages in the whole index.")
    dim = property(lambda self: int(self._manifest["dim"]), doc="Vector size.")
    metric = property(lambda self: self._manifest["metric"], doc="``ip`` or ``l2``.")
    kind = property(lambda self: self._manifest["kind"], doc="FAISS index kind of the shards.")
    normalized = property(lambda self: bool(self._manifest["normalized"]), doc="Whether the vectors have unit norm.")
    encoder_name = property(lambda self: self._manifest.get("encoder_name"), doc="Encoder name, if recorded.")
    encoder_fingerprint = property(lambda self: self._manifest.get("encoder_fingerprint"), doc="Encoder fingerprint.")
    chunking = property(lambda self: self._manifest.get("chunking"), doc="Chunking settings, if recorded.")

    def __len__(self) -> int:
        return self.count

    @property
    def row_ids(self) -> np.ndarray:
        """Every global row id (the manifest's ranges are consecutive from 0)."""
        return np.arange(self.count, dtype=np.int64)

    @property
    def config(self) -> dict[str, Any]:
        m = self._manifest
        cfg = {k: m[k] for k in ("dim", "metric", "kind", "count", "normalized", "num_shards")}
        cfg.update(encoder_name=self.encoder_name, encoder_fingerprint=self.encoder_fingerprint, chunking=self.chunking)
        for key, value in (m.get("extra") or {}).items():
            cfg.setdefault(key, value)
        return cfg

    def __repr__(self) -> str:
        return f"RayShardedIndex(shards={self.num_shards}, actors={len(self._actors)}, count={self.count})"

    # ------------------------------------------------------------------ search and lookups
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` over every shard: `(scores float32 [B, k'], global row ids int64 [B, k'])`, as `PassageIndex`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        if hasattr(queries, "detach"):
            queries = queries.detach().to("cpu").float().numpy()
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(
                f"Query vectors must have shape [batch, {self.dim}] to match the index, got {q.shape}."
            )
        ref = ray.put(np.ascontiguousarray(q))
        parts = self._call_all("search", [(ref, int(k)) for _ in self._groups])
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], int(k))

    def _by_group(self, row_ids: Any) -> tuple[np.ndarray, list[tuple | None], list[np.ndarray]]:
        ids = np.asarray(row_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise RagInputError(f"row_ids must be integers, got dtype {ids.dtype}.")
        ids = ids.astype(np.int64)
        flat = ids.reshape(-1)
        bad = (flat < 0) | (flat >= self.count)
        if bad.any():
            raise RagInputError(f"Unknown row id(s) {flat[bad][:5].tolist()}: the index has rows 0..{self.count - 1}.")
        group = self._group_of_shard[np.searchsorted(self._stops, flat, side="right")] if len(flat) else flat
        slots = [np.nonzero(group == g)[0] for g in range(len(self._groups))]
        args = [(flat[s],) if len(s) else None for s in slots]
        return ids, args, slots

    def get_passages(self, row_ids: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The passages of global `row_ids` (1-D: a list of dicts; 2-D: a list of lists)."""
        ids, args, slots = self._by_group(row_ids)
        if ids.ndim > 2:
            raise RagInputError(f"row_ids must be 1-D or 2-D, got shape {ids.shape}.")
        out: list[Any] = [None] * ids.size
        for g, part in enumerate(self._call_all("passages", args)):
            for slot, p in zip(slots[g].tolist(), part or []):
                out[slot] = p
        return rows_like(out, ids)

    def get_embeddings(self, row_ids: Any) -> np.ndarray:
        """The stored vectors of global `row_ids` (any shape `S`), float32 `[*S, dim]`."""
        ids, args, slots = self._by_group(row_ids)
        out = np.zeros((ids.size, self.dim), dtype=np.float32)
        for g, part in enumerate(self._call_all("embeddings", args)):
            if part is not None:
                out[slots[g]] = part
        return out.reshape(*ids.shape, self.dim)

    def set_search_params(self, **params: int) -> None:
        raise RagInputError("Set search parameters on the shards before building the sharded index (not per actor).")

    def add(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RagInputError("A sharded index cannot grow in place; rebuild it (scripts/build_index.py --num-shards).")

    def remove(self, *args: Any, **kwargs: Any) -> int:
        raise RagInputError("Rows cannot be removed from a sharded index in place; rebuild it without them.")

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise RagInputError("A RayShardedIndex is served from its sharded folder, which is already the saved index.")

    def shutdown(self) -> None:
        """Stops the actors."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

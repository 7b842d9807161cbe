"""A sharded index: N ordinary index folders over consecutive row ranges, plus one manifest.

A sharded folder holds (names from `constants.py`)::

    shards.json     the manifest: format version, shard count, total count, dim, metric, index kind,
                    encoder name and fingerprint, and per shard its sub-folder, row range
                    ``[row_start, row_stop)`` and the sha256 of its ``index_config.json``; plus the sha256
                    and size of any other file (a ``bm25/`` kept beside the shards); extra entries
                    (retriever settings, encoding) under ``"extra"``
    shard-00000/    a complete `PassageIndex` folder (format 2) of rows ``0 .. n0-1``
    shard-00001/    ... of rows ``n0 .. n0+n1-1``, and so on

Each shard is an ordinary index: it can be opened alone with `PassageIndex.load`, and numbers its rows
from 0. The *global* row id of a shard's local row ``r`` is ``row_start + r``. A shard's
``index_config.json`` already holds the sha256 of each of its files, so the manifest's checksum of that
config covers every byte of the shard (checked again by `PassageIndex.load`).

`ShardedPassageIndex.open(folder, shards=None)` opens all shards or only some (a process holding its part
of a corpus larger than its memory). Searching merges the per-shard top-k by score, ties broken by the
smaller global row id, so a process holding all shards of a flat index gets exactly the results of the
unsharded index. It offers the read side of `PassageIndex` (search, get_passages, get_embeddings,
row_ids, config ...), so `RagRetriever` and the model use it unchanged; it is read-only (rebuild to change
it). `sharded_build.py` writes one (`build_sharded_index` from vectors in memory; `write_shard` +
`write_manifest` one shard at a time, each process of a launch its own shards, see `scripts/build_index.py`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import INDEX_CONFIG_NAME, SHARD_DIR_TEMPLATE, SHARD_MANIFEST_FORMAT_VERSION, SHARD_MANIFEST_NAME
from ..errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError, ShardIntegrityError
from ..utils.hashing import sha256_file
from .passage_index import PassageIndex

logger = logging.getLogger(__name__)

__all__ = [
    "ShardedPassageIndex",
    "is_sharded_folder",
    "merge_topk",
    "read_manifest",
    "shard_bounds",
    "shard_dir_name",
    "shards_of_rank",
]

MANIFEST_TYPE = "sharded_passage_index"
# the shard's own config entry that `write_shard` adds and `write_manifest` checks
SHARD_CONFIG_KEY = "shard"


def shard_dir_name(shard: int) -> str:
    """The sub-folder of shard number `shard` (``shard-00003``)."""
    return SHARD_DIR_TEMPLATE.format(int(shard))


def is_sharded_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a sharded index (its manifest)."""
    return (Path(folder) / SHARD_MANIFEST_NAME).is_file()


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """`num_shards` consecutive row ranges ``[start, stop)`` covering ``0..n-1``, sizes differing by at most 1."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise RagConfigError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if num_shards > n:
        raise RagConfigError(f"Cannot split {n} passages into {num_shards} shards; use at most {n} shards.")
    edges = [n * i // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` holds (and builds): ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise RagConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    return list(range(rank, num_shards, world_size))


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard results (each `[B, k_i]`, larger scores better, global ids) into the top `k` per row.

    Order: score descending, then global row id ascending, so the result does not depend on how the rows
    were split. Slots with id ``-1`` (padding) are dropped; rows are as wide as the fewest real results
    found for any query, at most `k`.
    """
    if not scores:
        raise RagInputError("merge_topk needs at least one shard's results.")
    s = np.concatenate([np.asarray(x, dtype=np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    valid = i >= 0
    s = np.where(valid, s, -np.inf).astype(np.float32)
    # lexsort's last key is the primary one: -score, then id (padding ids sort last among -inf)
    order = np.lexsort((np.where(valid, i, np.iinfo(np.int64).max), -s.astype(np.float64)), axis=1)
    width = min(int(k), int(valid.sum(axis=1).min())) if len(s) else min(int(k), s.shape[1])
    order = order[:, :width]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``shards.json`` of `folder` (no shard is opened)."""
    folder = Path(folder)
    path = folder / SHARD_MANIFEST_NAME
    if not path.is_file():
        raise IndexIntegrityError(f"{SHARD_MANIFEST_NAME} is missing from {folder}; it is not a sharded index folder.")

    def bad(msg: str) -> ShardIntegrityError:
        return ShardIntegrityError(f"{SHARD_MANIFEST_NAME} in {folder}: {msg}. Rebuild the index (build_index.py).")

    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("type") != MANIFEST_TYPE:
        raise bad(f"the top level must be an object with type {MANIFEST_TYPE!r}")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version is missing or not an integer")
    if version > SHARD_MANIFEST_FORMAT_VERSION:
        raise ShardIntegrityError(
            f"The sharded index at {folder} has manifest format {version}, newer than this modeling_rag supports "
            f"({SHARD_MANIFEST_FORMAT_VERSION}); upgrade modeling_rag."
        )
    for key in ("num_shards", "count", "dim"):
        if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
            raise bad(f"{key} must be a positive integer, got {m.get(key)!r}")
    shards = m.get("shards")
    if not isinstance(shards, list) or len(shards) != m["num_shards"]:
        raise bad(f"shards must list exactly num_shards={m['num_shards']} entries")
    start = 0
    for i, s in enumerate(shards):
        if (
            not isinstance(s, dict)
            or s.get("path") != shard_dir_name(i)
            or s.get("row_start") != start
            or not isinstance(s.get("row_stop"), int)
            or s["row_stop"] <= start
            or not isinstance(s.get("config_sha256"), str)
        ):
            raise bad(f"shard entry {i} must name {shard_dir_name(i)}, rows from {start}, and a config sha256")
        start = s["row_stop"]
    if start != m["count"]:
        raise bad(f"the shards' row ranges cover {start} rows but count is {m['count']}")
    if not isinstance(m.get("files", {}), dict) or not isinstance(m.get("extra", {}), dict):
        raise bad("files and extra must be objects")
    return m


def rows_like(items: list, ids: np.ndarray) -> list:
    """`items` (one per id of the flattened `ids`) as a list of rows when `ids` is 2-D, else as it is."""
    if ids.ndim == 2:
        width = ids.shape[1]
        return [items[i * width : (i + 1) * width] for i in range(ids.shape[0])]
    return items


class ShardedPassageIndex:
    """Some or all shards of a sharded index folder, searched as one index (global row ids)."""

    # `RagRetriever` accepts any index with this mark (the read side of `PassageIndex`)
    is_sharded_index = True

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: dict[int, PassageIndex]) -> None:
        self._folder = folder
        self._manifest = manifest
        self._shards = dict(sorted(shards.items()))
        self._starts = np.asarray([s["row_start"] for s in manifest["shards"]], dtype=np.int64)
        self._stops = np.asarray([s["row_stop"] for s in manifest["shards"]], dtype=np.int64)
        self._extra = dict(manifest.get("extra") or {})

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        shards: Iterable[int] | None = None,
        *,
        mmap: bool = False,
        verify: bool | None = None,
        verify_checksums: bool | None = None,
        expected_dim: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> ShardedPassageIndex:
        """Opens the shards numbered `shards` (default: all) of the sharded index in `folder`.

        Each shard is checked against the manifest (its config's sha256, dim, metric, kind, count, encoder)
        and loaded with `PassageIndex.load` (`mmap`, `verify`: see there). Raises `ShardIntegrityError` naming
        the shard that is missing or does not match, `IndexMismatchError` when the index does not fit
        `expected_dim` / `expected_fingerprint` (the question encoder).
        """
        folder = Path(folder)
        if verify_checksums is False and verify is None:
            verify = False
        m = read_manifest(folder)
        if expected_dim is not None and int(expected_dim) != m["dim"]:
            raise IndexMismatchError(
                f"The sharded index at {folder} holds vectors of dimension {m['dim']} but the encoder produces "
                f"{expected_dim}; rebuild the index with this encoder or use the one it was built with "
                f"({m.get('encoder_name') or 'unknown'})."
            )
        fp = m.get("encoder_fingerprint")
        if expected_fingerprint is not None and fp is not None and fp != expected_fingerprint:
            raise IndexMismatchError(
                f"The sharded index at {folder} was built with a different encoder (fingerprint {fp[:12]}…) than the "
                f"one given ({expected_fingerprint[:12]}…); rebuild it with this encoder."
            )
        wanted = list(range(m["num_shards"])) if shards is None else sorted({int(s) for s in shards})
        for s in wanted:
            if not 0 <= s < m["num_shards"]:
                raise RagInputError(
                    f"Shard {s} does not exist: the index at {folder} has shards 0..{m['num_shards'] - 1}."
                )
        if shards is None:  # files beside the shards (bm25/) belong to the whole index, not to a part of it
            _verify_top_files(folder, m)
        opened = {s: _open_shard(folder, m, s, mmap=mmap, verify=verify) for s in wanted}
        return cls(folder, m, opened)

    # ------------------------------------------------------------------ properties
    @property
    def folder(self) -> Path:
        """The sharded index folder."""
        return self._folder

    @property
    def num_shards(self) -> int:
        """Number of shards of the whole index."""
        return int(self._manifest["num_shards"])

    @property
    def shard_ids(self) -> list[int]:
        """The shards this object holds open."""
        return list(self._shards)

    @property
    def shards(self) -> dict[int, PassageIndex]:
        """The open shards by number (each numbers its rows from 0)."""
        return dict(self._shards)

    def row_range(self, shard: int) -> tuple[int, int]:
        """The global row ids ``[start, stop)`` of `shard`."""
        return int(self._starts[shard]), int(self._stops[shard])

    @property
    def dim(self) -> int:
        """Vector size."""
        return int(self._manifest["dim"])

    @property
    def metric(self) -> str:
        """``"ip"`` or ``"l2"``."""
        return self._manifest["metric"]

    @property
    def kind(self) -> str:
        """The FAISS index kind of every shard."""
        return self._manifest["kind"]

    @property
    def kind_params(self) -> dict[str, int]:
        """The parameters of the first open shard (IVF list counts differ with the shard sizes)."""
        return next(iter(self._shards.values())).kind_params if self._shards else {}

    @property
    def count(self) -> int:
        """Number of passages in the open shards (what `search` searches)."""
        return sum(s.count for s in self._shards.values())

    @property
    def total_count(self) -> int:
        """Number of passages in the whole index, open or not."""
        return int(self._manifest["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def normalized(self) -> bool:
        """Whether the vectors have unit L2 norm."""
        return bool(self._manifest["normalized"])

    @property
    def encoder_name(self) -> str | None:
        """Name of the encoder that produced the vectors, if recorded."""
        return self._manifest.get("encoder_name")

    @property
    def encoder_fingerprint(self) -> str | None:
        """`weights_fingerprint` of the encoder that produced the vectors, if recorded."""
        return self._manifest.get("encoder_fingerprint")

    @property
    def chunking(self) -> dict | None:
        """The chunking settings the passages were made with, if recorded."""
        return self._manifest.get("chunking")

    @property
    def exact_vectors(self) -> str | None:
        """As `PassageIndex.exact_vectors`, for the first open shard."""
        return next(iter(self._shards.values())).exact_vectors if self._shards else None

    @property
    def row_ids(self) -> np.ndarray:
        """The global row ids of the open shards, ascending."""
        parts = [idx.row_ids + self._starts[s] for s, idx in self._shards.items()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def config(self) -> dict[str, Any]:
        """The index-level settings (as `PassageIndex.config`, without per-shard details) and extra entries."""
        cfg = {k: self._manifest[k] for k in ("dim", "metric", "kind", "count", "normalized", "num_shards")}
        cfg.update(encoder_name=self.encoder_name, encoder_fingerprint=self.encoder_fingerprint, chunking=self.chunking)
        for key, value in self._extra.items():
            cfg.setdefault(key, value)
        return cfg

    def __repr__(self) -> str:
        return (
            f"ShardedPassageIndex(kind={self.kind!r}, metric={self.metric!r}, dim={self.dim}, "
            f"shards={self.shard_ids} of {self.num_shards}, count={self.count} of {self.total_count})"
        )

    def set_extra_config(self, key: str, value: Any) -> None:
        """Stores an extra JSON-serialisable entry in the manifest (written by `save`)."""
        self._extra[key] = value

    def set_search_params(self, **params: int) -> None:
        """Changes search parameters of every open shard (see `PassageIndex.set_search_params`)."""
        for idx in self._shards.values():
            idx.set_search_params(**params)

    # ------------------------------------------------------------------ lookups
    def shard_of(self, row_ids: Any) -> np.ndarray:
        """The shard number of each global row id (same shape); unknown ids raise `RagInputError`."""
        ids = np.asarray(row_ids, dtype=np.int64)
        which = np.searchsorted(self._stops, ids, side="right")
        bad = (ids < 0) | (which >= self.num_shards)
        if bad.any():
            raise RagInputError(
                f"Unknown row id(s) {ids[bad][:5].tolist()}: the index has rows 0..{self.total_count - 1}."
            )
        return which

    def _split(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        flat = ids.reshape(-1)
        which = self.shard_of(flat)
        missing = sorted(set(np.unique(which).tolist()) - set(self._shards))
        if missing:
            raise RagInputError(
                f"Row id(s) {flat[np.isin(which, missing)][:5].tolist()} are in shard(s) {missing}, which this process "
                f"did not open (it holds {self.shard_ids}); open them, or fetch through the distributed retriever."
            )
        return flat, [(s, np.nonzero(which == s)[0]) for s in np.unique(which).tolist()]

    def get_passages(self, row_ids: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The passages of global `row_ids` (1-D: a list of dicts; 2-D: a list of lists), ``row_id`` global."""
        ids = np.asarray(row_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise RagInputError(f"row_ids must be integers, got dtype {ids.dtype}.")
        ids = ids.astype(np.int64)
        if ids.ndim > 2:
            raise RagInputError(f"row_ids must be 1-D or 2-D, got shape {ids.shape}.")
        flat, groups = self._split(ids)
        out: list[Any] = [None] * len(flat)
        for s, slots in groups:
            start = int(self._starts[s])
            for slot, p in zip(slots.tolist(), self._shards[s].get_passages(flat[slots] - start)):
                p["row_id"] = int(p["row_id"]) + start
                out[slot] = p
        return rows_like(out, ids)

    def get_embeddings(self, row_ids: Any) -> np.ndarray:
        """The stored vectors of global `row_ids` (any shape `S`), float32 `[*S, dim]`."""
        ids = np.asarray(row_ids, dtype=np.int64)
        flat, groups = self._split(ids)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        for s, slots in groups:
            out[slots] = self._shards[s].get_embeddings(flat[slots] - self._starts[s])
        return out.reshape(*ids.shape, self.dim)

    def iter_passages(self, batch_size: int = 65_536) -> Iterable[list[dict[str, Any]]]:
        """Every passage of the open shards in global row order, a batch at a time."""
        for s, idx in self._shards.items():
            start = int(self._starts[s])
            for batch in idx.iter_passages(batch_size):
                for p in batch:
                    p["row_id"] = int(p["row_id"]) + start
                yield batch

    # ------------------------------------------------------------------ search
    def search_shards(self, queries: Any, k: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per open shard: `(shard, scores [B, k_s], global row ids [B, k_s])`, each shard's own top-`k`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        out = []
        for s, idx in self._shards.items():
            scores, ids = idx.search(queries, int(k))
            out.append((s, scores, ids + self._starts[s]))
        return out

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` over the open shards: `(scores float32 [B, k'], global row ids int64 [B, k'])`, best first,
        ``k' = min(k, count)``; ties broken by the smaller row id."""
        if not self._shards:
            raise RagInputError("This ShardedPassageIndex holds no shard; open at least one to search.")
        parts = self.search_shards(queries, k)
        return merge_topk([p[1] for p in parts], [p[2] for p in parts], k)

    # ------------------------------------------------------------------ changes / save
    def add(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RagInputError("A sharded index cannot grow in place; rebuild it (scripts/build_index.py --num-shards).")

    def remove(self, *args: Any, **kwargs: Any) -> int:
        raise RagInputError("Rows cannot be removed from a sharded index in place; rebuild it without them.")

    def save(self, folder: str | os.PathLike, *, extra_files: Callable[[Path], None] | None = None) -> None:
        """Writes the whole sharded index (all shards must be open) to `folder`, atomically (temp sibling + rename).

        `extra_files(tmp_folder)` may add files beside the shards; the manifest lists their checksums.
        """
        missing = sorted(set(range(self.num_shards)) - set(self._shards))
        if missing:
            raise RagInputError(f"Only a fully open sharded index can be saved; shards {missing} are not open.")
        from .folder import swap_in_folder
        from .sharded_build import _check_target, write_manifest

        target = Path(folder).absolute()
        _check_target(target)

        def write(tmp: Path) -> None:
            for s, idx in self._shards.items():
                idx.save(tmp / shard_dir_name(s))
            if extra_files is not None:
                extra_files(tmp)
            write_manifest(tmp, self.num_shards, extra_config=self._extra)

        swap_in_folder(target, write)


def _verify_top_files(folder: Path, m: dict[str, Any]) -> None:
    for rel, meta in (m.get("files") or {}).items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ShardIntegrityError(f"{SHARD_MANIFEST_NAME} in {folder} lists {rel!r}, outside the folder.")
        if not path.is_file() or path.stat().st_size != meta.get("size") or sha256_file(path) != meta.get("sha256"):
            raise ShardIntegrityError(
                f"{rel} in the sharded index {folder} is missing or fails its manifest checksum; rebuild or "
                "re-download the index."
            )


def _open_shard(folder: Path, m: dict[str, Any], shard: int, *, mmap: bool, verify: bool | None) -> PassageIndex:
    entry = m["shards"][shard]
    path = folder / entry["path"]
    where = f"Shard {shard} ({entry['path']}) of the sharded index {folder}"
    config = path / INDEX_CONFIG_NAME
    if not config.is_file():
        raise ShardIntegrityError(
            f"{where} is missing; download it (hub_utils.download_index_shards) or rebuild the index.", shard=shard
        )
    if sha256_file(config) != entry["config_sha256"]:
        raise ShardIntegrityError(
            f"{where} fails its manifest checksum: its {INDEX_CONFIG_NAME} is not the one the manifest was written "
            "with (a shard from another build, or modified); rebuild or re-download the index.",
            shard=shard,
        )
    try:
        idx = PassageIndex.load(path, mmap=mmap, verify=verify)
    except IndexIntegrityError as exc:
        raise ShardIntegrityError(f"{where} is damaged: {exc}", shard=shard) from exc
    count = entry["row_stop"] - entry["row_start"]
    for key, have, want in (
        ("dim", idx.dim, m["dim"]),
        ("metric", idx.metric, m["metric"]),
        ("kind", idx.kind, m["kind"]),
        ("count", idx.count, count),
        ("encoder_fingerprint", idx.encoder_fingerprint, m.get("encoder_fingerprint")),
    ):
        if have != want:
            raise ShardIntegrityError(
                f"{where} has {key}={have!r} but the manifest says {want!r}; rebuild it.", shard=shard
            )
    return idx

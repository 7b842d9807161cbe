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
it). `build_sharded_index` writes one from vectors in memory; `write_shard` + `write_manifest` build one
shard at a time (each process of a launch its own shards, see `scripts/build_index.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import INDEX_CONFIG_NAME, SHARD_DIR_TEMPLATE, SHARD_MANIFEST_FORMAT_VERSION, SHARD_MANIFEST_NAME
from ..errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError, ShardIntegrityError
from ..utils.atomic import atomic_write_text
from ..utils.hashing import sha256_file
from .kinds import resolve_kind
from .passage_index import PassageIndex

logger = logging.getLogger(__name__)

__all__ = [
    "ShardedPassageIndex",
    "build_shards",
    "build_sharded_index",
    "is_sharded_folder",
    "merge_topk",
    "read_manifest",
    "shard_bounds",
    "shard_dir_name",
    "shards_of_rank",
    "write_manifest",
    "write_shard",
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
# Writing
# ----------------------------------------------------------------------------------------------
def write_shard(
    folder: str | os.PathLike,
    shard: int,
    num_shards: int,
    embeddings: Any,
    passages: Sequence[dict[str, Any]],
    row_start: int,
    *,
    kind: str,
    metric: str = "ip",
    encoder_name: str | None = None,
    encoder_fingerprint: str | None = None,
    chunking: dict | None = None,
    normalized: bool | None = None,
    extra_config: dict[str, Any] | None = None,
    **kind_params: Any,
) -> Path:
    """Builds shard `shard` of `num_shards` over its rows (global ids from `row_start`) and saves it.

    `kind` must be a concrete kind (resolve ``"auto"`` once for the whole corpus with `resolve_kind`, so
    every shard is of the same kind). The shard folder is written atomically; returns its path.
    """
    if kind not in ("flat", "hnsw", "ivf_flat", "ivf_pq"):
        raise RagConfigError(f"write_shard needs a concrete kind (resolve 'auto' for the whole corpus), got {kind!r}.")
    index = PassageIndex.build(
        embeddings,
        list(passages),
        metric=metric,
        kind=kind,
        encoder_name=encoder_name,
        encoder_fingerprint=encoder_fingerprint,
        chunking=chunking,
        normalized=normalized,
        **kind_params,
    )
    for key, value in (extra_config or {}).items():
        index.set_extra_config(key, value)
    index.set_extra_config(
        SHARD_CONFIG_KEY,
        {"shard": int(shard), "num_shards": int(num_shards), "row_start": int(row_start), "count": index.count},
    )
    path = Path(folder) / shard_dir_name(shard)
    index.save(path)
    return path


def shard_is_complete(
    folder: str | os.PathLike, shard: int, num_shards: int, row_start: int, count: int, fingerprint: str | None
) -> bool:
    """Whether shard `shard` was already written for this layout (a resumed build skips it)."""
    path = Path(folder) / shard_dir_name(shard)
    try:
        cfg = PassageIndex.read_config(path)
        PassageIndex.verify_files(path)
    except IndexIntegrityError:
        return False
    want = {"shard": int(shard), "num_shards": int(num_shards), "row_start": int(row_start), "count": int(count)}
    return cfg.get(SHARD_CONFIG_KEY) == want and cfg.get("encoder_fingerprint") == fingerprint


def _file_entries(folder: Path, skip: set[str]) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.split("/")[0] in skip or rel == SHARD_MANIFEST_NAME:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def write_manifest(
    folder: str | os.PathLike, num_shards: int, *, extra_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Writes ``shards.json`` for the `num_shards` shard folders in `folder` (all must be written); returns it.

    Checks that the shards agree (dim, metric, kind, normalisation, encoder) and cover consecutive rows.
    Other files in `folder` (e.g. ``bm25/``) are listed with their sha256 too.
    """
    folder = Path(folder)
    shards, first = [], None
    next_start = 0
    for shard in range(num_shards):
        path = folder / shard_dir_name(shard)
        try:
            cfg = PassageIndex.read_config(path)
        except IndexIntegrityError as exc:
            raise ShardIntegrityError(
                f"Shard {shard} of {num_shards} ({path}) is missing or unfinished: {exc}", shard=shard
            ) from exc
        info = cfg.get(SHARD_CONFIG_KEY) or {}
        if info.get("shard") != shard or info.get("num_shards") != num_shards or info.get("row_start") != next_start:
            raise ShardIntegrityError(
                f"Shard folder {path} was written as {info or 'no shard'} but shard {shard} of {num_shards} starting "
                f"at row {next_start} is expected; rebuild the index into an empty folder.",
                shard=shard,
            )
        if first is None:
            first = cfg
        for key in ("dim", "metric", "kind", "normalized", "encoder_fingerprint"):
            if cfg.get(key) != first.get(key):
                raise ShardIntegrityError(
                    f"Shard {shard} has {key}={cfg.get(key)!r} but shard 0 has {first.get(key)!r}; all shards must be "
                    "built alike. Rebuild the index.",
                    shard=shard,
                )
        shards.append(
            {
                "path": shard_dir_name(shard),
                "row_start": next_start,
                "row_stop": next_start + cfg["count"],
                "config_sha256": sha256_file(path / INDEX_CONFIG_NAME),
            }
        )
        next_start += cfg["count"]
    manifest = {
        "format_version": SHARD_MANIFEST_FORMAT_VERSION,
        "type": MANIFEST_TYPE,
        "num_shards": int(num_shards),
        "count": next_start,
        "dim": first["dim"],
        "metric": first["metric"],
        "kind": first["kind"],
        "normalized": first["normalized"],
        "encoder_name": first.get("encoder_name"),
        "encoder_fingerprint": first.get("encoder_fingerprint"),
        "chunking": first.get("chunking"),
        "shards": shards,
        "files": _file_entries(folder, {s["path"] for s in shards}),
        "extra": dict(extra_config or {}),
    }
    atomic_write_text(folder / SHARD_MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def build_sharded_index(
    folder: str | os.PathLike,
    embeddings: Any,
    passages: Sequence[dict[str, Any]],
    num_shards: int,
    *,
    kind: str = "auto",
    metric: str = "ip",
    encoder_name: str | None = None,
    encoder_fingerprint: str | None = None,
    chunking: dict | None = None,
    extra_config: dict[str, Any] | None = None,
    **kind_params: Any,
) -> ShardedPassageIndex:
    """Splits `embeddings` `[N, d]` and `passages` into `num_shards` shards, writes them and the manifest into
    `folder` (which must be new or empty), and opens the result. Rows get global ids ``0..N-1``."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(passages):
        raise RagInputError(f"Got embeddings of shape {emb.shape} for {len(passages)} passages; they must match.")
    _check_target(Path(folder))
    resolved = resolve_kind(kind, len(emb), emb.shape[1])
    for shard, (start, stop) in enumerate(shard_bounds(len(emb), num_shards)):
        write_shard(
            folder,
            shard,
            num_shards,
            emb[start:stop],
            passages[start:stop],
            start,
            kind=resolved,
            metric=metric,
            encoder_name=encoder_name,
            encoder_fingerprint=encoder_fingerprint,
            chunking=chunking,
            **kind_params,
        )
    write_manifest(folder, num_shards, extra_config=extra_config)
    return ShardedPassageIndex.open(folder)


def build_shards(
    folder: str | os.PathLike,
    passages: Sequence[dict[str, Any]],
    encode: Callable[[Sequence[dict[str, Any]]], np.ndarray],
    num_shards: int,
    *,
    dim: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    kind: str = "auto",
    metric: str = "ip",
    encoder_name: str | None = None,
    encoder_fingerprint: str | None = None,
    chunking: dict | None = None,
    extra_config: dict[str, Any] | None = None,
    show_progress: bool = False,
    **kind_params: Any,
) -> dict[str, Any] | None:
    """Encodes and writes the shards of process `rank` (``rank, rank + world_size, ...``) one at a time.

    `encode(passages)` returns their vectors `[n, dim]`; only one shard's vectors and FAISS index are held at
    a time, so memory is bounded by the largest shard. A shard already written for this layout (same shard
    count, rows and encoder) is kept, so a killed build resumes. After `barrier()` (every process's shards are
    written) the main process (rank 0) writes the manifest and returns it; the others return None.
    """
    folder = Path(folder)
    if rank == 0:
        _check_target(folder)
    bounds = shard_bounds(len(passages), num_shards)
    resolved = resolve_kind(kind, len(passages), dim)  # once for the corpus: every shard of one kind
    for shard in shards_of_rank(num_shards, rank, world_size):
        start, stop = bounds[shard]
        if shard_is_complete(folder, shard, num_shards, start, stop - start, encoder_fingerprint):
            logger.info("Shard %d of %d was already written; keeping it.", shard, num_shards)
            continue
        if show_progress:
            logger.info("Building shard %d of %d (rows %d..%d)", shard, num_shards, start, stop - 1)
        part = passages[start:stop]
        write_shard(
            folder,
            shard,
            num_shards,
            encode(part),
            part,
            start,
            kind=resolved,
            metric=metric,
            encoder_name=encoder_name,
            encoder_fingerprint=encoder_fingerprint,
            chunking=chunking,
            **kind_params,
        )
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return write_manifest(folder, num_shards, extra_config=extra_config)


def _check_target(folder: Path) -> None:
    # shard folders without a manifest: a build that was killed, resumed into the same folder
    foreign = folder.is_dir() and any(not p.name.startswith(("shard-", ".")) for p in folder.iterdir())
    if folder.exists() and (not folder.is_dir() or (foreign and not is_sharded_folder(folder))):
        raise RagInputError(
            f"Cannot write a sharded index to {folder}: it exists and is not an empty folder or a sharded index; "
            "choose a new or empty folder."
        )


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
        target = Path(folder).absolute()
        _check_target(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        tmp, old = target.parent / f".{target.name}.tmp-{token}", target.parent / f".{target.name}.old-{token}"
        tmp.mkdir()
        try:
            for s, idx in self._shards.items():
                idx.save(tmp / shard_dir_name(s))
            if extra_files is not None:
                extra_files(tmp)
            write_manifest(tmp, self.num_shards, extra_config=self._extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


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

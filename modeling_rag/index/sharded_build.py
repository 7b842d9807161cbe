"""Writing a sharded index (the format is described in `sharded.py`): one shard at a time, in bounded
memory (`write_shard`, `build_shards`, each process of a launch its own shards), or all at once from vectors
in memory (`build_sharded_index`), then the manifest (`write_manifest`) once every shard is complete."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import INDEX_CONFIG_NAME, SHARD_MANIFEST_FORMAT_VERSION, SHARD_MANIFEST_NAME
from ..errors import IndexIntegrityError, RagConfigError, RagInputError, ShardIntegrityError
from ..utils.atomic import atomic_write_text
from ..utils.hashing import sha256_file
from .kinds import resolve_kind
from .passage_index import PassageIndex
from .sharded import (
    MANIFEST_TYPE,
    SHARD_CONFIG_KEY,
    ShardedPassageIndex,
    is_sharded_folder,
    shard_bounds,
    shard_dir_name,
    shards_of_rank,
)

logger = logging.getLogger(__name__)

__all__ = ["build_shards", "build_sharded_index", "shard_is_complete", "write_manifest", "write_shard"]


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

"""The knowledge index: a FAISS index over passage vectors plus a memory-mapped passage store.

A `PassageIndex` keeps, for every passage, a stable int64 *row id*, the passage fields
(`id`, `title`, `text`, `source`, `position`, any other keys as metadata) and its vector.
Row ids never change: `add` gives new rows the next ids and `remove` leaves the others alone.

Scores are always "larger is better": the inner product for `metric="ip"`, the negative squared
L2 distance for `metric="l2"`.

A saved index folder (format version 2) holds (names from `constants.py`)::

    index_config.json   format version, dim, metric, kind (+ params), count, encoder name and
                        fingerprint, chunking, next row id, sha256 + size of every other file
    index.faiss         the FAISS index (an IndexIDMap2 over flat / HNSW; IVF kinds hold the row
                        ids themselves, with a hash-table direct map); never pickled
    passages.arrow      the passages, an Arrow IPC file in row id order (see `passage_store.py`)
    vectors.f16.npy     ivf_pq only, optional: the exact vectors in float16, same order

The vectors are stored once. Flat, HNSW and IVF-Flat keep them at full precision inside
``index.faiss`` and `get_embeddings` reconstructs them by row id. IVF-PQ keeps only compressed codes;
the exact vectors that re-ranking and the training losses use are then an optional float16 file
(``exact_vectors="float16"``, the default: 2 bytes per dimension on disk, memory-mapped, re-ranked
recall as with float32) or left out (``exact_vectors=None``: the smallest folder; search ranks by the
PQ codes alone and `get_embeddings` returns their PQ reconstruction).

Folders of format version 1 (``passages.jsonl`` + ``embeddings.npy``) still load, with a warning that
gives the command converting them: ``python scripts/verify_index.py FOLDER --convert``.

Loading checks the config, the counts, the row ids and the sha256 of every file; the hashing is done
in full the first time a folder is opened and then trusted while the files' stamps are unchanged
(`index_verification.py`); ``verify=True`` forces it. ``mmap=True`` maps ``index.faiss`` for the IVF
kinds; the passage store is always mapped, so a load reads only headers.

Saving writes a temporary sibling folder and swaps it in with renames, so an interrupted save
leaves a previously saved index untouched.

Index kinds (`kind=`):

* ``"flat"``      exact search; best below ~50k passages.
* ``"hnsw"``      graph search (``M``, ``ef_construction``, ``ef_search``); fast queries, slower build,
                  about 1.3x the memory of flat.
* ``"ivf_flat"``  inverted lists with exact vectors (``nlist``, ``nprobe``); fast to build.
* ``"ivf_pq"``    inverted lists with product-quantised codes (``nlist``, ``nprobe``, ``m``, ``nbits``)
                  re-ranked with the exact float16 vectors when kept (``refine_factor``); smallest file.
* ``"auto"``      ``flat`` up to `AUTO_FLAT_MAX_PASSAGES` (50k) passages; above, ``ivf_flat`` while the
                  float32 vectors fit `memory_budget_bytes` (default `DEFAULT_MEMORY_BUDGET_BYTES`, 4 GiB),
                  else ``ivf_pq`` (logged). ``nlist ~ 2*sqrt(N)``, ``nprobe = max(32, nlist/16)``; set
                  from the measurements of ``scripts/benchmark_index.py`` (``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .constants import (
    EMBEDDINGS_NAME,
    EXACT_VECTORS_NAME,
    FAISS_INDEX_NAME,
    INDEX_CONFIG_NAME,
    INDEX_FORMAT_VERSION,
    LEGACY_PASSAGES_NAME,
    PASSAGES_NAME,
)
from .errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError
from .index_verification import is_trusted, remember_verified, sha256_file
from .passage_store import (
    PASSAGE_FIELDS,
    PassageStoreWriter,
    clean_passage,
    iter_table_batches,
    open_passage_store,
    passages_to_table,
    row_ids_of,
    table_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "METRICS", "PassageIndex", "default_kind_params", "resolve_kind", "sha256_file"]

METRICS = ("ip", "l2")
KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
IVF_KINDS = ("ivf_flat", "ivf_pq")
EXACT_VECTOR_DTYPES = ("float16",)
CONVERT_COMMAND = "python scripts/verify_index.py {folder} --convert"

# "auto" picks flat up to this many passages, ivf_flat above. Measured with
# scripts/benchmark_index.py (d=384, 2 shared CPU cores): at 100k vectors flat answers a single
# query in ~10-70 ms and a batch of 256 in ~4.7 s, while ivf_flat (nlist=632) reaches recall@10
# 1.00 at ~75x (batch) / ~500x (single) lower latency, builds 7x faster than hnsw and uses the
# same memory as flat (hnsw: 1.18x).
AUTO_FLAT_MAX_PASSAGES = 50_000
AUTO_LARGE_KIND = "ivf_flat"
# Past this many bytes of float32 vectors, "auto" compresses them (ivf_pq): a 24 GB host shared with
# a generator cannot keep 21M x 768 float32 vectors (64 GB) in memory.
DEFAULT_MEMORY_BUDGET_BYTES = 4 << 30

# Default parameters per kind; nlist / m / nbits are derived from the corpus size and dimension.
DEFAULT_HNSW_PARAMS = {"M": 32, "ef_construction": 80, "ef_search": 128}
DEFAULT_IVF_NPROBE = 32
# re-score refine_factor * k PQ candidates exactly; scripts/benchmark_index.py --scale at 300k (nlist 1095):
# recall@10 0.88 at 8, 0.98 at 16, 1.00 at 32 (the 1M run at 8 gave 0.74)
DEFAULT_PQ_REFINE_FACTOR = 32
KIND_PARAM_NAMES = {
    "flat": (),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf_flat": ("nlist", "nprobe"),
    "ivf_pq": ("nlist", "nprobe", "m", "nbits", "refine_factor"),
}
SEARCH_PARAM_NAMES = ("ef_search", "nprobe", "refine_factor")

_ADD_BATCH = 65_536


# ----------------------------------------------------------------------------------------------
# Folder helpers
# ----------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a fresh temporary sibling of `target`, then swaps it in with renames.

    If `write` raises (or the process dies), the temporary folder is removed (or left behind as
    a hidden ``.name.tmp-*`` sibling) and whatever was at `target` before is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise RagInputError(f"Cannot save an index to {target}: it exists and is not a folder; choose another path.")
    if target.is_dir() and any(target.iterdir()) and not (target / INDEX_CONFIG_NAME).exists():
        raise RagInputError(
            f"Cannot save an index to {target}: the folder is not empty and holds no {INDEX_CONFIG_NAME}, "
            "so it is not an index folder; choose a new or empty folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    old = target.parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _safe_relpath(folder: Path, rel: Any) -> Path:
    """Resolves a path from a config, refusing anything that leaves `folder`."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise IndexIntegrityError(f"{INDEX_CONFIG_NAME} in {folder} lists an invalid file path {rel!r}.")
    # A lexical check: the Hub cache stores files as symlinks into its blob store, so resolving
    # links would wrongly put every downloaded file "outside" the folder.
    parts = posixpath.normpath(rel).split("/")
    if parts[0] in ("..", "") or ".." in parts:
        raise IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} in {folder} lists {rel!r}, which points outside the index folder; "
            "refusing to read it. Rebuild the index."
        )
    return folder / posixpath.normpath(rel)


# ----------------------------------------------------------------------------------------------
# Kind parameters
# ----------------------------------------------------------------------------------------------
def _default_nlist(n: int) -> int:
    # ~2*sqrt(N) lists, but keep >= 39 training points per list (faiss' own minimum advice).
    return int(max(1, min(round(2 * math.sqrt(max(n, 1))), n // 39 if n >= 39 else 1)))


def _default_pq_m(dim: int) -> int:
    # about 8 dimensions per sub-quantiser (m must divide dim); 4 trains ~30x slower for no recall
    # gain once results are re-ranked with the exact vectors
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def resolve_kind(kind: str, n: int, dim: int | None = None, memory_budget_bytes: int | None = None) -> str:
    """Maps ``"auto"`` to a concrete kind for `n` passages of size `dim`; validates the others.

    Above `AUTO_FLAT_MAX_PASSAGES`, ``"auto"`` is ``ivf_flat`` unless the float32 vectors
    (``n * dim * 4`` bytes) exceed `memory_budget_bytes` (default `DEFAULT_MEMORY_BUDGET_BYTES`), then ``ivf_pq``.
    """
    if kind == "auto":
        if n <= AUTO_FLAT_MAX_PASSAGES:
            return "flat"
        budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else int(memory_budget_bytes)
        if dim is not None and n * dim * 4 > budget:
            logger.warning(
                "kind='auto' picked ivf_pq: %d x %d float32 vectors take %.2f GiB, more than the memory budget of "
                "%.2f GiB (memory_budget_bytes); pass kind='ivf_flat' or a larger budget to keep them uncompressed.",
                n,
                dim,
                n * dim * 4 / 2**30,
                budget / 2**30,
            )
            return "ivf_pq"
        return AUTO_LARGE_KIND
    if kind not in KINDS:
        raise RagConfigError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}.")
    return kind


def default_kind_params(kind: str, n: int, dim: int, **overrides: Any) -> dict[str, int]:
    """The parameters `build` uses for `kind` over `n` vectors of size `dim`, with `overrides` applied."""
    allowed = KIND_PARAM_NAMES[kind]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise RagConfigError(f"Unknown parameter(s) {unknown} for kind={kind!r}; it accepts {list(allowed)}.")
    if kind == "flat":
        params: dict[str, int] = {}
    elif kind == "hnsw":
        params = dict(DEFAULT_HNSW_PARAMS)
    else:
        nlist = int(overrides.get("nlist") or _default_nlist(n))
        params = {"nlist": nlist, "nprobe": min(nlist, max(DEFAULT_IVF_NPROBE, nlist // 16))}
        if kind == "ivf_pq":
            # 2**nbits centroids per sub-quantiser need at least that many training points
            params["m"] = _default_pq_m(dim)
            params["nbits"] = int(max(1, min(8, math.floor(math.log2(max(n, 2))))))
            params["refine_factor"] = DEFAULT_PQ_REFINE_FACTOR
    params.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
            raise RagConfigError(f"{kind} parameter {name} must be a positive integer, got {value!r}.")
        params[name] = int(value)
    if kind == "ivf_pq":
        if dim % params["m"] != 0:
            raise RagConfigError(f"ivf_pq needs m to divide the dimension {dim}, got m={params['m']}.")
        if params["nbits"] > 16:
            raise RagConfigError(f"ivf_pq nbits must be <= 16, got {params['nbits']}.")
    return params


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _make_base_index(kind: str, dim: int, metric: str, params: dict[str, int]) -> faiss.Index:
    fm = _faiss_metric(metric)
    if kind == "flat":
        return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], fm)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], fm)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], fm)
    index.own_fields = True
    quantizer.this.disown()
    index.nprobe = params["nprobe"]
    return index


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------
def _as_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu").float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RagInputError(f"{name} must be a float array of shape [n, dim]: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RagInputError(f"{name} must have shape [n, dim], got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise RagInputError(f"{name} contain NaN or infinite values; check the encoder output.")
    return np.ascontiguousarray(arr)


def _as_row_ids(row_ids: Any) -> np.ndarray:
    try:
        arr = np.asarray(row_ids)
    except (TypeError, ValueError) as exc:
        raise RagInputError(f"row_ids must be integers: {exc}") from exc
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise RagInputError(f"row_ids must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _embeddings_normalized(emb: np.ndarray) -> bool:
    if len(emb) == 0:
        return False
    sample = emb[: min(len(emb), 10_000)]
    norms = np.linalg.norm(sample, axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------
def _needs_direct_map(index: faiss.Index) -> bool:
    ivf = faiss.downcast_index(index)
    return isinstance(ivf, faiss.IndexIVF) and ivf.direct_map.type != faiss.DirectMap.Hashtable


def _wrap_for_ids(base: faiss.Index, kind: str) -> faiss.Index:
    # IVF indexes store arbitrary int64 ids themselves (and IndexIDMap would mis-number them after
    # remove_ids); a hash-table direct map lets them reconstruct a vector by row id. Flat and HNSW are
    # wrapped in an IndexIDMap2 (which reconstructs by id).
    if kind in IVF_KINDS:
        base.set_direct_map_type(faiss.DirectMap.Hashtable)
        return base
    return faiss.IndexIDMap2(base)


def _train_size(kind: str, n: int, params: dict[str, int]) -> int:
    # enough for the coarse quantiser (40 per list) and the PQ codebooks (64 per centroid)
    pq_points = 64 * (1 << params["nbits"]) if kind == "ivf_pq" else 0
    return min(n, max(40 * params["nlist"], pq_points))


def _check_exact_vectors(exact_vectors: str | None, kind: str) -> str | None:
    if kind != "ivf_pq":
        return None  # the FAISS index holds them at full precision
    if exact_vectors is not None and exact_vectors not in EXACT_VECTOR_DTYPES:
        raise RagConfigError(f"exact_vectors must be None or one of {EXACT_VECTOR_DTYPES}, got {exact_vectors!r}.")
    return exact_vectors


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
        self._encoder_name = encoder_name
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
        arguments set that kind's parameters (see `KIND_PARAM_NAMES`). Rows get ids ``0..N-1``.
        `normalized=None` records whether the vectors have unit norm. `exact_vectors` (ivf_pq only):
        ``"float16"`` keeps the exact vectors for re-ranking and the losses, None keeps only PQ codes.
        `memory_budget_bytes` is the budget ``kind="auto"`` fits the float32 vectors into.
        """
        if metric not in METRICS:
            raise RagConfigError(f"metric must be one of {METRICS}, got {metric!r}.")
        emb = _as_matrix(embeddings, "embeddings")
        if not isinstance(passages, Sequence) or isinstance(passages, (str, bytes)):
            raise RagInputError("passages must be a list of dicts.")
        if len(passages) == 0 or len(emb) == 0:
            raise RagInputError("Cannot build an index over zero passages; check that the corpus is not empty.")
        if len(passages) != len(emb):
            raise RagInputError(f"Got {len(emb)} embeddings but {len(passages)} passages; they must match one to one.")
        clean = [clean_passage(p, i) for i, p in enumerate(passages)]
        n, dim = emb.shape
        resolved = resolve_kind(kind, n, dim, memory_budget_bytes)
        exact_dtype = _check_exact_vectors(exact_vectors, resolved)
        params = default_kind_params(resolved, n, dim, **kind_params)
        index = _wrap_for_ids(_make_base_index(resolved, dim, metric, params), resolved)
        if resolved in IVF_KINDS:
            n_train = _train_size(resolved, n, params)
            sample = emb if n_train >= n else emb[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))]
            if show_progress:
                logger.info("Training %s on %d vectors", resolved, len(sample))
            index.train(sample)
        row_ids = np.arange(n, dtype=np.int64)
        for start in tqdm(range(0, n, _ADD_BATCH), desc="Indexing", unit="batch", disable=not show_progress):
            index.add_with_ids(emb[start : start + _ADD_BATCH], row_ids[start : start + _ADD_BATCH])
        return cls(
            index,
            passages_to_table(clean, row_ids),
            exact_vectors=emb.astype(np.float16) if exact_dtype else None,
            metric=metric,
            kind=resolved,
            kind_params=params,
            next_row_id=n,
            normalized=_embeddings_normalized(emb) if normalized is None else bool(normalized),
            encoder_name=encoder_name,
            encoder_fingerprint=encoder_fingerprint,
            chunking=chunking,
        )

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
        if metric not in METRICS:
            raise RagConfigError(f"metric must be one of {METRICS}, got {metric!r}.")
        if total <= 0:
            raise RagInputError("Cannot build an index over zero passages; check that the corpus is not empty.")
        resolved = resolve_kind(kind, total, dim, memory_budget_bytes)
        exact_dtype = _check_exact_vectors(exact_vectors, resolved)
        params = default_kind_params(resolved, total, dim, **kind_params)
        n_train = _train_size(resolved, total, params) if resolved in IVF_KINDS else 0
        index = _wrap_for_ids(_make_base_index(resolved, dim, metric, params), resolved)
        state = {"count": 0}
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def write(tmp: Path) -> None:
            exact = None
            if exact_dtype:
                exact = np.lib.format.open_memmap(tmp / EXACT_VECTORS_NAME, "w+", np.float16, (total, dim))
            bar = tqdm(total=total, desc="Indexing", unit="passage", disable=not show_progress)
            with PassageStoreWriter(tmp / PASSAGES_NAME) as store:
                for emb, passages in batches:
                    emb = _as_matrix(emb, "embeddings")
                    start = state["count"]
                    if len(emb) != len(passages):
                        raise RagInputError(
                            f"A batch has {len(emb)} embeddings but {len(passages)} passages; they must match."
                        )
                    if emb.shape[1] != dim:
                        raise IndexMismatchError(f"A batch has vectors of dimension {emb.shape[1]}, expected {dim}.")
                    if start + len(emb) > total:
                        raise RagInputError(f"The batches hold more than total={total} passages.")
                    ids = np.arange(start, start + len(emb), dtype=np.int64)
                    store.write([clean_passage(p, start + i) for i, p in enumerate(passages)], ids)
                    if exact is not None:
                        exact[start : start + len(emb)] = emb
                    if not index.is_trained:
                        pending.append((emb, ids))
                        if sum(len(e) for e, _ in pending) >= n_train:
                            _train_and_flush(index, pending, n_train)
                    else:
                        index.add_with_ids(emb, ids)
                    state["count"] += len(emb)
                    bar.update(len(emb))
            bar.close()
            if pending:
                _train_and_flush(index, pending, n_train)
            if state["count"] != total:
                raise RagInputError(f"The batches held {state['count']} passages, not total={total}.")
            if exact is not None:
                exact.flush()
                del exact
            faiss.write_index(index, str(tmp / FAISS_INDEX_NAME))
            cfg = _config_dict(
                dim=dim,
                metric=metric,
                kind=resolved,
                kind_params=params,
                count=total,
                normalized=normalized,
                encoder_name=encoder_name,
                encoder_fingerprint=encoder_fingerprint,
                chunking=chunking,
                next_row_id=total,
                deleted=[],
                exact_vectors=exact_dtype,
            )
            _write_config(tmp, cfg)

        write_folder_atomically(folder, write)
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
        cfg = _config_dict(
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
            if name not in SEARCH_PARAM_NAMES or name not in KIND_PARAM_NAMES[self._kind]:
                raise RagConfigError(f"{name!r} is not a search parameter of kind={self._kind!r}.")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise RagConfigError(f"{name} must be a positive integer, got {value!r}.")
            self._kind_params[name] = int(value)

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
        ids = _as_row_ids(row_ids)
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

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._faiss.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def get_embeddings(self, row_ids: Any) -> np.ndarray:
        """The stored vectors of `row_ids` (any shape `S`), as float32 `[*S, dim]`.

        Exact for flat, HNSW and IVF-Flat (reconstructed from FAISS) and for ivf_pq with float16 exact
        vectors (to float16 precision); the PQ reconstruction for ivf_pq without them.
        """
        ids = _as_row_ids(row_ids)
        pos = self._positions(ids).reshape(-1)
        if self._exact is not None:
            out = np.asarray(self._exact[pos], dtype=np.float32)
        else:
            out = self._reconstruct(ids.reshape(-1))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(*ids.shape, self.dim)

    # ------------------------------------------------------------------ search
    def _check_queries(self, queries: Any) -> np.ndarray:
        if hasattr(queries, "detach"):
            queries = queries.detach().to("cpu").float().numpy()
        arr = np.asarray(queries, dtype=np.float32) if not isinstance(queries, np.ndarray) else queries
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise RagInputError(f"queries must have shape [batch, dim], got shape {arr.shape}.")
        if arr.shape[1] != self.dim:
            raise IndexMismatchError(
                f"Query vectors have dimension {arr.shape[1]} but the index holds vectors of dimension {self.dim}; "
                "use the question encoder that matches the index, or rebuild the index with this encoder."
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise RagInputError("queries contain NaN or infinite values; check the question encoder output.")
        return arr

    def _exact_scores(self, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Scores of `queries` [B, d] against `vectors` [..., d] broadcast per query ([B, K, d] or [N, d])."""
        if vectors.ndim == 2:
            ip = queries @ vectors.T
            if self._metric == "ip":
                return ip
            return -(np.sum(queries**2, axis=1)[:, None] - 2 * ip + np.sum(vectors**2, axis=1)[None, :])
        ip = np.einsum("bd,bkd->bk", queries, vectors)
        if self._metric == "ip":
            return ip
        return -(np.sum(queries**2, axis=1)[:, None] - 2 * ip + np.sum(vectors**2, axis=2))

    def _search_params(self, k: int) -> faiss.SearchParameters | None:
        if self._kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self._kind_params["ef_search"], k)
        elif self._kind in IVF_KINDS:
            params = faiss.SearchParametersIVF()
            params.nprobe = self._kind_params["nprobe"]
        else:
            params = faiss.SearchParameters() if len(self._deleted) else None
        if len(self._deleted) and params is not None:
            self._selector_keep = faiss.IDSelectorBatch(self._deleted)  # keep a reference alive
            self._selector = faiss.IDSelectorNot(self._selector_keep)
            params.sel = self._selector
        return params

    def _exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = np.full((len(queries), len(self._row_ids)), -np.inf, dtype=np.float32)
        for start in range(0, len(self._row_ids), _ADD_BATCH):
            block = self.get_embeddings(self._row_ids[start : start + _ADD_BATCH])
            s[:, start : start + len(block)] = self._exact_scores(queries, block)
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for b in range(len(queries)):
            top = np.argpartition(-s[b], k - 1)[:k] if k < s.shape[1] else np.arange(s.shape[1])
            top = top[np.argsort(-s[b, top], kind="stable")]
            scores[b], ids[b] = s[b, top], self._row_ids[top]
        return scores, ids

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` passages for each query vector.

        Returns `(scores float32 [B, k'], row_ids int64 [B, k'])` with ``k' = min(k, count)``,
        best first; every returned id is a live row (rows FAISS leaves short are completed by an
        exact search). Scores: inner product (``ip``) or negative squared L2 distance (``l2``).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RagInputError(f"k must be a positive integer, got {k!r}.")
        q = self._check_queries(queries)
        n = self.count
        kk = min(int(k), n)
        if kk == 0 or len(q) == 0:
            return np.zeros((len(q), kk), dtype=np.float32), np.zeros((len(q), kk), dtype=np.int64)
        refine = self._kind == "ivf_pq" and self._exact is not None
        fetch = min(n, kk * self._kind_params["refine_factor"]) if refine else kk
        distances, labels = self._faiss.search(q, fetch, params=self._search_params(fetch))
        if refine:
            valid = labels >= 0
            safe = np.where(valid, labels, self._row_ids[0])
            exact = self._exact_scores(q, self.get_embeddings(safe)).astype(np.float32)
            exact[~valid] = -np.inf
            order = np.argsort(-exact, axis=1, kind="stable")[:, :kk]
            scores = np.take_along_axis(exact, order, axis=1)
            ids = np.take_along_axis(labels, order, axis=1)
            ids[~np.isfinite(scores)] = -1
        else:
            scores = distances[:, :kk] if self._metric == "ip" else -distances[:, :kk]
            ids = labels[:, :kk]
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        short = np.nonzero((ids < 0).any(axis=1))[0]
        if len(short):
            s2, i2 = self._exact_search(q[short], kk)
            scores[short], ids[short] = s2, i2
        return scores, ids

    # ------------------------------------------------------------------ add / remove
    def _ensure_writable(self) -> None:
        if self._mmapped:
            # a memory-mapped FAISS index must not grow in place: take an in-memory copy first
            if self._kind in IVF_KINDS:
                _copy_invlists_to_memory(self._faiss)
            if self._exact is not None:
                self._exact = np.array(self._exact, dtype=np.float16)
            self._mmapped = False

    def add(self, embeddings: Any, passages: list[dict[str, Any]]) -> np.ndarray:
        """Adds passages with their vectors without rebuilding; returns their new row ids (int64)."""
        emb = _as_matrix(embeddings, "embeddings")
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
        ids = np.unique(_as_row_ids(list(row_ids) if not isinstance(row_ids, np.ndarray) else row_ids).reshape(-1))
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

    # ------------------------------------------------------------------ save
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
            _write_config(tmp, self.config)

        write_folder_atomically(folder, write)

    # ------------------------------------------------------------------ load
    @staticmethod
    def read_config(folder: str | os.PathLike) -> dict[str, Any]:
        """Reads and validates ``index_config.json`` of an index folder (no other file is read)."""
        folder = Path(folder)
        if not folder.is_dir() and folder.parent.is_dir():
            # a save killed between its two renames leaves the previous index as a hidden backup
            backups = sorted(folder.parent.glob(f".{folder.name}.old-*"))
            if len(backups) == 1 and (backups[0] / INDEX_CONFIG_NAME).is_file():
                logger.warning("Restoring the index at %s from %s (a save was interrupted).", folder, backups[0])
                os.rename(backups[0], folder)
        if not folder.is_dir():
            raise IndexIntegrityError(f"No index folder at {folder}.")
        path = folder / INDEX_CONFIG_NAME
        if not path.is_file():
            raise IndexIntegrityError(
                f"{INDEX_CONFIG_NAME} is missing from {folder}; it is not an index folder or the save did not finish. "
                "Rebuild the index with scripts/build_index.py."
            )
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexIntegrityError(
                f"{INDEX_CONFIG_NAME} in {folder} is not valid JSON ({exc}); rebuild the index."
            ) from exc
        _validate_config(cfg, folder)
        return cfg

    @staticmethod
    def verify_files(folder: str | os.PathLike, *, verify: bool | None = None) -> bool:
        """Checks that every file listed in ``index_config.json`` exists with its size and sha256.

        `verify=None` hashes the files unless this folder passed a full check here and no file has
        changed since (`index_verification`); True always hashes them; False checks sizes only.
        Returns whether the files were hashed. Raises `IndexIntegrityError` naming the bad file.
        """
        folder = Path(folder)
        cfg = PassageIndex.read_config(folder)
        return _verify_files(folder, cfg, verify)

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
        folder = Path(folder)
        if verify_checksums is False and verify is None:
            verify = False
        cfg = cls.read_config(folder)
        if expected_dim is not None and int(expected_dim) != cfg["dim"]:
            raise IndexMismatchError(
                f"The index at {folder} holds vectors of dimension {cfg['dim']} but the encoder produces dimension "
                f"{expected_dim}; rebuild the index with this encoder (scripts/build_index.py) or use the encoder it "
                f"was built with ({cfg.get('encoder_name') or 'unknown'})."
            )
        fp = cfg.get("encoder_fingerprint")
        if expected_fingerprint is not None:
            if fp is None:
                logger.warning(
                    "The index at %s records no encoder fingerprint; cannot check it matches the encoder.", folder
                )
            elif fp != expected_fingerprint:
                raise IndexMismatchError(
                    f"The index at {folder} was built with a different encoder (fingerprint {fp[:12]}…, "
                    f"name {cfg.get('encoder_name')!r}) than the one given (fingerprint {expected_fingerprint[:12]}…); "
                    "rebuild the index with this encoder (scripts/build_index.py), or load the encoder it was built with."
                )
        hashed = _verify_files(folder, cfg, verify)
        legacy = cfg["format_version"] < 2
        if legacy:
            logger.warning(
                "The index at %s is in the old format %d (passages.jsonl + embeddings.npy): it is parsed whole into "
                "memory at every load. Convert it once with `%s`.",
                folder,
                cfg["format_version"],
                CONVERT_COMMAND.format(folder=folder),
            )
        index, mmap_index = _read_faiss(folder, cfg["kind"], mmap and not legacy)
        if index.d != cfg["dim"]:
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} in {folder} has dimension {index.d}, config says {cfg['dim']}."
            )
        deleted = np.asarray(cfg.get("deleted_row_ids", []), dtype=np.int64)
        if index.ntotal - len(deleted) != cfg["count"]:
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} in {folder} holds {index.ntotal - len(deleted)} live vectors but the config says "
                f"{cfg['count']}; rebuild the index."
            )
        store_name = LEGACY_PASSAGES_NAME if legacy else PASSAGES_NAME
        if legacy:
            passages = _read_passages(folder / LEGACY_PASSAGES_NAME)
            if len(passages) != cfg["count"]:
                raise _count_error(store_name, folder, len(passages), cfg["count"])
            table = passages_to_table(
                [clean_passage(p, i) for i, p in enumerate(passages)], [p["row_id"] for p in passages]
            )
        else:
            table = open_passage_store(folder / PASSAGES_NAME, full_check=hashed)
            if table.num_rows != cfg["count"]:
                raise _count_error(store_name, folder, table.num_rows, cfg["count"])
        row_ids = row_ids_of(table)
        if len(row_ids) > 1 and not np.all(np.diff(row_ids) > 0):
            raise IndexIntegrityError(
                f"{store_name} in {folder} has row ids out of order or repeated; rebuild the index."
            )
        # the row ids FAISS holds against the store's: checked when the files were hashed (or not checked
        # at all); a folder trusted by its stamps is byte for byte one that passed (0.3 s per 1M rows saved)
        trusted = not hashed and verify is not False
        id_map = None if trusted else _stored_ids(index, cfg["kind"])
        if not trusted and id_map is None:
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} in {folder} is not a {cfg['kind']} index with row ids; rebuild it."
            )
        live = id_map if trusted or not len(deleted) else np.setdiff1d(id_map, deleted, assume_unique=True)
        if not trusted and not np.array_equal(live, row_ids):
            raise IndexIntegrityError(
                f"{FAISS_INDEX_NAME} and {store_name} in {folder} hold different row ids; rebuild."
            )
        if len(row_ids) and row_ids[-1] >= cfg["next_row_id"]:
            raise IndexIntegrityError(f"{INDEX_CONFIG_NAME} in {folder} has next_row_id below an existing row id.")
        if _needs_direct_map(index):
            # format 1 IVF indexes have none; building it reads only the ids of the inverted lists
            faiss.downcast_index(index).set_direct_map_type(faiss.DirectMap.Hashtable)

        exact = None
        if legacy:
            vectors = _load_npy(folder, EMBEDDINGS_NAME, np.float32, (cfg["count"], cfg["dim"]), mmap)
            if cfg["kind"] == "ivf_pq":
                exact = vectors.astype(np.float16)
            del vectors
        elif cfg.get("exact_vectors") == "float16":
            exact = _load_npy(folder, EXACT_VECTORS_NAME, np.float16, (cfg["count"], cfg["dim"]), mmap)
        if hashed:
            remember_verified(folder, list(cfg["files"]))
        return cls(
            index,
            table,
            row_ids=row_ids,
            exact_vectors=exact,
            metric=cfg["metric"],
            kind=cfg["kind"],
            kind_params=cfg["kind_params"],
            next_row_id=cfg["next_row_id"],
            normalized=cfg["normalized"],
            encoder_name=cfg.get("encoder_name"),
            encoder_fingerprint=fp,
            chunking=cfg.get("chunking"),
            deleted_row_ids=deleted,
            extra_config={k: v for k, v in cfg.items() if k not in _KNOWN_CONFIG_KEYS},
            mmapped=mmap_index or (mmap and exact is not None and not legacy),
        )


_KNOWN_CONFIG_KEYS = {
    "format_version",
    "dim",
    "metric",
    "kind",
    "kind_params",
    "count",
    "normalized",
    "encoder_name",
    "encoder_fingerprint",
    "chunking",
    "next_row_id",
    "deleted_row_ids",
    "exact_vectors",
    "faiss_version",
    "files",
}


def _config_dict(
    *,
    dim: int,
    metric: str,
    kind: str,
    kind_params: dict[str, int],
    count: int,
    normalized: bool,
    encoder_name: str | None,
    encoder_fingerprint: str | None,
    chunking: dict | None,
    next_row_id: int,
    deleted: Iterable[int],
    exact_vectors: str | None,
) -> dict[str, Any]:
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "dim": int(dim),
        "metric": metric,
        "kind": kind,
        "kind_params": dict(kind_params),
        "count": int(count),
        "normalized": bool(normalized),
        "encoder_name": encoder_name,
        "encoder_fingerprint": encoder_fingerprint,
        "chunking": chunking,
        "next_row_id": int(next_row_id),
        "deleted_row_ids": [int(i) for i in deleted],
        "exact_vectors": exact_vectors,
        "faiss_version": faiss.__version__,
    }


def _write_config(tmp: Path, cfg: dict[str, Any]) -> None:
    """Writes ``index_config.json`` with the sha256 and size of every other file in `tmp`."""
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name != INDEX_CONFIG_NAME:
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    cfg = dict(cfg)
    cfg["files"] = files
    with open(tmp / INDEX_CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _copy_invlists_to_memory(index: faiss.Index) -> None:
    """Replaces the memory-mapped inverted lists of an IVF index by an in-memory copy (so it can grow)."""
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for list_no in range(ivf.nlist):
        size = ivf.invlists.list_size(list_no)
        if size:
            lists.add_entries(list_no, size, ivf.invlists.get_ids(list_no), ivf.invlists.get_codes(list_no))
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def _train_and_flush(index: faiss.Index, pending: list[tuple[np.ndarray, np.ndarray]], n_train: int) -> None:
    """Trains `index` on the first `n_train` pending vectors, then adds every pending batch."""
    vectors = np.concatenate([e for e, _ in pending])
    index.train(vectors[:n_train] if n_train else vectors)
    for emb, ids in pending:
        index.add_with_ids(emb, ids)
    pending.clear()


def _verify_files(folder: Path, cfg: dict[str, Any], verify: bool | None) -> bool:
    files = cfg["files"]
    for rel, meta in files.items():
        path = _safe_relpath(folder, rel)
        if not path.is_file():
            raise IndexIntegrityError(
                f"{rel} is missing from the index folder {folder}; rebuild or re-download the index."
            )
        size = path.stat().st_size
        if size != meta["size"]:
            raise IndexIntegrityError(
                f"{rel} in {folder} has {size} bytes but {meta['size']} were saved (truncated or modified); "
                "rebuild or re-download the index."
            )
    if verify is False or (verify is None and is_trusted(folder, list(files))):
        return False
    for rel, meta in files.items():
        if sha256_file(_safe_relpath(folder, rel)) != meta["sha256"]:
            raise IndexIntegrityError(
                f"{rel} in {folder} fails its sha256 checksum (corrupted or modified); rebuild or re-download the index."
            )
    return True


def _read_faiss(folder: Path, kind: str, mmap: bool) -> tuple[faiss.Index, bool]:
    """Reads ``index.faiss``; maps it when `mmap` and the kind is IVF (FAISS maps only inverted lists)."""
    path = str(folder / FAISS_INDEX_NAME)
    use_mmap = mmap and kind in IVF_KINDS
    try:
        if use_mmap:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
        return faiss.read_index(path), False
    except RuntimeError as exc:
        raise IndexIntegrityError(f"{FAISS_INDEX_NAME} in {folder} cannot be read by FAISS: {exc}") from exc


def _load_npy(folder: Path, name: str, dtype: Any, shape: tuple[int, int], mmap: bool) -> np.ndarray:
    try:
        arr = np.load(folder / name, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexIntegrityError(f"{name} in {folder} cannot be read: {exc}") from exc
    if arr.dtype != dtype or arr.shape != shape:
        raise IndexIntegrityError(
            f"{name} in {folder} has shape {arr.shape} / dtype {arr.dtype}, expected {shape} {np.dtype(dtype)}; "
            "rebuild the index."
        )
    return arr


def _count_error(name: str, folder: Path, found: int, count: int) -> IndexIntegrityError:
    return IndexIntegrityError(
        f"{name} in {folder} holds {found} passages but the index holds {count} vectors; "
        "the folder is inconsistent, rebuild the index."
    )


def _stored_ids(index: faiss.Index, kind: str) -> np.ndarray | None:
    """The row ids a FAISS index holds, sorted; None if it is not the expected structure."""
    index = faiss.downcast_index(index)
    if kind in ("ivf_flat", "ivf_pq"):
        if not isinstance(index, faiss.IndexIVF):
            return None
        invlists = index.invlists
        parts = []
        for list_no in range(index.nlist):
            size = invlists.list_size(list_no)
            if size:
                ids_ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ids_ptr, size).copy())
                invlists.release_ids(list_no, ids_ptr)
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    return np.sort(faiss.vector_to_array(index.id_map))


def _read_passages(path: Path) -> list[dict[str, Any]]:
    passages = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    p = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IndexIntegrityError(
                        f"{path.name} line {line_no} is not valid JSON ({exc}); rebuild the index."
                    ) from exc
                if not isinstance(p, dict) or isinstance(p.get("row_id"), bool) or not isinstance(p.get("row_id"), int):
                    raise IndexIntegrityError(f"{path.name} line {line_no} has no integer row_id; rebuild the index.")
                for field in PASSAGE_FIELDS:
                    if field not in p:
                        raise IndexIntegrityError(
                            f"{path.name} line {line_no} lacks the field {field!r}; rebuild the index."
                        )
                passages.append(p)
    except UnicodeDecodeError as exc:
        raise IndexIntegrityError(f"{path.name} is not valid UTF-8 ({exc}); rebuild the index.") from exc
    return passages


def _validate_config(cfg: Any, folder: Path) -> None:
    def bad(msg: str) -> IndexIntegrityError:
        return IndexIntegrityError(
            f"{INDEX_CONFIG_NAME} in {folder}: {msg}. Rebuild the index with scripts/build_index.py."
        )

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(cfg, dict):
        raise bad("the top level must be a JSON object")
    version = cfg.get("format_version")
    if not is_int(version):
        raise bad("format_version is missing or not an integer")
    if version > INDEX_FORMAT_VERSION:
        raise IndexIntegrityError(
            f"The index at {folder} has format version {version}, newer than this modeling_rag supports "
            f"({INDEX_FORMAT_VERSION}); upgrade modeling_rag."
        )
    for key in ("dim", "count", "next_row_id"):
        if not is_int(cfg.get(key)) or cfg[key] < (1 if key == "dim" else 0):
            raise bad(f"{key} must be a {'positive' if key == 'dim' else 'non-negative'} integer, got {cfg.get(key)!r}")
    if cfg.get("metric") not in METRICS:
        raise bad(f"metric must be one of {METRICS}, got {cfg.get('metric')!r}")
    if cfg.get("kind") not in KINDS:
        raise bad(f"kind must be one of {KINDS}, got {cfg.get('kind')!r}")
    params = cfg.get("kind_params")
    if not isinstance(params, dict) or set(params) != set(KIND_PARAM_NAMES[cfg["kind"]]):
        raise bad(f"kind_params must hold exactly {list(KIND_PARAM_NAMES[cfg['kind']])}")
    if not all(is_int(v) and v > 0 for v in params.values()):
        raise bad("kind_params values must be positive integers")
    if not isinstance(cfg.get("normalized"), bool):
        raise bad("normalized must be true or false")
    for key in ("encoder_name", "encoder_fingerprint"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise bad(f"{key} must be a string or null")
    if cfg.get("chunking") is not None and not isinstance(cfg["chunking"], dict):
        raise bad("chunking must be an object or null")
    deleted = cfg.get("deleted_row_ids", [])
    if not isinstance(deleted, list) or not all(is_int(v) and v >= 0 for v in deleted):
        raise bad("deleted_row_ids must be a list of non-negative integers")
    files = cfg.get("files")
    if not isinstance(files, dict):
        raise bad("files must be an object mapping file names to sha256 and size")
    if version >= 2:
        if cfg.get("exact_vectors") not in (None, *EXACT_VECTOR_DTYPES):
            raise bad(f"exact_vectors must be null or one of {EXACT_VECTOR_DTYPES}")
        required = [FAISS_INDEX_NAME, PASSAGES_NAME] + ([EXACT_VECTORS_NAME] if cfg.get("exact_vectors") else [])
    else:
        required = [FAISS_INDEX_NAME, LEGACY_PASSAGES_NAME, EMBEDDINGS_NAME]
    for name in required:
        if name not in files:
            raise bad(f"files does not list {name}")
    for rel, meta in files.items():
        _safe_relpath(folder, rel)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("sha256"), str)
            or len(meta["sha256"]) != 64
            or not is_int(meta.get("size"))
            or meta["size"] < 0
        ):
            raise bad(f"the entry for {rel!r} in files must hold a sha256 hex digest and a size")

"""The index kinds: their parameters, how ``"auto"`` picks one, and how each FAISS structure is made.

Kinds (`kind=`):

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

import logging
import math
from typing import Any

import faiss
import numpy as np

from ..errors import RagConfigError
from ..utils.similarity import METRICS

logger = logging.getLogger(__name__)

__all__ = [
    "IVF_KINDS",
    "KINDS",
    "KIND_PARAM_NAMES",
    "METRICS",
    "SEARCH_PARAM_NAMES",
    "default_kind_params",
    "resolve_kind",
]

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
IVF_KINDS = ("ivf_flat", "ivf_pq")

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
# re-score refine_factor * k PQ candidates exactly. The codes rank worse as the corpus grows (more close
# neighbours per code), so the depth is set for millions: recall@10 at 32 / 64 / 128 / 256 was 0.82 / 0.93 /
# 0.985 / 0.998 at 5M (1M at 32: 0.968; 300k at 32: 1.00); 128 costs ~25% of a batch's search time over 32
# (docs/benchmarks.md, "Corpora of millions of passages").
DEFAULT_PQ_REFINE_FACTOR = 128
KIND_PARAM_NAMES = {
    "flat": (),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf_flat": ("nlist", "nprobe"),
    "ivf_pq": ("nlist", "nprobe", "m", "nbits", "refine_factor"),
}
SEARCH_PARAM_NAMES = ("ef_search", "nprobe", "refine_factor")

# vectors handed to FAISS (or scored exactly) per call
ADD_BATCH = 65_536


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


def check_search_param(kind: str, name: str, value: Any) -> int:
    """`value` as the search-time parameter `name` of `kind`, or a `RagConfigError` saying what is wrong."""
    if name not in SEARCH_PARAM_NAMES or name not in KIND_PARAM_NAMES[kind]:
        raise RagConfigError(f"{name!r} is not a search parameter of kind={kind!r}.")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RagConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def train_size(kind: str, n: int, params: dict[str, int]) -> int:
    """How many of `n` vectors an IVF kind trains on."""
    # enough for the coarse quantiser (40 per list) and the PQ codebooks (64 per centroid)
    pq_points = 64 * (1 << params["nbits"]) if kind == "ivf_pq" else 0
    return min(n, max(40 * params["nlist"], pq_points))


def _make_base_index(kind: str, dim: int, metric: str, params: dict[str, int]) -> faiss.Index:
    fm = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
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


def make_faiss_index(kind: str, dim: int, metric: str, params: dict[str, int]) -> faiss.Index:
    """An empty FAISS index of `kind` that takes arbitrary int64 row ids (`add_with_ids`) and reconstructs by them."""
    base = _make_base_index(kind, dim, metric, params)
    # IVF indexes store arbitrary int64 ids themselves (and IndexIDMap would mis-number them after
    # remove_ids); a hash-table direct map lets them reconstruct a vector by row id. Flat and HNSW are
    # wrapped in an IndexIDMap2 (which reconstructs by id).
    if kind in IVF_KINDS:
        base.set_direct_map_type(faiss.DirectMap.Hashtable)
        return base
    return faiss.IndexIDMap2(base)


def needs_direct_map(index: faiss.Index) -> bool:
    """Whether `index` is IVF without the hash-table direct map that reconstructing by row id needs."""
    ivf = faiss.downcast_index(index)
    return isinstance(ivf, faiss.IndexIVF) and ivf.direct_map.type != faiss.DirectMap.Hashtable


def stored_ids(index: faiss.Index, kind: str) -> np.ndarray | None:
    """The row ids a FAISS index holds, sorted; None if it is not the expected structure."""
    index = faiss.downcast_index(index)
    if kind in IVF_KINDS:
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


def copy_invlists_to_memory(index: faiss.Index) -> None:
    """Replaces the memory-mapped inverted lists of an IVF index by an in-memory copy (so it can grow)."""
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for list_no in range(ivf.nlist):
        size = ivf.invlists.list_size(list_no)
        if size:
            lists.add_entries(list_no, size, ivf.invlists.get_ids(list_no), ivf.invlists.get_codes(list_no))
    ivf.replace_invlists(lists, True)
    lists.this.disown()

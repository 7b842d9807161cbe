"""The knowledge index: a FAISS index over passage vectors (`PassageIndex`), a BM25 keyword index over the
same row ids (`BM25Index`), and the memory-mapped passage store both read passages from.

Modules, one concept each:

    passage_index.py   `PassageIndex`: search, lookups by row id, add / remove, save / load
    kinds.py           the index kinds (flat, hnsw, ivf_flat, ivf_pq, "auto"), their parameters, FAISS factory
    build.py           building in memory or batch by batch into a folder
    search.py          search parameters, exact re-scoring and the exact fallback
    config.py          ``index_config.json``: contents, writing, validation
    folder.py          atomic folder writes and the size / sha256 checks of the listed files
    loading.py         opening a saved folder (format 2, and format 1 with a warning)
    verification.py    hashing a folder once, then trusting it while its files' stamps are unchanged
    passage_store.py   the Arrow IPC passage store
    arrays.py          caller input to float32 / int64 arrays, with clear errors
    bm25.py            `BM25Index`

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
(`verification.py`); ``verify=True`` forces it. ``mmap=True`` maps ``index.faiss`` for the IVF
kinds; the passage store is always mapped, so a load reads only headers.
"""

from importlib import import_module

# imported on first use, so that the dense index does not load bm25s and the BM25 index does not load faiss
_LAZY = {
    "PassageIndex": "passage_index",
    "BM25Index": "bm25",
    "ShardedPassageIndex": "sharded",
    "KINDS": "kinds",
    "METRICS": "kinds",
    "default_kind_params": "kinds",
    "resolve_kind": "kinds",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'modeling_rag.index' has no attribute {name!r}")

"""Compatibility module: the dense index moved to the `modeling_rag.index` package (see its docstring).

``from modeling_rag.index_faiss import PassageIndex`` keeps working; new code imports from
`modeling_rag.index` (or its modules) instead.
"""

from .index.config import EXACT_VECTOR_DTYPES as EXACT_VECTOR_DTYPES  # noqa: F401
from .index.folder import write_folder_atomically as write_folder_atomically  # noqa: F401
from .index.kinds import (  # noqa: F401
    AUTO_FLAT_MAX_PASSAGES,
    AUTO_LARGE_KIND,
    DEFAULT_HNSW_PARAMS,
    DEFAULT_IVF_NPROBE,
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_PQ_REFINE_FACTOR,
    IVF_KINDS,
    KIND_PARAM_NAMES,
    KINDS,
    METRICS,
    SEARCH_PARAM_NAMES,
    default_kind_params,
    resolve_kind,
)
from .index.loading import CONVERT_COMMAND as CONVERT_COMMAND  # noqa: F401
from .index.passage_index import PassageIndex
from .utils.hashing import sha256_file

__all__ = ["KINDS", "METRICS", "PassageIndex", "default_kind_params", "resolve_kind", "sha256_file"]

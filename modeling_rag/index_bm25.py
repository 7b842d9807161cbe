"""Compatibility module: the BM25 index moved to `modeling_rag.index.bm25`."""

from .index.bm25 import BM25_CONFIG_NAME, BM25_FORMAT_VERSION, BM25_ROW_IDS_NAME, DEFAULT_STOPWORDS, BM25Index  # noqa: F401

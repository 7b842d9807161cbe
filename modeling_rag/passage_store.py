"""Compatibility module: the passage store moved to `modeling_rag.index.passage_store`."""

from .index.passage_store import (  # noqa: F401  (re-exported)
    PASSAGE_FIELDS,
    PASSAGE_SCHEMA,
    PassageStoreWriter,
    clean_passage,
    iter_table_batches,
    open_passage_store,
    passages_to_table,
    row_ids_of,
    table_rows,
    write_passage_store,
)

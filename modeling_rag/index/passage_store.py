"""The passage store of an index folder: one Arrow IPC file, memory-mapped, read by row position.

Passages are kept column by column (``row_id``, ``id``, ``title``, ``text``, ``source``, ``position``
and ``metadata``: any other keys of a passage, as one JSON object per row, or null) in an Arrow IPC
*file* (``passages.arrow``). Opening it maps the file and reads only the footer and the schema; a
passage is read by taking its row, so resident memory does not grow with the number of passages and
fetching one passage touches only the pages of its row. Nothing is pickled: Arrow buffers and JSON.

`PassageStoreWriter` writes the file in record batches, so building over a corpus larger than memory
holds one batch of texts at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import IndexIntegrityError, RagInputError

__all__ = ["PASSAGE_FIELDS", "PASSAGE_SCHEMA", "PassageStoreWriter", "clean_passage", "open_passage_store"]

PASSAGE_FIELDS = ("id", "title", "text", "source", "position")
PASSAGE_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("metadata", pa.string(), nullable=True),
    ]
)
# Rows per record batch: ~40 MB of text at 600 characters a passage.
STORE_BATCH_ROWS = 65_536


def clean_passage(p: Any, i: int) -> dict[str, Any]:
    """`p` with the passage fields in their stored types (``row_id`` dropped); extra keys kept as metadata."""
    if not isinstance(p, dict):
        raise RagInputError(
            f"passage {i} must be a dict with id, title, text, source, position; got {type(p).__name__}."
        )
    if "text" not in p or not isinstance(p["text"], str):
        raise RagInputError(f"passage {i} has no 'text' string.")
    out = {k: v for k, v in p.items() if k != "row_id"}
    out["id"] = str(p.get("id", i))
    out["title"] = "" if p.get("title") is None else str(p.get("title"))
    out["source"] = "" if p.get("source") is None else str(p.get("source"))
    try:
        out["position"] = int(p.get("position", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise RagInputError(f"passage {i} has a position that is not an integer: {p.get('position')!r}.") from exc
    return out


def passages_to_table(passages: Sequence[dict[str, Any]], row_ids: Sequence[int] | np.ndarray) -> pa.Table:
    """An Arrow table of cleaned `passages` (see `clean_passage`) with their `row_ids`."""
    columns: dict[str, list] = {name: [] for name in PASSAGE_SCHEMA.names}
    for p in passages:
        for name in PASSAGE_FIELDS:
            columns[name].append(p[name])
        extra = {k: v for k, v in p.items() if k not in PASSAGE_FIELDS and k != "row_id"}
        try:
            columns["metadata"].append(json.dumps(extra, ensure_ascii=False) if extra else None)
        except (TypeError, ValueError) as exc:
            raise RagInputError(
                f"passage metadata must be JSON-serialisable ({exc}); got keys {sorted(extra)}."
            ) from exc
    columns["row_id"] = np.asarray(row_ids, dtype=np.int64)
    return pa.table(columns, schema=PASSAGE_SCHEMA)


def table_rows(table: pa.Table, positions: np.ndarray) -> list[dict[str, Any]]:
    """The passages at `positions` of `table` as dicts (metadata merged back in).

    Rows are taken batch by batch: `Table.take` over a table of several record batches concatenates
    whole columns first, which would read (and copy) every passage's text.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(positions) == 0:
        return []
    batches = table.to_batches()
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    which = np.searchsorted(starts, positions, side="right") - 1
    local = positions - starts[which]
    out: list[Any] = [None] * len(positions)
    for b in np.unique(which).tolist():
        slots = np.nonzero(which == b)[0]
        rows = batches[b].take(pa.array(local[slots])).to_pylist()
        for slot, row in zip(slots.tolist(), rows):
            meta = row.pop("metadata")
            if meta is not None:
                row.update(json.loads(meta))
            out[slot] = row
    return out


def row_ids_of(table: pa.Table) -> np.ndarray:
    """The ``row_id`` column as one int64 numpy array (a copy: 8 bytes a passage)."""
    column = table.column("row_id")
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int64)
    # straight from the Arrow buffers (the column has no nulls): to_numpy would import pandas (~1.5 s)
    parts = [
        np.frombuffer(chunk.buffers()[1], dtype=np.int64, count=len(chunk), offset=chunk.offset * 8)
        for chunk in column.chunks
    ]
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class PassageStoreWriter:
    """Writes ``passages.arrow`` batch by batch; `close` finishes the file (its footer)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, PASSAGE_SCHEMA)
        self.count = 0

    def write_table(self, table: pa.Table) -> None:
        """Appends `table` (with `PASSAGE_SCHEMA`) in batches of `STORE_BATCH_ROWS`."""
        for batch in table.to_batches(max_chunksize=STORE_BATCH_ROWS):
            self._writer.write_batch(batch)
            self.count += batch.num_rows

    def write(self, passages: Sequence[dict[str, Any]], row_ids: Sequence[int] | np.ndarray) -> None:
        """Appends cleaned `passages` with their `row_ids`."""
        self.write_table(passages_to_table(passages, row_ids))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> PassageStoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_passage_store(path: str | os.PathLike, tables: Iterable[pa.Table]) -> int:
    """Writes the rows of `tables` to an Arrow IPC file at `path`; returns the row count."""
    with PassageStoreWriter(path) as writer:
        for table in tables:
            writer.write_table(table)
    return writer.count


def open_passage_store(path: str | os.PathLike, *, full_check: bool = False) -> pa.Table:
    """Memory-maps ``passages.arrow`` and returns its table (zero-copy: nothing is read but the footer).

    `full_check` also validates every buffer (offsets within bounds, valid UTF-8), which reads the whole
    file; it is done when the folder is fully verified.
    """
    path = Path(path)
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        if not table.schema.equals(PASSAGE_SCHEMA):
            raise IndexIntegrityError(
                f"{path.name} has columns {table.schema.names} with types {[str(t) for t in table.schema.types]}; "
                f"expected {PASSAGE_SCHEMA.names}. Rebuild the index."
            )
        table.validate()
        if full_check:
            # on a map of its own, closed after: the pages the check reads leave this process's resident memory
            with pa.memory_map(str(path), "r") as whole:
                pa.ipc.open_file(whole).read_all().validate(full=True)
    except IndexIntegrityError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexIntegrityError(
            f"{path.name} is not a readable Arrow passage store ({exc}); rebuild the index."
        ) from exc
    return table


def iter_table_batches(table: pa.Table) -> Iterator[pa.Table]:
    """`table` in slices of `STORE_BATCH_ROWS` (zero-copy), without materialising it whole."""
    for start in range(0, table.num_rows, STORE_BATCH_ROWS):
        yield table.slice(start, STORE_BATCH_ROWS)

"""Reading a corpus into documents and cutting documents into passages.

Sources `read_corpus` understands:

* a folder of ``.txt`` / ``.md`` files (recursive, sorted; id = path relative to the folder without
  its extension, source = that path with it, title = first markdown heading or the file stem),
* a ``.jsonl`` file or a ``.csv`` file with the columns ``id``, ``text`` and optionally ``title``
  and ``source``,
* a `datasets.Dataset` with the same columns,
* a list of `Document` or of dicts with the same keys.

`chunk_documents` turns documents into passages of at most `max_tokens` tokens (counted with
the question encoder's tokenizer) overlapping by `overlap` tokens.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import CorpusError, RagConfigError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP = 40
# tokens kept free for the title, separators and special tokens when sizing to the encoder window
_WINDOW_RESERVE = 32
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


@dataclass
class Document:
    """One document of a corpus: a stable string `id`, a `title`, the `text` and where it came from."""

    id: str
    title: str
    text: str
    source: str


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(
            f"Cannot read the document {path}: {exc.strerror or exc}. Fix its permissions or remove it."
        ) from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"The document {path} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8 or remove it."
        ) from exc


def _title_from_markdown(text: str) -> str | None:
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            return match.group(1).strip()
    return None


def _read_folder(folder: Path) -> list[Document]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.is_dir()
    )
    docs = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        text = _read_text_file(path)
        title = _title_from_markdown(text) if path.suffix.lower() != ".txt" else None
        doc_id = path.relative_to(folder).with_suffix("").as_posix()  # "policies/travel", source keeps the name
        docs.append(Document(id=doc_id, title=title or path.stem, text=text.strip(), source=rel))
    return docs


def _rows_to_documents(
    rows: Iterable[dict[str, Any]], origin: str, columns: Sequence[str] | None = None
) -> list[Document]:
    if columns is not None:
        missing = [c for c in ("id", "text") if c not in columns]
        if missing:
            raise CorpusError(
                f"{origin} lacks the column(s) {missing}; it needs 'id' and 'text' (and optionally 'title', 'source')."
            )
    docs = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise CorpusError(f"{origin} row {n} is not an object with 'id' and 'text'.")
        missing = [c for c in ("id", "text") if row.get(c) is None]
        if missing:
            raise CorpusError(f"{origin} row {n} lacks {missing}; every row needs 'id' and 'text'.")
        if not isinstance(row["text"], str):
            raise CorpusError(f"{origin} row {n}: 'text' must be a string, got {type(row['text']).__name__}.")
        title = row.get("title")
        source = row.get("source")
        docs.append(
            Document(
                id=str(row["id"]),
                title="" if title is None else str(title),
                text=row["text"].strip(),
                source=origin if source is None else str(source),
            )
        )
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    text = _read_text_file(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path} line {n} is not valid JSON ({exc.msg}); fix or remove that line.") from exc
    return _rows_to_documents(rows, path.name)


def _read_csv(path: Path) -> list[Document]:
    text = _read_text_file(path)
    csv.field_size_limit(1 << 30)
    try:
        reader = csv.DictReader(text.splitlines())
        columns = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as exc:
        raise CorpusError(f"{path} is not a readable CSV file ({exc}).") from exc
    return _rows_to_documents(rows, path.name, columns)


def _is_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, datasets.Dataset)


def read_corpus(source: Any) -> list[Document]:
    """Reads a corpus (folder, ``.jsonl``, ``.csv``, `datasets.Dataset` or list) into documents.

    Documents with empty text are skipped (with a warning). Raises `CorpusError` when nothing
    is left, when a document cannot be read or decoded (naming it), when required columns are
    missing, or when two documents share an id.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            docs = _read_folder(path)
            origin = str(path)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                docs = _read_jsonl(path)
            elif suffix == ".csv":
                docs = _read_csv(path)
            elif suffix in TEXT_SUFFIXES:
                text = _read_text_file(path)
                title = _title_from_markdown(text) if suffix != ".txt" else None
                docs = [Document(id=path.stem, title=title or path.stem, text=text.strip(), source=path.name)]
            else:
                raise CorpusError(
                    f"Unsupported corpus file {path}: use a folder of .txt/.md files, a .jsonl or a .csv file."
                )
            origin = str(path)
        else:
            raise CorpusError(f"The corpus {path} does not exist.")
    elif _is_dataset(source):
        docs = _rows_to_documents(iter(source), "dataset", list(source.column_names))
        origin = "the dataset"
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = [vars(d) if isinstance(d, Document) else d for d in source]
        docs = _rows_to_documents(rows, "corpus list")
        origin = "the corpus list"
    else:
        raise CorpusError(
            f"Cannot read a corpus from {type(source).__name__}; pass a folder, a .jsonl/.csv path, "
            "a datasets.Dataset or a list of documents."
        )
    empty = [d.id for d in docs if not d.text]
    if empty:
        logger.warning("Skipping %d empty document(s) in %s: %s", len(empty), origin, empty[:5])
        docs = [d for d in docs if d.text]
    if not docs:
        raise CorpusError(f"The corpus {origin} holds no documents with text; add .txt/.md files or rows with 'text'.")
    _check_unique([d.id for d in docs], f"document ids in {origin}")
    return docs


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    dups = []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise CorpusError(f"Duplicate {what}: {sorted(set(dups))[:5]}; every id must be unique.")


# ----------------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------------
def default_chunk_size(tokenizer: Any) -> int:
    """`DEFAULT_MAX_TOKENS`, shrunk if the tokenizer's window is smaller (keeping room for the title)."""
    window = getattr(tokenizer, "model_max_length", None)
    if not isinstance(window, int) or window <= 0 or window > 1_000_000:
        return DEFAULT_MAX_TOKENS
    return max(8, min(DEFAULT_MAX_TOKENS, window - _WINDOW_RESERVE))


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character spans of the tokens of `text` (no special tokens)."""
    try:
        # a whole document, longer than the model reads: it is cut into chunks here, so no too-long notice
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets is not None:
        return [(int(a), int(b)) for a, b in offsets if b > a] or ([(0, len(text))] if text else [])
    # slow tokenizers: fall back to whitespace words, each counted with its token count
    spans = []
    for match in re.finditer(r"\S+", text):
        n = max(1, len(tokenizer.tokenize(match.group(0))))
        spans.extend([(match.start(), match.end())] * n)
    return spans


def chunk_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    max_tokens: int | None = None,
    overlap: int | None = None,
    *,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Cuts documents into passages of at most `max_tokens` tokens overlapping by `overlap` tokens.

    Defaults: `max_tokens` = `default_chunk_size(tokenizer)` (200, or less for a small window),
    `overlap` = `max_tokens // 5`. A document that fits stays one passage whose id is the
    document id; longer ones become ``f"{doc_id}#{n}"``. Each passage is a dict with ``id``,
    ``title``, ``text``, ``source`` and ``position`` (chunk index within the document).
    """
    max_tokens = default_chunk_size(tokenizer) if max_tokens is None else max_tokens
    overlap = max_tokens // 5 if overlap is None else overlap
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RagConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_tokens:
        raise RagConfigError(f"overlap must be an integer in [0, max_tokens={max_tokens}), got {overlap!r}.")
    if not documents:
        raise CorpusError("There are no documents to chunk; the corpus is empty.")
    passages = []
    stride = max_tokens - overlap
    for doc in tqdm(documents, desc="Chunking", unit="doc", disable=not show_progress):
        spans = _token_spans(doc.text, tokenizer)
        if len(spans) <= max_tokens:
            passages.append({"id": doc.id, "title": doc.title, "text": doc.text, "source": doc.source, "position": 0})
            continue
        n = 0
        for start in range(0, len(spans), stride):
            end = min(start + max_tokens, len(spans))
            text = doc.text[spans[start][0] : spans[end - 1][1]].strip()
            passages.append(
                {"id": f"{doc.id}#{n}", "title": doc.title, "text": text, "source": doc.source, "position": n}
            )
            n += 1
            if end == len(spans):
                break
    _check_unique([p["id"] for p in passages], "passage ids after chunking")
    return passages


def passage_text(passage: dict[str, Any]) -> str:
    """The text a passage is encoded / keyword-indexed as: its title, a newline, its text."""
    title = passage.get("title") or ""
    text = str(passage.get("text", ""))
    return f"{title}\n{text}" if title else text


def chunking_config(tokenizer: Any, max_tokens: int | None, overlap: int | None) -> dict[str, Any]:
    """The chunking settings as recorded in an index config."""
    max_tokens = default_chunk_size(tokenizer) if max_tokens is None else max_tokens
    overlap = max_tokens // 5 if overlap is None else overlap
    return {
        "max_tokens": max_tokens,
        "overlap": overlap,
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
    }

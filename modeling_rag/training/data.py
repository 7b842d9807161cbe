"""Training data: question files, the passages of an index, and the epoch order.

Question files are JSON lines with ``question``, ``answers``, optional ``positive_passage_ids``,
``positive_passages``, ``hard_negative_passage_ids``, or DPR's ``positive_ctxs`` /
``hard_negative_ctxs``; a folder written by ``datasets.Dataset.save_to_disk``; or a
``datasets.Dataset`` ([`load_training_examples`]). [`EpochSampler`]'s shuffle order is a function
of the seed and the epoch, so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from ..errors import DataFormatError
from ..qa_data import QAExample, check_passage_ids, load_qa_examples
from ..utils.chunk_ids import document_id, is_part_of

logger = logging.getLogger(__name__)


def load_training_examples(
    source: Any,
    *,
    require_answers: bool = True,
    known_passage_ids: Iterable[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """Reads training or validation questions.

    Args:
        source: A JSON-lines (or JSON array) file, a folder written by `datasets` ``save_to_disk`` (a
            `Dataset`, or a `DatasetDict` with `split`, default ``"train"``), a `datasets.Dataset`, or a list
            of dicts. Fields: see `modeling_rag.qa_data`.
        require_answers: Rows without answers are errors (``True``) or get ``answers=[]``.
        known_passage_ids: When given, every positive / hard-negative passage id must be one of these.
        split: The split to take from a `DatasetDict` folder.
        limit: Keep only the first `limit` questions.

    Raises:
        DataFormatError: empty source, a row without question (or answers), unknown passage ids, ...
    """
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        import datasets

        try:
            ds = datasets.load_from_disk(os.fspath(source))
        except (FileNotFoundError, ValueError) as e:
            raise DataFormatError(
                f"{source} is a folder but not one written by datasets' save_to_disk; give a .jsonl file instead."
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("train" if "train" in ds else None)
            if name is None or name not in ds:
                raise DataFormatError(f"{source} holds the splits {list(ds)}; name one with split=.")
            ds = ds[name]
        source = ds
    examples = load_qa_examples(source, require_answers=require_answers)
    if limit is not None:
        examples = examples[: max(int(limit), 0)]
    if not examples:
        raise DataFormatError(f"No questions left in {source} (limit={limit}).")
    if known_passage_ids is not None:
        check_passage_ids(examples, known_passage_ids)
    return examples


def passage_lookup(index) -> tuple[list[dict], dict[str, int]]:
    """All passages of `index` (in row order, each with ``row_id``) and a map from passage id to position.

    Ids of chunked documents (``doc#n``) are also reachable through the document id (first chunk),
    so questions can name documents.
    """
    passages = index.get_passages(index.row_ids)
    by_id: dict[str, int] = {}
    for pos, p in enumerate(passages):
        pid = str(p.get("id"))
        by_id[pid] = pos
    for pos, p in enumerate(passages):
        document = document_id(str(p.get("id")))
        if document is not None:
            by_id.setdefault(document, pos)
    return passages, by_id


def positions_of(pid: str, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the passage `pid`, or of every chunk of the document `pid`."""
    if pid in by_id and str(passages[by_id[pid]].get("id")) == pid:
        return [by_id[pid]]
    found = [i for i, p in enumerate(passages) if is_part_of(str(p.get("id")), pid)]
    if found:
        return found
    return [by_id[pid]] if pid in by_id else []


def passage_texts(passages: Sequence[dict]) -> list[str]:
    """The texts passages are encoded as (title + newline + text), as the index does."""
    from ..corpus import passage_text

    return [passage_text(p) for p in passages]


def gold_positions(example: QAExample, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the example's gold passages in `passages` (chunks of gold documents included)."""
    out: list[int] = []
    for pid in example.positive_passage_ids:
        out.extend(positions_of(pid, by_id, passages))
    return sorted(set(out))


def negative_positions(example: QAExample, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the example's hard-negative passages in `passages` (chunks of those documents included)."""
    out: list[int] = []
    for pid in example.hard_negative_passage_ids:
        out.extend(positions_of(pid, by_id, passages))
    return sorted(set(out))


class EpochSampler(Sampler[int]):
    """Indices `0..n-1`, shuffled with a permutation that depends only on `seed` and the epoch.

    Every process draws the same order, and a resumed run replays the same order for the epoch it
    resumes in. Call [`set_epoch`] before iterating.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _identity_collate(items):
    return list(items)

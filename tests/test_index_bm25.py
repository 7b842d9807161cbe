"""BM25Index: ranking, row ids, ties, save/load without pickle, bad input."""

import json

import numpy as np
import pytest

from modeling_rag.errors import IndexIntegrityError, RagInputError
from modeling_rag.index.bm25 import BM25_CONFIG_NAME, BM25Index

PASSAGES = [
    {"title": "Normans", "text": "The Normans gave their name to Normandy, a region in France."},
    {"title": "Policy", "text": "Employees may work remotely up to three days a week."},
    {"title": "Capitals", "text": "The capital of France is Paris. The capital of Italy is Rome."},
    {"title": "Expenses", "text": "Expenses must be submitted within thirty days."},
]


@pytest.fixture(scope="module")
def bm25():
    return BM25Index.build(PASSAGES, row_ids=[10, 11, 12, 13])


def test_ranking_and_row_ids(bm25):
    scores, ids = bm25.search(["What is the capital of Italy?", "remote work days"], 2)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (2, 2)
    assert ids[0, 0] == 12 and ids[1, 0] == 11
    assert scores[0, 0] > scores[0, 1]


def test_row_ids_from_passages_or_positions():
    with_ids = [dict(p, row_id=100 + i) for i, p in enumerate(PASSAGES)]
    assert BM25Index.build(with_ids).row_ids.tolist() == [100, 101, 102, 103]
    assert BM25Index.build(PASSAGES).row_ids.tolist() == [0, 1, 2, 3]


def test_k_larger_than_corpus_and_ties(bm25):
    scores, ids = bm25.search(["zebra", ""], 10)
    assert ids.shape == (2, 4)
    assert ids.tolist() == [[10, 11, 12, 13], [10, 11, 12, 13]]  # all scores 0: ordered by row id
    assert (scores == 0).all()


def test_save_load_no_pickle(tmp_path, bm25):
    bm25.save(tmp_path / "bm25")
    for path in (tmp_path / "bm25").iterdir():
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        else:
            json.loads(path.read_text())
    loaded = BM25Index.load(tmp_path / "bm25")
    q = ["capital of France", "expenses receipts"]
    for a, b in zip(bm25.search(q, 3), loaded.search(q, 3)):
        np.testing.assert_array_equal(a, b)
    mm = BM25Index.load(tmp_path / "bm25", mmap=True)
    np.testing.assert_array_equal(mm.search(q, 3)[1], bm25.search(q, 3)[1])


def test_load_errors(tmp_path, bm25):
    folder = tmp_path / "bm25"
    with pytest.raises(IndexIntegrityError, match=BM25_CONFIG_NAME):
        BM25Index.load(folder)
    bm25.save(folder)
    (folder / "row_ids.npy").unlink()
    with pytest.raises(IndexIntegrityError, match="cannot be read"):
        BM25Index.load(folder)


def test_bad_input(bm25):
    with pytest.raises(RagInputError, match="single string"):
        bm25.search("capital", 2)
    with pytest.raises(RagInputError, match="k must be"):
        bm25.search(["capital"], 0)
    with pytest.raises(RagInputError, match="zero passages"):
        BM25Index.build([])

"""Passage token ids stored with the index (modeling_rag/passage_tokens.py) and their use in packing."""

import json

import numpy as np
import pytest
from conftest import TINY_PASSAGES, build_tiny_tokenizer, make_tiny_rag

from modeling_rag.errors import IndexIntegrityError, RagInputError
from modeling_rag.passage_tokens import PassageTokens, tokenizer_fingerprint

QUESTIONS = ["Who was the Norse leader?", "What is the capital of Italy?"]


def _rows(passages, start=0):
    return [{**p, "row_id": start + i} for i, p in enumerate(passages)]


def _ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_build_and_lookup_give_what_the_tokenizer_gives():
    tok = build_tiny_tokenizer()
    rows = _rows(TINY_PASSAGES)
    store = PassageTokens.build(rows[::-1], tok, show_progress=False)  # any order in, row id order stored
    assert store.count == len(rows) and store.row_ids.tolist() == list(range(len(rows)))
    got = store.lookup([3, 0, 99, 2])
    assert got[0] == _ids(tok, rows[3]["text"]) and got[1] == _ids(tok, rows[0]["text"])
    assert got[2] is None  # a row the store does not hold
    assert got[3] == _ids(tok, rows[2]["text"])
    assert store.matches(tok)


def test_fingerprint_tells_tokenizers_apart():
    tok, other = build_tiny_tokenizer(), build_tiny_tokenizer(vocab_size=380)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(build_tiny_tokenizer())
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(other)
    with_added = build_tiny_tokenizer()
    with_added.add_tokens(["Normandy"])  # changes how a passage tokenises
    assert tokenizer_fingerprint(with_added) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(object()) is None
    padded = build_tiny_tokenizer()
    padded(["a b c", "a"], padding=True, truncation=True, max_length=2)  # leaves the backend padding/truncating
    state = padded.backend_tokenizer.padding, padded.backend_tokenizer.truncation
    assert state[0] is not None and state[1] is not None
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(tok)
    assert (padded.backend_tokenizer.padding, padded.backend_tokenizer.truncation) == state  # left as it was
    cached = build_tiny_tokenizer()
    tokenizer_fingerprint(cached)
    cached.add_tokens(["Normandy"])  # after the fingerprint was computed once
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(with_added)
    with pytest.raises(RagInputError, match="fast"):
        PassageTokens.build(_rows(TINY_PASSAGES), object(), show_progress=False)


def test_update_and_keep_follow_the_index_rows():
    tok = build_tiny_tokenizer()
    rows = _rows(TINY_PASSAGES)
    store = PassageTokens.build(rows[:3], tok, show_progress=False)
    assert store.update(rows, tok, show_progress=False) == len(rows) - 3
    assert store.update(rows, tok, show_progress=False) == 0
    assert store.lookup(range(len(rows))) == [_ids(tok, p["text"]) for p in rows]
    store.keep(np.array([1, 4]))
    assert store.row_ids.tolist() == [1, 4]
    assert store.lookup([1, 4, 0]) == [_ids(tok, rows[1]["text"]), _ids(tok, rows[4]["text"]), None]
    with pytest.raises(RagInputError, match="different tokenizer"):
        store.update(rows, build_tiny_tokenizer(vocab_size=380), show_progress=False)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_round_trip(tmp_path, mmap):
    tok = build_tiny_tokenizer()
    store = PassageTokens.build(_rows(TINY_PASSAGES), tok, show_progress=False)
    store.save(tmp_path / "tokens")
    loaded = PassageTokens.load(tmp_path / "tokens", mmap=mmap)
    assert loaded.fingerprint == store.fingerprint
    assert loaded.lookup(range(len(TINY_PASSAGES))) == store.lookup(range(len(TINY_PASSAGES)))


@pytest.mark.parametrize(
    "damage",
    ["missing_config", "bad_json", "object_array", "offsets_past_end", "unsorted_rows", "wrong_dtype"],
)
def test_a_damaged_store_is_a_clear_error(tmp_path, damage):
    tok = build_tiny_tokenizer()
    folder = tmp_path / "tokens"
    PassageTokens.build(_rows(TINY_PASSAGES), tok, show_progress=False).save(folder)
    if damage == "missing_config":
        (folder / "passage_tokens.json").unlink()
    elif damage == "bad_json":
        (folder / "passage_tokens.json").write_text("{not json")
    elif damage == "object_array":  # a pickled array must never be loaded
        np.save(folder / "ids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "offsets_past_end":
        offsets = np.load(folder / "offsets.npy")
        offsets[-1] += 5
        np.save(folder / "offsets.npy", offsets)
    elif damage == "unsorted_rows":
        np.save(folder / "row_ids.npy", np.load(folder / "row_ids.npy")[::-1].copy())
    else:
        np.save(folder / "ids.npy", np.load(folder / "ids.npy").astype(np.int64))
    with pytest.raises(IndexIntegrityError, match="passage tokens .* unusable"):
        PassageTokens.load(folder)


def _count_passage_tokenising(monkeypatch, packer):
    """Texts that the packer sends to its tokenizer (prompt pieces excluded: they are tokenised once)."""
    calls = []
    real = type(packer.tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        calls.extend([text] if isinstance(text, str) else list(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(packer.tokenizer), "__call__", counting)
    return calls


def test_built_index_packs_from_stored_tokens_and_survives_save_and_load(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("bart", "rag_token")
    retriever = model.build_index(str(corpus), show_progress=False, bm25=False)
    assert retriever.passage_tokens is not None and retriever.passage_tokens.count == retriever.n_passages
    reference = make_tiny_rag("bart", "rag_token")
    reference.set_retriever(retriever, check_fingerprint=False)
    reference.retriever = type(retriever)(retriever.index)  # same index, no stored tokens
    want = reference.prepare_inputs(QUESTIONS, n_docs=3)

    texts = {p["text"] for p in TINY_PASSAGES}
    calls = _count_passage_tokenising(monkeypatch, model.packer())
    got = model.prepare_inputs(QUESTIONS, n_docs=3)
    assert not texts & set(calls)  # no passage went through the tokenizer
    assert got["context_input_ids"].tolist() == want["context_input_ids"].tolist()
    monkeypatch.undo()

    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "index" / "passage_tokens" / "ids.npy").is_file()
    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert loaded.retriever.passage_tokens.count == retriever.n_passages
    calls = _count_passage_tokenising(monkeypatch, loaded.packer())
    again = loaded.prepare_inputs(QUESTIONS, n_docs=3)
    assert not texts & set(calls)
    assert again["context_input_ids"].tolist() == want["context_input_ids"].tolist()


def test_added_rows_are_tokenised_on_demand_until_stored(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES[:3]))
    model = make_tiny_rag("bart", "rag_token")
    retriever = model.build_index(str(corpus), show_progress=False, bm25=False)
    new = [{"id": "new", "title": "Sweden", "text": "Stockholm is the capital of Sweden, on many islands."}]
    vectors = retriever.index.get_embeddings(retriever.index.row_ids[:1])  # any vector of the right size
    (new_row,) = retriever.index.add(vectors, new).tolist()
    assert retriever.passage_tokens.lookup([new_row]) == [None]
    calls = _count_passage_tokenising(monkeypatch, model.packer())
    model.prepare_inputs(QUESTIONS, n_docs=4)  # 4 documents: the new row is among them
    assert new[0]["text"] in calls
    monkeypatch.undo()
    assert model.store_passage_tokens() == 1
    assert retriever.passage_tokens.lookup([new_row]) == [_ids(model.tokenizer.generator, new[0]["text"])]
    retriever.index.remove([0])
    retriever.save(tmp_path / "index")
    loaded = type(retriever).load(tmp_path / "index")
    assert loaded.passage_tokens.row_ids.tolist() == loaded.index.row_ids.tolist()  # removed row pruned


def test_stored_tokens_of_another_tokenizer_are_not_used(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("bart", "rag_token")
    retriever = model.build_index(str(corpus), show_progress=False, bm25=False)
    other = build_tiny_tokenizer(vocab_size=380)
    retriever.passage_tokens = PassageTokens.build(
        retriever.index.get_passages(retriever.index.row_ids), other, show_progress=False
    )
    calls = _count_passage_tokenising(monkeypatch, model.packer())
    model.prepare_inputs(QUESTIONS, n_docs=3)
    assert {p["text"] for p in TINY_PASSAGES} & set(calls)  # tokenised with the model's own tokenizer


def test_build_index_can_leave_passage_tokens_out(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("bart", "rag_token")
    assert model.build_index(str(corpus), show_progress=False, bm25=False, passage_tokens=False).passage_tokens is None
    assert model.store_passage_tokens(show_progress=False) == len(TINY_PASSAGES)
    assert model.retriever.passage_tokens.count == len(TINY_PASSAGES)

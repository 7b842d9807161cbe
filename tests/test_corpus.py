"""Reading corpora (folder, jsonl, csv, Dataset, list) and chunking them by tokens."""

import json
import os

import pytest
from conftest import DATA_DIR

from modeling_rag.corpus import Document, chunk_documents, chunking_config, passage_text, read_corpus
from modeling_rag.errors import CorpusError, RagConfigError


def test_read_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.md").write_text("Intro line\n# Remote work\nEmployees may work remotely.\n")
    (tmp_path / "a.txt").write_text("# not a heading in txt\nPlain text.")
    (tmp_path / "c.md").write_text("No heading here.")
    (tmp_path / "ignored.pdf").write_bytes(b"%PDF")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.md").write_text("hidden")
    docs = read_corpus(tmp_path)
    assert [d.id for d in docs] == ["a", "b/policy", "c"]
    assert [d.title for d in docs] == ["a", "Remote work", "c"]
    assert docs[1].source == "b/policy.md"
    assert docs[1].text.startswith("Intro line")


def test_read_jsonl_csv_dataset_and_list(tmp_path):
    rows = [{"id": 1, "title": "One", "text": "first"}, {"id": "two", "text": "second", "source": "web"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_corpus(jsonl)
    assert docs == [Document("1", "One", "first", "c.jsonl"), Document("two", "", "second", "web")]

    csv_path = tmp_path / "c.csv"
    csv_path.write_text('id,title,text\n1,One,"first, with comma"\n2,Two,second\n')
    docs = read_corpus(csv_path)
    assert [d.text for d in docs] == ["first, with comma", "second"] and docs[0].title == "One"

    import datasets

    ds = datasets.Dataset.from_list([{"id": "x", "title": "X", "text": "hello"}])
    assert read_corpus(ds) == [Document("x", "X", "hello", "dataset")]
    assert read_corpus([Document("d", "D", "text", "s")])[0].id == "d"


def test_real_squad_passages_load():
    docs = read_corpus(os.path.join(DATA_DIR, "squad_v2_5articles", "passages.jsonl"))
    assert len(docs) == 173 and docs[0].id == "Normans-0" and docs[0].title == "Normans"


def test_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no documents"):
        read_corpus(tmp_path)
    (tmp_path / "empty.md").write_text("   \n")
    with pytest.raises(CorpusError, match="no documents"):
        read_corpus(tmp_path)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CorpusError, match="no documents"):
        read_corpus(tmp_path / "e.jsonl")
    with pytest.raises(CorpusError, match="empty"):
        chunk_documents([], None)


def test_undecodable_and_unreadable_documents(tmp_path):
    (tmp_path / "good.md").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(CorpusError, match=r"bad\.txt.*UTF-8"):
        read_corpus(tmp_path)
    (tmp_path / "bad.txt").unlink()
    os.symlink(tmp_path / "missing-target.md", tmp_path / "broken.md")
    with pytest.raises(CorpusError, match=r"broken\.md"):
        read_corpus(tmp_path)


def test_missing_columns_bad_rows_and_duplicates(tmp_path):
    (tmp_path / "c.csv").write_text("id,body\n1,x\n")
    with pytest.raises(CorpusError, match=r"lacks the column\(s\) \['text'\]"):
        read_corpus(tmp_path / "c.csv")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n{"title": "no id", "text": "b"}\n')
    with pytest.raises(CorpusError, match=r"row 2 lacks \['id'\]"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n{not json\n')
    with pytest.raises(CorpusError, match="line 2 is not valid JSON"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(CorpusError, match="Duplicate"):
        read_corpus(tmp_path / "c.jsonl")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match="Unsupported"):
        read_corpus(tmp_path / "x.pdf")


def test_chunking(tiny_tokenizer):
    words = " ".join(f"word{i}" for i in range(120))
    docs = [Document("short", "S", "The capital of France is Paris.", "s.md"), Document("long", "L", words, "l.md")]
    passages = chunk_documents(docs, tiny_tokenizer, max_tokens=50, overlap=10)
    assert passages[0] == {"id": "short", "title": "S", "text": docs[0].text, "source": "s.md", "position": 0}
    chunks = passages[1:]
    assert [p["id"] for p in chunks] == [f"long#{i}" for i in range(len(chunks))]
    assert [p["position"] for p in chunks] == list(range(len(chunks)))
    n_tokens = len(tiny_tokenizer(words, add_special_tokens=False)["input_ids"])
    assert len(chunks) == 1 + -(-(n_tokens - 50) // 40)
    for p in chunks:
        assert len(tiny_tokenizer(p["text"], add_special_tokens=False)["input_ids"]) <= 50 + 1
        assert p["text"] in words
    assert chunks[0]["text"].startswith("word0") and chunks[-1]["text"].endswith("word119")
    # consecutive chunks overlap
    tail = chunks[0]["text"].split()[-1]
    assert tail in chunks[1]["text"]


def test_chunking_defaults_and_bad_settings(tiny_tokenizer):
    docs = [Document("d", "", "a b c", "s")]
    assert chunking_config(tiny_tokenizer, None, None) == {
        "max_tokens": 200,
        "overlap": 40,
        "tokenizer": chunking_config(tiny_tokenizer, None, None)["tokenizer"],
    }
    with pytest.raises(RagConfigError, match="overlap"):
        chunk_documents(docs, tiny_tokenizer, max_tokens=10, overlap=10)
    with pytest.raises(RagConfigError, match="max_tokens"):
        chunk_documents(docs, tiny_tokenizer, max_tokens=0)
    clash = [Document("a#0", "", "x", "s"), Document("a", "", " ".join(["w"] * 30), "s")]
    with pytest.raises(CorpusError, match="Duplicate passage ids"):
        chunk_documents(clash, tiny_tokenizer, max_tokens=8, overlap=0)


def test_passage_text():
    assert passage_text({"title": "T", "text": "body"}) == "T\nbody"
    assert passage_text({"title": "", "text": "body"}) == "body"

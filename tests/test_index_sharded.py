"""The sharded index (modeling_rag/index/sharded.py): same results as one index, partial opens, manifest checks."""

import json

import numpy as np
import pytest

from modeling_rag.constants import INDEX_CONFIG_NAME, SHARD_MANIFEST_NAME
from modeling_rag.errors import IndexMismatchError, RagInputError, ShardIntegrityError
from modeling_rag.index.passage_index import PassageIndex
from modeling_rag.index.sharded import ShardedPassageIndex, merge_topk, shard_bounds, shards_of_rank
from modeling_rag.index.sharded_build import build_sharded_index
from modeling_rag.retrieval_rag import RagRetriever

N, DIM = 103, 16


def _data(seed=0, n=N, dim=DIM):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    passages = [
        {"id": f"p{i}", "title": f"T{i}", "text": f"text {i}", "lang": "en" if i % 2 else "fr"} for i in range(n)
    ]
    return vectors, passages


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("sharded") / "index"
    build_sharded_index(folder, *data, 3, kind="flat", encoder_fingerprint="f" * 64)
    return folder


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_search_equals_unsharded(tmp_path, data, metric):
    vectors, passages = data
    full = PassageIndex.build(vectors, passages, kind="flat", metric=metric)
    sharded = build_sharded_index(tmp_path / "ix", vectors, passages, 4, kind="flat", metric=metric)
    queries = np.random.default_rng(1).standard_normal((9, DIM)).astype(np.float32)
    for k in (1, 10, 40, N + 5):  # k above a shard's size and above the corpus
        s_full, i_full = full.search(queries, k)
        s_sh, i_sh = sharded.search(queries, k)
        np.testing.assert_array_equal(i_sh, i_full)
        np.testing.assert_allclose(s_sh, s_full, rtol=1e-6, atol=1e-5)
    _, ids = sharded.search(queries, 10)
    assert sharded.get_passages(ids) == full.get_passages(ids)  # row_id, fields and metadata all global
    np.testing.assert_array_equal(sharded.get_embeddings(ids), full.get_embeddings(ids))
    assert sharded.row_ids.tolist() == list(range(N)) and sharded.count == N


def test_merge_breaks_ties_by_global_row_id():
    scores = [np.array([[1.0, 0.5]]), np.array([[1.0, 1.0]])]
    ids = [np.array([[7, 2]]), np.array([[3, 9]])]
    s, i = merge_topk(scores, ids, 3)
    assert i.tolist() == [[3, 7, 9]] and s.tolist() == [[1.0, 1.0, 1.0]]
    s, i = merge_topk([np.array([[2.0, 0.0]])], [np.array([[4, -1]])], 2)  # padding never comes back
    assert i.tolist() == [[4]]


def test_layout_helpers():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shards_of_rank(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="at most 2 shards"):
        shard_bounds(2, 3)


def test_manifest_lists_ranges_and_each_shard_opens_alone(sharded_folder, data):
    manifest = json.loads((sharded_folder / SHARD_MANIFEST_NAME).read_text())
    assert manifest["num_shards"] == 3 and manifest["count"] == N and manifest["dim"] == DIM
    assert [(s["row_start"], s["row_stop"]) for s in manifest["shards"]] == shard_bounds(N, 3)
    assert manifest["kind"] == "flat" and manifest["encoder_fingerprint"] == "f" * 64
    alone = PassageIndex.load(sharded_folder / "shard-00001")  # an ordinary index, local rows from 0
    assert alone.count == 34 and alone.get_passages([0])[0]["id"] == "p34"


def test_open_some_shards(sharded_folder, data):
    part = ShardedPassageIndex.open(sharded_folder, shards=[1])
    assert part.shard_ids == [1] and part.count == 34 and part.total_count == N
    assert part.row_ids.tolist() == list(range(34, 68))
    queries = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    _, ids = part.search(queries, 5)
    assert ((ids >= 34) & (ids < 68)).all()
    expected = PassageIndex.load(sharded_folder / "shard-00001").search(queries, 5)[1] + 34
    np.testing.assert_array_equal(ids, expected)
    assert part.get_passages([40])[0]["id"] == "p40"
    with pytest.raises(RagInputError, match=r"shard\(s\) \[0\], which this process did not open"):
        part.get_passages([3])
    with pytest.raises(RagInputError, match="Shard 5 does not exist"):
        ShardedPassageIndex.open(sharded_folder, shards=[5])


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_a_typed_error_naming_it(sharded_folder, tmp_path):
    import shutil

    folder = _copy(sharded_folder, tmp_path)
    shutil.rmtree(folder / "shard-00002")
    with pytest.raises(ShardIntegrityError, match=r"Shard 2 \(shard-00002\).*missing") as err:
        ShardedPassageIndex.open(folder)
    assert err.value.shard == 2
    assert ShardedPassageIndex.open(folder, shards=[0, 1]).count == 68  # the others still open


def test_shard_from_another_build_fails_the_manifest_checksum(sharded_folder, tmp_path):
    folder = _copy(sharded_folder, tmp_path)
    cfg_path = folder / "shard-00001" / INDEX_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["encoder_name"] = "someone else"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ShardIntegrityError, match="Shard 1 .*fails its manifest checksum") as err:
        ShardedPassageIndex.open(folder)
    assert err.value.shard == 1


def test_damaged_shard_file_is_reported_with_its_shard(sharded_folder, tmp_path):
    folder = _copy(sharded_folder, tmp_path)
    data = bytearray((folder / "shard-00000" / "passages.arrow").read_bytes())
    data[100] ^= 0xFF
    (folder / "shard-00000" / "passages.arrow").write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="Shard 0 .*damaged.*sha256"):
        ShardedPassageIndex.open(folder, verify=True)


@pytest.mark.parametrize(("key", "value", "message"), [("dim", 8, "dim=16 but the manifest says 8"),
                                                      ("kind", "hnsw", "kind='flat' but the manifest says 'hnsw'")])  # fmt: skip
def test_manifest_disagreeing_with_a_shard(sharded_folder, tmp_path, key, value, message):
    folder = _copy(sharded_folder, tmp_path)
    manifest = json.loads((folder / SHARD_MANIFEST_NAME).read_text())
    manifest[key] = value
    (folder / SHARD_MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match=message):
        ShardedPassageIndex.open(folder)


def test_bad_manifest_and_encoder_mismatch(sharded_folder, tmp_path):
    with pytest.raises(IndexMismatchError, match="dimension 16 but the encoder produces 32"):
        ShardedPassageIndex.open(sharded_folder, expected_dim=32)
    with pytest.raises(IndexMismatchError, match="different encoder"):
        ShardedPassageIndex.open(sharded_folder, expected_fingerprint="0" * 64)
    folder = _copy(sharded_folder, tmp_path)
    manifest = json.loads((folder / SHARD_MANIFEST_NAME).read_text())
    manifest["shards"][1]["row_start"] = 30  # ranges must follow each other
    (folder / SHARD_MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match="shard entry 1"):
        ShardedPassageIndex.open(folder)
    (folder / SHARD_MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardIntegrityError, match="not valid JSON"):
        ShardedPassageIndex.open(folder)


def test_sharded_index_is_read_only(sharded_folder, data):
    index = ShardedPassageIndex.open(sharded_folder)
    with pytest.raises(RagInputError, match="rebuild"):
        index.add(data[0][:1], data[1][:1])


def test_retriever_loads_a_sharded_folder_and_saves_it(sharded_folder, data, tmp_path):
    retriever = RagRetriever.load(sharded_folder)
    assert isinstance(retriever.index, ShardedPassageIndex)
    full = RagRetriever(PassageIndex.build(*data, kind="flat"))
    queries = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    a, b = retriever.retrieve(queries, 6), full.retrieve(queries, 6)
    np.testing.assert_array_equal(a.row_ids, b.row_ids)
    np.testing.assert_array_equal(a.doc_embeddings, b.doc_embeddings)
    assert a.passages == b.passages
    retriever.rebuild_bm25()  # BM25 over all shards' passages, saved beside them
    out = tmp_path / "saved"
    retriever.save(out)
    again = RagRetriever.load(out)
    assert isinstance(again.index, ShardedPassageIndex) and again.bm25 is not None
    np.testing.assert_array_equal(again.retrieve(queries, 6).row_ids, a.row_ids)
    (out / "bm25" / "row_ids.npy").write_bytes(b"x")  # files beside the shards are covered by the manifest
    with pytest.raises(ShardIntegrityError, match="bm25/row_ids.npy"):
        RagRetriever.load(out)


def test_model_uses_a_sharded_index_transparently(tmp_path, tiny_rag_factory):
    from modeling_rag.encoders import encode_texts, weights_fingerprint

    model = tiny_rag_factory()
    tok = model.tokenizer.question_encoder
    passages = [{"id": f"d{i}", "title": f"Doc {i}", "text": f"word{i} word{i + 1} policy {i}"} for i in range(12)]
    vectors = encode_texts([p["text"] for p in passages], model.passage_encoder, tok)
    fp = weights_fingerprint(model.passage_encoder)
    build_sharded_index(tmp_path / "ix", vectors, passages, 3, kind="flat", encoder_fingerprint=fp)
    model.set_retriever(RagRetriever.load(tmp_path / "ix"))
    (sharded_answer,) = model.answer("what is the policy?", n_docs=3)
    model.set_retriever(RagRetriever(PassageIndex.build(vectors, passages, kind="flat", encoder_fingerprint=fp)))
    (plain_answer,) = model.answer("what is the policy?", n_docs=3)
    assert [s.id for s in sharded_answer.sources] == [s.id for s in plain_answer.sources]
    assert [s.score for s in sharded_answer.sources] == pytest.approx([s.score for s in plain_answer.sources])
    assert sharded_answer.answer == plain_answer.answer


def test_ivf_shards_searched_exhaustively_equal_flat(tmp_path, data):
    vectors, passages = data
    sharded = build_sharded_index(tmp_path / "ivf", vectors, passages, 2, kind="ivf_flat", nlist=2, nprobe=2)
    assert sharded.kind == "ivf_flat" and all(s.kind == "ivf_flat" for s in sharded.shards.values())
    queries = np.random.default_rng(4).standard_normal((5, DIM)).astype(np.float32)
    np.testing.assert_array_equal(
        sharded.search(queries, 8)[1], PassageIndex.build(*data, kind="flat").search(queries, 8)[1]
    )

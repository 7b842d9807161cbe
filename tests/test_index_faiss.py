"""PassageIndex: every kind and metric, save/load (mmap too), add/remove, and every bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from modeling_rag.constants import EXACT_VECTORS_NAME, FAISS_INDEX_NAME, INDEX_CONFIG_NAME, PASSAGES_NAME
from modeling_rag.errors import IndexIntegrityError, IndexMismatchError, RagConfigError, RagInputError
from modeling_rag.index import KINDS, PassageIndex, resolve_kind
from modeling_rag.utils.hashing import sha256_file

DIM = 16
N = 300


def make_data(n=N, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    passages = [
        {"id": f"doc-{i}", "title": f"T{i}", "text": f"passage {i}", "source": f"s{i % 3}.md", "position": i % 2}
        for i in range(n)
    ]
    return x, passages


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def flat_index(data):
    x, passages = data
    return PassageIndex.build(x, passages, kind="flat", encoder_name="enc", encoder_fingerprint="a" * 64)


def exact_topk(x, q, k, metric):
    if metric == "ip":
        s = q @ x.T
    else:
        s = -((q[:, None, :] - x[None]) ** 2).sum(-1)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", KINDS)
def test_build_save_load_same_topk(tmp_path, data, kind, metric):
    x, passages = data
    index = PassageIndex.build(x, passages, kind=kind, metric=metric)
    assert index.kind == kind and index.metric == metric and index.dim == DIM and len(index) == N
    q = x[:8] + 0.01
    scores, ids = index.search(q, 5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (8, 5)
    assert (ids[:, 0] == np.arange(8)).all()  # each query's nearest passage is its own vector
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, larger is better for both metrics
    # the small test corpus makes every approximate kind exact in practice
    assert (ids == exact_topk(x, q, 5, metric)).all()
    index.save(tmp_path / "ix")
    # the vectors are stored once: inside index.faiss, or (ivf_pq) as float16 exact vectors
    expected = {FAISS_INDEX_NAME, PASSAGES_NAME, INDEX_CONFIG_NAME} | (
        {EXACT_VECTORS_NAME} if kind == "ivf_pq" else set()
    )
    assert set(os.listdir(tmp_path / "ix")) == expected
    for mmap in (False, True):
        loaded = PassageIndex.load(tmp_path / "ix", mmap=mmap)
        s2, i2 = loaded.search(q, 5)
        assert (i2 == ids).all()
        np.testing.assert_allclose(s2, scores, rtol=1e-5, atol=1e-5)
        assert loaded.kind == kind and loaded.kind_params == index.kind_params
        if kind == "ivf_pq":
            np.testing.assert_allclose(loaded.get_embeddings(ids), x[ids], atol=1e-3)
        else:
            np.testing.assert_array_equal(loaded.get_embeddings(ids), x[ids])


def test_scores_match_exact_vectors(flat_index, data):
    x, _ = data
    scores, ids = flat_index.search(x[:4], 3)
    emb = flat_index.get_embeddings(ids)
    assert emb.shape == (4, 3, DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.einsum("bd,bkd->bk", x[:4], emb), scores, rtol=1e-5, atol=1e-5)


def test_ivf_pq_returns_exact_embeddings_and_scores(data):
    x, passages = data
    index = PassageIndex.build(x, passages, kind="ivf_pq")
    scores, ids = index.search(x[:4], 5)
    emb = index.get_embeddings(ids)
    assert index.exact_vectors == "float16"
    np.testing.assert_allclose(emb, x[ids], atol=1e-3)  # float16 exact vectors
    np.testing.assert_allclose(np.einsum("bd,bkd->bk", x[:4], emb), scores, rtol=1e-5, atol=1e-5)


def test_ivf_pq_without_exact_vectors_ranks_by_codes(tmp_path, data):
    x, passages = data
    index = PassageIndex.build(x, passages, kind="ivf_pq", exact_vectors=None)
    assert index.exact_vectors is None
    scores, ids = index.search(x[:8], 5)
    assert (ids[:, 0] == np.arange(8)).all()
    approx = index.get_embeddings(ids[:, 0])  # the PQ reconstruction: close, not exact
    assert 0 < np.abs(approx - x[:8]).max() < 0.5
    index.save(tmp_path / "pq")
    assert EXACT_VECTORS_NAME not in os.listdir(tmp_path / "pq")
    loaded = PassageIndex.load(tmp_path / "pq", mmap=True)
    assert (loaded.search(x[:8], 5)[1] == ids).all()


def test_get_passages(flat_index):
    got = flat_index.get_passages([5, 2])
    assert [p["row_id"] for p in got] == [5, 2]
    assert got[0] == {"row_id": 5, "id": "doc-5", "title": "T5", "text": "passage 5", "source": "s2.md", "position": 1}
    assert flat_index.get_passages(np.array([[1, 2], [3, 4]]))[1][0]["id"] == "doc-3"
    with pytest.raises(RagInputError, match="Unknown row id"):
        flat_index.get_passages([N + 5])


def test_config_records_metadata(flat_index):
    cfg = flat_index.config
    assert cfg["dim"] == DIM and cfg["count"] == N and cfg["kind"] == "flat" and cfg["metric"] == "ip"
    assert cfg["normalized"] is True and cfg["encoder_name"] == "enc" and cfg["next_row_id"] == N
    assert flat_index.encoder_fingerprint == "a" * 64


def test_auto_kind_thresholds():
    assert resolve_kind("auto", 1000) == "flat"
    assert resolve_kind("auto", 10_000_000) != "flat"
    with pytest.raises(RagConfigError):
        resolve_kind("lsh", 10)


def test_k_larger_than_corpus_never_returns_minus_one():
    x, passages = make_data(n=7)
    for kind in KINDS:
        index = PassageIndex.build(x, passages, kind=kind)
        scores, ids = index.search(x[:3], 50)
        assert ids.shape == (3, 7) and (ids >= 0).all()
        assert all(len(set(row)) == 7 for row in ids.tolist())


def test_short_faiss_results_are_completed(data):
    x, passages = data
    index = PassageIndex.build(x, passages, kind="ivf_flat", nlist=8, nprobe=1)
    scores, ids = index.search(x[:5], 200)  # one list holds far fewer than 200 vectors
    assert ids.shape == (5, 200) and (ids >= 0).all()
    assert all(len(set(row)) == 200 for row in ids.tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_keep_ids_stable(tmp_path, data, kind):
    x, passages = data
    index = PassageIndex.build(x[:100], passages[:100], kind=kind)
    new_ids = index.add(x[100:110], passages[100:110])
    assert new_ids.tolist() == list(range(100, 110))
    assert index.remove([0, 5, 105]) == 3
    assert index.count == 107
    assert index.get_passages([6])[0]["id"] == "doc-6"
    assert index.get_passages([106])[0]["id"] == "doc-106"
    _, ids = index.search(x[[0, 5, 105, 6, 106]], 3)
    assert not np.isin(ids, [0, 5, 105]).any()
    assert ids[3, 0] == 6 and ids[4, 0] == 106
    more = index.add(x[:1], passages[:1])
    assert more.tolist() == [110]  # removed ids are never reused
    index.save(tmp_path / "ix")
    for mmap in (False, True):
        loaded = PassageIndex.load(tmp_path / "ix", mmap=mmap)
        assert loaded.count == 108 and loaded.config["next_row_id"] == 111
        _, ids2 = loaded.search(x[[0, 6, 106]], 3)
        assert ids2[0, 0] == 110 and ids2[1, 0] == 6 and ids2[2, 0] == 106
        # a memory-mapped index becomes writable on demand
        assert loaded.add(x[2:3], passages[2:3]).tolist() == [111]
        loaded.remove([110])
        assert loaded.search(x[:1], 1)[1][0, 0] != 110


def test_bad_queries(flat_index):
    with pytest.raises(IndexMismatchError, match=r"dimension 8.*dimension 16"):
        flat_index.search(np.zeros((2, 8), np.float32), 3)
    q = np.zeros((2, DIM), np.float32)
    q[1, 3] = np.nan
    with pytest.raises(RagInputError, match="NaN"):
        flat_index.search(q, 3)
    for k in (0, -1, 2.5):
        with pytest.raises(RagInputError, match="k must be"):
            flat_index.search(np.zeros((1, DIM), np.float32), k)


def test_bad_build_inputs(data):
    x, passages = data
    with pytest.raises(RagInputError, match="zero passages"):
        PassageIndex.build(np.zeros((0, DIM), np.float32), [])
    with pytest.raises(RagInputError, match="must match"):
        PassageIndex.build(x[:3], passages[:2])
    with pytest.raises(RagConfigError):
        PassageIndex.build(x, passages, metric="cosine")
    with pytest.raises(RagConfigError, match="Unknown parameter"):
        PassageIndex.build(x, passages, kind="flat", nprobe=3)
    with pytest.raises(IndexMismatchError):
        PassageIndex.build(x, passages, kind="flat").add(np.zeros((1, 4), np.float32), passages[:1])


@pytest.fixture
def saved(tmp_path, flat_index):
    folder = tmp_path / "ix"
    flat_index.save(folder)
    return folder


def test_load_dim_and_fingerprint_mismatch(saved):
    with pytest.raises(IndexMismatchError, match=r"dimension 16.*dimension 32"):
        PassageIndex.load(saved, expected_dim=32)
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        PassageIndex.load(saved, expected_fingerprint="b" * 64)
    assert PassageIndex.load(saved, expected_dim=DIM, expected_fingerprint="a" * 64).count == N


@pytest.mark.parametrize("name", [FAISS_INDEX_NAME, PASSAGES_NAME])
def test_corrupted_truncated_missing_files(saved, name):
    path = saved / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(IndexIntegrityError, match=name):
        PassageIndex.load(saved)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexIntegrityError, match=name):
        PassageIndex.load(saved, verify_checksums=False)
    path.unlink()
    with pytest.raises(IndexIntegrityError, match=name):
        PassageIndex.load(saved)


def _rewrite_config(folder, **changes):
    cfg = json.loads((folder / INDEX_CONFIG_NAME).read_text())
    cfg.update(changes)
    for rel in cfg["files"]:
        cfg["files"][rel] = {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
    (folder / INDEX_CONFIG_NAME).write_text(json.dumps(cfg))


def test_passage_count_differs_from_index_count(saved):
    from modeling_rag.index.passage_store import open_passage_store, write_passage_store

    table = open_passage_store(saved / PASSAGES_NAME)
    write_passage_store(saved / "short.arrow", [table.slice(0, N - 1)])
    del table
    os.replace(saved / "short.arrow", saved / PASSAGES_NAME)
    _rewrite_config(saved)  # checksums now agree: the count check must catch it
    with pytest.raises(IndexIntegrityError, match=r"299 passages but the index holds 300"):
        PassageIndex.load(saved)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dim": "16"}, "dim"),
        ({"metric": "cosine"}, "metric"),
        ({"kind": "annoy"}, "kind"),
        ({"format_version": 99}, "upgrade"),
        ({"files": {"../outside": {"sha256": "0" * 64, "size": 1}}}, "outside"),
        ({"files": {"/etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "invalid file path"),
        ({"count": 5}, "5"),
    ],
)
def test_invalid_config(saved, changes, match):
    cfg = json.loads((saved / INDEX_CONFIG_NAME).read_text())
    files = changes.pop("files", {})
    cfg.update(changes)
    cfg["files"].update(files)
    (saved / INDEX_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(IndexIntegrityError, match=match):
        PassageIndex.load(saved)


def test_config_not_json_and_missing(saved):
    (saved / INDEX_CONFIG_NAME).write_text("{not json")
    with pytest.raises(IndexIntegrityError, match=INDEX_CONFIG_NAME):
        PassageIndex.load(saved)
    (saved / INDEX_CONFIG_NAME).unlink()
    with pytest.raises(IndexIntegrityError, match=INDEX_CONFIG_NAME):
        PassageIndex.load(saved)
    with pytest.raises(IndexIntegrityError, match="No index folder"):
        PassageIndex.load(saved.parent / "nope")


def test_interrupted_save_keeps_previous_index(saved, data, monkeypatch):
    x, passages = data
    bigger = PassageIndex.build(x[:50], passages[:50], kind="flat")
    import modeling_rag.index.passage_index as mod

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "write_config", failing_save)  # fails after index.faiss + passages.arrow are written
    with pytest.raises(OSError, match="disk full"):
        bigger.save(saved)
    monkeypatch.undo()
    loaded = PassageIndex.load(saved)
    assert loaded.count == N
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned up
    bigger.save(saved)  # a later save replaces it
    assert PassageIndex.load(saved).count == 50


def test_save_refuses_foreign_folder(tmp_path, flat_index):
    other = tmp_path / "stuff"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RagInputError, match="not an index folder"):
        flat_index.save(other)
    assert (other / "notes.txt").exists()


def test_never_pickles(saved):
    import pyarrow as pa

    assert pa.ipc.open_file(saved / PASSAGES_NAME).read_all().num_rows == N  # Arrow IPC, not a pickle


def test_interrupted_swap_restores_the_previous_index(saved, caplog):
    before = PassageIndex.load(saved)
    backup = saved.parent / f".{saved.name}.old-1234"
    shutil.move(saved, backup)  # killed between "target -> backup" and "new -> target"
    with caplog.at_level("WARNING"):
        restored = PassageIndex.load(saved)
    assert "interrupted" in caplog.text
    assert restored.count == before.count and not backup.exists()
    shutil.move(saved, saved.parent / "elsewhere")
    with pytest.raises(IndexIntegrityError, match="No index folder"):
        PassageIndex.load(saved)


def test_the_old_module_paths_re_export_the_index_package():
    # code written before the split imports from the flat modules; they must hand out the very same objects
    import modeling_rag.index as index
    import modeling_rag.index_bm25 as old_bm25
    import modeling_rag.index_faiss as old_faiss
    import modeling_rag.index_verification as old_verification
    import modeling_rag.passage_store as old_store
    from modeling_rag.index import bm25, passage_store, verification

    assert old_faiss.PassageIndex is index.PassageIndex is PassageIndex
    assert old_faiss.resolve_kind is index.resolve_kind and old_faiss.KINDS == KINDS
    assert old_faiss.sha256_file is sha256_file
    assert old_bm25.BM25Index is bm25.BM25Index is index.BM25Index
    assert old_store.open_passage_store is passage_store.open_passage_store
    assert old_verification.is_trusted is verification.is_trusted
    import modeling_rag

    assert modeling_rag.PassageIndex is PassageIndex and modeling_rag.BM25Index is bm25.BM25Index

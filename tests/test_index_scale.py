"""Index format 2 at scale: the Arrow passage store, vectors kept once, stamp-trusted verification,
streaming builds, format 1 folders, the verify/convert script and kind="auto" under a memory budget."""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

import modeling_rag.index.folder as index_folder
from modeling_rag.constants import (
    EMBEDDINGS_NAME,
    EXACT_VECTORS_NAME,
    FAISS_INDEX_NAME,
    INDEX_CONFIG_NAME,
    LEGACY_PASSAGES_NAME,
    PASSAGES_NAME,
)
from modeling_rag.errors import IndexIntegrityError, RagInputError
from modeling_rag.index import PassageIndex, resolve_kind
from modeling_rag.index.npy_files import NpyAppender, map_npy

DIM = 16
ROOT = Path(__file__).resolve().parents[1]


def vectors(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plain_passages(n, text_len=20):
    return [
        {"id": f"d{i}", "title": f"T{i}", "text": f"passage {i} " + "x" * text_len, "source": "s", "position": i % 3}
        for i in range(n)
    ]


@pytest.fixture
def counted_hashes(monkeypatch):
    calls = []
    real = index_folder.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(index_folder, "sha256_file", counting)
    return calls


# ------------------------------------------------------------------------------------------------
# The passage store
# ------------------------------------------------------------------------------------------------
def test_store_round_trips_unicode_and_metadata_exactly(tmp_path):
    passages = [
        {
            "id": "ü-1",
            "title": "Zürich — Ωμέγα",
            "text": "日本語のテキスト 🚀 e\u0301 \u200b tab\tnew\nline",
            "source": "a.md",
        },
        {
            "id": 7,  # ids are stored as strings
            "title": None,
            "text": "",
            "position": 3,
            "url": "https://example.org/ü",
            "tags": ["a", "ß", {"nested": [1, 2.5, None, True]}],
            "score": 0.125,
            "big": 2**62,
        },
        {"text": "\x00 a NUL and a surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 line", "lang": None},
    ]
    index = PassageIndex.build(vectors(3), passages, kind="flat")
    index.save(tmp_path / "ix")
    loaded = PassageIndex.load(tmp_path / "ix", mmap=True)
    got = loaded.get_passages([0, 1, 2])
    expected = [
        {
            "row_id": 0,
            "id": "ü-1",
            "title": "Zürich — Ωμέγα",
            "text": passages[0]["text"],
            "source": "a.md",
            "position": 0,
        },
        {
            "row_id": 1,
            "id": "7",
            "title": "",
            "text": "",
            "source": "",
            "position": 3,
            "url": "https://example.org/ü",
            "tags": ["a", "ß", {"nested": [1, 2.5, None, True]}],
            "score": 0.125,
            "big": 2**62,
        },
        {"row_id": 2, "id": "2", "title": "", "text": passages[2]["text"], "source": "", "position": 0, "lang": None},
    ]
    assert got == expected
    assert [type(v) for v in got[1].values()] == [type(v) for v in expected[1].values()]
    assert [p for batch in loaded.iter_passages(batch_size=2) for p in batch] == expected


def test_store_is_arrow_not_json_and_refuses_bad_metadata(tmp_path):
    index = PassageIndex.build(vectors(4), plain_passages(4), kind="flat")
    index.save(tmp_path / "ix")
    table = pa.ipc.open_file(tmp_path / "ix" / PASSAGES_NAME).read_all()
    assert table.column_names == ["row_id", "id", "title", "text", "source", "position", "metadata"]
    with pytest.raises(RagInputError, match="JSON-serialisable"):
        PassageIndex.build(vectors(1), [{"text": "t", "when": object()}], kind="flat")


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_reading_a_passage_touches_only_its_row(tmp_path):
    n = 8_000
    passages = [{"id": str(i), "text": f"{i:08d}" + "abcdefgh" * 1250} for i in range(n)]  # ~10 kB each, 80 MB
    x = vectors(n)
    # written in 4 record batches, as a streamed build writes them
    PassageIndex.build_streaming(tmp_path / "ix", _batches(x, passages, 2_000), total=n, dim=DIM, kind="flat")
    del passages
    store = (tmp_path / "ix" / PASSAGES_NAME).resolve()
    allocated = pa.total_allocated_bytes()
    loaded = PassageIndex.load(tmp_path / "ix", verify=False)
    got = loaded.get_passages([4321])[0]
    assert got["text"].startswith("00004321") and len(got["text"]) == 10008
    assert store.stat().st_size > 80_000_000
    # the row ids, the column offsets and one row's pages (the kernel maps 64 kB around each touch),
    # not the 80 MB of text
    assert _mapped_rss(store) < 4_000_000
    assert pa.total_allocated_bytes() - allocated < 1_000_000  # nothing was copied out of the map


# ------------------------------------------------------------------------------------------------
# Vectors kept once
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat"])
def test_vectors_live_only_in_faiss_and_reconstruct_exactly(tmp_path, kind):
    x = vectors(400)
    index = PassageIndex.build(x, plain_passages(400), kind=kind)
    index.remove([3, 10])
    index.save(tmp_path / "ix")
    assert sorted(os.listdir(tmp_path / "ix")) == sorted([FAISS_INDEX_NAME, INDEX_CONFIG_NAME, PASSAGES_NAME])
    for mmap in (False, True):
        loaded = PassageIndex.load(tmp_path / "ix", mmap=mmap)
        ids = np.array([[0, 399], [11, 2]])
        np.testing.assert_array_equal(loaded.get_embeddings(ids), x[ids])
        with pytest.raises(RagInputError, match="Unknown row id"):
            loaded.get_embeddings([3])
    size = (tmp_path / "ix" / FAISS_INDEX_NAME).stat().st_size
    assert size < 1.2 * 400 * DIM * 4 + 200_000  # one copy of the vectors


def test_streamed_ivf_pq_exact_vectors_are_a_plain_npy_mapped_read_only(tmp_path):
    x = vectors(600, seed=3)
    batches = _batches(x, plain_passages(600), 250)
    PassageIndex.build_streaming(tmp_path / "ix", batches, total=600, dim=DIM, kind="ivf_pq", nlist=8, m=4)
    on_disk = np.load(tmp_path / "ix" / EXACT_VECTORS_NAME, allow_pickle=False)
    np.testing.assert_array_equal(on_disk, x.astype(np.float16))  # written batch by batch, in order
    mapped = PassageIndex.load(tmp_path / "ix", mmap=True)
    np.testing.assert_allclose(mapped.get_embeddings([0, 599, 250]), x[[0, 599, 250]], atol=1e-3)
    assert (mapped.search(x[:5], 1)[1][:, 0] == np.arange(5)).all()
    mapped.add(vectors(2, seed=9), plain_passages(2))  # a mapped index takes an in-memory copy to grow
    assert mapped.count == 602


def test_map_npy_reads_rows_and_refuses_what_is_not_a_plain_array(tmp_path):
    x = np.arange(24, dtype=np.float16).reshape(6, 4)
    with_appender = tmp_path / "a.npy"
    appender = NpyAppender(with_appender, np.float16, (6, 4))
    appender.append(x[:4])
    appender.append(x[4:])
    appender.close()
    assert with_appender.read_bytes()[128:] == x.tobytes()
    mapped = map_npy(with_appender)
    np.testing.assert_array_equal(mapped[[5, 0]], x[[5, 0]])
    assert not mapped.flags.writeable
    with pytest.raises(ValueError, match="does not fit"):
        NpyAppender(tmp_path / "b.npy", np.float16, (2, 4)).append(x[:3])
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((3, 2))))
    with pytest.raises(ValueError, match="C-ordered"):
        map_npy(tmp_path / "f.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        map_npy(tmp_path / "o.npy")  # an object array needs pickle: never read
    (tmp_path / "t.npy").write_bytes(with_appender.read_bytes()[:-8])
    with pytest.raises(ValueError, match="header needs"):
        map_npy(tmp_path / "t.npy")


# ------------------------------------------------------------------------------------------------
# Verification: full once, then trusted while the stamps hold
# ------------------------------------------------------------------------------------------------
def test_first_load_hashes_then_stamps_are_trusted(tmp_path, counted_hashes):
    PassageIndex.build(vectors(50), plain_passages(50), kind="flat").save(tmp_path / "ix")
    counted_hashes.clear()
    PassageIndex.load(tmp_path / "ix")
    assert sorted(counted_hashes) == [FAISS_INDEX_NAME, PASSAGES_NAME]
    counted_hashes.clear()
    PassageIndex.load(tmp_path / "ix", mmap=True)
    assert counted_hashes == []  # trusted: only the stamp (sizes, times, inodes, the config's hash) is checked
    counted_hashes.clear()
    PassageIndex.load(tmp_path / "ix", verify=True)
    assert FAISS_INDEX_NAME in counted_hashes and PASSAGES_NAME in counted_hashes
    # a copy elsewhere is a different folder: hashed again
    shutil.copytree(tmp_path / "ix", tmp_path / "copy")
    counted_hashes.clear()
    PassageIndex.load(tmp_path / "copy")
    assert PASSAGES_NAME in counted_hashes


def test_a_modified_file_is_refused_even_with_its_mtime_restored(tmp_path):
    folder = tmp_path / "ix"
    PassageIndex.build(vectors(50), plain_passages(50), kind="flat").save(folder)
    PassageIndex.load(folder)  # verified and stamped
    path = folder / PASSAGES_NAME
    st = path.stat()
    raw = bytearray(path.read_bytes())
    i = raw.index(b"passage 17")
    raw[i] ^= 0x01  # same size
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves
    with pytest.raises(IndexIntegrityError, match=f"{PASSAGES_NAME}.*sha256"):
        PassageIndex.load(folder)


def test_a_stamp_inside_the_folder_is_not_trusted(tmp_path, counted_hashes):
    folder = tmp_path / "ix"
    PassageIndex.build(vectors(20), plain_passages(20), kind="flat").save(folder)
    PassageIndex.load(folder)
    home = Path(os.environ["MODELING_RAG_HOME"]) / "verified"
    assert any(home.glob("*.json"))  # stamps live in the home folder, keyed by path and config
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# Streaming build
# ------------------------------------------------------------------------------------------------
def _batches(x, passages, size):
    for start in range(0, len(x), size):
        yield x[start : start + size], passages[start : start + size]


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_streaming_build_matches_the_in_memory_build(tmp_path, kind):
    x, passages = vectors(3000, seed=1), plain_passages(3000)
    params = {"nlist": 16} if kind != "flat" else {}
    streamed = PassageIndex.build_streaming(
        tmp_path / "s", _batches(x, passages, 700), total=3000, dim=DIM, kind=kind, **params
    )
    memory = PassageIndex.build(x, passages, kind=kind, **params)
    q = x[:20] + 0.01
    assert streamed.kind == kind and streamed.count == 3000
    if kind == "flat":
        np.testing.assert_array_equal(streamed.search(q, 5)[1], memory.search(q, 5)[1])
    # the IVF kinds are trained on the first batches, not a random sample: results agree on the nearest
    assert (streamed.search(q, 1)[1][:, 0] == np.arange(20)).all()
    assert streamed.get_passages([0, 2999]) == memory.get_passages([0, 2999])
    np.testing.assert_allclose(streamed.get_embeddings([5, 6]), x[[5, 6]], atol=1e-3)


def test_interrupted_streaming_build_leaves_the_previous_index(tmp_path):
    folder = tmp_path / "ix"
    PassageIndex.build(vectors(10), plain_passages(10), kind="flat").save(folder)
    x, passages = vectors(100), plain_passages(100)

    def dying():
        yield x[:50], passages[:50]
        raise KeyboardInterrupt  # killed half way

    with pytest.raises(KeyboardInterrupt):
        PassageIndex.build_streaming(folder, dying(), total=100, dim=DIM, kind="flat")
    assert PassageIndex.load(folder).count == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temporary folder left
    with pytest.raises(RagInputError, match="total=100"):
        PassageIndex.build_streaming(folder, _batches(x[:60], passages[:60], 30), total=100, dim=DIM, kind="flat")
    rebuilt = PassageIndex.build_streaming(folder, _batches(x, passages, 30), total=100, dim=DIM, kind="flat")
    assert rebuilt.count == 100 and PassageIndex.load(folder, verify=True).count == 100


# ------------------------------------------------------------------------------------------------
# kind="auto" and the memory budget
# ------------------------------------------------------------------------------------------------
def test_auto_picks_ivf_pq_past_the_memory_budget_and_says_so(caplog):
    assert resolve_kind("auto", 1_000_000, 384) == "ivf_flat"  # 1.4 GiB of float32 fits 4 GiB
    with caplog.at_level(logging.WARNING):
        assert resolve_kind("auto", 5_000_000, 384) == "ivf_pq"  # 7.2 GiB does not
    assert "ivf_pq" in caplog.text and "memory budget" in caplog.text
    assert resolve_kind("auto", 1_000_000, 384, memory_budget_bytes=1 << 30) == "ivf_pq"
    index = PassageIndex.build(vectors(60_000), plain_passages(60_000, 0), memory_budget_bytes=1 << 20)
    assert index.kind == "ivf_pq" and index.exact_vectors == "float16"


# ------------------------------------------------------------------------------------------------
# Format 1 folders and the verify / convert script
# ------------------------------------------------------------------------------------------------
def write_format_1(folder: Path, x: np.ndarray, passages: list[dict], kind: str) -> None:
    """A folder exactly as modeling_rag wrote format 1: IDMap2 / bare IVF, passages.jsonl, embeddings.npy."""
    folder.mkdir(parents=True)
    n = len(x)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        params = {}
    else:
        quantizer = faiss.IndexFlatIP(DIM)
        index = faiss.IndexIVFFlat(quantizer, DIM, 8, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.train(x)
        params = {"nlist": 8, "nprobe": 8}
    index.add_with_ids(x, np.arange(n, dtype=np.int64))
    faiss.write_index(index, str(folder / FAISS_INDEX_NAME))
    with open(folder / LEGACY_PASSAGES_NAME, "w", encoding="utf-8") as f:
        for i, p in enumerate(passages):
            f.write(json.dumps({**p, "row_id": i}, ensure_ascii=False) + "\n")
    with open(folder / EMBEDDINGS_NAME, "wb") as f:
        np.save(f, x, allow_pickle=False)
    files = {}
    for name in (FAISS_INDEX_NAME, LEGACY_PASSAGES_NAME, EMBEDDINGS_NAME):
        raw = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    cfg = {
        "format_version": 1,
        "dim": DIM,
        "metric": "ip",
        "kind": kind,
        "kind_params": params,
        "count": n,
        "normalized": True,
        "encoder_name": "enc",
        "encoder_fingerprint": None,
        "chunking": None,
        "next_row_id": n,
        "deleted_row_ids": [],
        "faiss_version": faiss.__version__,
        "files": files,
        "retriever": {"retrieval": "dense", "bm25": False},
    }
    (folder / INDEX_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def _verify_script():
    spec = importlib.util.spec_from_file_location("verify_index", ROOT / "scripts" / "verify_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_format_1_loads_with_the_conversion_command_and_converts(tmp_path, caplog, capsys, kind):
    x = vectors(200)
    passages = [{**p, "lang": "fr"} for p in plain_passages(200)]
    folder = tmp_path / "old"
    write_format_1(folder, x, passages, kind)
    q = x[:5] + 0.01
    with caplog.at_level(logging.WARNING):
        old = PassageIndex.load(folder, mmap=True)
    assert f"python scripts/verify_index.py {folder} --convert" in caplog.text
    before = old.search(q, 5)
    np.testing.assert_array_equal(old.get_embeddings([4, 7]), x[[4, 7]])  # IVF gets its direct map on load
    assert old.get_passages([3])[0] == {**passages[3], "row_id": 3}

    assert _verify_script()([str(folder), "--convert"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"] is True
    assert sorted(os.listdir(folder)) == sorted([FAISS_INDEX_NAME, INDEX_CONFIG_NAME, PASSAGES_NAME])
    assert json.loads((folder / INDEX_CONFIG_NAME).read_text())["format_version"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new = PassageIndex.load(folder, mmap=True)
    assert "verify_index.py" not in caplog.text
    np.testing.assert_array_equal(new.search(q, 5)[1], before[1])
    assert new.get_passages([3]) == old.get_passages([3])
    assert new.config["retriever"]["retrieval"] == "dense" and new.config["retriever"]["bm25"] is False


def test_verify_script_hashes_every_time_and_names_the_damaged_file(tmp_path, capsys, counted_hashes):
    folder = tmp_path / "ix"
    PassageIndex.build(vectors(30), plain_passages(30), kind="flat").save(folder)
    PassageIndex.load(folder)  # stamped
    counted_hashes.clear()
    assert _verify_script()([str(folder)]) == 0
    assert PASSAGES_NAME in counted_hashes  # forced, although the stamp holds
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 30 and report["format_version"] == 2
    path = folder / FAISS_INDEX_NAME
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert _verify_script()([str(folder)]) == 1
    assert f"{FAISS_INDEX_NAME} in {folder} fails its sha256" in capsys.readouterr().err

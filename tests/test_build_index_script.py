"""scripts/build_index.py: one process, two processes (accelerate + gloo), and error reporting."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from modeling_rag.index import PassageIndex
from modeling_rag.retrieval_rag import RagRetriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "build_index.py")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tiny_tokenizer, tiny_question_encoder):
    folder = tmp_path_factory.mktemp("encoder")
    tiny_question_encoder.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    rows = [
        json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": " ".join(f"word{j}" for j in range(i * 7 % 40 + 3))})
        for i in range(13)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def _main():
    spec = importlib.util.spec_from_file_location("build_index_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _env():
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _args(corpus, encoder, output):
    return ["--corpus", str(corpus), "--encoder", str(encoder), "--output", str(output), "--max-tokens", "20",
            "--overlap", "5", "--kind", "flat", "--batch-size", "4", "--cpu"]  # fmt: skip


def test_single_process_build(tmp_path, corpus_file, encoder_dir, capsys):
    out = tmp_path / "index"
    assert _main()(_args(corpus_file, encoder_dir, out)) == 0
    assert "Saved" in capsys.readouterr().out
    retriever = RagRetriever.load(out)
    assert retriever.bm25 is not None and retriever.n_passages >= 13
    assert retriever.index.encoder_name == encoder_dir.name  # the folder by name, not its path on this machine


def test_build_stores_passage_tokens_of_the_generator_tokenizer(tmp_path, corpus_file, encoder_dir, tiny_tokenizer):
    out = tmp_path / "index"
    assert _main()([*_args(corpus_file, encoder_dir, out), "--generator-tokenizer", str(encoder_dir)]) == 0
    retriever = RagRetriever.load(out)
    tokens = retriever.passage_tokens
    assert tokens is not None and tokens.matches(tiny_tokenizer)
    assert tokens.row_ids.tolist() == retriever.index.row_ids.tolist()
    passage = retriever.index.get_passages(retriever.index.row_ids[:1])[0]
    assert tokens.lookup([passage["row_id"]]) == [
        tiny_tokenizer(passage["text"], add_special_tokens=False)["input_ids"]
    ]
    without = tmp_path / "plain"
    assert _main()(_args(corpus_file, encoder_dir, without)) == 0
    assert RagRetriever.load(without).passage_tokens is None


def test_script_reports_bad_corpus(tmp_path, encoder_dir, capsys):
    assert _main()(_args(tmp_path / "missing.jsonl", encoder_dir, tmp_path / "ix")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


@pytest.mark.multiprocess
def test_two_process_build_matches_one_process(tmp_path, corpus_file, encoder_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run(
        [sys.executable, SCRIPT, *_args(corpus_file, encoder_dir, one)], capture_output=True, text=True, env=_env()
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0", SCRIPT]  # fmt: skip
    r2 = subprocess.run(
        [*launch, *_args(corpus_file, encoder_dir, two)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "from 2 process(es)" in r2.stdout
    a, b = PassageIndex.load(one), PassageIndex.load(two)
    assert a.count == b.count and a.encoder_fingerprint == b.encoder_fingerprint
    assert a.get_passages(a.row_ids) == b.get_passages(b.row_ids)
    np.testing.assert_allclose(a.get_embeddings(a.row_ids), b.get_embeddings(b.row_ids), atol=1e-5)
    q = a.get_embeddings(a.row_ids[:4]) + 0.01
    np.testing.assert_array_equal(a.search(q, 3)[1], b.search(q, 3)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_build_resumes_from_its_finished_shards(tmp_path, corpus_file, encoder_dir, monkeypatch):
    import signal

    import modeling_rag.encoders as encoders

    args = ["--shard-size", "3"]
    clean = tmp_path / "clean"
    assert _main()([*_args(corpus_file, encoder_dir, clean), *args]) == 0
    assert not os.path.exists(f"{clean}.build")  # the work folder goes once the index is saved
    n_shards = -(-PassageIndex.load(clean).count // 3)
    assert n_shards >= 4

    out = tmp_path / "index"
    # a fresh process (not a fork of this one, whose thread pools a forked child can deadlock on) that
    # SIGKILLs itself at its 3rd shard write: shards 0 and 1 are finished
    child = (
        "import os, signal, sys\n"
        "import modeling_rag.encoders as encoders\n"
        "real, count = encoders.atomic_write_bytes, [0]\n"
        "def write(*a, **k):\n"
        "    count[0] += 1\n"
        "    if count[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "encoders.atomic_write_bytes = write\n"
        "import runpy\n"
        f"sys.argv = [{SCRIPT!r}, *{[*_args(corpus_file, encoder_dir, out), *args]!r}]\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    work = f"{out}.build"
    assert sorted(n for n in os.listdir(work) if n.endswith(".npy")) == ["shard_00000.npy", "shard_00001.npy"]
    assert not out.exists()
    with open(os.path.join(work, "shard_00001.npy"), "r+b") as f:  # damage a finished shard: it is redone
        f.truncate(40)

    real_encode, encoded = encoders.encode_texts, []
    monkeypatch.setattr(
        encoders, "encode_texts", lambda texts, *a, **k: encoded.append(len(texts)) or real_encode(texts, *a, **k)
    )
    assert _main()([*_args(corpus_file, encoder_dir, out), *args]) == 0
    assert len(encoded) == n_shards - 1  # every shard but the intact one
    assert not os.path.exists(work)
    a, b = PassageIndex.load(clean), PassageIndex.load(out)
    assert a.get_passages(a.row_ids) == b.get_passages(b.row_ids)
    np.testing.assert_array_equal(a.get_embeddings(a.row_ids), b.get_embeddings(b.row_ids))


def test_work_dir_of_another_corpus_is_not_reused(tmp_path, corpus_file, encoder_dir):
    from transformers import AutoModel, AutoTokenizer

    from modeling_rag.encoders import encode_texts_resumable

    tok, enc = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir)
    work = str(tmp_path / "work")
    first = encode_texts_resumable(["alpha beta", "gamma"], enc, tok, work, shard_size=1)
    (tmp_path / "work" / "mine.txt").write_text("user file")
    second = encode_texts_resumable(["gamma", "alpha beta"], enc, tok, work, shard_size=1)  # other texts, same count
    np.testing.assert_allclose(second, first[::-1], atol=1e-6)
    from modeling_rag.encoders import clear_shard_dir

    clear_shard_dir(work)
    assert os.listdir(work) == ["mine.txt"]  # only our files are removed


def test_sharded_build_matches_the_unsharded_index(tmp_path, corpus_file, encoder_dir, capsys):
    from modeling_rag.index.sharded import ShardedPassageIndex

    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    assert _main()([*_args(corpus_file, encoder_dir, plain), "--no-bm25"]) == 0
    assert _main()([*_args(corpus_file, encoder_dir, sharded), "--num-shards", "3"]) == 0
    assert "in 3 shards" in capsys.readouterr().out
    a, b = PassageIndex.load(plain), RagRetriever.load(sharded).index
    assert isinstance(b, ShardedPassageIndex) and b.num_shards == 3 and b.count == a.count
    assert a.encoder_fingerprint == b.encoder_fingerprint and b.config["encoding"]["pooling"] == "mean"
    assert a.get_passages(a.row_ids) == b.get_passages(b.row_ids)
    q = a.get_embeddings(a.row_ids[:5]) + 0.01
    np.testing.assert_array_equal(a.search(q, 4)[1], b.search(q, 4)[1])
    # run again into the same folder: the finished shards are kept, not re-encoded
    stamp = os.stat(sharded / "shard-00001" / "index.faiss").st_mtime_ns
    assert _main()([*_args(corpus_file, encoder_dir, sharded), "--num-shards", "3"]) == 0
    assert os.stat(sharded / "shard-00001" / "index.faiss").st_mtime_ns == stamp
    assert (
        _main()([*_args(corpus_file, encoder_dir, tmp_path / "x"), "--num-shards", "2", "--retrieval", "hybrid"]) == 1
    )
    assert "dense index only" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_process_sharded_build(tmp_path, corpus_file, encoder_dir):
    from modeling_rag.index.sharded import ShardedPassageIndex

    one, two = tmp_path / "one", tmp_path / "two"
    assert _main()([*_args(corpus_file, encoder_dir, one), "--num-shards", "3"]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0", SCRIPT]  # fmt: skip
    r = subprocess.run(
        [*launch, *_args(corpus_file, encoder_dir, two), "--num-shards", "3"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in 3 shards" in r.stdout and "from 2 process(es)" in r.stdout
    a, b = ShardedPassageIndex.open(one), ShardedPassageIndex.open(two)
    assert a.get_passages(a.row_ids) == b.get_passages(b.row_ids)
    np.testing.assert_allclose(a.get_embeddings(a.row_ids), b.get_embeddings(b.row_ids), atol=1e-5)

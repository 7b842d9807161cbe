"""Retrieval across 2 gloo processes (modeling_rag/retrieval_distributed.py): exactly the 1-process results."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from modeling_rag.index.sharded import ShardedPassageIndex
from modeling_rag.index.sharded_build import build_sharded_index
from modeling_rag.retrieval_rag import RagRetriever

N, DIM, K = 88, 12, 7  # 4 shards of 22 rows
# per rank, per call: how many questions (unequal, and one rank with none)
BATCHES = [[3, 5, 0], [4, 0, 0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queries(rank: int, call: int, n: int) -> np.ndarray:
    return np.random.default_rng(100 + 10 * rank + call).standard_normal((n, DIM)).astype(np.float32)


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    from modeling_rag.errors import IndexMismatchError, RagInputError
    from modeling_rag.retrieval_distributed import DistributedShardedIndex

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        index = DistributedShardedIndex.open(folder)
        retriever = RagRetriever(index)
        result = {"shards": index.shard_ids, "local_count": index.local_count, "calls": []}
        for call, n in enumerate(BATCHES[rank]):
            r = retriever.retrieve(_queries(rank, call, n), K)
            result["calls"].append(
                {
                    "ids": r.row_ids.tolist(),
                    "scores": r.doc_scores.tolist(),
                    "emb": r.doc_embeddings.tolist(),
                    "passages": r.passages,
                }
            )
        # a rank with bad vectors fails, and the other is told instead of waiting forever
        bad = np.zeros((1, DIM + 1), np.float32) if rank == 1 else _queries(rank, 9, 2)
        try:
            index.search(bad, K)
        except (RagInputError, IndexMismatchError) as exc:
            result["bad_call"] = type(exc).__name__
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    passages = [{"id": f"p{i}", "title": f"T{i}", "text": f"passage {i}"} for i in range(N)]
    path = tmp_path_factory.mktemp("dist") / "index"
    build_sharded_index(path, vectors, passages, 4, kind="flat")
    return path


@pytest.mark.multiprocess
def test_two_gloo_processes_give_the_one_process_results(folder, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, start_method="spawn")
    single = RagRetriever(ShardedPassageIndex.open(folder))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["shards"] == [rank, rank + 2]  # rank r holds shards r, r + world
        assert got["local_count"] == N // 2  # each holds half the rows
        assert got["bad_call"] == ("IndexMismatchError" if rank == 1 else "RagInputError")
        for call, n in enumerate(BATCHES[rank]):
            want = single.retrieve(_queries(rank, call, n), K)
            c = got["calls"][call]
            assert np.asarray(c["ids"]).reshape(n, K).tolist() == want.row_ids.tolist()
            np.testing.assert_allclose(np.asarray(c["scores"]).reshape(n, K), want.doc_scores, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(
                np.asarray(c["emb"], dtype=np.float32).reshape(n, K, DIM), want.doc_embeddings
            )
            assert c["passages"] == want.passages
        held = set(ShardedPassageIndex.open(folder, shards=got["shards"]).row_ids.tolist())
        returned = {p["row_id"] for c in got["calls"] for q in c["passages"] for p in q}
        if returned:  # some of its passages came from the other rank's shards
            assert returned - held


def test_needs_a_process_group(folder):
    from modeling_rag.errors import RagConfigError
    from modeling_rag.retrieval_distributed import DistributedShardedIndex

    with pytest.raises(RagConfigError, match="process group"):
        DistributedShardedIndex.open(folder)

"""The Ray backend (modeling_rag/retrieval_ray.py) on a 2-node local cluster started here (never local_mode)."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from modeling_rag.errors import RagInputError, ShardUnavailableError  # noqa: E402
from modeling_rag.index.sharded import ShardedPassageIndex  # noqa: E402
from modeling_rag.index.sharded_build import build_sharded_index  # noqa: E402
from modeling_rag.retrieval_rag import RagRetriever  # noqa: E402
from modeling_rag.retrieval_ray import RayShardedIndex  # noqa: E402

N = 40
QUESTION = "what is the policy?"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_rag

    return make_tiny_rag()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    """Two shards of passages encoded by the tiny model's passage encoder (so the model can answer from them)."""
    from modeling_rag.encoders import encode_texts, weights_fingerprint

    passages = [{"id": f"p{i}", "title": f"T{i}", "text": f"word{i} word{i + 1} policy {i}"} for i in range(N)]
    vectors = encode_texts([p["text"] for p in passages], model.passage_encoder, model.tokenizer.question_encoder)
    path = tmp_path_factory.mktemp("ray") / "index"
    build_sharded_index(
        path, vectors, passages, 2, kind="flat", encoder_fingerprint=weights_fingerprint(model.passage_encoder)
    )
    return path


@pytest.fixture(scope="module")
def served(cluster, folder):
    index = RayShardedIndex(folder, num_cpus=0.5, timeout_s=60)
    yield index
    index.shutdown()


def test_actors_spread_over_both_nodes_and_answer_as_the_local_index(served, folder):
    assert served.groups == [[0], [1]] and [i["count"] for i in served.actor_infos] == [N // 2, N // 2]
    assert len({i["node_id"] for i in served.actor_infos}) == 2  # one actor per node
    local = RagRetriever(ShardedPassageIndex.open(folder))
    remote = RagRetriever(served)
    q = np.random.default_rng(1).standard_normal((5, served.dim)).astype(np.float32)
    a, b = remote.retrieve(q, 8), local.retrieve(q, 8)
    np.testing.assert_array_equal(a.row_ids, b.row_ids)
    np.testing.assert_array_equal(a.doc_scores, b.doc_scores)
    np.testing.assert_array_equal(a.doc_embeddings, b.doc_embeddings)
    assert a.passages == b.passages
    assert {p["row_id"] for row in a.passages for p in row} & set(range(N // 2, N))  # both actors contributed
    with pytest.raises(RagInputError, match="Unknown row id"):
        served.get_passages([N])


def test_model_answers_unchanged_through_ray(served, folder, model):
    model.set_retriever(RagRetriever(ShardedPassageIndex.open(folder)))
    (local,) = model.answer(QUESTION, n_docs=3)
    model.set_retriever(RagRetriever(served))
    (remote,) = model.answer(QUESTION, n_docs=3)
    assert [s.id for s in remote.sources] == [s.id for s in local.sources]
    assert [s.score for s in remote.sources] == [s.score for s in local.sources]
    assert remote.answer == local.answer


def test_a_killed_actor_is_restarted_and_asked_again(served, folder):
    q = np.random.default_rng(2).standard_normal((3, served.dim)).astype(np.float32)
    want = ShardedPassageIndex.open(folder).search(q, 6)
    ray.kill(served.actors[1], no_restart=True)
    got = served.search(q, 6)
    np.testing.assert_array_equal(got[1], want[1])
    assert served.get_passages(got[1][:, 0])[0]["id"] == f"p{want[1][0, 0]}"


def test_a_dead_actor_without_restarts_names_its_shard(served):
    served.max_restarts = 0
    try:
        ray.kill(served.actors[0], no_restart=True)
        with pytest.raises(ShardUnavailableError, match=r"Shard\(s\) \[0\] .*died") as err:
            served.search(np.zeros((1, served.dim), np.float32), 3)
        assert err.value.shard == 0
    finally:
        served.max_restarts = 1
    assert served.search(np.zeros((1, served.dim), np.float32), 3)[1].shape == (1, 3)  # restarted on the next call

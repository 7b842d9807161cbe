"""The whole model through the (local) Hub: weights, tokenizers, index and card in one repo."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag
from huggingface_hub import ModelCard

from modeling_rag import HubError, IndexIntegrityError, RagForGeneration
from modeling_rag.hub_utils import push_folder_to_hub

QUESTIONS = ["Who was the Norse leader?", "What is the capital of Italy?"]


def _repo(prefix: str) -> str:
    return f"test-org/{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def indexed_model(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", "rag_token", n_docs=2)
    model.build_index(str(corpus), show_progress=False)
    return model


def _answers(model):
    return [(a.answer, [s.id for s in a.sources]) for a in model.answer(QUESTIONS, max_new_tokens=4)]


def test_push_then_load_in_a_fresh_cache_answers_the_same(indexed_model, hub_token, fresh_hf_cache):
    repo = _repo("rag")
    url = indexed_model.push_to_hub(
        repo,
        token=hub_token,
        eval_results=[
            {
                "task_type": "question-answering",
                "dataset_name": "tiny",
                "dataset_type": "tiny",
                "metric_type": "f1",
                "metric_value": 12.5,
            }
        ],
    )
    assert repo in str(url)
    loaded = RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache).eval()
    assert loaded.retriever is not None and loaded.retriever.n_passages == len(TINY_PASSAGES)
    tokens = loaded.retriever.passage_tokens  # the passage token ids travel with the index
    assert tokens is not None and tokens.matches(loaded.tokenizer.generator)
    assert tokens.row_ids.tolist() == loaded.retriever.index.row_ids.tolist()
    assert _answers(loaded) == _answers(indexed_model)
    card_path = next(p for p in __import__("pathlib").Path(fresh_hf_cache).rglob("README.md"))
    card = ModelCard.load(card_path)
    results = card.data.to_dict()["model-index"][0]["results"]
    assert any(m["type"] == "f1" and m["value"] == 12.5 for r in results for m in r["metrics"])


def test_pin_an_older_revision(indexed_model, hub_token, fresh_hf_cache):
    from huggingface_hub import HfApi

    repo = _repo("rag-rev")
    indexed_model.push_to_hub(repo, token=hub_token)
    first = HfApi().model_info(repo).sha
    before = {k: v.clone() for k, v in indexed_model.state_dict().items()}
    with torch.no_grad():
        for p in indexed_model.generator.parameters():
            p.add_(0.5)
    indexed_model.config.n_docs = 1
    indexed_model.push_to_hub(repo, token=hub_token)
    old = RagForGeneration.from_pretrained(repo, revision=first, cache_dir=fresh_hf_cache)
    new = RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache)
    assert old.config.n_docs == 2 and new.config.n_docs == 1
    for name, tensor in old.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not torch.equal(new.generator.lm_head.weight, before["generator.lm_head.weight"])


def test_index_in_its_own_dataset_repo(indexed_model, hub_token, tmp_path, fresh_hf_cache):
    index_repo = _repo("shared-index")
    indexed_model.retriever.save(tmp_path / "index")
    push_folder_to_hub(tmp_path / "index", index_repo, token=hub_token, repo_type="dataset")
    from huggingface_hub import HfApi

    index_rev = HfApi().dataset_info(index_repo).sha
    model_repo = _repo("rag-ext-index")
    expected = _answers(indexed_model)
    indexed_model.config.index_repo_id = index_repo
    indexed_model.config.index_revision = index_rev
    indexed_model.push_to_hub(model_repo, token=hub_token)
    loaded = RagForGeneration.from_pretrained(model_repo, cache_dir=fresh_hf_cache)
    assert loaded.retriever is not None
    assert _answers(loaded) == expected


def test_offline_after_one_download(indexed_model, hub_token, fresh_hf_cache, hub_server):
    repo = _repo("rag-offline")
    indexed_model.push_to_hub(repo, token=hub_token)
    RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache)
    served = len(hub_server.requests)
    loaded = RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache, local_files_only=True)
    assert len(hub_server.requests) == served
    assert _answers(loaded) == _answers(indexed_model)


def test_errors_name_repo_and_revision(hub_server, fresh_hf_cache):
    with pytest.raises(HubError, match="test-org/does-not-exist"):
        RagForGeneration.from_pretrained("test-org/does-not-exist", cache_dir=fresh_hf_cache)


def test_corrupted_index_download_is_refused(indexed_model, hub_token, hub_server, fresh_hf_cache):
    repo = _repo("rag-corrupt")
    indexed_model.push_to_hub(repo, token=hub_token)
    hub_server.corrupt_file(repo, "index/passages.arrow")
    with pytest.raises(IndexIntegrityError, match="passages.arrow"):
        RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache)


def test_push_script_publishes_a_saved_folder(indexed_model, hub_token, tmp_path, fresh_hf_cache, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("push", Path(__file__).parents[1] / "scripts" / "push_to_hub.py")
    push = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(push)
    indexed_model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "README.md").write_text("# My model\n\nNotes I wrote myself.\n")
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            [
                {
                    "task_type": "question-answering",
                    "dataset_name": "tiny",
                    "dataset_type": "tiny",
                    "metric_type": "exact_match",
                    "metric_value": 50.0,
                }
            ]
        )
    )
    repo = _repo("rag-script")
    assert push.main([str(tmp_path / "saved"), repo, "--token", hub_token, "--eval-results", str(results)]) == 0
    assert repo in capsys.readouterr().out
    # the local folder is untouched; the pushed card keeps the user's text and has the results
    assert (tmp_path / "saved" / "README.md").read_text() == "# My model\n\nNotes I wrote myself.\n"
    loaded = RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache)
    assert _answers(loaded) == _answers(indexed_model)
    card_text = next(Path(fresh_hf_cache).rglob("README.md")).read_text()
    assert "Notes I wrote myself." in card_text
    card = ModelCard(card_text)
    metrics = [m for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"]]
    assert any(m["type"] == "exact_match" and m["value"] == 50.0 for m in metrics)
    assert push.main([str(tmp_path / "nope"), repo, "--token", hub_token]) == 1
    assert "not a folder" in capsys.readouterr().err

"""CrossEncoderReranker: reordering by the cross-encoder, save/load, the model's reranker stage, bad inputs."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    TINY_PASSAGES,
    build_tiny_tokenizer,
    tiny_cross_encoder,
    tiny_question_encoder_config,
    tiny_rag_with_reranker,
)

from modeling_rag.constants import RERANKER_DIR
from modeling_rag.errors import RagConfigError, RagInputError
from modeling_rag.reranker import CrossEncoderReranker, RerankerSpeedOptions, SegmentCosineScorer
from modeling_rag.retrieval_rag import RetrievalOutput

QUESTION = "What is the capital of France?"


def single_pair_logit(model, tok, question, passage, max_length=64):
    """One pair, built and scored on its own (no batching, no padding, no cache)."""
    q = tok(question, add_special_tokens=False)["input_ids"]
    text = f"{passage['title']}\n{passage['text']}"
    p = tok(text, add_special_tokens=False)["input_ids"][: max_length - len(q) - 3]
    ids = [tok.cls_token_id, *q, tok.sep_token_id, *p, tok.sep_token_id]
    types = [0] * (len(q) + 2) + [1] * (len(p) + 1)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]))
    return float(out.logits[0, 0])


def candidates(order):
    passages = [dict(TINY_PASSAGES[i], row_id=i) for i in order]
    return RetrievalOutput(
        row_ids=np.array([order], dtype=np.int64),
        doc_scores=np.linspace(1.0, 0.0, len(order), dtype=np.float32)[None],
        doc_embeddings=np.arange(len(order) * 3, dtype=np.float32).reshape(1, len(order), 3),
        passages=[passages],
    )


def test_rerank_orders_by_the_cross_encoders_scores(reranker):
    logits = [single_pair_logit(reranker.model, reranker.tokenizer, QUESTION, p) for p in TINY_PASSAGES]
    best_first = list(np.argsort(logits)[::-1])
    first_stage = best_first[::-1]  # the first stage has them worst first
    out = reranker.rerank([QUESTION], candidates(first_stage), n_docs=4)
    assert out.row_ids[0].tolist() == best_first[:4]
    np.testing.assert_allclose(out.doc_scores[0], 1 / (1 + np.exp(-np.sort(logits)[::-1][:4])), rtol=1e-4)
    assert [p["row_id"] for p in out.passages[0]] == best_first[:4]
    # the stored vectors follow their passages
    position = {rid: j for j, rid in enumerate(first_stage)}
    expected = candidates(first_stage).doc_embeddings[0][[position[r] for r in best_first[:4]]]
    np.testing.assert_array_equal(out.doc_embeddings[0], expected)


def test_batching_and_the_token_cache_do_not_change_scores(reranker):
    plists = [TINY_PASSAGES, TINY_PASSAGES[:3]]
    first = reranker.score([QUESTION, "Who was Rollo?"], plists)
    assert len(reranker._cache) == len(TINY_PASSAGES)  # each passage tokenised once
    reranker.speed = RerankerSpeedOptions(batch_size=1, int8=False)
    again = reranker.score([QUESTION, "Who was Rollo?"], plists)
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    alone = [single_pair_logit(reranker.model, reranker.tokenizer, "Who was Rollo?", p) for p in TINY_PASSAGES[:3]]
    np.testing.assert_allclose(first[1], 1 / (1 + np.exp(-np.array(alone))), rtol=1e-4)


def adapter_reranker(tmp_path, head="sequence_classification"):
    """A LoRA reranker over a tiny saved base, its adapter (and head) moved off the identity as training would."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    tok = build_tiny_tokenizer()
    base_dir = tmp_path / "base"
    tiny_cross_encoder(tok, seed=1).save_pretrained(base_dir)
    lora = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
    if head == "segment_cosine":
        trained = SegmentCosineScorer(get_peft_model(AutoModel.from_pretrained(base_dir), LoraConfig(**lora)))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        trained = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, **lora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.normal_(0, 0.5)  # a trained adapter: not the identity
            if name in ("scale", "bias"):
                p.add_(1.5)
    return CrossEncoderReranker.from_peft_model(trained.eval(), tok, base_model=str(base_dir), max_length=64)


@pytest.mark.parametrize("head", ["sequence_classification", "segment_cosine"])
def test_adapter_save_load_gives_the_same_order(tmp_path, head):
    reranker = adapter_reranker(tmp_path, head)
    before = reranker.score([QUESTION], [TINY_PASSAGES])[0]
    reranker.save(tmp_path / "rr")
    files = set(os.listdir(tmp_path / "rr"))
    assert {"adapter_config.json", "adapter_model.safetensors", "reranker_config.json"} <= files
    assert "model.safetensors" not in files  # an adapter, never a copy of the base
    assert ("head.safetensors" in files) == (head == "segment_cosine")
    assert json.loads((tmp_path / "rr" / "reranker_config.json").read_text())["head"] == head
    loaded = CrossEncoderReranker.load(tmp_path / "rr")
    assert isinstance(loaded.model, SegmentCosineScorer) == (head == "segment_cosine")
    after = loaded.score([QUESTION], [TINY_PASSAGES])[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    assert np.argsort(-after).tolist() == np.argsort(-before).tolist()
    assert not np.allclose(before, before[0])  # a real ordering, not ties


def test_segment_cosine_logit_is_the_scaled_cosine_of_the_segment_means():
    from transformers import BertModel

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    encoder = BertModel(tiny_question_encoder_config(tok), add_pooling_layer=False).eval()
    scorer = SegmentCosineScorer(encoder, scale=7.0, bias=-2.0).eval()
    reranker = CrossEncoderReranker(scorer, tok, max_length=64, speed=RerankerSpeedOptions(batch_size=3, int8=False))
    scores = reranker.score([QUESTION], [TINY_PASSAGES])[0]
    expected = []
    for ids, types in reranker.pair_ids(QUESTION, TINY_PASSAGES):
        with torch.no_grad():
            h = encoder(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).last_hidden_state[0]
        t = torch.tensor(types)
        cos = torch.nn.functional.cosine_similarity(h[t == 0].mean(0), h[t == 1].mean(0), dim=0)
        expected.append(torch.sigmoid(7.0 * cos - 2.0).item())
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)  # padding in a batch changes nothing
    with pytest.raises(RagInputError, match="token_type_ids"):
        scorer(input_ids=torch.tensor([[1, 2, 3]]))


def test_a_broken_cosine_head_is_refused_at_load(tmp_path):
    reranker = adapter_reranker(tmp_path, "segment_cosine")
    reranker.save(tmp_path / "rr")
    (tmp_path / "rr" / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RagConfigError, match="head.safetensors"):
        CrossEncoderReranker.load(tmp_path / "rr")
    os.remove(tmp_path / "rr" / "head.safetensors")
    with pytest.raises(RagConfigError, match="no head.safetensors"):
        CrossEncoderReranker.load(tmp_path / "rr")
    config = json.loads((tmp_path / "rr" / "reranker_config.json").read_text())
    (tmp_path / "rr" / "reranker_config.json").write_text(json.dumps(dict(config, head="max_sim")))
    with pytest.raises(RagConfigError, match="head must be one of"):
        CrossEncoderReranker.load(tmp_path / "rr")


def test_whole_model_save_load(reranker, tmp_path):
    reranker.save(tmp_path / "rr")
    loaded = CrossEncoderReranker.load(tmp_path / "rr", speed=RerankerSpeedOptions(int8=False))
    np.testing.assert_allclose(
        loaded.score([QUESTION], [TINY_PASSAGES])[0], reranker.score([QUESTION], [TINY_PASSAGES])[0], rtol=1e-5
    )


def test_model_retrieve_reranks_the_first_stage_candidates(tmp_path, reranker):
    model = tiny_rag_with_reranker(tmp_path)
    first = model.retrieve([QUESTION], n_docs=4)
    model.set_reranker(reranker)
    assert model.config.reranker == RERANKER_DIR
    out = model.retrieve([QUESTION])
    scores = reranker.score([QUESTION], first.passages)[0]
    assert out.row_ids[0].tolist() == first.row_ids[0][np.argsort(-scores, kind="stable")[:2]].tolist()
    answers = model.answer([QUESTION], max_new_tokens=2)
    assert [s.id for s in answers[0].sources] == [p["id"] for p in out.passages[0]]


def test_model_save_load_keeps_the_reranker_and_its_order(tmp_path):
    model = tiny_rag_with_reranker(tmp_path)
    model.set_reranker(adapter_reranker(tmp_path))
    before = model.retrieve([QUESTION, "Who was Rollo?"])
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["reranker"] == RERANKER_DIR and os.path.isdir(tmp_path / "saved" / RERANKER_DIR)
    assert "reranker" not in " ".join(config.get("architectures") or [])
    from modeling_rag import RagForGeneration

    loaded = RagForGeneration.from_pretrained(tmp_path / "saved")
    assert loaded.reranker is not None
    after = loaded.retrieve([QUESTION, "Who was Rollo?"])
    assert after.row_ids.tolist() == before.row_ids.tolist()
    np.testing.assert_allclose(after.doc_scores, before.doc_scores, rtol=1e-4)


def test_a_saved_model_missing_its_reranker_is_refused_at_load(tmp_path, reranker):
    import shutil

    model = tiny_rag_with_reranker(tmp_path)
    model.set_reranker(reranker)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / RERANKER_DIR)
    from modeling_rag import RagForGeneration

    with pytest.raises(RagConfigError, match="config.reranker"):
        RagForGeneration.from_pretrained(tmp_path / "saved")


# --- bad inputs ------------------------------------------------------------------------------------
def test_reranker_without_tokenizer(tmp_path, reranker):
    with pytest.raises(RagInputError, match="no tokenizer"):
        CrossEncoderReranker(reranker.model, None)
    reranker.save(tmp_path / "rr")
    for name in os.listdir(tmp_path / "rr"):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(tmp_path / "rr" / name)
    with pytest.raises(RagConfigError, match="no tokenizer files"):
        CrossEncoderReranker.load(tmp_path / "rr")


def test_tokenizer_without_pair_tokens(reranker):
    tok = build_tiny_tokenizer()
    tok.cls_token = None
    with pytest.raises(RagConfigError, match="cls_token_id"):
        CrossEncoderReranker(reranker.model, tok)


def test_model_with_several_labels_is_refused():
    tok = build_tiny_tokenizer()
    from transformers import BertForSequenceClassification

    config = tiny_question_encoder_config(tok)
    config.num_labels = 2
    with pytest.raises(RagConfigError, match="num_labels=1"):
        CrossEncoderReranker(BertForSequenceClassification(config), tok)


def test_n_candidates_below_n_docs(tmp_path, reranker):
    from modeling_rag import RagConfig

    with pytest.raises(RagConfigError, match="n_candidates"):
        RagConfig(n_docs=5, n_candidates=3, reranker="reranker")
    with pytest.raises(RagConfigError, match="reranker must stay inside"):
        RagConfig(reranker="../elsewhere")
    model = tiny_rag_with_reranker(tmp_path)
    model.config.n_candidates = 1
    with pytest.raises(RagConfigError, match="n_candidates"):
        model.set_reranker(reranker)
    model.config.n_candidates = 4
    model.set_reranker(reranker)
    with pytest.raises(RagInputError, match="n_candidates"):
        model.retrieve([QUESTION], n_docs=5)


def test_broken_reranker_folders(tmp_path, reranker):
    with pytest.raises(RagConfigError, match="not a saved reranker"):
        CrossEncoderReranker.load(tmp_path)
    reranker.save(tmp_path / "rr")
    (tmp_path / "rr" / "reranker_config.json").write_text('{"format_version": 99}')
    with pytest.raises(RagConfigError, match="format_version"):
        CrossEncoderReranker.load(tmp_path / "rr")


@pytest.mark.parametrize("head", ["sequence_classification", "segment_cosine"])
def test_the_reranker_travels_over_the_hub(tmp_path, hub_token, fresh_hf_cache, head):
    import uuid

    from modeling_rag import RagForGeneration

    model = tiny_rag_with_reranker(tmp_path)
    model.set_reranker(adapter_reranker(tmp_path, head))
    before = model.retrieve([QUESTION, "Who was Rollo?"])
    repo = f"test-org/rerank-{uuid.uuid4().hex[:8]}"
    model.push_to_hub(repo, token=hub_token)
    loaded = RagForGeneration.from_pretrained(repo, cache_dir=fresh_hf_cache)
    assert loaded.reranker is not None and loaded.reranker.adapter_files is not None
    after = loaded.retrieve([QUESTION, "Who was Rollo?"])
    assert after.row_ids.tolist() == before.row_ids.tolist()
    np.testing.assert_allclose(after.doc_scores, before.doc_scores, rtol=1e-4)


def test_int8_scoring_stays_close_and_leaves_the_float_model(tmp_path):
    reranker = adapter_reranker(tmp_path, "segment_cosine")
    reranker.speed = RerankerSpeedOptions(int8=False)
    fast = CrossEncoderReranker(
        reranker.model, reranker.tokenizer, max_length=64, speed=RerankerSpeedOptions(int8=True)
    )
    pairs = fast.pair_ids(QUESTION, TINY_PASSAGES)
    with torch.no_grad():
        exact, approx = reranker.logits(pairs).numpy(), fast.logits(pairs).numpy()
    assert fast._int8 is not None and fast._int8[1] is not reranker.model  # a quantised copy scored
    assert np.ptp(exact) > 1.0  # logits that differ, so closeness means something
    np.testing.assert_allclose(approx, exact, atol=0.25 * np.ptp(exact))
    assert not np.array_equal(approx, exact)
    linears = [m for m in reranker.model.modules() if type(m) is torch.nn.Linear]
    assert linears  # the float model is left as it was
    fast.model.train()  # training scores with the float model, with gradients
    assert fast.logits(pairs).requires_grad
    fast.model.eval()
    with pytest.raises(RagConfigError, match="int8"):
        RerankerSpeedOptions(int8="yes")


def test_first_stage_weight_blends_the_two_orders(tmp_path):
    from modeling_rag import RagConfig

    reranker = adapter_reranker(tmp_path, "segment_cosine")
    logits = reranker.score_logits([QUESTION], [TINY_PASSAGES])[0].astype(np.float64)
    first_stage = list(np.argsort(logits))  # the first stage has them worst first
    retrieved = candidates(first_stage)
    first_scores = retrieved.doc_scores[0].astype(np.float64)
    n = len(first_stage)
    alone = reranker.rerank([QUESTION], retrieved, n_docs=n)
    assert alone.row_ids[0].tolist() == first_stage[::-1]
    assert reranker.rerank([QUESTION], retrieved, n_docs=n, first_stage_weight=1e6).row_ids[0].tolist() == first_stage
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    by_position = z(logits[first_stage]) + 1.0 * z(first_scores)
    blended = reranker.rerank([QUESTION], retrieved, n_docs=n, first_stage_weight=1.0)
    assert blended.row_ids[0].tolist() == [first_stage[j] for j in np.argsort(-by_position, kind="stable")]
    # the scores stay the reranker's relevance, whatever the order
    np.testing.assert_allclose(blended.doc_scores[0], 1 / (1 + np.exp(-logits[blended.row_ids[0]])), rtol=1e-4)
    for bad in (-0.5, "1", True):
        with pytest.raises(RagConfigError, match="rerank_first_stage_weight"):
            RagConfig(rerank_first_stage_weight=bad)


def test_building_from_checkpoints_attaches_a_reranker_with_its_settings(tmp_path, monkeypatch):
    from conftest import tiny_generator_config
    from transformers import AutoModelForCausalLM, BertModel

    from modeling_rag import RagForGeneration
    from modeling_rag import reranker as reranker_module

    tok = build_tiny_tokenizer()
    BertModel(tiny_question_encoder_config(tok)).save_pretrained(tmp_path / "qe")
    tok.save_pretrained(tmp_path / "qe")
    AutoModelForCausalLM.from_config(tiny_generator_config("llama", tok)).save_pretrained(tmp_path / "gen")
    tok.save_pretrained(tmp_path / "gen")
    trained = adapter_reranker(tmp_path, "segment_cosine")
    trained.settings = {"n_candidates": 7, "rerank_first_stage_weight": 0.5}
    trained.save(tmp_path / "rr")
    assert json.loads((tmp_path / "rr" / "reranker_config.json").read_text())["settings"]["n_candidates"] == 7
    build = RagForGeneration.from_pretrained_question_encoder_generator
    kwargs = dict(use_chat_template=False, n_docs=2)
    model = build(str(tmp_path / "qe"), str(tmp_path / "gen"), reranker=str(tmp_path / "rr"), **kwargs)
    assert isinstance(model.reranker.model, SegmentCosineScorer)
    assert (model.config.n_candidates, model.config.rerank_first_stage_weight) == (7, 0.5)
    mine = build(str(tmp_path / "qe"), str(tmp_path / "gen"), reranker=str(tmp_path / "rr"), n_candidates=4, n_docs=2)
    assert mine.config.n_candidates == 4  # the caller's setting wins over the reranker's
    # "auto" attaches the shipped reranker only when the question encoder is the default one
    monkeypatch.setattr(reranker_module, "shipped_reranker_path", lambda name: str(tmp_path / "rr"))
    assert build(str(tmp_path / "qe"), str(tmp_path / "gen"), **kwargs).reranker is None
    from modeling_rag.assets import default_question_encoder_path

    minilm = default_question_encoder_path()
    assert build(minilm, str(tmp_path / "gen"), **kwargs).config.n_candidates == 7
    assert build(minilm, str(tmp_path / "gen"), reranker=None, **kwargs).reranker is None
    (tmp_path / "rr" / "reranker_config.json").write_text(
        json.dumps(dict(json.loads((tmp_path / "rr" / "reranker_config.json").read_text()), settings={"top_k": 3}))
    )
    with pytest.raises(RagConfigError, match="settings"):
        CrossEncoderReranker.load(tmp_path / "rr")


def test_is_default_question_encoder():
    from modeling_rag.assets import default_question_encoder_path, is_default_question_encoder

    assert is_default_question_encoder("default") and is_default_question_encoder("all-MiniLM-L6-v2")
    assert is_default_question_encoder(default_question_encoder_path())
    assert not is_default_question_encoder("sentence-transformers/other-model")


def test_the_shipped_reranker_loads_and_prefers_the_passage_that_answers():
    from modeling_rag.reranker import shipped_reranker_path

    folder = shipped_reranker_path("all-MiniLM-L6-v2")
    assert folder is not None and shipped_reranker_path("some-other-encoder") is None
    shipped = CrossEncoderReranker.load(folder)
    assert isinstance(shipped.model, SegmentCosineScorer) and shipped.base_model == "all-MiniLM-L6-v2"
    assert shipped.settings == {"n_candidates": 10, "rerank_first_stage_weight": 0.5}
    assert os.path.getsize(os.path.join(folder, "adapter_model.safetensors")) < 5_000_000  # an adapter, not a copy
    passages = [
        "Oxygen is a chemical element with symbol O and atomic number 8.",
        "Nikola Tesla was a Serbian-American inventor best known for the alternating current electricity system.",
        "The Normans were descended from Norse raiders who settled in Normandy.",
    ]
    scores = shipped.score(["Which electricity system is Tesla known for?"], [passages])[0]
    assert int(np.argmax(scores)) == 1 and scores[1] > 0.5 > max(scores[0], scores[2])

"""Abstention: the signals are what they claim, the fitted rule keeps its false-abstention budget, and
answer() says "the documents don't say" (keeping the reader's words and the closest sources)."""

import threading

import numpy as np
import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag, tiny_rag_with_reranker
from transformers import TextIteratorStreamer

from modeling_rag import RagConfig, RagConfigError, RagForGeneration, RagInputError
from modeling_rag.abstention import (
    ABSTENTION_FEATURES,
    READER_ONLY_FEATURES,
    AbstentionCalibration,
    AnswerLogprobRecorder,
    AnswerSignals,
    abstain_decisions,
    fit_abstention,
    is_no_answer,
    no_answer_sequence_bias,
    recorder_for,
    refusal_texts,
)
from modeling_rag.inputs import answer_ids

QUESTIONS = ["Who was the Norse leader?", "What is the capital of France?"]
PASSAGES = [[TINY_PASSAGES[0], TINY_PASSAGES[1]], [TINY_PASSAGES[1], TINY_PASSAGES[2]]]


def test_is_no_answer_ignores_case_punctuation_and_what_follows():
    text = "The documents don't say."
    assert is_no_answer("The documents don't say.", text)
    assert is_no_answer("the documents don’t say", text)
    assert is_no_answer("The documents don't say who won.", text)
    assert not is_no_answer("The documents say Rollo.", text)
    assert not is_no_answer("", text)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_recorded_answer_logprob_equals_teacher_forced_scoring(kind):
    """The recorder's mean log-probability of the greedy answer is the one a teacher-forced pass gives."""
    model = make_tiny_rag(kind, "concat", seed=3)
    recorder = AnswerLogprobRecorder(no_answer_first_token=5)
    from transformers import LogitsProcessorList

    out = model.generate(
        QUESTIONS[:1],
        passages=PASSAGES[:1],
        max_new_tokens=6,
        do_sample=False,
        logits_processor=LogitsProcessorList([recorder]),
        return_dict_in_generate=True,
    )
    mean, margin = recorder.finish(out.sequences, model.generation_config.eos_token_id)
    answer_ids = out.sequences[0].tolist()
    eos = model.generation_config.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(eos) + 1]
    batch = model.prepare_inputs(QUESTIONS[:1], passages=PASSAGES[:1], for_generation=True)
    ids = batch["context_input_ids"]
    with torch.no_grad():
        if model.is_generator_encoder_decoder:
            start = torch.tensor([[model.generator.config.decoder_start_token_id, *answer_ids[:-1]]])
            logits = model.generator(input_ids=ids, decoder_input_ids=start).logits[0]
        else:
            full = torch.cat([ids, torch.tensor([answer_ids])], dim=1)
            logits = model.generator(input_ids=full).logits[0, ids.shape[1] - 1 : -1]
    lp = torch.log_softmax(logits, -1)
    expected = lp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean().item()
    assert mean[0] == pytest.approx(expected, abs=1e-4)
    first = lp[0]
    assert margin[0] == pytest.approx((first[5] - first[answer_ids[0]]).item(), abs=1e-4)
    assert margin[0] <= 1e-6  # greedy chose the most likely first token


def _signals(rng, n, similarity, logprob, says=0.0):
    return AnswerSignals(
        max_similarity=rng.normal(similarity, 0.1, n),
        answer_logprob=rng.normal(logprob, 0.5, n),
        no_answer_margin=rng.normal(-2.0, 0.5, n),
        says_no_answer=np.full(n, says),
        reranker_relevance=np.zeros(n),
    )


def test_fitted_rule_keeps_its_false_abstention_budget_and_separates():
    rng = np.random.default_rng(0)
    answerable = _signals(rng, 200, similarity=0.6, logprob=-0.5)
    unanswerable = _signals(rng, 200, similarity=0.2, logprob=-2.0)
    cal = fit_abstention(answerable, unanswerable, max_false_abstention=0.05, fitted_on="synthetic")
    abst_a, conf_a = abstain_decisions(answerable, cal)
    abst_u, conf_u = abstain_decisions(unanswerable, cal)
    assert abst_a.mean() <= 0.05 and abst_u.mean() >= 0.9
    assert ((0 <= conf_a) & (conf_a <= 1)).all() and conf_a.mean() > conf_u.mean()
    assert cal.dev_metrics["answerable_abstained"] == pytest.approx(abst_a.mean())
    # a round trip through the config keeps the rule
    again = AbstentionCalibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(again.confidence(unanswerable.matrix()), conf_u)


def test_reader_saying_no_answer_always_abstains():
    rng = np.random.default_rng(1)
    signals = _signals(rng, 10, similarity=0.9, logprob=-0.1, says=1.0)
    for cal in (None, AbstentionCalibration(weights=[0.0] * len(ABSTENTION_FEATURES), bias=10.0, threshold=0.1)):
        abstained, confidence = abstain_decisions(signals, cal)
        assert abstained.all() and (confidence == 0).all()


@pytest.mark.parametrize(
    ("abstention", "match"),
    [
        ({"weights": [1.0], "bias": 0.0, "threshold": 0.5}, "abstention.weights"),
        ({"weights": [0.0] * 4, "bias": 0.0, "threshold": 1.5}, "abstention.threshold"),
        ({"weights": [0.0] * 4, "bias": 0.0}, "abstention"),
        ({"weights": [0.0] * 4, "bias": 0.0, "threshold": 0.5, "no_answer_bias": 2.0}, "abstention.no_answer_bias"),
        ("always", "abstention must be a dict"),
    ],
)
def test_bad_abstention_config_names_the_field(abstention, match):
    with pytest.raises(RagConfigError, match=match):
        RagConfig(abstention=abstention)


def test_answer_abstains_below_the_threshold_and_keeps_sources(tmp_path):
    model = make_tiny_rag("gpt2", "concat", max_new_tokens=6)
    # a rule that is never confident: every answer is replaced, the reader's words and sources kept
    model.config.abstention = AbstentionCalibration(
        weights=[0.0] * len(ABSTENTION_FEATURES), bias=-5.0, threshold=0.5
    ).to_dict()
    answers = model.answer(QUESTIONS, passages=PASSAGES)
    for a in answers:
        assert a.abstained and a.answer == model.config.no_answer_text
        assert a.reader_answer is not None and 0 <= a.confidence < 0.5
        assert [s.id for s in a.sources][:1] in (["normans"], ["france"])
    # the threshold is overridable per call
    kept = model.answer(QUESTIONS, passages=PASSAGES, abstention_threshold=0.0)
    assert not any(a.abstained for a in kept) and all(a.reader_answer is None for a in kept)
    assert [a.answer for a in kept] == [a.reader_answer for a in answers]
    with pytest.raises(RagInputError, match="abstention_threshold"):
        model.answer(QUESTIONS[:1], passages=PASSAGES[:1], abstention_threshold=2.0)
    # saved and loaded with the model
    model.save_pretrained(tmp_path / "m")
    loaded = RagForGeneration.from_pretrained(tmp_path / "m")
    assert loaded.config.abstention == model.config.abstention
    assert all(a.abstained for a in loaded.answer(QUESTIONS, passages=PASSAGES))


def test_uncalibrated_confidence_is_the_readers_token_probability():
    model = make_tiny_rag("gpt2", "concat", max_new_tokens=6)
    answers = model.answer(QUESTIONS, passages=PASSAGES)
    assert all(0.0 < a.confidence <= 1.0 and not a.abstained for a in answers)


def test_features_order_is_the_documented_one():
    assert ABSTENTION_FEATURES == (
        "max_similarity",
        "answer_logprob",
        "no_answer_margin",
        "says_no_answer",
        "reranker_relevance",
        "answer_support",
    )


def test_a_rule_fitted_before_the_reranker_feature_loads_and_applies_its_own_weights():
    old = {"weights": [2.0, 1.0, -0.5, -1.0], "bias": -0.3, "threshold": 0.4, "features": list(READER_ONLY_FEATURES)}
    cal = AbstentionCalibration.from_dict(old)
    assert not cal.uses_reranker
    rows = np.array([[0.5, -1.0, -2.0, 0.0, 7.0], [0.1, -3.0, 0.5, 0.0, -7.0]])
    expected = 1 / (1 + np.exp(-(rows[:, :4] @ np.array(old["weights"]) + old["bias"])))
    np.testing.assert_allclose(cal.confidence(rows), expected)  # the relevance column is not read
    without_names = AbstentionCalibration.from_dict({k: v for k, v in old.items() if k != "features"})
    assert without_names.features == list(READER_ONLY_FEATURES)
    with pytest.raises(RagConfigError, match="one per feature"):
        AbstentionCalibration.from_dict({**old, "features": list(ABSTENTION_FEATURES)})
    with pytest.raises(RagConfigError, match="features must be"):
        AbstentionCalibration.from_dict({**old, "features": ["max_similarity", "bogus", "x", "y"]})
    rows_before = [{name: 0.5 for name in READER_ONLY_FEATURES}]
    assert AnswerSignals.from_rows(rows_before).reranker_relevance.tolist() == [0.0]


def test_the_fit_uses_the_rerankers_relevance_where_it_separates():
    rng = np.random.default_rng(1)
    # the reader's signals overlap; only the reranker tells the passages that answer from those that do not
    answerable, unanswerable = _signals(rng, 150, 0.5, -1.0), _signals(rng, 150, 0.5, -1.0)
    answerable.reranker_relevance = rng.normal(3.0, 1.0, 150)
    unanswerable.reranker_relevance = rng.normal(-3.0, 1.0, 150)
    cal = fit_abstention(answerable, unanswerable, max_false_abstention=0.05)
    assert cal.features == list(ABSTENTION_FEATURES) and cal.uses_reranker
    assert cal.dev_metrics["answerable_abstained"] <= 0.05
    assert cal.dev_metrics["unanswerable_abstained"] > 0.8


def test_answers_carry_the_rerankers_relevance_of_their_passages(tmp_path, reranker):
    model = tiny_rag_with_reranker(tmp_path, max_new_tokens=3)
    assert all(a.signals["reranker_relevance"] == 0.0 for a in model.answer(QUESTIONS))  # no reranker yet
    model.set_reranker(reranker)
    answers = model.answer(QUESTIONS)
    for question, answer in zip(QUESTIONS, answers):
        passages = [{"title": s.title, "text": s.text} for s in answer.sources]
        best = float(np.max(reranker.score_logits([question], [passages])[0]))
        assert answer.signals["reranker_relevance"] == pytest.approx(best, abs=1e-5)


def test_streamer_receives_the_answer_as_it_is_generated():
    model = make_tiny_rag("gpt2", "concat", max_new_tokens=8)
    streamer = TextIteratorStreamer(model.tokenizer.generator, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(a=model.answer(QUESTIONS[:1], passages=PASSAGES[:1], streamer=streamer))
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces).strip() == result["a"][0].answer
    with pytest.raises(RagInputError, match="one question"):
        model.answer(QUESTIONS, passages=PASSAGES, streamer=streamer)


def test_calibrate_script_writes_the_rule_into_the_model_and_reader(tmp_path):
    import importlib.util
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("calibrate", os.path.join(root, "scripts", "calibrate_abstention.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    model = make_tiny_rag("gpt2", "concat", max_new_tokens=4, n_docs=2)
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model.build_index(str(corpus), show_progress=False)
    model.save_pretrained(tmp_path / "m")
    answerable = tmp_path / "a.jsonl"
    answerable.write_text(
        "".join(json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in [(QUESTIONS[0], "Rollo")] * 3)
        + json.dumps({"question": QUESTIONS[1], "answers": ["Paris"]})
        + "\n"
    )
    unanswerable = tmp_path / "u.jsonl"
    unanswerable.write_text("".join(json.dumps({"question": q, "answers": []}) + "\n" for q in ["Why?", "Who won?"]))
    rule = script.main(
        [
            *("--model", str(tmp_path / "m"), "--answerable", str(answerable), "--unanswerable", str(unanswerable)),
            *("--max-false-abstention", "0.25", "--output", str(tmp_path / "fit.json"), "--batch-size", "2"),
        ]
    )
    loaded = RagForGeneration.from_pretrained(tmp_path / "m")
    assert loaded.config.abstention == rule
    assert rule["dev_metrics"]["answerable"] == 4 and rule["dev_metrics"]["unanswerable"] == 2
    assert rule["dev_metrics"]["answerable_abstained"] <= 0.25
    dump = json.loads((tmp_path / "fit.json").read_text())
    assert len(dump["answerable"]) == 4 and set(dump["answerable"][0]) == set(ABSTENTION_FEATURES)
    # refit from those signals at another budget: no generation, the same signals give the same fit
    args = ["--model", str(tmp_path / "m"), "--answerable", str(answerable), "--unanswerable", str(unanswerable)]
    again = script.main([*args, "--max-false-abstention", "0.25", "--signals", str(tmp_path / "fit.json")])
    assert again == rule
    wider = script.main([*args, "--max-false-abstention", "0.5", "--signals", str(tmp_path / "fit.json")])
    assert wider["threshold"] >= rule["threshold"] and wider["weights"] == rule["weights"]
    with pytest.raises(SystemExit, match="no-answer-bias"):
        script.main([*args, "--signals", str(tmp_path / "fit.json"), "--no-answer-bias", "-5"])
    with pytest.raises(SystemExit, match="same files"):
        script.main([*args[:4], "--unanswerable", str(answerable), "--signals", str(tmp_path / "fit.json")])


def test_common_refusals_count_as_abstaining():
    text = "The documents don't say."
    for refusal in ("I don't know.", "I do not know the answer.", "The passages do not mention Mongolia."):
        assert is_no_answer(refusal, text), refusal
    assert not is_no_answer("I know: Rollo.", text)
    assert not is_no_answer("Idaho is a state.", text)


def test_a_stream_below_the_retrieval_floor_shows_only_the_no_answer_response(tmp_path):
    import json

    model = make_tiny_rag("gpt2", "concat", max_new_tokens=6, n_docs=2)
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model.build_index(str(corpus), show_progress=False)
    rule = AbstentionCalibration(
        weights=[0.0] * len(ABSTENTION_FEATURES), bias=5.0, threshold=0.5, retrieval_floor=2.0
    )  # nothing passes
    model.config.abstention = rule.to_dict()

    def stream(**kwargs):
        streamer = TextIteratorStreamer(model.tokenizer.generator, skip_prompt=True, skip_special_tokens=True)
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(a=model.answer(QUESTIONS[:1], streamer=streamer, **kwargs))
        )
        thread.start()
        text = "".join(streamer)
        thread.join()
        return text, result["a"][0]

    text, declined = stream()
    assert text.strip() == model.config.no_answer_text and declined.abstained and declined.confidence == 0.0
    assert declined.sources and declined.signals["max_similarity"] < 2.0 and declined.reader_answer is None
    # threshold 0 (the reader decides): the reader's answer streams as usual
    text, answered = stream(abstention_threshold=0.0)
    assert not answered.abstained and text.strip() == answered.answer
    rule.retrieval_floor = -2.0  # everything passes the gate: post-hoc rule (bias 5: confident)
    model.config.abstention = rule.to_dict()
    text, answered = stream()
    assert not answered.abstained and text.strip() == answered.answer


def test_fit_sets_the_retrieval_floor_at_the_least_similar_answerable_question():
    rng = np.random.default_rng(2)
    answerable = _signals(rng, 50, similarity=0.6, logprob=-0.5)
    cal = fit_abstention(answerable, _signals(rng, 50, similarity=0.1, logprob=-2.0))
    assert cal.retrieval_floor == pytest.approx(answerable.max_similarity.min(), abs=1e-5)
    assert cal.retrieval_floor < answerable.max_similarity.min()


def test_no_answer_bias_reaches_generate_as_a_sequence_bias_on_the_no_answer_response():
    model = make_tiny_rag("gpt2", "concat", max_new_tokens=6)
    rule = AbstentionCalibration(weights=[0.0] * len(ABSTENTION_FEATURES), bias=10.0, threshold=0.0).to_dict()
    model.config.abstention = rule
    assert no_answer_sequence_bias(model) is None
    kwargs = {}
    recorder_for(model, "concat", kwargs)
    assert "sequence_bias" not in kwargs
    model.config.abstention = {**rule, "no_answer_bias": -4.0}
    ids = answer_ids(model, model.config.no_answer_text, with_eos=False)  # as the reader was trained
    kwargs = {}
    recorder_for(model, "concat", kwargs)
    bias = kwargs["sequence_bias"]
    assert bias[tuple(ids[:2])] == -4.0 and set(bias.values()) == {-4.0}
    # its rewordings' openings too, or a reader biased away from its own words says them instead
    for reworded in ("The document doesn't say.", "the Passages don't say."):
        assert bias[tuple(answer_ids(model, reworded, with_eos=False)[:2])] == -4.0
        # and the opening's first token repeated: kept from "The documents", a refusing reader says "The The The"
        first = answer_ids(model, reworded, with_eos=False)[0]
        assert bias[(first, first)] == -4.0
    openings = {tuple(answer_ids(model, t, with_eos=False)[:2]) for t in refusal_texts(model.config.no_answer_text)}
    assert all(b[0] == b[1] or b in openings for b in bias)  # nothing else is biased
    kwargs = {"sequence_bias": None}  # the caller's own choice wins
    recorder_for(model, "concat", kwargs)
    assert kwargs["sequence_bias"] is None
    # generate applies it: the reader's second token, biased away after its first, changes
    own = model.generate(QUESTIONS[:1], passages=PASSAGES[:1], do_sample=False)[0].tolist()
    biased = model.generate(
        QUESTIONS[:1], passages=PASSAGES[:1], do_sample=False, sequence_bias={tuple(own[:2]): -100.0}
    )[0].tolist()
    assert biased[0] == own[0] and biased[1] != own[1]


def test_answer_support_counts_the_answers_words_found_in_its_passages():
    from modeling_rag.abstention import answer_support

    passages = [[{"title": "Leave", "text": "Employees get 25 days of paid annual leave."}], ["Rollo led the Normans."]]
    got = answer_support(["25 days of leave", "The capital is Khalkhorum."], passages)
    assert got[0] == pytest.approx(1.0)  # every word is in the passage (case and punctuation aside)
    assert got[1] == pytest.approx(0.0)  # "capital", "is", "khalkhorum": none ("the" is not counted)
    assert answer_support(["Rollo, Normans' leader"], [passages[1]])[0] == pytest.approx(2 / 3)
    assert answer_support(["", "anything"], [passages[0], []]).tolist() == [0.0, 0.0]


def test_a_rule_fitted_before_answer_support_loads_and_the_fit_uses_it_where_it_separates():
    five = list(ABSTENTION_FEATURES[:5])
    old = {"weights": [2.0, 1.0, -0.5, -1.0, 0.3], "bias": -0.3, "threshold": 0.4, "features": five}
    cal = AbstentionCalibration.from_dict(old)
    rows = np.array([[0.5, -1.0, -2.0, 0.0, 1.0, 9.0]])
    expected = 1 / (1 + np.exp(-(rows[:, :5] @ np.array(old["weights"]) + old["bias"])))
    np.testing.assert_allclose(cal.confidence(rows), expected)  # the support column is not read
    assert AbstentionCalibration.from_dict({k: v for k, v in old.items() if k != "features"}).features == five
    assert AnswerSignals.from_rows([{name: 0.5 for name in five}]).answer_support.tolist() == [0.0]
    rng = np.random.default_rng(2)
    answerable, unanswerable = _signals(rng, 150, 0.5, -1.0), _signals(rng, 150, 0.5, -1.0)
    answerable.answer_support = np.clip(rng.normal(0.95, 0.05, 150), 0, 1)
    unanswerable.answer_support = np.clip(rng.normal(0.2, 0.1, 150), 0, 1)
    fitted = fit_abstention(answerable, unanswerable, max_false_abstention=0.05)
    assert fitted.features == list(ABSTENTION_FEATURES) and fitted.weights[-1] > 0
    assert fitted.dev_metrics["unanswerable_abstained"] > 0.8


@pytest.mark.parametrize(
    "answer, refusal",
    [
        ("The documents don't say.", True),
        ("The document doesn't say.", True),
        ("The papers don't say.", True),
        ("the Passages do not mention it", True),
        ("The provided text does not say", True),
        ("I don't know.", True),
        ("The documents were signed in 1990.", False),
        ("The passage of the bill", False),
        ("Documents", False),
    ],
)
def test_reworded_no_answer_responses_are_recognised(answer, refusal):
    assert is_no_answer(answer, "The documents don't say.") is refusal

"""The local evaluate metrics (rag_answers, rag_retrieval) against hand-computed values.

The metrics are loaded with ``evaluate.load(path)`` exactly as users would: evaluate copies each script
into its module cache, so these tests also check the scripts work without importing ``modeling_rag``.
"""

import ast
import importlib.util
import os

import evaluate
import pytest

from modeling_rag.errors import RagInputError
from modeling_rag.metrics import (
    AVAILABLE_METRICS,
    answer_in_text,
    exact_match_score,
    f1_score,
    load_metric,
    metric_max_over_ground_truths,
    metric_path,
    normalize_answer,
)


@pytest.fixture(scope="module")
def answers_metric():
    return evaluate.load(metric_path("rag_answers"))


@pytest.fixture(scope="module")
def retrieval_metric():
    return evaluate.load(metric_path("rag_retrieval"), k_values=[1, 2, 3])


def _load_script(name):
    """Import a metric script straight from its file (to compare its functions with the package's)."""
    path = os.path.join(metric_path(name), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the package helpers ---------------------------------------------------------------------------------


def test_metric_path_and_load_metric():
    for name in AVAILABLE_METRICS:
        path = metric_path(name)
        assert os.path.isdir(path)
        assert os.path.isfile(os.path.join(path, f"{name}.py"))
        assert os.path.isfile(os.path.join(path, "README.md"))
    with pytest.raises(RagInputError, match="rag_answers"):
        metric_path("squad")
    metric = load_metric("rag_answers")
    assert metric.compute(predictions=["Paris"], references=[["paris"]]) == {
        "exact_match": 100.0,
        "f1": 100.0,
        "count": 1,
    }


def test_scripts_are_self_contained_and_loaded_from_evaluates_cache(answers_metric, retrieval_metric):
    for name in AVAILABLE_METRICS:
        with open(os.path.join(metric_path(name), f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}.py has a relative import"
                imported.add(node.module.split(".")[0])
        assert imported <= {"__future__", "collections", "re", "string", "datasets", "evaluate"}, imported
    # evaluate imported its own copy, not the package file
    assert type(answers_metric).__module__.startswith("evaluate_modules")
    assert type(retrieval_metric).__module__.startswith("evaluate_modules")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  The  Quick, brown FOX!  ", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("tab\tand\nnewline", "tab and newline"),
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_script_copies_agree_with_the_package():
    answers_script = _load_script("rag_answers")
    retrieval_script = _load_script("rag_retrieval")
    texts = ["The Eiffel Tower!", "an  apple, a day", "U.S.A.", "", "the the cat", "Paris, France", "911", "1911"]
    for a in texts:
        assert answers_script.normalize_answer(a) == normalize_answer(a)
        assert retrieval_script.normalize_answer(a) == normalize_answer(a)
        for b in texts:
            assert answers_script.exact_match_score(a, b) == exact_match_score(a, b)
            assert answers_script.f1_score(a, b) == f1_score(a, b)
            assert retrieval_script.answer_in_text([a], b) == answer_in_text([a], b)


def test_pure_functions_by_hand():
    assert exact_match_score("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "eiffel tower") == 0.0
    # pred [barack, obama] vs gold [president, barack, hussein, obama]: P=1, R=1/2 -> F1=2/3
    assert f1_score("Barack Obama", "President Barack Hussein Obama") == pytest.approx(2 / 3)
    # repeated tokens count once per match: pred [cat, cat, cat] vs [cat]: P=1/3, R=1 -> F1=1/2
    assert f1_score("the cat cat cat", "cat") == pytest.approx(0.5)
    assert f1_score("", "") == 1.0
    assert f1_score("", "cat") == 0.0
    assert f1_score("dog", "cat") == 0.0
    # max over gold answers: vs "york" F1=1/2, vs "new york" P=2/3 R=1 -> F1=4/5
    assert metric_max_over_ground_truths(f1_score, "new york city", ["york", "new york"]) == pytest.approx(0.8)
    assert metric_max_over_ground_truths(exact_match_score, "", []) == 1.0
    assert answer_in_text(["Paris!"], "The capital of France is paris.")
    assert not answer_in_text(["911"], "founded in 1911")
    assert answer_in_text(["911", "nope"], "founded in 911.")
    assert not answer_in_text(["the"], "the cat")  # an answer normalising to nothing never matches


# --- rag_answers ---------------------------------------------------------------------------------------


def test_answers_crafted_corpus(answers_metric):
    predictions = ["The Eiffel Tower!", "paris", "", "Barack Obama", "new york city"]
    references = [
        ["eiffel   tower"],  # EM 1, F1 1 (case, article, punctuation, whitespace)
        ["Rome", "Paris, France", "paris"],  # max over golds: EM 1, F1 1
        ["something"],  # empty prediction: 0, 0
        ["President Barack Hussein Obama"],  # EM 0, F1 2/3
        ["york", "new york"],  # EM 0, F1 max(1/2, 4/5) = 4/5
    ]
    result = answers_metric.compute(predictions=predictions, references=references, return_per_example=True)
    assert result["count"] == 5
    assert result["exact_match"] == pytest.approx(100 * 2 / 5)
    assert result["f1"] == pytest.approx(100 * (1 + 1 + 0 + 2 / 3 + 0.8) / 5)
    assert result["exact_match_per_example"] == [100.0, 100.0, 0.0, 0.0, 0.0]
    assert result["f1_per_example"] == pytest.approx([100.0, 100.0, 0.0, 200 / 3, 80.0])

    plain = answers_metric.compute(predictions=predictions, references=references)
    assert set(plain) == {"exact_match", "f1", "count"}


def test_answers_empty_prediction_and_empty_gold(answers_metric):
    result = answers_metric.compute(
        predictions=["", "", "Paris", ""],
        references=[["The"], ["a", "Paris"], ["the"], ["Paris"]],
        return_per_example=True,
    )
    # an empty prediction scores only when a gold answer normalises to empty
    assert result["exact_match_per_example"] == [100.0, 100.0, 0.0, 0.0]
    assert result["f1_per_example"] == [100.0, 100.0, 0.0, 0.0]


def test_answers_single_string_references(answers_metric):
    result = answers_metric.compute(predictions=["Paris", "Rome"], references=["paris.", "Milan"])
    assert result == {"exact_match": 50.0, "f1": 50.0, "count": 2}


def test_answers_add_batch_matches_compute(answers_metric):
    answers_metric.add_batch(predictions=["Paris"], references=[["paris"]])
    answers_metric.add_batch(predictions=["Barack Obama"], references=[["President Barack Hussein Obama"]])
    result = answers_metric.compute()
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


# --- rag_retrieval -------------------------------------------------------------------------------------

# q1: gold p2 at rank 2.  q2: golds p4 (rank 1) and p6 (rank 3).  q3: gold p10 not retrieved.
# q4: no gold ids (skipped by the id metrics) and no answers (skipped by the answer metrics).
RETRIEVED = [["p1", "p2", "p3"], ["p4", "p5", "p6"], ["p7", "p8", "p9"], ["p1", "p4", "p7"]]
GOLD = [["p2"], ["p4", "p6"], ["p10"], []]
TEXTS = [
    ["Rome is in Italy.", "The capital of France is Paris.", "Nothing."],  # answer at rank 2
    ["It was founded in 1911.", "Nothing here.", "The Duchy was founded in 911."],  # rank 3, not 1
    ["Normandy is in France.", "Vikings.", "Charles III."],  # no answer
    ["a", "b", "c"],
]
ANSWERS = [["Paris!"], ["911"], ["Rollo"], []]


def test_retrieval_crafted_ranking(retrieval_metric):
    result = retrieval_metric.compute(predictions=RETRIEVED, references=GOLD, retrieved_texts=TEXTS, answers=ANSWERS)
    expected = {
        "top_1_accuracy": 1 / 3,
        "top_2_accuracy": 2 / 3,
        "top_3_accuracy": 2 / 3,
        "recall_at_1": (0 + 1 / 2 + 0) / 3,
        "recall_at_2": (1 + 1 / 2 + 0) / 3,
        "recall_at_3": (1 + 1 + 0) / 3,
        "mrr": (1 / 2 + 1 + 0) / 3,
        "mean_rank": (2 + 1) / 2,
        "answer_top_1_accuracy": 0 / 3,
        "answer_top_2_accuracy": 1 / 3,
        "answer_top_3_accuracy": 2 / 3,
        "num_questions": 4,
        "num_with_gold_ids": 3,
        "num_without_gold_ids": 1,
        "num_gold_not_retrieved": 1,
        "num_with_answers": 3,
        "num_without_answers": 1,
    }
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_retrieval_k_values_from_compute_and_default():
    metric = load_metric("rag_retrieval")
    result = metric.compute(predictions=RETRIEVED, references=GOLD)
    assert [k for k in result if k.startswith("top_")] == [f"top_{k}_accuracy" for k in (1, 5, 10, 20)]
    assert result["top_20_accuracy"] == pytest.approx(2 / 3)
    assert not any(k.startswith("answer_") for k in result)  # no texts, no answer metrics
    result = metric.compute(predictions=RETRIEVED, references=GOLD, k_values=[2])
    assert [k for k in result if k.startswith(("top_", "recall_"))] == ["top_2_accuracy", "recall_at_2"]


def test_retrieval_answers_only(retrieval_metric):
    result = retrieval_metric.compute(retrieved_texts=TEXTS, answers=ANSWERS)
    assert result["answer_top_3_accuracy"] == pytest.approx(2 / 3)
    assert "mrr" not in result and "top_1_accuracy" not in result
    assert result["num_without_gold_ids"] == 4


def test_retrieval_mean_rank_absent_when_nothing_retrieved(retrieval_metric):
    result = retrieval_metric.compute(predictions=[["a", "b"]], references=[["z"]])
    assert result["mrr"] == 0.0
    assert result["top_3_accuracy"] == 0.0
    assert "mean_rank" not in result
    assert result["num_gold_not_retrieved"] == 1


def test_retrieval_add_batch_matches_compute(retrieval_metric):
    retrieval_metric.add_batch(predictions=RETRIEVED[:2], references=GOLD[:2])
    retrieval_metric.add(prediction=RETRIEVED[2], reference=GOLD[2])
    retrieval_metric.add_batch(predictions=RETRIEVED[3:], references=GOLD[3:])
    result = retrieval_metric.compute()
    assert result["mrr"] == pytest.approx(0.5)
    assert result["recall_at_2"] == pytest.approx(0.5)
    assert result["num_questions"] == 4


def test_retrieval_bad_inputs(retrieval_metric):
    with pytest.raises(ValueError, match="retrieved texts"):
        retrieval_metric.compute(predictions=[["a", "b"]], references=[["a"]], retrieved_texts=[["only one"]])
    with pytest.raises(ValueError, match="one entry per question"):
        retrieval_metric.compute(predictions=[["a"], ["b"]], references=[["a"]])
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metric.compute(predictions=[["a"]], references=[["a"]], k_values=[0])
    with pytest.raises(ValueError, match="k_values"):
        evaluate.load(metric_path("rag_retrieval"), k_values=["1"])

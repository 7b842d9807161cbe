"""scripts/evaluate_rag.py on tiny random models: outputs, metrics, retrievers, processes, bad inputs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_PASSAGES, make_tiny_rag

from modeling_rag.evaluation import answer_rank, gold_rank, match_gold
from modeling_rag.metrics import answer_in_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate_rag.py"

# Questions over TINY_PASSAGES; their words make BM25 find the gold passage first.
QUESTIONS = [
    {"id": "q0", "question": "What is the capital of Italy?", "answers": ["Rome"], "positive_passage_ids": ["italy"]},
    {
        "id": "q1",
        "question": "What is the capital of France?",
        "answers": ["Paris"],
        "positive_passage_ids": ["france"],
    },
    {"id": "q2", "question": "Who was the Norse leader?", "answers": ["Rollo"], "positive_passage_ids": ["normans"]},
    {
        "id": "q3",
        "question": "How many days a week may employees work remotely?",
        "answers": ["three days", "three"],
        "positive_passage_ids": ["remote"],
    },
    {
        "id": "q4",
        "question": "Who gets company phones?",
        "answers": ["staff on call"],
        "positive_passage_ids": ["phones"],
    },
    {
        "id": "q5",
        "question": "When must expenses be submitted?",
        "answers": ["within thirty days"],
        "positive_passage_ids": ["expenses"],
    },
    {"id": "q6", "question": "Where is Normandy?", "answers": ["France"], "positive_passage_ids": ["normans"]},
]


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_rag", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_rag = load_script()


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each in-process run creates its own Accelerator


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_data")
    write_jsonl(folder / "passages.jsonl", TINY_PASSAGES)
    write_jsonl(folder / "dev.jsonl", QUESTIONS)
    return folder


@pytest.fixture(scope="module")
def saved_model(data_dir, tmp_path_factory):
    """A tiny gpt2-generator model with a dense + BM25 index over TINY_PASSAGES, saved."""
    model = make_tiny_rag("gpt2", n_docs=2, max_new_tokens=4)
    model.build_index(str(data_dir / "passages.jsonl"), show_progress=False)
    folder = tmp_path_factory.mktemp("tiny_rag") / "model"
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def saved_model_without_index(tmp_path_factory):
    model = make_tiny_rag("gpt2", n_docs=2, max_new_tokens=4)
    folder = tmp_path_factory.mktemp("tiny_rag_noindex") / "model"
    model.save_pretrained(folder)
    return str(folder)


def base_args(model, questions, out, *extra):
    return ["--model", model, "--questions", questions, "--output-dir", str(out), "--k-values", "1,2,5", "--cpu"] + [
        str(e) for e in extra
    ]


def read_predictions(out):
    with open(out / "predictions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_full_run_writes_consistent_outputs(saved_model, data_dir, tmp_path):
    out = tmp_path / "eval"
    returned = evaluate_rag.main(base_args(saved_model, str(data_dir / "dev.jsonl"), out, "--batch-size", 3))
    results = json.loads((out / "results.json").read_text())
    assert returned["metrics"] == results["metrics"]
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == [q["id"] for q in QUESTIONS]
    assert not list(out.glob(".*.tmp"))

    # answer metrics agree with the rows
    answers = results["metrics"]["answers"]
    assert answers["num_scored"] == 7 and answers["num_skipped_without_answers"] == 0
    assert all(isinstance(r["answer"], str) for r in rows)
    assert answers["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / len(rows))
    assert answers["f1"] == pytest.approx(sum(r["f1"] for r in rows) / len(rows))
    for r in rows:
        em = max(100.0 * answer_in_text([g], r["answer"]) for g in r["gold_answers"])
        assert r["exact_match"] <= em  # exact match implies the answer is in the prediction

    # retrieval metrics agree with the rows: max(k)=5 passages retrieved, gold ranks, MRR
    retrieval = results["metrics"]["retrieval"]
    assert all(len(r["retrieved_ids"]) == 5 == len(r["retrieved_scores"]) for r in rows)
    for k in (1, 2, 5):
        hits = sum(r["gold_rank"] is not None and r["gold_rank"] <= k for r in rows) / len(rows)
        assert retrieval[f"top_{k}_accuracy"] == pytest.approx(hits)
        answer_hits = sum(r["answer_rank"] is not None and r["answer_rank"] <= k for r in rows) / len(rows)
        assert retrieval[f"answer_top_{k}_accuracy"] == pytest.approx(answer_hits)
    mrr = sum(1 / r["gold_rank"] if r["gold_rank"] else 0.0 for r in rows) / len(rows)
    assert retrieval["mrr"] == pytest.approx(mrr)
    for r in rows:
        assert r["retrieved_scores"] == sorted(r["retrieved_scores"], reverse=True)

    # settings, model, machine, timing
    assert results["settings"]["n_docs"] == 2 and results["settings"]["retriever"] == "dense"
    assert results["settings"]["retrieved_per_question"] == 5
    assert results["model"]["name_or_path"] == saved_model and results["model"]["local"] is True
    assert results["questions"]["count"] == 7 and results["questions"]["split"] == "dev"
    for key in ("platform", "cpu_count", "torch", "transformers", "device"):
        assert results["machine"][key]
    for part in ("retrieval_seconds", "generation_seconds", "total_seconds"):
        p = results["timing"][part]
        assert 0 < p["p50"] <= p["p95"]

    # the plot is a PNG
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retriever_only_skips_generation(saved_model, data_dir, tmp_path):
    out = tmp_path / "eval"
    results = evaluate_rag.main(
        base_args(
            saved_model,
            str(data_dir / "dev.jsonl"),
            out,
            "--retriever-only",
            "--latency-batch-size",
            1,
            "--num-threads",
            1,
        )
    )
    assert "answers" not in results["metrics"]
    assert results["timing"]["generation_seconds"]["p50"] is None
    assert results["timing"]["latency_batch_size"] == 1
    assert results["machine"]["torch_threads"] == 1
    rows = read_predictions(out)
    assert all(r["answer"] is None and r["exact_match"] is None and r["generation_seconds"] is None for r in rows)
    assert (out / "recall_at_k.png").is_file()


@pytest.mark.parametrize("retriever", ["bm25", "hybrid"])
def test_bm25_and_hybrid_retrievers(saved_model, data_dir, tmp_path, retriever):
    out = tmp_path / "eval"
    results = evaluate_rag.main(
        base_args(saved_model, str(data_dir / "dev.jsonl"), out, "--retriever", retriever, "--retriever-only")
    )
    assert results["settings"]["retriever"] == retriever
    retrieval = results["metrics"]["retrieval"]
    if retriever == "bm25":
        # keyword overlap finds the gold passage of these questions first
        assert retrieval["top_1_accuracy"] == 1.0
        assert retrieval["mrr"] == 1.0
    assert retrieval["top_5_accuracy"] >= retrieval["top_1_accuracy"]


def test_passages_indexed_on_the_fly(saved_model_without_index, data_dir, tmp_path):
    out = tmp_path / "eval"
    args = base_args(saved_model_without_index, str(data_dir / "dev.jsonl"), out, "--retriever-only")
    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(args)
    assert "no index" in str(err.value) and "--passages" in str(err.value)

    results = evaluate_rag.main(args + ["--passages", str(data_dir / "passages.jsonl")])
    assert results["index"]["count"] == len(TINY_PASSAGES)
    assert results["index"]["built_from"] == str(data_dir / "passages.jsonl")
    assert results["metrics"]["retrieval"]["num_questions"] == 7


def test_rows_without_answers_still_get_retrieval_metrics(saved_model, tmp_path):
    rows = [dict(q) for q in QUESTIONS[:3]]
    rows[1].pop("answers")
    questions = write_jsonl(tmp_path / "dev.jsonl", rows)
    out = tmp_path / "eval"
    results = evaluate_rag.main(base_args(saved_model, questions, out, "--limit", 3))
    assert results["metrics"]["answers"]["num_skipped_without_answers"] == 1
    assert results["metrics"]["answers"]["num_scored"] == 2
    assert results["metrics"]["retrieval"]["num_with_gold_ids"] == 3
    assert results["metrics"]["retrieval"]["num_without_answers"] == 1
    predictions = read_predictions(out)
    assert predictions[1]["exact_match"] is None and predictions[1]["answer"] is not None

    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(base_args(saved_model, questions, tmp_path / "eval2", "--require-answers"))
    assert "line 2" in str(err.value) and "no answers" in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"question": "What?", "answers": ["x"]}\n{not json\n', "line 2 is not valid JSON"),
        ('{"question": "What is it?"}\n', "nothing to score"),
    ],
)
def test_bad_questions_file(saved_model, tmp_path, content, message):
    path = tmp_path / "questions.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(base_args(saved_model, str(path), tmp_path / "eval"))
    assert message in str(err.value)
    assert str(err.value).startswith("evaluate_rag.py: error:")


def test_unknown_model_and_mismatched_gold_ids(saved_model, data_dir, tmp_path):
    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(base_args(str(tmp_path / "missing"), str(data_dir / "dev.jsonl"), tmp_path / "eval"))
    assert "error:" in str(err.value)
    questions = write_jsonl(
        tmp_path / "q.jsonl", [{"question": "What?", "answers": ["x"], "positive_passage_ids": ["nowhere"]}]
    )
    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(base_args(saved_model, questions, tmp_path / "eval"))
    assert "is in the index" in str(err.value) and "do not match" in str(err.value)


def test_gold_matching_counts_chunks():
    assert match_gold("doc#3", ["doc"]) == "doc"
    assert match_gold("doc", ["doc"]) == "doc"
    assert match_gold("doc2", ["doc"]) == "doc2"
    assert gold_rank(["a", "doc2", "doc#1"], ["doc"]) == 3
    assert gold_rank(["a"], ["doc"]) is None
    assert answer_rank(["nothing here", "in 1911 it was"], ["1911"]) == 2
    assert answer_rank(["in 1911 it was"], ["911"]) is None
    with pytest.raises(SystemExit):
        evaluate_rag.parse_args(["--model", "m", "--questions", "q", "--k-values", "0,5"])


def test_dataset_option_and_model_card(saved_model, data_dir, tmp_path):
    import datasets

    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    ds_path = tmp_path / "squad_tiny"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(QUESTIONS)}).save_to_disk(str(ds_path))
    out = tmp_path / "eval"
    args = ["--model", str(model), "--dataset", str(ds_path), "--split", "validation", "--output-dir", str(out)]
    results = evaluate_rag.main(args + ["--k-values", "1,5", "--retriever-only", "--update-model-card", "--cpu"])
    assert results["questions"]["dataset_name"] == "squad_tiny" and results["questions"]["count"] == 7
    stored = json.loads((model / "eval_results.json").read_text())["eval_results"]
    top1 = next(r for r in stored if r["metric_type"] == "top_1_accuracy")
    assert top1["metric_value"] == pytest.approx(round(100 * results["metrics"]["retrieval"]["top_1_accuracy"], 2))
    card = (model / "README.md").read_text()
    assert "model-index" in card and "top_1_accuracy" in card and "squad_tiny" in card
    # the model still loads with the card and results beside it
    from modeling_rag import RagForGeneration

    assert RagForGeneration.from_pretrained(model).retriever is not None

    with pytest.raises(SystemExit) as err:
        evaluate_rag.main(["--model", str(model), "--dataset", str(ds_path), "--split", "test", "--cpu"])
    assert "validation" in str(err.value)


@pytest.mark.multiprocess
def test_two_processes_match_one_process(saved_model, data_dir, tmp_path):
    """7 questions, batch 2: the 2-process run pads its last batch; gather_for_metrics must drop the padding."""
    questions = str(data_dir / "dev.jsonl")
    one = tmp_path / "one"
    evaluate_rag.main(base_args(saved_model, questions, one, "--batch-size", 2))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(SCRIPT)] + base_args(saved_model, questions, two, "--batch-size", 2)
    # this checkout's package first (not an installed copy), then the tests' helpers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r2["machine"]["num_processes"] == 2
    assert r2["questions"]["count"] == 7
    assert r1["metrics"] == r2["metrics"]
    p1, p2 = read_predictions(one), read_predictions(two)
    keys = ("id", "answer", "retrieved_ids", "gold_rank", "exact_match", "f1")
    assert [{k: r[k] for k in keys} for r in p1] == [{k: r[k] for k in keys} for r in p2]


def test_model_from_hub_repo_with_revision(saved_model, data_dir, tmp_path, hub_server, hub_token, fresh_hf_cache):
    """A Hub repo id + --revision loads through from_pretrained; results name the commit."""
    import uuid

    from modeling_rag.hub_utils import push_folder_to_hub

    repo_id = f"tests/eval-{uuid.uuid4().hex[:8]}"
    commit = push_folder_to_hub(saved_model, repo_id, token=hub_token)
    out = tmp_path / "eval"
    args = ["--model", repo_id, "--revision", commit.oid, "--questions", str(data_dir / "dev.jsonl")]
    results = evaluate_rag.main(args + ["--output-dir", str(out), "--retriever-only", "--cpu", "--update-model-card"])
    assert results["model"]["revision"] == commit.oid
    assert results["model"]["commit"] == commit.oid
    assert results["model"]["local"] is False and "model_card" not in results
    assert results["metrics"]["retrieval"]["num_questions"] == 7


@pytest.mark.multiprocess
def test_two_processes_over_a_sharded_index_match_one_process(saved_model, data_dir, tmp_path):
    """Each of 2 processes holds one of the 2 shards (retrieval_distributed.py); the results are the unsharded ones."""
    from modeling_rag import RagForGeneration
    from modeling_rag.index.sharded import ShardedPassageIndex
    from modeling_rag.index.sharded_build import build_sharded_index
    from modeling_rag.retrieval_rag import RagRetriever

    model = RagForGeneration.from_pretrained(saved_model)
    index = model.retriever.index
    sharded = build_sharded_index(
        tmp_path / "sharded_index",
        index.get_embeddings(index.row_ids),
        index.get_passages(index.row_ids),
        2,
        kind="flat",
        encoder_fingerprint=index.encoder_fingerprint,
    )
    model.set_retriever(RagRetriever(sharded))
    model.save_pretrained(tmp_path / "sharded_model")
    assert isinstance(RagForGeneration.from_pretrained(tmp_path / "sharded_model").retriever.index, ShardedPassageIndex)
    from modeling_rag.model_card import card_data_from_model_folder

    card = card_data_from_model_folder(tmp_path / "sharded_model")
    assert card.n_passages == index.count and card.index_kind == "flat"  # read from the manifest

    questions = str(data_dir / "dev.jsonl")
    one = tmp_path / "one"
    evaluate_rag.main(base_args(saved_model, questions, one, "--batch-size", 2, "--retriever", "dense"))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(SCRIPT)] + base_args(str(tmp_path / "sharded_model"), questions, two, "--batch-size", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r2["index"]["num_shards"] == 2 and r2["index"]["shards_per_process"] == 1
    assert r1["metrics"] == r2["metrics"]
    keys = ("id", "answer", "retrieved_ids", "retrieved_scores", "gold_rank")
    p1, p2 = read_predictions(one), read_predictions(two)
    assert [{k: r[k] for k in keys} for r in p1] == [{k: r[k] for k in keys} for r in p2]

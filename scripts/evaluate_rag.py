"""Evaluates a saved RAG model on questions: retrieval quality, answer quality and latency.

For every question the model retrieves ``max(--k-values, --n-docs)`` passages (one search), scores
that ranking against the gold passage ids and the gold answers, and, unless ``--retriever-only``,
generates an answer from the first ``--n-docs`` passages. Questions are split over processes with
an ``accelerate`` DataLoader of question indices; results come back with
``accelerator.gather_for_metrics``, so an uneven split neither duplicates nor drops a question.

Metrics come from the package's local ``evaluate`` modules: ``rag_answers`` (SQuAD exact match and
F1) and ``rag_retrieval`` (top-k accuracy by gold passage id, DPR-style answer-in-passage top-k
accuracy, recall@k, MRR, mean rank). A retrieved chunk ``"<gold id>#<n>"`` counts as the gold
passage ``"<gold id>"``.

Written by the main process into ``--output-dir`` (each file atomically):

* ``results.json``: metrics, settings, model (path, revision, commit), machine, latency p50/p95;
* ``predictions.jsonl``: one row per question (answer, gold answers, retrieved ids and scores,
  ranks of the first gold passage / answer-bearing passage, EM, F1, latency);
* ``recall_at_k.png``: top-k accuracy against k, one line per measure;
* ``risk_coverage.png``: accuracy of the answered questions against the share answered, most confident
  first (with ``--unanswerable``, answering a question the documents do not answer counts as wrong).

Examples::

    # one process
    python scripts/evaluate_rag.py --model ./my-rag --questions data/dev.jsonl --output-dir eval/

    # the BM25 baseline, retrieval only
    python scripts/evaluate_rag.py --model ./my-rag --questions data/dev.jsonl --output-dir eval-bm25/ \\
        --retriever bm25 --retriever-only

    # a model saved without an index: index a corpus on the fly
    python scripts/evaluate_rag.py --model ./my-rag --passages data/passages.jsonl --questions data/dev.jsonl

    # several processes
    accelerate launch --num_processes 2 scripts/evaluate_rag.py --model ./my-rag --questions data/dev.jsonl

User errors (an unreadable or empty questions file, a model without an index and no ``--passages``,
...) end the script with a one-line message and exit status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import modeling_rag
from modeling_rag import DataFormatError, RagError, RagForGeneration, RagInputError, load_metric, load_qa_examples
from modeling_rag.constants import (
    EVAL_RESULTS_NAME,
    PREDICTIONS_NAME,
    RECALL_PLOT_NAME,
    RESULTS_NAME,
    RISK_COVERAGE_PLOT_NAME,
)
from modeling_rag.library_output import configure_script_output
from modeling_rag.metrics import answer_in_text
from modeling_rag.utils.atomic import atomic_open, atomic_write_text
from modeling_rag.utils.chunk_ids import document_id, is_part_of

RETRIEVERS = ("dense", "bm25", "hybrid")
GENERATION_MODES = ("concat", "rag_sequence", "rag_token")
DEFAULT_K_VALUES = "1,5,10,20"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------
def parse_k_values(text: str) -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]`` (sorted, de-duplicated); raises ``ArgumentTypeError`` otherwise."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from err
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Evaluate a saved RAG model: retrieval top-k accuracy, EM/F1 and latency.",
    )
    model = parser.add_argument_group("model and index")
    model.add_argument("--model", required=True, help="A saved RagForGeneration: a local folder or a Hub repo id.")
    model.add_argument(
        "--revision", default=None, help="Branch, tag or commit of the Hub repo (ignored for a local folder)."
    )
    model.add_argument(
        "--passages",
        default=None,
        help="A corpus (.jsonl / .csv file or a folder of .txt/.md files) to index on the fly with the model's "
        "passage encoder; needed when the model was saved without an index, and replaces its index otherwise.",
    )
    model.add_argument(
        "--chunk-tokens",
        type=positive_int,
        default=None,
        help="With --passages: the largest passage in question-encoder tokens (longer documents are chunked); "
        "default: the library's default chunk size.",
    )
    model.add_argument(
        "--retriever",
        choices=RETRIEVERS,
        default=None,
        help="Retrieval to evaluate: dense (FAISS), bm25 (the BM25 baseline, bm25s) or hybrid (both, fused); "
        "default: the model's config.retrieval. A missing BM25 index is built from the index's passages.",
    )

    model.add_argument(
        "--fusion",
        choices=("weighted", "rrf"),
        default=None,
        help="How hybrid retrieval fuses the dense and BM25 rankings; default: the model's config.fusion.",
    )
    model.add_argument(
        "--hybrid-alpha",
        type=float,
        default=None,
        help="Weight of the dense score in weighted fusion (0..1); default: config.hybrid_alpha.",
    )
    model.add_argument(
        "--fusion-normalization",
        choices=("zscore", "minmax"),
        default=None,
        help="Per-query score normalisation of weighted fusion; default: config.fusion_normalization.",
    )
    model.add_argument(
        "--reranker",
        default=None,
        help="A saved cross-encoder reranker folder (scripts/train_reranker.py) to rerank the first stage with, "
        "or 'none' to evaluate without the model's reranker; default: the model's own (config.reranker).",
    )
    model.add_argument(
        "--n-candidates",
        type=positive_int,
        default=None,
        help="First-stage passages the reranker scores per question (at least max(--k-values) and --n-docs); "
        "default: config.n_candidates.",
    )

    data = parser.add_argument_group("questions")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--questions",
        default=None,
        help="A JSON-lines file, one object per question: 'question', 'answers' (string or list) and optional "
        "'positive_passage_ids' (gold passage ids) and 'id'.",
    )
    source.add_argument(
        "--dataset",
        default=None,
        help="A dataset saved with datasets' save_to_disk, a local .json/.jsonl/.csv/.parquet file, or a folder "
        "of such files (loaded with datasets.load_dataset), with the same columns as --questions.",
    )
    data.add_argument("--split", default="validation", help="The split of --dataset to evaluate (default: validation).")
    data.add_argument(
        "--dataset-name",
        default=None,
        help="Name of the evaluation data in results.json and the model card; default: the folder holding the "
        "questions file (or the dataset's name).",
    )
    data.add_argument(
        "--unanswerable",
        default=None,
        help="A JSON-lines file of questions the documents do not answer (answers empty, e.g. SQuAD v2's "
        "unanswerable ones), evaluated with the others: the share the model abstains on is reported, and "
        "answering one counts as wrong in the coverage-accuracy curve.",
    )
    data.add_argument("--limit", type=positive_int, default=None, help="Evaluate only the first N questions.")
    data.add_argument(
        "--require-answers",
        action="store_true",
        help="Treat a question without gold answers as an error (by default it is only skipped by EM/F1).",
    )

    run = parser.add_argument_group("evaluation")
    run.add_argument(
        "--output-dir",
        default="eval_results",
        help="Folder for results.json, predictions.jsonl and recall_at_k.png (default: eval_results).",
    )
    run.add_argument("--batch-size", type=positive_int, default=8, help="Questions per batch and process (default: 8).")
    run.add_argument(
        "--latency-batch-size",
        type=positive_int,
        default=None,
        help="Run retrieval and generation on sub-batches of this many questions, so that per-question latency "
        "is measured at this batch size (1: one question at a time); default: --batch-size.",
    )
    run.add_argument(
        "--n-docs", type=positive_int, default=None, help="Passages given to the generator; default: config.n_docs."
    )
    run.add_argument(
        "--k-values",
        type=parse_k_values,
        default=parse_k_values(DEFAULT_K_VALUES),
        help="Cut-offs k of the retrieval metrics, comma-separated; max(k) passages are retrieved per question (default: 1,5,10,20).",
    )
    run.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="Longest generated answer in tokens; default: config.max_new_tokens.",
    )
    run.add_argument(
        "--generation-mode",
        choices=GENERATION_MODES,
        default=None,
        help="How passages reach the generator; default: config.generation_mode.",
    )
    run.add_argument(
        "--abstention-threshold",
        type=float,
        default=None,
        help="Confidence below which the model abstains; default: the threshold stored in the model's config "
        "(0: abstain only when the reader says the documents don't answer).",
    )
    run.add_argument("--retriever-only", action="store_true", help="Evaluate retrieval only: no generation, no EM/F1.")
    run.add_argument("--cpu", action="store_true", help="Run on the CPU even when an accelerator is available.")
    run.add_argument(
        "--num-threads",
        type=positive_int,
        default=None,
        help="CPU threads of torch per process (torch.set_num_threads); 1 gives steadier latencies on a busy "
        "machine; default: torch's choice (or OMP_NUM_THREADS).",
    )
    run.add_argument("--seed", type=int, default=42, help="Random seed; generation is greedy (default: 42).")
    run.add_argument("--verbose", action="store_true", help="Also show the libraries' own progress bars and notices.")
    run.add_argument(
        "--update-model-card",
        action="store_true",
        help=f"For a local --model folder: merge the scores into its {EVAL_RESULTS_NAME} and regenerate its "
        "model card (README.md) with them.",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default: ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def write_json(path: str, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def gold_rank(retrieved_ids: Sequence[str], gold_ids: Sequence[str]) -> int | None:
    """1-based rank of the first retrieved passage that is a gold passage (or a chunk of one), else None."""
    for rank, pid in enumerate(retrieved_ids, start=1):
        if match_gold(pid, gold_ids) in gold_ids:
            return rank
    return None


def match_gold(passage_id: str, gold_ids: Sequence[str]) -> str:
    """The gold id that ``passage_id`` is (exactly, or as a chunk ``gold#n``), else ``passage_id`` itself."""
    for gold in gold_ids:
        if is_part_of(passage_id, gold):
            return gold
    return passage_id


def answer_rank(texts: Sequence[str], answers: Sequence[str]) -> int | None:
    """1-based rank of the first passage text that contains a gold answer (DPR-style), else None."""
    if not answers:
        return None
    for rank, text in enumerate(texts, start=1):
        if answer_in_text(answers, text):
            return rank
    return None


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / mean of ``values`` (None when empty)."""
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
    }


def machine_info(accelerator: Accelerator) -> dict[str, Any]:
    """Where the numbers were measured."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modeling_rag": modeling_rag.__version__,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }
    if accelerator.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(accelerator.device)
    return info


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def load_questions(args: argparse.Namespace):
    """The questions as ``QAExample``s, with the dataset's name and split for the reports."""
    if args.questions is not None:
        examples = load_qa_examples(args.questions, require_answers=args.require_answers)
        path = os.path.abspath(args.questions)
        name = args.dataset_name or os.path.basename(os.path.dirname(path)) or "questions"
        split = os.path.splitext(os.path.basename(path))[0]
    else:
        dataset = _load_dataset(args.dataset, args.split)
        examples = load_qa_examples(dataset, require_answers=args.require_answers)
        name = args.dataset_name or os.path.basename(os.path.normpath(args.dataset))
        split = args.split
    if args.limit is not None:
        examples = examples[: args.limit]
    for example in examples:
        example.unanswerable = False
    if args.unanswerable is not None:
        extra = load_qa_examples(args.unanswerable, require_answers=False)
        if args.limit is not None:
            extra = extra[: args.limit]
        for example in extra:
            if example.answers:
                raise DataFormatError(
                    f"--unanswerable {args.unanswerable}: question {example.id!r} has answers; this file is for "
                    "questions the documents do not answer."
                )
            example.unanswerable = True
            example.positive_passage_ids = []  # the passage it was asked about does not answer it
        examples = examples + extra
    if not any(e.answers or e.positive_passage_ids for e in examples):
        raise DataFormatError(
            "No question has gold answers or gold passage ids ('answers', 'positive_passage_ids'), so there is "
            "nothing to score; check the questions file."
        )
    return examples, name, split


def _load_dataset(name_or_path: str, split: str):
    """A ``datasets.Dataset`` split from ``save_to_disk`` output, a local data file or a folder of them."""
    import datasets

    try:
        if os.path.isdir(name_or_path) and any(
            os.path.isfile(os.path.join(name_or_path, f)) for f in ("dataset_info.json", "dataset_dict.json")
        ):
            data = datasets.load_from_disk(name_or_path)
        elif os.path.isfile(name_or_path):
            ext = os.path.splitext(name_or_path)[1].lower().lstrip(".")
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise DataFormatError(f"--dataset {name_or_path}: unknown file type .{ext}; use .jsonl/.csv/.parquet.")
            data = datasets.load_dataset(builder, data_files={split: name_or_path}, split=split)
        else:
            data = datasets.load_dataset(name_or_path, split=split)
    except RagError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError)
        raise DataFormatError(f"Cannot load the dataset {name_or_path!r} (split {split!r}): {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataFormatError(f"The dataset {name_or_path!r} has splits {list(data)}, not {split!r}; use --split.")
        data = data[split]
    return data


def load_model(args: argparse.Namespace, accelerator: Accelerator) -> tuple[RagForGeneration, dict[str, Any]]:
    """Loads the model (main process first, so a Hub download happens once) and describes where it came from."""
    from modeling_rag.hub_utils import resolve_model_folder

    with accelerator.main_process_first():
        try:
            folder = resolve_model_folder(args.model, revision=args.revision)
            index_folder = _sharded_index_folder(folder)
            # a sharded index across several processes: each holds only its shards (retrieval_distributed.py)
            model = RagForGeneration.from_pretrained(folder, load_index=index_folder is None)
            if index_folder is not None:
                from modeling_rag.encoders import weights_fingerprint
                from modeling_rag.retrieval_distributed import open_distributed_retriever

                model.set_retriever(
                    open_distributed_retriever(
                        index_folder,
                        expected_dim=model.config.retrieval_vector_size,
                        expected_fingerprint=weights_fingerprint(model.passage_encoder),
                    )
                )
        except RagError:
            raise
        except OSError as err:
            raise RagInputError(f"Cannot load the model {args.model!r}: {err}") from err
    is_local = os.path.isdir(args.model)
    parent = os.path.basename(os.path.dirname(folder))
    commit = os.path.basename(folder) if parent == "snapshots" and _SHA_RE.match(os.path.basename(folder)) else None
    info = {
        "name_or_path": args.model,
        "revision": None if is_local else args.revision,
        "commit": commit,
        "folder": folder,
        "local": is_local,
    }
    return model, info


def _sharded_index_folder(folder: str) -> str | None:
    """The model's own index folder when it is sharded and this run has several processes, else None."""
    from modeling_rag.configuration_rag import RagConfig
    from modeling_rag.retrieval_distributed import use_distributed_index

    config = RagConfig.from_pretrained(folder)
    if config.index_repo_id or not config.index_path:
        return None
    index_folder = os.path.join(folder, config.index_path)
    return index_folder if use_distributed_index(index_folder) else None


def prepare_retriever(
    model: RagForGeneration, args: argparse.Namespace, accelerator: Accelerator
) -> tuple[str, dict[str, Any]]:
    """Attaches an index built from ``--passages`` if asked, picks the retrieval mode; returns it and index facts."""
    built_seconds = None
    if args.passages is not None:
        if model.retriever is not None:
            accelerator.print(f"--passages given: replacing the model's index with one built from {args.passages}.")
        start = time.perf_counter()
        kwargs = {"accelerator": accelerator, "show_progress": accelerator.is_local_main_process}
        if args.chunk_tokens is not None:
            kwargs["max_tokens"] = args.chunk_tokens
        model.build_index(args.passages, **kwargs)
        built_seconds = time.perf_counter() - start
    elif model.retriever is None:
        raise RagInputError(
            f"The model {args.model!r} has no index attached, so it cannot retrieve. Pass --passages FILE to index "
            "a corpus on the fly, or save the model with its index (model.build_index(corpus); "
            "model.save_pretrained(folder))."
        )
    retriever = model.retriever
    mode = args.retriever or model.config.retrieval
    distributed = hasattr(retriever.index, "all_passage_ids")
    if mode != "dense" and distributed:
        raise RagInputError(
            f"--retriever {mode} needs the BM25 index, which a sharded index searched across processes does not keep; "
            "use dense retrieval, or run in one process."
        )
    if mode != "dense" and retriever.bm25 is None:
        accelerator.print("The index has no BM25 part: building it from the index's passages.")
        retriever.rebuild_bm25()
    retriever.retrieval = mode
    model.config.retrieval = mode
    for name in ("fusion", "hybrid_alpha", "fusion_normalization", "n_candidates"):
        if getattr(args, name) is not None:
            setattr(model.config, name, getattr(args, name))
    if args.reranker is not None:
        if args.reranker.lower() == "none":
            model.set_reranker(None)
        else:
            from modeling_rag.reranker import CrossEncoderReranker

            model.set_reranker(CrossEncoderReranker.load(args.reranker))
    model.config.validate_rag()
    index = retriever.index
    facts = {
        "count": index.count,
        "kind": index.kind,
        "metric": index.metric,
        "encoder_name": index.encoder_name,
        "chunking": index.chunking,
        "bm25": retriever.bm25 is not None,
        "num_shards": getattr(index, "num_shards", None),
        "shards_per_process": len(index.shard_ids) if distributed else None,
        "fusion": {
            k: getattr(model.config, k) for k in ("fusion", "hybrid_alpha", "fusion_normalization", "fusion_depth")
        },
        "reranker": repr(model.reranker) if model.reranker is not None else None,
        "n_candidates": model.config.n_candidates if model.reranker is not None else None,
        "built_from": args.passages,
        "build_seconds": built_seconds,
    }
    return mode, facts


def check_gold_ids(examples, model: RagForGeneration, accelerator: Accelerator) -> int:
    """Counts gold passage ids found nowhere in the index (exactly or as chunks); all unknown is an error."""
    index = model.retriever.index
    if hasattr(index, "all_passage_ids"):  # held across processes: each sends its shards' ids
        ids = index.all_passage_ids()
    else:
        ids = [str(p.get("id")) for p in index.get_passages(index.row_ids)]
    known = set(ids) | {document_id(pid) for pid in ids} - {None}
    gold = {pid for e in examples for pid in e.positive_passage_ids}
    unknown = sorted(gold - known)
    if gold and len(unknown) == len(gold):
        raise DataFormatError(
            f"None of the {len(gold)} gold passage ids of the questions is in the index (e.g. {unknown[0]!r}); "
            "the questions and the corpus do not match."
        )
    if unknown:
        accelerator.print(
            f"Warning: {len(unknown)} gold passage id(s) are not in the index (e.g. {unknown[:3]}); the questions "
            "using them cannot score a gold-passage hit."
        )
    return len(unknown)


# --------------------------------------------------------------------------------------------------
# the evaluation itself
# --------------------------------------------------------------------------------------------------
def evaluate_questions(
    model: RagForGeneration, examples, indices: list[int], args: argparse.Namespace, depth: int
) -> list[dict[str, Any]]:
    """Retrieves (and generates for) the questions ``indices``; one record per question."""
    questions = [examples[i].question for i in indices]
    start = time.perf_counter()
    retrieved = model.retrieve(questions, n_docs=depth)
    retrieval_seconds = (time.perf_counter() - start) / len(indices)

    answers: list = [None] * len(indices)
    generation_seconds = None
    if not args.retriever_only:
        n_docs = min(args.n_docs, retrieved.row_ids.shape[1])
        start = time.perf_counter()
        answers = model.answer(
            questions,
            passages=[p[:n_docs] for p in retrieved.passages],
            doc_scores=np.ascontiguousarray(retrieved.doc_scores[:, :n_docs]),
            generation_mode=args.generation_mode,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            abstention_threshold=args.abstention_threshold,
        )
        generation_seconds = (time.perf_counter() - start) / len(indices)

    records = []
    for j, i in enumerate(indices):
        example = examples[i]
        passages = retrieved.passages[j]
        records.append(
            {
                "index": i,
                "id": example.id,
                "question": example.question,
                "answer": answers[j].answer if answers[j] is not None else None,
                "abstained": answers[j].abstained if answers[j] is not None else None,
                "confidence": answers[j].confidence if answers[j] is not None else None,
                "reader_answer": (answers[j].reader_answer or answers[j].answer) if answers[j] is not None else None,
                "signals": answers[j].signals if answers[j] is not None else None,
                "unanswerable": bool(getattr(example, "unanswerable", False)),
                "gold_answers": list(example.answers),
                "gold_passage_ids": list(example.positive_passage_ids),
                "retrieved_ids": [str(p.get("id")) for p in passages],
                "retrieved_scores": [float(s) for s in retrieved.doc_scores[j][: len(passages)]],
                "retrieved_texts": [p.get("text") or "" for p in passages],
                "retrieval_seconds": retrieval_seconds,
                "generation_seconds": generation_seconds,
            }
        )
    return records


def warm_up(model: RagForGeneration, examples, args: argparse.Namespace, depth: int) -> None:
    """One untimed retrieval (and a 2-token generation) so that first-call costs stay out of the latencies."""
    question = [examples[0].question]
    retrieved = model.retrieve(question, n_docs=depth)
    if not args.retriever_only:
        n_docs = min(args.n_docs, retrieved.row_ids.shape[1])
        model.generate(
            question,
            passages=[retrieved.passages[0][:n_docs]],
            doc_scores=np.ascontiguousarray(retrieved.doc_scores[:, :n_docs]),
            generation_mode=args.generation_mode,
            max_new_tokens=min(2, args.max_new_tokens),
            do_sample=False,
        )


def run_evaluation(model, examples, args, accelerator: Accelerator, depth: int) -> tuple[list[dict], float]:
    """All questions over all processes; returns every record (on the main process, in order) and the wall time."""
    dataloader = DataLoader(list(range(len(examples))), batch_size=args.batch_size, shuffle=False)
    dataloader = accelerator.prepare(dataloader)
    step = args.latency_batch_size or args.batch_size
    records: list[dict] = []
    warm_up(model, examples, args, depth)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for batch in tqdm(dataloader, desc="Evaluating", unit="batch", disable=not accelerator.is_local_main_process):
        indices = [int(i) for i in batch.tolist()]
        local = []
        for s in range(0, len(indices), step):
            local.extend(evaluate_questions(model, examples, indices[s : s + step], args, depth))
        gathered = accelerator.gather_for_metrics(local, use_gather_object=True)
        if accelerator.is_main_process:
            records.extend(gathered)
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - start
    if accelerator.is_main_process:
        by_index = {r["index"]: r for r in records}  # a safety net: gather_for_metrics already dropped padding
        records = [by_index[i] for i in sorted(by_index)]
        if len(records) != len(examples):
            raise RuntimeError(f"Gathered {len(records)} results for {len(examples)} questions.")
    return records, wall


def compute_metrics(records: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Answer metrics (``rag_answers``) and retrieval metrics (``rag_retrieval``); fills per-row EM/F1 and ranks."""
    for r in records:
        r["gold_rank"] = gold_rank(r["retrieved_ids"], r["gold_passage_ids"])
        r["answer_rank"] = answer_rank(r["retrieved_texts"], r["gold_answers"])
        r["exact_match"] = r["f1"] = None

    retrieval = load_metric("rag_retrieval", k_values=args.k_values, keep_in_memory=True).compute(
        predictions=[[match_gold(pid, r["gold_passage_ids"]) for pid in r["retrieved_ids"]] for r in records],
        references=[r["gold_passage_ids"] for r in records],
        retrieved_texts=[r["retrieved_texts"] for r in records],
        answers=[r["gold_answers"] for r in records],
    )
    metrics: dict[str, Any] = {"retrieval": retrieval}
    if not args.retriever_only:
        scored = [r for r in records if r["gold_answers"]]
        answers: dict[str, Any] = {"num_scored": len(scored), "num_skipped_without_answers": len(records) - len(scored)}
        if scored:
            answer_metric = load_metric("rag_answers", keep_in_memory=True)
            result = answer_metric.compute(
                predictions=[r["answer"] for r in scored],
                references=[r["gold_answers"] for r in scored],
                return_per_example=True,
            )
            # an abstention answers nothing: it scores 0, whatever words the no-answer response shares
            for r, em, f1 in zip(scored, result["exact_match_per_example"], result["f1_per_example"]):
                r["exact_match"], r["f1"] = (0.0, 0.0) if r["abstained"] else (em, f1)
            reader = answer_metric.compute(
                predictions=[r["reader_answer"] for r in scored],
                references=[r["gold_answers"] for r in scored],
                return_per_example=True,
            )
            for r, f1 in zip(scored, reader["f1_per_example"]):
                r["reader_f1"] = f1
            answered = [r for r in scored if not r["abstained"]]
            answers.update(
                exact_match=float(np.mean([r["exact_match"] for r in scored])),
                f1=float(np.mean([r["f1"] for r in scored])),
                wrongly_abstained=float(np.mean([bool(r["abstained"]) for r in scored])),
                num_answered=len(answered),
                answered_exact_match=float(np.mean([r["exact_match"] for r in answered])) if answered else None,
                answered_f1=float(np.mean([r["f1"] for r in answered])) if answered else None,
            )
        metrics["answers"] = answers
        unanswerable = [r for r in records if r["unanswerable"]]
        if unanswerable:
            metrics["abstention"] = {
                "num_unanswerable": len(unanswerable),
                "unanswerable_abstained": float(np.mean([bool(r["abstained"]) for r in unanswerable])),
                "num_answerable": len(scored),
                "answerable_abstained": answers.get("wrongly_abstained"),
            }
        metrics["risk_coverage"] = risk_coverage(scored + unanswerable)
    return metrics


def risk_coverage(records: list[dict]) -> dict[str, Any]:
    """Accuracy against coverage when answering only the most confident questions first.

    A question's utility is the F1 (0-1) of the reader's own answer when it has gold answers, and 0 for an
    unanswerable question (answering it is wrong); abstaining has no utility and no risk. Returns the curve
    (coverage, accuracy of the answered) and its area (higher is better).
    """
    if not records:
        return {"coverage": [], "accuracy": [], "area": None}
    order = sorted(records, key=lambda r: -(r["confidence"] if r["confidence"] is not None else 0.0))
    utility = np.array([(r.get("reader_f1") or 0.0) / 100.0 if not r["unanswerable"] else 0.0 for r in order])
    answered = np.arange(1, len(order) + 1)
    accuracy = np.cumsum(utility) / answered
    coverage = answered / len(order)
    return {
        "coverage": [round(float(c), 4) for c in coverage],
        "accuracy": [round(float(a), 4) for a in accuracy],
        "area": float(np.mean(accuracy)),
        "how": "questions sorted by confidence; accuracy = mean F1 (0-1) of the answered, unanswerable answered = 0",
    }


def timing_summary(records: list[dict], wall_seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    """Per-question latency p50/p95 (retrieval, generation, both) and throughput."""
    retrieval = [r["retrieval_seconds"] for r in records]
    generation = [r["generation_seconds"] for r in records if r["generation_seconds"] is not None]
    total = [r["retrieval_seconds"] + (r["generation_seconds"] or 0.0) for r in records]
    return {
        "latency_batch_size": args.latency_batch_size or args.batch_size,
        "how": "seconds per question = time of a (sub-)batch / its size, measured in each process after one "
        "untimed warm-up question",
        "retrieval_seconds": percentiles(retrieval),
        "generation_seconds": percentiles(generation),
        "total_seconds": percentiles(total),
        "wall_seconds": wall_seconds,
        "questions_per_second": len(records) / wall_seconds if wall_seconds > 0 else None,
    }


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def prediction_rows(records: list[dict]) -> list[dict]:
    """The rows of predictions.jsonl (records without the passage texts)."""
    keys = (
        "id",
        "question",
        "answer",
        "abstained",
        "confidence",
        "reader_answer",
        "signals",
        "unanswerable",
        "gold_answers",
        "gold_passage_ids",
        "retrieved_ids",
        "retrieved_scores",
        "gold_rank",
        "answer_rank",
        "exact_match",
        "f1",
        "retrieval_seconds",
        "generation_seconds",
    )
    return [{k: r[k] for k in keys} for r in records]


def write_predictions(path: str, records: list[dict]) -> None:
    """predictions.jsonl, one JSON object per question, atomically."""

    def write(f):
        for row in prediction_rows(records):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    with atomic_open(path) as f:
        write(f)


def plot_recall(path: str, retrieval: dict[str, Any], k_values: list[int], title: str) -> None:
    """recall_at_k.png: top-k accuracy (gold passage, answer in passage) and recall@k against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    lines = (
        ("top_{k}_accuracy", "gold passage in top k", "-", "o"),
        ("answer_top_{k}_accuracy", "answer in a top-k passage (DPR)", "-", "s"),
        ("recall_at_{k}", "recall@k (share of gold passages)", "--", "x"),
    )
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label, style, marker in lines:
        values = [retrieval.get(key.format(k=k)) for k in k_values]
        if all(v is not None for v in values):
            ax.plot(k_values, values, linestyle=style, marker=marker, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(k_values)
    ax.set_xticklabels([str(k) for k in k_values])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        with atomic_open(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def plot_risk_coverage(path: str, curve: dict[str, Any], title: str) -> None:
    """risk_coverage.png: accuracy of the answered questions against the share answered (by confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(curve["coverage"], curve["accuracy"], "-")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of questions answered, most confident first)")
    ax.set_ylabel("accuracy of the answered (F1)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_open(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def eval_result_entries(metrics: dict, dataset_name: str, split: str, k_values: list[int]) -> list[dict]:
    """Model-card eval results (``model-index`` entries) for the main scores."""
    base = {"task_type": "question-answering", "dataset_name": dataset_name, "dataset_type": dataset_name}
    base["dataset_split"] = split
    entries = []
    answers = metrics.get("answers") or {}
    for key, name in (
        ("exact_match", "Exact match"),
        ("f1", "F1"),
        ("answered_f1", "F1 over answered questions"),
    ):
        if answers.get(key) is not None:
            entries.append({**base, "metric_type": key, "metric_name": name, "metric_value": round(answers[key], 2)})
    abstention = metrics.get("abstention") or {}
    for key, name in (
        ("unanswerable_abstained", "Unanswerable questions abstained (%)"),
        ("answerable_abstained", "Answerable questions abstained (%)"),
    ):
        if abstention.get(key) is not None:
            value = round(100 * abstention[key], 2)
            entries.append({**base, "metric_type": key, "metric_name": name, "metric_value": value})
    retrieval = metrics["retrieval"]
    for k in k_values:
        key = f"top_{k}_accuracy"
        if retrieval.get(key) is not None:
            value = round(100 * retrieval[key], 2)
            entries.append(
                {**base, "metric_type": key, "metric_name": f"Top-{k} retrieval accuracy", "metric_value": value}
            )
    if retrieval.get("mrr") is not None:
        entries.append({**base, "metric_type": "mrr", "metric_name": "MRR", "metric_value": round(retrieval["mrr"], 4)})
    return entries


def update_model_card(folder: str, entries: list[dict]) -> str:
    """Merges ``entries`` into ``folder/eval_results.json`` (same dataset, split and metric replaced) and
    regenerates the model card; returns the card's path."""
    from modeling_rag.model_card import card_data_from_model_folder, write_model_card

    path = os.path.join(folder, EVAL_RESULTS_NAME)
    existing: list[dict] = []
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
        if isinstance(stored, dict):
            stored = stored.get("eval_results") or stored.get("results") or []
        existing = [r for r in stored if isinstance(r, dict)] if isinstance(stored, list) else []

    def key(r: dict) -> tuple:
        return (r.get("dataset_name"), r.get("dataset_split"), r.get("metric_type"))

    new_keys = {key(r) for r in entries}
    merged = [r for r in existing if key(r) not in new_keys] + entries
    write_json(path, {"eval_results": merged})
    return write_model_card(folder, card_data_from_model_folder(folder))


def print_summary(accelerator: Accelerator, results: dict) -> None:
    """A short table of the main numbers."""
    m = results["metrics"]
    lines = [f"Evaluated {results['questions']['count']} questions ({results['settings']['retriever']} retrieval)"]
    for key, value in m["retrieval"].items():
        if isinstance(value, float):
            lines.append(f"  {key:28s} {value:.4f}")
    for key in (
        "exact_match",
        "f1",
        "answered_exact_match",
        "answered_f1",
        "wrongly_abstained",
        "num_scored",
        "num_skipped_without_answers",
    ):
        if key in m.get("answers", {}):
            value = m["answers"][key]
            lines.append(f"  {key:28s} {value:.2f}" if isinstance(value, float) else f"  {key:28s} {value}")
    for key, value in (m.get("abstention") or {}).items():
        lines.append(f"  {key:28s} {value:.3f}" if isinstance(value, float) else f"  {key:28s} {value}")
    t = results["timing"]
    for part in ("retrieval_seconds", "generation_seconds", "total_seconds"):
        p = t[part]
        if p["p50"] is not None:
            lines.append(f"  latency {part:20s} p50 {1000 * p['p50']:.1f} ms  p95 {1000 * p['p95']:.1f} ms")
    accelerator.print("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Runs the evaluation; returns the results (on the main process; None elsewhere). Raises RagError subclasses
    for user errors."""
    accelerator = Accelerator(cpu=args.cpu)
    set_seed(args.seed)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    examples, dataset_name, split = load_questions(args)

    start = time.perf_counter()
    model, model_info = load_model(args, accelerator)
    model_info["load_seconds"] = time.perf_counter() - start
    model.to(accelerator.device)  # evaluation only: no DDP wrapper needed (it would hide retrieve/generate)
    model.eval()
    retriever_mode, index_facts = prepare_retriever(model, args, accelerator)
    unknown_gold = check_gold_ids(examples, model, accelerator)

    if args.max_new_tokens is not None:
        model.config.max_new_tokens = args.max_new_tokens  # packing keeps room for the answer
    args.n_docs = args.n_docs or model.config.n_docs
    args.generation_mode = args.generation_mode or model.config.generation_mode
    args.max_new_tokens = args.max_new_tokens or model.config.max_new_tokens
    depth = max(max(args.k_values), args.n_docs)
    if model.reranker is not None and model.config.n_candidates < depth:
        raise RagInputError(
            f"The reranker orders n_candidates={model.config.n_candidates} passages per question, fewer than the "
            f"{depth} the metrics need (max of --k-values and --n-docs); pass --n-candidates {depth} or smaller "
            "--k-values."
        )

    accelerator.print(
        f"Evaluating {len(examples)} questions on {accelerator.num_processes} process(es), {retriever_mode} "
        f"retrieval of {depth} passages over {index_facts['count']}"
        + ("" if model.reranker is None else f", reranking {model.config.n_candidates} candidates")
        + ("" if args.retriever_only else f", generating from {args.n_docs} ({args.generation_mode})")
    )
    with torch.no_grad():
        records, wall = run_evaluation(model, examples, args, accelerator, depth)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None

    metrics = compute_metrics(records, args)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(retriever=retriever_mode, retrieved_per_question=depth)
    results = {
        "model": model_info,
        "questions": {
            "source": os.path.abspath(args.questions) if args.questions else args.dataset,
            "dataset_name": dataset_name,
            "split": split,
            "count": len(records),
            "with_answers": sum(bool(r["gold_answers"]) for r in records),
            "with_gold_passage_ids": sum(bool(r["gold_passage_ids"]) for r in records),
            "gold_ids_not_in_index": unknown_gold,
        },
        "index": index_facts,
        "settings": settings,
        "metrics": metrics,
        "timing": timing_summary(records, wall, args),
        "machine": machine_info(accelerator),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    write_predictions(os.path.join(out, PREDICTIONS_NAME), records)
    plot_recall(
        os.path.join(out, RECALL_PLOT_NAME),
        metrics["retrieval"],
        args.k_values,
        f"{dataset_name} ({split}), {retriever_mode} retrieval",
    )
    if "risk_coverage" in metrics and metrics["risk_coverage"]["coverage"]:
        plot_risk_coverage(
            os.path.join(out, RISK_COVERAGE_PLOT_NAME),
            metrics["risk_coverage"],
            f"{dataset_name} ({split}): answer only when confident",
        )
    if args.update_model_card:
        if model_info["local"]:
            entries = eval_result_entries(metrics, dataset_name, split, args.k_values)
            results["model_card"] = update_model_card(model_info["folder"], entries)
            accelerator.print(f"Updated {results['model_card']} and {EVAL_RESULTS_NAME}.")
        else:
            accelerator.print("--update-model-card: skipped, the model is not a local folder.")
    write_json(os.path.join(out, RESULTS_NAME), results)
    print_summary(accelerator, results)
    accelerator.print(f"Wrote {RESULTS_NAME}, {PREDICTIONS_NAME} and {RECALL_PLOT_NAME} to {out}")
    accelerator.wait_for_everyone()
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point; a user error ends the program with a one-line message (exit status 1)."""
    args = parse_args(argv)
    configure_script_output(verbose=args.verbose)
    try:
        return evaluate(args)
    except RagError as err:
        raise SystemExit(f"evaluate_rag.py: error: {err}") from None


if __name__ == "__main__":
    main()

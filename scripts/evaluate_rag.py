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
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_rag import DataFormatError, RagError, RagForGeneration, RagInputError, load_qa_examples
from modeling_rag.constants import (
    EVAL_RESULTS_NAME,
    PREDICTIONS_NAME,
    RECALL_PLOT_NAME,
    RESULTS_NAME,
    RISK_COVERAGE_PLOT_NAME,
)
from modeling_rag.evaluation import (
    compute_metrics,
    eval_result_entries,
    machine_info,
    plot_recall,
    plot_risk_coverage,
    summary_text,
    timing_summary,
    update_model_card,
    write_json,
    write_predictions,
)
from modeling_rag.library_output import configure_script_output
from modeling_rag.utils.chunk_ids import document_id

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
    _add_model_args(parser.add_argument_group("model and index"))
    _add_question_args(parser.add_argument_group("questions"))
    _add_run_args(parser.add_argument_group("evaluation"))
    return parser


def _add_model_args(model) -> None:
    """The model, its index and how passages are retrieved."""
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
    model.add_argument(
        "--reranker-float",
        action="store_true",
        help="Score with the reranker's float weights, not the default int8 copy (RerankerSpeedOptions.int8=False).",
    )
    model.add_argument(
        "--rerank-first-stage-weight",
        type=float,
        default=None,
        help="Weight of the first stage's z-scored score next to the reranker's when ordering candidates "
        "(0: the reranker alone); default: config.rerank_first_stage_weight.",
    )


def _add_question_args(data) -> None:
    """Where the questions come from and which of them are used."""
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


def _add_run_args(run) -> None:
    """How the evaluation runs (generation, batching, processes) and what it writes."""
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default: ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


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
    for name in ("fusion", "hybrid_alpha", "fusion_normalization", "n_candidates", "rerank_first_stage_weight"):
        if getattr(args, name) is not None:
            setattr(model.config, name, getattr(args, name))
    if args.reranker is not None:
        if args.reranker.lower() == "none":
            model.set_reranker(None)
        else:
            from modeling_rag.reranker import CrossEncoderReranker

            model.set_reranker(CrossEncoderReranker.load(args.reranker))
    if args.reranker_float and model.reranker is not None:
        import dataclasses

        model.reranker.speed = dataclasses.replace(model.reranker.speed, int8=False)
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
        "reranker_int8": model.reranker.speed.int8 if model.reranker is not None else None,
        "rerank_first_stage_weight": model.config.rerank_first_stage_weight if model.reranker is not None else None,
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
    depth = settle_generation_settings(model, args)

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

    metrics = compute_metrics(records, k_values=args.k_values, retriever_only=args.retriever_only)
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
        "timing": timing_summary(records, wall, args.latency_batch_size or args.batch_size),
        "machine": machine_info(accelerator),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_outputs(results, records, args, accelerator, f"{dataset_name} ({split})")
    accelerator.wait_for_everyone()
    return results


def settle_generation_settings(model: RagForGeneration, args: argparse.Namespace) -> int:
    """Fills the generation settings left to the model's config into `args`; returns how many passages each
    question retrieves (the max of --k-values and --n-docs), checked against the reranker's candidates."""
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
    return depth


def write_outputs(
    results: dict[str, Any], records: list[dict], args: argparse.Namespace, accelerator: Accelerator, where: str
) -> None:
    """Writes predictions.jsonl, the plots, the model card (with --update-model-card) and results.json into
    --output-dir, then prints the summary. `where` names the data set and split in the plots' titles."""
    out, metrics, retriever_mode = args.output_dir, results["metrics"], results["settings"]["retriever"]
    os.makedirs(out, exist_ok=True)
    write_predictions(os.path.join(out, PREDICTIONS_NAME), records)
    plot_recall(
        os.path.join(out, RECALL_PLOT_NAME), metrics["retrieval"], args.k_values, f"{where}, {retriever_mode} retrieval"
    )
    if "risk_coverage" in metrics and metrics["risk_coverage"]["coverage"]:
        plot_risk_coverage(
            os.path.join(out, RISK_COVERAGE_PLOT_NAME), metrics["risk_coverage"], f"{where}: answer only when confident"
        )
    if args.update_model_card:
        model_info = results["model"]
        if model_info["local"]:
            q = results["questions"]
            entries = eval_result_entries(metrics, q["dataset_name"], q["split"], args.k_values)
            results["model_card"] = update_model_card(model_info["folder"], entries)
            accelerator.print(f"Updated {results['model_card']} and {EVAL_RESULTS_NAME}.")
        else:
            accelerator.print("--update-model-card: skipped, the model is not a local folder.")
    write_json(os.path.join(out, RESULTS_NAME), results)
    accelerator.print(summary_text(results))
    accelerator.print(f"Wrote {RESULTS_NAME}, {PREDICTIONS_NAME} and {RECALL_PLOT_NAME} to {out}")


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

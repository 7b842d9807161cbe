#!/usr/bin/env python
"""Publish a saved RAG model folder (weights, tokenizers, index, model card) to the Hub in one commit.

    python scripts/push_to_hub.py ./my-rag my-org/my-rag
    python scripts/push_to_hub.py ./my-rag my-org/my-rag --revision experiment --private
    python scripts/push_to_hub.py ./my-rag my-org/my-rag --eval-results results.json

Then anyone can load it, index included: `RagForGeneration.from_pretrained("my-org/my-rag", revision=...)`.
"""

from __future__ import annotations

import argparse
import json
import sys

from modeling_rag.errors import RagError
from modeling_rag.hub_utils import push_saved_model_to_hub
from modeling_rag.library_output import configure_script_output


def eval_results_from_file(path: str) -> list[dict]:
    """Reads evaluation results: a list of result dicts, or the results.json of scripts/evaluate_rag.py."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("model_index_results"), list):
        return data["model_index_results"]
    raise SystemExit(
        f"error: {path} holds neither a list of results nor an evaluate_rag.py results.json with 'model_index_results'."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="The folder written by RagForGeneration.save_pretrained.")
    parser.add_argument("repo_id", help="The Hub repository, 'org/name' (created if missing).")
    parser.add_argument("--token", default=None, help="A Hub token with write access (default: the logged-in one).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Push to this branch (created from main if missing).")
    parser.add_argument(
        "--create-pr", action="store_true", help="Open a pull request instead of committing to a branch."
    )
    parser.add_argument("--commit-message", default="Upload RAG model", help="The commit message.")
    parser.add_argument(
        "--eval-results", default=None, help="A JSON file of evaluation results for the card's model-index."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Also show the libraries' own progress bars (uploads) and notices."
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_script_output(verbose=args.verbose)
    eval_results = eval_results_from_file(args.eval_results) if args.eval_results else None
    try:
        url = push_saved_model_to_hub(
            args.folder,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            eval_results=eval_results,
        )
    except RagError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

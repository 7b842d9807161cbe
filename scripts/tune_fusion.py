#!/usr/bin/env python
"""Chooses the hybrid fusion weight of a saved RAG model on development questions, and can store it.

For each ``--alphas`` value (the weight of the dense score, BM25 getting ``1 - alpha``), hybrid
retrieval with weighted fusion of per-query normalised scores (``--normalization``) is run over the
model's index for the ``--questions`` and scored against their gold passage ids (top-k accuracy,
MRR); BM25 alone, dense alone and reciprocal rank fusion are printed beside them. The best weight
(top-1, then MRR) is chosen; ``--write-config`` stores it in the model's ``config.json``
(``fusion="weighted"``, ``hybrid_alpha``, ``fusion_normalization``).

Tune on questions the final numbers are not reported on (training questions, or a dev split),
never on the held-out set.

Example (1,500 training questions of the 23 non-held-out SQuAD articles)::

    python scripts/tune_fusion.py --model my-rag --questions data/squad_27articles_split/train.jsonl --sample 1500
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_rag import RagError, RagForGeneration, load_qa_examples
from modeling_rag.constants import CONFIG_NAME
from modeling_rag.utils.atomic import atomic_write_text


def ranks(row_ids: np.ndarray, passages: list[list[dict]], gold: list[list[str]]) -> list[int | None]:
    out = []
    for plist, g in zip(passages, gold):
        ids = [str(p.get("id")) for p in plist]
        out.append(
            next((r for r, pid in enumerate(ids, 1) if any(pid == x or pid.startswith(x + "#") for x in g)), None)
        )
    return out


def summary(rank_list: list[int | None]) -> dict[str, float]:
    m = {f"top_{k}": float(np.mean([r is not None and r <= k for r in rank_list])) for k in (1, 5, 20)}
    m["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in rank_list]))
    return m


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A saved RagForGeneration folder with its index.")
    parser.add_argument("--questions", required=True, help="Development questions (JSON lines with gold passage ids).")
    parser.add_argument("--sample", type=int, default=None, help="Use a seeded random sample of this many questions.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphas", default="0.3,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.8", help="Dense weights to try.")
    parser.add_argument("--normalization", choices=("zscore", "minmax"), default="zscore")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--write-config", action="store_true", help="Store the chosen fusion in the model's config.")
    args = parser.parse_args(argv)

    model = RagForGeneration.from_pretrained(args.model).eval()
    model.set_reranker(None)  # the first stage alone
    if model.retriever is None or model.retriever.bm25 is None:
        raise RagError(f"{args.model} needs an index with its BM25 part to tune hybrid fusion.")
    examples = [e for e in load_qa_examples(args.questions) if e.positive_passage_ids]
    if args.sample is not None and args.sample < len(examples):
        examples = random.Random(args.seed).sample(examples, args.sample)
    questions = [e.question for e in examples]
    gold = [list(e.positive_passage_ids) for e in examples]
    with torch.no_grad():
        vectors = np.concatenate(
            [
                model.encode_questions(**model.tokenize_questions(questions[s : s + args.batch_size])).float().numpy()
                for s in range(0, len(questions), args.batch_size)
            ]
        )
    retriever = model.retriever
    retriever.use_fusion_settings(model.config)

    def run(mode: str, **settings) -> dict[str, float]:
        retriever.retrieval = mode
        for k, v in settings.items():
            setattr(retriever, k, v)
        out = retriever.retrieve(vectors, 20, questions=questions, return_embeddings=False)
        return summary(ranks(out.row_ids, out.passages, gold))

    table = {"bm25": run("bm25"), "dense": run("dense"), "rrf": run("hybrid", fusion="rrf")}
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    for alpha in tqdm(alphas, desc="Fusion weights"):
        table[f"weighted alpha={alpha}"] = run(
            "hybrid", fusion="weighted", hybrid_alpha=alpha, fusion_normalization=args.normalization
        )
    best = max(alphas, key=lambda a: (table[f"weighted alpha={a}"]["top_1"], table[f"weighted alpha={a}"]["mrr"]))
    print(f"{len(questions)} questions, {retriever.n_passages} passages, normalization={args.normalization}")
    print(f"{'retrieval':24s} top-1  top-5  top-20  MRR    top-1 / BM25")
    for name, m in table.items():
        ratio = m["top_1"] / table["bm25"]["top_1"] if table["bm25"]["top_1"] else float("nan")
        print(f"{name:24s} {m['top_1']:.3f}  {m['top_5']:.3f}  {m['top_20']:.3f}   {m['mrr']:.3f}  {ratio:.3f}")
    print(f"chosen: hybrid_alpha={best}")
    if args.write_config:
        model.config.fusion, model.config.hybrid_alpha = "weighted", best
        model.config.fusion_normalization = args.normalization
        atomic_write_text(os.path.join(args.model, CONFIG_NAME), model.config.to_json_string())
        print(
            f"Stored fusion='weighted', hybrid_alpha={best}, fusion_normalization={args.normalization!r} in {args.model}"
        )
    return {"table": table, "chosen_alpha": best, "questions": len(questions)}


if __name__ == "__main__":
    try:
        result = main()
    except RagError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    else:
        sys.stdout.write(json.dumps({"chosen_alpha": result["chosen_alpha"]}) + "\n")

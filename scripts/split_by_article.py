#!/usr/bin/env python
"""Splits a question file by article, so that training and held-out questions never share a passage.

A question's article is the title of its first gold passage (``positive_passage_ids`` looked up in
``--passages``). ``--held-out`` articles, drawn with ``--seed``, go to ``held_out.jsonl`` with their
passages in ``held_out_passages.jsonl``; the rest go to ``train.jsonl``. ``--also-train`` files are
appended to the training questions (``--train-sample N`` also writes a seeded sample of N of them that
keeps every ``--also-train`` row), and ``--also-passages`` to a combined ``passages.jsonl`` (the
corpus to index for training). ``split.json`` records what went where. Every file is written
atomically.

Example (the 22 SQuAD articles, four held out, plus the five-article training set)::

    python scripts/split_by_article.py --questions data/squad_v1_dev_22articles/questions.jsonl \\
        --passages data/squad_v1_dev_22articles/passages.jsonl --held-out 4 \\
        --also-train data/squad_v2_5articles/train.jsonl \\
        --also-passages data/squad_v2_5articles/passages.jsonl --output-dir runs/squad27
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from modeling_rag.errors import DataFormatError
from modeling_rag.utils.atomic import atomic_write_text


def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}, line {line_no}: not valid JSON ({err.msg}).") from None
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}.")
                rows.append(row)
    except FileNotFoundError:
        raise DataFormatError(f"{path} does not exist.") from None
    if not rows:
        raise DataFormatError(f"{path} has no rows.")
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def article_of(question: dict, titles: dict[str, str], where: str) -> str:
    ids = question.get("positive_passage_ids")
    if isinstance(ids, str):
        ids = [ids]
    if not ids:
        raise DataFormatError(f"{where}: the question has no positive_passage_ids, so its article is unknown.")
    if ids[0] not in titles:
        raise DataFormatError(f"{where}: positive passage id {ids[0]!r} is not in --passages.")
    return titles[ids[0]]


def split(args: argparse.Namespace) -> dict:
    passages = read_jsonl(args.passages)
    titles = {}
    for i, p in enumerate(passages):
        if "id" not in p:
            raise DataFormatError(f"{args.passages}, row {i + 1}: a passage needs an 'id'.")
        titles[str(p["id"])] = str(p.get("title") or str(p["id"]).rsplit("-", 1)[0])
    questions = read_jsonl(args.questions)
    articles = [article_of(q, titles, f"{args.questions}, row {i + 1}") for i, q in enumerate(questions)]
    names = sorted(set(articles))
    if not 0 < args.held_out < len(names):
        raise DataFormatError(
            f"--held-out must be between 1 and {len(names) - 1} (there are {len(names)} articles), got {args.held_out}."
        )
    held = set(random.Random(args.seed).sample(names, args.held_out))
    train = [q for q, a in zip(questions, articles) if a not in held]
    held_out = [q for q, a in zip(questions, articles) if a in held]
    also = [row for path in args.also_train or [] for row in read_jsonl(path)]
    sample = None
    if args.train_sample is not None:
        if not len(also) <= args.train_sample <= len(also) + len(train):
            raise DataFormatError(
                f"--train-sample must be between {len(also)} (the --also-train rows) and {len(also) + len(train)}, "
                f"got {args.train_sample}."
            )
        rng = random.Random(args.seed)
        sample = also + rng.sample(train, args.train_sample - len(also))
        rng.shuffle(sample)
    train.extend(also)
    corpus = list(passages)
    for path in args.also_passages or []:
        corpus.extend(read_jsonl(path))
    ids = [str(p["id"]) for p in corpus]
    if len(set(ids)) != len(ids):
        raise DataFormatError("The combined passages repeat an id; --also-passages must not overlap --passages.")

    os.makedirs(args.output_dir, exist_ok=True)
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    write_jsonl(out("train.jsonl"), train)
    write_jsonl(out("held_out.jsonl"), held_out)
    write_jsonl(out("held_out_passages.jsonl"), [p for p in passages if titles[str(p["id"])] in held])
    write_jsonl(out("passages.jsonl"), corpus)
    if sample is not None:
        write_jsonl(out("train_sample.jsonl"), sample)
    summary = {
        "seed": args.seed,
        "held_out_articles": sorted(held),
        "train_articles": [n for n in names if n not in held],
        "train_questions": len(train),
        "held_out_questions": len(held_out),
        "passages": len(corpus),
        "train_sample_questions": None if sample is None else len(sample),
    }
    atomic_write_text(out("split.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="JSON lines with question, answers, positive_passage_ids.")
    parser.add_argument("--passages", required=True, help="JSON lines with id, title, text.")
    parser.add_argument("--held-out", type=int, default=4, help="How many articles to hold out.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw of held-out articles.")
    parser.add_argument("--also-train", nargs="*", help="Question files appended to the training split.")
    parser.add_argument("--also-passages", nargs="*", help="Passage files appended to the combined corpus.")
    parser.add_argument(
        "--train-sample",
        type=int,
        default=None,
        help="Also write train_sample.jsonl: every --also-train row plus a seeded random draw of split training "
        "questions, this many in all, shuffled (for runs that cannot afford every question).",
    )
    parser.add_argument("--output-dir", required=True)
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    summary = split(args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

#!/usr/bin/env python
"""Fits when a RAG model abstains ("the documents don't say"), on dev questions with and without answers.

The model answers every dev question once (greedy, its own retrieval); the abstention features of each
answer (`modeling_rag.abstention`: best passage similarity, the reader's likelihood of its answer, its
lean towards the no-answer response, whether it gave it, and the reranker's best relevance when the model
has one) are fitted with a logistic model: answerable (1)
against unanswerable (0). The threshold is the highest at which at most ``--max-false-abstention`` of
the answerable dev questions are abstained. The rule is written into the model's config (``--model``
folder) and, with ``--reader``, into a reader adapter's settings, so that it ships with the reader.

    python scripts/calibrate_abstention.py --model runs/reader/final \\
        --answerable data/squad_v2_5articles/dev.jsonl \\
        --unanswerable data/squad_v2_5articles/unanswerable_dev.jsonl data/squad_v1_dev_22articles/off_corpus_sample92.jsonl \\
        --reader runs/reader/adapter

Fit it on dev questions only; measure it on others (``scripts/evaluate_rag.py --unanswerable``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm.auto import tqdm

from modeling_rag import RagError, RagForGeneration, load_qa_examples
from modeling_rag.abstention import AnswerSignals, fit_abstention, no_answer_sequence_bias
from modeling_rag.constants import CONFIG_NAME
from modeling_rag.readers import READER_CONFIG_NAME, read_reader_config, save_reader_settings
from modeling_rag.utils.atomic import atomic_write_text


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="A saved RagForGeneration folder with its index.")
    p.add_argument("--answerable", required=True, help="Dev questions with gold answers (.jsonl).")
    p.add_argument(
        "--unanswerable",
        required=True,
        nargs="+",
        help="Dev questions the documents do not answer (.jsonl files): questions written against a passage that "
        "does not answer them (SQuAD v2) and questions about what the corpus does not cover at all.",
    )
    p.add_argument(
        "--max-false-abstention",
        type=float,
        default=0.05,
        help="Share of answerable dev questions the rule may abstain on (default 0.05).",
    )
    p.add_argument(
        "--reader",
        default=None,
        help="A reader folder whose settings get the rule too; a new folder becomes a settings-only reader "
        "(the model's generator as it is, with this rule), which needs --base-generator.",
    )
    p.add_argument(
        "--base-generator",
        default=None,
        help="With a new --reader folder: the name of the generator the rule was fitted for (e.g. SmolLM2-135M-Instruct).",
    )
    p.add_argument(
        "--no-answer-bias",
        type=float,
        default=0.0,
        help="Added to the logit of the no-answer response's second token once an answer begins with its first "
        "(<= 0; stored with the rule). A reader trained on unanswerable questions that gives its no-answer "
        "response too readily answers more with a negative bias, and the rule decides (default 0: none).",
    )
    p.add_argument(
        "--signals",
        default=None,
        help="Refit from the per-question signals of an earlier run's --output file (same questions, same bias) "
        "instead of generating again, e.g. at another --max-false-abstention.",
    )
    p.add_argument("--batch-size", type=int, default=8, help="Questions per generation batch.")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Answer length; default: the config's.")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--output", default=None, help="Also write the fitted rule and the per-question signals here.")
    return p


def collect_signals(
    model, questions: list[str], batch_size: int, max_new_tokens, desc: str, no_answer_bias: float = 0.0
) -> AnswerSignals:
    rows = []
    bias = no_answer_sequence_bias(model, no_answer_bias)
    for s in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch"):
        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        kwargs["sequence_bias"] = bias  # this bias only, not one the model's current rule holds
        answers = model.answer(questions[s : s + batch_size], abstention_threshold=0.0, do_sample=False, **kwargs)
        rows.extend(a.signals for a in answers)
    return AnswerSignals.from_rows(rows)


def load_signals(path: str, n_answerable: int, n_unanswerable: int, no_answer_bias: float):
    """The per-question signals of an earlier run's --output file, checked against the questions given."""
    try:
        dump = json.loads(open(path, encoding="utf-8").read())
        sig_a, sig_u = AnswerSignals.from_rows(dump["answerable"]), AnswerSignals.from_rows(dump["unanswerable"])
        bias = float(dump["rule"].get("no_answer_bias", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: --signals {path} is not an --output file of this script ({err}).") from None
    if (len(sig_a.says_no_answer), len(sig_u.says_no_answer)) != (n_answerable, n_unanswerable):
        raise SystemExit(
            f"error: --signals {path} holds {len(sig_a.says_no_answer)} answerable and {len(sig_u.says_no_answer)} "
            f"unanswerable questions, but {n_answerable} and {n_unanswerable} were given: use the same files."
        )
    if bias != no_answer_bias:
        raise SystemExit(f"error: --signals {path} was collected with --no-answer-bias {bias}; pass the same.")
    return sig_a, sig_u


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not -100.0 <= args.no_answer_bias <= 0.0:
        raise SystemExit(f"error: --no-answer-bias must be between -100 and 0, got {args.no_answer_bias}.")
    if not 0.0 <= args.max_false_abstention < 1.0:
        raise SystemExit("error: --max-false-abstention must be in [0, 1).")
    model = RagForGeneration.from_pretrained(args.model).eval()
    model.config.abstention = None  # fit from the reader's own signals, not from an earlier rule
    answerable = [e.question for e in load_qa_examples(args.answerable)]
    unanswerable = [e.question for path in args.unanswerable for e in load_qa_examples(path, require_answers=False)]
    if args.signals:
        sig_a, sig_u = load_signals(args.signals, len(answerable), len(unanswerable), args.no_answer_bias)
    else:
        with torch.no_grad():
            sig_a = collect_signals(
                model, answerable, args.batch_size, args.max_new_tokens, "answerable dev", args.no_answer_bias
            )
            sig_u = collect_signals(
                model, unanswerable, args.batch_size, args.max_new_tokens, "unanswerable dev", args.no_answer_bias
            )
    fitted_on = (
        f"{len(answerable)} answerable ({os.path.basename(args.answerable)}) and {len(unanswerable)} unanswerable "
        f"({', '.join(map(os.path.basename, args.unanswerable))}) dev questions, at most {args.max_false_abstention:.0%} "
        "answerable abstained"
    )
    cal = fit_abstention(
        sig_a,
        sig_u,
        max_false_abstention=args.max_false_abstention,
        fitted_on=fitted_on,
        no_answer_bias=args.no_answer_bias,
    )
    rule = cal.to_dict()

    config_path = os.path.join(args.model, CONFIG_NAME)
    config = json.loads(open(config_path, encoding="utf-8").read())
    config["abstention"] = rule
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    if args.reader and not os.path.isfile(os.path.join(args.reader, READER_CONFIG_NAME)):
        if not args.base_generator:
            raise SystemExit(
                "error: a new --reader folder needs --base-generator NAME (the generator it was fitted for)."
            )
        model.config.abstention = rule
        save_reader_settings(model, args.reader, base_generator=args.base_generator, notes={"abstention": fitted_on})
    elif args.reader:
        reader = read_reader_config(args.reader)
        reader["settings"]["abstention"] = rule
        atomic_write_text(os.path.join(args.reader, READER_CONFIG_NAME), json.dumps(reader, indent=2) + "\n")
    if args.output:
        dump = {"rule": rule, "answerable": sig_a.to_rows(), "unanswerable": sig_u.to_rows()}
        atomic_write_text(args.output, json.dumps(dump, indent=2) + "\n")
    m = cal.dev_metrics
    print(
        f"Fitted on {fitted_on}.\n  threshold {cal.threshold:.4f}: answerable abstained "
        f"{m['answerable_abstained']:.1%}, unanswerable abstained {m['unanswerable_abstained']:.1%}\n"
        f"  weights {dict(zip(cal.features, [round(w, 4) for w in cal.weights]))}, bias {cal.bias:.4f}\n"
        f"Wrote the rule into {config_path}" + (f" and {args.reader}" if args.reader else "")
    )
    return rule


if __name__ == "__main__":
    try:
        main()
    except RagError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

#!/usr/bin/env python
"""Trains a cross-encoder reranker (question, passage) -> relevance, with Accelerate and LoRA (peft).

The cross-encoder starts from the weights of an encoder the package has (all-MiniLM-L6-v2 by
default). Its head (``--head``) is by default ``segment_cosine``: the scaled cosine between the
mean states of the question and of the passage read together, which ranks sensibly before any
training; ``sequence_classification`` is a new one-logit head over ``[CLS]``, which starts at chance
and needs far more steps than a CPU affords. Each training question gives one gold passage
(label 1) and ``--negatives-per-question`` negatives (label 0) mined from the first stage: passages
ranked in its top ``--mining-top-k`` that are not gold and contain no gold answer string. The loss
is binary cross-entropy (so ``sigmoid(logit)`` is a relevance probability) plus the listwise
cross-entropy of the gold passage among the question's pairs (which is what orders candidates).

The first stage is the retriever of ``--model`` (a saved RAG model with its index, in its own
retrieval mode) or, without ``--model``, a hybrid retriever built from ``--corpus`` with
``--question-encoder``. Validation reranks the first stage's top ``--eval-candidates`` for the
``--dev-file`` questions and reports top-k accuracy and MRR, before and after reranking.

Saved into ``output-dir/reranker``: the reranker (a LoRA adapter + head, a few MB, over the named
base model; never a copy of the base). With ``--model``, ``output-dir/final`` holds that RAG model
with the reranker attached (in its ``reranker/`` subfolder, named by ``config.reranker``).

Examples::

    python scripts/train_reranker.py --config configs/train/reranker.yaml --cpu
    accelerate launch --config_file configs/accelerate/two_cpu_processes.yaml \\
        scripts/train_reranker.py --config configs/train/reranker.yaml
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from modeling_rag.constants import FINAL_MODEL_DIR, RERANKER_DIR
from modeling_rag.errors import RagConfigError, RagError
from modeling_rag.metrics import answer_in_text
from modeling_rag.training import (
    Trainer,
    broadcast_from_main,
    build_parser,
    check_positive,
    create_accelerator,
    load_training_examples,
    parse_args,
    require,
    seed_everything,
    setup_logging,
)
from modeling_rag.utils.atomic import atomic_write_text

logger = logging.getLogger("train_reranker")


def get_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    g = parser.add_argument_group("reranker")
    g.add_argument(
        "--reranker-base",
        default="default",
        help="The encoder the cross-encoder starts from: 'default' (all-MiniLM-L6-v2, installed with the "
        "package), a folder or a Hub id; recorded by name in the saved adapter.",
    )
    g.add_argument(
        "--head",
        default="segment_cosine",
        choices=["segment_cosine", "sequence_classification"],
        help="How a pair is scored (see modeling_rag.reranker.RERANKER_HEADS).",
    )
    g.add_argument(
        "--head-learning-rate",
        type=float,
        default=1e-2,
        help="Learning rate of the segment_cosine head's scale and bias (the LoRA weights use --learning-rate).",
    )
    g.add_argument(
        "--init-reranker",
        default=None,
        help="Continue training a saved adapter reranker (a folder written by this script, same --head and "
        "base): its LoRA weights and head are the starting point instead of a fresh adapter.",
    )
    g.add_argument("--max-length", type=int, default=256, help="Tokens of one (question, passage) pair.")
    g.add_argument("--negatives-per-question", type=int, default=3, help="Mined negatives per training question.")
    g.add_argument("--mining-top-k", type=int, default=20, help="First-stage depth that negatives are drawn from.")
    g.add_argument("--eval-candidates", type=int, default=20, help="First-stage candidates reranked in validation.")
    g.add_argument(
        "--train-questions",
        type=int,
        default=None,
        help="Train on a seeded random sample of this many questions (default: all).",
    )
    g.add_argument("--listwise-weight", type=float, default=1.0, help="Weight of the listwise loss next to BCE.")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r).")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="Dropout on the LoRA branch.")
    g.add_argument(
        "--lora-target-modules",
        default="query,key,value,dense",
        help="Comma-separated module names that get LoRA adapters (BERT names).",
    )
    g.add_argument("--eval-batch-size", type=int, default=32, help="Dev questions per reranking call.")
    return parser


# --------------------------------------------------------------------------------------------------
# first stage
# --------------------------------------------------------------------------------------------------
class FirstStage:
    """Candidates for questions: a saved RAG model's retriever, or a hybrid retriever over a corpus."""

    def __init__(self, args):
        self.model = None
        if args.model:
            from modeling_rag import RagForGeneration

            self.model = RagForGeneration.from_pretrained(args.model).eval()
            self.model.config.reranker = None  # candidates come from the first stage alone
            self.model.reranker = None
            if self.model.retriever is None:
                raise RagConfigError(f"--model {args.model} has no index; save it with one, or give --corpus.")
            self.retriever = self.model.retriever
        else:
            require(args, "question_encoder", "corpus")
            from transformers import AutoModel, AutoTokenizer

            from modeling_rag.assets import resolve_model
            from modeling_rag.retrieval_rag import RagRetriever

            path = resolve_model(args.question_encoder, "question_encoder")
            self.encoder, self.tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
            self.retriever = RagRetriever.from_corpus(
                args.corpus,
                self.encoder,
                self.tokenizer,
                max_tokens=args.index_max_tokens,
                bm25=True,
                retrieval="hybrid",
                show_progress=False,
            )

    def retrieve(self, questions: list[str], k: int, batch_size: int = 32) -> list:
        from modeling_rag.encoders import encode_texts

        outs = []
        for s in range(0, len(questions), batch_size):
            part = questions[s : s + batch_size]
            if self.model is not None:
                outs.append(self.model.retrieve(part, n_docs=k))
            else:
                q = encode_texts(part, self.encoder, self.tokenizer, pooling="mean", normalize=True)
                outs.append(self.retriever.retrieve(q, k, questions=part, return_embeddings=False))
        return outs


def passage_fields(p: dict) -> dict:
    return {k: p.get(k) for k in ("id", "title", "text", "row_id")}


def is_gold(pid: str, gold_ids) -> bool:
    return any(pid == g or pid.startswith(g + "#") for g in gold_ids)


def mine(first_stage, examples, args) -> list[dict]:
    """Per question: its gold passage and mined negatives (plain dicts; no gold id, no gold answer string)."""
    passages = first_stage.retriever.index.get_passages(first_stage.retriever.index.row_ids)
    by_id = {}
    for p in passages:
        by_id.setdefault(str(p["id"]).split("#")[0], p)
    rng = random.Random(args.seed)
    rows, skipped = [], 0
    outs = first_stage.retrieve([e.question for e in examples], args.mining_top_k)
    candidates = [plist for out in outs for plist in out.passages]
    for ex, plist in zip(examples, candidates):
        gold = [by_id[g] for g in ex.positive_passage_ids if g in by_id]
        if not gold:
            skipped += 1
            continue
        pool = [
            p
            for p in plist
            if not is_gold(str(p.get("id")), ex.positive_passage_ids)
            and not answer_in_text(ex.answers, p.get("text") or "")
        ]
        if not pool:
            skipped += 1
            continue
        # the hardest one always, the rest drawn from the first stage's top: hard but not only the hardest
        negatives = pool[:1] + rng.sample(pool[1:], min(len(pool) - 1, args.negatives_per_question - 1))
        rows.append(
            {
                "question": ex.question,
                "positive": passage_fields(gold[0]),
                "negatives": [passage_fields(p) for p in negatives],
            }
        )
    logger.info("Mined negatives for %d questions (%d skipped: no gold passage or no negative)", len(rows), skipped)
    return rows


def ranking_metrics(ranked_ids: list[list[str]], gold: list[list[str]], ks=(1, 5, 10, 20)) -> dict:
    ranks = []
    for ids, g in zip(ranked_ids, gold):
        ranks.append(next((r for r, pid in enumerate(ids, 1) if is_gold(pid, g)), None))
    out = {f"top_{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
    out["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
    return out


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def build_cross_encoder(args):
    """The model to train (LoRA over the base encoder, plus its head) and its tokenizer."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modeling_rag.assets import resolve_model
    from modeling_rag.reranker import SegmentCosineScorer, encoder_without_pooler

    path = resolve_model(args.reranker_base, "question_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path)
    targets = [t.strip() for t in str(args.lora_target_modules).split(",") if t.strip()]
    lora = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets)
    if args.init_reranker:
        return _continue_from(args, path), tokenizer
    if args.head == "segment_cosine":
        return SegmentCosineScorer(get_peft_model(encoder_without_pooler(path), LoraConfig(**lora))), tokenizer
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, **lora)), tokenizer


def _continue_from(args, base_path):
    """The trainable model of a saved adapter reranker (``--init-reranker``): its LoRA weights and head."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from modeling_rag.constants import RERANKER_CONFIG_NAME
    from modeling_rag.reranker import HEAD_FILE, SegmentCosineScorer, encoder_without_pooler

    folder = args.init_reranker
    config_path = os.path.join(folder, RERANKER_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise RagConfigError(
            f"--init-reranker {folder} has no {RERANKER_CONFIG_NAME}; give a folder this script saved."
        )
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("kind") != "adapter" or saved.get("head", "sequence_classification") != args.head:
        raise RagConfigError(
            f"--init-reranker {folder} is a {saved.get('kind')!r} reranker with head {saved.get('head')!r}; "
            f"continuing needs an adapter with head {args.head!r} (set --head to match)."
        )
    if args.head == "segment_cosine":
        encoder = PeftModel.from_pretrained(encoder_without_pooler(base_path), folder, is_trainable=True)
        scorer = SegmentCosineScorer(encoder)
        scorer.load_head_state(load_file(os.path.join(folder, HEAD_FILE)), os.path.join(folder, HEAD_FILE))
        return scorer
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
    return PeftModel.from_pretrained(base, folder, is_trainable=True)


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv)
    require(args, "train_file", "output_dir")
    check_positive(args, "batch_size", "num_epochs", "max_length", "negatives_per_question", "mining_top_k")
    check_positive(args, "eval_candidates", "lora_r", "eval_batch_size")
    accelerator = create_accelerator(args)
    setup_logging(accelerator)
    seed_everything(args.seed)
    t_start = time.time()

    from modeling_rag.reranker import CrossEncoderReranker, RerankerSpeedOptions

    first_stage = FirstStage(args)
    train = load_training_examples(args.train_file)
    if args.train_questions is not None and args.train_questions < len(train):
        train = random.Random(args.seed).sample(train, args.train_questions)
    dev = load_training_examples(args.dev_file, limit=args.max_dev_examples) if args.dev_file else None
    rows = broadcast_from_main(accelerator, lambda: mine(first_stage, train, args))
    if not rows:
        raise RagConfigError("No training question has both a gold passage in the corpus and a mined negative.")
    dev_candidates = None
    if dev:
        dev_candidates = [
            plist
            for out in first_stage.retrieve([e.question for e in dev], args.eval_candidates)
            for plist in out.passages
        ]

    peft_model, tokenizer = build_cross_encoder(args)
    # float scoring in validation: the weights change in place between evaluations (no stale int8 copy)
    reranker = CrossEncoderReranker(
        peft_model, tokenizer, max_length=args.max_length, speed=RerankerSpeedOptions(int8=False)
    )
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if accelerator.is_main_process:
        logger.info(
            "Training %d parameters (LoRA + head) on %d questions x %d pairs",
            sum(p.numel() for _, p in trainable),
            len(rows),
            1 + args.negatives_per_question,
        )
    bce = torch.nn.BCEWithLogitsLoss()

    def train_step(indices):
        trainer = holder["trainer"]
        reranker.model = trainer.module
        pairs, labels, groups = [], [], []
        for i in indices:
            row = rows[i]
            group = [row["positive"], *row["negatives"]]
            groups.append(len(group))
            pairs.extend(reranker.pair_ids(row["question"], group))
            labels.extend([1.0] + [0.0] * len(row["negatives"]))
        logits = reranker.logits(pairs)
        loss = bce(logits, torch.tensor(labels, device=logits.device))
        if args.listwise_weight:
            listwise = [
                -torch.log_softmax(part, 0)[0] for part in torch.split(logits, groups)
            ]  # the gold passage is first in its group
            loss = loss + args.listwise_weight * torch.stack(listwise).mean()
        accelerator.backward(loss)
        return loss.detach()

    def evaluate() -> dict:
        if dev is None or not accelerator.is_main_process:
            return {}
        reranker.model = accelerator.unwrap_model(holder["trainer"].module)
        ranked = []
        for s in range(0, len(dev), args.eval_batch_size):
            part = dev[s : s + args.eval_batch_size]
            scores = reranker.score([e.question for e in part], dev_candidates[s : s + len(part)])
            for plist, sc in zip(dev_candidates[s : s + len(part)], scores):
                ranked.append([str(plist[j].get("id")) for j in np.argsort(-sc, kind="stable")])
        return {f"reranked_{k}": v for k, v in ranking_metrics(ranked, [e.positive_passage_ids for e in dev]).items()}

    first_stage_dev = None
    if dev:
        first_stage_dev = ranking_metrics(
            [[str(p.get("id")) for p in plist] for plist in dev_candidates], [e.positive_passage_ids for e in dev]
        )
        logger.info("First stage on the dev questions: %s", json.dumps(first_stage_dev))

    holder = {}
    trainer = Trainer(
        accelerator,
        args,
        peft_model,
        len(rows),
        train_step,
        evaluate=evaluate if dev else None,
        named_parameters=trainable,
        learning_rate_for=lambda name: args.head_learning_rate if name in ("scale", "bias") else args.learning_rate,
    )
    holder["trainer"] = trainer
    trainer.train()
    result = {"history": trainer.history, "stopped_early": trainer.stopped_early, "first_stage_dev": first_stage_dev}
    if trainer.stopped_early:
        trainer.end()
        return result
    peft_model = accelerator.unwrap_model(trainer.module)
    peft_model.eval()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not args.no_save:
        final = CrossEncoderReranker.from_peft_model(
            peft_model, tokenizer, base_model=_portable_name(args.reranker_base), max_length=args.max_length
        )
        out = os.path.join(args.output_dir, RERANKER_DIR)
        final.save(out)
        accelerator.print(f"Saved the reranker to {out}")
        if first_stage.model is not None:
            first_stage.model.set_reranker(final)
            first_stage.model.save_pretrained(os.path.join(args.output_dir, FINAL_MODEL_DIR))
            accelerator.print(
                f"Saved the RAG model with the reranker to {os.path.join(args.output_dir, FINAL_MODEL_DIR)}"
            )
        summary = {
            "first_stage_dev": first_stage_dev,
            "final_eval": next((h for h in reversed(trainer.history) if "eval_reranked_top_1" in h), None),
            "train_questions": len(rows),
            "train_seconds": round(time.time() - t_start, 1),
        }
        atomic_write_text(os.path.join(args.output_dir, "final_metrics.json"), json.dumps(summary, indent=2) + "\n")
        result["final"] = summary
    trainer.end()
    return result


def _portable_name(base: str) -> str:
    """The base model's name as the saved adapter records it: the package's default by name, not by folder."""
    from modeling_rag.assets import DEFAULT_QUESTION_ENCODER

    return DEFAULT_QUESTION_ENCODER if base == "default" else base


if __name__ == "__main__":
    try:
        main()
    except RagError as err:  # bad options or data: the message says what to change
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

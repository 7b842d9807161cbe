#!/usr/bin/env python
"""Fine-tunes a RAG model's generator on answers given the question and retrieved passages, with Accelerate.

The retriever is frozen, so retrieval is done once, up front (and can be cached in a JSON file with
``--retrieval-cache``). The loss is the cross-entropy of the answer tokens (the first gold answer),
conditioned on the packed prompt (instruction, passages, question) exactly as the model builds it at
inference time; it works for decoder-only and encoder-decoder generators. ``--lora`` trains only LoRA
adapters (peft), merged into the weights before saving. ``--n-docs`` / ``--max-input-tokens`` /
``--max-passage-tokens`` limit the context and are stored in the saved model's config.

Examples::

    python scripts/train_generator.py --config configs/train/generator.yaml --cpu
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train_generator.py \\
        --config configs/train/generator.yaml --mixed-precision bf16
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from modeling_rag.errors import RagConfigError, RagError
from modeling_rag.training import (
    Trainer,
    add_context_args,
    add_lora_args,
    answer_metrics,
    apply_context_args,
    apply_lora,
    broadcast_from_main,
    build_parser,
    cast_for_saving,
    check_positive,
    create_accelerator,
    enable_gradient_checkpointing,
    gold_positions,
    load_rag_model,
    load_training_examples,
    merge_lora,
    negative_positions,
    parse_args,
    passage_lookup,
    require,
    retrieve_all,
    save_final_model,
    seed_everything,
    setup_logging,
    write_final_metrics,
)
from modeling_rag.utils.atomic import atomic_open

logger = logging.getLogger("train_generator")


def get_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    add_context_args(parser)
    add_lora_args(parser)
    g = parser.add_argument_group("generator")
    g.add_argument(
        "--generation-mode",
        default="concat",
        choices=["concat", "rag_sequence", "rag_token"],
        help="How passages reach the generator in training (concat: one input with all passages).",
    )
    g.add_argument(
        "--include-gold-passage",
        action="store_true",
        help="In training, put the question's gold passage in place of the last retrieved one when retrieval "
        "missed it (teaches reading; evaluation always uses plain retrieval).",
    )
    g.add_argument(
        "--retrieval-cache",
        default=None,
        help="A JSON file caching the up-front retrieval of the training and validation questions "
        "(reused when it matches the questions and n_docs).",
    )
    g.add_argument(
        "--unanswerable-file",
        default=None,
        help="Questions the passages do not answer (.jsonl; answers empty, e.g. SQuAD v2's unanswerable ones): "
        "their target is the model's no-answer response (config.no_answer_text), so the reader learns to say "
        "so instead of guessing. With --include-gold-passage, the passage each was asked about (its "
        "asked_about_passage_id / hard negatives) is put in its context.",
    )
    g.add_argument(
        "--max-unanswerable-examples", type=int, default=None, help="Use only the first N unanswerable questions."
    )
    g.add_argument(
        "--unanswerable-repeat",
        type=int,
        default=1,
        help="Repeat each unanswerable question N times in the training set, to keep their share up when the "
        "answerable file is large (426 SQuAD v2 ones beside 4,802 answerable are 8%%; 3 repeats make 21%%).",
    )
    g.add_argument(
        "--no-answer-text",
        default=None,
        help="The no-answer response to train (stored in the saved config); default: the config's no_answer_text.",
    )
    g.add_argument(
        "--save-adapter",
        default=None,
        help="With --lora: also save the LoRA adapter and the reader settings (no-answer response, context, "
        "prompt) into this folder, before merging: a reader that ships as a small adapter over the base "
        "generator (modeling_rag.readers).",
    )
    g.add_argument(
        "--init-reader",
        default=None,
        help="With --lora: continue training this reader folder's adapter (e.g. "
        "modeling_rag/readers_data/smollm2-135m-instruct) instead of new LoRA weights; its context and prompt "
        "settings are used unless given here, its abstention rule is dropped (refit it after training).",
    )
    g.add_argument("--eval-before-training", action="store_true", help="Measure EM / F1 on --dev-file before training.")
    return parser


def _cached_retrieval(model, args, train, dev, n_docs):
    """Retrieval results for train and dev questions, from `--retrieval-cache` when it matches."""
    key = {
        "n_docs": n_docs,
        "train": [ex.question for ex in train],
        "dev": [ex.question for ex in dev] if dev else [],
        "index_fingerprint": model.retriever.index.encoder_fingerprint,
        "index_count": model.retriever.index.count,
    }
    path = args.retrieval_cache
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            logger.info("Using the cached retrieval in %s", path)
            return cached["train"], cached["dev"]
    t0 = time.time()
    train_r = retrieve_all(model, key["train"], n_docs)
    dev_r = retrieve_all(model, key["dev"], n_docs) if dev else ([], [])
    logger.info("Retrieved passages for %d questions in %.1fs", len(train) + len(key["dev"]), time.time() - t0)
    if path:
        with atomic_open(path) as f:
            json.dump({"key": key, "train": train_r, "dev": dev_r}, f)
    return train_r, dev_r


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv)
    require(args, "train_file", "output_dir")
    check_positive(args, "batch_size", "gradient_accumulation_steps", "num_epochs", "unanswerable_repeat")
    accelerator = create_accelerator(args)
    setup_logging(accelerator, verbose=args.verbose)
    seed_everything(args.seed)
    t_start = time.time()

    if args.init_reader and not args.lora:
        raise RagConfigError("--init-reader continues a LoRA reader: add --lora.")
    # an adapter is trained over the generator's own weights, not over the shipped reader merged into them;
    # retrieval here is the first stage (the gold passage is put in with --include-gold-passage), not reranked
    model, original_dtype = load_rag_model(
        args, reader_adapter=None if args.lora else "auto", reranker=None if args.lora else "auto"
    )
    if model.retriever is None:
        raise RagConfigError("The model has no index: give --corpus to build one, or a --model saved with its index.")
    if args.init_reader:
        from modeling_rag.readers import apply_reader

        apply_reader(model, args.init_reader, trainable=True)
    apply_context_args(model, args)
    model.config.generation_mode = args.generation_mode
    n_docs = model.config.n_docs
    model.question_encoder.requires_grad_(False)
    if model.context_encoder is not None:
        model.context_encoder.requires_grad_(False)
    if args.save_adapter and not args.lora:
        raise RagConfigError("--save-adapter saves LoRA adapters: add --lora.")
    if args.lora and not args.init_reader:
        apply_lora(model, args)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.generator)
        model.generator.config.use_cache = False

    passages, by_id = passage_lookup(model.retriever.index)
    train = load_training_examples(args.train_file, known_passage_ids=set(by_id), limit=args.max_train_examples)
    dev = (
        load_training_examples(args.dev_file, known_passage_ids=set(by_id), limit=args.max_dev_examples)
        if args.dev_file
        else None
    )
    if args.no_answer_text:
        model.config.no_answer_text = args.no_answer_text
    n_answerable = len(train)
    if args.unanswerable_file:
        unanswerable = load_training_examples(
            args.unanswerable_file,
            require_answers=False,
            known_passage_ids=set(by_id),
            limit=args.max_unanswerable_examples,
        )
        for ex in unanswerable:
            ex.answers = [model.config.no_answer_text]
        train = train + unanswerable * args.unanswerable_repeat
        logger.info(
            "Training on %d answerable and %d unanswerable questions (target %r)",
            n_answerable,
            len(train) - n_answerable,
            model.config.no_answer_text,
        )
    (train_passages, train_scores), (dev_passages, dev_scores) = broadcast_from_main(
        accelerator, lambda: _cached_retrieval(model, args, train, dev, n_docs)
    )
    if args.include_gold_passage:
        replaced = 0
        for i, ex in enumerate(train):
            # answerable: the gold passage; unanswerable: the tempting passage it was written against
            gold = gold_positions(ex, by_id, passages) if i < n_answerable else negative_positions(ex, by_id, passages)
            got = {p.get("row_id") for p in train_passages[i]}
            if gold and not any(passages[g]["row_id"] in got for g in gold):
                g = passages[gold[0]]
                train_passages[i][-1] = {k: g.get(k) for k in ("id", "title", "text", "source", "row_id")}
                replaced += 1
        logger.info("Put the gold passage in the context of %d / %d training questions", replaced, len(train))

    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if accelerator.is_main_process:
        total = sum(p.numel() for _, p in trainable)
        logger.info("Training %d parameters (%s)", total, "LoRA adapters" if args.lora else "the generator")

    def train_step(indices):
        trainer = holder["trainer"]
        batch = model.prepare_inputs(
            [train[i].question for i in indices],
            [train[i].answers[0] for i in indices],
            passages=[train_passages[i] for i in indices],
            doc_scores=[train_scores[i] for i in indices] if args.generation_mode != "concat" else None,
            generation_mode=args.generation_mode,
        )
        out = trainer.module(**batch)
        accelerator.backward(out.loss)
        return out.loss.detach()

    def evaluate() -> dict:
        if dev is None or not accelerator.is_main_process:
            return {}
        metrics, _ = answer_metrics(
            model,
            dev,
            passages=dev_passages,
            doc_scores=dev_scores,
            batch_size=args.eval_batch_size,
            max_new_tokens=args.eval_max_new_tokens,
        )
        return metrics

    holder = {}
    trainer = Trainer(
        accelerator,
        args,
        model,
        len(train),
        train_step,
        evaluate=evaluate if dev is not None else None,
        named_parameters=trainable,
    )
    holder["trainer"] = trainer
    before = trainer.evaluate_before_training() if args.eval_before_training else None
    trainer.train()
    result = {"history": trainer.history, "stopped_early": trainer.stopped_early}
    if trainer.stopped_early:
        trainer.end()
        return result
    model = accelerator.unwrap_model(trainer.module)
    if args.lora and args.save_adapter and accelerator.is_main_process:
        from modeling_rag.assets import DEFAULT_GENERATOR, is_default_generator
        from modeling_rag.readers import save_reader

        base = DEFAULT_GENERATOR if args.generator and is_default_generator(args.generator) else args.generator
        notes = {
            "answerable_questions": n_answerable,
            "unanswerable_questions": len(train) - n_answerable,
            "steps": trainer.state.global_step,
            "seconds": round(time.time() - t_start, 1),
        }
        cast_for_saving(model, args.save_dtype, original_dtype)
        logger.info(
            "Saved the reader adapter to %s", save_reader(model, args.save_adapter, base_generator=base, notes=notes)
        )
    if args.lora:
        merge_lora(model)
    model.eval()
    final = write_final_metrics(accelerator, trainer, args.output_dir, before, t_start)
    if final is not None:
        result["final"] = final
    save_final_model(accelerator, model, args, original_dtype)
    trainer.end()
    return result


if __name__ == "__main__":
    try:
        main()
    except RagError as err:  # bad options or data: the message says what to change
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

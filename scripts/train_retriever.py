#!/usr/bin/env python
"""Contrastive fine-tuning of a RAG model's retriever (question encoder, and passage encoder), with Accelerate.

Each question is pulled towards its gold passage and pushed away from the other passages of the
(global) batch, from hard negatives given in the data, and from hard negatives mined from the
current index: top-ranked passages that are not gold and do not contain a gold answer string.

Passage side:

* default: the passage encoder is trained too (shared with the question encoder, or the model's own
  ``context_encoder``); at the end the corpus is re-encoded and the model saved with a fresh index;
* ``--separate-context-encoder``: questions and passages get separate encoders (DPR-style), both trained;
* ``--question-side-only``: passages stay as the index has them. A frozen copy of the original encoder
  becomes the model's ``context_encoder`` (and ``config.context_encoder`` a copy of the question encoder's
  sub-config), so the saved model loads both encoders and the existing index still matches its
  fingerprint.

Examples::

    python scripts/train_retriever.py --config configs/train/retriever.yaml --cpu
    accelerate launch --config_file configs/accelerate/two_cpu_processes.yaml \\
        scripts/train_retriever.py --config configs/train/retriever.yaml
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from modeling_rag.atomic import atomic_write_text
from modeling_rag.encoders import encoder_forward
from modeling_rag.errors import DataFormatError, RagConfigError, RagError
from modeling_rag.losses import CachedContrastiveLoss, ContrastiveLoss
from modeling_rag.metrics import answer_in_text
from modeling_rag.training import (
    Trainer,
    build_parser,
    check_positive,
    create_accelerator,
    dense_topk,
    enable_gradient_checkpointing,
    encode_passages,
    encode_questions,
    freeze_passage_side,
    freeze_unused_pooler,
    gold_positions,
    load_rag_model,
    load_training_examples,
    parse_args,
    passage_lookup,
    passage_texts,
    reencode_retriever,
    require,
    retrieval_metrics,
    save_final_model,
    seed_everything,
    setup_logging,
    untie_passage_side,
)

logger = logging.getLogger("train_retriever")


def get_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    g = parser.add_argument_group("retriever")
    g.add_argument("--temperature", type=float, default=0.05, help="Softmax temperature of the InfoNCE loss.")
    g.add_argument(
        "--similarity",
        default=None,
        choices=["dot", "cos", "l2"],
        help="Score used by the loss; default: the model's (dot for an 'ip' index, l2 for 'l2').",
    )
    g.add_argument(
        "--data-hard-negatives",
        type=int,
        default=1,
        help="Hard negatives per question taken from the data's hard_negative_passage_ids (0: none).",
    )
    g.add_argument(
        "--mined-hard-negatives",
        type=int,
        default=1,
        help="Hard negatives per question mined from the current index (0: no mining).",
    )
    g.add_argument("--mining-top-k", type=int, default=20, help="How many top passages mining looks through.")
    g.add_argument(
        "--mining-skip-top",
        type=int,
        default=0,
        help="Skip this many of the top non-gold passages when mining (guards against unlabelled positives).",
    )
    g.add_argument(
        "--remine-every-epochs",
        type=int,
        default=1,
        help="Mine again before every N-th epoch with the current encoders (0: mine once, before training).",
    )
    g.add_argument(
        "--question-side-only",
        action="store_true",
        help="Train only the question encoder; passages keep their index vectors (frozen context_encoder copy).",
    )
    g.add_argument(
        "--separate-context-encoder",
        action="store_true",
        help="Train separate question and passage encoders (a shared encoder is split into two copies).",
    )
    g.add_argument(
        "--gradient-cache-chunk-size",
        type=int,
        default=0,
        help="Use the gradient-cached loss (GradCache) with mini-batches of at most this many questions (0: off).",
    )
    g.add_argument(
        "--passage-max-length",
        type=int,
        default=None,
        help="Passage tokens seen in training; default: what the index was encoded with.",
    )
    g.add_argument("--symmetric-loss", action="store_true", help="Add the passage-to-question InfoNCE term.")
    g.add_argument(
        "--no-gather",
        action="store_true",
        help="Use only this process's passages as negatives (default: gather negatives from all processes).",
    )
    g.add_argument("--eval-ks", default="1,5,10,20", help="Top-k accuracies reported on --dev-file.")
    return parser


class BiEncoder(nn.Module):
    """The trainable encoders, called once per (mini-)batch so that DDP sees one forward per backward."""

    def __init__(self, question_encoder, context_encoder, pooling: str, normalize: bool, frozen_passages: bool):
        super().__init__()
        self.question_encoder = question_encoder
        self.context_encoder = context_encoder
        self.pooling = pooling
        self.normalize = normalize
        self.frozen_passages = frozen_passages

    def forward(self, question_inputs: dict | None = None, passage_inputs: dict | None = None):
        q = p = None
        if question_inputs:
            q = encoder_forward(self.question_encoder, method=self.pooling, normalize=self.normalize, **question_inputs)
        if passage_inputs and "vectors" in passage_inputs:
            p = passage_inputs["vectors"]  # fixed passage vectors (question-side-only training)
        elif passage_inputs:
            enc = self.context_encoder if self.context_encoder is not None else self.question_encoder
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_passages):
                p = encoder_forward(enc, method=self.pooling, normalize=self.normalize, **passage_inputs)
        return q, p


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv)
    require(args, "train_file", "output_dir")
    check_positive(args, "batch_size", "gradient_accumulation_steps", "num_epochs", "mining_top_k")
    if args.question_side_only and args.separate_context_encoder:
        raise RagConfigError("--question-side-only and --separate-context-encoder exclude each other.")
    if args.temperature <= 0:
        raise RagConfigError(f"--temperature must be > 0, got {args.temperature}.")
    cached = args.gradient_cache_chunk_size and args.gradient_cache_chunk_size > 0
    accelerator = create_accelerator(args, find_unused_parameters=False)
    setup_logging(accelerator, verbose=args.verbose)
    seed_everything(args.seed)
    t_start = time.time()

    model, original_dtype = load_rag_model(args)
    if model.retriever is None:
        raise RagConfigError("The model has no index: give --corpus to build one, or a --model saved with its index.")
    if args.question_side_only:
        freeze_passage_side(model)
    elif args.separate_context_encoder:
        untie_passage_side(model)
    elif model.context_encoder is not None:
        model.context_encoder.requires_grad_(True)
    model.generator.requires_grad_(False)
    freeze_unused_pooler(model)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(
            model.question_encoder, None if args.question_side_only else model.context_encoder
        )
    index = model.retriever.index
    passages, by_id = passage_lookup(index)
    known = set(by_id)
    cfg = model.config
    similarity = args.similarity or ("l2" if cfg.similarity == "l2" else "dot")
    enc_cfg = index.config.get("encoding") or {}
    passage_max_length = args.passage_max_length or enc_cfg.get("max_length") or 512
    qtok = model.tokenizer.question_encoder

    train = load_training_examples(args.train_file, known_passage_ids=known, limit=args.max_train_examples)
    dev = (
        load_training_examples(args.dev_file, known_passage_ids=known, limit=args.max_dev_examples)
        if args.dev_file
        else None
    )
    # gold passage of each training question: a gold passage (chunk) that contains an answer, else the first
    positives: list = []
    gold_sets: list[list[int]] = []
    missing = []
    for ex in train:
        gold = gold_positions(ex, by_id, passages)
        gold_sets.append(gold)
        if gold:
            with_answer = [g for g in gold if answer_in_text(ex.answers, passages[g]["text"])]
            positives.append((with_answer or gold)[0])
        elif ex.positive_passages:
            positives.append({"id": None, "title": "", "text": ex.positive_passages[0]})
        else:
            missing.append(ex.id)
    if missing:
        raise DataFormatError(
            f"{len(missing)} training question(s) have no gold passage (positive_passage_ids or positive_passages), "
            f"e.g. {missing[:5]}; the retriever needs one per question."
        )
    data_negatives = [
        [p for pid in ex.hard_negative_passage_ids for p in positions_first(pid, by_id)][: args.data_hard_negatives]
        for ex in train
    ]

    module = BiEncoder(
        model.question_encoder,
        model.context_encoder,
        cfg.question_pooling,
        cfg.normalize_embeddings,
        frozen_passages=args.question_side_only,
    )
    loss_fn = ContrastiveLoss(
        args.temperature,
        similarity,
        gather_across_processes=not args.no_gather,
        accelerator=accelerator,
        symmetric=args.symmetric_loss,
    )
    cached_loss = CachedContrastiveLoss(loss_fn, args.gradient_cache_chunk_size) if cached else None
    passage_encoder_trained = not args.question_side_only
    # with frozen passages, the index's exact stored vectors stand in for the passage encoder
    fixed_vectors = (
        None
        if passage_encoder_trained
        else torch.as_tensor(np.asarray(index.get_embeddings(index.row_ids), dtype=np.float32))
    )

    vector_cache: dict = {}

    def current_passage_vectors() -> np.ndarray:
        if not passage_encoder_trained:
            return np.asarray(index.get_embeddings(index.row_ids), dtype=np.float32)
        # the end-of-epoch evaluation and the next epoch's mining see the same weights: encode once
        step = state_holder["trainer"].state.global_step if "trainer" in state_holder else -1
        if vector_cache.get("step") != step:
            vector_cache.update(step=step, vectors=encode_passages(model, passages))
        return vector_cache["vectors"]

    def mine(epoch: int, state) -> None:
        if args.mined_hard_negatives <= 0:
            return
        if epoch > 0 and (args.remine_every_epochs == 0 or epoch % args.remine_every_epochs != 0):
            return
        from accelerate.utils import broadcast_object_list

        payload = [None]
        if accelerator.is_main_process:
            t0 = time.time()
            pvec = current_passage_vectors()
            qvec = encode_questions(model, [ex.question for ex in train])
            _, top = dense_topk(qvec, pvec, args.mining_top_k, "l2" if similarity == "l2" else "ip")
            mined = {}
            for i, ex in enumerate(train):
                gold = set(gold_sets[i])
                cands = [
                    int(j)
                    for j in top[i]
                    if int(j) not in gold and not answer_in_text(ex.answers, passages[int(j)]["text"])
                ]
                mined[str(i)] = cands[args.mining_skip_top : args.mining_skip_top + args.mined_hard_negatives]
            payload = [mined]
            logger.info(
                "Mined hard negatives for %d questions in %.1fs (epoch %d)", len(train), time.time() - t0, epoch
            )
        broadcast_object_list(payload, from_process=0)
        state.extra["mined"] = payload[0]

    state_holder = {}

    def make_batch(indices: list[int]):
        state = state_holder["trainer"].state
        mined = state.extra.get("mined", {})
        q_texts = [train[i].question for i in indices]
        # positives, then negatives; a passage needed twice is encoded once (the loss would ignore the repeat)
        items: list = []
        column: dict[int, int] = {}

        def add(x) -> int:
            if isinstance(x, int):
                if x not in column:
                    column[x] = len(items)
                    items.append(x)
                return column[x]
            items.append(x)
            return len(items) - 1

        label_list = [add(positives[i]) for i in indices]
        for i in indices:
            for x in (*data_negatives[i], *mined.get(str(i), [])):
                add(x)
        texts = passage_texts([passages[x] if isinstance(x, int) else x for x in items])
        keys = torch.tensor([x if isinstance(x, int) else -1 for x in items], dtype=torch.long)
        width = max(1, max(len(gold_sets[i]) for i in indices))
        qpos = torch.full((len(indices), width), -1, dtype=torch.long)
        for r, i in enumerate(indices):
            if gold_sets[i]:
                qpos[r, : len(gold_sets[i])] = torch.tensor(gold_sets[i])
        device = accelerator.device
        q_in = model.tokenize_questions(q_texts)
        q_in = {k: v.to(device) for k, v in q_in.items()}
        if fixed_vectors is not None:
            # passages keep their index vectors: look them up instead of running the frozen encoder
            vectors = torch.zeros((len(items), fixed_vectors.shape[1]), dtype=torch.float32)
            known = [r for r, x in enumerate(items) if isinstance(x, int)]
            if known:
                vectors[known] = fixed_vectors[[items[r] for r in known]]
            free = [r for r, x in enumerate(items) if not isinstance(x, int)]
            if free:
                with torch.no_grad():
                    vectors[free] = torch.as_tensor(
                        encode_passages(model, [items[r] for r in free], batch_size=len(free)), dtype=torch.float32
                    )
            p_in = {"vectors": vectors.to(device)}
        else:
            p_in = qtok(texts, padding=True, truncation=True, max_length=passage_max_length, return_tensors="pt")
            p_in = {k: v.to(device) for k, v in p_in.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        labels = torch.tensor(label_list, dtype=torch.long, device=device)
        return q_in, p_in, labels, qpos.to(device), keys.to(device)

    def train_step(indices: list[int]) -> torch.Tensor:
        trainer = state_holder["trainer"]
        q_in, p_in, labels, qpos, keys = make_batch(indices)
        if cached_loss is not None:
            return cached_loss.step(
                lambda qi, pi: trainer.module(qi, pi),
                q_in,
                p_in,
                labels,
                question_positive_ids=qpos,
                passage_ids=keys,
                backward=accelerator.backward,
                no_sync=lambda: accelerator.no_sync(trainer.module),
            )
        q, p = trainer.module(q_in, p_in)
        loss = loss_fn(q, p, labels, qpos, keys)
        accelerator.backward(loss * loss_fn.backward_scale)
        return loss.detach()

    ks = [int(k) for k in str(args.eval_ks).split(",") if k.strip()]

    def evaluate() -> dict:
        if dev is None:
            return {}
        if not accelerator.is_main_process:
            return {}
        pvec = current_passage_vectors()
        qvec = encode_questions(model, [ex.question for ex in dev])
        gold = [gold_positions(ex, by_id, passages) for ex in dev]
        return retrieval_metrics(qvec, pvec, gold, metric="l2" if similarity == "l2" else "ip", ks=ks)

    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    trainer = Trainer(
        accelerator,
        args,
        module,
        len(train),
        train_step,
        evaluate=evaluate if dev is not None else None,
        on_epoch_start=mine,
        named_parameters=trainable,
    )
    state_holder["trainer"] = trainer
    before = trainer.evaluate_before_training()
    trainer.train()
    result = {"history": trainer.history, "stopped_early": trainer.stopped_early}
    if trainer.stopped_early:
        trainer.end()
        return result

    # the final model: a fresh index from the trained passage encoder, unless passages were frozen
    model.eval()
    if passage_encoder_trained:
        model.set_retriever(reencode_retriever(model, accelerator=accelerator), check_fingerprint=False)
    else:
        model.set_retriever(model.retriever)  # checks that the frozen context encoder still matches the index
    final = None
    if dev is not None and accelerator.is_main_process:
        qvec = encode_questions(model, [ex.question for ex in dev])
        out = model.retriever.retrieve(qvec, max(ks))
        gold_ids = [set(gold_positions(ex, by_id, passages)) for ex in dev]
        pos_of_row = {int(p["row_id"]): i for i, p in enumerate(passages)}
        final = {}
        for k in ks:
            hits = [
                any(pos_of_row.get(int(r), -1) in g for r in out.row_ids[i][:k]) for i, g in enumerate(gold_ids) if g
            ]
            final[f"index_top{k}"] = float(np.mean(hits)) if hits else 0.0
        final["before"] = before
        final["train_seconds"] = round(time.time() - t_start, 1)
        atomic_write_text(os.path.join(args.output_dir, "final_metrics.json"), json.dumps(final, indent=2))
        accelerator.print(f"Final dev retrieval through the index: {final}")
    save_final_model(accelerator, model, args, original_dtype)
    trainer.end()
    result["final"] = final
    return result


def positions_first(pid: str, by_id: dict) -> list[int]:
    """The position of passage `pid` (first chunk of a document id); empty when unknown."""
    return [by_id[pid]] if pid in by_id else []


if __name__ == "__main__":
    try:
        main()
    except RagError as err:  # bad options or data: the message says what to change
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

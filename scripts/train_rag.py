#!/usr/bin/env python
"""End-to-end RAG fine-tuning (RAG-Sequence or RAG-Token loss) with Accelerate.

Each step retrieves passages for the batch with the current question encoder, then minimises the
marginal negative log-likelihood of the answer over the retrieved passages (Lewis et al., 2020). The
document scores are recomputed from the question encoder's output and the passages' vectors, so the
gradient reaches the question encoder through them; the generator is trained too (fully, with
``--lora`` adapters, or not at all with ``--freeze-generator``).

Passage side:

* default: passages keep their index vectors; a shared encoder is split so that a frozen copy encodes
  passages (the model's ``context_encoder``), and the index stays valid;
* ``--train-context-encoder``: the retrieved passages are re-encoded with gradients in every step
  (RAG-end2end), so the passage encoder learns too; the index is re-encoded every
  ``--reencode-every-steps`` steps and at the end. Exact resume then needs checkpoints at multiples of
  ``--reencode-every-steps`` (a resumed run re-encodes its index right away).

Examples::

    python scripts/train_rag.py --config configs/train/rag.yaml --cpu
"""

from __future__ import annotations

import logging
import sys
import time

from torch import nn

from modeling_rag.encoders import encoder_forward
from modeling_rag.errors import RagConfigError, RagError, RagInputError
from modeling_rag.training import (
    Trainer,
    add_context_args,
    add_lora_args,
    answer_metrics,
    apply_context_args,
    apply_lora,
    build_parser,
    check_positive,
    create_accelerator,
    enable_gradient_checkpointing,
    freeze_passage_side,
    freeze_unused_pooler,
    load_rag_model,
    load_training_examples,
    merge_lora,
    parse_args,
    passage_lookup,
    passage_texts,
    reencode_retriever,
    require,
    save_final_model,
    seed_everything,
    setup_logging,
    write_final_metrics,
)

logger = logging.getLogger("train_rag")


def get_parser():
    parser = build_parser(__doc__.split("\n\n")[0])
    add_context_args(parser)
    add_lora_args(parser)
    g = parser.add_argument_group("RAG")
    g.add_argument(
        "--generation-mode",
        default="rag_sequence",
        choices=["rag_sequence", "rag_token"],
        help="The marginal likelihood trained (and stored as config.generation_mode).",
    )
    g.add_argument("--freeze-generator", action="store_true", help="Train only the question encoder.")
    g.add_argument(
        "--freeze-question-encoder", action="store_true", help="Train only the generator (fixed document scores)."
    )
    g.add_argument(
        "--train-context-encoder",
        action="store_true",
        help="Re-encode the retrieved passages with gradients each step so the passage encoder trains too.",
    )
    g.add_argument(
        "--reencode-every-steps",
        type=int,
        default=0,
        help="With --train-context-encoder: re-encode the whole index every N optimizer steps (0: only at the end).",
    )
    g.add_argument(
        "--passage-max-length",
        type=int,
        default=None,
        help="Passage tokens when re-encoding retrieved passages with gradients; default: the index's setting.",
    )
    g.add_argument(
        "--retriever-learning-rate",
        type=float,
        default=None,
        help="Learning rate of the question (and context) encoder; default: --learning-rate. A generator "
        "fine-tuned at 1e-4 next to a retriever that already works usually wants the encoder 5-10x lower.",
    )
    g.add_argument("--eval-before-training", action="store_true", help="Measure EM / F1 before training.")
    return parser


class RagTrainModule(nn.Module):
    """The model plus, optionally, differentiable passage vectors: one forward per step for DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, passage_inputs: dict | None = None):
        if passage_inputs is not None:
            m = self.model
            b, n = batch["doc_scores"].shape
            vectors = encoder_forward(
                m.passage_encoder,
                method=m.config.question_pooling,
                normalize=m.config.normalize_embeddings,
                **passage_inputs,
            )
            batch = {**batch, "doc_embeddings": vectors.view(b, n, -1)}
        return self.model(**batch)


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv)
    require(args, "train_file", "output_dir")
    check_positive(args, "batch_size", "gradient_accumulation_steps", "num_epochs")
    if args.retriever_learning_rate is not None and not args.retriever_learning_rate > 0:
        raise RagInputError(
            f"--retriever-learning-rate must be a positive number, got {args.retriever_learning_rate!r}; use "
            "--freeze-question-encoder to keep the encoder fixed."
        )
    if args.freeze_generator and args.freeze_question_encoder and not args.train_context_encoder:
        raise RagConfigError("--freeze-generator and --freeze-question-encoder together leave nothing to train.")
    accelerator = create_accelerator(args)
    setup_logging(accelerator, verbose=args.verbose)
    seed_everything(args.seed)
    t_start = time.time()

    model, original_dtype = load_rag_model(args)
    if model.retriever is None:
        raise RagConfigError("The model has no index: give --corpus to build one, or a --model saved with its index.")
    if model.config.retrieval != "dense":
        logger.warning(
            "config.retrieval=%r: document scores are recomputed from dense vectors.", model.config.retrieval
        )
    apply_context_args(model, args)
    model.config.generation_mode = args.generation_mode
    if args.train_context_encoder:
        if model.context_encoder is not None:
            model.context_encoder.requires_grad_(True)
    else:
        freeze_passage_side(model)
    model.question_encoder.requires_grad_(not args.freeze_question_encoder)
    freeze_unused_pooler(model)
    if args.freeze_generator:
        model.generator.requires_grad_(False)
    elif args.lora:
        apply_lora(model, args)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.generator, model.question_encoder, model.context_encoder)
    passages, by_id = passage_lookup(model.retriever.index)
    enc_cfg = model.retriever.index.config.get("encoding") or {}
    passage_max_length = args.passage_max_length or enc_cfg.get("max_length") or 512
    train = load_training_examples(args.train_file, known_passage_ids=set(by_id), limit=args.max_train_examples)
    dev = (
        load_training_examples(args.dev_file, known_passage_ids=set(by_id), limit=args.max_dev_examples)
        if args.dev_file
        else None
    )
    module = RagTrainModule(model)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    qtok = model.tokenizer.question_encoder
    holder = {}

    def train_step(indices):
        trainer = holder["trainer"]
        batch = model.prepare_inputs(
            [train[i].question for i in indices],
            [train[i].answers[0] for i in indices],
            generation_mode=args.generation_mode,
        )
        plists = batch.pop("passages")
        p_in = None
        if args.train_context_encoder:
            texts = passage_texts([p for plist in plists for p in plist])
            enc = qtok(texts, padding=True, truncation=True, max_length=passage_max_length, return_tensors="pt")
            p_in = {k: v.to(accelerator.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = trainer.module(batch, p_in)
        accelerator.backward(out.loss)
        return out.loss.detach()

    def reencode(state) -> None:
        if (
            args.train_context_encoder
            and args.reencode_every_steps
            and state.global_step % args.reencode_every_steps == 0
        ):
            t0 = time.time()
            model.set_retriever(reencode_retriever(model, accelerator=accelerator), check_fingerprint=False)
            logger.info("Re-encoded the index at step %d in %.1fs", state.global_step, time.time() - t0)

    def evaluate() -> dict:
        if dev is None or not accelerator.is_main_process:
            return {}
        metrics, _ = answer_metrics(
            model, dev, batch_size=args.eval_batch_size, max_new_tokens=args.eval_max_new_tokens
        )
        return metrics

    def learning_rate_for(name: str) -> float:
        encoders = ("model.question_encoder.", "model.context_encoder.")
        if args.retriever_learning_rate is not None and name.startswith(encoders):
            return args.retriever_learning_rate
        return args.learning_rate

    trainer = Trainer(
        accelerator,
        args,
        module,
        len(train),
        train_step,
        evaluate=evaluate if dev is not None else None,
        named_parameters=trainable,
        on_step_end=reencode,
        learning_rate_for=learning_rate_for,
    )
    holder["trainer"] = trainer
    before = trainer.evaluate_before_training() if args.eval_before_training else None
    if args.resume_from_checkpoint and args.train_context_encoder:
        trainer.resume()  # load the weights now, so that the index matches them
        args.resume_from_checkpoint = None
        model.set_retriever(reencode_retriever(model, accelerator=accelerator), check_fingerprint=False)
    trainer.train()
    result = {"history": trainer.history, "stopped_early": trainer.stopped_early}
    if trainer.stopped_early:
        trainer.end()
        return result
    if args.lora and not args.freeze_generator:
        merge_lora(model)
    model.eval()
    if args.train_context_encoder:
        model.set_retriever(reencode_retriever(model, accelerator=accelerator), check_fingerprint=False)
    else:
        model.set_retriever(model.retriever)  # the frozen passage encoder still matches the index
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

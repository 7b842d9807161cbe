"""Text to a batch of tensors, in one direction: check, tokenise the questions, retrieve, pack, tensorise.

[`prepare_inputs`] is what `RagForGeneration.prepare_inputs`, `forward(questions=...)` and
`generate(questions)` run. It returns a [`RagBatch`]: the tensors `model(**batch)` takes, with the
passages that were used beside them (`batch.passages`), not among them.

Layouts: question-encoder `input_ids` / `attention_mask` (right-padded); generator
`context_input_ids` / `context_attention_mask`, `[B, L]` in `concat` mode and `[B * n_docs, L]`
(question-major) in the marginalised modes; right-padded for an encoder-decoder generator, and for a
decoder-only one left-padded when generating or training (so the answer ends in the last column).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .context import ContextPacker, generator_window, pad_batch
from .errors import RagConfigError, RagInputError
from .modes import MODES
from .text_checks import check_encodable

logger = logging.getLogger(__name__)

__all__ = [
    "RagBatch",
    "check_n_docs",
    "check_questions",
    "generation_inputs",
    "packer_for",
    "prepare_inputs",
    "retrieve",
    "tokenize_questions",
]

_NO_INDEX = (
    "This model has no index attached: build one with model.build_index(corpus), load a model saved with its "
    "index, or pass passages= yourself."
)


class RagBatch(dict):
    """The tensors of a batch (keys, for `model(**batch)`) and the passages used (`.passages`, one list per question)."""

    def __init__(self, tensors: dict, passages: list[list[dict]]):
        super().__init__(tensors)
        self.passages = passages


def check_questions(questions) -> list[str]:
    """One question or a list of them, as a list of stripped strings; anything else is a `RagInputError`."""
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, (list, tuple)):
        raise RagInputError(f"questions must be a string or a list of strings, got {type(questions).__name__}.")
    if len(questions) == 0:
        raise RagInputError("The list of questions is empty; pass at least one question.")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise RagInputError(f"questions[{i}] is a {type(q).__name__}, not a string.")
        if not q.strip():
            raise RagInputError(f"questions[{i}] is empty or only whitespace; give the text of the question.")
        check_encodable(q, f"questions[{i}]")
    return [q.strip() for q in questions]


def check_n_docs(n_docs, default: int) -> int:
    n_docs = default if n_docs is None else n_docs
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs <= 0:
        raise RagInputError(f"n_docs must be a positive integer, got {n_docs!r}.")
    return n_docs


def _check_answers(answers, n_questions: int) -> list[str] | None:
    if answers is None:
        return None
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) != n_questions:
        raise RagInputError(f"Got {n_questions} questions but {len(answers)} answers; give one answer each.")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            raise RagInputError(f"answers[{i}] must be a non-empty string.")
        check_encodable(a, f"answers[{i}]")
    return list(answers)


def _check_passages(passages, batch_size: int, mode: str) -> list[list[dict]]:
    if not isinstance(passages, (list, tuple)) or len(passages) != batch_size:
        raise RagInputError(
            f"passages must be a list with one list of passages per question ({batch_size}), got "
            f"{len(passages) if isinstance(passages, (list, tuple)) else type(passages).__name__}."
        )
    out = []
    for i, plist in enumerate(passages):
        if isinstance(plist, (str, dict)):
            plist = [plist]
        if not isinstance(plist, (list, tuple)) or not plist:
            raise RagInputError(f"passages[{i}] must be a non-empty list of passages (strings or dicts).")
        items = []
        for p in plist:
            if isinstance(p, str):
                p = {"id": None, "title": "", "text": p}
            elif not isinstance(p, dict) or not isinstance(p.get("text"), str):
                raise RagInputError(f"passages[{i}] holds an item that is neither a string nor a dict with 'text'.")
            check_encodable(p["text"], f"A passage of passages[{i}]")
            items.append(p)
        out.append(items)
    if mode != "concat" and len({len(p) for p in out}) != 1:
        raise RagInputError(
            f"In {mode} mode every question needs the same number of passages; got {[len(p) for p in out]}."
        )
    return out


def packer_for(model) -> ContextPacker:
    """`model`'s context packer for its current tokenizer and settings: built once and kept on the model
    (with its cache of tokenised passages) until one of them changes."""
    if model.tokenizer is None:
        raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
    c = model.config
    key = (
        id(model.tokenizer.generator),
        c.max_input_tokens,
        c.max_new_tokens,
        c.prompt_template,
        c.passage_template,
        c.passage_separator,
        c.instruction,
        c.use_chat_template,
        c.max_passage_tokens,
        c.min_passage_tokens,
    )
    if model._packer is None or model._packer_key != key:
        window = generator_window(model.generator.config, model.tokenizer.generator)
        budget = window if model.is_generator_encoder_decoder else window - c.max_new_tokens
        if c.max_input_tokens is not None:
            budget = min(budget, c.max_input_tokens)
        model._packer = ContextPacker(
            model.tokenizer.generator,
            budget=budget,
            prompt_template=c.prompt_template,
            passage_template=c.passage_template,
            passage_separator=c.passage_separator,
            instruction=c.instruction,
            use_chat_template=c.use_chat_template,
            max_passage_tokens=c.max_passage_tokens,
            min_passage_tokens=c.min_passage_tokens,
        )
        model._packer_key = key
    return model._packer


def tokenize_questions(model, questions: Sequence[str]) -> dict:
    """Question-encoder inputs, truncated to `config.question_max_length` (with a warning)."""
    tok = model.tokenizer.question_encoder
    config = model.config
    ids = tok(list(questions), truncation=False, verbose=False)["input_ids"]  # cut below, with our warning
    limit = min(config.question_max_length, generator_window(model.question_encoder.config, tok))
    out = []
    for q, row in zip(questions, ids):
        if len(row) > limit:
            if config.question_overflow == "error":
                raise RagInputError(
                    f"A question has {len(row)} tokens, more than the question encoder reads ({limit}): "
                    f"{q[:60]!r}... Shorten it, or set config.question_overflow='truncate'."
                )
            logger.warning(
                "A question has %d tokens, more than the question encoder keeps (%d); its end is not used "
                "for retrieval: %.60s...",
                len(row),
                limit,
                q,
            )
            row = row[: limit - 1] + row[-1:]
        out.append(row)
    input_ids, attention_mask = pad_batch(out, tok.pad_token_id or 0, side="right")
    return {"input_ids": input_ids.to(model.device), "attention_mask": attention_mask.to(model.device)}


@torch.no_grad()
def retrieve(model, questions: list[str], n_docs: int, enc: dict | None = None):
    """The attached retriever's `RetrievalOutput` for checked questions; `enc` (their encoder inputs) is reused."""
    if model.retriever is None:
        raise RagInputError(_NO_INDEX)
    embeddings = None
    if model.config.retrieval != "bm25" or model.config.generation_mode != "concat":
        if enc is None:
            enc = tokenize_questions(model, questions)
        embeddings = model.encode_questions(**enc).float().cpu().numpy()
        if not np.isfinite(embeddings).all():
            raise RagInputError("The question encoder produced NaN or infinite vectors; check its weights.")
    model.retriever.use_fusion_settings(model.config)  # the config is where a model keeps them
    if model.reranker is not None:
        from .reranker import retrieve_and_rerank

        return retrieve_and_rerank(model, embeddings, questions, n_docs)
    return model.retriever.retrieve(embeddings, n_docs, questions=questions)


def _stored_passage_ids(model, passages: list[dict], tokenizer) -> list[list[int] | None] | None:
    """The token ids of retrieved `passages` stored with the index for `tokenizer`, or None if there are none."""
    store = getattr(model.retriever, "passage_tokens", None)
    if store is None or not passages or not store.matches(tokenizer):
        return None
    row_ids = [p.get("row_id") for p in passages]
    if any(not isinstance(r, (int, np.integer)) or r < 0 for r in row_ids):
        return None
    return store.lookup(row_ids)


def prepare_inputs(
    model,
    questions,
    answers=None,
    *,
    passages=None,
    doc_scores=None,
    n_docs: int | None = None,
    generation_mode: str | None = None,
    for_generation: bool = False,
) -> RagBatch:
    """Retrieves (unless `passages` are given), packs and tokenises a batch (see `RagForGeneration.prepare_inputs`)."""
    questions = check_questions(questions)
    mode = generation_mode or model.config.generation_mode
    if mode not in MODES:
        raise RagConfigError(f"generation_mode must be one of {list(MODES)}, got {mode!r}.")
    if model.tokenizer is None:
        raise RagInputError("This model has no tokenizer: call model.set_tokenizer(RagTokenizer(...)) first.")
    answers = _check_answers(answers, len(questions))
    batch = tokenize_questions(model, questions)
    if passages is None:
        if model.retriever is None:
            raise RagInputError(_NO_INDEX)
        retrieved = retrieve(model, questions, check_n_docs(n_docs, model.config.n_docs), batch)
        passage_lists = retrieved.passages
        scores = torch.as_tensor(np.asarray(retrieved.doc_scores, dtype=np.float32))
        ids = torch.as_tensor(np.asarray(retrieved.row_ids, dtype=np.int64))
        if retrieved.doc_embeddings is not None:
            embeddings = np.asarray(retrieved.doc_embeddings, dtype=np.float32)
            batch["doc_embeddings"] = torch.as_tensor(embeddings).to(model.device)
    else:
        passage_lists = _check_passages(passages, len(questions), mode)
        n = max(len(p) for p in passage_lists)
        if doc_scores is None:
            scores = torch.zeros(len(questions), n)
        else:
            scores = torch.as_tensor(doc_scores, dtype=torch.float32)
            if scores.shape != (len(questions), n):
                raise RagInputError(
                    f"doc_scores has shape {tuple(scores.shape)} but the passages need ({len(questions)}, {n})."
                )
        ids = torch.full((len(questions), n), -1, dtype=torch.long)
    batch["doc_scores"] = scores.to(model.device)
    batch["retrieved_doc_ids"] = ids.to(model.device)
    packer = model.packer()
    flat = [p for plist in passage_lists for p in plist]
    # retrieved just now: their row ids name index passages, whose stored ids are these texts' ids
    known = _stored_passage_ids(model, flat, packer.tokenizer) if passages is None else None
    packer.prefetch([p.get("text") or "" for p in flat], known)
    if MODES[mode].one_input_per_passage:
        n = scores.shape[1]
        rows = [x.input_ids for q, p in zip(questions, passage_lists) for x in packer.pack_each(q, p)]
        row_answers = None if answers is None else [a for a in answers for _ in range(n)]
    else:
        rows = [packer.pack(q, p).input_ids for q, p in zip(questions, passage_lists)]
        row_answers = answers
    batch.update(_tensorize(model, rows, row_answers, answers, for_generation))
    return RagBatch(batch, passage_lists)


def generation_inputs(
    model,
    mode_name: str,
    *,
    questions,
    input_ids,
    passages,
    doc_scores,
    context_input_ids,
    context_attention_mask,
    n_docs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[list[dict]] | None]:
    """What `generate` decodes from: `(context_input_ids, context_attention_mask, doc_scores,
    retrieved_doc_ids, passages)`, from text (`questions`, or question-encoder `input_ids` decoded back
    to text) through `prepare_inputs`, or from pre-packed `context_input_ids` as given."""
    if context_input_ids is not None:
        if context_attention_mask is None:
            context_attention_mask = (context_input_ids != model.tokenizer.generator.pad_token_id).long()
        if doc_scores is not None:
            doc_scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=model.device)
        return context_input_ids, context_attention_mask, doc_scores, None, None
    if questions is None:
        if input_ids is None:
            raise RagInputError("generate needs questions (text), input_ids or context_input_ids.")
        questions = model.tokenizer.question_encoder.batch_decode(input_ids, skip_special_tokens=True)
    batch = prepare_inputs(
        model,
        questions,
        passages=passages,
        doc_scores=doc_scores,
        n_docs=n_docs,
        generation_mode=mode_name,
        for_generation=True,
    )
    return (
        batch["context_input_ids"],
        batch["context_attention_mask"],
        batch["doc_scores"],
        batch["retrieved_doc_ids"],
        batch.passages,
    )


def answer_ids(model, answer: str, with_eos: bool) -> list[int]:
    """The generator token ids of one answer, cut to `max_new_tokens` (room kept for eos when added)."""
    tok = model.tokenizer.generator
    text = answer.strip() if model.is_generator_encoder_decoder else " " + answer.strip()
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    ids = ids[: model.config.max_new_tokens - 1] if with_eos else ids[: model.config.max_new_tokens]
    if with_eos and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids


def _tensorize(model, prompt_rows, row_answers, answers, for_generation) -> dict:
    pad_id = model.tokenizer.generator.pad_token_id
    device = model.device
    out = {}
    if model.is_generator_encoder_decoder:
        ids, mask = pad_batch(prompt_rows, pad_id, side="right")
        out["context_input_ids"], out["context_attention_mask"] = ids.to(device), mask.to(device)
        if answers is not None:
            labels, lmask = pad_batch([answer_ids(model, a, with_eos=True) for a in answers], pad_id, side="right")
            labels[lmask == 0] = -100
            out["labels"] = labels.to(device)
        return out
    if row_answers is None or for_generation:
        ids, mask = pad_batch(prompt_rows, pad_id, side="left" if for_generation else "right")
        out["context_input_ids"], out["context_attention_mask"] = ids.to(device), mask.to(device)
        return out
    seqs, labels = [], []
    for prompt, answer in zip(prompt_rows, row_answers):
        a_ids = answer_ids(model, answer, with_eos=True)
        seqs.append(prompt + a_ids)
        labels.append([-100] * len(prompt) + a_ids)
    # left-padded: every row's answer ends in the last column, so the positions that training computes
    # logits for (`CausalRunner.answer_positions`, the union over rows) span the longest answer, not the
    # spread of context lengths
    ids, mask = pad_batch(seqs, pad_id, side="left")
    lab, _ = pad_batch(labels, -100, side="left")
    out["context_input_ids"], out["context_attention_mask"], out["labels"] = (
        ids.to(device),
        mask.to(device),
        lab.to(device),
    )
    return out

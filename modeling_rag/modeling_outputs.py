"""Typed outputs of RagForGeneration; each field documents its shape."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import ModelOutput


@dataclass
class RagOutput(ModelOutput):
    r"""Output of [`RagForGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            With `labels`: the token cross-entropy on the answer (`concat` mode) or the marginal negative
            log-likelihood over documents (`rag_sequence`, `rag_token`), reduced per `config.loss_reduction`.
        logits (`torch.FloatTensor`):
            `concat`: the generator logits, shape `(batch_size, sequence_length, vocab_size)`.
            `rag_sequence` / `rag_token`: per-document generator logits, shape
            `(batch_size * n_docs, sequence_length, vocab_size)`.
            In training mode with `labels`, a decoder-only generator returns logits only at the positions
            that predict an answer token (the union over rows, in order): `sequence_length` is then that
            count.
        doc_scores (`torch.FloatTensor` of shape `(batch_size, n_docs)`, *optional*):
            Retrieval scores of the documents (question vector · document vector, or negative squared
            distance); differentiable with respect to the question encoder when computed in the model.
        retrieved_doc_ids (`torch.LongTensor` of shape `(batch_size, n_docs)`, *optional*):
            Row ids of the retrieved passages in the index (-1 where a row has fewer documents).
        question_embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            Pooled question vectors.
        doc_posteriors (`torch.FloatTensor` of shape `(batch_size, n_docs)`, *optional*):
            With `labels` in the marginalised modes: p(document | question, answer).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    doc_scores: torch.FloatTensor | None = None
    retrieved_doc_ids: torch.LongTensor | None = None
    question_embeddings: torch.FloatTensor | None = None
    doc_posteriors: torch.FloatTensor | None = None


@dataclass
class RagGenerateOutput(ModelOutput):
    r"""Output of [`RagForGeneration.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size * num_return_sequences, answer_length)`):
            Generated answer tokens only (prompt and passages are not included), right-padded.
        doc_scores (`torch.FloatTensor` of shape `(batch_size, n_docs)`):
            Retrieval scores of the documents each answer was conditioned on.
        retrieved_doc_ids (`torch.LongTensor` of shape `(batch_size, n_docs)`, *optional*):
            Row ids of the retrieved passages (-1 for passages given by the caller).
        doc_posteriors (`torch.FloatTensor` of shape `(batch_size, n_docs)`, *optional*):
            Marginalised modes: p(document | question, generated answer). `concat`: `None`.
        sequences_scores (`torch.FloatTensor` of shape `(batch_size * num_return_sequences,)`, *optional*):
            RAG-Sequence: the marginal log-likelihood of each returned answer.
        passages (`list[list[dict]]`):
            The passages used for each question (id, title, text, source, score).
    """

    sequences: torch.LongTensor | None = None
    doc_scores: torch.FloatTensor | None = None
    retrieved_doc_ids: torch.LongTensor | None = None
    doc_posteriors: torch.FloatTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    passages: list | None = None


@dataclass
class RagSource:
    """One passage an answer was conditioned on."""

    id: str
    title: str
    text: str
    score: float
    source: str | None = None
    rank: int = 0
    posterior: float | None = None

    @classmethod
    def from_passage(cls, passage: dict, rank: int, score: float, posterior: float | None = None) -> RagSource:
        """The source of a retrieved or given passage dict; `rank` is 1-based."""
        pid = passage.get("id")
        return cls(
            id=str(pid) if pid is not None else f"passage-{rank}",
            title=passage.get("title") or "",
            text=passage.get("text") or "",
            score=score,
            source=passage.get("source"),
            rank=rank,
            posterior=posterior,
        )


@dataclass
class RagAnswer:
    """A generated answer with the passages it came from (best first).

    Attributes:
        question: The question asked.
        answer: The answer; when `abstained`, the model's no-answer response (``config.no_answer_text``).
        sources: The passages the reader was given, best first. When `abstained`, they are the closest
            passages found, which do not support an answer.
        abstained: Whether the model judged that its passages do not support an answer (see
            `modeling_rag.abstention`).
        confidence: How likely the answer is supported, in [0, 1] (calibrated on dev data where the model's
            config holds a fitted `abstention`; else the reader's geometric-mean token probability).
        reader_answer: What the reader wrote, kept when the model abstained instead of giving it.
        signals: The abstention features the decision was made from (`modeling_rag.abstention`), by name.
    """

    question: str
    answer: str
    sources: list[RagSource] = field(default_factory=list)
    abstained: bool = False
    confidence: float | None = None
    reader_answer: str | None = None
    signals: dict | None = None

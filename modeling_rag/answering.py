"""The friendly path: questions in, `RagAnswer`s out, each with its text, its sources, whether the model
abstained ("the documents don't say") and its confidence.

`RagForGeneration.answer` is its public face. A question flows: `abstention.decline_before_generating`
(a streamed answer whose passages are too far from the question is declined before generating) →
`RagForGeneration.generate` (retrieval, packing, the mode's generation) → `abstention.judge_answers`
(the abstention rule) → one `RagAnswer` per question, its sources built by `RagSource.from_passage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .abstention import decline_before_generating, judge_answers, recorder_for
from .errors import RagInputError
from .inputs import check_questions
from .modeling_outputs import RagAnswer, RagGenerateOutput, RagSource

__all__ = ["answer_questions"]


def answer_questions(
    model,
    questions: Sequence[str] | str,
    *,
    passages: Sequence[Sequence[dict | str]] | None,
    doc_scores: Any,
    n_docs: int | None,
    generation_mode: str | None,
    abstention_threshold: float | None,
    streamer: Any,
    generate_kwargs: dict[str, Any],
) -> list[RagAnswer]:
    """Answers each question with `model` (see `RagForGeneration.answer` for the arguments)."""
    questions = check_questions(questions)
    if streamer is not None:
        if len(questions) != 1:
            raise RagInputError(f"A streamer follows one answer: pass one question, got {len(questions)}.")
        declined = (
            None
            if passages is not None
            else decline_before_generating(model, questions[0], n_docs, abstention_threshold)
        )
        if declined is not None:  # nothing the reader could guess reaches the stream
            if hasattr(streamer, "on_finalized_text"):
                streamer.on_finalized_text(declined.answer, stream_end=True)
            else:
                streamer.end()
            return [declined]
        generate_kwargs["streamer"] = streamer
    recorder = recorder_for(model, generation_mode or model.config.generation_mode, generate_kwargs)
    out = model.generate(
        questions,
        passages=passages,
        doc_scores=doc_scores,
        n_docs=n_docs,
        generation_mode=generation_mode,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    per_q = out.sequences.shape[0] // len(questions)
    texts = [t.strip() for t in model.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    firsts = [texts[i * per_q] for i in range(len(questions))]
    abstained, confidence, signals = judge_answers(model, questions, firsts, out, recorder, per_q, abstention_threshold)
    signal_rows = signals.to_rows()
    return [
        RagAnswer(
            question=q,
            answer=model.config.no_answer_text if abstained[i] else firsts[i],
            sources=sources_of(out, i),
            abstained=bool(abstained[i]),
            confidence=float(confidence[i]),
            reader_answer=firsts[i] if abstained[i] else None,
            signals=signal_rows[i],
        )
        for i, q in enumerate(questions)
    ]


def sources_of(out: RagGenerateOutput, i: int) -> list[RagSource]:
    """The sources of question `i` of a generation: its passages, ranked, with score and posterior."""
    sources = []
    for rank, p in enumerate(out.passages[i]):
        score = float(out.doc_scores[i, rank]) if out.doc_scores is not None else float("nan")
        post = float(out.doc_posteriors[i, rank]) if out.doc_posteriors is not None else None
        sources.append(RagSource.from_passage(p, rank + 1, score, post))
    return sources

"""Abstention: say "the documents don't say" when the retrieved passages do not support an answer.

A RAG reader asked a question its passages do not answer still writes something. This module decides,
per question, whether the answer is supported, from signals that each catch a different failure:

* ``max_similarity``: the best cosine (or inner product) between the question and the passages it was
  given. Off-topic questions ("What is the capital of Mongolia?" over an HR handbook) retrieve nothing
  close.
* ``answer_logprob``: the reader's mean token log-probability of its own answer (low when it guesses).
* ``no_answer_margin``: at the first generated token, the log-probability of the no-answer response's
  (``config.no_answer_text``) first token minus that of the token chosen: a reader trained on
  unanswerable questions leans to the no-answer response when the passages look relevant but do not
  answer, even where it still answers.
* ``says_no_answer``: the reader's answer is the no-answer response itself.
* ``reranker_relevance``: the cross-encoder reranker's highest relevance logit over the passages given
  (`modeling_rag.reranker`; trained with a pointwise loss, so its sigmoid is a relevance probability). It
  reads each passage with the question, so it can tell a passage about the question's topic from one
  that answers it. 0 for a model without a reranker.
* ``answer_support``: the share of the answer's words (lower-cased, punctuation and articles aside) that
  occur in the passages it was given. A reader trained to answer with spans of its passages that writes
  words found in none of them is answering from its own memory, not from the documents.

They are combined by a logistic model into a ``confidence`` in [0, 1], fitted on dev questions with and
without answers (:func:`fit_abstention`, ``scripts/calibrate_abstention.py``) and stored in
``RagConfig.abstention`` with the threshold chosen on the same dev data. A model without a fitted
calibration abstains only when its reader gives the no-answer response, and reports the reader's
geometric-mean token probability as its confidence.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

from .errors import RagConfigError, RagInputError
from .inputs import answer_ids

logger = logging.getLogger(__name__)

__all__ = [
    "ABSTENTION_FEATURES",
    "AbstentionCalibration",
    "AnswerLogprobRecorder",
    "AnswerSignals",
    "abstain_decisions",
    "decline_before_generating",
    "max_similarity",
    "no_answer_first_token",
    "no_answer_sequence_bias",
    "fit_abstention",
    "reranker_relevance",
    "answer_support",
    "is_no_answer",
]

ABSTENTION_FEATURES = (
    "max_similarity",
    "answer_logprob",
    "no_answer_margin",
    "says_no_answer",
    "reranker_relevance",
    "answer_support",
)
# the features of rules fitted before the reranker's relevance was one (they still load and apply)
READER_ONLY_FEATURES = ABSTENTION_FEATURES[:4]
# the feature lists a rule may have been fitted with: each later one adds a feature at the end
FEATURE_SETS = tuple(
    list(ABSTENTION_FEATURES[:n]) for n in range(len(READER_ONLY_FEATURES), len(ABSTENTION_FEATURES) + 1)
)


@dataclass
class AbstentionCalibration:
    """A fitted abstention rule, stored as a dict in ``RagConfig.abstention``.

    Attributes:
        weights: One weight per feature of `features` (same order), on the raw feature values.
        bias: The logistic model's intercept.
        threshold: Answers with a confidence below this are replaced by the no-answer response.
        fitted_on: Where the calibration came from (data and counts), for the model card.
        dev_metrics: What the rule gave on the data it was fitted on (share abstained, per kind of question).
        retrieval_floor: The lowest `max_similarity` of an answerable dev question. A question whose passages
            are less similar than that is declined before generating (a streamed answer then shows only the
            no-answer response, never a reader's guess). ``None``: no such gate.
        no_answer_bias: Added to the logit of the no-answer response's second token when the answer has begun
            with its first (transformers' ``sequence_bias``; 0: none). A reader trained on unanswerable
            questions can give its no-answer response too readily; a negative bias, chosen on dev data with
            the rule, makes it answer and leaves the decision to the rule, which sees its lean towards the
            no-answer response in ``no_answer_margin``.
    """

    weights: list[float]
    bias: float
    threshold: float
    fitted_on: str = ""
    dev_metrics: dict = field(default_factory=dict)
    features: list[str] = field(default_factory=lambda: list(ABSTENTION_FEATURES))
    retrieval_floor: float | None = None
    no_answer_bias: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> AbstentionCalibration:
        if not isinstance(data, dict):
            raise RagConfigError(
                f"abstention must be a dict (a fitted calibration) or None, got {type(data).__name__}."
            )
        n_weights = len(data.get("weights") or [])
        if "features" not in data and len(READER_ONLY_FEATURES) <= n_weights < len(ABSTENTION_FEATURES):
            data = {**data, "features": list(ABSTENTION_FEATURES[:n_weights])}
        try:
            cal = cls(**data)
        except TypeError as err:
            raise RagConfigError(f"abstention: {err}; expected keys weights, bias, threshold, ...") from None
        if list(cal.features) not in FEATURE_SETS:
            raise RagConfigError(
                f"abstention.features must be {list(ABSTENTION_FEATURES)} or, for a rule fitted before the last "
                f"features were added, its first {len(READER_ONLY_FEATURES)} or more of them in this order; "
                f"got {cal.features}."
            )
        if len(cal.weights) != len(cal.features) or not all(math.isfinite(float(w)) for w in cal.weights):
            raise RagConfigError(f"abstention.weights must be {len(cal.features)} finite numbers, one per feature.")
        if not 0.0 <= float(cal.threshold) <= 1.0:
            raise RagConfigError(f"abstention.threshold must be between 0 and 1, got {cal.threshold!r}.")
        if not isinstance(cal.no_answer_bias, (int, float)) or not -100.0 <= float(cal.no_answer_bias) <= 0.0:
            raise RagConfigError(
                f"abstention.no_answer_bias must be a number between -100 and 0, got {cal.no_answer_bias!r}."
            )
        return cal

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_reranker(self) -> bool:
        """Whether the rule weighs the reranker's relevance (a model without a reranker gives it 0)."""
        return "reranker_relevance" in self.features and self.weights[self.features.index("reranker_relevance")] != 0

    def confidence(self, features: np.ndarray) -> np.ndarray:
        """`[N, len(ABSTENTION_FEATURES)]` features -> `[N]` confidences in [0, 1] (the rule's own columns)."""
        columns = [ABSTENTION_FEATURES.index(name) for name in self.features]
        z = np.asarray(features, dtype=np.float64)[:, columns] @ np.asarray(self.weights, dtype=np.float64)
        z = z + float(self.bias)
        return 1.0 / (1.0 + np.exp(-z))


@dataclass
class AnswerSignals:
    """The abstention features of a batch of answers, `[N]` each (see the module docstring)."""

    max_similarity: np.ndarray
    answer_logprob: np.ndarray
    no_answer_margin: np.ndarray
    says_no_answer: np.ndarray
    reranker_relevance: np.ndarray
    answer_support: np.ndarray | None = None  # None: not measured (rows recorded before it), read as 0

    def __post_init__(self):
        if self.answer_support is None:
            self.answer_support = np.zeros(len(self.says_no_answer))

    def matrix(self) -> np.ndarray:
        """`[N, F]` in the order of `ABSTENTION_FEATURES`."""
        return np.stack([getattr(self, name) for name in ABSTENTION_FEATURES], axis=1).astype(np.float64)

    def to_rows(self) -> list[dict]:
        return [dict(zip(ABSTENTION_FEATURES, map(float, row))) for row in self.matrix()]

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> AnswerSignals:
        """From `to_rows` dicts; a feature missing from rows written before it existed reads as 0."""
        return cls(**{name: np.array([float(r.get(name, 0.0)) for r in rows]) for name in ABSTENTION_FEATURES})


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}’‘“”]")


def _normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


# How readers that were not trained on the no-answer response still decline (instruction-tuned models asked to
# "say that you don't know"): an answer that opens with one of these is an abstention too.
REFUSAL_OPENINGS = (
    "i don't know",
    "i do not know",
    "i don't have",
    "i do not have",
    "i'm not sure",
    "i am not sure",
    "i cannot answer",
    "i can't answer",
    "the passages do not",
    "the passages don't",
    "the documents do not",
    "the documents don't",
    "the provided passages do not",
    "there is no information",
)


# A reader taught one no-answer response words it otherwise too ("The document doesn't say.", "The papers
# don't say."): what such a refusal may name as its source.
REFUSAL_SUBJECTS = ("documents", "document", "passages", "passage", "papers", "paper", "texts", "text", "context")
_SUBJECTS = "|".join(REFUSAL_SUBJECTS)
_REWORDED_REFUSAL = re.compile(rf"^(the )?(provided |given |above )?({_SUBJECTS}) (do|does|did)( not|n t)\b")


def refusal_texts(no_answer_text: str) -> list[str]:
    """`no_answer_text` and its rewordings a reader may say instead ("The document(s) / passage(s) / ...
    don't say.", with "The" / "the" and the subject in either case)."""
    texts = [no_answer_text]
    for subject in REFUSAL_SUBJECTS:
        texts += [f"{the} {word} don't say." for the in ("The", "the") for word in (subject, subject.capitalize())]
    return texts


def is_no_answer(answer: str, no_answer_text: str) -> bool:
    """Whether `answer` is the no-answer response, opens with a common refusal (`REFUSAL_OPENINGS`) or rewords
    it ("The document doesn't ..."); case, punctuation and trailing words aside."""
    answer, target = _normalise(answer), _normalise(no_answer_text)
    if target and (answer == target or answer.startswith(target + " ")):
        return True
    if _REWORDED_REFUSAL.match(answer):
        return True
    return any(answer == r or answer.startswith(r + " ") for r in map(_normalise, REFUSAL_OPENINGS))


class AnswerLogprobRecorder(LogitsProcessor):
    """Records, during `generate`, the log-probability of each chosen token and, at the first step, that of
    the no-answer response's first token, so that the abstention features cost no extra forward pass.

    It must be the last logits processor (it sees the scores the tokens are chosen from) and returns the
    scores unchanged. Greedy decoding and sampling are supported; beam search reorders rows, so it is not.
    """

    def __init__(self, no_answer_first_token: int | None):
        self.no_answer_first_token = no_answer_first_token
        self._last: torch.Tensor | None = None  # log-softmax of the previous step, [rows, vocab]
        self.chosen: list[torch.Tensor] = []  # per step, the chosen token's log-probability, [rows]
        self.first_step: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self.chosen.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        if self.first_step is None:
            self.first_step = self._last
        return scores

    def finish(self, answer_ids: torch.LongTensor, eos_token_id) -> tuple[np.ndarray, np.ndarray]:
        """`(mean log-probability of each answer's tokens, no-answer first-token margin)` for the generated
        `answer_ids` `[rows, T]` (prompt stripped)."""
        if self._last is None:
            raise RuntimeError("AnswerLogprobRecorder saw no generation step.")
        steps = min(len(self.chosen) + 1, answer_ids.shape[1])
        last = self._last.gather(-1, answer_ids[:, steps - 1 : steps]).squeeze(-1)
        chosen = torch.stack([*self.chosen[: steps - 1], last], dim=1)  # [rows, steps]
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        is_eos = torch.zeros_like(answer_ids[:, :steps], dtype=torch.bool)
        for token in eos:
            is_eos |= answer_ids[:, :steps] == token
        # tokens after the first end-of-sequence are padding, not the answer (the eos itself counts)
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        mean = (chosen * keep).sum(1) / keep.sum(1).clamp(min=1)
        first = self.first_step.gather(-1, answer_ids[:, :1]).squeeze(-1)
        if self.no_answer_first_token is None:
            margin = torch.zeros_like(first)
        else:
            margin = self.first_step[:, self.no_answer_first_token] - first
        return mean.cpu().numpy().astype(np.float64), margin.cpu().numpy().astype(np.float64)


def no_answer_first_token(model) -> int | None:
    """The first token the generator writes for `config.no_answer_text` (as training encodes answers)."""
    ids = answer_ids(model, model.config.no_answer_text, with_eos=False) if model.tokenizer is not None else []
    return int(ids[0]) if ids else None


def _row_ids(passages: list, retrieved: Sequence[int] | None) -> np.ndarray | None:
    """Index row ids of one question's passages: retrieved just now, or passed back with their ``row_id``."""
    rows = [p.get("row_id") if isinstance(p, dict) else None for p in passages]
    if retrieved is not None:
        rows = [
            int(r) if r is not None and int(r) >= 0 else rows[j] for j, r in enumerate(list(retrieved)[: len(rows)])
        ]
    if any(r is None or int(r) < 0 for r in rows):
        return None
    return np.asarray(rows, dtype=np.int64)


@torch.no_grad()
def max_similarity(model, questions: Sequence[str], passages, row_ids=None) -> np.ndarray:
    """Best question-passage similarity per question: with the index's vectors where the passages are index
    rows, else by encoding the passages as the index would (title and text)."""
    from .corpus import passage_text
    from .encoders import encode_texts

    q = model.encode_questions(**model.tokenize_questions(list(questions))).float().cpu().numpy()
    ids = row_ids.cpu().numpy() if torch.is_tensor(row_ids) else row_ids
    out = np.full(len(questions), -1.0)
    for i, plist in enumerate(passages):
        if not plist:
            continue
        rows = _row_ids(plist, None if ids is None else ids[i])
        if rows is not None and model.retriever is not None:
            vecs = np.asarray(model.retriever.index.get_embeddings(rows), dtype=np.float32)
        else:
            texts = [passage_text(p) if isinstance(p, dict) else str(p) for p in plist]
            vecs = encode_texts(
                texts,
                model.passage_encoder,
                model.tokenizer.question_encoder,
                pooling=model.config.question_pooling,
                normalize=model.config.normalize_embeddings,
            )
        out[i] = float(np.max(vecs @ q[i]))
    return out


_ARTICLES = {"a", "an", "the"}


def _content_words(text: str) -> list[str]:
    return [w for w in _normalise(text).split() if w not in _ARTICLES]


def answer_support(answers: Sequence[str], passages) -> np.ndarray:
    """Per answer, the share of its words (see `_content_words`) found in its passages' words; 0 for an
    answer without words or without passages."""
    out = np.zeros(len(answers))
    for i, (answer, plist) in enumerate(zip(answers, passages)):
        words = _content_words(answer)
        if not words or not plist:
            continue
        seen = set()
        for p in plist:
            p = p if isinstance(p, dict) else {"text": str(p)}
            seen.update(_content_words(f"{p.get('title') or ''} {p.get('text') or ''}"))
        out[i] = sum(w in seen for w in words) / len(words)
    return out


@torch.no_grad()
def reranker_relevance(model, questions: Sequence[str], passages) -> np.ndarray:
    """The model's reranker's highest relevance logit per question over its passages (0 without a reranker,
    or for a question given no passages)."""
    out = np.zeros(len(questions))
    if getattr(model, "reranker", None) is None:
        return out
    given = [i for i, plist in enumerate(passages) if plist]
    if given:
        logits = model.reranker.score_logits([questions[i] for i in given], [passages[i] for i in given])
        out[given] = [float(np.max(x)) for x in logits]
    return out


def abstain_decisions(
    signals: AnswerSignals, calibration: AbstentionCalibration | None, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`(abstained [N] bool, confidence [N])` under `calibration`, or without one the reader-only rule
    (abstain when the reader gives the no-answer response; confidence = its geometric-mean token
    probability). `threshold` replaces the calibrated one (0 abstains only where the reader says so)."""
    says = signals.says_no_answer > 0.5
    if calibration is None:
        confidence = np.exp(np.clip(signals.answer_logprob, -50.0, 0.0))
        limit = 0.0 if threshold is None else float(threshold)
    else:
        confidence = calibration.confidence(signals.matrix())
        limit = calibration.threshold if threshold is None else float(threshold)
    if not 0.0 <= limit <= 1.0:
        raise RagInputError(f"abstention_threshold must be between 0 and 1, got {threshold!r}.")
    confidence = np.where(says, 0.0, confidence)
    return says | (confidence < limit), confidence


def fit_abstention(
    answerable: AnswerSignals,
    unanswerable: AnswerSignals,
    *,
    max_false_abstention: float = 0.05,
    l2: float = 1e-2,
    fitted_on: str = "",
    no_answer_bias: float = 0.0,
) -> AbstentionCalibration:
    """Fits the logistic confidence on dev questions with (label 1) and without (label 0) answers, and picks
    the highest threshold at which at most `max_false_abstention` of the answerable ones are abstained."""
    x = np.concatenate([answerable.matrix(), unanswerable.matrix()])
    y = np.concatenate([np.ones(len(answerable.says_no_answer)), np.zeros(len(unanswerable.says_no_answer))])
    if y.min() == y.max():
        raise RagConfigError("fit_abstention needs dev questions both with and without answers.")
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / std, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = (w.detach().numpy() / std).tolist()
    bias = float(b.detach()) - float(np.sum(w.detach().numpy() * mean / std))
    cal = AbstentionCalibration(
        weights=weights, bias=bias, threshold=0.0, fitted_on=fitted_on, no_answer_bias=float(no_answer_bias)
    )
    cal.retrieval_floor = float(np.min(answerable.max_similarity)) - 1e-6
    _, conf_a = abstain_decisions(answerable, cal, threshold=0.0)
    reader_abstains = answerable.says_no_answer > 0.5
    budget = max_false_abstention * len(conf_a) - reader_abstains.sum()
    candidates = np.sort(conf_a[~reader_abstains])
    # the largest threshold that abstains on at most `budget` of the answerable questions the reader answered
    k = int(math.floor(budget))
    threshold = 0.0 if k <= 0 or not len(candidates) else float(candidates[min(k, len(candidates)) - 1]) + 1e-9
    threshold = min(max(threshold, 0.0), 1.0)
    cal.threshold = threshold
    abst_a, _ = abstain_decisions(answerable, cal)
    abst_u, _ = abstain_decisions(unanswerable, cal)
    cal.dev_metrics = {
        "answerable": len(abst_a),
        "unanswerable": len(abst_u),
        "answerable_abstained": float(abst_a.mean()),
        "unanswerable_abstained": float(abst_u.mean()),
    }
    return cal


@functools.lru_cache(maxsize=1)
def _warn_no_reranker() -> None:
    logger.warning(
        "The abstention rule was fitted with the reranker's relevance, but the model has no reranker: its "
        "confidences are lower than calibrated. Attach the reranker again (model.set_reranker) or refit the "
        "rule (scripts/calibrate_abstention.py)."
    )


def calibration_of(config) -> AbstentionCalibration | None:
    """The fitted calibration stored in a `RagConfig` (``None`` when it has none)."""
    return AbstentionCalibration.from_dict(config.abstention) if config.abstention else None


def no_answer_sequence_bias(model, bias: float | None = None) -> dict | None:
    """``{(first, second token of a no-answer response): bias}`` for `generate`'s ``sequence_bias``: `bias`,
    or the calibration's `no_answer_bias`; ``None`` when there is no such bias. The openings are those of
    `config.no_answer_text` and of its rewordings ("The document(s) / passage(s) / ... don't say", any
    case): a reader biased away from its own words alone says "The document doesn't say." instead. An
    opening's first token repeated ("The The") is biased too: a reader kept from "The documents" that
    still wants to refuse otherwise repeats "The" until the token budget runs out."""
    if bias is None:
        calibration = calibration_of(model.config)
        bias = calibration.no_answer_bias if calibration is not None else 0.0
    if not bias or model.tokenizer is None:
        return None
    openings = {}
    for text in refusal_texts(model.config.no_answer_text):
        ids = [int(t) for t in answer_ids(model, text, with_eos=False)]
        if len(ids) >= 2:
            openings[tuple(ids[:2])] = float(bias)
            openings[(ids[0], ids[0])] = float(bias)
        elif ids and text == model.config.no_answer_text:  # a one-token no-answer response
            openings[(ids[0],)] = float(bias)
    return openings or None


def recorder_for(model, generation_mode: str, generate_kwargs: dict) -> AnswerLogprobRecorder | None:
    """A recorder added to `generate_kwargs["logits_processor"]` where it can follow the decoding: one
    generator input per question (``concat``) and no beam search. ``None`` elsewhere."""
    from transformers import LogitsProcessorList

    if generation_mode != "concat" or (generate_kwargs.get("num_beams") or 1) > 1:
        return None
    recorder = AnswerLogprobRecorder(no_answer_first_token(model))
    bias = no_answer_sequence_bias(model)
    if bias and "sequence_bias" not in generate_kwargs:
        generate_kwargs["sequence_bias"] = bias
    generate_kwargs["logits_processor"] = LogitsProcessorList(
        [*(generate_kwargs.get("logits_processor") or []), recorder]
    )
    return recorder


@torch.no_grad()
def judge_answers(
    model, questions: Sequence[str], answers: Sequence[str], output, recorder, per_question: int, threshold=None
) -> tuple[np.ndarray, np.ndarray, AnswerSignals]:
    """`(abstained, confidence, signals)` for the first returned answer of each question of a
    `RagGenerateOutput` (`output`), with the signals `recorder` took during generation."""
    first = torch.arange(0, output.sequences.shape[0], per_question)
    n = len(questions)
    if recorder is not None:
        eos = model.generation_config.eos_token_id
        answer_lp, margin = recorder.finish(output.sequences, eos)
        answer_lp, margin = answer_lp[first.numpy()], margin[first.numpy()]
    elif output.sequences_scores is not None:  # RAG-Sequence: the marginal log-likelihood, per token
        lengths = (output.sequences[first] != model.runner().pad_id()).sum(1).clamp(min=1)
        answer_lp = (output.sequences_scores[first].float() / lengths).cpu().numpy().astype(np.float64)
        margin = np.zeros(n)
    else:
        answer_lp, margin = np.zeros(n), np.zeros(n)
    signals = AnswerSignals(
        max_similarity=max_similarity(model, questions, output.passages, output.retrieved_doc_ids),
        answer_logprob=answer_lp,
        no_answer_margin=margin,
        says_no_answer=np.array([float(is_no_answer(a, model.config.no_answer_text)) for a in answers]),
        reranker_relevance=reranker_relevance(model, questions, output.passages),
        answer_support=answer_support(answers, output.passages),
    )
    calibration = calibration_of(model.config)
    if calibration is not None and calibration.uses_reranker and getattr(model, "reranker", None) is None:
        _warn_no_reranker()
    abstained, confidence = abstain_decisions(signals, calibration, threshold)
    return abstained, confidence, signals


@torch.no_grad()
def decline_before_generating(model, question: str, n_docs=None, threshold=None):
    """A `RagAnswer` that abstains without generating when `question`'s retrieved passages are below the
    calibration's `retrieval_floor`; ``None`` when the question should go to the reader (no index, no floor,
    ``threshold=0``, or passages similar enough)."""
    from .modeling_outputs import RagAnswer, RagSource

    calibration = calibration_of(model.config)
    if calibration is None or calibration.retrieval_floor is None or model.retriever is None or threshold == 0:
        return None
    retrieved = model.retrieve([question], n_docs=n_docs)
    similarity = max_similarity(model, [question], retrieved.passages, retrieved.row_ids)[0]
    if similarity >= calibration.retrieval_floor:
        return None
    sources = [
        RagSource.from_passage(p, rank + 1, float(retrieved.doc_scores[0][rank]))
        for rank, p in enumerate(retrieved.passages[0])
    ]
    signals = {name: float("nan") for name in ABSTENTION_FEATURES}
    signals["max_similarity"] = float(similarity)
    return RagAnswer(
        question=question,
        answer=model.config.no_answer_text,
        sources=sources,
        abstained=True,
        confidence=0.0,
        signals=signals,
    )

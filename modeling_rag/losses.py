"""Losses: the contrastive losses that train the retriever's encoders, and [`label_log_probs`], the
memory-light log-probability of the answer tokens that the generator's losses are built from.

The loss is InfoNCE, also called the multiple-negatives ranking loss: each question must score its
positive passage above every other passage of the batch (the other questions' positives and every
hard negative), with the scores divided by a temperature::

    loss = mean_i  -log softmax_j( sim(q_i, p_j) / temperature )[label_i]

Two refinements that matter in practice:

* **false negatives**: when two questions of a batch share a gold passage (common in SQuAD-style data,
  where many questions ask about the same paragraph), that passage would count as a negative for the
  other question. Pass `question_positive_ids` / `passage_ids` and those columns are masked out.
* **negatives from every process**: with `gather_across_processes=True` the question and passage
  vectors of all processes are gathered (`accelerate.utils.gather`), and this process's own slice is put
  back as the tensor that carries gradients, as DPR and sentence-transformers' gathered losses do. Every
  process then computes the *same* global loss, but each back-propagates only through its own slice;
  since DDP averages gradients over processes, the loss to back-propagate is `loss * num_processes`
  ([`ContrastiveLoss.backward_scale`]), which makes a run on `W` processes with per-process batch `B`
  match one process with batch `W * B`.

[`CachedContrastiveLoss`] is the gradient-cached variant (GradCache, Gao et al. 2021; as in
sentence-transformers' ``CachedMultipleNegativesRankingLoss``): embed the batch in mini-batches without
gradients, compute the loss and its gradient with respect to the embeddings, then re-run each
mini-batch with gradients and back-propagate the cached embedding gradients. Memory then grows with
the mini-batch size, not the batch size, while loss and gradients stay those of the full batch.

Example::

    loss_fn = ContrastiveLoss(temperature=0.05)
    q = model.encode_questions(**question_inputs)          # [B, d]
    p = encode_passages(positives + negatives)             # [M, d], positive of question i at labels[i]
    loss = loss_fn(q, p, labels)
    loss.backward()
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import RagConfigError, RagInputError

__all__ = [
    "CachedContrastiveLoss",
    "ContrastiveLoss",
    "RandContext",
    "gather_with_grad",
    "info_nce_loss",
    "label_log_probs",
    "passage_keys",
    "similarity_matrix",
]

SIMILARITIES = ("dot", "cos", "l2")


class _LabelLogProbs(torch.autograd.Function):
    """log softmax(logits)[label] along the last axis, saving only the logits for the backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels != -100
        index = labels.clamp(min=0).unsqueeze(-1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        lse = torch.logsumexp(logits.to(dtype), dim=-1)
        picked = logits.gather(-1, index).squeeze(-1).to(dtype)
        ctx.save_for_backward(logits, index, lse, valid)
        return (picked - lse) * valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, index, lse, valid = ctx.saved_tensors
        g = (grad.to(lse.dtype) * valid).unsqueeze(-1)
        # d/dlogits of (logit[label] - logsumexp) = onehot(label) - softmax, times the incoming gradient
        grad_logits = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(-1))
        grad_logits.mul_(-g)
        grad_logits.scatter_add_(-1, index, g)
        return grad_logits.to(logits.dtype), None


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under `logits`: `[..., V]` and `[...]` give `[...]`, 0 where -100.

    The result is float32 (float64 for float64 logits).

    Equal to ``log_softmax(logits).gather(-1, labels)`` (masked), but the autograd graph keeps only
    `logits`, which the caller usually holds anyway, instead of a second `[..., V]` tensor of
    log-probabilities, and the backward writes one `[..., V]` gradient instead of two. With a
    vocabulary of 50k and a few thousand answer tokens per step, that is hundreds of MB of a
    training step's peak memory.
    """
    if logits.shape[:-1] != labels.shape:
        raise RagInputError(
            f"label_log_probs needs labels shaped like logits without the vocabulary axis: logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}."
        )
    return _LabelLogProbs.apply(logits, labels)


def similarity_matrix(questions: torch.Tensor, passages: torch.Tensor, similarity: str = "dot") -> torch.Tensor:
    """Scores `[N, M]` of questions `[N, d]` against passages `[M, d]`.

    `similarity` is ``"dot"`` (inner product; what an ``ip`` index ranks by), ``"cos"`` (cosine) or
    ``"l2"`` (negative squared Euclidean distance; what an ``l2`` index ranks by).
    """
    if similarity == "dot":
        return questions @ passages.T
    if similarity == "cos":
        return nn.functional.normalize(questions, dim=-1) @ nn.functional.normalize(passages, dim=-1).T
    if similarity == "l2":
        return -torch.cdist(questions, passages).pow(2)
    raise RagConfigError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")


def false_negative_mask(
    labels: torch.Tensor, question_positive_ids: torch.Tensor | None, passage_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """`[N, M]` booleans: the passage columns that must not count as negatives for each question.

    * a gold passage of question `i` other than its label column (a false negative);
    * a repeated passage: of the columns sharing one passage key, only the first counts (the same passage
      twice in the softmax would weigh double; repeats occur when the batch comes from several processes
      or a passage is a negative of several questions). A question's label column is always kept.

    `question_positive_ids` is `[N, P]` (integer passage keys, `-1` padding), `passage_ids` `[M]` (the key
    of each passage column, `-1` for passages without an id).
    """
    if passage_ids is None:
        return None
    keys = passage_ids.to(labels.device)
    known = keys >= 0
    same = (keys.unsqueeze(0) == keys.unsqueeze(1)) & known.unsqueeze(0) & known.unsqueeze(1)
    repeated = torch.tril(same, diagonal=-1).any(dim=1)  # [M]: an earlier column holds the same passage
    mask = repeated.unsqueeze(0).expand(len(labels), -1).clone()
    if question_positive_ids is not None:
        pos = question_positive_ids.to(labels.device)
        hit = (pos.unsqueeze(-1) == keys.view(1, 1, -1)) & (pos.unsqueeze(-1) >= 0)  # [N, P, M]
        mask |= hit.any(dim=1)
    mask[torch.arange(len(labels), device=mask.device), labels] = False
    return mask


def info_nce_loss(
    questions: torch.Tensor,
    passages: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.05,
    similarity: str = "dot",
    exclude: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE over the rows of `passages`.

    Args:
        questions: `[N, d]` question vectors.
        passages: `[M, d]` passage vectors: every question's positive, plus hard negatives.
        labels: `[N]` the column of each question's positive in `passages`.
        temperature: Scores are divided by it (smaller = sharper); must be > 0.
        similarity: ``"dot"``, ``"cos"`` or ``"l2"`` (see [`similarity_matrix`]).
        exclude: Optional `[N, M]` booleans: columns that must not count as negatives (false negatives).
        reduction: ``"mean"`` or ``"sum"`` over questions, or ``"none"``.
    """
    if temperature <= 0:
        raise RagConfigError(f"temperature must be > 0, got {temperature!r}.")
    if questions.ndim != 2 or passages.ndim != 2 or questions.shape[1] != passages.shape[1]:
        raise RagInputError(
            f"questions and passages must be [N, d] and [M, d]; got {tuple(questions.shape)} and {tuple(passages.shape)}."
        )
    labels = labels.to(questions.device).long()
    if labels.shape != (questions.shape[0],):
        raise RagInputError(f"labels must have shape [{questions.shape[0]}], got {tuple(labels.shape)}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= passages.shape[0]):
        raise RagInputError("Every label must be the index of a row of passages.")
    scores = similarity_matrix(questions.float(), passages.float(), similarity) / temperature
    if exclude is not None:
        scores = scores.masked_fill(exclude.to(scores.device), torch.finfo(scores.dtype).min)
    return nn.functional.cross_entropy(scores, labels, reduction=reduction)


def _num_processes(accelerator: Any) -> int:
    return 1 if accelerator is None else int(accelerator.num_processes)


def gather_with_grad(tensor: torch.Tensor, accelerator: Any = None) -> tuple[torch.Tensor, int]:
    """Concatenates `tensor` (`[n_p, ...]`, sizes may differ) from every process, in process order.

    The rows of this process are the original `tensor`, so gradients flow back through them; rows from
    the other processes are constants. Returns the gathered tensor and the offset of this process's
    rows in it. With one process (or no accelerator) it returns `(tensor, 0)`.
    """
    if _num_processes(accelerator) == 1:
        return tensor, 0
    from accelerate.utils import gather, pad_across_processes

    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = gather(size).tolist()
    padded = pad_across_processes(tensor.detach().contiguous(), dim=0)
    gathered = gather(padded)
    width = padded.shape[0]
    rank = int(accelerator.process_index)
    parts = []
    for p, n in enumerate(sizes):
        parts.append(tensor if p == rank else gathered[p * width : p * width + n])
    return torch.cat(parts, dim=0), int(sum(sizes[:rank]))


class ContrastiveLoss(nn.Module):
    """In-batch + hard-negative InfoNCE (multiple-negatives ranking loss) with a temperature.

    Args:
        temperature: Scores are divided by it; 0.05 suits L2-normalised vectors (cosine in [-1, 1]).
        similarity: ``"dot"``, ``"cos"`` or ``"l2"``; use the index's metric (``"dot"`` for ``ip``).
        gather_across_processes: Use every process's passages as negatives (needs `accelerator`).
        accelerator: The `accelerate.Accelerator` of the run (only needed when gathering).
        symmetric: Add the passage-to-question loss over the positives (as in some sentence-embedding
            recipes); off by default, as in DPR.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        similarity: str = "dot",
        *,
        gather_across_processes: bool = True,
        accelerator: Any = None,
        symmetric: bool = False,
    ):
        super().__init__()
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise RagConfigError(f"temperature must be a number > 0, got {temperature!r}.")
        if similarity not in SIMILARITIES:
            raise RagConfigError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        self.temperature = float(temperature)
        self.similarity = similarity
        self.gather_across_processes = gather_across_processes
        self.accelerator = accelerator
        self.symmetric = symmetric

    @property
    def gathers(self) -> bool:
        """Whether this loss gathers vectors from other processes."""
        return self.gather_across_processes and _num_processes(self.accelerator) > 1

    @property
    def backward_scale(self) -> float:
        """Factor to multiply the loss by before `backward` so that DDP's gradient averaging gives the
        gradient of the global loss (the number of processes when gathering, else 1)."""
        return float(_num_processes(self.accelerator)) if self.gathers else 1.0

    def forward(
        self,
        questions: torch.Tensor,
        passages: torch.Tensor,
        labels: torch.Tensor,
        question_positive_ids: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss over the (global, when gathering) batch.

        Args:
            questions: `[N, d]` this process's question vectors.
            passages: `[M, d]` this process's passage vectors.
            labels: `[N]` index of each question's positive in `passages` (local indices).
            question_positive_ids: optional `[N, P]` integer keys of each question's gold passages
                (`-1` padding), to mask false negatives.
            passage_ids: optional `[M]` integer key of each passage column (`-1` when unknown).
        """
        labels = labels.to(questions.device).long()
        if self.gathers:
            acc = self.accelerator
            questions, _ = gather_with_grad(questions, acc)
            passages, offset = gather_with_grad(passages, acc)
            labels, _ = gather_with_grad(labels + offset, acc)
            if question_positive_ids is not None and passage_ids is not None:
                from accelerate.utils import pad_across_processes

                question_positive_ids = pad_across_processes(
                    question_positive_ids.to(questions.device), dim=1, pad_index=-1
                )
                question_positive_ids, _ = gather_with_grad(question_positive_ids, acc)
                passage_ids, _ = gather_with_grad(passage_ids.to(questions.device), acc)
        exclude = false_negative_mask(labels, question_positive_ids, passage_ids)
        loss = info_nce_loss(
            questions, passages, labels, temperature=self.temperature, similarity=self.similarity, exclude=exclude
        )
        if self.symmetric:
            # passage -> question over the positives: each positive must pick its own question
            positives = passages[labels]
            q_ids = torch.arange(len(labels), device=questions.device)
            same = None
            if passage_ids is not None:
                keys = passage_ids.to(questions.device)[labels]
                same = (keys.unsqueeze(0) == keys.unsqueeze(1)) & (keys.unsqueeze(0) >= 0)
                same.fill_diagonal_(False)
            loss = (
                loss
                + info_nce_loss(
                    positives,
                    questions,
                    q_ids,
                    temperature=self.temperature,
                    similarity=self.similarity,
                    exclude=same,
                )
            ) / 2
        return loss


class RandContext:
    """Captures the random-number state now and restores it inside `with`: the re-run of a mini-batch
    with gradients then draws the same dropout masks as its first run without gradients."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = None
        self.devices = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.devices = sorted(
                {t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
            )
            self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]
        self._fork = None

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda_states is not None:
            for d, s in zip(self.devices, self.cuda_states):
                torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)
        self._fork = None


@dataclass
class _Chunk:
    question_inputs: dict | None
    passage_inputs: dict | None
    rand: RandContext | None = None


def _slice_inputs(inputs: dict | None, start: int, end: int) -> dict | None:
    if inputs is None:
        return None
    n = _batch_len(inputs)
    if start >= n:
        return None
    return {k: v[start:end] for k, v in inputs.items()}


def _batch_len(inputs: dict | None) -> int:
    if not inputs:
        return 0
    return int(next(iter(inputs.values())).shape[0])


class CachedContrastiveLoss:
    """GradCache around a [`ContrastiveLoss`]: same loss and gradients, memory of one mini-batch.

    Use it through [`step`], which does the backward pass itself:

    ```python
    cached = CachedContrastiveLoss(ContrastiveLoss(temperature=0.05), chunk_size=8)
    loss = cached.step(embed, question_inputs, passage_inputs, labels, backward=accelerator.backward)
    optimizer.step()
    ```

    `embed(question_inputs | None, passage_inputs | None) -> (question_vectors | None, passage_vectors | None)`
    runs the encoders on one mini-batch (call the model once per mini-batch, so that DDP sees one forward
    per backward).
    """

    def __init__(self, loss: ContrastiveLoss, chunk_size: int):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise RagConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        self.loss = loss
        self.chunk_size = chunk_size

    def _chunks(self, question_inputs: dict, passage_inputs: dict) -> list[_Chunk]:
        """Splits questions and passages into the same number of mini-batches, so that every mini-batch
        runs every trainable encoder (DDP wants each parameter used in each backward): at most
        `chunk_size` questions per mini-batch, passages spread evenly over the mini-batches."""
        nq, np_ = _batch_len(question_inputs), _batch_len(passage_inputs)
        if nq == 0:
            raise RagInputError("The batch holds no questions.")
        k = min(nq, max(math.ceil(nq / self.chunk_size), math.ceil(np_ / self.chunk_size)))

        def bounds(n: int) -> list[tuple[int, int]]:
            base, extra = divmod(n, k)
            out, start = [], 0
            for i in range(k):
                end = start + base + (1 if i < extra else 0)
                out.append((start, end))
                start = end
            return out

        return [
            _Chunk(
                _slice_inputs(question_inputs, qs, qe) if qe > qs else None,
                _slice_inputs(passage_inputs, ps, pe) if pe > ps else None,
            )
            for (qs, qe), (ps, pe) in zip(bounds(nq), bounds(np_))
        ]

    def step(
        self,
        embed: Callable[[dict | None, dict | None], tuple[torch.Tensor | None, torch.Tensor | None]],
        question_inputs: dict,
        passage_inputs: dict,
        labels: torch.Tensor,
        *,
        question_positive_ids: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """Computes the loss of the whole batch and accumulates its gradients into the parameters.

        Args:
            embed: Runs the encoders on one mini-batch (see the class docstring).
            question_inputs / passage_inputs: Tokenised inputs (dicts of `[n, L]` tensors) of the whole batch.
            labels, question_positive_ids, passage_ids: As for [`ContrastiveLoss.forward`].
            backward: How to back-propagate (e.g. `accelerator.backward`); defaults to `Tensor.backward`.
            no_sync: A context-manager factory that suspends DDP's gradient all-reduce (e.g.
                `lambda: accelerator.no_sync(model)`), used for every mini-batch but the last.

        Returns:
            The loss (detached), equal to what [`ContrastiveLoss`] gives on the full batch.
        """
        backward = backward or (lambda t: t.backward())
        chunks = self._chunks(question_inputs, passage_inputs)
        # 1. embed every mini-batch without gradients, remembering the random state of each
        q_parts: list[torch.Tensor] = []
        p_parts: list[torch.Tensor] = []
        with torch.no_grad():
            for chunk in chunks:
                chunk.rand = RandContext(*_tensors(chunk))
                q, p = embed(chunk.question_inputs, chunk.passage_inputs)
                if q is not None:
                    q_parts.append(q.detach())
                if p is not None:
                    p_parts.append(p.detach())
        q_all = torch.cat(q_parts).float().requires_grad_(True)
        p_all = torch.cat(p_parts).float().requires_grad_(True)
        # 2. the loss and its gradient with respect to the embeddings
        with torch.enable_grad():
            loss = self.loss(q_all, p_all, labels, question_positive_ids, passage_ids)
            q_grad, p_grad = torch.autograd.grad(loss * self.loss.backward_scale, [q_all, p_all])
        # 3. re-run each mini-batch with gradients and push the cached gradients through it
        q_start = p_start = 0
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx, chunk.rand:
                q, p = embed(chunk.question_inputs, chunk.passage_inputs)
                surrogate = torch.zeros((), device=q_all.device)
                if q is not None:
                    surrogate = surrogate + (q.float() * q_grad[q_start : q_start + len(q)]).sum()
                    q_start += len(q)
                if p is not None:
                    surrogate = surrogate + (p.float() * p_grad[p_start : p_start + len(p)]).sum()
                    p_start += len(p)
                backward(surrogate)
        return loss.detach()


def _tensors(chunk: _Chunk) -> Iterator[torch.Tensor]:
    for inputs in (chunk.question_inputs, chunk.passage_inputs):
        if inputs:
            yield from (v for v in inputs.values() if isinstance(v, torch.Tensor))


def passage_keys(ids: Sequence[str | None], vocabulary: dict[str, int]) -> torch.Tensor:
    """Integer keys for passage ids (`-1` for `None`), growing `vocabulary` as needed."""
    out = []
    for pid in ids:
        if pid is None:
            out.append(-1)
        else:
            out.append(vocabulary.setdefault(str(pid), len(vocabulary)))
    return torch.tensor(out, dtype=torch.long)

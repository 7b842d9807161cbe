"""Evaluation during and after training: exact retrieval metrics over an index, answer metrics, the final report."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..metrics import metric_script
from ..qa_data import QAExample
from ..utils.similarity import pairwise_scores
from .data import passage_lookup, passage_texts

logger = logging.getLogger(__name__)


def encode_passages(model, passages: Sequence[dict], *, batch_size: int = 64, device=None) -> np.ndarray:
    """Vectors `[N, d]` of `passages` with the model's passage encoder (no gradients)."""
    from ..encoders import encode_texts

    return encode_texts(
        passage_texts(passages),
        model.passage_encoder,
        model.tokenizer.question_encoder,
        pooling=model.config.question_pooling,
        normalize=model.config.normalize_embeddings,
        batch_size=batch_size,
        device=device,
    )


def encode_questions(model, questions: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Vectors `[N, d]` of `questions` with the model's question encoder (no gradients)."""
    out = []
    was = model.question_encoder.training
    model.question_encoder.eval()
    with torch.no_grad():
        for s in range(0, len(questions), batch_size):
            enc = model.tokenize_questions(list(questions[s : s + batch_size]))
            enc = {k: v.to(next(model.question_encoder.parameters()).device) for k, v in enc.items()}
            out.append(model.encode_questions(**enc).float().cpu().numpy())
    model.question_encoder.train(was)
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.config.retrieval_vector_size), np.float32)


def dense_topk(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` `(scores, positions)` of `queries` `[B, d]` among `vectors` `[N, d]`, best first."""
    k = min(int(k), len(vectors))
    scores_out = np.empty((len(queries), k), dtype=np.float32)
    ids_out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        q = queries[s : s + 256]
        sc = pairwise_scores(q, vectors, metric)
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k] if k < sc.shape[1] else np.tile(np.arange(k), (len(q), 1))
        order = np.take_along_axis(sc, part, 1).argsort(axis=1, kind="stable")[:, ::-1]
        # ties: stable on descending means reversed; re-sort for deterministic best-first order
        top = np.take_along_axis(part, order, 1)
        top_scores = np.take_along_axis(sc, top, 1)
        ids_out[s : s + len(q)] = top
        scores_out[s : s + len(q)] = top_scores
    return scores_out, ids_out


def retrieval_metrics(
    question_vectors: np.ndarray,
    passage_vectors: np.ndarray,
    gold: Sequence[Sequence[int]],
    *,
    metric: str = "ip",
    ks: Sequence[int] = (1, 5, 10, 20),
) -> dict[str, float]:
    """Top-k accuracy (a gold passage among the first k), MRR and mean rank of the first gold passage.

    Questions without gold passages are skipped. Ranks are computed exactly over all passages.
    """
    rows = [i for i, g in enumerate(gold) if g]
    if not rows:
        return {"count": 0}
    sc = pairwise_scores(question_vectors[rows], passage_vectors, metric)
    # each question's ranking down to its best gold passage: every passage scored above it (best first),
    # then that passage; the metrics themselves come from the rag_retrieval metric's one computation
    predictions, references = [], []
    for r, i in enumerate(rows):
        gold_positions = list(gold[i])
        best_gold = gold_positions[int(np.argmax(sc[r, gold_positions]))]
        above = np.flatnonzero(sc[r] > sc[r, best_gold])
        above = above[np.argsort(-sc[r, above], kind="stable")]
        predictions.append([str(p) for p in above] + [str(best_gold)])
        references.append([str(p) for p in gold_positions])
    computed = metric_script("rag_retrieval").compute_retrieval_metrics(predictions, references, k_values=ks)
    out = {f"top{k}": computed[f"top_{k}_accuracy"] for k in ks}
    out["mrr"] = computed["mrr"]
    out["mean_rank"] = computed["mean_rank"]
    out["count"] = len(rows)
    return out


def reencode_retriever(model, *, batch_size: int = 64, accelerator=None):
    """A new retriever over the same passages, encoded with the model's current passage encoder.

    The index keeps its kind, metric, parameters and chunking record; BM25 is rebuilt when the old
    retriever had one. Returns the new `RagRetriever` (not attached).
    """
    from ..encoders import weights_fingerprint
    from ..index.bm25 import BM25Index
    from ..index.passage_index import PassageIndex
    from ..retrieval_rag import RagRetriever

    old = model.retriever
    index = old.index
    passages, _ = passage_lookup(index)
    if accelerator is not None and accelerator.num_processes > 1:
        from ..retrieval_rag import _encode_sharded

        emb = _encode_sharded(
            passage_texts(passages),
            model.passage_encoder,
            model.tokenizer.question_encoder,
            accelerator,
            {
                "pooling": model.config.question_pooling,
                "normalize": model.config.normalize_embeddings,
                "batch_size": batch_size,
            },
        )
    else:
        emb = encode_passages(model, passages, batch_size=batch_size)
    clean = [{k: v for k, v in p.items() if k != "row_id"} for p in passages]
    new_index = PassageIndex.build(
        emb,
        clean,
        metric=index.metric,
        kind=index.kind,
        encoder_name=index.encoder_name,
        encoder_fingerprint=weights_fingerprint(model.passage_encoder),
        chunking=index.chunking,
        **index.kind_params,
    )
    encoding = index.config.get("encoding")
    if encoding:
        new_index.set_extra_config("encoding", encoding)
    bm25 = BM25Index.build(new_index.get_passages(new_index.row_ids)) if old.bm25 is not None else None
    retriever = RagRetriever(
        new_index,
        bm25,
        retrieval=old.retrieval,
        fusion=old.fusion,
        rrf_k=old.rrf_k,
        hybrid_alpha=old.hybrid_alpha,
        fusion_normalization=old.fusion_normalization,
        fusion_depth=old.fusion_depth,
    )
    if old.passage_tokens is not None and model.tokenizer is not None:  # row ids are new: store them again
        retriever.store_passage_tokens(model.tokenizer.generator, show_progress=False)
    return retriever


def retrieve_all(model, questions: Sequence[str], n_docs: int, batch_size: int = 32) -> tuple[list, list]:
    """Retrieves `n_docs` passages for every question with the model's retriever (no gradients).

    Returns `(passage_lists, score_lists)`, plain Python lists that can be cached as JSON.
    """
    passages, scores = [], []
    for s in range(0, len(questions), batch_size):
        out = model.retrieve(list(questions[s : s + batch_size]), n_docs)
        for plist, sc in zip(out.passages, np.asarray(out.doc_scores).tolist()):
            passages.append([{k: p.get(k) for k in ("id", "title", "text", "source", "row_id")} for p in plist])
            scores.append([float(x) for x in sc])
    return passages, scores


def answer_metrics(
    model,
    examples: Sequence[QAExample],
    *,
    passages: Sequence[Sequence[dict]] | None = None,
    doc_scores: Sequence[Sequence[float]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
) -> tuple[dict, list[str]]:
    """SQuAD exact match and F1 (percent, max over gold answers) of greedy answers. Returns
    `(metrics, predictions)`."""
    from ..metrics import exact_match_score, f1_score, metric_max_over_ground_truths

    was = model.training
    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            kwargs: dict[str, Any] = {}
            if passages is not None:
                kwargs["passages"] = [list(p) for p in passages[s : s + batch_size]]
                if doc_scores is not None:
                    kwargs["doc_scores"] = [list(x) for x in doc_scores[s : s + batch_size]]
            out = model.answer(
                [ex.question for ex in chunk], max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs
            )
            preds.extend(a.answer for a in out)
    model.train(was)
    em = [metric_max_over_ground_truths(exact_match_score, p, ex.answers) for p, ex in zip(preds, examples)]
    f1 = [metric_max_over_ground_truths(f1_score, p, ex.answers) for p, ex in zip(preds, examples)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1)), "count": len(preds)}, preds


def write_final_metrics(accelerator, trainer, output_dir: str, before: dict | None, t_start: float) -> dict | None:
    """Writes ``final_metrics.json`` (dev metrics before and after, training time) atomically, on the
    main process; returns what it wrote (``None`` on other processes)."""

    from ..utils.atomic import atomic_write_text

    if not accelerator.is_main_process:
        return None
    final = {"before": before, "train_seconds": round(time.time() - t_start, 1)}
    evals = [h for h in trainer.history if "eval_f1" in h]
    if evals:
        final["after"] = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")}
    atomic_write_text(os.path.join(output_dir, "final_metrics.json"), json.dumps(final, indent=2))
    return final

"""CrossEncoderReranker: reorders first-stage candidates by a cross-encoder's (question, passage) relevance.

A cross-encoder reads the question and one passage together (``[CLS] question [SEP] passage [SEP]``)
and gives one logit; the relevance reported as the passage's score is ``sigmoid(logit)``, the
probability that the passage answers the question (the training loss is binary cross-entropy, see
``scripts/train_reranker.py``), so it can be compared with a threshold to abstain.

Passages are tokenised once and their token ids kept in a bounded cache keyed by the passage text,
so a passage retrieved again costs no tokenizer call; pairs are scored in length-sorted batches.

A saved reranker is a folder with ``reranker_config.json`` and the tokenizer, plus either

* a peft adapter (``adapter_config.json``, ``adapter_model.safetensors``: LoRA weights and the new
  classification head) over a base model named in ``reranker_config.json`` (``"all-MiniLM-L6-v2"``
  is the copy installed with the package, see `modeling_rag.assets`), never a copy of the base; or
* a whole sequence-classification model (``config.json``, ``model.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .constants import RERANKER_CONFIG_NAME, RERANKER_FORMAT_VERSION
from .corpus import passage_text
from .errors import RagConfigError, RagInputError
from .utils.atomic import atomic_write_text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Tokenizers the reranker can build pairs for from cached ids: those with BERT-style [CLS] / [SEP] tokens.
PAIR_TOKENS = ("cls_token_id", "sep_token_id")


@dataclass
class RerankerSpeedOptions:
    """How the reranker trades memory for speed.

    Attributes:
        batch_size: (question, passage) pairs per forward pass.
        cache_size: Passages whose token ids are kept (least recently used ones are dropped).
        question_max_length: Question tokens read (the rest of `max_length` is the passage's).
    """

    batch_size: int = 64
    cache_size: int = 100_000
    question_max_length: int = 64

    def __post_init__(self) -> None:
        for field in ("batch_size", "cache_size", "question_max_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RagConfigError(f"RerankerSpeedOptions.{field} must be a positive integer, got {value!r}.")


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class CrossEncoderReranker:
    """Scores (question, passage) pairs with a sequence-classification model and reorders candidates.

    Args:
        model: A transformers sequence-classification model with one label (its logit is the relevance).
        tokenizer: Its tokenizer; it must have ``[CLS]`` / ``[SEP]``-style tokens (BERT, MiniLM, ...).
        max_length: Tokens of one pair (question, passage and 3 special tokens).
        base_model: With `adapter_files`, the base model the adapter applies to (a name for
            `modeling_rag.assets.resolve_model`, or a Hub id); recorded when saving.
        adapter_files: The peft adapter's files (name -> bytes), written back by `save`; None for a whole model.
        speed: `RerankerSpeedOptions`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_length: int = 256,
        base_model: str | None = None,
        adapter_files: dict[str, bytes] | None = None,
        speed: RerankerSpeedOptions | None = None,
    ) -> None:
        if tokenizer is None:
            raise RagInputError(
                "The reranker has no tokenizer: pass the tokenizer of its model (AutoTokenizer.from_pretrained on "
                "the same folder), or load a reranker folder saved with its tokenizer files."
            )
        missing = [name for name in PAIR_TOKENS if getattr(tokenizer, name, None) is None]
        if missing:
            raise RagConfigError(
                f"The reranker tokenizer ({type(tokenizer).__name__}) lacks {missing}; the reranker builds "
                "'[CLS] question [SEP] passage [SEP]' pairs and supports BERT-style tokenizers only."
            )
        if getattr(getattr(model, "config", None), "num_labels", None) != 1:
            raise RagConfigError(
                "The reranker model must be a sequence-classification model with num_labels=1 (one relevance "
                f"logit), got num_labels={getattr(getattr(model, 'config', None), 'num_labels', None)!r}."
            )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
            raise RagConfigError(f"reranker max_length must be an integer >= 8, got {max_length!r}.")
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and max_length > window:
            raise RagConfigError(f"reranker max_length ({max_length}) exceeds the model's window ({window}).")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.base_model = base_model
        self.adapter_files = adapter_files
        self.speed = speed or RerankerSpeedOptions()
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()

    def __repr__(self) -> str:
        kind = f"adapter over {self.base_model!r}" if self.adapter_files else "full model"
        return f"CrossEncoderReranker({type(self.model).__name__}, {kind}, max_length={self.max_length})"

    # ------------------------------------------------------------------ tokens
    def _passage_ids(self, text: str) -> list[int]:
        key = _text_key(text)
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            return ids
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        self._cache[key] = ids
        if len(self._cache) > self.speed.cache_size:
            self._cache.popitem(last=False)
        return ids

    def pair_ids(self, question: str, passages: Sequence[dict | str]) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, token_type_ids)`` of each ``[CLS] question [SEP] passage [SEP]`` pair, truncated."""
        q = self.tokenizer(
            question, add_special_tokens=False, truncation=True, max_length=self.speed.question_max_length
        )["input_ids"]
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        room = max(self.max_length - len(q) - 3, 1)
        pairs = []
        for p in passages:
            text = p if isinstance(p, str) else passage_text(p)
            ids = self._passage_ids(text)[:room]
            pairs.append(([cls, *q, sep, *ids, sep], [0] * (len(q) + 2) + [1] * (len(ids) + 1)))
        return pairs

    # ------------------------------------------------------------------ scoring
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def logits(self, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Relevance logits `[len(pairs)]` (with gradients when the model trains), in the order of `pairs`."""
        device = self._device()
        pad = self.tokenizer.pad_token_id or 0
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        out = torch.empty(len(pairs), device=device)
        parts = []
        bs = self.speed.batch_size
        for s in range(0, len(order), bs):
            rows = [pairs[i] for i in order[s : s + bs]]
            width = max(len(r[0]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            types = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (a, t) in enumerate(rows):
                ids[j, : len(a)] = torch.tensor(a)
                types[j, : len(t)] = torch.tensor(t)
                mask[j, : len(a)] = 1
            logits = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device)
            ).logits
            parts.append(logits[:, 0])
        if not parts:
            return out
        return torch.cat(parts).float()[torch.argsort(torch.tensor(order, device=device))]

    @torch.no_grad()
    def score(self, questions: Sequence[str], passages: Sequence[Sequence[dict | str]]) -> list[np.ndarray]:
        """The relevance (sigmoid of the logit, in (0, 1)) of each passage for its question, one array per question."""
        if isinstance(questions, str):
            raise RagInputError("questions must be a list of strings, got a single string.")
        if len(questions) != len(passages):
            raise RagInputError(f"Got {len(questions)} questions but {len(passages)} passage lists; they must match.")
        was_training = self.model.training
        self.model.eval()
        try:
            pairs, sizes = [], []
            for q, plist in zip(questions, passages):
                pairs.extend(self.pair_ids(q, plist))
                sizes.append(len(plist))
            probs = torch.sigmoid(self.logits(pairs)).cpu().numpy().astype(np.float32)
        finally:
            self.model.train(was_training)
        return np.split(probs, np.cumsum(sizes)[:-1]) if sizes else []

    def rerank(self, questions: Sequence[str], retrieved: Any, n_docs: int) -> Any:
        """Reorders a `RetrievalOutput` of candidates by relevance and keeps the best `n_docs` of each question.

        The returned `RetrievalOutput` has the relevance as `doc_scores`; its `row_ids`, `passages` and
        `doc_embeddings` follow the new order. Ties keep the first stage's order.
        """
        from .retrieval_rag import RetrievalOutput

        if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
            raise RagInputError(f"n_docs must be a positive integer, got {n_docs!r}.")
        scores = self.score(list(questions), retrieved.passages)
        k = min(int(n_docs), retrieved.row_ids.shape[1])
        rows, out_scores, out_passages, embeddings = [], [], [], []
        for b, s in enumerate(scores):
            order = np.argsort(-s, kind="stable")[:k]
            rows.append(retrieved.row_ids[b][order])
            out_scores.append(s[order])
            out_passages.append([retrieved.passages[b][i] for i in order])
            if retrieved.doc_embeddings is not None:
                embeddings.append(retrieved.doc_embeddings[b][order])
        return RetrievalOutput(
            row_ids=np.asarray(rows, dtype=np.int64).reshape(len(scores), k),
            doc_scores=np.asarray(out_scores, dtype=np.float32).reshape(len(scores), k),
            doc_embeddings=np.asarray(embeddings, dtype=np.float32) if embeddings else None,
            passages=out_passages,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> None:
        """Writes the reranker into `folder`: its config, tokenizer and adapter (or whole model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        if self.adapter_files is not None:
            for name, data in self.adapter_files.items():
                tmp = folder / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, folder / name)
        else:
            self.model.save_pretrained(folder)
        config = {
            "format_version": RERANKER_FORMAT_VERSION,
            "kind": "adapter" if self.adapter_files is not None else "model",
            "base_model": self.base_model,
            "max_length": self.max_length,
            "score": "sigmoid(logit): probability that the passage answers the question",
        }
        atomic_write_text(folder / RERANKER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_peft_model(
        cls, peft_model: Any, tokenizer: Any, *, base_model: str, **kwargs: Any
    ) -> CrossEncoderReranker:
        """A reranker from a trained peft model: its adapter files are kept for `save`, its weights merged."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            files = {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}
        files["adapter_config.json"] = _portable_adapter_config(files["adapter_config.json"], base_model)
        import copy

        merged = copy.deepcopy(peft_model).merge_and_unload()
        return cls(merged, tokenizer, base_model=base_model, adapter_files=files, **kwargs)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, speed: RerankerSpeedOptions | None = None) -> CrossEncoderReranker:
        """Opens a folder written by `save`; a missing tokenizer, config or weights file raises `RagConfigError`."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        config_path = folder / RERANKER_CONFIG_NAME
        if not config_path.is_file():
            raise RagConfigError(f"{folder} has no {RERANKER_CONFIG_NAME}; it is not a saved reranker.")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise RagConfigError(f"{config_path} is not valid JSON ({err}).") from None
        if not isinstance(config, dict) or config.get("format_version") != RERANKER_FORMAT_VERSION:
            raise RagConfigError(
                f"{config_path}: format_version must be {RERANKER_FORMAT_VERSION}, got "
                f"{config.get('format_version') if isinstance(config, dict) else config!r}."
            )
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            raise RagConfigError(
                f"The reranker in {folder} has no tokenizer files (tokenizer.json / vocab.txt); save it again with "
                "its tokenizer (reranker.save(folder))."
            )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        kind = config.get("kind")
        if kind == "adapter":
            missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
            if missing:
                raise RagConfigError(f"The reranker adapter in {folder} lacks {missing}.")
            from peft import PeftModel

            from .assets import resolve_model

            base_name = config.get("base_model")
            if not isinstance(base_name, str) or not base_name:
                raise RagConfigError(f"{config_path}: an adapter reranker needs 'base_model' (the model it adapts).")
            base = AutoModelForSequenceClassification.from_pretrained(
                resolve_model(base_name, "question_encoder"), num_labels=1
            )
            model = PeftModel.from_pretrained(base, folder).merge_and_unload()
            files = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
        elif kind == "model":
            if not (folder / "model.safetensors").is_file():
                raise RagConfigError(f"The reranker in {folder} has no model.safetensors.")
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            files = None
        else:
            raise RagConfigError(f"{config_path}: kind must be 'adapter' or 'model', got {kind!r}.")
        model.eval()
        return cls(
            model,
            tokenizer,
            max_length=int(config.get("max_length", 256)),
            base_model=config.get("base_model"),
            adapter_files=files,
            speed=speed,
        )


def _portable_adapter_config(data: bytes, base_model: str) -> bytes:
    """The adapter config naming the base by `base_model` (a portable name), not by a folder of this machine."""
    config = json.loads(data)
    config["base_model_name_or_path"] = base_model
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# the reranker stage of a RagForGeneration
# ---------------------------------------------------------------------------------------------------
def attach_reranker(model: Any, reranker: CrossEncoderReranker | None) -> None:
    """Sets `model.reranker` and `model.config.reranker` (the subfolder it saves into)."""
    from .constants import RERANKER_DIR

    if reranker is None:
        model.reranker = None
        model.config.reranker = None
        return
    if not isinstance(reranker, CrossEncoderReranker):
        raise RagInputError(f"reranker must be a CrossEncoderReranker or None, got {type(reranker).__name__}.")
    if model.config.n_candidates < model.config.n_docs:
        raise RagConfigError(
            f"n_candidates ({model.config.n_candidates}) is smaller than n_docs ({model.config.n_docs}): the "
            "reranker keeps n_docs of the n_candidates first-stage passages; raise config.n_candidates."
        )
    model.config.reranker = model.config.reranker or RERANKER_DIR
    model.reranker = reranker


def retrieve_and_rerank(model: Any, embeddings: np.ndarray | None, questions: list[str], n_docs: int) -> Any:
    """First stage for `config.n_candidates` passages, then the `n_docs` the model's reranker scores highest."""
    n_candidates = model.config.n_candidates
    if n_docs > n_candidates:
        raise RagInputError(
            f"n_docs ({n_docs}) is more than config.n_candidates ({n_candidates}): the reranker only orders the "
            f"first {n_candidates} first-stage passages; raise config.n_candidates or ask for fewer passages."
        )
    candidates = model.retriever.retrieve(embeddings, n_candidates, questions=questions)
    return model.reranker.rerank(questions, candidates, n_docs)


def load_model_reranker(model: Any, folder: str | os.PathLike) -> None:
    """Loads the reranker a saved model's config names; a missing or broken one is refused here, at load time."""
    sub = Path(folder) / model.config.reranker
    if not sub.is_dir():
        raise RagConfigError(
            f"config.reranker is {model.config.reranker!r} but {folder} has no such folder; the saved model is "
            "incomplete (save it again, or set config.reranker to None to drop reranking)."
        )
    attach_reranker(model, CrossEncoderReranker.load(sub))

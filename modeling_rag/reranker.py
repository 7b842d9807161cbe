"""CrossEncoderReranker: reorders first-stage candidates by a cross-encoder's (question, passage) relevance.

A cross-encoder reads the question and one passage together (``[CLS] question [SEP] passage [SEP]``)
and gives one logit; the relevance reported as the passage's score is ``sigmoid(logit)``, the
probability that the passage answers the question (the training loss is binary cross-entropy, see
``scripts/train_reranker.py``), so it can be compared with a threshold to abstain.

Passages are tokenised once and their token ids kept in a bounded cache keyed by the passage text,
so a passage retrieved again costs no tokenizer call; pairs are scored in length-sorted batches.

Two scoring heads (`RERANKER_HEADS`, recorded as ``head`` in ``reranker_config.json``):

* ``"sequence_classification"``: any transformers sequence-classification model with one label
  (its logit over ``[CLS]``), e.g. a pretrained cross-encoder.
* ``"segment_cosine"`` (`SegmentCosineScorer`, what ``scripts/train_reranker.py`` trains): the
  encoder reads the pair jointly and the logit is ``scale * cos(mean of the question's tokens, mean
  of the passage's tokens) + bias``. Over a sentence encoder trained with mean pooling (MiniLM) this
  ranks sensibly before any training (a fresh ``[CLS]`` head starts at chance), so the little
  training a CPU affords refines a ranker instead of building one.

A saved reranker is a folder with ``reranker_config.json`` and the tokenizer, plus either

* a peft adapter (``adapter_config.json``, ``adapter_model.safetensors``: LoRA weights, and the new
  classification head or ``head.safetensors`` with the cosine head's scale and bias) over a base
  model named in ``reranker_config.json`` (``"all-MiniLM-L6-v2"`` is the copy installed with the
  package, see `modeling_rag.assets`), never a copy of the base; or
* a whole model (``config.json``, ``model.safetensors``, and ``head.safetensors`` for the cosine head).
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
from .utils.atomic import atomic_write_bytes, atomic_write_text
from .utils.peft_adapters import ADAPTER_FILES, adapter_files

HEAD_FILE = "head.safetensors"  # the segment-cosine head's scale and bias

# question-encoder name (modeling_rag.assets) -> the reranker shipped for its first stage, a folder in this package
SHIPPED_RERANKERS = {"all-MiniLM-L6-v2": "rerankers_data/minilm-l6-squad27"}
# RagConfig fields a reranker folder may recommend (`settings` in reranker_config.json: what it was tuned with)
RERANKER_SETTINGS = ("n_candidates", "rerank_first_stage_weight")

# head name -> what scores a pair (the model class the folder is loaded with follows from it)
RERANKER_HEADS = {
    "sequence_classification": "the one-logit head of an AutoModelForSequenceClassification, over [CLS]",
    "segment_cosine": "scale * cos(mean question tokens, mean passage tokens) + bias, over an AutoModel's joint states",
}
# Tokenizers the reranker can build pairs for from cached ids: those with BERT-style [CLS] / [SEP] tokens.
PAIR_TOKENS = ("cls_token_id", "sep_token_id")


@dataclass
class RerankerSpeedOptions:
    """How the reranker trades memory for speed.

    Attributes:
        batch_size: (question, passage) pairs per forward pass.
        cache_size: Passages whose token ids are kept (least recently used ones are dropped).
        question_max_length: Question tokens read (the rest of `max_length` is the passage's).
        int8: Score on the CPU with the linear layers quantised to int8 (dynamic quantisation): about 2x
            faster on a small CPU (what keeps the default retrieval inside ~150 ms per question, see
            docs/benchmarks.md), logits move by ~1e-2 of their spread. The int8 copy is made from the float
            model at the first scoring and kept (a new `model` gets a new copy; weights changed in place
            do not: pass ``int8=False`` while training); never used while the model is in training mode
            or on an accelerator. ``False`` scores with the float weights.
    """

    batch_size: int = 64
    cache_size: int = 100_000
    question_max_length: int = 64
    int8: bool = True

    def __post_init__(self) -> None:
        for field in ("batch_size", "cache_size", "question_max_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RagConfigError(f"RerankerSpeedOptions.{field} must be a positive integer, got {value!r}.")
        if not isinstance(self.int8, bool):
            raise RagConfigError(f"RerankerSpeedOptions.int8 must be True or False, got {self.int8!r}.")


class SegmentCosineScorer(torch.nn.Module):
    """A cross-encoder logit from the encoder's joint states of ``[CLS] question [SEP] passage [SEP]``.

    ``logit = scale * cos(q, p) + bias``, where ``q`` / ``p`` are the means of the final hidden states
    over the question segment (token type 0, with ``[CLS]`` and its ``[SEP]``) and the passage
    segment (token type 1). Every token attends to both segments, so training (LoRA on the encoder,
    plus `scale` and `bias`) learns question-passage interactions a bi-encoder cannot see.

    Args:
        encoder: A BERT-style `AutoModel` (token type ids, `last_hidden_state`); LoRA-wrapped while training.
        scale: Initial logit scale (cosines are in [-1, 1]; 20 spreads them over a useful logit range).
        bias: Initial logit offset (centres the sigmoid near the cosine of a typical relevant passage).
    """

    head = "segment_cosine"

    def __init__(self, encoder: torch.nn.Module, scale: float = 20.0, bias: float = -12.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)))

    @property
    def config(self):
        return self.encoder.config

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach().cpu().reshape(1), "bias": self.bias.detach().cpu().reshape(1)}

    def load_head_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        if set(state) != {"scale", "bias"} or any(v.numel() != 1 for v in state.values()):
            raise RagConfigError(f"{where} must hold one-element 'scale' and 'bias' tensors, got {sorted(state)}.")
        with torch.no_grad():
            self.scale.copy_(state["scale"].reshape(()))
            self.bias.copy_(state["bias"].reshape(()))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            raise RagInputError("SegmentCosineScorer needs token_type_ids (0 for the question, 1 for the passage).")
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        question = (token_type_ids == 0).to(hidden.dtype) * mask
        passage = (token_type_ids == 1).to(hidden.dtype) * mask
        q = (hidden * question.unsqueeze(-1)).sum(1) / question.sum(1, keepdim=True).clamp(min=1)
        p = (hidden * passage.unsqueeze(-1)).sum(1) / passage.sum(1, keepdim=True).clamp(min=1)
        logits = self.scale * torch.nn.functional.cosine_similarity(q, p, dim=-1) + self.bias
        return SequenceClassifierOutput(logits=logits.unsqueeze(-1))


def shipped_reranker_path(question_encoder: str) -> str | None:
    """The folder of the reranker the package ships for `question_encoder`'s first stage, or ``None``."""
    relative = SHIPPED_RERANKERS.get(question_encoder)
    if relative is None:
        return None
    folder = Path(__file__).parent / relative
    return str(folder) if (folder / RERANKER_CONFIG_NAME).is_file() else None


def encoder_without_pooler(path: str) -> torch.nn.Module:
    """`AutoModel` of `path` for the segment-cosine head, its pooler dropped (the head reads token states).

    Loaded whole and then dropped, rather than built without a pooler, so that a checkpoint holding pooler
    weights (all-MiniLM-L6-v2 does) loads without a report of unexpected weights.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path)
    if hasattr(model, "pooler"):
        model.pooler = None
    return model


def head_of(model: torch.nn.Module) -> str:
    """The `RERANKER_HEADS` name of a scoring model."""
    return getattr(model, "head", "sequence_classification")


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class CrossEncoderReranker:
    """Scores (question, passage) pairs with a sequence-classification model and reorders candidates.

    Args:
        model: A transformers sequence-classification model with one label (its logit is the relevance), or a
            `SegmentCosineScorer`.
        tokenizer: Its tokenizer; it must have ``[CLS]`` / ``[SEP]``-style tokens (BERT, MiniLM, ...).
        max_length: Tokens of one pair (question, passage and 3 special tokens).
        base_model: With `adapter_files`, the base model the adapter applies to (a name for
            `modeling_rag.assets.resolve_model`, or a Hub id); recorded when saving.
        adapter_files: The peft adapter's files (name -> bytes), written back by `save`; None for a whole model.
        speed: `RerankerSpeedOptions`.
        settings: `RagConfig` values the reranker was tuned with (keys from `RERANKER_SETTINGS`), saved with
            it; a model that takes the reranker by default (``reranker="auto"``) applies them.
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
        settings: dict[str, Any] | None = None,
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
        if (
            head_of(model) == "sequence_classification"
            and getattr(getattr(model, "config", None), "num_labels", None) != 1
        ):
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
        self.settings = _check_settings(settings or {}, "settings")
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._int8: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (the float model, its int8 copy)

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

    def _scoring_model(self) -> torch.nn.Module:
        """The model that scores: the float one, or with `speed.int8` its int8 copy (for inference on the CPU)."""
        if not self.speed.int8 or self.model.training or self._device().type != "cpu":
            return self.model
        if self._int8 is None or self._int8[0] is not self.model:
            import copy
            import warnings

            quantize = getattr(getattr(torch, "ao", None), "quantization", None)
            quantize = getattr(quantize, "quantize_dynamic", None)
            if quantize is None:
                raise RagConfigError(
                    "RerankerSpeedOptions.int8 needs torch.ao.quantization.quantize_dynamic, which this torch "
                    f"({torch.__version__}) lacks; set int8=False."
                )
            with warnings.catch_warnings():  # torch marks eager quantisation deprecated; it still works
                warnings.simplefilter("ignore")
                quantized = quantize(copy.deepcopy(self.model), {torch.nn.Linear}, dtype=torch.qint8)
            self._int8 = (self.model, quantized.eval())
        return self._int8[1]

    def logits(self, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Relevance logits `[len(pairs)]` (with gradients when the model trains), in the order of `pairs`."""
        device = self._device()
        model = self._scoring_model()
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
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device)
            ).logits
            parts.append(logits[:, 0])
        if not parts:
            return out
        return torch.cat(parts).float()[torch.argsort(torch.tensor(order, device=device))]

    @torch.no_grad()
    def score_logits(self, questions: Sequence[str], passages: Sequence[Sequence[dict | str]]) -> list[np.ndarray]:
        """The relevance logit of each passage for its question, one float32 array per question."""
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
            logits = self.logits(pairs).cpu().numpy().astype(np.float32)
        finally:
            self.model.train(was_training)
        return np.split(logits, np.cumsum(sizes)[:-1]) if sizes else []

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[dict | str]]) -> list[np.ndarray]:
        """The relevance (sigmoid of the logit, in (0, 1)) of each passage for its question, one array per question."""
        return [_sigmoid(x) for x in self.score_logits(questions, passages)]

    def rerank(self, questions: Sequence[str], retrieved: Any, n_docs: int, first_stage_weight: float = 0.0) -> Any:
        """Reorders a `RetrievalOutput` of candidates by relevance and keeps the best `n_docs` of each question.

        With `first_stage_weight` > 0 the order is by ``z(logit) + first_stage_weight * z(first-stage
        score)`` (z-scored over each question's candidates, `RagConfig.rerank_first_stage_weight`).
        The returned `RetrievalOutput` has the relevance as `doc_scores`; its `row_ids`, `passages` and
        `doc_embeddings` follow the new order. Ties keep the first stage's order.
        """
        from .retrieval_rag import RetrievalOutput, normalize_scores

        if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
            raise RagInputError(f"n_docs must be a positive integer, got {n_docs!r}.")
        all_logits = self.score_logits(list(questions), retrieved.passages)
        k = min(int(n_docs), retrieved.row_ids.shape[1])
        rows, out_scores, out_passages, embeddings = [], [], [], []
        for b, logits in enumerate(all_logits):
            s = _sigmoid(logits)
            key = logits
            if first_stage_weight:
                first = np.asarray(retrieved.doc_scores[b], dtype=np.float64)
                key = normalize_scores(logits) + float(first_stage_weight) * normalize_scores(first)
            order = np.argsort(-key, kind="stable")[:k]
            rows.append(retrieved.row_ids[b][order])
            out_scores.append(s[order])
            out_passages.append([retrieved.passages[b][i] for i in order])
            if retrieved.doc_embeddings is not None:
                embeddings.append(retrieved.doc_embeddings[b][order])
        return RetrievalOutput(
            row_ids=np.asarray(rows, dtype=np.int64).reshape(len(all_logits), k),
            doc_scores=np.asarray(out_scores, dtype=np.float32).reshape(len(all_logits), k),
            doc_embeddings=np.asarray(embeddings, dtype=np.float32) if embeddings else None,
            passages=out_passages,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> None:
        """Writes the reranker into `folder`: its config, tokenizer and adapter (or whole model)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        head = head_of(self.model)
        if self.adapter_files is not None:
            for name, data in self.adapter_files.items():
                atomic_write_bytes(folder / name, data)
        else:
            (self.model.encoder if head == "segment_cosine" else self.model).save_pretrained(folder)
            if head == "segment_cosine":
                atomic_write_bytes(folder / HEAD_FILE, save(self.model.head_state()))
        config = {
            "format_version": RERANKER_FORMAT_VERSION,
            "kind": "adapter" if self.adapter_files is not None else "model",
            "head": head,
            "base_model": self.base_model,
            "max_length": self.max_length,
            "settings": self.settings,
            "score": "sigmoid(logit): probability that the passage answers the question",
        }
        atomic_write_text(folder / RERANKER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_peft_model(
        cls, peft_model: Any, tokenizer: Any, *, base_model: str, **kwargs: Any
    ) -> CrossEncoderReranker:
        """A reranker from a trained model: its adapter files are kept for `save`, its weights merged.

        `peft_model` is a peft-wrapped sequence-classification model, or a `SegmentCosineScorer` whose
        encoder is peft-wrapped (its scale and bias travel in ``head.safetensors``).
        """
        import copy

        from safetensors.torch import save

        cosine = head_of(peft_model) == "segment_cosine"
        adapted = peft_model.encoder if cosine else peft_model
        files = adapter_files(adapted, base_model)
        if cosine:
            files[HEAD_FILE] = save(peft_model.head_state())
            merged = SegmentCosineScorer(copy.deepcopy(adapted).merge_and_unload())
            merged.load_head_state(peft_model.head_state(), "the trained head")
        else:
            merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.eval()
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
        head = config.get("head", "sequence_classification")
        if head not in RERANKER_HEADS:
            raise RagConfigError(f"{config_path}: head must be one of {sorted(RERANKER_HEADS)}, got {head!r}.")
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            raise RagConfigError(
                f"The reranker in {folder} has no tokenizer files (tokenizer.json / vocab.txt); save it again with "
                "its tokenizer (reranker.save(folder))."
            )
        cosine = head == "segment_cosine"
        if cosine and not (folder / HEAD_FILE).is_file():
            raise RagConfigError(f"The reranker in {folder} has a segment_cosine head but no {HEAD_FILE}.")

        def build(path):
            if cosine:
                return encoder_without_pooler(path)
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)

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
            import warnings

            from .library_output import LIBRARY_DEPRECATIONS

            with warnings.catch_warnings():  # peft's own deprecated call, not the user's to act on
                for category, message in LIBRARY_DEPRECATIONS:
                    warnings.filterwarnings("ignore", message=message, category=category)
                model = PeftModel.from_pretrained(build(resolve_model(base_name, "question_encoder")), folder)
            model = model.merge_and_unload()
            files = {name: (folder / name).read_bytes() for name in (*ADAPTER_FILES, *([HEAD_FILE] if cosine else []))}
        elif kind == "model":
            if not (folder / "model.safetensors").is_file():
                raise RagConfigError(f"The reranker in {folder} has no model.safetensors.")
            model = build(folder)
            files = None
        else:
            raise RagConfigError(f"{config_path}: kind must be 'adapter' or 'model', got {kind!r}.")
        if cosine:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(folder / HEAD_FILE))
            except (SafetensorError, OSError) as err:
                raise RagConfigError(f"{folder / HEAD_FILE} is not a readable safetensors file ({err}).") from None
            model = SegmentCosineScorer(model)
            model.load_head_state(state, str(folder / HEAD_FILE))
        model.eval()
        return cls(
            model,
            tokenizer,
            max_length=int(config.get("max_length", 256)),
            base_model=config.get("base_model"),
            adapter_files=files,
            speed=speed,
            settings=_check_settings(config.get("settings") or {}, f"{config_path}: settings"),
        )


def _check_settings(settings: Any, where: str) -> dict[str, Any]:
    if not isinstance(settings, dict) or not set(settings) <= set(RERANKER_SETTINGS):
        raise RagConfigError(f"{where} must be a mapping with keys among {list(RERANKER_SETTINGS)}, got {settings!r}.")
    return dict(settings)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


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
    return model.reranker.rerank(questions, candidates, n_docs, model.config.rerank_first_stage_weight)


def load_model_reranker(model: Any, folder: str | os.PathLike) -> None:
    """Loads the reranker a saved model's config names; a missing or broken one is refused here, at load time."""
    sub = Path(folder) / model.config.reranker
    if not sub.is_dir():
        raise RagConfigError(
            f"config.reranker is {model.config.reranker!r} but {folder} has no such folder; the saved model is "
            "incomplete (save it again, or set config.reranker to None to drop reranking)."
        )
    attach_reranker(model, CrossEncoderReranker.load(sub))

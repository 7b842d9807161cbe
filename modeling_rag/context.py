"""Context packing: question and passages into generator token ids, within the generator's window.

The question's tokens are reserved first and are never cut. Passages then fill what is left of
the budget in rank order; the passage that no longer fits whole is truncated (or dropped when
fewer than `min_passage_tokens` would remain), and the ones after it are dropped. Passages are
tokenised once and cached, and nothing is padded to a fixed length: `pad_batch` pads each batch
to its own longest row.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ContextOverflowError, RagInputError

_CTX = "\ue000CONTEXT\ue000"
_QUESTION = "\ue000QUESTION\ue000"
_TEXT = "\ue000TEXT\ue000"

# Model windows we cannot read from a config (relative position models such as T5)
FALLBACK_WINDOW = 512


def generator_window(config, tokenizer=None) -> int:
    """The number of positions a generator accepts in one input."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return FALLBACK_WINDOW


@dataclass
class PackedInput:
    """One generator input: token ids plus which passages made it in."""

    input_ids: list[int]
    passage_indices: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)


class ContextPacker:
    """Builds generator inputs from a question and ranked passages.

    Args:
        tokenizer: the generator's tokenizer.
        budget: the most tokens one input may hold (question, passages and template together).
        prompt_template: text with `{context}` and `{question}` (and optional `{instruction}`).
        passage_template: text with `{text}` and optional `{title}` and `{rank}`.
        passage_separator: placed between passages in one input.
        instruction: put in `{instruction}`, or in the system turn when a chat template is used.
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_passage_tokens: cap on one passage's text tokens (`None`: only the budget limits it).
        min_passage_tokens: a passage cut below this many text tokens is dropped instead.
        cache_size: how many tokenised passages to keep.
    """

    def __init__(
        self,
        tokenizer,
        *,
        budget: int,
        prompt_template: str,
        passage_template: str,
        passage_separator: str = "\n\n",
        instruction: str = "",
        use_chat_template: bool = True,
        max_passage_tokens: int | None = None,
        min_passage_tokens: int = 16,
        cache_size: int = 100_000,
    ):
        if budget <= 0:
            raise ContextOverflowError(
                f"The generator input budget is {budget} tokens: the window is too small for the room kept for "
                "new tokens. Lower max_new_tokens or raise max_input_tokens."
            )
        self.tokenizer = tokenizer
        self.budget = budget
        self.max_passage_tokens = max_passage_tokens
        self.min_passage_tokens = min_passage_tokens
        self.cache_size = cache_size
        self._text_cache: OrderedDict[str, list[int]] = OrderedDict()
        self._short_cache: dict[str, list[int]] = {}
        self.uses_chat_template = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

        # Split the rendered prompt around the two slots, once.
        rendered = self._render_prompt(prompt_template, instruction)
        if rendered.index(_CTX) < rendered.index(_QUESTION):
            self.context_first = True
            head, rest = rendered.split(_CTX, 1)
            middle, tail = rest.split(_QUESTION, 1)
        else:
            self.context_first = False
            head, rest = rendered.split(_QUESTION, 1)
            middle, tail = rest.split(_CTX, 1)
        prefix_special, suffix_special = ([], []) if self.uses_chat_template else self._special_tokens()
        self.head_ids = prefix_special + self._encode(head)
        self.middle_ids = self._encode(middle)
        self.tail_ids = self._encode(tail) + suffix_special
        self.fixed_length = len(self.head_ids) + len(self.middle_ids) + len(self.tail_ids)
        self.separator_ids = self._encode(passage_separator)
        p_head, p_tail = passage_template.replace("{text}", _TEXT).split(_TEXT, 1)
        self._passage_head_template, self._passage_tail_template = p_head, p_tail

    # -- tokenisation helpers -----------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        # verbose=False: the packer cuts texts to its budget itself, so the too-long notice does not apply
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds around a text by default (e.g. BOS for Llama, </s> for T5)."""
        probe = "hello"
        plain = self._encode(probe)
        full = list(self.tokenizer(probe)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def _render_prompt(self, template: str, instruction: str) -> str:
        if not self.uses_chat_template:
            if instruction and "{instruction}" not in template:
                template = "{instruction}\n\n" + template
            return template.format(instruction=instruction, context=_CTX, question=_QUESTION).lstrip("\n")
        user = template.format(instruction="", context=_CTX, question=_QUESTION).strip("\n ")
        messages = [{"role": "user", "content": user}]
        if instruction:
            messages.insert(0, {"role": "system", "content": instruction})
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template without a system role: keep the instruction in the user turn
            user = template.format(instruction=instruction, context=_CTX, question=_QUESTION).strip("\n ")
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
        return rendered

    def _remember(self, cache: OrderedDict, key: str, ids: list[int]) -> None:
        """Adds `ids` under `key`, dropping the least recently used entry beyond `cache_size`."""
        cache[key] = ids
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    @staticmethod
    def _text_key(text: str) -> str:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()

    def _cached(self, cache: OrderedDict, key: str, text: str) -> list[int]:
        ids = cache.get(key)
        if ids is None:
            ids = self._encode(text)
            self._remember(cache, key, ids)
        else:
            cache.move_to_end(key)
        return ids

    def prefetch(self, texts: Sequence[str], known_ids: Sequence[list[int] | None] | None = None) -> None:
        """Tokenises, in one batched tokenizer call, the passage texts that are not cached yet.

        `known_ids` (aligned with `texts`) may give a text's token ids already, as this tokenizer makes
        them (the passage tokens stored with an index): those are cached without a tokenizer call.
        Packing then finds every passage in the cache; the token ids are the same as one call per text.
        """
        missing: dict[str, str] = {}
        for i, text in enumerate(texts):
            if not text:
                continue
            key = self._text_key(text)
            if key in self._text_cache or key in missing:
                continue
            known = None if known_ids is None else known_ids[i]
            if known is not None:
                self._remember(self._text_cache, key, known)
                continue
            missing[key] = text
        if not missing:
            return
        encoded = self.tokenizer(list(missing.values()), add_special_tokens=False, verbose=False)["input_ids"]
        for key, ids in zip(missing, encoded):
            self._remember(self._text_cache, key, list(ids))

    def clear_cache(self, *, templates: bool = True) -> None:
        """Forgets the tokenised passages (and, with `templates`, the tokenised title/template pieces).

        Packing afterwards tokenises (or takes from the index's stored tokens) every passage again, as
        for passages a process meets for the first time; benchmarks time that on purpose.
        """
        self._text_cache.clear()
        if templates:
            self._short_cache.clear()

    def passage_text_ids(self, text: str) -> list[int]:
        """Token ids of a passage's text, tokenised once and cached."""
        ids = self._cached(self._text_cache, self._text_key(text), text)
        if self.max_passage_tokens is not None:
            ids = ids[: self.max_passage_tokens]
        return ids

    def _passage_parts(self, passage: dict, rank: int) -> tuple[list[int], list[int], list[int]]:
        title = passage.get("title") or ""
        head = self._passage_head_template.format(title=title, rank=rank)
        tail = self._passage_tail_template.format(title=title, rank=rank)
        head_ids = self._short_cache.get(head)
        if head_ids is None:
            head_ids = self._short_cache[head] = self._encode(head)
        tail_ids = self._short_cache.get(tail)
        if tail_ids is None:
            tail_ids = self._short_cache[tail] = self._encode(tail)
        if len(self._short_cache) > self.cache_size:
            self._short_cache.clear()
        return head_ids, self.passage_text_ids(passage.get("text") or ""), tail_ids

    # -- packing ------------------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        if not isinstance(question, str):
            raise RagInputError(f"A question must be a string, got {type(question).__name__}.")
        if not question.strip():
            raise RagInputError("A question is empty or only whitespace; give the text of the question.")
        ids = self._encode(question.strip())
        if self.fixed_length + len(ids) > self.budget:
            raise ContextOverflowError(
                f"The question alone takes {len(ids)} tokens, and with the prompt template "
                f"({self.fixed_length} tokens) it exceeds the generator input budget of {self.budget} tokens. "
                "Shorten the question, or raise max_input_tokens / lower max_new_tokens."
            )
        return ids

    def _assemble(self, question_ids: list[int], context_ids: list[int]) -> list[int]:
        if self.context_first:
            return self.head_ids + context_ids + self.middle_ids + question_ids + self.tail_ids
        return self.head_ids + question_ids + self.middle_ids + context_ids + self.tail_ids

    def pack(self, question: str, passages: Sequence[dict], question_ids: list[int] | None = None) -> PackedInput:
        """All `passages` (ranked) and the question in one input that fits the budget."""
        q_ids = self.question_ids(question) if question_ids is None else question_ids
        remaining = self.budget - self.fixed_length - len(q_ids)
        context: list[int] = []
        used, truncated = [], []
        for i, passage in enumerate(passages):
            head, text, tail = self._passage_parts(passage, rank=len(used) + 1)
            sep = self.separator_ids if used else []
            overhead = len(sep) + len(head) + len(tail)
            room = remaining - overhead
            if room >= len(text):
                context += sep + head + text + tail
                remaining -= overhead + len(text)
                used.append(i)
                truncated.append(False)
                continue
            if room >= max(self.min_passage_tokens, 1):
                context += sep + head + text[:room] + tail
                used.append(i)
                truncated.append(True)
            break
        return PackedInput(self._assemble(q_ids, context), used, truncated)

    def pack_each(self, question: str, passages: Sequence[dict]) -> list[PackedInput]:
        """One input per passage (RAG-Sequence / RAG-Token), each holding the question and that passage."""
        q_ids = self.question_ids(question)
        out = []
        for i, passage in enumerate(passages):
            packed = self.pack(question, [passage], question_ids=q_ids)
            packed.passage_indices = [i] if packed.passage_indices else []
            out.append(packed)
        return out


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", value_dtype=torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to the longest row of this batch only. Returns `(ids [B, L], attention_mask [B, L])`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
    length = max((len(s) for s in sequences), default=0)
    try:
        np_dtype = torch.empty(0, dtype=value_dtype).numpy().dtype
    except TypeError:  # a dtype numpy lacks (bfloat16): fill with torch
        np_dtype = None
    if np_dtype is None:
        ids = torch.full((len(sequences), length), pad_id, dtype=value_dtype)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if not seq:
                continue
            values = torch.as_tensor(list(seq), dtype=value_dtype)
            if side == "right":
                ids[row, : len(seq)] = values
                mask[row, : len(seq)] = 1
            else:
                ids[row, length - len(seq) :] = values
                mask[row, length - len(seq) :] = 1
        return ids, mask
    # numpy takes a Python list into a row ~20x faster than one torch.as_tensor per row
    ids_np = np.full((len(sequences), length), pad_id, dtype=np_dtype)
    mask_np = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if not n:
            continue
        if side == "right":
            ids_np[row, :n] = seq
            mask_np[row, :n] = 1
        else:
            ids_np[row, length - n :] = seq
            mask_np[row, length - n :] = 1
    return torch.from_numpy(ids_np), torch.from_numpy(mask_np)

"""RagSpeedOptions: every switch and size of the speed-ups, in one documented dataclass.

The options change how much work a forward or a generation does and how much memory it holds,
never its result (outputs agree to float rounding). They are saved with the model as
`RagConfig.speed_options` and can be replaced for one call:

```python
from modeling_rag import RagSpeedOptions
model.config.speed_options = RagSpeedOptions(decode_groups=8)  # saved with the model
model.generate(questions, speed_options=RagSpeedOptions.plain())  # the reference path, this call only
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import RagConfigError

__all__ = ["RagSpeedOptions"]


@dataclass(frozen=True)
class RagSpeedOptions:
    r"""How the generator is driven fast (see `modeling_rag.speedups` and `docs/benchmarks.md`).

    Args:
        encoder_chunk_tokens (`int`, defaults to 2048):
            An encoder-decoder generator's encoder runs on length-sorted chunks of about this many padded
            tokens, each padded only to its own longest row. 0 encodes all rows in one batch. (RAG-Token
            benchmark, BART-base encoder: 2048 was 5-10% faster than 4096.)
        train_chunk_tokens (`int`, defaults to 1024):
            The same with gradients, where padding costs saved activations too (RAG-Token training step,
            BART-base, 40 contexts of 57-300 tokens: 4.1 GB at 4096, 3.5 GB at 1024). 0: one batch.
        rescore_chunk_logits (`int`, defaults to 2**25):
            Teacher-forced rescoring (RAG-Sequence, answer posteriors) runs in chunks of at most this many logits.
        decode_groups (`int`, defaults to 4):
            RAG-Token and RAG-Sequence decoding with an encoder-decoder generator split the rows into up to this
            many groups of similar context length, so each group's cross-attention covers only its own longest
            context. 1: no groups.
        decode_group_min_rows (`int`, defaults to 32):
            Each such group holds at least this many rows.
        merge_decode_groups (`bool`, defaults to `True`):
            After the first step, decode the groups as one batch, each still attending only to its own context
            (`grouped_decoding`): the decoder's weights are then read once per step, not once per group. The same
            switch runs a teacher-forced decoder once over all length chunks.
        own_scores_max_logits (`int`, defaults to 2**27):
            Greedy RAG-Sequence decoding keeps each step's logits to score the hypotheses under their own
            documents; above this many logits per generate call it rescores instead. 0: always rescore.
        recompute_activations (`bool`, defaults to `True`):
            In training, BART-family feed-forward layers recompute their activation in the backward pass instead
            of keeping it (`activation_recompute`).
        answer_logits_only (`bool`, defaults to `True`):
            In training, a decoder-only generator computes logits only at the positions that predict an answer
            token (`logits_to_keep`), not over the whole context.
        shared_embedding_lookup (`bool`, defaults to `True`):
            In training over several length chunks, look the token embeddings up once for all chunks, so the
            backward pass writes one dense embedding gradient, not one per chunk.
    """

    encoder_chunk_tokens: int = 2048
    train_chunk_tokens: int = 1024
    rescore_chunk_logits: int = 1 << 25
    decode_groups: int = 4
    decode_group_min_rows: int = 32
    merge_decode_groups: bool = True
    own_scores_max_logits: int = 1 << 27
    recompute_activations: bool = True
    answer_logits_only: bool = True
    shared_embedding_lookup: bool = True

    def __post_init__(self):
        minimum = {"rescore_chunk_logits": 1, "decode_groups": 1, "decode_group_min_rows": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise RagConfigError(f"speed_options.{f.name} must be True or False, got {value!r}.")
                continue
            low = minimum.get(f.name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RagConfigError(f"speed_options.{f.name} must be an integer >= {low}, got {value!r}.")

    @classmethod
    def plain(cls) -> RagSpeedOptions:
        """Every speed-up off: the reference computation the fast paths are compared with."""
        return cls(
            encoder_chunk_tokens=0,
            train_chunk_tokens=0,
            decode_groups=1,
            merge_decode_groups=False,
            own_scores_max_logits=0,
            recompute_activations=False,
            answer_logits_only=False,
            shared_embedding_lookup=False,
        )

    @classmethod
    def from_dict(cls, values: dict) -> RagSpeedOptions:
        """From the dict saved in config.json; an unknown key is a `RagConfigError` naming it."""
        if not isinstance(values, dict):
            raise RagConfigError(f"speed_options must be a RagSpeedOptions or a dict, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RagConfigError(f"speed_options has unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RagSpeedOptions:
        """A copy with `changes` applied (the options are frozen, so a model's defaults cannot drift)."""
        return dataclasses.replace(self, **changes)

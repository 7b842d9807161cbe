"""Which transformers classes each speed-up supports: explicit tables, checked by class.

Each speed-up rewrites how some layers of a generator are driven, so it must know exactly what
their `forward` does. Rather than guessing from the code, each one names the classes it was written
for (the BART family of transformers 5: BART, mBART, Marian, Pegasus, Pegasus-X, Blenderbot,
PLBart, M2M-100, LED, MVP, Whisper; T5's stacks for the embedding lookup). Any other class keeps
the plain path. A class is matched by its name *and* its home in `transformers.models`, so a
user's subclass (which may override `forward`) is not taken for its parent.

Two guards stay at run time: grouped decoding counts the cross-attention calls it served and
refuses a step where one layer was missed ([`check_served`]), and every speed-up steps aside
for a model with activation checkpointing on ([`uses_activation_checkpointing`]), whose
recomputation in the backward pass would run outside what the speed-up set up.
"""

from __future__ import annotations

__all__ = [
    "EXACT_EMBEDDING_LOOKUP",
    "GROUPED_CROSS_ATTENTION",
    "RECOMPUTE_FEED_FORWARD",
    "exact_embedding_lookup",
    "is_supported",
    "uses_activation_checkpointing",
]

_BART_FAMILY = ("Bart", "MBart", "Marian", "Pegasus", "PegasusX", "Blenderbot", "BlenderbotSmall", "PLBart", "M2M100")

# Layers whose forward reads `self.fc2(dropout(self.activation_fn(self.fc1(hidden_states))))` once
# (`activation_recompute`): the encoder and decoder layers of the BART family, LED, MVP and Whisper.
RECOMPUTE_FEED_FORWARD: frozenset[str] = frozenset(
    f"{family}{part}Layer" for family in (*_BART_FAMILY, "LED", "Mvp", "Whisper") for part in ("Encoder", "Decoder")
)

# Stacks whose forward turns ids into embeddings with exactly `inputs_embeds = self.embed_tokens(input_ids)`,
# so `stack(inputs_embeds=stack.embed_tokens(ids))` equals `stack(input_ids=ids)` (not Marian's and
# Pegasus' encoders, which scale looked-up ids only).
EXACT_EMBEDDING_LOOKUP: frozenset[str] = frozenset(
    {
        "BartEncoder",
        "BartDecoder",
        "MBartEncoder",
        "MBartDecoder",
        "MarianDecoder",
        "PegasusDecoder",
        "PegasusXEncoder",
        "PegasusXDecoder",
        "BlenderbotEncoder",
        "BlenderbotDecoder",
        "BlenderbotSmallDecoder",
        "PLBartEncoder",
        "PLBartDecoder",
        "M2M100Encoder",
        "M2M100Decoder",
        "LEDEncoder",
        "LEDDecoder",
        "T5Stack",
        "MT5Stack",
        "UMT5Stack",
        "LongT5Stack",
    }
)

# Cross-attention modules (`encoder_attn`) that read the cached keys/values of an `EncoderDecoderCache`
# once `is_updated` is set and call transformers' attention interface (`grouped_decoding`).
GROUPED_CROSS_ATTENTION: frozenset[str] = frozenset(f"{family}Attention" for family in _BART_FAMILY)


def is_supported(cls: type, table: frozenset[str]) -> bool:
    """Whether `cls` is one of transformers' own classes named in `table`."""
    return cls.__name__ in table and cls.__module__.startswith("transformers.models.")


def exact_embedding_lookup(stack):
    """`stack.embed_tokens` when `stack(inputs_embeds=stack.embed_tokens(ids))` equals `stack(input_ids=ids)`, else None."""
    embed = getattr(stack, "embed_tokens", None)
    if not is_supported(type(stack), EXACT_EMBEDDING_LOOKUP) or not callable(embed):
        return None
    return embed


def uses_activation_checkpointing(model) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on for `model` (or a peft model's base)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False

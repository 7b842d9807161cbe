"""What a transformers class's `forward` does, read from its source (cached per class).

Speed-ups that rewrite how a generator's layers are driven (`activation_recompute`,
`grouped_decoding`, the embedding lookup in training) apply only to classes whose forward reads
exactly as they expect; anything else keeps the plain path. They also step aside for a model
that recomputes its layers in the backward pass ([`uses_activation_checkpointing`]): the
recomputation runs outside whatever the speed-up set up around the forward.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["forward_source", "uses_activation_checkpointing"]


@functools.cache
def forward_source(cls: type) -> str:
    """The source of `cls.forward`, or "" when it cannot be read (built-ins, compiled or generated code)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return ""


def uses_activation_checkpointing(model) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on for `model` (or a peft model's base)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False

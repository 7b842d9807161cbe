"""What a transformers class's `forward` does, read from its source (cached per class).

Speed-ups that rewrite how a generator's layers are driven (`activation_recompute`,
`grouped_decoding`, the embedding lookup in training) apply only to classes whose forward reads
exactly as they expect; anything else keeps the plain path.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["forward_source"]


@functools.cache
def forward_source(cls: type) -> str:
    """The source of `cls.forward`, or "" when it cannot be read (built-ins, compiled or generated code)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return ""

"""Speed-ups of the generator runners, switched by one options dataclass ([`RagSpeedOptions`]).

- `options`: [`RagSpeedOptions`], every switch and size, saved as `RagConfig.speed_options` or given per call;
- `support`: which transformers classes each speed-up was written for (explicit tables);
- `length_groups`: rows cut into chunks / groups of similar context length;
- `grouped_decoding`: the mechanism of one batch whose groups each attend to their own context;
- `merged_decoding`: merged RAG-Token decoding steps and packed teacher forcing built on it;
- `activation_recompute`: feed-forward activations recomputed in the backward pass.

Nothing here knows about retrieval or the RAG modes: these are ways of running a transformers
generator, whose results equal the plain computation's to float rounding.
"""

from .options import RagSpeedOptions

__all__ = ["RagSpeedOptions"]

"""The ways passages reach the generator, one file each, selected by `RagConfig.generation_mode`.

| name | class | what the generator sees |
|---|---|---|
| `concat` | [`ConcatMode`] | all passages and the question in one input |
| `rag_sequence` | [`RagSequenceMode`] | one input per passage; answers marginalised over passages |
| `rag_token` | [`RagTokenMode`] | one input per passage; each token marginalised over passages |

The marginal likelihoods themselves are in `marginals.py`.
"""

from .base import MarginalMode, RagMode
from .concat import ConcatMode
from .rag_sequence import RagSequenceMode
from .rag_token import RagTokenMode, RagTokenState

MODES: dict[str, type[RagMode]] = {mode.name: mode for mode in (ConcatMode, RagSequenceMode, RagTokenMode)}

__all__ = ["MODES", "ConcatMode", "MarginalMode", "RagMode", "RagSequenceMode", "RagTokenMode", "RagTokenState"]

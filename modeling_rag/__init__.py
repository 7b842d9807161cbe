"""modeling_rag: retrieval-augmented generation as a transformers model.

```python
from modeling_rag import RagForGeneration
model = RagForGeneration.from_pretrained("path/or/repo-id")
print(model.answer("What is our mobile phone policy?")[0].answer)
```
"""

from importlib import import_module

__version__ = "0.1.0"

# Registering the config and model with transformers' Auto classes happens on import of these two.
from .configuration_rag import RagConfig  # noqa: E402
from .errors import (  # noqa: E402
    ContextOverflowError,
    CorpusError,
    DataFormatError,
    HubError,
    IndexIntegrityError,
    IndexMismatchError,
    RagConfigError,
    RagError,
    RagInputError,
    SavedModelError,
)
from .inputs import RagBatch  # noqa: E402
from .modeling_outputs import RagAnswer, RagGenerateOutput, RagOutput, RagSource  # noqa: E402
from .modeling_rag import RagForGeneration, RagPreTrainedModel  # noqa: E402
from .pipelines import RagQuestionAnsweringPipeline  # noqa: E402  (registers pipeline("rag-question-answering"))
from .speedups import RagSpeedOptions  # noqa: E402
from .tokenization_rag import RagTokenizer  # noqa: E402

_LAZY = {
    "RagRetriever": "retrieval_rag",
    "RetrievalOutput": "retrieval_rag",
    "PassageIndex": "index.passage_index",
    "BM25Index": "index.bm25",
    "ContextPacker": "context",
    "read_corpus": "corpus",
    "chunk_documents": "corpus",
    "load_qa_examples": "qa_data",
    "load_metric": "metrics",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'modeling_rag' has no attribute {name!r}")


__all__ = [
    "RagConfig",
    "RagForGeneration",
    "RagPreTrainedModel",
    "RagTokenizer",
    "RagSpeedOptions",
    "RagBatch",
    "RagQuestionAnsweringPipeline",
    "RagOutput",
    "RagGenerateOutput",
    "RagAnswer",
    "RagSource",
    "RagError",
    "RagConfigError",
    "RagInputError",
    "ContextOverflowError",
    "IndexMismatchError",
    "IndexIntegrityError",
    "SavedModelError",
    "CorpusError",
    "DataFormatError",
    "HubError",
    *_LAZY,
]

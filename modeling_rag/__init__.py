"""modeling_rag: retrieval-augmented generation as a transformers model."""

__version__ = "0.1.0"

"""Benchmarks modeling_rag's RagForGeneration against transformers' own RAG, on identical weights.

A thin command line over `modeling_rag.benchmarking` (method and results: docs/benchmarks.md).
Every phase checks that both sides did the same work (same documents and scores, identical
generator inputs and generated tokens, equal training loss and gradient norms) and stops, naming
the phase, when they did not.

Examples::

    python scripts/benchmark.py --threads 1 --output benchmark.json   # the full comparison (~40 min on 2 cores)
    python scripts/benchmark.py --quick                               # a small version, a few minutes
    python scripts/benchmark.py --phases rag_sequence --generator random   # the degenerate RAG-Sequence case
    python scripts/benchmark.py --device cuda --output gpu.json       # fp32 and bf16 rows on a GPU
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from modeling_rag.benchmarking import main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "data", "squad_v1_dev_22articles")

if __name__ == "__main__":
    main(default_data=DEFAULT_DATA)

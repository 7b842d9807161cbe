"""``python -m modeling_rag.benchmarking``: the benchmark's command line (and its memory workers)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from .runner import main  # noqa: E402

main()

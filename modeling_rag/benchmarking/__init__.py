"""Benchmark of `RagForGeneration` against transformers' RAG on identical weights, inputs and index.

One module per concern: `workload` (sizes, passages, questions, tokenizers, configs), `sides` (the
two models and one callable per phase and side, through public APIs only), `measure` (alternating
timed repeats, memory, the GEMM peak), `flops` (model FLOPs at real lengths), `checks` (equality
of the two sides' work; a mismatch stops the run), `report` (the table) and `runner` (the run and
its command line, used by ``scripts/benchmark.py``).
"""

from .checks import BenchmarkMismatch
from .runner import main, parse_args, run
from .workload import PHASES, PRESETS, Settings

__all__ = ["PHASES", "PRESETS", "BenchmarkMismatch", "Settings", "main", "parse_args", "run"]

"""How a generator is driven: [`CausalRunner`] (decoder-only) and [`Seq2SeqRunner`] (encoder-decoder)."""

from .base import GeneratorRunner, StepState
from .causal import CausalRunner
from .seq2seq import Seq2SeqRunner

__all__ = ["CausalRunner", "GeneratorRunner", "Seq2SeqRunner", "StepState", "runner_for"]


def runner_for(model, speed) -> GeneratorRunner:
    """The runner of `model`'s generator with the speed options `speed`."""
    return (Seq2SeqRunner if model.is_generator_encoder_decoder else CausalRunner)(model, speed)

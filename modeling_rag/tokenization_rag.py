"""RagTokenizer: the question encoder's tokenizer and the generator's, saved side by side."""

from __future__ import annotations

import os

from transformers import AutoTokenizer

from .constants import GENERATOR_TOKENIZER_DIR, QUESTION_ENCODER_TOKENIZER_DIR
from .errors import RagInputError


class RagTokenizer:
    """Holds `question_encoder` and `generator` tokenizers.

    Calling it tokenises questions for the question encoder; `generator` is used by context
    packing and for decoding answers. Each tokenizer is saved in its own subfolder.
    """

    def __init__(self, question_encoder, generator):
        self.question_encoder = question_encoder
        self.generator = generator
        if getattr(generator, "pad_token_id", None) is None:
            # decoder-only tokenizers (GPT-2, Llama) often ship without a pad token
            if generator.eos_token is not None:
                generator.pad_token = generator.eos_token
            else:
                raise RagInputError(
                    "The generator tokenizer has neither a pad nor an eos token; add a pad token "
                    "(tokenizer.add_special_tokens({'pad_token': ...})) before building the model."
                )

    def __call__(self, questions, max_length: int | None = None, return_tensors: str = "pt", **kwargs):
        if isinstance(questions, str):
            questions = [questions]
        return self.question_encoder(
            list(questions),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors=return_tensors,
            **kwargs,
        )

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.generator.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.generator.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        if os.path.isfile(save_directory):
            raise RagInputError(f"save_pretrained needs a folder, but {save_directory} is a file.")
        os.makedirs(save_directory, exist_ok=True)
        files = []
        files += self.question_encoder.save_pretrained(os.path.join(save_directory, QUESTION_ENCODER_TOKENIZER_DIR))
        files += self.generator.save_pretrained(os.path.join(save_directory, GENERATOR_TOKENIZER_DIR))
        return list(files)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> RagTokenizer:
        """Loads both tokenizers from a saved model folder (local, or a Hub repo through hub_utils)."""
        from .hub_utils import resolve_model_folder

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        folder = resolve_model_folder(str(pretrained_model_name_or_path), **hub_kwargs)
        q_dir = os.path.join(folder, QUESTION_ENCODER_TOKENIZER_DIR)
        g_dir = os.path.join(folder, GENERATOR_TOKENIZER_DIR)
        for d in (q_dir, g_dir):
            if not os.path.isdir(d):
                raise OSError(
                    f"{pretrained_model_name_or_path} has no {os.path.basename(d)}/ folder; it was not saved "
                    "by RagForGeneration.save_pretrained (or the save did not finish)."
                )
        return cls(AutoTokenizer.from_pretrained(q_dir, **kwargs), AutoTokenizer.from_pretrained(g_dir, **kwargs))

    def __repr__(self) -> str:
        return (
            f"RagTokenizer(question_encoder={type(self.question_encoder).__name__}, "
            f"generator={type(self.generator).__name__})"
        )

"""The ``"rag-question-answering"`` task for transformers' `pipeline()`, registered on ``import modeling_rag``.

```python
import modeling_rag  # registers the task
from transformers import pipeline

rag = pipeline("rag-question-answering", model="my-rag")  # a saved RagForGeneration folder or Hub id
rag("How do I book travel?")
# {'question': 'How do I book travel?', 'answer': '...', 'sources': [{'id': ..., 'title': ..., 'score': ...}, ...]}
rag(["How do I book travel?", "Who approves leave?"], batch_size=2, max_new_tokens=32)
rag("Who led the Normans?", passages=["Rollo was the Norse leader."])  # no index needed
```

transformers never gave RAG a pipeline (its issue #7777 was closed as won't-fix). This one is a thin
layer over [`RagForGeneration.answer`]: retrieval (or the `passages` you give), packing and
generation stay in the model; the pipeline adds transformers' calling conventions (a string, a
list, a dataset or a generator of questions; `batch_size`; `device`; generation arguments at
construction or per call).
"""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline

from .errors import RagInputError
from .modeling_rag import RagForGeneration

TASK = "rag-question-answering"

# Arguments of RagForGeneration.answer / generate that are not GenerationConfig fields
_ANSWER_ARGS = ("n_docs", "generation_mode", "sequence_decoding")
_GENERATE_EXTRAS = ("generation_config", "streamer", "logits_processor", "stopping_criteria")


def _generation_keys() -> set[str]:
    return {k for k in vars(GenerationConfig()) if not k.startswith("_")} | set(_GENERATE_EXTRAS)


class RagQuestionAnsweringPipeline(Pipeline):
    """Answers questions with a [`RagForGeneration`], citing its sources.

    Input: a question (`str`), a dict `{"question": ..., "passages": [...]}`, or a list / dataset /
    generator of either. Keyword arguments (at construction or per call):

    - `passages`: the passages to answer from instead of retrieving (strings or dicts with `text`,
      optionally `id` and `title`): a list for one question, one list per question for a list of
      questions. The model then needs no index.
    - `n_docs`, `generation_mode`, `sequence_decoding`: as in `RagForGeneration.answer`.
    - any generation argument (`max_new_tokens`, `num_beams`, `do_sample`, ...).

    Output per question: a dict with `question`, `answer`, `sources` (a list of `{"id", "title",
    "score"}`, best first) and, when the model's answers carry them, `abstained` and `confidence`.
    """

    # the model carries its own RagTokenizer; nothing else is loaded from the folder
    _load_tokenizer = False
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, **kwargs):
        if not isinstance(model, RagForGeneration):
            raise RagInputError(
                f"The {TASK} pipeline needs a RagForGeneration (a saved folder or Hub id of one), "
                f"got {type(model).__name__}."
            )
        if model.tokenizer is None:
            raise RagInputError(
                f"The {TASK} pipeline needs a model with its tokenizers: call model.set_tokenizer(RagTokenizer(...))."
            )
        # transformers batches (batch_size > 1) only with a tokenizer that has a pad id: the generator's has one
        super().__init__(model, tokenizer=tokenizer or model.tokenizer.generator, **kwargs)

    def _sanitize_parameters(self, passages=None, **kwargs):
        preprocess_params = {}
        if passages is not None:
            preprocess_params["passages"] = passages
        allowed = _generation_keys()
        unknown = sorted(k for k in kwargs if k not in allowed and k not in _ANSWER_ARGS)
        if unknown:
            raise RagInputError(
                f"Unknown argument(s) {', '.join(map(repr, unknown))} for the {TASK} pipeline: it takes passages=, "
                f"{', '.join(a + '=' for a in _ANSWER_ARGS)} and generation arguments (max_new_tokens=, num_beams=, ...)."
            )
        return preprocess_params, dict(kwargs), {}

    def __call__(self, inputs, *args, **kwargs):
        """Answers one question (`str` or dict) or each of a list / dataset / generator of them."""
        passages = kwargs.pop("passages", None)
        if passages is not None and isinstance(inputs, (list, tuple)):
            # one list of passages per question: attach each to its question, so batching keeps them together
            if not isinstance(passages, (list, tuple)) or len(passages) != len(inputs):
                raise RagInputError(
                    f"With {len(inputs)} questions, passages must be a list of {len(inputs)} lists (one per question)."
                )
            inputs = [{**self._as_item(q), "passages": p} for q, p in zip(inputs, passages)]
        elif passages is not None:
            kwargs["passages"] = passages
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        return super().__call__(inputs, *args, **kwargs)

    @staticmethod
    def _as_item(item) -> dict:
        if isinstance(item, dict):
            if "question" not in item:
                raise RagInputError(f"A {TASK} input dict needs a 'question' key, got keys {sorted(item)}.")
            return dict(item)
        return {"question": item}

    def preprocess(self, inputs, passages=None) -> dict[str, Any]:
        item = self._as_item(inputs)
        # questions and passages are checked (type, emptiness, encodability) by RagForGeneration.answer
        given = item.get("passages", passages)
        if isinstance(given, (str, dict)):
            given = [given]
        return {"question": item["question"], "passages": given}

    def _forward(self, model_inputs, **answer_kwargs) -> dict[str, Any]:
        questions, passages = model_inputs["question"], model_inputs["passages"]
        if not isinstance(questions, list):  # batch_size=1: one item, not collated
            questions, passages = [questions], [passages]
        if all(p is None for p in passages):
            passages = None
        elif any(p is None for p in passages):
            raise RagInputError(
                "Some questions of this batch come with passages and some without: give passages for all or none "
                "(or use batch_size=1)."
            )
        return {"answers": self.model.answer(questions, passages=passages, **answer_kwargs)}

    def postprocess(self, model_outputs) -> dict[str, Any]:
        answer = model_outputs["answers"]
        if isinstance(answer, list):  # batch_size=1: the list of one answer
            (answer,) = answer
        out = {
            "question": answer.question,
            "answer": answer.answer,
            "sources": [{"id": s.id, "title": s.title, "score": s.score} for s in answer.sources],
        }
        for name in ("abstained", "confidence"):  # fields of answers that can abstain
            if hasattr(answer, name):
                out[name] = getattr(answer, name)
        return out


if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=RagQuestionAnsweringPipeline, pt_model=RagForGeneration, type="text"
    )

"""inputs.py: text to a RagBatch, with the passages beside the tensors."""

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag

from modeling_rag import RagBatch, RagInputError

QUESTIONS = ["Who was the Norse leader?", "Where is Rome?"]
PASSAGES = [[TINY_PASSAGES[0], TINY_PASSAGES[1]], [TINY_PASSAGES[2], "Rome is the capital of Italy."]]


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("mode", ["concat", "rag_token"])
def test_batch_holds_tensors_and_keeps_the_passages_beside_them(kind, mode):
    model = make_tiny_rag(kind, mode)
    batch = model.prepare_inputs(QUESTIONS, ["Rollo", "Italy"], passages=PASSAGES, doc_scores=[[1.0, 0.0], [0.5, 0.2]])
    assert isinstance(batch, RagBatch) and "passages" not in batch
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert [[p["text"] for p in plist] for plist in batch.passages] == [
        [TINY_PASSAGES[0]["text"], TINY_PASSAGES[1]["text"]],
        [TINY_PASSAGES[2]["text"], "Rome is the capital of Italy."],
    ]
    rows = batch["context_input_ids"].shape[0]
    assert rows == (2 if mode == "concat" else 4)  # one row per question, or per (question, passage)
    assert model(**batch).loss.isfinite()


def test_mismatched_inputs_are_clear_errors():
    model = make_tiny_rag("gpt2", "rag_token")
    with pytest.raises(RagInputError, match="same number of passages"):
        model.prepare_inputs(QUESTIONS, passages=[PASSAGES[0], PASSAGES[1][:1]])
    with pytest.raises(RagInputError, match="one answer each"):
        model.prepare_inputs(QUESTIONS, ["Rollo"], passages=PASSAGES)
    with pytest.raises(RagInputError, match="doc_scores has shape"):
        model.prepare_inputs(QUESTIONS, passages=PASSAGES, doc_scores=[[1.0], [2.0]])

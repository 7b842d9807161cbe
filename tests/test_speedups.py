"""RagSpeedOptions (saved with the config, given per call) and the speed-ups' support tables."""

import importlib
import inspect

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag

from modeling_rag import RagConfig, RagConfigError, RagForGeneration, RagSpeedOptions
from modeling_rag.speedups.support import (
    EXACT_EMBEDDING_LOOKUP,
    GROUPED_CROSS_ATTENTION,
    RECOMPUTE_FEED_FORWARD,
    is_supported,
)

QUESTIONS = ["Who was the Norse leader?", "Which leader gave his name to a region of France, and when?"]
PASSAGES = [
    [TINY_PASSAGES[0], TINY_PASSAGES[1], TINY_PASSAGES[3]],
    [TINY_PASSAGES[3], TINY_PASSAGES[0], TINY_PASSAGES[2]],
]
SCORES = [[2.0, 0.5, -1.0], [1.0, 2.0, 3.0]]


def test_options_are_validated_naming_the_field():
    with pytest.raises(RagConfigError, match="speed_options.decode_groups"):
        RagSpeedOptions(decode_groups=0)
    with pytest.raises(RagConfigError, match="speed_options.merge_decode_groups"):
        RagSpeedOptions(merge_decode_groups=1)
    with pytest.raises(RagConfigError, match="unknown field"):
        RagConfig(speed_options={"merge_groups": False})


def test_options_are_saved_with_the_model(tmp_path):
    model = make_tiny_rag("bart", "rag_token")
    model.config.speed_options = RagSpeedOptions(decode_groups=2, merge_decode_groups=False)
    model.save_pretrained(tmp_path / "m")
    loaded = RagForGeneration.from_pretrained(tmp_path / "m")
    assert loaded.config.speed_options == RagSpeedOptions(decode_groups=2, merge_decode_groups=False)
    assert RagConfig().speed_options == RagSpeedOptions()


@pytest.mark.parametrize("kind", ["bart", "gpt2"])
@pytest.mark.parametrize("mode", ["concat", "rag_sequence", "rag_token"])
def test_every_speed_up_off_gives_the_same_losses_and_answers(kind, mode):
    model = make_tiny_rag(kind, mode).eval()
    batch = model.prepare_inputs(QUESTIONS, ["Rollo", "Normandy in 911"], passages=PASSAGES, doc_scores=SCORES)
    fast = RagSpeedOptions(encoder_chunk_tokens=64, train_chunk_tokens=64, decode_group_min_rows=1)
    plain = RagSpeedOptions.plain()
    torch.testing.assert_close(model(**batch, speed_options=fast).loss, model(**batch, speed_options=plain).loss)
    kwargs = dict(passages=PASSAGES, doc_scores=SCORES, max_new_tokens=4, num_beams=2)
    assert torch.equal(
        model.generate(QUESTIONS, speed_options=fast, **kwargs),
        model.generate(QUESTIONS, speed_options=plain, **kwargs),
    )


def test_a_wrong_options_object_is_a_clear_error():
    model = make_tiny_rag("gpt2", "concat")
    with pytest.raises(Exception, match="speed_options must be a RagSpeedOptions"):
        model.generate(QUESTIONS, passages=PASSAGES, speed_options={"decode_groups": 2})


# what each speed-up relies on in the forward of the classes it lists (checked against the installed transformers)
_RELIES_ON = {
    "RECOMPUTE_FEED_FORWARD": (RECOMPUTE_FEED_FORWARD, ["self.activation_fn(self.fc1(hidden_states))"]),
    "EXACT_EMBEDDING_LOOKUP": (EXACT_EMBEDDING_LOOKUP, ["inputs_embeds = self.embed_tokens(input_ids)\n"]),
    "GROUPED_CROSS_ATTENTION": (
        GROUPED_CROSS_ATTENTION,
        ["is_updated", "cross_attention_cache", "ALL_ATTENTION_FUNCTIONS"],
    ),
}
_HOMES = {
    "Bart": "bart", "MBart": "mbart", "Marian": "marian", "Pegasus": "pegasus", "PegasusX": "pegasus_x",
    "Blenderbot": "blenderbot", "BlenderbotSmall": "blenderbot_small", "PLBart": "plbart", "M2M100": "m2m_100",
    "LED": "led", "Mvp": "mvp", "Whisper": "whisper", "T5": "t5", "MT5": "mt5", "UMT5": "umt5", "LongT5": "longt5",
}  # fmt: skip


def _find(name: str) -> type:
    for prefix in sorted(_HOMES, key=len, reverse=True):
        if name.startswith(prefix):
            module = importlib.import_module(f"transformers.models.{_HOMES[prefix]}.modeling_{_HOMES[prefix]}")
            return getattr(module, name)
    raise AssertionError(f"no home for {name}")


@pytest.mark.parametrize("table", sorted(_RELIES_ON))
def test_support_tables_name_classes_whose_forward_does_what_the_speed_up_assumes(table):
    names, markers = _RELIES_ON[table]
    for name in sorted(names):
        cls = _find(name)
        assert is_supported(cls, names)
        source = inspect.getsource(cls.forward)
        for marker in markers:
            assert marker in source, f"{name}.forward no longer has {marker!r}: remove it from {table}"


def test_a_subclass_is_not_taken_for_its_supported_parent():
    from transformers.models.bart.modeling_bart import BartAttention

    class MyAttention(BartAttention):
        pass

    MyAttention.__name__ = "BartAttention"
    assert is_supported(BartAttention, GROUPED_CROSS_ATTENTION)
    assert not is_supported(MyAttention, GROUPED_CROSS_ATTENTION)

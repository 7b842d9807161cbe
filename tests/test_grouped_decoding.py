"""RAG-Token decoding with the length groups merged into one batch (modeling_rag/speedups/grouped_decoding.py,
merged_decoding.py), compared with group-by-group decoding through RagSpeedOptions."""

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag

import modeling_rag.generators.seq2seq as seq2seq
import modeling_rag.speedups.merged_decoding as merged_decoding
from modeling_rag import RagSpeedOptions
from modeling_rag.modes import RagTokenState
from modeling_rag.speedups.grouped_decoding import grouped_cross_attention_modules
from modeling_rag.speedups.merged_decoding import MergedDecoding

QUESTIONS = ["Who was the Norse leader?", "Rome?", "Which leader gave his name to a region of France, and when?"]
PASSAGES = [
    [TINY_PASSAGES[0], TINY_PASSAGES[1], TINY_PASSAGES[3]],
    [TINY_PASSAGES[2], TINY_PASSAGES[5], TINY_PASSAGES[4]],
    [TINY_PASSAGES[3], TINY_PASSAGES[0], TINY_PASSAGES[2]],
]
SCORES = [[2.0, 0.5, -1.0], [0.3, 0.2, 0.1], [1.0, 2.0, 3.0]]


def _decode(model, monkeypatch, merge: bool, **generate_kwargs):
    """Generated ids, every step's marginal logits, and how many steps ran merged."""
    speed = RagSpeedOptions(merge_decode_groups=merge, decode_group_min_rows=1)  # several groups even here
    steps, merged_steps = [], []
    step, merged_step = RagTokenState.next_token_logprobs, MergedDecoding.step

    def recording_step(self, input_ids):
        out = step(self, input_ids)
        steps.append(out.detach().clone())
        return out

    def recording_merged(self, *args):
        merged_steps.append(1)
        return merged_step(self, *args)

    monkeypatch.setattr(RagTokenState, "next_token_logprobs", recording_step)
    monkeypatch.setattr(MergedDecoding, "step", recording_merged)
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(
            QUESTIONS,
            passages=PASSAGES,
            doc_scores=SCORES,
            max_new_tokens=5,
            min_new_tokens=5,
            speed_options=speed,
            **generate_kwargs,
        )
    monkeypatch.undo()
    return ids, steps, len(merged_steps)


@pytest.mark.parametrize(
    "generate_kwargs",
    [{"num_beams": 1}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 20}],
    ids=["greedy", "beams", "sampling"],
)
def test_merged_groups_decode_like_group_by_group(monkeypatch, generate_kwargs):
    model = make_tiny_rag("bart", "rag_token").eval()
    lengths = model.prepare_inputs(QUESTIONS, passages=PASSAGES)["context_attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()
    ids, steps, merged = _decode(model, monkeypatch, merge=False, **generate_kwargs)
    assert merged == 0
    merged_ids, merged_steps, merged = _decode(model, monkeypatch, merge=True, **generate_kwargs)
    assert merged == len(merged_steps) - 1 > 0  # every step after the first ran merged
    assert torch.equal(merged_ids, ids)
    assert len(merged_steps) == len(steps)
    for a, b in zip(merged_steps, steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_cross_attention_qualifies_only_generators_it_can_serve():
    bart = make_tiny_rag("bart", "rag_token").generator
    layers = grouped_cross_attention_modules(bart)
    assert sorted(layers.values()) == list(range(bart.config.decoder_layers))
    bart.config._attn_implementation = "eager"  # the grouped function stands in for SDPA only
    assert grouped_cross_attention_modules(bart) is None
    assert grouped_cross_attention_modules(make_tiny_rag("t5", "rag_token").generator) is None
    assert grouped_cross_attention_modules(make_tiny_rag("gpt2", "rag_token").generator) is None


def test_t5_keeps_decoding_group_by_group(monkeypatch):
    model = make_tiny_rag("t5", "rag_token").eval()
    ids, _, merged = _decode(model, monkeypatch, merge=True)
    assert merged == 0
    reference, _, _ = _decode(model, monkeypatch, merge=False)
    assert torch.equal(ids, reference)


def test_a_cross_attention_layer_that_bypasses_the_grouped_function_is_an_error(monkeypatch):
    model = make_tiny_rag("bart", "rag_token").eval()
    real = merged_decoding.grouped_cross_attention_modules

    def with_a_layer_never_called(generator):
        layers = real(generator)
        return {**layers, -1: 0}  # a "module" the generator never runs: one layer short each step

    # a transformers version whose decoder bypassed the grouped function would look like this
    monkeypatch.setattr(merged_decoding, "grouped_cross_attention_modules", with_a_layer_never_called)
    with pytest.raises(RuntimeError, match="cross-attention layers went through the grouped attention function"):
        model.generate(
            QUESTIONS,
            passages=PASSAGES,
            doc_scores=SCORES,
            max_new_tokens=3,
            min_new_tokens=3,
            speed_options=RagSpeedOptions(decode_group_min_rows=1),
        )
    # the generator's attention implementation is restored after the error
    assert model.generator.config._attn_implementation == "sdpa"


def test_growing_layer_holds_what_concatenation_would():
    from transformers.cache_utils import DynamicLayer

    from modeling_rag.speedups.grouped_decoding import GrowingLayer

    torch.manual_seed(0)
    first = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8)
    growing, plain = GrowingLayer(*first, spare=2), DynamicLayer()
    plain.update(*first)
    for step in range(7):  # past the spare room, so the buffers grow
        new = torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8)
        for got, want in zip(growing.update(*new), plain.update(*new)):
            assert torch.equal(got, want)
        if step == 3:
            for layer in (growing, plain):
                layer.reorder_cache(torch.tensor([2, 2, 0, 1]))
    for operation in (
        lambda layer: layer.crop(-2),
        lambda layer: layer.batch_select_indices(torch.tensor([0, 3])),
        lambda layer: layer.batch_repeat_interleave(2),
    ):
        operation(growing), operation(plain)
        new = torch.randn(plain.keys.shape[0], 2, 1, 8), torch.randn(plain.keys.shape[0], 2, 1, 8)
        for got, want in zip(growing.update(*new), plain.update(*new)):
            assert torch.equal(got, want)
    assert growing.get_seq_length() == plain.get_seq_length() == 3 + 7 - 2 + 3
    growing.reset()
    assert growing.get_seq_length() == 0
    keys, _ = growing.update(*first)
    assert torch.equal(keys, first[0])


def test_merged_cache_concatenates_self_attention_and_holds_no_cross_attention_copy():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from modeling_rag.speedups.grouped_decoding import merge_group_caches

    torch.manual_seed(0)
    groups = []
    for rows, width in ((2, 4), (3, 6)):
        self_kv = [(torch.randn(rows, 2, 1, 8), torch.randn(rows, 2, 1, 8)) for _ in range(2)]
        cross_kv = [(torch.randn(rows, 2, width, 8), torch.randn(rows, 2, width, 8)) for _ in range(2)]
        groups.append((self_kv, cross_kv, EncoderDecoderCache(DynamicCache(self_kv), DynamicCache(cross_kv))))
    cache, keys_values = merge_group_caches([g[2] for g in groups], [2, 3])
    for layer in range(2):
        want = torch.cat([g[0][layer][0] for g in groups])
        assert torch.equal(cache.self_attention_cache.layers[layer].keys, want)
        stand_in = cache.cross_attention_cache.layers[layer].keys
        assert stand_in.shape == (5, 2, 6, 8)
        assert stand_in.untyped_storage().nbytes() <= 8  # a view of one zero, not a [5, 2, 6, 8] tensor
        assert cache.is_updated[layer]  # the generator reuses it instead of projecting encoder states
        for g, (k, v) in zip(groups, keys_values[layer]):
            assert torch.equal(k, g[1][layer][0]) and torch.equal(v, g[1][layer][1])


# --- teacher forcing: the decoder once over all length chunks, the encoder states packed ---
ANSWERS = ["Rollo", "the city", "Normandy in 911"]


def _teacher_forced(model, monkeypatch, merge: bool, **forward_kwargs):
    """Loss, logits and parameter gradients of one forward/backward, and the chunk counts packed."""
    # several length chunks for this small batch
    speed = RagSpeedOptions(merge_decode_groups=merge, train_chunk_tokens=300, encoder_chunk_tokens=300)
    packed = []
    real = seq2seq.packed_decoder_logits

    def recording(generator, encoder_states, *args):  # one encoder output per length chunk
        packed.append(len(encoder_states))
        return real(generator, encoder_states, *args)

    monkeypatch.setattr(seq2seq, "packed_decoder_logits", recording)
    model.zero_grad()
    batch = model.prepare_inputs(QUESTIONS, passages=PASSAGES, answers=ANSWERS)
    out = model(**batch, speed_options=speed, **forward_kwargs)
    if torch.is_grad_enabled():
        out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return out.loss.detach(), out.logits.detach(), grads, packed


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_packed_teacher_forcing_equals_chunk_by_chunk(monkeypatch, grad):
    """Loss, logits and every gradient are those of one decoder pass per chunk."""
    model = make_tiny_rag("bart", "rag_token").eval()  # eval: no dropout, so both runs compute the same
    with torch.set_grad_enabled(grad):
        loss, logits, grads, packed = _teacher_forced(model, monkeypatch, merge=False)
        assert packed == []
        packed_loss, packed_logits, packed_grads, packed = _teacher_forced(model, monkeypatch, merge=True)
    assert len(packed) == 1 and packed[0] > 2  # one decoder pass over several chunks of different widths
    torch.testing.assert_close(packed_loss, loss)
    torch.testing.assert_close(packed_logits, logits, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == grads.keys()
    assert (len(grads) > 0) == grad
    for name, g in grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_teacher_forcing_steps_aside_for_checkpointing_and_t5(monkeypatch):
    """Activation checkpointing recomputes layers outside the grouped function: that generator, and T5
    (not served by it), run the decoder per chunk, with the same results."""
    model = make_tiny_rag("bart", "rag_token").eval()
    loss, _, grads, _ = _teacher_forced(model, monkeypatch, merge=False)
    model.generator.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints only in training
    for module in model.modules():  # ...but no dropout, to compare
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    checkpointed_loss, _, checkpointed_grads, packed = _teacher_forced(model, monkeypatch, merge=True)
    assert packed == []
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    t5 = make_tiny_rag("t5", "rag_token").eval()
    loss, _, _, packed = _teacher_forced(t5, monkeypatch, merge=True)
    assert packed == [] and torch.isfinite(loss)


def test_packed_teacher_forcing_with_a_layer_that_bypasses_the_grouped_function_is_an_error(monkeypatch):
    model = make_tiny_rag("bart", "rag_token").eval()
    real = seq2seq.grouped_cross_attention_modules
    monkeypatch.setattr(seq2seq, "grouped_cross_attention_modules", lambda generator: {**real(generator), -1: 0})
    with pytest.raises(RuntimeError, match="teacher-forced decoding: .* went through the grouped attention function"):
        model(
            **model.prepare_inputs(QUESTIONS, passages=PASSAGES, answers=ANSWERS),
            speed_options=RagSpeedOptions(train_chunk_tokens=300),
        )
    assert model.generator.config._attn_implementation == "sdpa"


def test_pack_encoder_states_puts_the_groups_tokens_back_to_back():
    from modeling_rag.speedups.grouped_decoding import CrossAttentionPlan, pack_encoder_states

    torch.manual_seed(0)
    states = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]  # 10 + 6 tokens for 5 rows: width 4, 4 spare
    packed = pack_encoder_states(states, rows=5)
    assert packed.shape == (5, 4, 4)
    flat = packed.reshape(-1, 4)
    assert torch.equal(flat[:10], states[0].reshape(-1, 4)) and torch.equal(flat[10:16], states[1].reshape(-1, 4))
    assert not flat[16:].any()
    # a projection of the packed states, shaped as an attention module shapes it, cut back per group
    key = packed.view(5, 4, 2, 2).transpose(1, 2)  # [rows, heads, width, head_dim]
    plan = CrossAttentionPlan(slices=[(0, 2, 5), (2, 5, 2)], keys_values=None, layers={}, key_masks=[None, None])
    for (k, v, mask), s in zip(plan.group_keys_values(0, key, -key), states):
        want = s.view(s.shape[0], s.shape[1], 2, 2).transpose(1, 2)
        assert torch.equal(k, want) and torch.equal(v, -want) and mask is None
    with pytest.raises(ValueError, match="exactly one of"):
        CrossAttentionPlan(slices=[], keys_values=None, layers={})

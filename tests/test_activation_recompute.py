import contextlib

import pytest
import torch
from conftest import TINY_PASSAGES, build_tiny_tokenizer, make_tiny_rag, tiny_generator_config
from transformers import AutoModelForSeq2SeqLM

import modeling_rag.generators.base as runner_base
from modeling_rag import RagSpeedOptions
from modeling_rag.speedups.activation_recompute import recompute_feed_forward_activations
from modeling_rag.training import enable_gradient_checkpointing


def _tiny_bart(**overrides):
    tok = build_tiny_tokenizer()
    config = tiny_generator_config("bart", tok)
    config.dropout = 0.1  # active in train mode: both runs must draw the same random numbers
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(config).train()


def _step(model, recompute: bool):
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (3, 12))
    labels = torch.randint(5, 300, (3, 5))
    model.zero_grad()
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    context = recompute_feed_forward_activations(model) if recompute else contextlib.nullcontext(0)
    with context as changed, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, changed, sum(saved)


def test_same_loss_and_gradients_with_less_saved_memory():
    model = _tiny_bart()
    loss, grads, _, saved = _step(model, recompute=False)
    loss_r, grads_r, changed, saved_r = _step(model, recompute=True)
    assert changed == 4  # 2 encoder + 2 decoder layers
    assert torch.allclose(loss, loss_r, atol=1e-6)
    assert grads.keys() == grads_r.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], grads_r[name], atol=1e-6), name
    # one [tokens, ffn_dim] float tensor fewer per layer: 4 layers, 3*12 (encoder) / 3*5 (decoder) tokens x 64
    assert saved - saved_r >= 4 * (2 * 36 + 2 * 15) * 64 - 64


def test_layers_are_restored_and_weights_unchanged():
    model = _tiny_bart()
    layer = model.model.encoder.layers[0]
    activation = layer.activation_fn
    keys = list(model.state_dict())
    with recompute_feed_forward_activations(model) as changed:
        assert changed == 4
        assert layer.activation_fn is not activation and "forward" in vars(layer.fc2)
        assert list(model.state_dict()) == keys
    assert layer.activation_fn is activation and "forward" not in vars(layer.fc2)
    # a plain function as activation is swapped for a plain function (nn.Module refuses one over a child)
    del layer.activation_fn
    layer.activation_fn = torch.nn.functional.gelu
    with recompute_feed_forward_activations(model):
        assert not isinstance(layer.activation_fn, torch.nn.Module)
    assert layer.activation_fn is torch.nn.functional.gelu


def test_left_alone_when_it_would_change_the_computation():
    with recompute_feed_forward_activations(_tiny_bart(activation_dropout=0.1)) as changed:
        assert changed == 0  # the dropout sits between activation and fc2
    with recompute_feed_forward_activations(_tiny_bart(activation_dropout=0.1).eval()) as changed:
        assert changed == 4  # no dropout in eval mode
    model = _tiny_bart()
    enable_gradient_checkpointing(model)
    with recompute_feed_forward_activations(model) as changed:
        assert changed == 0
    with recompute_feed_forward_activations(_tiny_bart(), enabled=False) as changed:
        assert changed == 0
    t5 = make_tiny_rag("t5").generator
    with recompute_feed_forward_activations(t5) as changed:
        assert changed == 0  # other layer shapes are not touched


@pytest.mark.parametrize("mode", ["rag_token", "concat"])
def test_rag_training_step_gradients_unchanged(mode, monkeypatch):
    model = make_tiny_rag("bart", mode).train()
    passages = [[TINY_PASSAGES[0], TINY_PASSAGES[1], TINY_PASSAGES[2]]] * 2
    batch = model.prepare_inputs(
        ["Who?", "Which leader gave his name to a region?"],
        ["Rollo", "the Normans"],
        passages=passages,
        doc_scores=[[2.0, 0.5, -1.0], [1.5, 1.0, 0.0]],
    )
    calls = []
    real = runner_base.recompute_feed_forward_activations

    def counting(model_, enabled=True):
        calls.append(enabled)
        return real(model_, enabled)

    def run(speed=None):
        torch.manual_seed(0)
        model.zero_grad()
        out = model(**batch, speed_options=speed)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(runner_base, "recompute_feed_forward_activations", counting)
    loss, grads = run()
    assert calls == [True]
    loss_plain, grads_plain = run(RagSpeedOptions(recompute_activations=False))
    assert calls == [True, False]
    assert torch.allclose(loss, loss_plain, atol=1e-6)
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_plain[name], atol=1e-6), name

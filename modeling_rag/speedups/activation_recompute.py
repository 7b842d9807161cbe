"""Less activation memory in training: the feed-forward activation is recomputed in the backward pass.

A transformer feed-forward block ``fc2(act(fc1(x)))`` keeps two `[tokens, ffn_dim]` tensors for the
backward pass: ``fc1(x)`` (the activation's backward needs it) and ``act(fc1(x))`` (``fc2``'s weight
gradient needs it). Those two are the largest activations of an encoder-decoder generator in a
training step (with BART-base: 2 x 3,072 floats per token per layer, against 768 for everything else
of the block). [`recompute_feed_forward_activations`] keeps only the first: ``fc2`` runs as one
autograd function that saves its *pre*-activation input and recomputes the activation (an elementwise
op, ~1-2% of a step) when the gradients are needed. Gradients are those of the plain computation.

It applies to the layers named in `support.RECOMPUTE_FEED_FORWARD` (the BART family, LED, MVP,
Whisper), whose forward reads ``self.activation_fn(self.fc1(hidden_states))``, then an activation
dropout, then ``self.fc2(hidden_states)``. Layers whose activation dropout is active in training are
left alone (the dropout sits between the activation and ``fc2``), as are generators that use gradient
checkpointing (their recomputation must see the same forward) and autocast regions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .support import RECOMPUTE_FEED_FORWARD, is_supported, uses_activation_checkpointing

__all__ = ["recompute_feed_forward_activations"]


class _ActivationLinear(torch.autograd.Function):
    """``linear(act(x), weight, bias)`` that saves `x`, not ``act(x)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return nn.functional.linear(activation(x), weight, bias)  # autograd records nothing inside forward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            hidden = ctx.activation(x_)
        grad_x = grad_w = grad_b = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat_grad.t() @ hidden.detach().reshape(-1, hidden.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        if ctx.needs_input_grad[0]:
            (grad_x,) = torch.autograd.grad(hidden, x_, grad_out @ weight)
        return grad_x, grad_w, grad_b, None


def _feed_forward_layers(model: nn.Module) -> list[nn.Module]:
    layers = []
    for module in model.modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if not (
            isinstance(fc1, nn.Linear) and type(fc2) is nn.Linear and callable(getattr(module, "activation_fn", None))
        ):
            continue
        if module.training and float(getattr(module, "activation_dropout", 0.0) or 0.0) > 0.0:
            continue
        if is_supported(type(module), RECOMPUTE_FEED_FORWARD):
            layers.append(module)
    return layers


def _fused_fc2(activation, fc2: nn.Linear):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            hidden_states.requires_grad or fc2.weight.requires_grad or (fc2.bias is not None and fc2.bias.requires_grad)
        )
        if not needs_grad or torch.is_autocast_enabled(hidden_states.device.type):
            return nn.functional.linear(activation(hidden_states), fc2.weight, fc2.bias)
        return _ActivationLinear.apply(hidden_states, fc2.weight, fc2.bias, activation)

    return forward


@contextlib.contextmanager
def recompute_feed_forward_activations(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, BART-family feed-forward layers of `model` save ``fc1``'s output only (see above).

    Yields the number of layers changed; they are restored on exit (the backward pass may run after
    it). Nothing is changed when `enabled` is false or the model uses gradient checkpointing.
    """
    if not enabled or uses_activation_checkpointing(model):
        yield 0
        return
    layers = _feed_forward_layers(model)
    saved = [layer.activation_fn for layer in layers]
    for layer, activation in zip(layers, saved):
        layer.fc2.forward = _fused_fc2(activation, layer.fc2)
        # a module replaces a module, a function a function (nn.Module refuses a function over a child)
        layer.activation_fn = nn.Identity() if isinstance(activation, nn.Module) else _identity
    try:
        yield len(layers)
    finally:
        for layer, activation in zip(layers, saved):
            layer.activation_fn = activation
            del layer.fc2.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x

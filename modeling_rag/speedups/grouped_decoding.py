"""RAG-Token decoding of all rows as one batch, while each length group attends only to its own context.

RAG-Token decoding with an encoder-decoder generator runs `questions x documents` rows whose contexts
differ in length (57 to 300 tokens in the benchmark). Decoding every row against the batch's longest
context wastes the cross-attention's reads (and its key/value projection) on padding, so
the seq2seq generator runner decodes the rows in groups of similar length. But then each decoding step runs the
decoder and the LM head once per group: at a few dozen rows per group those matrix products are bound
by reading the weights (the LM head alone is 50k x 768 floats), not by arithmetic.

This module keeps the groups for the first step only, which computes each group's cross-attention
keys and values over its own context width, then merges the groups into one batch:

- the self-attention caches of the groups are concatenated (rows in group order) into layers that
  grow in place ([`GrowingLayer`]) rather than by concatenation at every step;
- the cross-attention cache of the merged batch holds a zero-sized stand-in (`expand` of one zero),
  so the generator does not project the encoder states again; the real keys and values stay per
  group, in a [`CrossAttentionPlan`];
- while the merged batch is decoded, the generator's attention implementation is switched to
  ``"rag_grouped_sdpa"``, registered here with transformers' `AttentionInterface`: for the
  generator's cross-attention modules it runs SDPA once per group on that group's rows, keys and
  values (each trimmed to the group's width); every other attention call goes to transformers' SDPA
  unchanged.

The linear layers and the LM head then run once per step over all rows. The arithmetic is the same
as group by group; outputs are equal to float rounding.

Teacher forcing (the training loss, rescoring) has the same problem with the same cure, in one call:
the encoder runs per length chunk, then [`pack_encoder_states`] lays the chunks' encoder states back
to back (no padding between chunks) in one tensor that the generator takes as its encoder states. Its
cross-attention projects them in one matrix product, and the grouped function cuts each chunk's keys
and values out of that projection ([`CrossAttentionPlan.group_keys_values`]). Under autograd every step
is an ordinary differentiable op, so gradients are those of the chunk-by-chunk computation.

It applies to generators whose cross-attention reads a transformers `EncoderDecoderCache` and calls
the attention interface (the BART family: BART, mBART, Marian, Pegasus, Blenderbot, ...), with the
``"sdpa"`` implementation, whose classes `support.GROUPED_CROSS_ATTENTION` lists.
[`grouped_cross_attention_modules`] checks that; other generators keep
decoding group by group. Each merged step also checks that every cross-attention module was served by
the grouped function (a transformers version that bypassed it would otherwise read the stand-in).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .support import GROUPED_CROSS_ATTENTION, is_supported

__all__ = [
    "GROUPED_ATTENTION",
    "CrossAttentionPlan",
    "GrowingLayer",
    "grouped_cross_attention",
    "grouped_cross_attention_modules",
    "group_slices",
    "merge_group_caches",
    "pack_encoder_states",
]

GROUPED_ATTENTION = "rag_grouped_sdpa"
_ACTIVE = threading.local()


@dataclass
class CrossAttentionPlan:
    """Where each group's rows and cross-attention keys/values are, for one merged decoder call.

    Two ways to give the keys and values:

    - decoding (`keys_values`): each group's keys/values were computed by the group's own first step
      and are passed here; the generator's cross-attention cache holds zero-sized stand-ins.
    - teacher forcing (`key_masks`, see [`pack_encoder_states`]): the encoder states of all groups are
      packed back to back, without padding between groups, into the `[rows, width, d]` tensor that the
      generator receives, so its cross-attention projects every group's real tokens in one matrix
      product; the grouped function cuts each group's keys/values out of that projection.

    Attributes:
        slices: per group, `(first row, end row, context width)` in the merged row order.
        keys_values: decoding: per decoder layer, per group, the cross-attention `(keys, values)`, each
            `[group rows, heads, group width, head_dim]`. None in packed mode.
        layers: `id(module) -> layer index` of the generator's cross-attention modules.
        key_masks: packed mode: per group, the boolean key padding mask `[group rows, 1, 1, group width]`
            (True = attend), or None where no row is padded. The attention mask given to the generator is not
            used for cross-attention then (pass none).
        served: cross-attention calls answered by the grouped function since the last `take_served`.
    """

    slices: list[tuple[int, int, int]]
    keys_values: list[list[tuple[torch.Tensor, torch.Tensor]]] | None
    layers: dict[int, int]
    key_masks: list[torch.Tensor | None] | None = None
    served: int = field(default=0)

    def __post_init__(self):
        if (self.keys_values is None) == (self.key_masks is None):
            raise ValueError(
                "CrossAttentionPlan: give exactly one of `keys_values` (decoding) and `key_masks` (packed)"
            )

    def take_served(self) -> int:
        served, self.served = self.served, 0
        return served

    def group_keys_values(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Per group: `(keys, values, key mask or None)` for the cross-attention of `layer`."""
        if self.keys_values is not None:
            return [(k, v, None) for k, v in self.keys_values[layer]]
        # packed: `key` is [rows, heads, packed width, head_dim]; back to one row per token, then cut
        heads, head_dim = key.shape[1], key.shape[-1]
        flat_keys = key.transpose(1, 2).reshape(-1, heads, head_dim)
        flat_values = value.transpose(1, 2).reshape(-1, heads, value.shape[-1])
        groups, offset = [], 0
        for (start, end, width), mask in zip(self.slices, self.key_masks):
            tokens = (end - start) * width
            k = flat_keys[offset : offset + tokens].view(end - start, width, heads, head_dim).transpose(1, 2)
            v = flat_values[offset : offset + tokens].view(end - start, width, heads, -1).transpose(1, 2)
            groups.append((k, v, mask))
            offset += tokens
        return groups


def group_slices(shapes) -> list[tuple[int, int, int]]:
    """`(first row, end row, width)` of groups of `(rows, width)` each, laid one after another."""
    slices, start = [], 0
    for rows, width in shapes:
        slices.append((start, start + int(rows), int(width)))
        start += int(rows)
    return slices


def pack_encoder_states(states: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Groups' encoder states (`[group rows, group width, d]` each, rows in merged order) back to back.

    Returns `[rows, ceil(tokens / rows), d]`: the tokens of all groups in order, zero-filled at the end,
    shaped with the merged batch's row count so that the generator takes it as encoder states.
    """
    d = states[0].shape[-1]
    flat = torch.cat([s.reshape(-1, d) for s in states])
    width = -(-flat.shape[0] // rows)
    spare = rows * width - flat.shape[0]
    if spare:
        flat = torch.cat([flat, flat.new_zeros(spare, d)])
    return flat.view(rows, width, d)


def _grouped_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, except for a planned cross-attention module: one SDPA per length group."""
    plan: CrossAttentionPlan | None = getattr(_ACTIVE, "plan", None)
    layer = None if plan is None else plan.layers.get(id(module))
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for (start, end, width), (k, v, key_mask) in zip(plan.slices, plan.group_keys_values(layer, key, value)):
        if key_mask is None and attention_mask is not None:
            key_mask = attention_mask[start:end, ..., :width]
        out, _ = sdpa_attention_forward(module, query[start:end], k, v, key_mask, **kwargs)
        outputs.append(out)
    plan.served += 1
    return torch.cat(outputs), None


AttentionInterface.register(GROUPED_ATTENTION, _grouped_sdpa)
AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)


def grouped_cross_attention_modules(generator) -> dict[int, int] | None:
    """`id(module) -> layer index` of `generator`'s cross-attention modules, or None if it does not qualify.

    Qualifies: an encoder-decoder generator on transformers' ``"sdpa"`` attention whose decoder layers
    each hold one ``encoder_attn`` module of a class that reads the cached cross-attention keys/values
    and calls the attention interface.
    """
    config = generator.config
    if not getattr(config, "is_encoder_decoder", False) or config._attn_implementation != "sdpa":
        return None
    layers = {}
    for name, module in generator.named_modules():
        if name.rsplit(".", 1)[-1] != "encoder_attn":
            continue
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or not is_supported(type(module), GROUPED_CROSS_ATTENTION):
            return None
        layers[id(module)] = index
    decoder_layers = getattr(config, "decoder_layers", None)
    if not layers or sorted(layers.values()) != list(range(decoder_layers or len(layers))):
        return None
    return layers


class GrowingLayer(DynamicLayer):
    """A self-attention cache layer that writes new keys/values into spare room instead of concatenating.

    transformers' `DynamicLayer` concatenates at every step, copying the whole cache (with 160 rows,
    6 layers and 16 steps, 2 s of a 33 s RAG-Token benchmark on one thread). This layer keeps buffers
    with room to spare (doubling when full); `keys`/`values` are views of their filled part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 32):
        super().__init__()
        self.lazy_initialization(keys, values)
        self._length = 0
        self._key_buffer = self._value_buffer = None
        self._reserve(keys, values, keys.shape[-2] + spare)
        self.update(keys, values)

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        batch, heads, _, head_dim = keys.shape
        key_buffer = keys.new_empty(batch, heads, capacity, head_dim)
        value_buffer = values.new_empty(batch, heads, capacity, values.shape[-1])
        if self._length:
            key_buffer[:, :, : self._length] = self.keys
            value_buffer[:, :, : self._length] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Takes `keys`/`values` (from an operation of the base class) as the new filled part."""
        self._length = 0
        self._reserve(keys, values, keys.shape[-2] + max(keys.shape[-2], 1))
        self._length = keys.shape[-2]
        self._key_buffer[:, :, : self._length] = keys
        self._value_buffer[:, :, : self._length] = values
        self._views()

    def _views(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized:  # after `reset`
            self.lazy_initialization(key_states, value_states)
        if self._key_buffer is None or self._length + new > self._key_buffer.shape[-2]:
            self._reserve(key_states, value_states, 2 * (self._length + new))
        self._key_buffer[:, :, self._length : self._length + new] = key_states
        self._value_buffer[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._views()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._length:
            beam_idx = beam_idx.to(self._key_buffer.device)
            self._key_buffer = self._key_buffer.index_select(0, beam_idx)
            self._value_buffer = self._value_buffer.index_select(0, beam_idx)
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt(self.keys, self.values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt(self.keys, self.values)

    def reset(self) -> None:
        super().reset()
        self._length = 0
        self._key_buffer = self._value_buffer = None


def merge_group_caches(caches, group_rows: list[int]):
    """One `EncoderDecoderCache` for the groups' rows in order, and the groups' cross keys/values.

    Returns `(cache, keys_values)` or None when a cache is not an `EncoderDecoderCache` of dynamic
    layers. The merged cross-attention cache holds zero-sized stand-ins of the merged shape (no memory),
    so that the generator takes its keys/values as computed; the real ones are in `keys_values`.
    """
    if not all(isinstance(c, EncoderDecoderCache) for c in caches):
        return None
    n_layers = len(caches[0].self_attention_cache.layers)
    try:
        self_layers = [
            (
                torch.cat([c.self_attention_cache.layers[i].keys for c in caches]),
                torch.cat([c.self_attention_cache.layers[i].values for c in caches]),
            )
            for i in range(n_layers)
        ]
        keys_values = [
            [(c.cross_attention_cache.layers[i].keys, c.cross_attention_cache.layers[i].values) for c in caches]
            for i in range(n_layers)
        ]
    except (AttributeError, IndexError, RuntimeError):
        return None
    if any(k is None or k.shape[0] != rows for layer in keys_values for (k, _), rows in zip(layer, group_rows)):
        return None
    rows = sum(group_rows)
    width = max(k.shape[2] for layer in keys_values for k, _ in layer)
    cross_cache = DynamicCache()
    cross_cache.layers = []
    for layer in keys_values:
        k = layer[0][0]
        stand_in = k.new_zeros(()).expand(rows, k.shape[1], width, k.shape[3])
        # set, not `update`d: a DynamicLayer's update concatenates, which would materialise the stand-in
        cross_layer = DynamicLayer()
        cross_layer.lazy_initialization(stand_in, stand_in)
        cross_layer.keys = cross_layer.values = stand_in
        cross_cache.layers.append(cross_layer)
    self_cache = DynamicCache()
    self_cache.layers = [GrowingLayer(k, v) for k, v in self_layers]
    return EncoderDecoderCache(self_cache, cross_cache), keys_values


@contextlib.contextmanager
def grouped_cross_attention(generator, plan: CrossAttentionPlan) -> Iterator[None]:
    """Inside: `generator`'s cross-attention runs per group as `plan` says; everything else as before."""
    config = generator.config
    previous = config._attn_implementation
    if previous == GROUPED_ATTENTION:  # nested, or another thread's decoding is inside: it plans for itself
        previous = "sdpa"  # the only implementation `grouped_cross_attention_modules` accepts
    config._attn_implementation = GROUPED_ATTENTION
    _ACTIVE.plan = plan
    try:
        yield
    finally:
        _ACTIVE.plan = None
        config._attn_implementation = previous

"""Turning text into vectors: pooling of encoder outputs, batched encoding, weight fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import RagConfigError, RagInputError
from .utils.atomic import atomic_write_bytes, atomic_write_text

POOLING_METHODS = ("cls", "mean", "pooler")


def pool(
    last_hidden_state: torch.Tensor,
    attention_mask: torch.Tensor | None,
    method: str,
    pooler_output: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Reduces token states `[batch, seq, hidden]` to one vector per text `[batch, hidden]`.

    `method` is `"cls"` (first token), `"mean"` (mean over the attention mask) or `"pooler"` (the
    encoder's own pooler output, e.g. BERT/DPR). `normalize` L2-normalises the result, which makes
    inner product equal to cosine similarity.
    """
    if method == "cls":
        vectors = last_hidden_state[:, 0]
    elif method == "mean":
        if attention_mask is None:
            vectors = last_hidden_state.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
            vectors = (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    elif method == "pooler":
        if pooler_output is None:
            raise RagConfigError(
                "question_pooling='pooler' needs an encoder with a pooler layer, but this encoder "
                "returned no pooler_output; use question_pooling='mean' or 'cls'."
            )
        vectors = pooler_output
    else:
        raise RagConfigError(f"question_pooling must be one of {POOLING_METHODS}, got {method!r}.")
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
    return vectors


def encoder_forward(encoder, input_ids, attention_mask, method: str, normalize: bool, token_type_ids=None):
    """Runs `encoder` and pools its output; keeps gradients (use inside `torch.no_grad()` to drop them)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    outputs = encoder(**kwargs, return_dict=True)
    return pool(
        outputs.last_hidden_state,
        attention_mask,
        method,
        pooler_output=getattr(outputs, "pooler_output", None),
        normalize=normalize,
    )


@torch.no_grad()
def encode_texts(
    texts: Sequence[str],
    encoder,
    tokenizer,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = False,
    desc: str = "Encoding",
) -> np.ndarray:
    """Encodes `texts` in batches and returns a float32 array `[len(texts), hidden]`.

    Texts are sorted by length so each batch pads only to its own longest text, then the rows
    are put back in the caller's order.
    """
    if isinstance(texts, str):
        raise RagInputError("encode_texts expects a list of strings, got a single string.")
    texts = list(texts)
    if not texts:
        hidden = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "d_model", 0)
        return np.zeros((0, hidden), dtype=np.float32)
    if max_length is None:
        max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
        batch = [texts[i] for i in order[start : start + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        vectors = encoder_forward(encoder, method=pooling, normalize=normalize, **enc)
        chunks.append(vectors.float().cpu().numpy())
    encoder.train(was_training)
    stacked = np.concatenate(chunks, axis=0)
    out = np.empty_like(stacked)
    out[np.asarray(order)] = stacked
    return np.ascontiguousarray(out, dtype=np.float32)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 over the names, shapes and values of a model's parameters and buffers.

    Two encoders with the same fingerprint produce the same vectors, so an index records the
    fingerprint of the encoder that built it and refuses to serve a model whose encoder differs.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


SHARD_STATE_NAME = "build_state.json"


def encode_texts_resumable(
    texts: Sequence[str],
    encoder,
    tokenizer,
    work_dir: str,
    *,
    shard_size: int = 4096,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    fingerprint: str | None = None,
    **encode_kwargs,
) -> np.ndarray:
    """`encode_texts` in shards saved under `work_dir`, so a build that was killed resumes where it stopped.

    The texts are cut into shards of `shard_size`; each finished shard is written atomically as
    ``shard_<i>.npy`` (plain float32, loaded without pickle). ``build_state.json`` records a key over the
    encoder's weights, the texts and the encoding settings: a later call with the same key reuses every
    finished shard that checks out (shape, dtype, finite values) and encodes only the rest; a different key
    starts over. With several processes (`rank` of `world_size`, sharing `work_dir`), shard i is encoded by
    process i % world_size and `barrier()` is called before the shards are read back. Returns all vectors
    `[len(texts), hidden]`, in order; the caller removes the shards (`clear_shard_dir`) once the index is
    saved. `fingerprint` is the encoder's `weights_fingerprint` when the caller has it already.
    """
    if shard_size < 1:
        raise RagConfigError(f"shard_size must be a positive integer, got {shard_size}.")
    texts, encode_kwargs = list(texts), dict(encode_kwargs)
    key = _shard_key(texts, fingerprint or weights_fingerprint(encoder), encode_kwargs, shard_size)
    n_shards = max(1, -(-len(texts) // shard_size))

    def shard_path(i: int) -> str:
        return os.path.join(work_dir, f"shard_{i:05d}.npy")

    def read_shard(i: int) -> np.ndarray | None:
        expected = len(texts[i * shard_size : (i + 1) * shard_size])
        try:
            arr = np.load(shard_path(i), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != expected or not np.isfinite(arr).all():
            return None
        return arr

    if rank == 0:
        _prepare_shard_dir(work_dir, key, n_shards, len(texts))
    if barrier is not None:
        barrier()
    mine = [i for i in range(n_shards) if i % world_size == rank]
    todo = [i for i in mine if read_shard(i) is None]
    show = encode_kwargs.pop("show_progress", False)
    desc = encode_kwargs.pop("desc", "Encoding")
    for i in tqdm(todo, desc=f"{desc} (shards)", disable=not show, unit="shard"):
        vectors = encode_texts(texts[i * shard_size : (i + 1) * shard_size], encoder, tokenizer, **encode_kwargs)
        buf = io.BytesIO()
        np.save(buf, vectors, allow_pickle=False)
        atomic_write_bytes(shard_path(i), buf.getvalue())
    if barrier is not None:
        barrier()
    parts = []
    for i in range(n_shards):
        arr = read_shard(i)
        if arr is None:
            raise OSError(f"Shard {shard_path(i)} is missing or damaged after encoding; run the build again.")
        parts.append(arr)
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)


def _shard_key(texts: list[str], fingerprint: str, encode_kwargs: dict, shard_size: int) -> str:
    """A key over the encoder's weights, the encoding settings, the shard size and every text."""
    digest = hashlib.sha256()
    digest.update(fingerprint.encode())
    digest.update(json.dumps({k: encode_kwargs.get(k) for k in ("pooling", "normalize", "max_length")}).encode())
    digest.update(str(shard_size).encode())
    for t in texts:
        digest.update(hashlib.sha256(t.encode("utf-8")).digest())
    return digest.hexdigest()


def _prepare_shard_dir(work_dir: str, key: str, n_shards: int, n_texts: int) -> None:
    """Keeps the shards in `work_dir` when they were made under `key`; removes them otherwise and records `key`."""
    os.makedirs(work_dir, exist_ok=True)
    state_path = os.path.join(work_dir, SHARD_STATE_NAME)
    try:
        with open(state_path, encoding="utf-8") as f:
            same = json.load(f).get("key") == key
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:  # another corpus, encoder or setting: its shards are of no use
        for name in os.listdir(work_dir):
            if _is_shard_file(name):
                os.remove(os.path.join(work_dir, name))
        atomic_write_text(state_path, json.dumps({"key": key, "shards": n_shards, "texts": n_texts}) + "\n")


def _is_shard_file(name: str) -> bool:
    return name.startswith("shard_") and name.endswith(".npy")


def clear_shard_dir(work_dir: str) -> None:
    """Removes the shards and state `encode_texts_resumable` wrote (and the folder, if nothing else is in it)."""
    if not os.path.isdir(work_dir):
        return
    for name in os.listdir(work_dir):
        if name == SHARD_STATE_NAME or _is_shard_file(name):
            os.remove(os.path.join(work_dir, name))
    try:
        os.rmdir(work_dir)
    except OSError:
        pass  # the folder holds files that are not ours: leave them

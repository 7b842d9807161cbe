"""The contrastive losses: InfoNCE with in-batch + hard negatives, false-negative masking, GradCache."""

import pytest
import torch

from modeling_rag.errors import RagConfigError, RagInputError
from modeling_rag.losses import (
    CachedContrastiveLoss,
    ContrastiveLoss,
    RandContext,
    gather_with_grad,
    info_nce_loss,
    label_log_probs,
    similarity_matrix,
)


def _vectors(n, d=8, seed=0, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def test_info_nce_matches_manual_softmax():
    q, p = _vectors(3), _vectors(7, seed=1)
    labels = torch.tensor([0, 1, 2])
    loss = info_nce_loss(q, p, labels, temperature=0.1)
    scores = q @ p.T / 0.1
    manual = -(scores.log_softmax(-1)[torch.arange(3), labels]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_similarities():
    q, p = _vectors(2, normalize=False), _vectors(4, seed=1, normalize=False)
    assert torch.allclose(similarity_matrix(q, p, "dot"), q @ p.T)
    cos = similarity_matrix(q, p, "cos")
    assert torch.allclose(cos, torch.nn.functional.cosine_similarity(q[:, None], p[None], dim=-1), atol=1e-6)
    l2 = similarity_matrix(q, p, "l2")
    assert torch.allclose(l2, -((q[:, None] - p[None]) ** 2).sum(-1), atol=1e-5)
    with pytest.raises(RagConfigError):
        similarity_matrix(q, p, "manhattan")


def test_false_negatives_are_masked():
    """Two questions sharing a gold passage: the other copy is not a negative."""
    q = _vectors(2)
    shared = _vectors(1, seed=3)
    p = torch.cat([shared, shared, _vectors(2, seed=4)])  # both positives are the same passage
    labels = torch.tensor([0, 1])
    keys = torch.tensor([7, 7, 8, 9])
    qpos = torch.tensor([[7], [7]])
    loss_fn = ContrastiveLoss(temperature=0.05)
    masked = loss_fn(q, p, labels, qpos, keys)
    unmasked = loss_fn(q, p, labels)
    expected = info_nce_loss(q, p[[0, 2, 3]], torch.tensor([0, 0]), temperature=0.05)
    assert torch.allclose(masked, expected, atol=1e-5)
    assert unmasked > masked


def test_bad_arguments():
    with pytest.raises(RagConfigError):
        ContrastiveLoss(temperature=0)
    with pytest.raises(RagConfigError):
        ContrastiveLoss(similarity="nope")
    with pytest.raises(RagInputError):
        info_nce_loss(_vectors(2), _vectors(3), torch.tensor([0, 5]))
    with pytest.raises(RagInputError):
        info_nce_loss(_vectors(2, d=4), _vectors(3, d=5), torch.tensor([0, 1]))
    with pytest.raises(RagConfigError):
        CachedContrastiveLoss(ContrastiveLoss(), chunk_size=0)


def test_gather_with_grad_is_identity_on_one_process():
    x = _vectors(3).requires_grad_(True)
    out, offset = gather_with_grad(x, None)
    assert out is x and offset == 0
    loss_fn = ContrastiveLoss()
    assert loss_fn.backward_scale == 1.0 and not loss_fn.gathers


# --- GradCache --------------------------------------------------------------------------------------
class _Encoders(torch.nn.Module):
    """A tiny BERT for questions and, optionally, a separate one for passages."""

    def __init__(self, tokenizer, separate: bool, dropout: float = 0.0):
        super().__init__()
        from conftest import tiny_question_encoder_config
        from transformers import BertModel

        cfg = tiny_question_encoder_config(tokenizer)
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
        torch.manual_seed(0)
        self.q = BertModel(cfg)
        self.p = BertModel(cfg) if separate else None

    def forward(self, qi=None, pi=None):
        from modeling_rag.encoders import encoder_forward

        q = encoder_forward(self.q, method="mean", normalize=True, **qi) if qi else None
        p = encoder_forward(self.p or self.q, method="mean", normalize=True, **pi) if pi else None
        return q, p


def _inputs(tokenizer):
    questions = ["who was rollo", "capital of france", "capital of italy", "remote work days", "phones"]
    passages = [
        "Rollo was the Norse leader.",
        "The capital of France is Paris.",
        "The capital of Italy is Rome.",
        "Employees may work remotely.",
        "Company phones are provided.",
        "Expenses must be submitted.",
        "The Normans gave their name to Normandy.",
        "Paris is in France.",
        "Rome is in Italy.",
        "Three days a week.",
    ]
    enc = lambda texts: dict(tokenizer(texts, padding=True, return_tensors="pt"))  # noqa: E731
    qi = {k: v for k, v in enc(questions).items() if k in ("input_ids", "attention_mask")}
    pi = {k: v for k, v in enc(passages).items() if k in ("input_ids", "attention_mask")}
    return qi, pi, torch.arange(len(questions))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_cached_loss_matches_plain_loss_and_gradients(tiny_tokenizer, separate, chunk_size):
    model = _Encoders(tiny_tokenizer, separate)
    qi, pi, labels = _inputs(tiny_tokenizer)
    keys = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])  # passages 6..9 share keys with gold passages
    qpos = torch.tensor([[0], [1], [2], [3], [4]])
    loss_fn = ContrastiveLoss(temperature=0.05)

    model.zero_grad()
    q, p = model(qi, pi)
    plain = loss_fn(q, p, labels, qpos, keys)
    plain.backward()
    plain_grads = _grads(model)

    model.zero_grad()
    cached = CachedContrastiveLoss(loss_fn, chunk_size).step(
        lambda a, b: model(a, b), qi, pi, labels, question_positive_ids=qpos, passage_ids=keys
    )
    cached_grads = _grads(model)
    assert torch.allclose(plain.detach(), cached, atol=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and plain_grads
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], cached_grads[name], atol=1e-5, rtol=1e-4), name


def test_cached_loss_replays_dropout(tiny_tokenizer):
    """With dropout on, the re-run of each mini-batch draws the masks of its first run (RandContext)."""
    model = _Encoders(tiny_tokenizer, separate=False, dropout=0.3).train()
    qi, pi, labels = _inputs(tiny_tokenizer)
    loss_fn = ContrastiveLoss(temperature=0.05)
    calls = []

    def embed(a, b):
        q, p = model(a, b)
        calls.append((q.detach().clone(), p.detach().clone()))
        return q, p

    CachedContrastiveLoss(loss_fn, 10).step(embed, qi, pi, labels)  # one mini-batch
    (q1, p1), (q2, p2) = calls  # one mini-batch: first run without grad, then the re-run
    assert torch.equal(q1, q2) and torch.equal(p1, p2)


def test_rand_context_restores_state():
    ctx = RandContext()
    a = torch.rand(4)
    with ctx:
        b = torch.rand(4)
    c = torch.rand(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_repeated_passages_count_once():
    """The same passage twice in the batch (e.g. gathered from two processes) weighs as one column."""
    q = _vectors(2)
    p = _vectors(4, seed=5)
    labels = torch.tensor([0, 1])
    keys = torch.tensor([10, 11, 12, 13])
    loss_fn = ContrastiveLoss(temperature=0.05)
    once = loss_fn(q, p, labels, passage_ids=keys)
    twice = loss_fn(q, torch.cat([p, p[[2, 3, 1]]]), labels, passage_ids=torch.cat([keys, keys[[2, 3, 1]]]))
    assert torch.allclose(once, twice, atol=1e-6)
    assert torch.allclose(once, info_nce_loss(q, p, labels, temperature=0.05), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_label_log_probs_matches_log_softmax_gather_with_gradients(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    ref_logits = logits.detach().clone().requires_grad_()
    ref = (
        torch.log_softmax(ref_logits.to(torch.promote_types(dtype, torch.float32)), -1)
        .gather(-1, labels.clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
    )
    ref = ref * (labels != -100)
    got = label_log_probs(logits, labels)
    assert got.dtype == torch.promote_types(dtype, torch.float32) and got.shape == labels.shape
    assert torch.allclose(got, ref, atol=1e-6 if dtype != torch.bfloat16 else 1e-3)
    assert (got[labels == -100] == 0).all()
    weights = torch.randn(3, 5)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype != torch.bfloat16 else 2e-2
    assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=tol)
    assert (logits.grad[0, 3:] == 0).all()  # ignored positions get no gradient


def test_label_log_probs_gradcheck_and_shape_error():
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 6, -100, 0], [3, 3, 2, -100]])
    assert torch.autograd.gradcheck(lambda x: label_log_probs(x, labels), (logits,))
    with pytest.raises(RagInputError, match="labels shaped like logits"):
        label_log_probs(logits, labels[:, :3])

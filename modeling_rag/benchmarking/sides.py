"""The two sides of the benchmark, built from the same weights, and one callable per (phase, side).

"ours" is `RagForGeneration` over a `PassageIndex`; "theirs" is transformers' `RagTokenForGeneration`
/ `RagSequenceForGeneration` with its `RagRetriever` over a custom `datasets` index; "raw" is the
question-encoder forward plus a FAISS search. Ours drives only the package's public API.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable

import numpy as np
import torch

from .workload import Workload, load_questions


def build_modules(w: Workload):
    """The seeded question encoder (DPR) and generator (BART)."""
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    torch.manual_seed(w.settings.seed)
    dpr = DPRQuestionEncoder(w.q_config).eval()
    torch.manual_seed(w.settings.seed + 1)
    bart = BartForConditionalGeneration(w.g_config).eval()
    return dpr, bart


def spread_passage_vectors(w: Workload, dpr) -> None:
    """Removes from the passage vectors the direction that all questions share.

    A randomly initialised encoder maps every question to nearly the same vector, so against random
    passage vectors all questions would retrieve the same few passages. Projecting the passage
    vectors orthogonally to the mean question vector (of up to 256 questions) makes the ranking
    depend on what differs between questions, so retrieved passages (and their lengths) vary as
    with a trained encoder. Both indexes are built from these vectors afterwards.
    """
    questions, _ = load_questions(w.data_dir, 256)
    enc = w.qtok(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = dpr(enc["input_ids"], attention_mask=enc["attention_mask"])[0].float().numpy()
    mean = q.mean(axis=0)
    mean /= np.linalg.norm(mean)
    emb = w.embeddings - np.outer(w.embeddings @ mean, mean)
    w.embeddings = np.ascontiguousarray(emb / np.linalg.norm(emb, axis=1, keepdims=True), dtype=np.float32)


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (names without the DPR wrapper's or the mask wrapper's prefix)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.split("bert_model.")[-1].removeprefix("inner.").encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def answer_ids(gtok, answer: str, new_tokens: int) -> list[int]:
    """An answer's generator ids as training targets: the text (at most `new_tokens - 1` ids), then ``</s>``."""
    return list(gtok(answer.strip(), add_special_tokens=False)["input_ids"])[: new_tokens - 1] + [gtok.eos_token_id]


def build_ours(w: Workload, dpr, bart):
    """Our RagForGeneration over a PassageIndex, with DPR's BERT weights and its own copy of `bart`."""
    from transformers import BertConfig, BertModel

    from modeling_rag import RagConfig, RagForGeneration, RagTokenizer
    from modeling_rag.index import PassageIndex
    from modeling_rag.retrieval_rag import RagRetriever

    s = w.settings
    bert_cfg = BertConfig(**{k: v for k, v in w.q_config.to_dict().items() if k in BertConfig().to_dict()})
    bert = BertModel(bert_cfg, add_pooling_layer=False).eval()
    bert.load_state_dict(dpr.question_encoder.bert_model.state_dict())
    config = RagConfig.from_question_encoder_generator_configs(
        bert_cfg,
        w.g_config,
        n_docs=s.n_docs,
        question_pooling="cls",  # DPR's pooler_output is the [CLS] state (projection_dim=0)
        normalize_embeddings=False,
        similarity="ip",
        generation_mode="rag_token",
        sequence_decoding="thorough",  # the algorithm transformers implements
        max_input_tokens=s.max_combined_length,
        max_new_tokens=s.new_tokens,
        loss_reduction="sum",  # transformers' reduce_loss=True sums over the batch
        # transformers' input format: title / text // question (the tokenizer adds the spaces, see workload.py)
        prompt_template="{context} //{question}",
        passage_template="{title} /{text}",
        instruction="",
        use_chat_template=False,
    )
    # its own copy of the generator: one side's weights can be altered without touching the other's
    model = RagForGeneration(
        config, question_encoder=bert, generator=copy.deepcopy(bart), tokenizer=RagTokenizer(w.qtok, w.gtok)
    )
    model.eval()
    index = PassageIndex.build(w.embeddings, w.passages, metric="ip", kind="flat")
    model.set_retriever(RagRetriever(index), check_fingerprint=False)
    return model


def build_theirs(w: Workload, dpr, bart):
    """transformers' RagTokenForGeneration / RagSequenceForGeneration with a custom HF index."""
    import faiss
    from datasets import Dataset
    from transformers import RagConfig as HFRagConfig
    from transformers import RagRetriever as HFRagRetriever
    from transformers import RagSequenceForGeneration, RagTokenForGeneration
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    s = w.settings
    ds = Dataset.from_dict(
        {
            "title": [p["title"] for p in w.passages],
            "text": [p["text"] for p in w.passages],
            "embeddings": w.embeddings,
        }
    )
    ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(w.embeddings.shape[1]))
    config = HFRagConfig.from_question_encoder_generator_configs(
        w.q_config,
        w.g_config,
        n_docs=s.n_docs,
        max_combined_length=s.max_combined_length,
        retrieval_vector_size=w.embeddings.shape[1],
        index_name="custom",
        title_sep=" / ",
        doc_sep=" // ",
        do_deduplication=True,
    )
    retriever = HFRagRetriever(
        config,
        question_encoder_tokenizer=w.qtok,
        generator_tokenizer=w.gtok,
        index=CustomHFIndex(w.embeddings.shape[1], ds),
    )
    token = RagTokenForGeneration(config=config, question_encoder=dpr, generator=bart, retriever=retriever).eval()
    seq = RagSequenceForGeneration(config=config, question_encoder=dpr, generator=bart, retriever=retriever).eval()
    restore_context_mask(seq, w.gtok.pad_token_id)
    return token, seq, retriever


class _MaskedContextGenerator(torch.nn.Module):
    """The peer's generator, with the contexts' attention mask put back when `generate` is given none.

    transformers' `RagSequenceForGeneration.generate` calls `self.generator.generate(context_input_ids,
    attention_mask=None, ...)`: it decodes every document from its padded context with the padding
    attended (its rescoring forward does pass the mask). Once the output depends on the input, that
    yields other hypotheses than decoding the real tokens, so the two sides would not do the same
    work. The mask costs nothing to compute; everything else of the peer runs as it ships.
    """

    def __init__(self, generator: torch.nn.Module, pad_token_id: int):
        super().__init__()
        self.inner = generator
        self.pad_token_id = pad_token_id

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None and input_ids is not None:
            attention_mask = input_ids.ne(self.pad_token_id).long()
        return self.inner.generate(input_ids, attention_mask=attention_mask, **kwargs)


def restore_context_mask(model, pad_token_id: int) -> None:
    """Wraps `model.rag.generator` (a transformers RAG model) in `_MaskedContextGenerator`; the weights stay shared."""
    model.rag.generator = _MaskedContextGenerator(model.rag.generator, pad_token_id)


def grad_norm(module: torch.nn.Module) -> float:
    """The 2-norm of all of a module's gradients together."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class Sides:
    """Builds the sides and makes the callables that are timed (and checked) phase by phase.

    Args:
        workload: what both sides share.
        device, dtype: where and in which precision the models run.
        sides: which sides to build ("ours", "theirs"); a memory worker builds one.
    """

    def __init__(self, workload: Workload, device: str, dtype: torch.dtype, sides=("ours", "theirs")):
        import faiss

        self.w = w = workload
        self.s = w.settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.dpr, self.bart = build_modules(w)
        spread_passage_vectors(w, self.dpr)
        self.ours = build_ours(w, self.dpr, self.bart) if "ours" in sides else None
        self.passage_tokens_build_s = None
        if self.ours is not None:
            start = time.perf_counter()
            self.ours.store_passage_tokens(show_progress=False)  # what build_index does
            self.passage_tokens_build_s = time.perf_counter() - start
        self.t_token = self.t_seq = self.t_retriever = None
        if "theirs" in sides:
            self.t_token, self.t_seq, self.t_retriever = build_theirs(w, self.dpr, self.bart)
        for m in (self.dpr, self.bart, self.ours):
            if m is not None:
                m.to(self.device, dtype)
        self.raw_index = faiss.IndexFlatIP(w.embeddings.shape[1])
        self.raw_index.add(w.embeddings)
        gtok = w.gtok
        self.gen_ids = {
            "eos_token_id": gtok.eos_token_id,
            "pad_token_id": gtok.pad_token_id,
            "bos_token_id": gtok.bos_token_id,
            "decoder_start_token_id": gtok.eos_token_id,
        }

    def weights(self) -> dict[str, dict[str, str]]:
        """Weight fingerprints of every wrapped module, side by side."""
        out = {"seeded": {"question_encoder": fingerprint(self.dpr), "generator": fingerprint(self.bart)}}
        if self.ours is not None:
            out["ours"] = {
                "question_encoder": fingerprint(self.ours.question_encoder),
                "generator": fingerprint(self.ours.generator),
            }
        if self.t_token is not None:
            for name, model in (("theirs_token", self.t_token), ("theirs_sequence", self.t_seq)):
                out[name] = {
                    "question_encoder": fingerprint(model.question_encoder),
                    "generator": fingerprint(model.generator),
                }
        return out

    def q_inputs(self, questions):
        enc = self.w.qtok(questions, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def questions_of(self, phase: str) -> list[str]:
        return self.w.sequence_questions if phase == "rag_sequence" else self.w.questions

    # -- retrieval ---------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieval_ours(self):
        """Ours with an empty passage cache and the passage tokens stored with the index (a loaded model)."""
        self.ours.packer().clear_cache(templates=False)
        return self.retrieval_ours_warm()

    @torch.no_grad()
    def retrieval_ours_tokenising(self):
        """Ours without the passage tokens stored with the index: every passage is tokenised in the call."""
        retriever = self.ours.retriever
        stored, retriever.passage_tokens = retriever.passage_tokens, None
        try:
            return self.retrieval_ours()
        finally:
            retriever.passage_tokens = stored

    @torch.no_grad()
    def retrieval_ours_warm(self):
        # a RagBatch: the tensors, with the passages beside them (batch.passages)
        return self.ours.prepare_inputs(self.w.retrieval_questions, generation_mode="rag_token", for_generation=True)

    @torch.no_grad()
    def retrieval_theirs(self):
        ids, mask = self.q_inputs(self.w.retrieval_questions)
        hidden = self.dpr(ids, attention_mask=mask)[0]
        out = self.t_retriever(ids.cpu(), hidden.float().cpu().numpy(), n_docs=self.s.n_docs, return_tensors="pt")
        embeds = out["retrieved_doc_embeds"].to(hidden)
        out["doc_scores"] = torch.bmm(hidden.unsqueeze(1), embeds.transpose(1, 2)).squeeze(1)
        out["context_input_ids"] = out["context_input_ids"].to(self.device)
        out["context_attention_mask"] = out["context_attention_mask"].to(self.device)
        return out

    @torch.no_grad()
    def retrieval_raw(self, ids, mask):
        hidden = self.dpr(ids, attention_mask=mask)[0]
        return self.raw_index.search(hidden.float().cpu().numpy(), self.s.n_docs)

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def gen_ours(self, mode):
        self.ours.packer().clear_cache(templates=False)
        n = self.s.new_tokens
        return self.ours.generate(
            self.questions_of(mode),
            generation_mode=mode,
            max_new_tokens=n,
            min_new_tokens=n,
            num_beams=1,
            do_sample=False,
        )

    @torch.no_grad()
    def gen_theirs(self, mode):
        ids, mask = self.q_inputs(self.questions_of(mode))
        n = self.s.new_tokens
        model = self.t_token if mode == "rag_token" else self.t_seq
        # transformers' RAG generate ignores max_new_tokens: max_length counts the decoder start token
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            n_docs=self.s.n_docs,
            max_length=n + 1,
            min_length=n + 1,
            num_beams=1,
            do_sample=False,
            **self.gen_ids,
        )
        return out[:, 1:]

    @torch.no_grad()
    def distinct_hypotheses(self) -> list[int]:
        """Per RAG-Sequence question: how many distinct greedy hypotheses its documents produce.

        Measured through our public `generate`: asking RAG-Sequence for `n_docs` sequences returns every
        distinct hypothesis with a finite score (repeats get -inf). Both sides rescore exactly these.
        """
        n = self.s.new_tokens
        out = self.ours.generate(
            self.w.sequence_questions,
            generation_mode="rag_sequence",
            max_new_tokens=n,
            min_new_tokens=n,
            num_beams=1,
            do_sample=False,
            num_return_sequences=self.s.n_docs,
            return_dict_in_generate=True,
        )
        finite = torch.isfinite(out.sequences_scores).view(len(self.w.sequence_questions), -1)
        return [int(x) for x in finite.sum(-1).tolist()]

    # -- training ----------------------------------------------------------------------------------
    def train_ours(self):
        """Forward and backward of the RAG-Token loss; the gradients stay for `finish_train`."""
        model = self.ours
        model.train()
        model.packer().clear_cache(templates=False)
        out = model(questions=self.w.train_questions, answers=self.w.train_answers, generation_mode="rag_token")
        out.loss.backward()
        model.eval()
        return float(out.loss.detach())

    def train_theirs(self):
        model = self.t_token
        model.train()
        ids, mask = self.q_inputs(self.w.train_questions)
        start = self.w.gtok.eos_token_id  # the decoder start: transformers feeds the labels as decoder inputs
        rows = [[start] + answer_ids(self.w.gtok, a, self.s.new_tokens) for a in self.w.train_answers]
        width = max(len(r) for r in rows)
        labels = torch.tensor([r + [self.w.gtok.pad_token_id] * (width - len(r)) for r in rows], device=self.device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, n_docs=self.s.n_docs, reduce_loss=True)
        out.loss.backward()
        model.eval()
        return float(out.loss.detach())

    def finish_train(self, side: str, loss: float) -> dict:
        """After a timed step (untimed): the loss and gradient norms, then the gradients are cleared."""
        model = self.ours if side == "ours" else self.t_token
        out = {
            "loss": loss,
            "generator_grad_norm": grad_norm(model.generator),
            "question_encoder_grad_norm": grad_norm(model.question_encoder),
        }
        model.zero_grad(set_to_none=True)
        return out

    def callables(self, phase: str, side: str) -> Callable[[], object]:
        """The callable that runs `phase` once for `side` ("ours", "theirs", "raw", "ours_warm", ...)."""
        if phase == "retrieval":
            if side == "raw":
                ids, mask = self.q_inputs(self.w.retrieval_questions)
                return lambda: self.retrieval_raw(ids, mask)
            return {
                "ours": self.retrieval_ours,
                "ours_tokenising": self.retrieval_ours_tokenising,
                "ours_warm": self.retrieval_ours_warm,
                "theirs": self.retrieval_theirs,
            }[side]
        if phase in ("rag_token", "rag_sequence", "concat"):
            return (lambda: self.gen_ours(phase)) if side == "ours" else (lambda: self.gen_theirs(phase))
        if phase == "train":
            return self.train_ours if side == "ours" else self.train_theirs
        raise ValueError(f"unknown phase {phase!r}")

    def finisher(self, phase: str, side: str) -> Callable[[object], object] | None:
        """What runs, untimed, after each timed call of (phase, side)."""
        if phase == "train" and side in ("ours", "theirs"):
            return lambda loss: self.finish_train(side, loss)
        return None

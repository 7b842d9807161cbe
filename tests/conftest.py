"""Shared fixtures: every cache in a temp dir, no network, and tiny random models built here."""

import os
import socket
import tempfile

# Caches and the Hub endpoint must be set before huggingface_hub / transformers are imported.
_CACHE_ROOT = tempfile.mkdtemp(prefix="modeling_rag_test_cache_")
for _var, _sub in {
    "HF_HOME": "hf_home",
    "HF_HUB_CACHE": "hf_home/hub",
    "HF_DATASETS_CACHE": "hf_home/datasets",
    "HF_EVALUATE_CACHE": "hf_home/evaluate",
    "HF_MODULES_CACHE": "hf_home/modules",
    "MODELING_RAG_HOME": "modeling_rag_home",
}.items():
    os.environ[_var] = os.path.join(_CACHE_ROOT, _sub)
# Whatever the user's shell exports (HF_HUB_OFFLINE=1 as our model card advises, a real HF_TOKEN, a
# custom endpoint) must not reach the tests: the local Hub server needs online mode and its own tokens.
# huggingface_hub reads these once at import, so they are cleared here; `pytest_unconfigure` restores them.
_USER_ONLY_HUB_VARS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
)
_TEST_HUB_VARS = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_EVALUATE_CACHE")
_TEST_HUB_VARS += ("HF_MODULES_CACHE", "MODELING_RAG_HOME")
_USER_HUB_ENV = {name: os.environ.get(name) for name in _USER_ONLY_HUB_VARS + _TEST_HUB_VARS}
for _var in _USER_ONLY_HUB_VARS:
    os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# The small real data sets shipped in the repository (data/README.md gives source and license).
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The in-process Hub server (tests/hub_server.py) listens here; nothing reaches the real Hub.
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_unconfigure(config):
    """Gives the process back the Hub environment it had before the tests (for pytest.main callers)."""
    for name, value in _USER_HUB_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _online_hub_environment(monkeypatch):
    """Every test starts online against the local server, whatever an earlier test or the shell set.

    huggingface_hub keeps ``HF_HUB_OFFLINE`` as a constant read at import, so the constant is set with the
    variable; a test that wants offline mode sets both itself (monkeypatch restores them afterwards).
    """
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{HUB_PORT}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# A small fixed text that the tiny tokenizer is trained on: enough words for the toy tasks.
TOY_TEXTS = [
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Rollo was the Norse leader who agreed to swear fealty to King Charles III.",
    "Employees may work remotely up to three days a week with manager approval.",
    "Company phones are provided to staff who are on call; personal phones are not reimbursed.",
    "Expenses must be submitted within thirty days with receipts attached.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: Answer: Context: Title: Passage:",
    "what who where when why how is are was were the a an of to in on and or yes no",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024",
]


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in-process (any text encodes; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOY_TEXTS * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=512,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def tiny_question_encoder_config(tokenizer, hidden_size: int = 32):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_generator_config(kind: str, tokenizer, max_positions: int = 256):
    """Tiny random configs for each supported generator family."""
    from transformers import BartConfig, GPT2Config, LlamaConfig, T5Config

    v = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if kind == "gpt2":
        return GPT2Config(vocab_size=v, n_positions=max_positions, n_embd=32, n_layer=2, n_head=2, **ids)
    if kind == "llama":
        return LlamaConfig(
            vocab_size=v,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            **ids,
        )
    if kind == "bart":
        return BartConfig(
            vocab_size=v,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=max_positions,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=None,
            **ids,
        )
    if kind == "t5":
        return T5Config(
            vocab_size=v,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_question_encoder(tiny_tokenizer):
    """A 2-layer, 32-wide random BERT encoder (the context encoder too, unless a test says otherwise)."""
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_question_encoder_config(tiny_tokenizer)).eval()


GENERATOR_KINDS = ("gpt2", "llama", "bart", "t5")


@pytest.fixture
def fresh_accelerate_state():
    """Resets accelerate's singletons around a test that builds its own `Accelerator` in process (the
    training and evaluation scripts run in the test's process); use with `pytest.mark.usefixtures`."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A per-test folder for anything a test wants to keep out of the session caches."""
    monkeypatch.setenv("MODELING_RAG_HOME", str(tmp_path / "home"))
    return tmp_path


# A tiny corpus the tiny models can retrieve from (row order = ids used by tests).
TINY_PASSAGES = [
    {"id": "normans", "title": "Normans", "text": "Rollo was the Norse leader who gave his name to Normandy."},
    {"id": "france", "title": "France", "text": "The capital of France is Paris."},
    {"id": "italy", "title": "Italy", "text": "The capital of Italy is Rome."},
    {"id": "remote", "title": "Remote work", "text": "Employees may work remotely up to three days a week."},
    {"id": "phones", "title": "Phones", "text": "Company phones are provided to staff who are on call."},
    {"id": "expenses", "title": "Expenses", "text": "Expenses must be submitted within thirty days."},
]


def make_tiny_rag(kind: str = "gpt2", mode: str = "concat", seed: int = 0, **config_kwargs):
    """A tiny random RagForGeneration (BERT question encoder + `kind` generator) with tokenizers."""
    from modeling_rag import RagConfig, RagForGeneration, RagTokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config_kwargs.setdefault("max_new_tokens", 8)
    config_kwargs.setdefault("use_chat_template", False)
    config = RagConfig.from_question_encoder_generator_configs(
        tiny_question_encoder_config(tok), tiny_generator_config(kind, tok), generation_mode=mode, **config_kwargs
    )
    return RagForGeneration(config, tokenizer=RagTokenizer(tok, tok)).eval()


@pytest.fixture
def tiny_rag_factory():
    return make_tiny_rag


# --- local Hub server ---
# An in-process Hub (tests/hub_server.py) on HUB_PORT, which HF_ENDPOINT above points at.
# Tokens: HUB_TOKEN may write; HUB_READ_TOKEN may only read (a write gets 403).
HUB_TOKEN = "hf_test_token"
HUB_READ_TOKEN = "hf_read_only_token"


def tiny_cross_encoder(tok, seed=0):
    """A 1-label BERT sequence classifier: the cross-encoder of a tiny reranker."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_question_encoder_config(tok)
    config.num_labels = 1
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def reranker():
    """A tiny float cross-encoder reranker (batches of 4 pairs)."""
    from modeling_rag.reranker import CrossEncoderReranker, RerankerSpeedOptions

    tok = build_tiny_tokenizer()
    return CrossEncoderReranker(
        tiny_cross_encoder(tok), tok, max_length=64, speed=RerankerSpeedOptions(batch_size=4, int8=False)
    )


def tiny_rag_with_reranker(tmp_path, **config):
    """A tiny model (2 passages of 4 first-stage candidates) with an index over `TINY_PASSAGES`, no reranker yet."""
    import json

    model = make_tiny_rag("gpt2", n_docs=2, n_candidates=4, **config)
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model.build_index(str(corpus), show_progress=False)
    return model


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The local Hub server for the whole session (``.url``, ``.store``, ``.corrupt_file(...)``).

    Repos persist across tests: give each test its own repo names (e.g. with ``uuid4().hex[:8]``).
    """
    from hub_server import start_hub_server

    server = start_hub_server(
        tmp_path_factory.mktemp("hub_server"), port=HUB_PORT, tokens=(HUB_TOKEN,), read_tokens=(HUB_READ_TOKEN,)
    )
    assert os.environ["HF_ENDPOINT"] == server.url
    yield server
    server.shutdown()


@pytest.fixture
def hub_token(hub_server):
    """A token with write access on ``hub_server``."""
    return HUB_TOKEN


@pytest.fixture
def fresh_hf_cache(tmp_path, monkeypatch):
    """An empty Hub cache for this test; returns its path (``HF_HUB_CACHE``).

    huggingface_hub copies ``HF_HOME`` / ``HF_HUB_CACHE`` into ``huggingface_hub.constants`` at import,
    so setting the variables is not enough: the constants are patched too (``snapshot_download``,
    ``hf_hub_download`` and transformers read ``constants.HF_HUB_CACHE`` at call time). Passing
    ``cache_dir=fresh_hf_cache`` explicitly works as well.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return str(cache)


@pytest.fixture(autouse=True)
def _restore_library_output():
    """A script's main() sets process-wide output switches (`configure_script_output`): put them back after."""
    import logging

    from transformers.utils import logging as hf_logging

    from modeling_rag import library_output

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    shown, ours = library_output.library_output_shown(), logging.getLogger("modeling_rag").level
    noisy = {name: logging.getLogger(name).level for name in library_output.NOISY_LOGGERS}
    yield
    hf_logging.set_verbosity(verbosity)
    if hf_logging.is_progress_bar_enabled() != bars:
        import warnings

        with warnings.catch_warnings():  # the Hub's switch warns that HF_HUB_DISABLE_PROGRESS_BARS has priority
            warnings.simplefilter("ignore")
            if bars:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()
    library_output.show_library_output(shown)
    logging.getLogger("modeling_rag").setLevel(ours)
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).removeFilter(library_output.QUIET_FILTER)

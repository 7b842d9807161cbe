"""The training scripts on tiny models: recipes, loss, checkpoint + exact resume, 2 processes, bad data."""

import glob
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import TINY_PASSAGES, make_tiny_rag
from safetensors.torch import load_file

from modeling_rag.errors import DataFormatError, RagConfigError, RagInputError
from modeling_rag.training import build_parser, load_training_examples, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml")))
ACCELERATE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")))
SCRIPTS = {
    "retriever": "train_retriever.py",
    "generator": "train_generator.py",
    "rag": "train_rag.py",
    "reranker": "train_reranker.py",
    "reader": "train_generator.py",  # the shipped reader's recipe
}

QUESTIONS = [
    ("Who was the Norse leader?", "Rollo", "normans"),
    ("What is the capital of France?", "Paris", "france"),
    ("What is the capital of Italy?", "Rome", "italy"),
    ("How many days may employees work remotely?", "three days", "remote"),
    ("Who gets company phones?", "staff who are on call", "phones"),
    ("When must expenses be submitted?", "within thirty days", "expenses"),
    ("Which region did Rollo give his name to?", "Normandy", "normans"),
    ("Which city is the capital of France?", "Paris", "france"),
]


def _script(name):
    path = os.path.join(ROOT, "scripts", SCRIPTS[name])
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# each in-process run builds its own Accelerator
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny RAG model (dropout off, so runs are exactly comparable) with an index, plus data files."""
    root = tmp_path_factory.mktemp("tiny_training")
    model = make_tiny_rag("gpt2")
    qc = model.config.question_encoder
    qc.hidden_dropout_prob = qc.attention_probs_dropout_prob = 0.0
    for m in model.question_encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    corpus = _write_jsonl(root / "passages.jsonl", TINY_PASSAGES)
    model.build_index(corpus, show_progress=False)
    model.save_pretrained(root / "model")
    rows = [{"question": q, "answers": [a], "positive_passage_ids": [p]} for q, a, p in QUESTIONS]
    return {
        "root": root,
        "model": str(root / "model"),
        "corpus": corpus,
        "train": _write_jsonl(root / "train.jsonl", rows),
        "dev": _write_jsonl(root / "dev.jsonl", rows[:4]),
    }


def _losses(output_dir):
    with open(os.path.join(output_dir, "train_log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _question_encoder_weights(folder):
    return {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items() if "question_encoder" in k}


# --- recipes -------------------------------------------------------------------------------------
def test_every_train_recipe_exists():
    assert {os.path.basename(p) for p in TRAIN_CONFIGS} >= {"retriever.yaml", "generator.yaml", "rag.yaml"}


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=os.path.basename)
def test_recipe_drives_its_script(config, tiny, tmp_path):
    """Each YAML recipe parses with its script and trains a few steps on the tiny model."""
    name = os.path.splitext(os.path.basename(config))[0]
    script = _script(name)
    args = parse_args(script.get_parser(), ["--config", config])
    assert args.train_file and args.output_dir  # the recipe names real data
    out = tmp_path / "out"
    argv = [
        "--config",
        config,
        "--model",
        tiny["model"],
        "--corpus",
        tiny["corpus"],
        "--train-file",
        tiny["train"],
        "--dev-file",
        tiny["dev"],
        "--output-dir",
        str(out),
        "--cpu",
        "--batch-size",
        "2",
        "--gradient-accumulation-steps",
        "1",
        "--max-train-steps",
        "2",
        "--checkpointing-steps",
        "2",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
    ]
    if name in ("generator", "reader"):
        argv += ["--retrieval-cache", str(tmp_path / "retrieval.json"), "--eval-max-new-tokens", "3"]
    if name == "reader":
        unanswerable = [{"question": "Who was the king of Italy?", "answers": [], "asked_about_passage_id": "italy"}]
        argv += ["--unanswerable-file", _write_jsonl(tmp_path / "u.jsonl", unanswerable)]
        argv += ["--save-adapter", str(tmp_path / "adapter"), "--lora-r", "4", "--max-dev-examples", "2"]
    if name == "rag":
        argv += ["--eval-max-new-tokens", "3", "--max-dev-examples", "2"]
    result = script.main(argv)
    assert [s for s, _ in _losses(out)] == [1, 2]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in _losses(out))
    assert any(k.startswith("eval_") for h in result["history"] for k in h)
    assert os.path.isdir(out / "checkpoints" / "step_2")
    assert not glob.glob(str(out / "checkpoints" / ".tmp-*"))
    from modeling_rag import RagForGeneration

    saved = RagForGeneration.from_pretrained(out / "final")  # index included and verified
    assert saved.retriever is not None
    if name in ("generator", "reader"):
        assert saved.config.n_docs == 3 and os.path.isfile(tmp_path / "retrieval.json")
    if name == "reader":
        from modeling_rag.readers import read_reader_config

        assert read_reader_config(tmp_path / "adapter")["settings"]["n_docs"] == 3
    if name == "rag":
        assert saved.config.generation_mode == "rag_sequence"


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=os.path.basename)
def test_recipe_finds_its_data_from_any_working_directory(config, tmp_path, monkeypatch):
    """A recipe's relative data paths are read from the recipe's folder, not the working directory."""
    from modeling_rag.corpus import read_corpus

    monkeypatch.chdir(tmp_path)
    name = os.path.splitext(os.path.basename(config))[0]
    args = parse_args(_script(name).get_parser(), ["--config", os.path.relpath(config, tmp_path)])
    for key in ("corpus", "train_file", "dev_file") + (("unanswerable_file",) if name == "reader" else ()):
        assert os.path.isabs(getattr(args, key)) and os.path.isfile(getattr(args, key)), key
        assert os.path.commonpath([getattr(args, key), ROOT]) == ROOT  # the repository's own data
    passage_ids = {doc.id for doc in read_corpus(args.corpus)}
    assert len(load_training_examples(args.train_file, known_passage_ids=passage_ids)) > 100
    assert len(load_training_examples(args.dev_file, known_passage_ids=passage_ids)) > 50
    assert args.output_dir and not os.path.isabs(args.output_dir)  # outputs stay where the user runs


def test_recipe_with_a_missing_data_file_names_the_option(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train_file: train.jsonl\ndev_file: missing/dev.jsonl\n")
    args = parse_args(build_parser("t"), ["--config", str(recipe), "--dev-file", str(tmp_path / "train.jsonl")])
    assert args.train_file == str(tmp_path / "train.jsonl")  # relative to the recipe, not to the cwd
    with pytest.raises(RagConfigError, match=r"dev_file: .*missing/dev.jsonl does not exist.*--dev-file"):
        parse_args(build_parser("t"), ["--config", str(recipe)])


def test_precedence_defaults_yaml_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning-rate: 0.5\nbatch_size: 3\ncheckpointing_steps: 7\ncpu: true\n")
    parser = build_parser("t")
    args = parse_args(parser, ["--config", str(recipe), "--batch-size", "5"])
    assert args.learning_rate == 0.5  # YAML beats the default
    assert args.batch_size == 5  # the command line beats YAML
    assert args.checkpointing_steps == "7" and args.cpu is True
    assert parse_args(build_parser("t"), []).learning_rate == 2e-5  # the default


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat: 0.1\n", "did you mean 'learning_rate'"),
        ("batch_size: many\n", "must be int"),
        ("cpu: 1\n", "true or false"),
        ("lr_scheduler: sideways\n", "must be one of"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(RagConfigError, match=message):
        parse_args(build_parser("t"), ["--config", str(recipe)])


def test_every_accelerate_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {os.path.basename(p) for p in ACCELERATE_CONFIGS}
    assert names >= {"single_cpu.yaml", "two_cpu_processes.yaml", "multi_gpu.yaml", "fsdp.yaml"}
    for path in ACCELERATE_CONFIGS:
        cfg = load_config_from_file(path)
        assert cfg.num_processes >= 1
        if os.path.basename(path) == "two_cpu_processes.yaml":
            assert cfg.num_processes == 2 and cfg.use_cpu


# --- training behaviour ----------------------------------------------------------------------------
def _retriever_argv(tiny, out, *extra):
    return [
        "--model",
        tiny["model"],
        "--train-file",
        tiny["train"],
        "--output-dir",
        str(out),
        "--cpu",
        "--batch-size",
        "2",
        "--num-epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--mined-hard-negatives",
        "1",
        "--checkpointing-steps",
        "3",
        "--save-dtype",
        "float32",
        *extra,
    ]


def test_loss_falls_and_resume_is_exact(tiny, tmp_path):
    """A run stopped after 5 steps and resumed gives the losses and weights of an uninterrupted run."""
    script = _script("retriever")
    full = tmp_path / "full"
    script.main(_retriever_argv(tiny, full))
    losses = [loss for _, loss in _losses(full)]
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2])  # the loss falls

    part = tmp_path / "part"
    first = script.main(_retriever_argv(tiny, part, "--stop-after-steps", "5"))
    assert first["stopped_early"]
    assert sorted(os.listdir(part / "checkpoints")) == ["step_3", "step_5"]
    assert not os.path.exists(part / "final")
    script.main(_retriever_argv(tiny, part, "--resume-from-checkpoint", "latest"))
    resumed = _losses(part)
    assert [s for s, _ in resumed] == list(range(1, 9))
    assert torch.allclose(torch.tensor([x for _, x in resumed]), torch.tensor(losses), atol=1e-5)
    a, b = _question_encoder_weights(full / "final"), _question_encoder_weights(part / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_question_side_only_keeps_the_index(tiny, tmp_path):
    from modeling_rag import RagForGeneration

    out = tmp_path / "qso"
    _script("retriever").main(
        _retriever_argv(tiny, out, "--question-side-only", "--gradient-cache-chunk-size", "1", "--max-train-steps", "2")
        + ["--with-tracking", "--report-to", "jsonl"]
    )
    base = RagForGeneration.from_pretrained(tiny["model"])
    saved = RagForGeneration.from_pretrained(out / "final")  # verifies the index fingerprint
    assert saved.config.context_encoder is not None and saved.context_encoder is not None
    base_q = base.question_encoder.state_dict()
    for k, v in saved.context_encoder.state_dict().items():
        assert torch.equal(v, base_q[k]), k  # passages: the original encoder
    assert any(not torch.equal(v, base_q[k]) for k, v in saved.question_encoder.state_dict().items())
    with (
        open(os.path.join(tiny["model"], "index", "index.faiss"), "rb") as f1,
        open(out / "final" / "index" / "index.faiss", "rb") as f2,
    ):
        assert f1.read() == f2.read()  # the same index vectors
    tracked = glob.glob(str(out / "tracking" / "*.jsonl"))
    assert tracked and "loss" in open(tracked[0]).read()


@pytest.mark.multiprocess
def test_two_processes_match_one(tiny, tmp_path):
    """2 gloo processes with per-process batch 2 = 1 process with batch 4: same losses and weights."""
    script = _script("retriever")
    common = ["--num-epochs", "2", "--checkpointing-steps", "100"]
    one = tmp_path / "one"
    script.main(_retriever_argv(tiny, one, "--batch-size", "4", *common))
    two = tmp_path / "two"
    # this checkout's package first (not an installed copy), then the tests' helpers
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.path.join(ROOT, "tests")]))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "configs", "accelerate", "two_cpu_processes.yaml"),
        "--main_process_port",
        str(_free_port()),
        os.path.join(ROOT, "scripts", "train_retriever.py"),
        *_retriever_argv(tiny, two, "--batch-size", "2", *common),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    # 4 steps of 2 x 2 questions: two processes really ran (one would have taken 8 steps of 2)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    assert torch.allclose(torch.tensor([x for _, x in l1]), torch.tensor([x for _, x in l2]), atol=1e-4)
    a, b = _question_encoder_weights(one / "final"), _question_encoder_weights(two / "final")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- bad data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"answers": ["x"]}], "has no question"),
        ([{"question": "q?"}], "has no answers"),
        ([{"question": "q?", "answers": ["x"], "positive_passage_ids": ["nowhere"]}], "not in the corpus"),
        ([{"question": "q?", "answers": ["x"], "hard_negative_passage_ids": ["ghost"]}], "not in the corpus"),
    ],
)
def test_bad_rows(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError, match=message):
        load_training_examples(path, known_passage_ids=[p["id"] for p in TINY_PASSAGES])


def test_empty_file_and_dataset_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match="empty"):
        load_training_examples(str(empty))
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q?", "answers": ["a"], "positive_passage_ids": ["france"]}])
    assert load_training_examples(ds)[0].positive_passage_ids == ["france"]
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_training_examples(str(tmp_path / "ds"))[0].answers == ["a"]


def test_scripts_report_bad_data(tiny, tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?", "answers": ["a"], "positive_passage_ids": ["zz"]}])
    with pytest.raises(DataFormatError, match="not in the corpus"):
        _script("retriever").main(_retriever_argv(tiny, tmp_path / "o", "--train-file", bad))
    with pytest.raises(RagConfigError, match="--train-file"):
        _script("generator").main(["--model", tiny["model"], "--cpu", "--output-dir", str(tmp_path / "g")])


# --- SIGKILL at any point, then resume ------------------------------------------------------------
def _run_killed(work, kill) -> bool:
    """Runs `work()` in a forked child after `kill()` armed its SIGKILL; returns whether it was killed."""
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            kill()
            work()
        except BaseException:
            import traceback

            traceback.print_exc()
            raise
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def _kill_at_call(owner, name: str, n: int):
    """Arms a SIGKILL of this process at the n-th call of `owner.<name>`."""
    real = getattr(owner, name)
    count = [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return lambda: setattr(owner, name, patched)


def _kill_after(seconds: float):
    return lambda: threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL)).start()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_anywhere_then_resume_ends_with_the_uninterrupted_weights(tiny, tmp_path):
    """Kill points: mid-step, while accelerate writes a checkpoint (torch.save), at every kind of rename
    (checkpoint commit, trainer state, the log rewrite, the final save_pretrained), and at random times.
    Each time, `--resume-from-checkpoint latest` ends with the same losses and weights as a run never killed."""
    script = _script("retriever")
    extra = ("--checkpointing-steps", "2", "--checkpoints-total-limit", "2")
    full = tmp_path / "full"
    script.main(_retriever_argv(tiny, full, *extra))
    t0 = time.time()  # how long a (warm) run takes in a child: the range of the random kill times
    assert not _run_killed(lambda: script.main(_retriever_argv(tiny, tmp_path / "timed", *extra)), lambda: None)
    duration = time.time() - t0
    want_losses = torch.tensor([x for _, x in _losses(full)])
    want = _question_encoder_weights(full / "final")

    rng = random.Random(0)
    kill_points = {
        "optimizer step 3": _kill_at_call(torch.optim.AdamW, "step", 3),
        "optimizer step 6": _kill_at_call(torch.optim.AdamW, "step", 6),
        "torch.save 2 (checkpoint step_2)": _kill_at_call(torch, "save", 2),
        "torch.save 7 (checkpoint step_4)": _kill_at_call(torch, "save", 7),
        **{f"os.replace {n}": _kill_at_call(os, "replace", n) for n in (1, 2, 4, 7, 10)},
        **{f"after {d:.2f}s": _kill_after(d) for d in (rng.uniform(0.02, 0.95 * duration) for _ in range(4))},
    }
    outcomes = {}
    for i, (name, kill) in enumerate(kill_points.items()):
        out = tmp_path / f"killed{i}"
        killed = _run_killed(lambda out=out: script.main(_retriever_argv(tiny, out, *extra)), kill)
        for ckpt in glob.glob(str(out / "checkpoints" / "step_*")):  # only complete checkpoints carry the name
            assert os.path.isfile(os.path.join(ckpt, "trainer_state.json")), (name, ckpt)
        script.main(_retriever_argv(tiny, out, *extra, "--resume-from-checkpoint", "latest"))
        got = _losses(out)
        assert [s for s, _ in got] == list(range(1, len(want_losses) + 1)), name
        assert torch.allclose(torch.tensor([x for _, x in got]), want_losses, atol=1e-5), name
        weights = _question_encoder_weights(out / "final")
        assert weights.keys() == want.keys()
        for k in want:
            assert torch.allclose(weights[k], want[k], atol=1e-6), (name, k)
        outcomes[name] = killed
    print("training kill points (killed?)", outcomes)
    assert sum(outcomes.values()) >= 10  # nearly every point really interrupted the run


def test_resume_loads_only_weights_only_files_and_refuses_foreign_folders(tiny, tmp_path, monkeypatch):
    script = _script("retriever")
    out = tmp_path / "run"
    script.main(_retriever_argv(tiny, out, "--stop-after-steps", "3"))
    ckpt = out / "checkpoints" / "step_3"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
    assert not glob.glob(str(ckpt / "custom_checkpoint_*"))  # no unrestricted pickle in our checkpoints
    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    script.main(_retriever_argv(tiny, out, "--resume-from-checkpoint", str(ckpt)))
    assert calls and all(w is True for w in calls), calls  # optimizer, scheduler, sampler, RNG states
    monkeypatch.undo()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "random_states_0.pkl").write_bytes(b"\x80\x04not ours")
    with pytest.raises(RagConfigError, match="not a complete checkpoint"):
        script.main(_retriever_argv(tiny, tmp_path / "other", "--resume-from-checkpoint", str(foreign)))
    (foreign / "trainer_state.json").write_text('{"global_step": -1, "epoch": 0, "batches_in_epoch": 0}')
    with pytest.raises(RagConfigError, match="damaged"):
        script.main(_retriever_argv(tiny, tmp_path / "other", "--resume-from-checkpoint", str(foreign)))


def test_train_rag_retriever_learning_rate_applies_to_the_encoder_only(tiny, tmp_path):
    """--retriever-learning-rate gives the question encoder its own rate; the generator keeps --learning-rate."""
    script = _script("rag")
    base = ["--model", tiny["model"], "--train-file", tiny["train"], "--cpu", "--batch-size", "2"]
    base += [
        "--max-train-steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--save-dtype",
        "float32",
    ]
    start = load_file(os.path.join(tiny["model"], "model.safetensors"))

    def moved(folder, part):
        end = load_file(os.path.join(folder, "final", "model.safetensors"))
        return max(float((end[k].float() - start[k].float()).abs().max()) for k in end if k.startswith(part))

    script.main(base + ["--output-dir", str(tmp_path / "same")])
    script.main(base + ["--output-dir", str(tmp_path / "slow"), "--retriever-learning-rate", "1e-9"])
    logged = [json.loads(line) for line in open(tmp_path / "slow" / "train_log.jsonl")]
    assert [r["lr"] for r in logged if "lr" in r] == [1e-3, 1e-3]  # the log shows --learning-rate
    assert moved(tmp_path / "same", "question_encoder.") > 1e-4
    assert moved(tmp_path / "slow", "question_encoder.") < 1e-7  # Adam's step is about the rate: 2 x 1e-9
    assert moved(tmp_path / "slow", "generator.") > 1e-4
    with pytest.raises(RagInputError, match="--retriever-learning-rate"):
        script.main(base + ["--output-dir", str(tmp_path / "bad"), "--retriever-learning-rate", "0"])


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_gradient_checkpointing_switch_keeps_loss_and_gradients(kind):
    """--gradient-checkpointing (non-reentrant, recomputing layers in the backward) changes memory, not results."""
    from modeling_rag.training import enable_gradient_checkpointing

    def step(checkpointing):
        model = make_tiny_rag(kind, "rag_token").train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            enable_gradient_checkpointing(model.generator, model.question_encoder)
            assert model.generator.is_activation_checkpointing
        passages = [[TINY_PASSAGES[0], TINY_PASSAGES[1]], [TINY_PASSAGES[2], TINY_PASSAGES[3]]]
        batch = model.prepare_inputs(
            ["Who?", "Where is Rome?"], ["Rollo", "Italy"], passages=passages, doc_scores=[[1.0, 0.0], [0.5, 0.2]]
        )
        out = model(**batch)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(False)
    loss_c, grads_c = step(True)
    assert torch.allclose(loss, loss_c, atol=1e-6)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_c[name], atol=1e-6), name


def test_a_checkpoint_pruned_when_the_run_dies_is_not_taken_for_a_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint out of the `step_*` names before deleting it: a run killed while deleting
    leaves a hidden folder, never a half-deleted `step_N` that resume would pick."""
    import shutil

    import modeling_rag.training.trainer as trainer

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text("{}")
        (root / f"step_{step}" / "model.safetensors").write_text("weights")
    real = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        if os.path.basename(path).startswith(".old-") and os.path.exists(path):
            os.remove(os.path.join(path, "trainer_state.json"))
            raise KeyboardInterrupt  # the process dies with the folder half deleted
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trainer.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer._discard(str(root / "step_2"))
    assert trainer.list_checkpoints(str(tmp_path)) == [str(root / "step_4")]


def test_generator_trains_a_reader_on_unanswerable_questions_and_saves_its_adapter(tiny, tmp_path):
    """Unanswerable questions are trained towards the no-answer response; the adapter is saved as a reader."""
    unanswerable = _write_jsonl(
        tmp_path / "unanswerable.jsonl",
        [
            {"question": "Who was the king of Italy?", "answers": [], "asked_about_passage_id": "italy"},
            {"question": "How many phones are there?", "answers": [], "asked_about_passage_id": "phones"},
        ],
    )
    out = tmp_path / "out"
    result = _script("generator").main(
        [
            *("--model", tiny["model"], "--train-file", tiny["train"], "--output-dir", str(out), "--cpu"),
            *("--unanswerable-file", unanswerable, "--include-gold-passage", "--no-answer-text", "No idea."),
            *("--unanswerable-repeat", "2"),
            *("--lora", "--lora-r", "4", "--save-adapter", str(tmp_path / "reader"), "--batch-size", "5"),
            *("--max-train-steps", "2", "--logging-steps", "1", "--n-docs", "2"),
        ]
    )
    assert [s for s, _ in _losses(out)] == [1, 2] and "history" in result
    from modeling_rag.readers import read_reader_config

    config = read_reader_config(tmp_path / "reader")
    assert config["settings"]["no_answer_text"] == "No idea." and config["settings"]["n_docs"] == 2
    # --unanswerable-repeat 2: each of the 2 unanswerable questions is in the training set twice
    assert config["notes"]["answerable_questions"] == len(QUESTIONS) and config["notes"]["unanswerable_questions"] == 4
    from modeling_rag import RagForGeneration

    saved = RagForGeneration.from_pretrained(out / "final")
    assert saved.config.no_answer_text == "No idea."
    with pytest.raises(RagConfigError, match="--lora"):
        _script("generator").main(
            ["--model", tiny["model"], "--train-file", tiny["train"], "--output-dir", str(tmp_path / "x")]
            + ["--save-adapter", str(tmp_path / "r2"), "--cpu"]
        )
    with pytest.raises(RagInputError, match="--unanswerable-repeat must be a positive integer"):
        _script("generator").main(
            ["--model", tiny["model"], "--train-file", tiny["train"], "--output-dir", str(tmp_path / "y"), "--cpu"]
            + ["--unanswerable-file", unanswerable, "--unanswerable-repeat", "0"]
        )


def test_generator_continues_a_saved_reader_with_init_reader(tiny, tmp_path):
    """--init-reader trains the saved adapter further (same tensors, moved a little) and keeps its settings."""
    from safetensors.torch import load_file

    from modeling_rag.readers import read_reader_config

    common = ["--model", tiny["model"], "--train-file", tiny["train"], "--cpu", "--lora", "--lora-r", "4"]
    common += ["--batch-size", "5", "--logging-steps", "1", "--no-save"]
    _script("generator").main(
        [*common, "--output-dir", str(tmp_path / "a"), "--save-adapter", str(tmp_path / "first")]
        + ["--max-train-steps", "2", "--n-docs", "2", "--no-answer-text", "No idea.", "--learning-rate", "1e-2"]
    )
    _script("generator").main(
        [*common, "--output-dir", str(tmp_path / "b"), "--save-adapter", str(tmp_path / "second")]
        + ["--max-train-steps", "1", "--init-reader", str(tmp_path / "first"), "--learning-rate", "1e-3"]
    )
    first = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "second" / "adapter_model.safetensors"))
    assert set(first) == set(second)
    moved = [k for k in first if not torch.equal(first[k], second[k])]
    assert moved  # it trained
    b = [k for k in first if "lora_B" in k]
    # continued from the first adapter's B (trained away from zero), not from a fresh, zero B
    assert all(first[k].abs().sum() > 0 for k in b)
    assert sum(float((second[k].float() - first[k].float()).norm()) for k in b) < 0.5 * sum(
        float(first[k].float().norm()) for k in b
    )
    settings = read_reader_config(tmp_path / "second")["settings"]
    assert settings["n_docs"] == 2 and settings["no_answer_text"] == "No idea."  # the first reader's settings
    with pytest.raises(RagConfigError, match="--init-reader continues a LoRA reader"):
        _script("generator").main(
            ["--model", tiny["model"], "--train-file", tiny["train"], "--output-dir", str(tmp_path / "x"), "--cpu"]
            + ["--init-reader", str(tmp_path / "first")]
        )

import pytest
import torch
from conftest import TINY_PASSAGES, build_tiny_tokenizer, make_tiny_rag, tiny_question_encoder_config
from transformers import AutoConfig, AutoModel, BertModel, GenerationMixin

from modeling_rag import RagConfig, RagConfigError, RagForGeneration, RagInputError, RagSpeedOptions, RagTokenizer
from modeling_rag.inputs import answer_ids
from modeling_rag.modes import RagTokenState
from modeling_rag.speedups.length_groups import length_chunks, length_groups

KINDS = ("gpt2", "llama", "bart", "t5")
MODES = ("concat", "rag_sequence", "rag_token")
QUESTIONS = ["Who was the Norse leader?", "What is the capital of France?"]
ANSWERS = ["Rollo", "Paris"]
PASSAGES = [
    [TINY_PASSAGES[0], TINY_PASSAGES[1], TINY_PASSAGES[3]],
    [TINY_PASSAGES[1], TINY_PASSAGES[2], TINY_PASSAGES[4]],
]
SCORES = [[2.0, 0.5, -1.0], [1.5, 1.0, 0.0]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_save_load_gives_identical_logits_and_generations(tmp_path, kind, mode):
    model = make_tiny_rag(kind, mode)
    with torch.no_grad():
        before = model(questions=QUESTIONS, answers=ANSWERS, passages=PASSAGES, doc_scores=SCORES)
    gen_before = model.generate(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, max_new_tokens=6)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert (tmp_path / "saved" / "question_encoder_tokenizer").is_dir()
    assert (tmp_path / "saved" / "generator_tokenizer").is_dir()
    assert str(tmp_path) not in (tmp_path / "saved" / "config.json").read_text()
    loaded = RagForGeneration.from_pretrained(tmp_path / "saved").eval()
    assert loaded.tokenizer is not None
    with torch.no_grad():
        after = loaded(questions=QUESTIONS, answers=ANSWERS, passages=PASSAGES, doc_scores=SCORES)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.loss, before.loss)
    gen_after = loaded.generate(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, max_new_tokens=6)
    assert torch.equal(gen_after, gen_before)


def test_auto_classes_load_a_saved_model(tmp_path):
    model = make_tiny_rag("gpt2")
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RagConfig)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, RagForGeneration)
    for (name, a), (_, b) in zip(model.state_dict().items(), auto.state_dict().items()):
        assert torch.equal(a, b), name


def test_is_a_pretrained_model_with_generation_mixin():
    model = make_tiny_rag("gpt2")
    assert isinstance(model, GenerationMixin)
    mro = type(model).__mro__
    assert mro.index(GenerationMixin) > mro.index(type(model).__mro__[1])
    assert model.config_class is RagConfig and model.base_model_prefix == "rag"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains(kind, mode):
    model = make_tiny_rag(kind, mode).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = model.prepare_inputs(QUESTIONS, ANSWERS, passages=PASSAGES, doc_scores=SCORES)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_training_logits_only_at_answer_positions_give_the_same_loss_and_gradients(kind, mode):
    model = make_tiny_rag(kind, mode).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = model.prepare_inputs(QUESTIONS, ANSWERS, passages=PASSAGES, doc_scores=SCORES)

    def loss_and_grads(speed=None):
        model.zero_grad()
        out = model(**batch, speed_options=speed)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.generator.named_parameters() if p.grad is not None}
        return out, grads

    kept, kept_grads = loss_and_grads()
    answer_tokens = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert kept.logits.shape[1] == answer_tokens < batch["context_input_ids"].shape[1]
    full, full_grads = loss_and_grads(RagSpeedOptions(answer_logits_only=False))
    assert full.logits.shape[1] == batch["context_input_ids"].shape[1]
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert kept_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["bart", "t5"])
@pytest.mark.parametrize("mode", MODES)
def test_length_sorted_chunks_give_the_same_loss_gradients_and_generations(kind, mode):
    """Encoder-decoder contexts run in length-sorted chunks trimmed to their own length (training, and
    decoding in length groups): the results equal one padded batch."""
    model = make_tiny_rag(kind, mode).eval()  # no dropout (BART's is functional); gradients still flow
    questions = QUESTIONS + ["Rome?", "Which leader gave his name to a region of France, and when?"]
    answers = ANSWERS + ["Italy", "Rollo"]
    passages = PASSAGES + [[TINY_PASSAGES[2], TINY_PASSAGES[0], TINY_PASSAGES[1]]] * 2
    scores = SCORES + [[0.3, 0.2, 0.1], [1.0, 2.0, 3.0]]
    batch = model.prepare_inputs(questions, answers, passages=passages, doc_scores=scores)
    lengths = batch["context_attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # padding that chunking can skip

    def run(speed):
        model.zero_grad()
        out = model(**batch, speed_options=speed)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.generator.named_parameters() if p.grad is not None}
        with torch.no_grad():
            gen = model.generate(
                questions=questions,
                passages=passages,
                doc_scores=scores,
                max_new_tokens=4,
                num_beams=2,
                speed_options=speed,
            )
        return out, grads, gen

    whole, whole_grads, whole_gen = run(RagSpeedOptions.plain())
    chunk_tokens = int(lengths.max()) * 2  # chunks of two rows
    # decoding in length groups too
    speed = RagSpeedOptions(encoder_chunk_tokens=chunk_tokens, train_chunk_tokens=chunk_tokens, decode_group_min_rows=1)
    mask = batch["context_attention_mask"]
    assert len(length_chunks(mask, chunk_tokens)) > 1
    assert len(length_groups(mask, 1, 1, speed.decode_groups, speed.decode_group_min_rows)) > 1
    chunked, chunked_grads, chunked_gen = run(speed)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(chunked_gen, whole_gen)


def _reference_token_logprobs(model, question, passage, answer):
    """log p(answer token t | question, passage, answer<t), with nothing batched, padded or cached."""
    packed = model.packer().pack(question, [passage]).input_ids
    ans = answer_ids(model, answer, with_eos=True)
    if model.is_generator_encoder_decoder:
        labels = torch.tensor([ans])
        logits = model.generator(input_ids=torch.tensor([packed]), labels=labels).logits[0]
        return torch.log_softmax(logits.float(), -1)[torch.arange(len(ans)), labels[0]]
    ids = torch.tensor([packed + ans])
    logits = model.generator(input_ids=ids).logits[0, len(packed) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(ans)), torch.tensor(ans)]


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("mode", ["rag_sequence", "rag_token"])
def test_marginal_likelihood_matches_a_reference_computation(kind, mode):
    model = make_tiny_rag(kind, mode)
    with torch.no_grad():
        loss = model(questions=QUESTIONS, answers=ANSWERS, passages=PASSAGES, doc_scores=SCORES).loss
        nlls = []
        for q, a, plist, scores in zip(QUESTIONS, ANSWERS, PASSAGES, SCORES):
            doc_lp = torch.log_softmax(torch.tensor(scores), -1)
            per_doc = [_reference_token_logprobs(model, q, p, a) for p in plist]
            if mode == "rag_sequence":
                nll = -torch.logsumexp(torch.stack([doc_lp[d] + per_doc[d].sum() for d in range(len(plist))]), 0)
            else:
                tok = torch.stack(per_doc)  # [n, T]
                nll = -torch.logsumexp(doc_lp[:, None] + tok, 0).sum()
            nlls.append(nll)
    torch.testing.assert_close(loss, torch.stack(nlls).mean(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["rag_sequence", "rag_token"])
def test_gradient_reaches_question_encoder_through_doc_scores(mode):
    model = make_tiny_rag("gpt2", mode).train()
    batch = model.prepare_inputs(QUESTIONS, ANSWERS, passages=PASSAGES)
    torch.manual_seed(1)
    batch["doc_embeddings"] = torch.randn(2, 3, model.config.retrieval_vector_size)
    out = model(**batch)
    assert out.doc_scores.requires_grad
    out.loss.backward()
    grads = [p.grad for p in model.question_encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert out.doc_posteriors.shape == (2, 3)
    torch.testing.assert_close(out.doc_posteriors.sum(-1), torch.ones(2))


@pytest.mark.parametrize("kind", KINDS)
def test_rag_token_greedy_follows_the_marginal_argmax(kind):
    """The cached step-by-step decoding equals an uncached argmax of the marginal at every step."""
    model = make_tiny_rag(kind, "rag_token")
    generated = model.generate(QUESTIONS[:1], passages=PASSAGES[:1], doc_scores=SCORES[:1], max_new_tokens=5)[0]
    doc_lp = torch.log_softmax(torch.tensor(SCORES[0]), -1)
    prefix = []
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for token in generated.tolist():
            per_doc = []
            for p in PASSAGES[0]:
                packed = model.packer().pack(QUESTIONS[0], [p]).input_ids
                if model.is_generator_encoder_decoder:
                    start = model.generator.config.decoder_start_token_id
                    logits = model.generator(
                        input_ids=torch.tensor([packed]), decoder_input_ids=torch.tensor([[start] + prefix])
                    ).logits[0, -1]
                else:
                    logits = model.generator(input_ids=torch.tensor([packed + prefix])).logits[0, -1]
                per_doc.append(torch.log_softmax(logits.float(), -1))
            marginal = torch.logsumexp(doc_lp[:, None] + torch.stack(per_doc), 0)
            assert int(marginal.argmax()) == token
            prefix.append(token)
            if token == eos:
                break


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_rag_token_beam_search_scores_match_the_marginal(kind):
    """Beam reordering of the per-document cache is right: beam scores equal recomputed marginals."""
    model = make_tiny_rag(kind, "rag_token")
    batch = model.prepare_inputs(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, for_generation=True)
    n = 3
    state = RagTokenState(
        model.runner(),
        batch["context_input_ids"].view(2, n, -1),
        batch["context_attention_mask"].view(2, n, -1),
        torch.log_softmax(batch["doc_scores"], -1),
        n,
    )
    out = GenerationMixin.generate(
        model,
        input_ids=torch.full((2, 1), 1),
        rag_state=state,
        num_beams=3,
        max_new_tokens=5,
        min_new_tokens=5,
        length_penalty=0.0,
        use_cache=False,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=model.runner().pad_id(),
        eos_token_id=None,
    )
    answers = [model.tokenizer.generator.decode(s[1:]) for s in out.sequences]
    for b in range(2):
        seq = out.sequences[b, 1:].tolist()
        doc_lp = torch.log_softmax(torch.tensor(SCORES[b]), -1)
        total = 0.0
        with torch.no_grad():
            for t in range(len(seq)):
                per_doc = []
                for p in PASSAGES[b]:
                    packed = model.packer().pack(QUESTIONS[b], [p]).input_ids
                    if model.is_generator_encoder_decoder:
                        start = model.generator.config.decoder_start_token_id
                        logits = model.generator(
                            input_ids=torch.tensor([packed]), decoder_input_ids=torch.tensor([[start] + seq[:t]])
                        ).logits[0, -1]
                    else:
                        logits = model.generator(input_ids=torch.tensor([packed + seq[:t]])).logits[0, -1]
                    per_doc.append(torch.log_softmax(logits.float(), -1))
                total += float(torch.logsumexp(doc_lp[:, None] + torch.stack(per_doc), 0)[seq[t]])
        assert abs(total - float(out.sequences_scores[b])) < 1e-3, answers


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("decoding", ["fast", "thorough"])
def test_rag_sequence_greedy_reuses_decoding_scores_exactly(kind, decoding, monkeypatch):
    """Greedy RAG-Sequence takes each hypothesis's score under its own document from decoding and rescores
    only the other pairs: the same hypotheses and scores as rescoring everything."""
    model = make_tiny_rag(kind, "rag_sequence", sequence_decoding=decoding)
    kwargs = dict(passages=PASSAGES, doc_scores=SCORES, max_new_tokens=5, return_dict_in_generate=True)
    calls = []
    runner_class = type(model.runner())
    real = runner_class.sequence_logprobs

    def counting(self, ctx_ids, ctx_mask, answer_ids, *a, **k):
        calls.append(answer_ids.shape[0])
        return real(self, ctx_ids, ctx_mask, answer_ids, *a, **k)

    monkeypatch.setattr(runner_class, "sequence_logprobs", counting)
    reused = model.generate(QUESTIONS, **kwargs)
    reused_rows = sum(calls)
    calls.clear()
    # own_scores_max_logits=0 forces rescoring of every pair
    rescored = model.generate(QUESTIONS, **kwargs, speed_options=RagSpeedOptions(own_scores_max_logits=0))
    torch.testing.assert_close(reused.sequences, rescored.sequences)
    torch.testing.assert_close(reused.sequences_scores, rescored.sequences_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reused.doc_posteriors, rescored.doc_posteriors, rtol=1e-5, atol=1e-5)
    n = len(PASSAGES[0])
    # rescoring everything scores each question's own hypotheses (fast) or each distinct one under every
    # document (thorough); reuse skips the pairs decoding already scored (fast: all of them)
    assert reused_rows < sum(calls)
    if decoding == "fast":
        assert reused_rows == len(QUESTIONS) * n  # only the pass for doc_posteriors is left
    assert sum(calls) >= len(QUESTIONS) * n


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("decoding", ["fast", "thorough"])
def test_rag_sequence_decoding_returns_scored_hypotheses(kind, decoding):
    model = make_tiny_rag(kind, "rag_sequence", sequence_decoding=decoding)
    out = model.generate(
        QUESTIONS,
        passages=PASSAGES,
        doc_scores=SCORES,
        num_beams=2,
        num_return_sequences=2,
        max_new_tokens=4,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[0] == 4
    assert out.sequences_scores.shape == (4,)
    scores = out.sequences_scores.view(2, 2)
    assert (scores[:, 0] >= scores[:, 1]).all()
    assert out.doc_posteriors.shape == (2, 3)
    if decoding == "thorough":
        # the score of the best answer is its full marginal likelihood over all documents
        best = model.runner().trim_after_eos(out.sequences.view(2, 2, -1)[:, 0])
        batch = model.prepare_inputs(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, for_generation=True)
        seq_lp = (
            model.runner()
            .sequence_logprobs(
                batch["context_input_ids"], batch["context_attention_mask"], best.repeat_interleave(3, 0)
            )
            .view(2, 3)
        )
        expected = torch.logsumexp(torch.log_softmax(torch.tensor(SCORES), -1) + seq_lp, -1)
        torch.testing.assert_close(scores[:, 0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_sampling_and_batched_generation(mode):
    model = make_tiny_rag("llama", mode)
    torch.manual_seed(0)
    out = model.generate(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, do_sample=True, top_k=5, max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] <= 4


def test_answer_returns_text_and_sources():
    model = make_tiny_rag("gpt2", "rag_token")
    answers = model.answer(QUESTIONS, passages=PASSAGES, doc_scores=SCORES, max_new_tokens=4)
    assert [a.question for a in answers] == QUESTIONS
    assert [s.id for s in answers[0].sources] == ["normans", "france", "remote"]
    assert answers[0].sources[0].score == pytest.approx(2.0)
    assert sum(s.posterior for s in answers[0].sources) == pytest.approx(1.0, abs=1e-4)


def test_question_survives_packing_in_a_small_window():
    model = make_tiny_rag("gpt2", "concat", max_new_tokens=16)
    model.generator.config.n_positions = 160
    model.clear_caches()
    long = {"id": "x", "title": "Long", "text": " ".join(["The Normans gave their name to Normandy."] * 100)}
    batch = model.prepare_inputs(["Who was the Norse leader?"], passages=[[long, long]], for_generation=True)
    ids = batch["context_input_ids"][0].tolist()
    assert len(ids) <= 160 - 16
    q_ids = model.packer().question_ids("Who was the Norse leader?")
    assert any(ids[i : i + len(q_ids)] == q_ids for i in range(len(ids)))
    out = model.generate(["Who was the Norse leader?"], passages=[[long, long]], max_new_tokens=16)
    assert out.shape[1] <= 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"questions": []}, "empty"),
        ({"questions": ["  "]}, "empty or only whitespace"),
        ({"questions": [3]}, "not a string"),
        ({"questions": QUESTIONS, "passages": PASSAGES[:1]}, "one list of passages per question"),
        ({"questions": QUESTIONS, "passages": PASSAGES, "n_docs": 0}, None),
        ({"questions": QUESTIONS, "passages": PASSAGES, "generation_mode": "fid"}, "generation_mode"),
        ({"questions": QUESTIONS, "passages": PASSAGES, "max_new_tokens": 10_000}, "window"),
    ],
)
def test_bad_generate_input_is_a_clear_error(kwargs, match):
    model = make_tiny_rag("gpt2")
    questions = kwargs.pop("questions")
    if kwargs.get("n_docs") == 0:
        with pytest.raises(RagInputError, match="no index attached"):
            model.generate(questions, n_docs=0)
        return
    with pytest.raises(ValueError, match=match):
        model.generate(questions, **kwargs)


def test_mismatched_answers_and_questions():
    model = make_tiny_rag("gpt2")
    with pytest.raises(RagInputError, match="2 questions but 1 answers"):
        model(questions=QUESTIONS, answers=["Rollo"], passages=PASSAGES)


def test_no_index_and_no_passages_says_what_to_do():
    with pytest.raises(RagInputError, match="build_index"):
        make_tiny_rag("gpt2").generate(QUESTIONS)


def test_generator_without_lm_head_is_refused():
    tok = build_tiny_tokenizer()
    qe_cfg = tiny_question_encoder_config(tok)
    config = RagConfig.from_question_encoder_generator_configs(qe_cfg, qe_cfg)
    with pytest.raises(RagConfigError, match="language-model head"):
        RagForGeneration(config, generator=BertModel(qe_cfg))
    from transformers import DPRConfig

    with pytest.raises(RagConfigError, match="language-model head"):
        RagForGeneration(RagConfig(generator=DPRConfig(hidden_size=32, num_hidden_layers=1).to_dict()))


def test_tokenizer_that_does_not_fit_the_model_is_refused():
    model = make_tiny_rag("gpt2")
    big = build_tiny_tokenizer(vocab_size=600)
    with pytest.raises(RagInputError, match="do not belong together"):
        model.set_tokenizer(RagTokenizer(big, big))


def test_interrupted_save_restores_the_previous_model_and_keeps_user_files(tmp_path, monkeypatch):
    model = make_tiny_rag("gpt2")
    model.save_pretrained(tmp_path)
    (tmp_path / "my_notes.txt").write_text("mine")
    first_weights = (tmp_path / "model.safetensors").read_bytes()
    import modeling_rag.utils.atomic as atomic

    real_replace = atomic.os.replace
    calls = []

    def fail_midway(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # some entries already swapped, others not
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_midway)
    model.config.n_docs = 9
    with torch.no_grad():
        model.generator.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / atomic.JOURNAL_NAME).exists()
    restored = RagForGeneration.from_pretrained(tmp_path)
    assert restored.config.n_docs == 5
    assert (tmp_path / "model.safetensors").read_bytes() == first_weights
    assert not (tmp_path / atomic.JOURNAL_NAME).exists()
    assert (tmp_path / "my_notes.txt").read_text() == "mine"
    model.save_pretrained(tmp_path)
    assert RagForGeneration.from_pretrained(tmp_path).config.n_docs == 9
    assert (tmp_path / "my_notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".staging", ".backup"))]


def test_from_pretrained_question_encoder_generator(tmp_path):
    tok = build_tiny_tokenizer()
    from conftest import tiny_generator_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    BertModel(tiny_question_encoder_config(tok)).save_pretrained(tmp_path / "qe")
    tok.save_pretrained(tmp_path / "qe")
    AutoModelForCausalLM.from_config(tiny_generator_config("llama", tok)).save_pretrained(tmp_path / "gen")
    tok.save_pretrained(tmp_path / "gen")
    model = RagForGeneration.from_pretrained_question_encoder_generator(
        str(tmp_path / "qe"), str(tmp_path / "gen"), n_docs=2, use_chat_template=False
    )
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "gen")
    for (name, a), (_, b) in zip(model.generator.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.config.n_docs == 2
    assert model.answer("Who?", passages=[["Rollo"]], max_new_tokens=2)[0].sources[0].text == "Rollo"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["rag_sequence", "rag_token"])
def test_decoder_only_training_rows_are_left_padded_and_each_question_scores_as_alone(kind, mode):
    """Decoder-only training rows end with their answer in the last column: logits are computed for the
    longest answer's positions only, and a question's loss in a batch equals its loss alone."""
    model = make_tiny_rag(kind, mode).train()
    for m in model.modules():  # dropout off: batch and single runs must be comparable
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    long_passage = {"id": "long", "title": "Long", "text": " ".join([TINY_PASSAGES[5]["text"]] * 6)}
    questions = ["Who?", "Which leader of the Norse gave his name to a region of France, and when was it?"]
    answers = ["Rollo, the Norse leader", "Paris"]
    passages = [[TINY_PASSAGES[0], long_passage], [TINY_PASSAGES[1], TINY_PASSAGES[2]]]
    scores = [[2.0, 0.5], [1.5, 1.0]]
    batch = model.prepare_inputs(questions, answers, passages=passages, doc_scores=scores)
    lengths = batch["context_attention_mask"].sum(-1)
    assert lengths.max() - lengths.min() > 20  # contexts of very different lengths
    assert (batch["context_attention_mask"][:, -1] == 1).all()  # left-padded
    answer_tokens = (batch["labels"] != -100).sum(-1)
    assert len(model.runner().answer_positions(batch["labels"])) == int(answer_tokens.max())
    together = model(**batch).loss
    alone = []
    for i in range(2):
        single = model.prepare_inputs([questions[i]], [answers[i]], passages=[passages[i]], doc_scores=[scores[i]])
        alone.append(model(**single).loss)
    assert torch.allclose(together, torch.stack(alone).mean(), atol=1e-5)


def test_embedding_lookup_shortcut_only_where_it_equals_the_stack_own_lookup():
    """Training looks the chunks' embeddings up once (one dense embedding gradient, not one per chunk)
    only for stacks whose forward does exactly `self.embed_tokens(input_ids)`."""
    from transformers import MarianConfig, MarianMTModel

    from modeling_rag.speedups.support import exact_embedding_lookup as _embedding_lookup

    for kind in ("bart", "t5"):
        generator = make_tiny_rag(kind, "rag_token").generator
        for stack in (generator.get_encoder(), generator.get_decoder()):
            lookup = _embedding_lookup(stack)
            assert lookup is stack.embed_tokens
            ids = torch.tensor([[5, 6, 7, 8]])
            mask = torch.ones_like(ids)
            if stack is generator.get_encoder():
                a = stack(input_ids=ids, attention_mask=mask).last_hidden_state
                b = stack(inputs_embeds=lookup(ids), attention_mask=mask).last_hidden_state
                torch.testing.assert_close(a, b)
    marian = MarianMTModel(
        MarianConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            scale_embedding=True,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    )
    assert _embedding_lookup(marian.get_encoder()) is None  # scales looked-up ids only
    assert _embedding_lookup(marian.get_decoder()) is marian.get_decoder().embed_tokens


def test_token_marginal_equals_logsumexp_of_document_weighted_log_softmax():
    from modeling_rag.modes.marginals import next_token_logprobs as _token_marginal

    torch.manual_seed(0)
    logits = torch.randn(6, 11) * 5
    doc_logprobs = torch.log_softmax(torch.randn(2, 3), -1)
    doc_logprobs[1, 2] = float("-inf")  # a document with no weight
    want = torch.logsumexp(torch.log_softmax(logits, -1).view(2, 3, -1) + doc_logprobs.unsqueeze(-1), dim=1)
    torch.testing.assert_close(_token_marginal(logits.clone(), doc_logprobs), want)
    logits[3:, 4] = float("-inf")  # a token no document of the second row allows (e.g. a banned word)
    want = torch.logsumexp(torch.log_softmax(logits, -1).view(2, 3, -1) + doc_logprobs.unsqueeze(-1), dim=1)
    got = _token_marginal(logits.clone(), doc_logprobs)
    assert got[1, 4] == float("-inf")
    torch.testing.assert_close(got, want)

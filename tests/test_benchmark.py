"""The benchmark runs end to end on tiny settings, checks that both sides did the same work, and stops when not."""

import json
import os

import pytest
import torch

from modeling_rag.benchmarking import BenchmarkMismatch, main
from modeling_rag.benchmarking.checks import CheckLog, check_tokens
from modeling_rag.benchmarking.flops import decoder_flops, encoder_flops
from modeling_rag.benchmarking.measure import time_alternating

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "squad_v1_dev_22articles")
# the data ships in the repository and MiniLM (the question tokenizer) is in the test extra: no skips
TINY = ["--preset", "tiny", "--memory", "inprocess", "--threads", "1", "--data", DATA, "--silent"]


def test_tiny_benchmark_checks_both_sides_and_reports_ranges(tmp_path):
    out = tmp_path / "bench.json"
    results = main(TINY + ["--repeats", "2", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["table"] == results["table"]
    run = written["runs"][0]
    assert set(run["phases"]) == {"retrieval", "rag_token", "rag_sequence", "concat", "train"}
    checks = {(c["phase"], c["name"]): c["passed"] for c in run["checks"]}
    assert all(checks.values())
    for key in (
        ("retrieval", "same retrieved document ids"),
        ("retrieval", "same document scores"),
        ("retrieval", "identical generator inputs (padding aside)"),
        ("rag_token", "theirs: identical generated tokens"),
        ("rag_sequence", "theirs: identical generated tokens"),
        ("train", "equal loss on both sides"),
        ("train", "equal generator grad norm on both sides"),
        ("train", "equal question encoder grad norm on both sides"),
    ):
        assert key in checks
    phases = run["phases"]
    for name in ("retrieval", "rag_token", "rag_sequence", "train"):
        row = phases[name]
        for side in ("ours", "theirs"):
            t = row[side]
            assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] and t["first_call_s"] > 0
            assert len(t["cpu_times_s"]) == 3  # the first call and two repeats
            assert row["extra_peak_mib"][side] >= 0
        assert row["speedup"]["min"] <= row["speedup"]["median"] <= row["speedup"]["max"]
    assert len(phases["rag_sequence"]["distinct_hypotheses"]) == written["settings"]["sequence_questions"]
    assert phases["rag_token"]["generated_shape"][1] == written["settings"]["new_tokens"]
    assert "| generate, RAG-Token |" in results["table"] and "PASS  train: equal loss" in results["table"]


def test_benchmark_stops_when_one_weight_of_one_side_differs():
    with pytest.raises(BenchmarkMismatch, match="phase 'train'.*equal loss"):
        main(TINY + ["--phases", "train", "--memory", "none", "--alter-weight"])


def test_token_check_names_the_phase_and_the_side():
    log = CheckLog()
    same = torch.tensor([[1, 2, 3]])
    check_tokens(log, "rag_token", {"ours": [same, same.clone()], "theirs": [same.clone()]})
    assert [c.passed for c in log.checks] == [True, True]
    with pytest.raises(BenchmarkMismatch, match="phase 'rag_sequence': theirs: identical generated tokens"):
        check_tokens(log, "rag_sequence", {"ours": [same], "theirs": [torch.tensor([[1, 2, 4]])]})
    assert log.checks[-1].passed is False


def test_repeats_alternate_the_order_of_the_sides_and_time_the_first_call_apart():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    timed = time_alternating(fns, repeats=3, device=torch.device("cpu"), use_cpu_clock=False)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(timed["a"]["wall_times_s"]) == 4 and timed["a"]["first_call_s"] >= 0


def test_flop_count_grows_with_padding_free_lengths():
    assert encoder_flops([200], 6, 768, 3072) > encoder_flops([100], 6, 768, 3072) * 2 - 1
    assert decoder_flops([100], 2, 1, 8, 16, 10) > decoder_flops([100], 1, 1, 8, 16, 10)


def test_peer_rag_sequence_decodes_its_contexts_with_their_attention_mask():
    """transformers' RagSequenceForGeneration.generate drops the contexts' mask; the benchmark puts it back."""
    from transformers import BartConfig, BartForConditionalGeneration

    from modeling_rag.benchmarking.sides import _MaskedContextGenerator

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, init_std=0.5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None,
    )  # fmt: skip
    bart = BartForConditionalGeneration(config).eval()
    ids = torch.randint(3, 64, (4, 12))
    ids[:2, 6:] = 1  # two right-padded contexts
    mask = ids.ne(1).long()
    kwargs = {"max_length": 6, "min_length": 6, "num_beams": 1, "do_sample": False, "pad_token_id": 1}
    wrapped = _MaskedContextGenerator(bart, pad_token_id=1)
    with torch.no_grad():
        masked = bart.generate(ids, attention_mask=mask, **kwargs)
        attending_pads = bart.generate(ids, attention_mask=torch.ones_like(mask), **kwargs)
        assert not torch.equal(masked, attending_pads)  # the padding changes the output of this generator
        assert torch.equal(wrapped.generate(ids, attention_mask=None, **kwargs), masked)
    assert wrapped.config is bart.config and dict(wrapped.named_parameters()).keys() == {
        f"inner.{k}" for k, _ in bart.named_parameters()
    }

"""The benchmark script runs end to end on tiny settings and reports both sides with ratios."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("rag_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_reports_both_sides_and_ratios(tmp_path):
    bench = _load_script()
    out = tmp_path / "bench.json"
    results = bench.main(
        ["--preset", "tiny", "--memory", "inprocess", "--threads", "1", "--output", str(out), "--silent"]
    )
    written = json.loads(out.read_text())
    assert written["table"] == results["table"]
    run = written["runs"][0]
    assert run["weights"]["generator"] and run["weights"]["question_encoder"]
    assert run["inputs"]["same_retrieved_documents"] is True
    assert run["matmul_peak_gflops"] > 0
    assert all(row["matmul_peak_gflops"] > 0 for row in run["phases"].values())
    phases = run["phases"]
    assert set(phases) == {"retrieval", "rag_token", "rag_sequence", "concat", "train"}
    for name in ("retrieval", "rag_token", "rag_sequence", "train"):
        row = phases[name]
        for side in ("ours", "theirs"):
            assert row[side]["median_s"] > 0
            assert row[side]["fraction_of_peak"] > 0
            assert row["extra_peak_mib"][side] >= 0
        assert row["speedup"] == pytest.approx(row["theirs"]["median_s"] / row["ours"]["median_s"])
    assert phases["retrieval"]["raw"]["median_s"] > 0
    assert phases["retrieval"]["ours_tokenising"]["median_s"] > 0 and phases["retrieval"]["ours_warm"]["median_s"] > 0
    assert phases["retrieval"]["passage_tokens_build_s"] > 0
    assert phases["retrieval"]["ours_over_raw"] > 0 and phases["retrieval"]["theirs_over_raw"] > 0
    for name in ("rag_token", "rag_sequence"):
        assert phases[name]["same_generated_length"] is True
        assert phases[name]["generated_shape"][1] == written["settings"]["new_tokens"]
    assert "| generate, RAG-Token |" in results["table"]


def test_flop_count_grows_with_padding_free_lengths():
    bench = _load_script()
    assert bench.encoder_flops([200], 6, 768, 3072) > bench.encoder_flops([100], 6, 768, 3072) * 2 - 1
    assert bench.decoder_flops([100], 2, 1, 8, 16, 10) > bench.decoder_flops([100], 1, 1, 8, 16, 10)

"""scripts/tune_fusion.py: the fusion weight is chosen on dev questions and stored in the config."""

import importlib.util
import json
import os

from conftest import TINY_PASSAGES, make_tiny_rag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("_tune_fusion", os.path.join(ROOT, "scripts", "tune_fusion.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chooses_the_best_weight_and_stores_it(tmp_path):
    corpus = tmp_path / "p.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in TINY_PASSAGES))
    model = make_tiny_rag("gpt2", retrieval="hybrid")
    model.build_index(str(corpus), show_progress=False)
    model.save_pretrained(tmp_path / "m")
    rows = [
        {"question": "Rollo Norse leader Normandy", "answers": ["Rollo"], "positive_passage_ids": ["normans"]},
        {"question": "capital of Italy Rome", "answers": ["Rome"], "positive_passage_ids": ["italy"]},
        {"question": "company phones on call", "answers": ["staff"], "positive_passage_ids": ["phones"]},
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _script().main(
        ["--model", str(tmp_path / "m"), "--questions", str(questions), "--alphas", "0,0.5,1", "--write-config"]
    )
    table = result["table"]
    # alpha 0 is BM25's ranking and alpha 1 the dense one: the fused extremes reproduce their halves
    assert table["weighted alpha=0.0"]["top_1"] == table["bm25"]["top_1"]
    assert table["weighted alpha=1.0"]["top_1"] == table["dense"]["top_1"]
    best = max(
        (0.0, 0.5, 1.0), key=lambda a: (table[f"weighted alpha={a}"]["top_1"], table[f"weighted alpha={a}"]["mrr"])
    )
    assert result["chosen_alpha"] == best
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["fusion"] == "weighted" and config["hybrid_alpha"] == best

"""The results as a markdown table (median and min–max of each side and of the ratio) and the checks."""

from __future__ import annotations

NAMES = {
    "retrieval": "retrieval",
    "rag_token": "generate, RAG-Token",
    "rag_sequence": "generate, RAG-Sequence (thorough)",
    "concat": "generate, concat (ours only)",
    "train": "training step, RAG-Token",
}


def _range(t: dict, scale: float = 1.0, unit: str = " s", digits: int = 3) -> str:
    return f"{t['median_s'] * scale:.{digits}f}{unit} ({t['min_s'] * scale:.{digits}f}–{t['max_s'] * scale:.{digits}f})"


def _ratio(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}–{r['max']:.2f})"


def phase_line(phase: str, row: dict) -> str:
    """One line of progress output for a finished phase."""
    parts = [f"{phase}:"]
    for side in ("ours", "ours_tokenising", "ours_warm", "theirs", "raw"):
        if side in row:
            parts.append(f"{side} {_range(row[side], 1000, ' ms', 1)} first {row[side]['first_call_s'] * 1000:.1f} ms")
    if "speedup" in row:
        parts.append(f"speedup {_ratio(row['speedup'])}")
    if "ours_over_raw" in row:
        parts.append(f"ours/raw {_ratio(row['ours_over_raw'])}, theirs/raw {_ratio(row['theirs_over_raw'])}")
    return "  ".join(parts)


def format_table(results: dict) -> str:
    """All runs' phases as one markdown table, then the distinct hypotheses and every check."""
    lines = [
        "| dtype | work | ours: median (min–max) | transformers: median (min–max) | speedup: median (min–max) "
        "| first call ours / transformers | fraction of peak ours / transformers "
        "| extra peak memory ours / transformers (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        for phase, row in r["phases"].items():
            theirs = row.get("theirs")
            mem = row.get("extra_peak_mib", {})
            mem_s = " / ".join(f"{mem[k]:.0f}" for k in ("ours", "theirs") if k in mem) or "-"
            mem_ratio = f"{mem['ours'] / mem['theirs']:.2f}x" if "ours" in mem and mem.get("theirs") else "-"
            first = f"{row['ours']['first_call_s']:.3f} s" + (f" / {theirs['first_call_s']:.3f} s" if theirs else "")
            peak = f"{row['ours']['fraction_of_peak']:.0%}" + (f" / {theirs['fraction_of_peak']:.0%}" if theirs else "")
            lines.append(
                f"| {r['dtype']} | {NAMES[phase]} | {_range(row['ours'])} | "
                + (f"{_range(theirs)} | {_ratio(row['speedup'])}" if theirs else "- | -")
                + f" | {first} | {peak} | {mem_s} | {mem_ratio} |"
            )
            if phase == "retrieval":
                for side, what in (
                    ("raw", "raw: encoder forward + faiss search"),
                    ("ours_warm", "ours, passage cache warm"),
                    ("ours_tokenising", "ours, no stored passage tokens (tokenised in the call)"),
                ):
                    lines.append(
                        f"| {r['dtype']} | retrieval, {what} | {_range(row[side])} | | | "
                        f"{row[side]['first_call_s']:.3f} s | | | |"
                    )
                lines.append(
                    f"| {r['dtype']} | retrieval over raw | ours {_ratio(row['ours_over_raw'])} | "
                    f"transformers {_ratio(row['theirs_over_raw'])} | | | | | |"
                )
    lines.append("")
    for r in results["runs"]:
        seq = r["phases"].get("rag_sequence", {})
        if "distinct_hypotheses" in seq:
            d = seq["distinct_hypotheses"]
            lines.append(
                f"[{r['dtype']}] RAG-Sequence distinct hypotheses per question ({r['generator']} generator): "
                f"{d} (of {r['n_docs']} documents; mean {sum(d) / len(d):.2f})"
            )
        for phase in ("rag_token", "rag_sequence"):
            if "distinct_answers" in r["phases"].get(phase, {}):
                lines.append(
                    f"[{r['dtype']}] {NAMES[phase]}: {r['phases'][phase]['distinct_answers']} distinct answers "
                    f"for {r['phases'][phase]['questions']} questions"
                )
        lines.append(f"[{r['dtype']}] checks:")
        for c in r["checks"]:
            lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['phase']}: {c['name']} ({c['detail']})")
    return "\n".join(lines)

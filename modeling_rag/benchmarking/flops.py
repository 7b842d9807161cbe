"""Model FLOPs of the benchmark's work (matmuls and attention products; 2 FLOPs per multiply-add).

Counted at the real, unpadded input lengths, so the count is the same for both sides whatever
they pad; the fraction of the GEMM peak each side reaches is this count over its time.
"""

from __future__ import annotations


def encoder_flops(lengths, layers, d, f) -> float:
    """A transformer encoder over rows of the given real lengths."""
    total = 0.0
    for L in lengths:
        total += layers * (L * (8 * d * d + 4 * d * f) + 4 * L * L * d)
    return total


def decoder_flops(cross_lengths, steps, layers, d, f, vocab) -> float:
    """Incremental decoding of `steps` tokens for each row (cross-attending to its real length)."""
    total = 0.0
    for Lc in cross_lengths:
        total += layers * 4 * d * d * Lc  # cross-attention keys and values, once per row
        for t in range(1, steps + 1):
            total += layers * (12 * d * d + 4 * t * d + 4 * Lc * d + 4 * d * f) + 2 * d * vocab
    return total


def work_flops(phase: str, s, g, q_lengths, ctx_lengths, ans_lengths=None, distinct=None) -> float:
    """Model FLOPs of the work of `phase` at real lengths (the same count for both sides).

    `distinct`: for RAG-Sequence, the number of distinct hypotheses that are rescored under every
    document (both sides deduplicate; default: all `n_docs` per question, an upper bound).
    """
    d, f, layers, vocab = g.d_model, g.encoder_ffn_dim, g.encoder_layers, g.vocab_size
    qenc = encoder_flops(q_lengths, s.q_layers, s.q_hidden, s.q_ffn)
    enc = encoder_flops(ctx_lengths, layers, d, f)
    if phase == "retrieval":
        return qenc
    dec = decoder_flops(ctx_lengths, s.new_tokens, layers, d, f, vocab)
    if phase in ("rag_token", "concat"):
        return qenc + enc + dec
    if phase == "rag_sequence":
        # greedy per document, then every distinct hypothesis is scored under every document of its
        # question: teacher-forced rows of new_tokens tokens
        per_context = 1.0 if distinct is None else distinct / len(ctx_lengths)
        rescore_rows = [L for L in ctx_lengths for _ in range(s.n_docs)]
        rescore = 0.0
        for Lc in rescore_rows:
            T = s.new_tokens
            rescore += layers * (4 * d * d * Lc + T * (12 * d * d + 4 * d * f + 4 * Lc * d) + 2 * T * T * d)
            rescore += 2 * d * vocab * T
        return qenc + enc + dec + rescore * per_context
    if phase == "train":
        T = max(ans_lengths)
        fwd = enc
        for Lc in ctx_lengths:
            fwd += layers * (4 * d * d * Lc + T * (12 * d * d + 4 * d * f + 4 * Lc * d) + 2 * T * T * d)
            fwd += 2 * d * vocab * T
        return 3 * (fwd + qenc)  # backward costs twice the forward
    raise ValueError(phase)

"""Benchmarks the PassageIndex kinds on clustered random vectors.

For each corpus size and each kind (flat, hnsw, ivf_flat, ivf_pq) it measures the build time,
the FAISS index size in bytes, the median latency of a batch of queries and of a single query,
and recall@10 against the exact (flat) top-10. For the approximate kinds it sweeps the search
parameter (HNSW ``ef_search``, IVF ``nprobe``) and reports the cheapest setting whose recall@10
reaches ``--target-recall`` (or the most accurate one tried). Prints a table with ratios vs flat
and writes everything to ``--output`` (JSON).

Example::

    python scripts/benchmark_index.py --sizes 10000 100000 1000000 --output benchmark_index.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import faiss
import numpy as np
from tqdm.auto import tqdm

from modeling_rag.index_faiss import PassageIndex
from modeling_rag.utils.atomic import atomic_write_text

SWEEPS = {
    "hnsw": ("ef_search", [16, 32, 64, 128, 256, 512]),
    "ivf_flat": ("nprobe", [4, 8, 16, 32, 64, 128]),
    "ivf_pq": ("nprobe", [4, 8, 16, 32, 64, 128]),
}


def clustered_vectors(n: int, dim: int, n_clusters: int, seed: int, centers: np.ndarray | None = None) -> np.ndarray:
    """`n` unit vectors drawn around `n_clusters` gaussian centres (generated in blocks)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = np.random.default_rng(12345).standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        labels = rng.integers(0, len(centers), m)
        block = centers[labels] + rng.standard_normal((m, dim)).astype(np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[:k], t)) for f, t in zip(found, truth))
    return hits / truth.size


def time_search(
    index: PassageIndex, queries: np.ndarray, k: int, batch: int, repeats: int, singles: int
) -> tuple[float, float]:
    batch_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries[:batch], k)
        batch_times.append(time.perf_counter() - t0)
    single_times = []
    for i in range(singles):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k)
        single_times.append(time.perf_counter() - t0)
    return statistics.median(batch_times), statistics.median(single_times)


def bench_size(n: int, args: argparse.Namespace) -> list[dict]:
    print(f"\n== {n:,} vectors, d={args.dim}, {args.clusters} clusters ==", flush=True)
    data = clustered_vectors(n, args.dim, args.clusters, seed=1)
    queries = clustered_vectors(args.queries, args.dim, args.clusters, seed=2)
    passages = [{"id": str(i), "title": "", "text": "", "source": "", "position": 0} for i in range(n)]
    rows = []
    truth = None
    flat_row = None
    for kind in args.kinds:
        gc.collect()
        t0 = time.perf_counter()
        index = PassageIndex.build(data, passages, kind=kind, metric="ip", normalized=True, show_progress=False)
        build_s = time.perf_counter() - t0
        index_bytes = int(faiss.serialize_index(index._faiss).size)
        if kind == "flat":
            _, truth = index.search(queries, args.k)
        sweep = []
        if kind in SWEEPS:
            name, values = SWEEPS[kind]
            for value in values:
                index.set_search_params(**{name: value})
                _, found = index.search(queries, args.k)
                rec = recall_at_k(found, truth)
                sweep.append({name: value, "recall_at_10": rec})
                print(f"  {kind:8s} {name}={value:<4d} recall@{args.k}={rec:.4f}", flush=True)
                if rec >= args.target_recall:
                    break
            chosen = sweep[-1]
            index.set_search_params(**{name: chosen[name]})
            recall = chosen["recall_at_10"]
        else:
            recall = 1.0
        batch_s, single_s = time_search(index, queries, args.k, args.batch, args.repeats, args.singles)
        row = {
            "n": n,
            "kind": kind,
            "params": index.kind_params,
            "build_s": build_s,
            "index_bytes": index_bytes,
            "batch_size": args.batch,
            "batch_latency_s": batch_s,
            "single_latency_s": single_s,
            "recall_at_10": recall,
            "sweep": sweep,
        }
        if kind == "flat":
            flat_row = row
        if flat_row is not None:
            row["batch_speedup_vs_flat"] = flat_row["batch_latency_s"] / batch_s
            row["single_speedup_vs_flat"] = flat_row["single_latency_s"] / single_s
            row["memory_ratio_vs_flat"] = index_bytes / flat_row["index_bytes"]
            row["build_ratio_vs_flat"] = build_s / flat_row["build_s"]
        rows.append(row)
        print(
            f"  {kind:8s} build {build_s:8.2f}s  bytes {index_bytes / 2**20:9.1f} MiB  batch {batch_s * 1e3:9.2f} ms  "
            f"single {single_s * 1e3:8.3f} ms  recall@{args.k} {recall:.4f}",
            flush=True,
        )
        del index
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'n':>9} {'kind':8} {'params':34} {'build s':>8} {'MiB':>8} {'mem x':>6} "
        f"{'batch ms':>9} {'single ms':>9} {'speedup b/s':>12} {'R@10':>6}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items())
        speed = f"{r.get('batch_speedup_vs_flat', 1):.1f}/{r.get('single_speedup_vs_flat', 1):.1f}"
        print(
            f"{r['n']:>9,} {r['kind']:8} {params:34} {r['build_s']:8.2f} {r['index_bytes'] / 2**20:8.1f} "
            f"{r.get('memory_ratio_vs_flat', 1):6.2f} {r['batch_latency_s'] * 1e3:9.2f} {r['single_latency_s'] * 1e3:9.3f} "
            f"{speed:>12} {r['recall_at_10']:6.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf_flat", "ivf_pq"])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000, help="queries used for recall")
    parser.add_argument("--batch", type=int, default=256, help="queries per batch for the batch latency")
    parser.add_argument("--singles", type=int, default=100, help="single-query searches timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--output", default="benchmark_index.json")
    args = parser.parse_args(argv)
    if args.kinds[0] != "flat":
        args.kinds = ["flat"] + [k for k in args.kinds if k != "flat"]
    rows: list[dict] = []
    for n in tqdm(args.sizes, desc="sizes", disable=True):
        rows.extend(bench_size(n, args))
        atomic_write_text(
            args.output,
            json.dumps(
                {"settings": vars(args), "faiss_threads": faiss.omp_get_max_threads(), "results": rows}, indent=2
            ),
        )
    print_table(rows)
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()

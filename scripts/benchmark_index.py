"""Benchmarks the PassageIndex kinds on clustered random vectors.

For each corpus size and each kind (flat, hnsw, ivf_flat, ivf_pq) it measures the build time,
the FAISS index size in bytes, the median latency of a batch of queries and of a single query,
and recall@10 against the exact (flat) top-10. For the approximate kinds it sweeps the search
parameter (HNSW ``ef_search``, IVF ``nprobe``) and reports the cheapest setting whose recall@10
reaches ``--target-recall`` (or the most accurate one tried). Prints a table with ratios vs flat
and writes everything to ``--output`` (JSON).

Example::

    python scripts/benchmark_index.py --sizes 10000 100000 1000000 --output benchmark_index.json

``--scale`` measures instead what a corpus of millions of passages costs on one host: for each size
(default 100k, 1M, 5M) synthetic passages of ~600 characters and clustered 384-d unit vectors are
generated in batches and streamed into `PassageIndex.build_streaming` (nothing holds the corpus), then,
each in a fresh process: the first load (every file hashed) and a warm load (stamps trusted), both with
``mmap=True``, the resident memory after the load, the latency of 1 and 32 queries and recall@10
against an exact search over the same vectors::

    nice -n 10 python scripts/benchmark_index.py --scale --scale-sizes 100000 1000000 5000000 \
        --work-dir /tmp/scale --output benchmark_index_scale.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from modeling_rag.index import PassageIndex
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


# ----------------------------------------------------------------------------------------------
# --scale: millions of passages on one host
# ----------------------------------------------------------------------------------------------
SCALE_BATCH = 50_000
WORDS = (
    "the of and in to a was is for on as by with he at from that his it an were are which this be or has "
    "had first one their its new after but who they two her she been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made between including war film born series team album"
).split()


def synthetic_texts(n_pool: int, seed: int) -> list[str]:
    """A pool of `n_pool` passages of ~600 characters of common English words."""
    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)
    return [" ".join(words[rng.integers(0, len(words), 110)])[:600] for _ in range(n_pool)]


def scale_batches(n: int, dim: int, clusters: int, pool: list[str]):
    """`(vectors, passages)` batches of `SCALE_BATCH`, the same for the same `n` (seeded per batch)."""
    for b, start in enumerate(range(0, n, SCALE_BATCH)):
        m = min(SCALE_BATCH, n - start)
        vectors = clustered_vectors(m, dim, clusters, seed=1000 + b)
        passages = [
            {
                "id": f"p{start + i}",
                "title": f"Article {(start + i) // 8}",
                "text": pool[(start + i) % len(pool)],
                "source": "synthetic",
                "position": (start + i) % 8,
            }
            for i in range(m)
        ]
        yield vectors, passages


def exact_top_k(n: int, dim: int, clusters: int, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact inner-product top-`k` row ids of `queries` over the streamed vectors."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for b, start in enumerate(range(0, n, SCALE_BATCH)):
        block = clustered_vectors(min(SCALE_BATCH, n - start), dim, clusters, seed=1000 + b)
        s = queries @ block.T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), s.shape)], axis=1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_i


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process now (total, anonymous, file-backed) from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class AnonPeak:
    """The highest RssAnon (memory the process holds, not mapped files) seen while the block runs, sampled."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes()["RssAnon"])

    def __enter__(self) -> AnonPeak:
        self.peak = rss_bytes()["RssAnon"]
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes()["RssAnon"])


def measure_load(folder: str, queries_path: str, truth_path: str, k: int) -> dict:
    """Runs in a fresh process: load (mmap), RSS, latency and recall; returns the numbers."""
    from modeling_rag.index import PassageIndex

    before = rss_bytes()
    t0 = time.perf_counter()
    index = PassageIndex.load(folder, mmap=True)
    load_s = time.perf_counter() - t0
    after = rss_bytes()
    queries = np.load(queries_path)
    truth = np.load(truth_path)
    index.search(queries[:1], k)  # first touch of the quantiser
    singles = []
    for i in range(20):
        t = time.perf_counter()
        index.search(queries[i : i + 1], k)
        singles.append(time.perf_counter() - t)
    batches = []
    for r in range(5):
        t = time.perf_counter()
        index.search(queries[32 * r : 32 * (r + 1)], k)
        batches.append(time.perf_counter() - t)
    _, found = index.search(queries, k)
    codes_only = None
    if index.kind == "ivf_pq":
        # refine_factor=1 re-ranks only the PQ top-k: the recall of an index kept without exact vectors
        refine = index.kind_params["refine_factor"]
        index.set_search_params(refine_factor=1)
        codes_only = recall_at_k(index.search(queries, k)[1], truth)
        index.set_search_params(refine_factor=refine)
    t = time.perf_counter()
    passages = index.get_passages(found[:32, :5])
    fetch_s = time.perf_counter() - t
    assert len(passages) == 32
    return {
        "kind": index.kind,
        "params": index.kind_params,
        "load_s": load_s,
        "rss_before_load": before["VmRSS"],
        "rss_after_load": after["VmRSS"],
        "rss_anon_after_load": after["RssAnon"],
        "rss_after_search": rss_bytes()["VmRSS"],
        # mapped files count in VmRSS once touched (the kernel maps whole page-cache folios), but those pages
        # are the page cache's, dropped under memory pressure; RssAnon is what the process itself holds
        "rss_anon_after_search": rss_bytes()["RssAnon"],
        "peak_rss": rss_bytes()["VmHWM"],
        "single_latency_s": statistics.median(singles),
        "batch32_latency_s": statistics.median(batches),
        "fetch_32x5_passages_s": fetch_s,
        "recall_at_10": recall_at_k(found, truth),
        "recall_at_10_codes_only": codes_only,
    }


def _child_measure(folder: Path, work: Path, k: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-load", str(folder), str(work / "queries.npy")]
    cmd += [str(work / "truth.npy"), "--k", str(k)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def zipf_texts(n_pool: int, vocab: int, seed: int) -> list[str]:
    """~600-character passages of pseudo-words drawn with Zipf frequencies (like real text, for BM25)."""
    rng = np.random.default_rng(seed)
    words = np.asarray([f"w{i:x}" for i in range(vocab)])
    ranks = np.minimum(rng.zipf(1.1, size=(n_pool, 120)) - 1, vocab - 1)
    return [" ".join(words[r])[:600] for r in ranks]


def measure_bm25(n: int, folder: str) -> dict:
    """Runs in a fresh process: build BM25 over `n` passages, save, load memory-mapped, search."""
    from modeling_rag.index import BM25Index

    pool = zipf_texts(20_000, 200_000, seed=3)
    passages = [{"title": "", "text": pool[i % len(pool)] + f" doc{i}", "row_id": i} for i in range(n)]
    t0 = time.perf_counter()
    bm25 = BM25Index.build(passages, stopwords=None)
    build_s = time.perf_counter() - t0
    build_peak = rss_bytes()["VmHWM"]
    bm25.save(folder)
    del bm25, passages
    gc.collect()
    disk = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    before = rss_bytes()["VmRSS"]
    t0 = time.perf_counter()
    loaded = BM25Index.load(folder, mmap=True)
    load_s = time.perf_counter() - t0
    after = rss_bytes()["VmRSS"]
    questions = [" ".join(pool[i].split()[:8]) for i in range(32)]
    loaded.search(questions[:1], 10)
    t0 = time.perf_counter()
    for q in questions[:8]:
        loaded.search([q], 10)
    single_s = (time.perf_counter() - t0) / 8
    t0 = time.perf_counter()
    loaded.search(questions, 10)
    batch_s = time.perf_counter() - t0
    return {
        "n": n,
        "build_s": build_s,
        "build_peak_rss": build_peak,
        "disk_bytes": disk,
        "load_s": load_s,
        "rss_added_by_load": after - before,
        "single_latency_s": single_s,
        "batch32_latency_s": batch_s,
    }


def bm25_main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.bm25_sizes:
        folder = work / f"bm25-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--measure-bm25", str(n), str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"BM25 measurement failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
        print(
            f"BM25 {n:>9,}: build {row['build_s']:.1f}s (peak RSS {row['build_peak_rss'] / 2**20:.0f} MiB)  "
            f"disk {row['disk_bytes'] / 2**20:.0f} MiB  load {row['load_s']:.2f}s (+{row['rss_added_by_load'] / 2**20:.0f} MiB)  "
            f"search 1q {row['single_latency_s'] * 1e3:.1f} ms  32q {row['batch32_latency_s'] * 1e3:.1f} ms",
            flush=True,
        )
        atomic_write_text(args.output, json.dumps({"settings": vars(args), "bm25": rows}, indent=2))


def scale_main(args: argparse.Namespace) -> None:
    from modeling_rag.index import PassageIndex

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # verification stamps of this run only, so that the first load really hashes every file
    os.environ["MODELING_RAG_HOME"] = str(work / "home")
    pool = synthetic_texts(10_000, seed=7)
    rows = []
    for n in args.scale_sizes:
        kinds = args.scale_kinds or (["ivf_flat", "ivf_pq"] if n * args.dim * 4 <= 4 << 30 else ["ivf_pq"])
        queries = clustered_vectors(args.queries, args.dim, args.clusters, seed=2)
        t0 = time.perf_counter()
        truth = exact_top_k(n, args.dim, args.clusters, queries, args.k)
        truth_s = time.perf_counter() - t0
        np.save(work / "queries.npy", queries)
        np.save(work / "truth.npy", truth)
        for kind in kinds:
            folder = work / f"index-{n}-{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work / "home", ignore_errors=True)
            gc.collect()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            t0 = time.perf_counter()
            with AnonPeak() as anon_peak:
                index = PassageIndex.build_streaming(
                    folder,
                    scale_batches(n, args.dim, args.clusters, pool),
                    total=n,
                    dim=args.dim,
                    kind=kind,
                    normalized=True,
                    show_progress=False,
                )
            build_s = time.perf_counter() - t0
            del index
            gc.collect()
            build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
            text_bytes = n * len(pool[0].encode("utf-8"))
            shutil.rmtree(work / "home", ignore_errors=True)  # build_streaming's own load stamped it
            first = _child_measure(folder, work, args.k)
            warm = _child_measure(folder, work, args.k)
            row = {
                "n": n,
                "kind": kind,
                "build_s": build_s,
                "build_peak_rss": max(build_peak, peak_before),
                "build_peak_rss_anon": anon_peak.peak,
                "exact_truth_s": truth_s,
                "files": files,
                "disk_bytes": sum(files.values()),
                "passage_text_bytes": text_bytes,
                "first": first,
                "warm": warm,
            }
            row["disk_vs_faiss_plus_text"] = row["disk_bytes"] / (files["index.faiss"] + text_bytes)
            row["rss_minus_faiss_file"] = warm["rss_after_load"] - files["index.faiss"]
            rows.append(row)
            print(
                f"{n:>9,} {kind:8} build {build_s:7.1f}s  disk "
                + " ".join(f"{k}={v / 2**20:.0f}MiB" for k, v in sorted(files.items()))
                + f"  disk/(faiss+text) {row['disk_vs_faiss_plus_text']:.2f}"
                f"  first load {first['load_s']:.2f}s  warm load {warm['load_s']:.3f}s"
                f"  RSS after load {warm['rss_after_load'] / 2**20:.0f} MiB (anon {warm['rss_anon_after_load'] / 2**20:.0f})"
                f"  after search {warm['rss_after_search'] / 2**20:.0f} MiB (anon {warm['rss_anon_after_search'] / 2**20:.0f})"
                f"  build peak anon {row['build_peak_rss_anon'] / 2**20:.0f} MiB"
                f"  search 1q {warm['single_latency_s'] * 1e3:.1f} ms  32q {warm['batch32_latency_s'] * 1e3:.1f} ms"
                f"  recall@{args.k} {warm['recall_at_10']:.3f}",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
            atomic_write_text(args.output, json.dumps({"settings": vars(args), "results": rows}, indent=2))
    print(f"\nWrote {args.output}")


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
    parser.add_argument("--scale", action="store_true", help="measure millions of passages (see the docstring)")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--scale-kinds", nargs="+", default=None, help="default: ivf_flat and ivf_pq that fit 4 GiB")
    parser.add_argument("--work-dir", default="benchmark_index_scale", help="--scale: where the indexes are built")
    parser.add_argument("--keep", action="store_true", help="--scale: keep the built index folders")
    parser.add_argument("--bm25-sizes", type=int, nargs="+", default=None, help="measure BM25 at these sizes")
    parser.add_argument("--measure-load", nargs=3, metavar=("FOLDER", "QUERIES", "TRUTH"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-bm25", nargs=2, metavar=("N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_bm25:
        print(json.dumps(measure_bm25(int(args.measure_bm25[0]), args.measure_bm25[1])))
        return
    if args.bm25_sizes:
        bm25_main(args)
        return
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load, k=args.k)))
        return
    if args.scale:
        if args.queries == 1000:
            args.queries = 200
        scale_main(args)
        return
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

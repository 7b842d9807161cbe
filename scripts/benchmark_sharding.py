"""Measures what sharding an index buys: resident memory per process and query cost, 1 vs 2 (vs 4) shards.

On a synthetic flat index of ``--n`` random unit vectors of size ``--dim`` (default 200k x 384) with short
passages, written once as a sharded folder of 1, 2 and 4 shards (`index/sharded.py`, built shard by shard):

* memory: in a fresh process each, the resident set size (``VmRSS`` / peak ``VmHWM`` from
  ``/proc/self/status``) after opening the whole index (1 shard), one shard of 2 (what each of 2 ranks
  holds) and one shard of 4, minus the process's size before opening;
* queries: ``--batch`` question vectors per call, ``--repeats`` calls, searching and fetching the passages
  and vectors of the top ``--k``: one process holding every shard (`ShardedPassageIndex`), then 2 gloo
  processes holding half each (`DistributedShardedIndex`, each with its own batch). Latency is the median
  time of one call; throughput the questions answered per second by all processes together.

Every process uses one thread (FAISS and torch), so 2 processes use 2 cores::

    OMP_NUM_THREADS=1 nice -n 19 python scripts/benchmark_sharding.py --work-dir /tmp/shardbench --output sharding.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from modeling_rag.utils.atomic import atomic_write_text

SHARD_COUNTS = (1, 2, 4)


def _vectors(start: int, stop: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(start)  # deterministic per block, whatever the shard layout
    v = rng.standard_normal((stop - start, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _block_vectors(start: int, stop: int, dim: int, block: int = 50_000) -> np.ndarray:
    # generated in fixed blocks of rows, so every layout holds the same vector for a row
    parts = []
    for b in range(start // block * block, stop, block):
        v = _vectors(b, b + block, dim)
        lo, hi = max(start, b) - b, min(stop, b + block) - b
        parts.append(v[lo:hi])
    return np.concatenate(parts)


def build(folder: Path, n: int, dim: int, num_shards: int) -> float:
    """Writes a flat sharded index of `num_shards` shards, one shard in memory at a time; returns seconds."""
    from modeling_rag.index.sharded import shard_bounds
    from modeling_rag.index.sharded_build import write_manifest, write_shard

    start_t = time.perf_counter()
    for shard, (start, stop) in enumerate(shard_bounds(n, num_shards)):
        passages = [{"id": f"p{i}", "title": f"Title {i}", "text": f"Synthetic passage number {i}."} for i in range(start, stop)]  # fmt: skip
        write_shard(folder, shard, num_shards, _block_vectors(start, stop, dim), passages, start, kind="flat")
    write_manifest(folder, num_shards)
    return time.perf_counter() - start_t


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def memory_child(folder: str, shards: list[int]) -> None:
    """Run in a fresh process: the RSS before and after opening `shards` of `folder` (JSON on stdout)."""
    import faiss

    from modeling_rag.index.sharded import ShardedPassageIndex

    faiss.omp_set_num_threads(1)
    before = _status()
    t = time.perf_counter()
    index = ShardedPassageIndex.open(folder, shards=shards, verify=False)
    seconds = time.perf_counter() - t
    after = _status()
    print(json.dumps({"rows": index.count, "before": before, "after": after, "open_seconds": seconds}))


def measure_memory(work: Path, num_shards: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(work / f"s{num_shards}"), "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "num_shards": num_shards,
        "rows_held": r["rows"],
        "rss_bytes": r["after"]["VmRSS"],
        "index_rss_bytes": r["after"]["VmRSS"] - r["before"]["VmRSS"],
        "peak_rss_bytes": r["after"]["VmHWM"],
        "open_seconds": r["open_seconds"],
    }


def _queries(seed: int, batch: int, dim: int) -> np.ndarray:
    return _vectors(10**9 + seed, 10**9 + seed + batch, dim)


def _time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def queries_one_process(folder: Path, batch: int, k: int, repeats: int, dim: int) -> dict:
    import faiss

    from modeling_rag.index.sharded import ShardedPassageIndex

    faiss.omp_set_num_threads(1)
    index = ShardedPassageIndex.open(folder, verify=False)
    q = _queries(0, batch, dim)

    def call():
        _, ids = index.search(q, k)
        index.get_passages(ids)
        index.get_embeddings(ids)

    times = _time_calls(call, repeats)
    return {"processes": 1, "median_latency_s": statistics.median(times), "qps": batch * len(times) / sum(times)}


def _dist_worker(rank: int, world: int, port: int, folder: str, batch: int, k: int, repeats: int, dim: int, out: str):
    import faiss
    import torch
    import torch.distributed as dist

    from modeling_rag.retrieval_distributed import DistributedShardedIndex

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        index = DistributedShardedIndex.open(folder, verify=False)
        q = _queries(rank, batch, dim)

        def call():
            _, ids = index.search(q, k)
            index.get_passages(ids)
            index.get_embeddings(ids)

        dist.barrier()
        times = _time_calls(call, repeats)
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"times": times, "rows_held": index.local_count, "status": _status()})
        )
    finally:
        dist.destroy_process_group()


def queries_two_processes(folder: Path, batch: int, k: int, repeats: int, dim: int, work: Path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "dist_out"
    out.mkdir(exist_ok=True)
    args = (2, port, str(folder), batch, k, repeats, dim, str(out))
    mp.start_processes(_dist_worker, args=args, nprocs=2, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    times = [max(a, b) for a, b in zip(ranks[0]["times"], ranks[1]["times"])]  # a call ends when both ranks have it
    return {
        "processes": 2,
        "median_latency_s": statistics.median(times),
        "qps": 2 * batch * len(times) / sum(times),
        "rows_held": [r["rows_held"] for r in ranks],
        "rss_bytes": [r["status"]["VmRSS"] for r in ranks],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", default="benchmark_sharding_work")
    parser.add_argument("--output", default="benchmark_sharding.json")
    parser.add_argument("--keep", action="store_true", help="keep the index folders")
    parser.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], [int(args.memory_child[1])])
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"n": args.n, "dim": args.dim, "batch": args.batch, "k": args.k, "repeats": args.repeats}
    results["build_seconds"] = {}
    for s in SHARD_COUNTS:
        if not (work / f"s{s}" / "shards.json").is_file():
            results["build_seconds"][s] = build(work / f"s{s}", args.n, args.dim, s)
    results["memory"] = [measure_memory(work, s) for s in SHARD_COUNTS]
    results["queries"] = [
        queries_one_process(work / "s1", args.batch, args.k, args.repeats, args.dim),
        queries_two_processes(work / "s2", args.batch, args.k, args.repeats, args.dim, work),
    ]
    atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    mib = 2**20
    print(f"{args.n} x {args.dim} float32, flat")
    for m in results["memory"]:
        print(
            f"  {m['num_shards']} shard(s): one process holds {m['rows_held']} rows, RSS {m['rss_bytes'] / mib:.0f} MiB "
            f"(+{m['index_rss_bytes'] / mib:.0f} MiB for the index, peak {m['peak_rss_bytes'] / mib:.0f} MiB)"
        )
    for q in results["queries"]:
        print(
            f"  {q['processes']} process(es): batch {args.batch}, k {args.k}: median {q['median_latency_s'] * 1000:.0f} ms "
            f"a call, {q['qps']:.0f} questions/s"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark run: phases in order, each timed, checked and counted; memory in fresh processes; the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .checks import BenchmarkMismatch, CheckLog, check_retrieval, check_tokens, check_training, check_weights
from .flops import work_flops
from .measure import matmul_peak, measure_extra_memory, paired_ratios, set_threads, time_alternating
from .report import format_table, phase_line
from .sides import Sides, answer_ids
from .workload import DEFAULT_DATA, GENERATOR_INIT_STD, PHASES, PRESETS, Settings, Workload, build_workload

SIDES = {"retrieval": ["ours", "ours_tokenising", "ours_warm", "theirs", "raw"], "concat": ["ours"]}


def lengths_of(mask: torch.Tensor) -> list[int]:
    return [int(x) for x in mask.sum(-1).tolist()]


def _input_lengths(sides: Sides, questions: list[str], mode: str) -> tuple[list[int], list[int]]:
    """Real question-encoder and generator input lengths of a batch (the same on both sides, checked)."""
    batch = sides.ours.prepare_inputs(questions, generation_mode=mode, for_generation=True)
    return lengths_of(batch["attention_mask"]), lengths_of(batch["context_attention_mask"])


def run_phase(sides: Sides, phase: str, s: Settings, use_cpu_clock: bool, log) -> tuple[dict, dict]:
    """Times one phase (all its sides, alternating); returns the row and the raw timings."""
    device = sides.device
    names = SIDES.get(phase, ["ours", "theirs"])
    fns = {side: sides.callables(phase, side) for side in names}
    finishers = {side: sides.finisher(phase, side) for side in names}
    # a shared machine's speed drifts over a long run: each phase is set against the peak measured just before it
    peak = matmul_peak(device, sides.dtype, clock=time.process_time if use_cpu_clock else time.perf_counter)
    log(
        f"timing {phase}: {', '.join(names)} (first call + {s.repeats} repeats, order alternating); "
        f"matmul peak now {peak / 1e9:.1f} GFLOP/s"
    )
    timed = time_alternating(fns, s.repeats, device, use_cpu_clock, finishers)
    row: dict = {"matmul_peak_gflops": peak / 1e9}
    for side, t in timed.items():
        row[side] = {k: v for k, v in t.items() if k != "outputs"}
    if "theirs" in timed:
        row["speedup"] = paired_ratios(timed, "theirs", "ours", use_cpu_clock)
    if phase == "retrieval":
        row["ours_over_raw"] = paired_ratios(timed, "ours", "raw", use_cpu_clock)
        row["theirs_over_raw"] = paired_ratios(timed, "theirs", "raw", use_cpu_clock)
    return row, timed


def _flops(sides: Sides, phase: str, s: Settings, distinct: int | None) -> float:
    g = sides.w.g_config
    if phase == "retrieval":
        q, _ = _input_lengths(sides, sides.w.retrieval_questions, "rag_token")
        return work_flops(phase, s, g, q, [])
    if phase == "train":
        q, ctx = _input_lengths(sides, sides.w.train_questions, "rag_token")
        ans = [len(answer_ids(sides.w.gtok, a, s.new_tokens)) for a in sides.w.train_answers]
        return work_flops(phase, s, g, q, ctx, ans)
    q, ctx = _input_lengths(sides, sides.questions_of(phase), "concat" if phase == "concat" else "rag_token")
    return work_flops(phase, s, g, q, ctx, distinct=distinct)


def _retrieval_and_inputs(sides: Sides, checks: CheckLog, timed_retrieval: bool, use_cpu_clock: bool, log):
    """Times retrieval when asked (first: its first call is the first after loading), then checks that
    both sides retrieve the same documents and build the same generator inputs. Returns (row, inputs)."""
    row = None
    if timed_retrieval:
        row, timed = run_phase(sides, "retrieval", sides.s, use_cpu_clock, log)
        ours, theirs = timed["ours"]["outputs"][0], timed["theirs"]["outputs"][0]
        variants = {
            f"{k} (call {i})": o
            for k in ("ours", "ours_tokenising", "ours_warm")
            for i, o in enumerate(timed[k]["outputs"])
        }
    else:
        ours, theirs, variants = sides.retrieval_ours(), sides.retrieval_theirs(), {}
    check_retrieval(checks, ours, theirs, sides.dtype, variants)
    t_rows = lengths_of(theirs["context_attention_mask"])
    inputs = {
        "distinct_passages_retrieved": len(set(ours["retrieved_doc_ids"].reshape(-1).tolist())),
        "generator_input_real_tokens": {
            "min": min(t_rows),
            "mean": round(statistics.mean(t_rows), 1),
            "max": max(t_rows),
        },
        "ours_padded_to": int(ours["context_input_ids"].shape[1]),
        "theirs_padded_to": int(theirs["context_input_ids"].shape[1]),
        "theirs_padding_fraction": round(1 - sum(t_rows) / theirs["context_attention_mask"].numel(), 3),
    }
    log(f"inputs: {json.dumps(inputs)}")
    return row, inputs


def _checked_phase(sides: Sides, phase: str, checks: CheckLog, use_cpu_clock: bool, log) -> dict:
    """Times a generation or training phase and checks that both sides' outputs agree."""
    row, timed = run_phase(sides, phase, sides.s, use_cpu_clock, log)
    outputs = {k: v["outputs"] for k, v in timed.items()}
    if phase == "train":
        check_training(checks, outputs, sides.dtype)
        row["loss_and_grad_norms"] = {k: v[0] for k, v in outputs.items()}
        return row
    check_tokens(checks, phase, outputs)
    first = outputs["ours"][0]
    row["generated_shape"] = list(first.shape)
    row["questions"] = first.shape[0]
    row["distinct_answers"] = len({tuple(x) for x in first.tolist()})
    return row


def _memory_inprocess(sides: Sides, phases: list[str], result: dict) -> None:
    for phase in phases:
        for side in ["ours"] + (["theirs"] if phase != "concat" else []):
            mib = measure_extra_memory(sides.callables(phase, side), sides.device)
            result["phases"][phase].setdefault("extra_peak_mib", {})[side] = mib
            if phase == "train":
                sides.finish_train(side, 0.0)


def run_dtype(w: Workload, args, dtype: torch.dtype, log, on_phase=None) -> dict:
    """All phases for one dtype; every check passes or `BenchmarkMismatch` stops the run."""
    device = torch.device(args.device)
    s = w.settings
    sides = Sides(w, args.device, dtype)
    checks = CheckLog()
    result: dict = {
        "dtype": str(dtype).replace("torch.", ""),
        "generator": s.generator,
        "generator_init_std": GENERATOR_INIT_STD[s.generator],
        "n_docs": s.n_docs,
        "clock": args.clock,
        "passages_cut_to_fit_the_budget": w.passages_cut,
        "passage_tokens_build_s": sides.passage_tokens_build_s,
        "phases": {},
        "checks": checks.checks,
    }
    if args.alter_weight:  # for tests: one weight of our generator differs, and the output checks must see it
        with torch.no_grad():
            sides.ours.generator.get_output_embeddings().weight[w.gtok.eos_token_id, 0] += 1.0
    else:
        check_weights(checks, sides.weights())
    result["weights"] = sides.weights()
    use_cpu_clock = args.clock == "cpu"
    peak = matmul_peak(device, dtype, clock=time.process_time if use_cpu_clock else time.perf_counter)
    result["matmul_peak_gflops"] = peak / 1e9
    log(f"[{result['dtype']}] matrix-multiply peak: {peak / 1e9:.1f} GFLOP/s")

    phases = [p for p in PHASES if p in args.phases]
    retrieval_row, result["inputs"] = _retrieval_and_inputs(sides, checks, "retrieval" in phases, use_cpu_clock, log)
    for phase in phases:
        distinct = None
        if phase == "rag_sequence":
            per_question = sides.distinct_hypotheses()
            distinct = sum(per_question)
            log(f"RAG-Sequence: distinct hypotheses per question {per_question}")
        row = retrieval_row if phase == "retrieval" else _checked_phase(sides, phase, checks, use_cpu_clock, log)
        if phase == "rag_sequence":
            row["distinct_hypotheses"] = per_question
        flops = _flops(sides, phase, s, distinct)
        row["model_gflops"] = flops / 1e9
        for side in SIDES.get(phase, ["ours", "theirs"]):
            row[side]["fraction_of_peak"] = flops / row[side]["median_s"] / (row["matmul_peak_gflops"] * 1e9)
        result["phases"][phase] = row
        log(phase_line(phase, row))
        if on_phase is not None:
            on_phase(result)
    if args.memory == "inprocess" or (args.memory == "subprocess" and device.type == "cuda"):
        _memory_inprocess(sides, phases, result)
    del sides
    gc.collect()
    return result


_OVERRIDES = (
    "passages",
    "questions",
    "sequence_questions",
    "repeats",
    "n_docs",
    "new_tokens",
    "train_batch",
    "generator",
)


def settings_from(args) -> Settings:
    s = dataclasses.replace(PRESETS[args.preset])
    for name in _OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    s.__post_init__()
    return s


def _worker_command(args, side: str, phase: str, dtype_name: str) -> list[str]:
    cmd = [sys.executable, "-m", "modeling_rag.benchmarking", "--preset", args.preset, "--device", args.device]
    cmd += ["--data", args.data, "--worker-dtype", dtype_name, "--threads", str(args.threads)]
    for name in _OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd + ["--memory-worker", f"{side}:{phase}"]


def memory_worker(args) -> None:
    """Subprocess entry: build one side, measure one phase's extra peak memory, print JSON."""
    side, phase = args.memory_worker.split(":")
    set_threads(args.threads)
    w = build_workload(settings_from(args), args.data)
    sides = Sides(w, args.device, getattr(torch, args.worker_dtype), sides=(side,))
    mib = measure_extra_memory(sides.callables(phase, side), torch.device(args.device))
    print("MEMORY_RESULT " + json.dumps({"side": side, "phase": phase, "extra_peak_mib": mib}), flush=True)


def memory_in_subprocesses(args, phases, dtype_name: str, log) -> dict:
    """Runs `memory_worker` in a fresh process for each (phase, side)."""
    out: dict = {}
    for phase in phases:
        for side in ["ours", "theirs"] if phase != "concat" else ["ours"]:
            proc = subprocess.run(_worker_command(args, side, phase, dtype_name), capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY_RESULT ")]
            if proc.returncode != 0 or not line:
                log(f"memory {side}:{phase} failed: {proc.stderr[-2000:]}")
                continue
            mib = json.loads(line[0][len("MEMORY_RESULT ") :])["extra_peak_mib"]
            out.setdefault(phase, {})[side] = mib
            log(f"memory {phase} {side}: {mib:.0f} MiB")
    return out


def run(args) -> dict:
    """The whole benchmark; returns (and writes, with `--output`, after every phase) the results."""
    log = (lambda msg: print(msg, flush=True)) if not args.silent else (lambda msg: None)
    set_threads(args.threads)
    s = settings_from(args)
    t0 = time.perf_counter()
    w = build_workload(s, args.data)
    log(
        f"{len(w.passages)} passages ({w.passages_cut} cut to fit the budget), {len(w.questions)} questions, "
        f"generator tokenizer {len(w.gtok)} tokens, generator vocab {w.g_config.vocab_size}, "
        f"{s.generator} generator (init std {GENERATOR_INIT_STD[s.generator]}), built in {time.perf_counter() - t0:.1f} s"
    )
    dtypes = args.dtypes or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"])
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + (args.argv if args.argv is not None else sys.argv)),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "settings": dataclasses.asdict(s),
        "runs": [],
    }

    def save(partial=None):
        if args.output:
            from modeling_rag.utils.atomic import atomic_write_text

            snapshot = dict(results, runs=results["runs"] + ([partial] if partial is not None else []))
            atomic_write_text(args.output, json.dumps(snapshot, indent=2, default=_jsonable))

    for name in dtypes:
        try:
            r = run_dtype(w, args, getattr(torch, name), log, on_phase=save)
        except BenchmarkMismatch as e:
            log(f"\n{e}")
            raise
        if args.memory == "subprocess" and args.device != "cuda":
            for phase, mem in memory_in_subprocesses(args, list(r["phases"]), name, log).items():
                r["phases"][phase]["extra_peak_mib"] = mem
        results["runs"].append(r)
        save()
    results["load_average_at_end"] = os.getloadavg()
    results["table"] = format_table(_plain(results))
    results["wall_s"] = time.perf_counter() - t0
    log("\n" + results["table"])
    save()
    if args.output:
        log(f"\nwrote {args.output}")
    return _plain(results)


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def _plain(results: dict) -> dict:
    return json.loads(json.dumps(results, default=_jsonable))


def parse_args(argv=None, default_data: str = DEFAULT_DATA) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Benchmarks modeling_rag's RagForGeneration against transformers' own RAG, on identical weights.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a small version (small models, 2k passages), a few minutes")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="sizes: full (default), quick or tiny (tests)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtypes", nargs="*", default=None, help="dtypes to run (default: float32; on cuda also bfloat16)")
    p.add_argument("--phases", nargs="*", default=list(PHASES), choices=PHASES, help="which work to time")
    p.add_argument(
        "--generator",
        choices=sorted(GENERATOR_INIT_STD),
        default=None,
        help="input_sensitive (default): an init scale at which greedy output follows the input, so RAG-Sequence\n"
        "rescores distinct hypotheses; random: BART's default init, whose output hardly depends on the input",
    )
    p.add_argument("--passages", type=int, default=None, help="number of passages in the index (default 20000)")
    p.add_argument("--questions", type=int, default=None, help="questions per RAG-Token / concat batch (default 32)")
    p.add_argument("--sequence-questions", type=int, default=None, help="questions per RAG-Sequence batch (default 8)")
    p.add_argument("--n-docs", dest="n_docs", type=int, default=None, help="documents per question (default 5)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None, help="generated tokens (default 16)")
    p.add_argument("--train-batch", dest="train_batch", type=int, default=None, help="training batch (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after the first call (default 5)")
    p.add_argument(
        "--memory",
        choices=("subprocess", "inprocess", "none"),
        default=None,
        help="how to measure extra peak memory (default: subprocess; inprocess with --quick / tiny)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="torch threads; 'auto' (default) uses every core, or 1 when the load average shows the cores are\n"
        "busy with other work (OpenMP threads that wait for a descheduled sibling make small ops ~50x slower)",
    )
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="what the ratios use: the wall clock, or the process CPU clock (only meaningful with one thread);\n"
        "'auto' (default): cpu when running one thread on the CPU, else wall. Both are always recorded.",
    )
    p.add_argument("--data", default=default_data, help="folder with passages.jsonl and questions.jsonl")
    p.add_argument("--output", default=None, help="write the results as JSON here (rewritten after every phase)")
    p.add_argument("--silent", action="store_true", help="print nothing")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--alter-weight", action="store_true", help=argparse.SUPPRESS)  # tests: the checks must stop
    args = p.parse_args(argv)
    args.argv = argv
    if args.threads == "auto":
        cores = os.cpu_count() or 1
        args.threads = 1 if os.getloadavg()[0] > cores - 0.5 else cores
    else:
        args.threads = int(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.preset is None:
        args.preset = "quick" if args.quick else "full"
    if args.memory is None:
        args.memory = "subprocess" if args.preset == "full" else "inprocess"
    return args


def main(argv=None, default_data: str = DEFAULT_DATA) -> dict | None:
    args = parse_args(argv, default_data)
    if args.memory_worker:
        memory_worker(args)
        return None
    return run(args)

"""Builds a retrieval index (FAISS + passages + optional BM25) from a corpus.

Single process::

    python scripts/build_index.py --corpus docs/ --encoder path/to/encoder --output my-index

Several processes (each encodes a shard; the main process saves)::

    accelerate launch --num_processes 2 scripts/build_index.py --corpus docs/ --encoder ... --output my-index --cpu

A sharded index (``--num-shards N``: N index folders plus a manifest, see modeling_rag/index/sharded.py) is
built shard by shard, holding one shard's vectors and FAISS index at a time; under ``accelerate launch``
process i builds shards i, i + world, ... and the main process writes the manifest once all are written.
A killed sharded build keeps its finished shards when run again. It has no BM25 index (dense retrieval)::

    accelerate launch --num_processes 2 scripts/build_index.py --corpus ... --encoder ... --output big --num-shards 4 --cpu

Vectors are encoded in shards saved under ``--work-dir`` (default ``<output>.build``): if the build is
killed, running the same command again encodes only the shards that were not finished. The work folder
is removed once the index is saved.
"""

from __future__ import annotations

import argparse
import os
import sys

from accelerate import Accelerator
from transformers import AutoModel, AutoTokenizer

from modeling_rag.encoders import clear_shard_dir
from modeling_rag.errors import RagError, RagInputError
from modeling_rag.library_output import configure_script_output
from modeling_rag.passage_tokens import tokenizer_fingerprint
from modeling_rag.retrieval_rag import RagRetriever


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="folder of .txt/.md files, a .jsonl or a .csv file")
    parser.add_argument("--encoder", required=True, help="local folder (or cached id) of the passage encoder")
    parser.add_argument("--output", required=True, help="index folder to write")
    parser.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"])
    parser.add_argument("--metric", default="ip", choices=["ip", "l2"])
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls", "pooler"])
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalise passage vectors")
    parser.add_argument("--max-tokens", type=int, default=None, help="passage size in tokens (default 200)")
    parser.add_argument("--overlap", type=int, default=None, help="overlap between chunks in tokens")
    parser.add_argument("--no-bm25", action="store_true", help="do not build the BM25 keyword index")
    parser.add_argument("--retrieval", default="dense", choices=["dense", "bm25", "hybrid"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where finished shards of vectors are kept until the index is saved "
        "(default: <output>.build); a rerun of a killed build resumes from them",
    )
    parser.add_argument("--shard-size", type=int, default=4096, help="passages per saved shard of vectors")
    parser.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="write a sharded index of this many shards, built one shard at a time (dense retrieval, no BM25)",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is available")
    parser.add_argument(
        "--generator-tokenizer",
        default=None,
        help="local folder (or cached id) of the generator's tokenizer: store the passages' token ids with the "
        "index, so a model answering from it never tokenises a passage (see modeling_rag/passage_tokens.py)",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own progress bars and notices")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_script_output(verbose=args.verbose)
    accelerator = Accelerator(cpu=args.cpu)
    work_dir = args.work_dir or os.path.normpath(args.output) + ".build"
    if args.num_shards is not None:
        return _main_sharded(args, accelerator)
    try:
        generator_tokenizer = None
        if args.generator_tokenizer:  # loaded and checked before the long build
            generator_tokenizer = AutoTokenizer.from_pretrained(args.generator_tokenizer)
            if tokenizer_fingerprint(generator_tokenizer) is None:
                raise RagInputError(
                    f"--generator-tokenizer {args.generator_tokenizer} is not a fast tokenizer, so its passage tokens "
                    "cannot be stored; leave the option out."
                )
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        encoder = AutoModel.from_pretrained(args.encoder).eval()
        retriever = RagRetriever.from_corpus(
            args.corpus,
            encoder,
            tokenizer,
            pooling=args.pooling,
            normalize=not args.no_normalize,
            max_tokens=args.max_tokens,
            overlap=args.overlap,
            kind=args.kind,
            metric=args.metric,
            bm25=not args.no_bm25,
            retrieval=args.retrieval,
            batch_size=args.batch_size,
            show_progress=True,
            encoder_name=args.encoder,
            accelerator=accelerator,
            work_dir=work_dir,
            shard_size=args.shard_size,
        )
    except (RagError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if accelerator.is_main_process:
        if generator_tokenizer is not None:
            retriever.store_passage_tokens(generator_tokenizer)
        retriever.save(args.output)
        clear_shard_dir(work_dir)
        index = retriever.index
        print(
            f"Saved {index.count} passages ({index.kind}, {index.metric}, dim {index.dim}) "
            f"from {accelerator.num_processes} process(es) to {args.output}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _main_sharded(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """Builds a sharded index: each process encodes and writes its own shards, the main one the manifest."""
    from modeling_rag.corpus import chunk_documents, chunking_config, passage_text, read_corpus
    from modeling_rag.encoders import encode_texts, weights_fingerprint
    from modeling_rag.index.sharded_build import build_shards

    try:
        if args.retrieval != "dense" or args.generator_tokenizer:
            raise RagInputError(
                "--num-shards builds a dense index only: leave out --retrieval bm25/hybrid and --generator-tokenizer."
            )
        if args.num_shards < 1:
            raise RagInputError(f"--num-shards must be a positive integer, got {args.num_shards}.")
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        encoder = AutoModel.from_pretrained(args.encoder).eval().to(accelerator.device)
        main_process = accelerator.is_main_process
        passages = chunk_documents(
            read_corpus(args.corpus), tokenizer, args.max_tokens, args.overlap, show_progress=False
        )
        max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        encoding = {"pooling": args.pooling, "normalize": not args.no_normalize, "max_length": max_length}

        def encode(part):
            return encode_texts(
                [passage_text(p) for p in part],
                encoder,
                tokenizer,
                batch_size=args.batch_size,
                device=accelerator.device,
                show_progress=main_process,
                desc="Encoding a shard",
                **encoding,
            )

        manifest = build_shards(
            args.output,
            passages,
            encode,
            args.num_shards,
            dim=int(encoder.config.hidden_size),
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
            kind=args.kind,
            metric=args.metric,
            encoder_name=args.encoder,
            encoder_fingerprint=weights_fingerprint(encoder),
            chunking=chunking_config(tokenizer, args.max_tokens, args.overlap),
            extra_config={"encoding": encoding, "retriever": {"retrieval": "dense", "bm25": False}},
        )
    except (RagError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if manifest is not None:
        print(
            f"Saved {manifest['count']} passages in {manifest['num_shards']} shards ({manifest['kind']}, "
            f"{manifest['metric']}, dim {manifest['dim']}) from {accelerator.num_processes} process(es) to {args.output}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())

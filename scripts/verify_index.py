"""Checks a saved index folder in full, or converts an index of an older format to the current one.

Loading an index hashes its files the first time and then trusts them while their size, modification
time and inode are unchanged. This script always hashes every file (sha256 against
``index_config.json``), then opens the index with all its parts (BM25, passage tokens) and reports
what it holds. ``--convert`` rewrites a folder of format version 1 (``passages.jsonl`` +
``embeddings.npy``) as the current format (``passages.arrow``, vectors kept once), atomically, in
place or into ``--output``.

Examples::

    python scripts/verify_index.py path/to/index
    python scripts/verify_index.py path/to/index --convert
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from modeling_rag.constants import INDEX_FORMAT_VERSION
from modeling_rag.errors import RagError
from modeling_rag.index import PassageIndex
from modeling_rag.retrieval_rag import RagRetriever


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an index folder (holding index_config.json)")
    parser.add_argument("--convert", action="store_true", help="rewrite an older index in the current format")
    parser.add_argument("--output", default=None, help="with --convert: write here instead of in place")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        t0 = time.perf_counter()
        version = PassageIndex.read_config(args.folder)["format_version"]
        PassageIndex.verify_files(args.folder, verify=True)
        retriever = RagRetriever.load(args.folder, verify=False)  # just hashed: check the structure
        index = retriever.index
        report = {
            "folder": args.folder,
            "format_version": version,
            "kind": index.kind,
            "count": index.count,
            "dim": index.dim,
            "exact_vectors": index.exact_vectors,
            "bm25": retriever.bm25 is not None,
            "passage_tokens": retriever.passage_tokens is not None,
            "verified_s": round(time.perf_counter() - t0, 3),
        }
        if args.convert:
            target = args.output or args.folder
            if version == INDEX_FORMAT_VERSION and target == args.folder:
                report["converted"] = False
            else:
                retriever.save(target)
                PassageIndex.load(target, verify=True)
                report.update(converted=True, output=target, format_version=INDEX_FORMAT_VERSION)
    except RagError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

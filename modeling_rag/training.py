"""Shared pieces of the training scripts (`scripts/train_retriever.py`, `train_generator.py`, `train_rag.py`).

* **Recipes**: every script takes ``--config recipe.yaml``; a recipe is a flat YAML mapping of the
  script's long option names (``learning_rate`` or ``learning-rate``). Precedence: argparse defaults <
  the YAML file < flags given on the command line. Unknown keys and values of the wrong type are errors.
* **Data**: question files (JSON lines with ``question``, ``answers``, optional ``positive_passage_ids``,
  ``positive_passages``, ``hard_negative_passage_ids``, or DPR's ``positive_ctxs`` / ``hard_negative_ctxs``),
  a folder written by ``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``
  ([`load_training_examples`]).
* **The Accelerate skeleton** ([`Trainer`]): one `prepare`, `accelerator.accumulate`, gradient clipping,
  a scheduler stepped once per optimizer step, checkpoints written atomically with `save_state` (into a
  temporary folder renamed into place), exact resume with `load_state` + `skip_first_batches` (the epoch's
  shuffle order is a function of the seed and the epoch), trackers through `log_with`, and a JSON-lines
  log of every optimizer step (``train_log.jsonl`` in the output folder).

A run that is resumed from a checkpoint reproduces the uninterrupted run: same batches, same random
state, same losses and weights (up to floating-point reduction order).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .atomic import atomic_write_text
from .constants import CHECKPOINTS_DIR, FINAL_MODEL_DIR, TRAIN_LOG_NAME, TRAINER_STATE_NAME
from .errors import DataFormatError, RagConfigError, RagInputError
from .library_output import configure_script_output
from .qa_data import QAExample, check_passage_ids, load_qa_examples

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS_DIR",
    "EpochSampler",
    "JsonlTracker",
    "TrainState",
    "Trainer",
    "add_common_training_args",
    "build_parser",
    "dense_topk",
    "encode_passages",
    "load_rag_model",
    "load_training_examples",
    "load_yaml_config",
    "parse_args",
    "passage_lookup",
    "reencode_retriever",
    "retrieval_metrics",
    "seed_everything",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")


# ============================================================================================
# Command line + YAML recipes
# ============================================================================================
def build_parser(description: str) -> argparse.ArgumentParser:
    """An `ArgumentParser` with the options every training script shares (see [`add_common_training_args`])."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    add_common_training_args(parser)
    return parser


def add_common_training_args(parser: argparse.ArgumentParser) -> None:
    """Adds the shared options: recipe, model, data, optimisation, Accelerate, checkpoints, tracking."""
    g = parser.add_argument_group("recipe")
    g.add_argument("--config", default=None, help="A YAML recipe of option values (overridden by command-line flags).")
    g.add_argument("--verbose", action="store_true", help="Also show the libraries' own progress bars and notices.")
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=None,
        help="A saved RagForGeneration folder (with its index) to start from. Alternatively give "
        "--question-encoder and --generator (and --corpus) to assemble one.",
    )
    g.add_argument(
        "--question-encoder",
        default=None,
        help="Question encoder to assemble a model from when --model is not given: a folder, a Hub id, or "
        "'default' (all-MiniLM-L6-v2 from modeling_rag.assets).",
    )
    g.add_argument(
        "--generator",
        default=None,
        help="Generator to assemble a model from when --model is not given: a folder, a Hub id, or 'default' "
        "(SmolLM2-135M-Instruct).",
    )
    g.add_argument(
        "--corpus",
        default=None,
        help="Passages to (re)build the model's index from (a .jsonl/.csv file or a folder of .txt/.md); "
        "needed when the model has no index.",
    )
    g.add_argument(
        "--index-max-tokens",
        type=int,
        default=None,
        help="Chunk size (question-encoder tokens) when building the index from --corpus; default: the "
        "package default (200, or smaller for a short encoder window).",
    )
    g.add_argument("--train-file", default=None, help="Training questions: a .jsonl file or a datasets folder.")
    g.add_argument("--dev-file", default=None, help="Validation questions (.jsonl or datasets folder), optional.")
    g.add_argument(
        "--max-train-examples", type=int, default=None, help="Use only the first N training questions (after loading)."
    )
    g.add_argument("--max-dev-examples", type=int, default=None, help="Use only the first N validation questions.")
    g.add_argument("--output-dir", default=None, help="Where checkpoints, logs and the final model are written.")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=42, help="Random seed (data order, dropout, initialisation).")
    g.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="Questions per batch on each process (global batch = this x processes x accumulation steps).",
    )
    g.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="Batches whose gradients add up to one step."
    )
    g.add_argument("--learning-rate", type=float, default=2e-5, help="Peak learning rate of AdamW.")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms).")
    g.add_argument("--num-epochs", type=int, default=1, help="Passes over the training questions.")
    g.add_argument(
        "--max-train-steps",
        type=int,
        default=None,
        help="Total optimizer steps; overrides --num-epochs when set.",
    )
    g.add_argument(
        "--lr-scheduler",
        default="linear",
        choices=["linear", "cosine", "constant", "constant_with_warmup"],
        help="Learning-rate schedule (transformers.get_scheduler).",
    )
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="Fraction of the steps spent warming up.")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g = parser.add_argument_group("accelerate")
    g.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: what `accelerate launch` / its config says. fp16 needs a GPU (falls "
        "back to 'no' with a warning elsewhere); bf16 needs a GPU or CPU with bf16 support.",
    )
    g.add_argument("--cpu", action="store_true", help="Train on the CPU even if an accelerator is available.")
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory (non-reentrant checkpointing).",
    )
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument(
        "--checkpointing-steps",
        default=None,
        help="Save the training state every N optimizer steps (an integer) or at the end of every 'epoch'.",
    )
    g.add_argument("--checkpoints-total-limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="A checkpoint folder (output-dir/checkpoints/step_N) to resume from, or 'latest' for the newest one "
        "in --output-dir (starting fresh when there is none).",
    )
    g.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="Stop this invocation after N optimizer steps (saving a checkpoint), as if interrupted; the "
        "schedule still spans the whole run. For time-boxed jobs resumed later with --resume-from-checkpoint.",
    )
    g.add_argument("--logging-steps", type=int, default=1, help="Log the training loss every N optimizer steps.")
    g.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="Validate on --dev-file every N optimizer steps (default: at the end of every epoch).",
    )
    g.add_argument("--with-tracking", action="store_true", help="Log metrics to experiment trackers (log_with).")
    g.add_argument(
        "--report-to",
        default="jsonl",
        help="Trackers for --with-tracking: 'all', a comma-separated list of accelerate tracker names "
        "(tensorboard, wandb, mlflow, ...), or 'jsonl' (a dependency-free tracker writing "
        "output-dir/tracking/<project>.jsonl).",
    )
    g.add_argument("--project-name", default="modeling_rag", help="Project / run name given to the trackers.")
    g.add_argument(
        "--save-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "original"],
        help="Dtype of the generator's weights in the saved model ('original': as loaded); encoders stay float32.",
    )
    g.add_argument("--no-save", action="store_true", help="Do not save the final model (checkpoints only).")


def _dest_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a flat YAML recipe into `{option_dest: value}` (dashes in keys become underscores)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise RagConfigError(f"Recipe {path} does not exist.") from e
    except yaml.YAMLError as e:
        raise RagConfigError(f"Recipe {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RagConfigError(f"Recipe {path} must be a mapping of option names to values, got {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(action: argparse.Action, value: Any, path: str) -> Any:
    key = action.option_strings[-1] if action.option_strings else action.dest
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise RagConfigError(f"{path}: {key} must be true or false, got {value!r}.")
        return value
    if action.type is not None and not isinstance(value, bool):
        try:
            if action.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            value = action.type(value)
        except (TypeError, ValueError) as e:
            raise RagConfigError(f"{path}: {key} must be {action.type.__name__}, got {value!r}.") from e
    elif action.type is None and not isinstance(value, (str, int, float)):
        raise RagConfigError(f"{path}: {key} must be a single value, got {type(value).__name__}.")
    if action.type is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise RagConfigError(f"{path}: {key} must be one of {list(action.choices)}, got {value!r}.")
    return value


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses `argv` with the recipe named by ``--config`` merged in: defaults < YAML < explicit flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        actions = _dest_actions(parser)
        values = load_yaml_config(known.config)
        unknown = [k for k in values if k not in actions or k == "config"]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, list(actions), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise RagConfigError(f"{known.config}: unknown option(s) {', '.join(hints)} for {parser.prog}.")
        values = resolve_recipe_paths(
            {k: _coerce(actions[k], v, known.config) for k, v in values.items()}, known.config
        )
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
        for key in RECIPE_INPUT_PATH_OPTIONS:
            # a recipe's input file that the command line did not replace must exist
            value = getattr(args, key, None)
            if key in values and value == values[key] and not os.path.exists(value):
                raise RagConfigError(
                    f"{known.config}: {key}: {value} does not exist (a relative path in a recipe is read from the "
                    f"recipe's folder). Fix it in the recipe or pass --{key.replace('_', '-')} PATH."
                )
        return args
    return parser.parse_args(argv)


# Recipe options that name input files: a relative value is read from the recipe's own folder, so that
# a recipe runs from any working directory. Outputs (`output_dir`) stay relative to where the user runs.
RECIPE_INPUT_PATH_OPTIONS = ("corpus", "train_file", "dev_file", "unanswerable_file")
# Options that may be a local folder or a Hub id: resolved against the recipe only where that path exists.
RECIPE_MODEL_PATH_OPTIONS = ("model", "question_encoder", "generator")


def resolve_recipe_paths(values: dict[str, Any], recipe_path: str | os.PathLike) -> dict[str, Any]:
    """Rewrites the recipe's relative input paths as paths relative to the recipe file's folder."""
    base = os.path.dirname(os.path.abspath(recipe_path))
    resolved = dict(values)
    for key, value in values.items():
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        candidate = os.path.normpath(os.path.join(base, value))
        if key in RECIPE_INPUT_PATH_OPTIONS:
            resolved[key] = candidate
        elif key in RECIPE_MODEL_PATH_OPTIONS and value != "default" and os.path.exists(candidate):
            resolved[key] = candidate
    return resolved


def require(args: argparse.Namespace, *names: str) -> None:
    """Raises a clear error for options that neither the command line nor the recipe gave."""
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise RagConfigError(f"Missing required option(s): {', '.join(missing)} (on the command line or in --config).")


# ============================================================================================
# Data
# ============================================================================================
def load_training_examples(
    source: Any,
    *,
    require_answers: bool = True,
    known_passage_ids: Iterable[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """Reads training or validation questions.

    Args:
        source: A JSON-lines (or JSON array) file, a folder written by `datasets` ``save_to_disk`` (a
            `Dataset`, or a `DatasetDict` with `split`, default ``"train"``), a `datasets.Dataset`, or a list
            of dicts. Fields: see `modeling_rag.qa_data`.
        require_answers: Rows without answers are errors (``True``) or get ``answers=[]``.
        known_passage_ids: When given, every positive / hard-negative passage id must be one of these.
        split: The split to take from a `DatasetDict` folder.
        limit: Keep only the first `limit` questions.

    Raises:
        DataFormatError: empty source, a row without question (or answers), unknown passage ids, ...
    """
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        import datasets

        try:
            ds = datasets.load_from_disk(os.fspath(source))
        except (FileNotFoundError, ValueError) as e:
            raise DataFormatError(
                f"{source} is a folder but not one written by datasets' save_to_disk; give a .jsonl file instead."
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("train" if "train" in ds else None)
            if name is None or name not in ds:
                raise DataFormatError(f"{source} holds the splits {list(ds)}; name one with split=.")
            ds = ds[name]
        source = ds
    examples = load_qa_examples(source, require_answers=require_answers)
    if limit is not None:
        examples = examples[: max(int(limit), 0)]
    if not examples:
        raise DataFormatError(f"No questions left in {source} (limit={limit}).")
    if known_passage_ids is not None:
        check_passage_ids(examples, known_passage_ids)
    return examples


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices) for a reproducible run."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


# ============================================================================================
# Model, passages, encoding
# ============================================================================================
def load_rag_model(args: argparse.Namespace, *, dtype: torch.dtype = torch.float32, build_index: bool = True):
    """The model named by ``--model`` (or assembled from ``--question-encoder`` / ``--generator``), in
    `dtype`, with its index (rebuilt from ``--corpus`` when given). Returns `(model, original_dtype)`."""
    from . import RagForGeneration

    if args.model:
        model = RagForGeneration.from_pretrained(args.model, load_index=not (build_index and args.corpus))
    elif args.question_encoder and args.generator:
        from .assets import resolve_model

        model = RagForGeneration.from_pretrained_question_encoder_generator(
            resolve_model(args.question_encoder, "question_encoder"),
            resolve_model(args.generator, "generator"),
        )
    else:
        raise RagConfigError("Give --model (a saved RAG model) or both --question-encoder and --generator.")
    original = next(model.generator.parameters()).dtype
    model.to(dtype)
    if build_index and args.corpus:
        logger.info("Building the index from %s", args.corpus)
        model.build_index(args.corpus, max_tokens=args.index_max_tokens, show_progress=False)
    return model, original


def passage_lookup(index) -> tuple[list[dict], dict[str, int]]:
    """All passages of `index` (in row order, each with ``row_id``) and a map from passage id to position.

    Ids of chunked documents (``doc#n``) are also reachable through the document id (first chunk),
    so questions can name documents.
    """
    passages = index.get_passages(index.row_ids)
    by_id: dict[str, int] = {}
    for pos, p in enumerate(passages):
        pid = str(p.get("id"))
        by_id[pid] = pos
    for pos, p in enumerate(passages):
        pid = str(p.get("id"))
        if "#" in pid:
            by_id.setdefault(pid.rsplit("#", 1)[0], pos)
    return passages, by_id


def positions_of(pid: str, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the passage `pid`, or of every chunk of the document `pid`."""
    if pid in by_id and str(passages[by_id[pid]].get("id")) == pid:
        return [by_id[pid]]
    prefix = pid + "#"
    found = [i for i, p in enumerate(passages) if str(p.get("id")).startswith(prefix)]
    if found:
        return found
    return [by_id[pid]] if pid in by_id else []


def passage_texts(passages: Sequence[dict]) -> list[str]:
    """The texts passages are encoded as (title + newline + text), as the index does."""
    from .corpus import passage_text

    return [passage_text(p) for p in passages]


def encode_passages(model, passages: Sequence[dict], *, batch_size: int = 64, device=None) -> np.ndarray:
    """Vectors `[N, d]` of `passages` with the model's passage encoder (no gradients)."""
    from .encoders import encode_texts

    return encode_texts(
        passage_texts(passages),
        model.passage_encoder,
        model.tokenizer.question_encoder,
        pooling=model.config.question_pooling,
        normalize=model.config.normalize_embeddings,
        batch_size=batch_size,
        device=device,
    )


def encode_questions(model, questions: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Vectors `[N, d]` of `questions` with the model's question encoder (no gradients)."""
    out = []
    was = model.question_encoder.training
    model.question_encoder.eval()
    with torch.no_grad():
        for s in range(0, len(questions), batch_size):
            enc = model.tokenize_questions(list(questions[s : s + batch_size]))
            enc = {k: v.to(next(model.question_encoder.parameters()).device) for k, v in enc.items()}
            out.append(model.encode_questions(**enc).float().cpu().numpy())
    model.question_encoder.train(was)
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.config.retrieval_vector_size), np.float32)


def dense_topk(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` `(scores, positions)` of `queries` `[B, d]` among `vectors` `[N, d]`, best first."""
    k = min(int(k), len(vectors))
    scores_out = np.empty((len(queries), k), dtype=np.float32)
    ids_out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        q = queries[s : s + 256]
        sc = q @ vectors.T
        if metric == "l2":
            sc = -(np.sum(q**2, 1)[:, None] - 2 * sc + np.sum(vectors**2, 1)[None, :])
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k] if k < sc.shape[1] else np.tile(np.arange(k), (len(q), 1))
        order = np.take_along_axis(sc, part, 1).argsort(axis=1, kind="stable")[:, ::-1]
        # ties: stable on descending means reversed; re-sort for deterministic best-first order
        top = np.take_along_axis(part, order, 1)
        top_scores = np.take_along_axis(sc, top, 1)
        ids_out[s : s + len(q)] = top
        scores_out[s : s + len(q)] = top_scores
    return scores_out, ids_out


def gold_positions(example: QAExample, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the example's gold passages in `passages` (chunks of gold documents included)."""
    out: list[int] = []
    for pid in example.positive_passage_ids:
        out.extend(positions_of(pid, by_id, passages))
    return sorted(set(out))


def negative_positions(example: QAExample, by_id: dict[str, int], passages: list[dict]) -> list[int]:
    """Positions of the example's hard-negative passages in `passages` (chunks of those documents included)."""
    out: list[int] = []
    for pid in example.hard_negative_passage_ids:
        out.extend(positions_of(pid, by_id, passages))
    return sorted(set(out))


def retrieval_metrics(
    question_vectors: np.ndarray,
    passage_vectors: np.ndarray,
    gold: Sequence[Sequence[int]],
    *,
    metric: str = "ip",
    ks: Sequence[int] = (1, 5, 10, 20),
) -> dict[str, float]:
    """Top-k accuracy (a gold passage among the first k), MRR and mean rank of the first gold passage.

    Questions without gold passages are skipped. Ranks are computed exactly over all passages.
    """
    rows = [i for i, g in enumerate(gold) if g]
    if not rows:
        return {"count": 0}
    q = question_vectors[rows]
    sc = q @ passage_vectors.T
    if metric == "l2":
        sc = -(np.sum(q**2, 1)[:, None] - 2 * sc + np.sum(passage_vectors**2, 1)[None, :])
    ranks = []
    for r, i in enumerate(rows):
        best = sc[r, list(gold[i])].max()
        ranks.append(int((sc[r] > best).sum()) + 1)
    ranks_a = np.asarray(ranks)
    out = {f"top{k}": float((ranks_a <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks_a).mean())
    out["mean_rank"] = float(ranks_a.mean())
    out["count"] = len(rows)
    return out


def reencode_retriever(model, *, batch_size: int = 64, accelerator=None):
    """A new retriever over the same passages, encoded with the model's current passage encoder.

    The index keeps its kind, metric, parameters and chunking record; BM25 is rebuilt when the old
    retriever had one. Returns the new `RagRetriever` (not attached).
    """
    from .encoders import weights_fingerprint
    from .index_bm25 import BM25Index
    from .index_faiss import PassageIndex
    from .retrieval_rag import RagRetriever

    old = model.retriever
    index = old.index
    passages, _ = passage_lookup(index)
    if accelerator is not None and accelerator.num_processes > 1:
        from .retrieval_rag import _encode_sharded

        emb = _encode_sharded(
            passage_texts(passages),
            model.passage_encoder,
            model.tokenizer.question_encoder,
            accelerator,
            {
                "pooling": model.config.question_pooling,
                "normalize": model.config.normalize_embeddings,
                "batch_size": batch_size,
            },
        )
    else:
        emb = encode_passages(model, passages, batch_size=batch_size)
    clean = [{k: v for k, v in p.items() if k != "row_id"} for p in passages]
    new_index = PassageIndex.build(
        emb,
        clean,
        metric=index.metric,
        kind=index.kind,
        encoder_name=index.encoder_name,
        encoder_fingerprint=weights_fingerprint(model.passage_encoder),
        chunking=index.chunking,
        **index.kind_params,
    )
    encoding = index.config.get("encoding")
    if encoding:
        new_index.set_extra_config("encoding", encoding)
    bm25 = BM25Index.build(new_index.get_passages(new_index.row_ids)) if old.bm25 is not None else None
    retriever = RagRetriever(
        new_index,
        bm25,
        retrieval=old.retrieval,
        fusion=old.fusion,
        rrf_k=old.rrf_k,
        hybrid_alpha=old.hybrid_alpha,
        fusion_normalization=old.fusion_normalization,
        fusion_depth=old.fusion_depth,
    )
    if old.passage_tokens is not None and model.tokenizer is not None:  # row ids are new: store them again
        retriever.store_passage_tokens(model.tokenizer.generator, show_progress=False)
    return retriever


def freeze_passage_side(model) -> None:
    """Keeps passages encoded as the index has them: the model gets a frozen `context_encoder`.

    When the model has no separate context encoder, a copy of the question encoder becomes one and
    ``config.context_encoder`` gets a copy of the question encoder's sub-config, so that a saved model
    rebuilds the two encoders separately (weights ``context_encoder.*``) and the index fingerprint,
    taken from the passage encoder, still matches.
    """
    if model.context_encoder is None:
        model.context_encoder = copy.deepcopy(model.question_encoder)
        model.config.context_encoder = copy.deepcopy(model.config.question_encoder)
    model.context_encoder.requires_grad_(False)
    model.context_encoder.eval()


def freeze_unused_pooler(model) -> None:
    """Freezes the encoders' pooler layers when pooling does not use them ("mean" / "cls"), so that no
    trainable parameter goes without a gradient (DDP would otherwise need find_unused_parameters)."""
    if model.config.question_pooling == "pooler":
        return
    for enc in (model.question_encoder, model.context_encoder):
        pooler = getattr(enc, "pooler", None) if enc is not None else None
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(False)


def untie_passage_side(model) -> None:
    """Gives the model a separate, trainable context encoder (a copy of the question encoder)."""
    if model.context_encoder is None:
        model.context_encoder = copy.deepcopy(model.question_encoder)
        model.config.context_encoder = copy.deepcopy(model.config.question_encoder)
    model.context_encoder.requires_grad_(True)


def cast_for_saving(model, save_dtype: str, original: torch.dtype) -> None:
    """Casts the generator to the dtype named by ``--save-dtype`` before `save_pretrained`.

    The encoders stay in float32: the index records the passage encoder's weight fingerprint, which
    includes the dtype.
    """
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(save_dtype, original)
    model.generator.to(target)


# ============================================================================================
# The Accelerate skeleton
# ============================================================================================
class EpochSampler(Sampler[int]):
    """Indices `0..n-1`, shuffled with a permutation that depends only on `seed` and the epoch.

    Every process draws the same order, and a resumed run replays the same order for the epoch it
    resumes in. Call [`set_epoch`] before iterating.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _identity_collate(items):
    return list(items)


@dataclass
class TrainState:
    """What a checkpoint holds besides model, optimizer, scheduler and random states."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "extra": self.extra,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.extra = dict(state.get("extra") or {})

    def save(self, folder: str) -> None:
        """Writes the state as JSON into a checkpoint folder (atomically)."""
        atomic_write_text(os.path.join(folder, TRAINER_STATE_NAME), json.dumps(_jsonable(self.state_dict())) + "\n")

    def load(self, folder: str) -> None:
        """Reads the state a checkpoint folder holds, checking every field (no pickle involved)."""
        path = os.path.join(folder, TRAINER_STATE_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise RagConfigError(
                f"{folder} has no {TRAINER_STATE_NAME}: it is not a complete checkpoint of these training scripts. "
                "Resume from a checkpoints/step_N folder they wrote, or start afresh."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RagConfigError(f"{path} is not valid JSON ({err}); the checkpoint is damaged.") from None
        ok = isinstance(state, dict) and isinstance(state.get("extra", {}), dict)
        ok = ok and all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
            for k in ("global_step", "epoch", "batches_in_epoch")
        )
        if not ok:
            raise RagConfigError(
                f"{path} must hold non-negative integers global_step, epoch, batches_in_epoch and an object extra; "
                "the checkpoint is damaged."
            )
        self.load_state_dict(state)


try:  # accelerate's tracker base class, for a dependency-free JSON-lines tracker
    from accelerate.tracking import GeneralTracker, on_main_process
except ImportError:  # pragma: no cover
    GeneralTracker = object  # type: ignore[misc,assignment]

    def on_main_process(f):  # type: ignore[no-redef]
        return f


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker that appends `{"step": ..., **values}` lines to ``<logging_dir>/<run>.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        os.makedirs(logging_dir, exist_ok=True)
        self.path = os.path.join(logging_dir, f"{run_name}.jsonl")

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"config": _jsonable(values)}) + "\n")

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **_jsonable(values)}) + "\n")


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif not isinstance(v, (str, int, float, bool, type(None), list, dict)):
            v = str(v)
        out[k] = v
    return out


def create_accelerator(args: argparse.Namespace, *, find_unused_parameters: bool = False):
    """The run's `Accelerator`: CPU flag, mixed precision (checked against the hardware), accumulation,
    trackers (``--with-tracking`` / ``--report-to``) and the project folder."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mixed = args.mixed_precision
    cpu = bool(args.cpu)
    if not cpu and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # launched as several processes (torchrun / accelerate launch --multi_gpu) on a machine without
        # GPUs: without cpu=True accelerate would not join the processes; use gloo on the CPU
        cpu = True
    on_gpu = torch.cuda.is_available() and not cpu
    if mixed == "fp16" and not on_gpu:
        logger.warning("--mixed-precision fp16 needs a GPU; training in full precision instead.")
        mixed = "no"
    log_with = None
    if args.with_tracking:
        names = [n.strip() for n in str(args.report_to).split(",") if n.strip()]
        log_with = []
        for n in names:
            if n == "jsonl":
                log_with.append(JsonlTracker(args.project_name, os.path.join(args.output_dir, "tracking")))
            else:
                log_with.append(n)
    kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=False),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs_handlers,
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def _checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints (``step_N`` folders) in `output_dir`, oldest first."""
    root = _checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator, output_dir: str, step: int, total_limit: int | None = None, state: TrainState | None = None
) -> str:
    """`save_state` (plus `state` as JSON) into a temporary folder, then rename it to ``checkpoints/step_<step>``.

    A run killed while saving leaves only a ``.tmp-step_<step>`` folder, which resume ignores.
    Every process must call this (each saves its own random state).
    """
    root = _checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp-step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state is not None:
            state.save(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """The checkpoint folder named by ``--resume-from-checkpoint`` (`'latest'` = newest or None)."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(spec):
        raise RagConfigError(f"--resume-from-checkpoint: {spec} is not a checkpoint folder.")
    return spec


def _optimizer(params, args, learning_rate_for: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; `learning_rate_for(name)` may give parameters their own rate."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in params:
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        lr = float(learning_rate_for(name)) if learning_rate_for is not None else float(args.learning_rate)
        groups.setdefault((no_decay, lr), []).append(p)
    if not groups:
        raise RagConfigError("Nothing to train: every parameter is frozen.")
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": 0.0 if no_decay else args.weight_decay, "lr": lr}
            for (no_decay, lr), ps in sorted(groups.items())
        ],
        lr=args.learning_rate,
    )


class Trainer:
    """The Accelerate training loop shared by the scripts.

    The script gives `train_step(examples) -> loss` (the loss already back-propagated through
    `accelerator.backward`, detached); the trainer owns data order, accumulation, clipping, optimizer and
    scheduler steps, logging, evaluation, checkpoints and resume.

    Args:
        accelerator: From [`create_accelerator`].
        args: The parsed options (see [`add_common_training_args`]).
        module: The `nn.Module` holding the trainable parameters (prepared here, once).
        num_examples: Training questions; batches are lists of their indices.
        train_step: Called inside `accelerator.accumulate(module)` with the list of example indices.
        evaluate: Optional `() -> dict` of validation metrics (called on every process).
        on_epoch_start: Optional `(epoch, state) -> None`, e.g. hard-negative mining; it may store what
            must survive a resume in `state.extra` (checkpointed).
        named_parameters: The `(name, parameter)` pairs to optimise (default: the module's trainable ones).
        learning_rate_for: Optional `(parameter name) -> learning rate`, for parameters that train at
            their own rate (default: `args.learning_rate` for all); the schedule scales every rate alike.
        on_step_end: Optional `(state) -> None` called on every process after each optimizer step (e.g.
            re-encoding the index), before logging and checkpointing.
    """

    def __init__(
        self,
        accelerator,
        args: argparse.Namespace,
        module: torch.nn.Module,
        num_examples: int,
        train_step: Callable[[list[int]], torch.Tensor],
        *,
        evaluate: Callable[[], dict] | None = None,
        on_epoch_start: Callable[[int, TrainState], None] | None = None,
        named_parameters: Iterable | None = None,
        on_step_end: Callable[[TrainState], None] | None = None,
        learning_rate_for: Callable[[str], float] | None = None,
    ):
        from transformers import get_scheduler

        self.accelerator = accelerator
        self.args = args
        self.train_step = train_step
        self.evaluate = evaluate
        self.on_epoch_start = on_epoch_start
        self.on_step_end = on_step_end
        self.stopped_early = False
        self.sampler = EpochSampler(num_examples, args.seed)
        loader = DataLoader(
            list(range(num_examples)),
            batch_size=args.batch_size,
            sampler=self.sampler,
            collate_fn=_identity_collate,
            # its own generator: creating an iterator then draws no number from the global torch RNG,
            # which a resumed run restores to the checkpoint's state
            generator=torch.Generator().manual_seed(int(args.seed)),
        )
        optimizer = _optimizer(named_parameters or module.named_parameters(), args, learning_rate_for)
        self.module, self.optimizer, self.dataloader = accelerator.prepare(module, optimizer, loader)
        self.batches_per_epoch = len(self.dataloader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_steps:
            self.max_steps = int(args.max_train_steps)
            self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        else:
            self.num_epochs = int(args.num_epochs)
            self.max_steps = self.num_epochs * self.steps_per_epoch
        scheduler = get_scheduler(
            args.lr_scheduler,
            self.optimizer.optimizer,
            num_warmup_steps=int(args.warmup_ratio * self.max_steps),
            num_training_steps=self.max_steps,
        )
        self.scheduler = accelerator.prepare(scheduler)
        # the step counters go into each checkpoint as JSON (TrainState.save), not through
        # register_for_checkpointing, whose custom_checkpoint_*.pkl accelerate unpickles without restriction
        self.state = TrainState()
        self.log_path = os.path.join(args.output_dir, TRAIN_LOG_NAME)
        self.history: list[dict] = []
        self.checkpoint_every = None
        self.checkpoint_epochs = False
        if args.checkpointing_steps is not None:
            spec = str(args.checkpointing_steps)
            if spec == "epoch":
                self.checkpoint_epochs = True
            elif spec.isdigit() and int(spec) > 0:
                self.checkpoint_every = int(spec)
            else:
                raise RagConfigError(f"--checkpointing-steps must be a positive integer or 'epoch', got {spec!r}.")
        if args.with_tracking:
            accelerator.init_trackers(args.project_name, config=_jsonable(vars(args)))
        fresh = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir) is None
        if fresh and accelerator.is_main_process and os.path.exists(self.log_path):
            os.remove(self.log_path)  # a new run starts a new log
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
        if self.args.with_tracking:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.accelerator,
            self.args.output_dir,
            self.state.global_step,
            self.args.checkpoints_total_limit,
            state=self.state,
        )

    def evaluate_before_training(self) -> dict | None:
        """Runs `evaluate` once before the first step of a fresh run and logs it as step 0.

        Returns the metrics, or None when there is no `evaluate` or the run resumes from a checkpoint.
        """
        if self.evaluate is None or self.args.resume_from_checkpoint:
            return None
        metrics = self.evaluate()
        if not metrics:
            return None
        self._log({"step": 0, "epoch": 0, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.accelerator.print(f"Before training: {metrics}")
        return metrics

    def _run_eval(self) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate()
        if metrics:
            record = {"step": self.state.global_step, "epoch": self.state.epoch}
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            self._log(record)
            if self.accelerator.is_main_process:
                logger.info("step %d eval %s", self.state.global_step, metrics)

    def resume(self) -> bool:
        """Loads ``--resume-from-checkpoint`` if given; returns whether a checkpoint was loaded."""
        path = resolve_checkpoint(self.args.resume_from_checkpoint, self.args.output_dir)
        if path is None:
            return False
        self.accelerator.print(f"Resuming from {path}")
        self.state.load(path)  # first: a folder that is not our checkpoint is refused before loading anything
        self.accelerator.load_state(path)
        if self.accelerator.is_main_process and os.path.exists(self.log_path):
            # drop log lines written after the checkpoint by the interrupted run (and a line cut by a kill)
            kept = []
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("step", 0) <= self.state.global_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            atomic_write_text(self.log_path, "".join(kept))
        return True

    def _current_learning_rate(self) -> float:
        """`--learning-rate` as the schedule has scaled it now (groups with their own rate scale alike)."""
        group = self.optimizer.param_groups[0]
        return self.scheduler.get_last_lr()[0] * float(self.args.learning_rate) / float(group["initial_lr"])

    def train(self) -> list[dict]:
        """Runs (or resumes) the training loop; returns this invocation's log records."""
        acc, args, state = self.accelerator, self.args, self.state
        self.resume()
        start_epoch = state.epoch
        skip = state.batches_in_epoch
        if skip >= self.batches_per_epoch:
            start_epoch, skip = start_epoch + 1, 0
        steps_this_run = 0
        t0 = time.time()
        self.module.train()
        done = state.global_step >= self.max_steps
        for epoch in range(start_epoch, self.num_epochs):
            if done:
                break
            state.epoch = epoch
            self.sampler.set_epoch(epoch)
            resuming_mid_epoch = epoch == start_epoch and skip > 0
            if self.on_epoch_start is not None and not resuming_mid_epoch:
                self.on_epoch_start(epoch, state)
                self.module.train()
            loader = acc.skip_first_batches(self.dataloader, skip) if resuming_mid_epoch else self.dataloader
            # accelerate's loaders re-set their sampler's epoch from their own counter when iterated
            loader.set_epoch(epoch)
            state.batches_in_epoch = skip if resuming_mid_epoch else 0
            losses: list[torch.Tensor] = []
            for batch in loader:
                with acc.accumulate(self.module):
                    loss = self.train_step(batch)
                    losses.append(loss.detach().float())
                    if acc.sync_gradients:
                        if args.max_grad_norm and args.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.module.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                steps_this_run += 1
                if self.on_step_end is not None:
                    self.on_step_end(state)
                    self.module.train()
                step_loss = acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean").item()
                losses = []
                if state.global_step % max(args.logging_steps, 1) == 0 or state.global_step == self.max_steps:
                    self._log(
                        {
                            "step": state.global_step,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": self._current_learning_rate(),
                            "elapsed_s": round(time.time() - t0, 2),
                        }
                    )
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    self._run_eval()
                    self.module.train()
                if self.checkpoint_every and state.global_step % self.checkpoint_every == 0:
                    self._checkpoint()
                if state.global_step >= self.max_steps:
                    done = True
                    break
                if args.stop_after_steps and steps_this_run >= args.stop_after_steps:
                    if not (self.checkpoint_every and state.global_step % self.checkpoint_every == 0):
                        self._checkpoint()
                    acc.print(f"Stopping after {steps_this_run} steps (--stop-after-steps); resume to continue.")
                    self.stopped_early = True
                    return self.history
            if not args.eval_steps:
                self._run_eval()
                self.module.train()
            if self.checkpoint_epochs:
                self._checkpoint()
        self.stopped_early = False
        return self.history

    def end(self) -> None:
        """Closes the trackers."""
        if self.args.with_tracking:
            self.accelerator.end_training()


def enable_gradient_checkpointing(*modules) -> None:
    """Non-reentrant gradient checkpointing (safe with DDP and with frozen inputs) on each module."""
    for m in modules:
        if m is None:
            continue
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def setup_logging(accelerator, verbose: bool = False) -> None:
    """INFO logging on the main process, warnings elsewhere; the libraries' bars and notices only if `verbose`."""
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("faiss", "faiss.loader", "bm25s", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
        configure_script_output(verbose)
    else:
        logging.getLogger().setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def save_final_model(accelerator, model, args, original_dtype) -> str | None:
    """`save_pretrained` of the model (index included) into ``output-dir/final`` on the main process."""
    if args.no_save:
        return None
    out = os.path.join(args.output_dir, FINAL_MODEL_DIR)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cast_for_saving(model, args.save_dtype, original_dtype)
        model.save_pretrained(out)
        accelerator.print(f"Saved the model to {out}")
    accelerator.wait_for_everyone()
    return out


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raises for options that must be positive integers."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise RagInputError(f"--{n.replace('_', '-')} must be a positive integer, got {v!r}.")


# ============================================================================================
# Generator helpers: LoRA, context limits, answer metrics
# ============================================================================================
def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """``--lora`` and its settings (peft); adapters are merged into the generator before saving."""
    g = parser.add_argument_group("LoRA (peft)")
    g.add_argument("--lora", action="store_true", help="Train LoRA adapters on the generator instead of all weights.")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r).")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="Dropout on the LoRA branch.")
    g.add_argument(
        "--lora-target-modules",
        default="all-linear",
        help="Modules that get adapters: 'all-linear' or a comma-separated list of module names (q_proj,v_proj).",
    )


def add_context_args(parser: argparse.ArgumentParser) -> None:
    """Options that limit the generator's context; they are stored in the saved model's config."""
    g = parser.add_argument_group("context")
    g.add_argument("--n-docs", type=int, default=None, help="Passages per question (sets config.n_docs).")
    g.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="Token budget of one generator input (sets config.max_input_tokens; passages are cut to fit).",
    )
    g.add_argument(
        "--max-passage-tokens", type=int, default=None, help="Tokens kept per passage (sets config.max_passage_tokens)."
    )
    g.add_argument(
        "--eval-max-new-tokens", type=int, default=24, help="Greedy generation length when measuring EM / F1."
    )
    g.add_argument("--eval-batch-size", type=int, default=8, help="Questions per generation batch in evaluation.")


def apply_context_args(model, args: argparse.Namespace) -> None:
    """Writes ``--n-docs`` / ``--max-input-tokens`` / ``--max-passage-tokens`` into the model's config."""
    for name in ("n_docs", "max_input_tokens", "max_passage_tokens"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise RagConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
            setattr(model.config, name, int(value))
    model.config.validate_rag()


def apply_lora(model, args: argparse.Namespace) -> None:
    """Wraps `model.generator` in a peft LoRA model (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
    task = "SEQ_2_SEQ_LM" if model.is_generator_encoder_decoder else "CAUSAL_LM"
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type=task,
    )
    model.generator = get_peft_model(model.generator, config)


def merge_lora(model) -> None:
    """Merges LoRA adapters into the generator's weights (a plain transformers model again)."""
    if hasattr(model.generator, "merge_and_unload"):
        model.generator = model.generator.merge_and_unload()


def retrieve_all(model, questions: Sequence[str], n_docs: int, batch_size: int = 32) -> tuple[list, list]:
    """Retrieves `n_docs` passages for every question with the model's retriever (no gradients).

    Returns `(passage_lists, score_lists)`, plain Python lists that can be cached as JSON.
    """
    passages, scores = [], []
    for s in range(0, len(questions), batch_size):
        out = model.retrieve(list(questions[s : s + batch_size]), n_docs)
        for plist, sc in zip(out.passages, np.asarray(out.doc_scores).tolist()):
            passages.append([{k: p.get(k) for k in ("id", "title", "text", "source", "row_id")} for p in plist])
            scores.append([float(x) for x in sc])
    return passages, scores


def answer_metrics(
    model,
    examples: Sequence[QAExample],
    *,
    passages: Sequence[Sequence[dict]] | None = None,
    doc_scores: Sequence[Sequence[float]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
) -> tuple[dict, list[str]]:
    """SQuAD exact match and F1 (percent, max over gold answers) of greedy answers. Returns
    `(metrics, predictions)`."""
    from .metrics import exact_match_score, f1_score, metric_max_over_ground_truths

    was = model.training
    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            kwargs: dict[str, Any] = {}
            if passages is not None:
                kwargs["passages"] = [list(p) for p in passages[s : s + batch_size]]
                if doc_scores is not None:
                    kwargs["doc_scores"] = [list(x) for x in doc_scores[s : s + batch_size]]
            out = model.answer(
                [ex.question for ex in chunk], max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs
            )
            preds.extend(a.answer for a in out)
    model.train(was)
    em = [metric_max_over_ground_truths(exact_match_score, p, ex.answers) for p, ex in zip(preds, examples)]
    f1 = [metric_max_over_ground_truths(f1_score, p, ex.answers) for p, ex in zip(preds, examples)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1)), "count": len(preds)}, preds


def broadcast_from_main(accelerator, compute: Callable[[], Any]) -> Any:
    """Runs `compute` on the main process only and hands its (picklable) result to every process."""
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    payload = [compute() if accelerator.is_main_process else None]
    broadcast_object_list(payload, from_process=0)
    return payload[0]


def write_final_metrics(accelerator, trainer, output_dir: str, before: dict | None, t_start: float) -> dict | None:
    """Writes ``final_metrics.json`` (dev metrics before and after, training time) atomically, on the
    main process; returns what it wrote (``None`` on other processes)."""
    import json
    import time

    from .atomic import atomic_write_text

    if not accelerator.is_main_process:
        return None
    final = {"before": before, "train_seconds": round(time.time() - t_start, 1)}
    evals = [h for h in trainer.history if "eval_f1" in h]
    if evals:
        final["after"] = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")}
    atomic_write_text(os.path.join(output_dir, "final_metrics.json"), json.dumps(final, indent=2))
    return final

"""The command line of the training scripts: shared options and YAML recipes.

Every script takes ``--config recipe.yaml``; a recipe is a flat YAML mapping of the script's long
option names (``learning_rate`` or ``learning-rate``). Precedence: argparse defaults < the YAML
file < flags given on the command line. Unknown keys and values of the wrong type are errors.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import RagConfigError, RagInputError

logger = logging.getLogger(__name__)


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
    _add_model_and_data_args(parser)
    _add_optimisation_args(parser)
    _add_accelerate_args(parser)
    _add_checkpoint_and_logging_args(parser)


def _add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    """The model to start from (or assemble), its corpus, the questions and the output folder."""
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


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    """Seed, batch, AdamW and the learning-rate schedule."""
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


def _add_accelerate_args(parser: argparse.ArgumentParser) -> None:
    """Mixed precision, device and gradient checkpointing."""
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


def _add_checkpoint_and_logging_args(parser: argparse.ArgumentParser) -> None:
    """Checkpoints, resuming, validation, trackers and the saved model."""
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


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raises for options that must be positive integers."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise RagInputError(f"--{n.replace('_', '-')} must be a positive integer, got {v!r}.")


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

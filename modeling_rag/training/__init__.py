"""What the training scripts (`scripts/train_retriever.py`, `train_generator.py`, `train_rag.py`) share.

- `cli`: shared options and YAML recipes;
- `data`: question files, index passages, the epoch order;
- `model_setup`: the model of a run (loading, freezing, LoRA, gradient checkpointing, the final save);
- `trainer`: the Accelerate loop with exact resume, checkpoints and logs;
- `evaluation`: retrieval and answer metrics, the final report.

`__all__` is exactly what the scripts import.
"""

from ..constants import CHECKPOINTS_DIR
from .cli import (
    add_context_args,
    add_lora_args,
    build_parser,
    check_positive,
    load_yaml_config,
    parse_args,
    require,
)
from .data import (
    EpochSampler,
    gold_positions,
    load_training_examples,
    negative_positions,
    passage_lookup,
    passage_texts,
)
from .evaluation import (
    answer_metrics,
    dense_topk,
    encode_passages,
    encode_questions,
    reencode_retriever,
    retrieval_metrics,
    retrieve_all,
    write_final_metrics,
)
from .model_setup import (
    apply_context_args,
    apply_lora,
    cast_for_saving,
    enable_gradient_checkpointing,
    freeze_passage_side,
    freeze_unused_pooler,
    load_rag_model,
    merge_lora,
    save_final_model,
    seed_everything,
    untie_passage_side,
)
from .trainer import JsonlTracker, Trainer, TrainState, broadcast_from_main, create_accelerator, setup_logging

__all__ = [
    "Trainer",
    "add_context_args",
    "add_lora_args",
    "answer_metrics",
    "apply_context_args",
    "apply_lora",
    "broadcast_from_main",
    "build_parser",
    "cast_for_saving",
    "check_positive",
    "create_accelerator",
    "dense_topk",
    "enable_gradient_checkpointing",
    "encode_passages",
    "encode_questions",
    "freeze_passage_side",
    "freeze_unused_pooler",
    "gold_positions",
    "load_rag_model",
    "load_training_examples",
    "merge_lora",
    "negative_positions",
    "parse_args",
    "passage_lookup",
    "passage_texts",
    "reencode_retriever",
    "require",
    "retrieval_metrics",
    "retrieve_all",
    "save_final_model",
    "seed_everything",
    "setup_logging",
    "untie_passage_side",
    "write_final_metrics",
]

# also importable from here, as before the package split (not used by the scripts)
_COMPATIBLE = (CHECKPOINTS_DIR, EpochSampler, JsonlTracker, TrainState, load_yaml_config)

"""Every file and folder name the package reads or writes, in one place."""

# A saved RagForGeneration folder
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
QUESTION_ENCODER_TOKENIZER_DIR = "question_encoder_tokenizer"
GENERATOR_TOKENIZER_DIR = "generator_tokenizer"
INDEX_DIR = "index"
RERANKER_DIR = "reranker"  # the cross-encoder reranker (see reranker.py), when the model has one
MODEL_CARD_NAME = "README.md"
TRAINING_CONFIG_NAME = "training_config.yaml"
EVAL_RESULTS_NAME = "eval_results.json"

# An index folder (see index/__init__.py)
INDEX_CONFIG_NAME = "index_config.json"
FAISS_INDEX_NAME = "index.faiss"
PASSAGES_NAME = "passages.arrow"  # Arrow IPC file (see index/passage_store.py)
EXACT_VECTORS_NAME = "vectors.f16.npy"  # ivf_pq only, optional: the exact vectors in float16
LEGACY_PASSAGES_NAME = "passages.jsonl"  # format 1
EMBEDDINGS_NAME = "embeddings.npy"  # format 1: a second float32 copy of the vectors
BM25_DIR = "bm25"
PASSAGE_TOKENS_DIR = "passage_tokens"  # generator token ids of the passages (see passage_tokens.py)
INDEX_FORMAT_VERSION = 2  # 2: Arrow passages, vectors only in FAISS; 1 still loads

# A sharded index folder (see index/sharded.py): shard-00000/ ... each an index folder, plus the manifest
SHARD_MANIFEST_NAME = "shards.json"
SHARD_DIR_TEMPLATE = "shard-{:05d}"
SHARD_MANIFEST_FORMAT_VERSION = 1

# A passage-token folder (see passage_tokens.py)
PASSAGE_TOKENS_CONFIG_NAME = "passage_tokens.json"
PASSAGE_TOKENS_ROW_IDS_NAME = "row_ids.npy"
PASSAGE_TOKENS_OFFSETS_NAME = "offsets.npy"
PASSAGE_TOKENS_IDS_NAME = "ids.npy"
PASSAGE_TOKENS_FORMAT_VERSION = 1

# A reranker folder (see reranker.py)
RERANKER_CONFIG_NAME = "reranker_config.json"
RERANKER_FORMAT_VERSION = 1

# Evaluation outputs (see scripts/evaluate_rag.py)
RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.jsonl"
RECALL_PLOT_NAME = "recall_at_k.png"
RISK_COVERAGE_PLOT_NAME = "risk_coverage.png"

# A training run's output folder (see training.py)
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG_NAME = "train_log.jsonl"
TRAINER_STATE_NAME = "trainer_state.json"  # step, epoch and position in it, as JSON (not accelerate's pickle)
FINAL_MODEL_DIR = "final"

# Model type registered with transformers' Auto classes (must differ from transformers' "rag")
MODEL_TYPE = "modeling_rag"

# Where the package keeps materialised default models (overridable by MODELING_RAG_HOME)
DEFAULT_HOME_ENV = "MODELING_RAG_HOME"
DEFAULT_HOME = "~/.cache/modeling_rag"

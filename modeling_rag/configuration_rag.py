"""RagConfig: a question encoder, a generator, and how retrieval connects them."""

from __future__ import annotations

import posixpath

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .constants import INDEX_DIR, MODEL_TYPE
from .errors import RagConfigError
from .speedups.options import RagSpeedOptions

POOLING_METHODS = ("cls", "mean", "pooler")
SIMILARITIES = ("ip", "l2")
GENERATION_MODES = ("concat", "rag_sequence", "rag_token")
RETRIEVAL_METHODS = ("dense", "bm25", "hybrid")
FUSION_METHODS = ("rrf", "weighted")
FUSION_NORMALIZATIONS = ("zscore", "minmax")
SEQUENCE_DECODING = ("fast", "thorough")

# Measured on SmolLM2-135M-Instruct, 48 SQuAD dev questions, top-3 passages (README, "Prompt"):
# passages first, the instruction in the system turn and a short cue before the question.
DEFAULT_INSTRUCTION = (
    "Answer only from the passages the user gives you. If they do not contain the answer, say that you don't know."
)
DEFAULT_PROMPT_TEMPLATE = "{context}\n\nUsing the passages above, answer briefly: {question}"
DEFAULT_PASSAGE_TEMPLATE = "[{rank}] {title}\n{text}"
# What the shipped reader is trained to say when its passages do not answer (and what `answer()` says
# when it abstains).
DEFAULT_NO_ANSWER_TEXT = "The documents don't say."


def _sub_config(value, field: str, default_type: str | None):
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        if default_type is None:
            return None
        return CONFIG_MAPPING[default_type]()
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None) or default_type
        if model_type is None:
            raise RagConfigError(f"{field}: a sub-config dict needs a 'model_type' key.")
        if model_type not in CONFIG_MAPPING:
            raise RagConfigError(f"{field}: unknown model_type {model_type!r}; it is not a transformers model type.")
        value.pop("transformers_version", None)
        return CONFIG_MAPPING[model_type](**value)
    raise RagConfigError(f"{field} must be a PretrainedConfig or a dict, got {type(value).__name__}.")


def _generic_config_keys() -> set[str]:
    from transformers import GenerationConfig

    keys = set(PretrainedConfig().to_dict())
    keys |= set(GenerationConfig._get_default_generation_params())
    keys |= {
        "name_or_path",
        "_name_or_path",
        "torch_dtype",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "_commit_hash",
        "num_labels",
        "use_cache",
        "rope_scaling",
        "auto_map",
        "transformers_version",
        "model_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
    }
    return keys


def _reject_unknown_settings(kwargs: dict) -> None:
    import difflib

    unknown = sorted(set(kwargs) - _generic_config_keys())
    if unknown:
        known = [f for f in RagConfig.__dataclass_fields__ if not f.startswith("_")]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RagConfigError(f"Unknown RagConfig setting(s): {', '.join(hints)}.")


def _check_subfolder(field: str, path, example: str) -> None:
    if not isinstance(path, str) or not path:
        raise RagConfigError(f"{field} must be a non-empty relative folder name, e.g. {example!r}.")
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise RagConfigError(f"{field} must be relative to the model folder, got the absolute path {path!r}.")
    if ".." in posixpath.normpath(path.replace("\\", "/")).split("/"):
        raise RagConfigError(f"{field} must stay inside the model folder, got {path!r}.")


class RagConfig(PretrainedConfig):
    r"""Configuration of a [`RagForGeneration`] model.

    It nests the configuration of the question encoder and of the generator (any transformers
    `AutoConfig`), and holds the retrieval settings that join them. Its `model_type` is
    `"modeling_rag"`, distinct from transformers' own `"rag"`.

    Args:
        question_encoder (`PretrainedConfig` or `dict`):
            Configuration of the question encoder (an encoder-only model such as BERT, MiniLM or DPR).
        generator (`PretrainedConfig` or `dict`):
            Configuration of the generator: decoder-only (GPT-2, Llama, ...) or encoder-decoder (BART, T5).
        context_encoder (`PretrainedConfig` or `dict`, *optional*):
            Configuration of a separate passage encoder. `None` (default) means passages are encoded with
            the question encoder, as MiniLM-style shared encoders do.
        n_docs (`int`, defaults to 5):
            Number of passages retrieved per question.
        question_pooling (`str`, defaults to `"mean"`):
            How token states become one question vector: `"cls"`, `"mean"` or `"pooler"`.
        normalize_embeddings (`bool`, defaults to `True`):
            L2-normalise question and passage vectors (inner product then equals cosine similarity).
        similarity (`str`, defaults to `"ip"`):
            `"ip"` (inner product) or `"l2"` (negative squared Euclidean distance); must match the index metric.
        question_max_length (`int`, defaults to 128):
            Question tokens the question encoder reads (capped by its window).
        question_overflow (`str`, defaults to `"truncate"`):
            A question longer than that: `"truncate"` (its end is not used for retrieval; a warning says so) or
            `"error"` (refused with `RagInputError`). The generator always receives the whole question.
        retrieval (`str`, defaults to `"dense"`):
            `"dense"` (FAISS), `"bm25"` (sparse) or `"hybrid"` (both rankings fused).
        fusion (`str`, defaults to `"weighted"`):
            How hybrid retrieval fuses rankings: `"weighted"` (a weighted sum of per-query normalised scores)
            or `"rrf"` (reciprocal rank fusion, which ignores the scores).
        rrf_k (`int`, defaults to 60):
            The constant of reciprocal rank fusion.
        hybrid_alpha (`float`, defaults to 0.55):
            Weight of the dense score in `"weighted"` fusion (between 0 and 1; BM25 gets `1 - hybrid_alpha`).
            0.55 was chosen on 1,500 SQuAD training questions (`scripts/tune_fusion.py`), never on held-out
            articles; 0.45 to 0.7 score within 0.3 points of it there (docs/benchmarks.md).
        fusion_normalization (`str`, defaults to `"zscore"`):
            How `"weighted"` fusion puts each query's dense and BM25 scores on one scale: `"zscore"`
            (minus the mean, over the standard deviation, of that query's top `fusion_depth` scores) or
            `"minmax"` (to [0, 1] over them).
        fusion_depth (`int`, defaults to 100):
            Passages taken from each of the dense and BM25 rankings before fusing (at least the passages asked
            for); the normalisation statistics come from them, so fused scores do not depend on `n_docs`.
        reranker (`str`, *optional*):
            Relative subfolder of the saved model holding a cross-encoder reranker (a sequence-classification
            model over (question, passage) pairs, see `CrossEncoderReranker`), usually `"reranker"`. When set,
            retrieval takes `n_candidates` passages from the first stage and keeps the `n_docs` the reranker
            scores highest; their scores become its relevance (a probability). `None`: no reranking.
        n_candidates (`int`, defaults to 20):
            First-stage passages per question that the reranker scores; at least `n_docs`. Each costs one
            cross-encoder pass, so latency grows linearly with it (docs/benchmarks.md).
        rerank_first_stage_weight (`float`, defaults to 0.0):
            How much the first stage still counts when the reranker orders its candidates: they are sorted
            by `z(reranker logit) + rerank_first_stage_weight * z(first-stage score)`, each z-scored over the
            question's candidates; 0 orders by the reranker alone. The passages' scores stay the reranker's
            relevance either way. A reranker trained briefly knows less than a tuned hybrid first stage
            about some questions; the weight chosen on dev data is recorded in docs/benchmarks.md.
        generation_mode (`str`, defaults to `"concat"`):
            How passages reach the generator. `"concat"`: all passages and the question in one input.
            `"rag_sequence"` / `"rag_token"`: one input per passage, marginalised with the passage scores over
            the whole answer (RAG-Sequence) or per token (RAG-Token), as in Lewis et al. (2020).
        sequence_decoding (`str`, defaults to `"fast"`):
            RAG-Sequence decoding: `"fast"` scores each hypothesis only under the passages that produced it;
            `"thorough"` rescores every hypothesis under every passage.
        max_input_tokens (`int`, *optional*):
            Token budget of one generator input (question, passages and template). Defaults to the generator's
            window (minus `max_new_tokens` for decoder-only generators).
        max_new_tokens (`int`, defaults to 64):
            Room kept for generated tokens in a decoder-only generator's window, and the default generation length.
        max_passage_tokens (`int`, *optional*):
            Upper bound on the tokens of one passage in the generator input; `None` means only the budget limits it.
        min_passage_tokens (`int`, defaults to 16):
            A passage that would be cut to fewer tokens than this is dropped instead.
        prompt_template (`str`):
            Generator input, with the placeholders `{context}` and `{question}` (and optional `{instruction}`;
            without it, the instruction goes in the system turn, or before the prompt when the generator has no
            chat template). Where `{context}` sits relative to `{question}` decides whether passages come first.
        passage_template (`str`):
            One passage, with `{title}`, `{text}` and optional `{rank}` (1-based).
        passage_separator (`str`, defaults to `"\n\n"`):
            Placed between passages in `"concat"` mode.
        instruction (`str`):
            The instruction placed in `{instruction}` (or in the system turn when a chat template is used).
        use_chat_template (`bool`, defaults to `True`):
            Wrap the prompt in the generator tokenizer's chat template when it has one.
        index_path (`str`, defaults to `"index"`):
            Relative subfolder of the saved model that holds the index. Never an absolute path.
        index_repo_id (`str`, *optional*):
            A Hub repository (a dataset repo by default) holding the index, when it lives outside the model repo.
        index_revision (`str`, *optional*):
            The revision of `index_repo_id` to load (a branch, tag or commit sha).
        index_repo_type (`str`, defaults to `"dataset"`):
            Repo type of `index_repo_id`.
        saved_with_tokenizer (`bool`, defaults to `False`):
            Set by `save_pretrained`: the folder holds both tokenizers (`question_encoder_tokenizer/`,
            `generator_tokenizer/`). `from_pretrained` refuses a folder that says so and lacks one.
        saved_with_index (`bool`, defaults to `False`):
            Set by `save_pretrained`: the folder holds the index in `index_path`. `from_pretrained`
            refuses a folder that says so and lacks it (unless called with `load_index=False`).
        loss_reduction (`str`, defaults to `"mean"`):
            `"mean"` over questions or `"sum"`.
        label_smoothing (`float`, defaults to 0.0):
            Label smoothing of the token cross-entropy (`"concat"` mode).
        speed_options ([`RagSpeedOptions`] or `dict`, *optional*):
            How the generator is driven fast (chunk sizes, decoding groups, merged decoding, activation
            recompute); saved with the model as a dict, and replaceable per call with `speed_options=` on
            `forward` / `generate` / `answer`. Defaults to `RagSpeedOptions()`. Results do not depend on it.
        no_answer_text (`str`, defaults to `"The documents don't say."`):
            The answer when the passages do not support one: the response a reader is trained to give for
            unanswerable questions (`train_generator.py --unanswerable-file`), and the text `answer()` returns
            when it abstains.
        abstention (`dict`, *optional*):
            A fitted abstention rule (`modeling_rag.abstention.AbstentionCalibration` as a dict: feature weights,
            bias, the confidence threshold chosen on dev data, what it was fitted on). `answer()` replaces answers
            whose confidence is below the threshold with `no_answer_text`. `None`: abstain only when the reader
            itself gives the no-answer response. Fit one with `scripts/calibrate_abstention.py`.
    """

    model_type = MODEL_TYPE
    has_no_defaults_at_init = True

    question_encoder: PretrainedConfig | dict | None = None
    generator: PretrainedConfig | dict | None = None
    context_encoder: PretrainedConfig | dict | None = None
    n_docs: int = 5
    question_pooling: str = "mean"
    normalize_embeddings: bool = True
    similarity: str = "ip"
    question_max_length: int = 128
    question_overflow: str = "truncate"
    retrieval: str = "dense"
    fusion: str = "weighted"
    rrf_k: int = 60
    hybrid_alpha: float = 0.55
    fusion_normalization: str = "zscore"
    fusion_depth: int = 100
    reranker: str | None = None
    n_candidates: int = 20
    rerank_first_stage_weight: float = 0.0
    generation_mode: str = "concat"
    sequence_decoding: str = "fast"
    max_input_tokens: int | None = None
    max_new_tokens: int = 64
    max_passage_tokens: int | None = None
    min_passage_tokens: int = 16
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    passage_template: str = DEFAULT_PASSAGE_TEMPLATE
    passage_separator: str = "\n\n"
    instruction: str = DEFAULT_INSTRUCTION
    use_chat_template: bool = True
    index_path: str = INDEX_DIR
    index_repo_id: str | None = None
    index_revision: str | None = None
    index_repo_type: str = "dataset"
    saved_with_tokenizer: bool = False
    saved_with_index: bool = False
    loss_reduction: str = "mean"
    label_smoothing: float = 0.0
    speed_options: RagSpeedOptions | dict | None = None
    no_answer_text: str = DEFAULT_NO_ANSWER_TEXT
    abstention: dict | None = None
    is_encoder_decoder: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        _reject_unknown_settings(kwargs)
        self.question_encoder = _sub_config(self.question_encoder, "question_encoder", "bert")
        self.generator = _sub_config(self.generator, "generator", "gpt2")
        self.context_encoder = _sub_config(self.context_encoder, "context_encoder", None)
        if self.speed_options is None:
            self.speed_options = RagSpeedOptions()
        elif not isinstance(self.speed_options, RagSpeedOptions):
            self.speed_options = RagSpeedOptions.from_dict(self.speed_options)
        self.validate_rag()
        super().__post_init__(**kwargs)

    # -- validation ---------------------------------------------------------------------------------
    def validate_rag(self) -> None:
        """Checks every retrieval setting; raises `RagConfigError` (a `ValueError`) naming the bad field."""
        self._check_choices_and_numbers()
        self._check_texts()
        self._check_locations()
        if self.context_encoder is not None:
            q_dim = getattr(self.question_encoder, "hidden_size", None)
            c_dim = getattr(self.context_encoder, "hidden_size", None)
            if q_dim is not None and c_dim is not None and q_dim != c_dim:
                raise RagConfigError(
                    f"context_encoder hidden_size ({c_dim}) differs from question_encoder hidden_size ({q_dim}); "
                    "question and passage vectors must have the same dimension."
                )

    def _choice(self, field: str, allowed) -> None:
        value = getattr(self, field)
        if value not in allowed:
            raise RagConfigError(f"{field} must be one of {list(allowed)}, got {value!r}.")

    def _positive_int(self, field: str, allow_none: bool = False, minimum: int = 1) -> None:
        value = getattr(self, field)
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise RagConfigError(f"{field} must be an integer >= {minimum}, got {value!r}.")

    def _check_choices_and_numbers(self) -> None:
        """The settings with a fixed set of values, and the numeric ones."""
        # allowed combinations worth knowing: l2 search over un-normalised DPR-style pooler vectors; the
        # marginalised modes with bm25 retrieval (its rankings are rescored with the dense vectors)
        self._choice("question_pooling", POOLING_METHODS)
        self._choice("similarity", SIMILARITIES)
        self._choice("retrieval", RETRIEVAL_METHODS)
        self._choice("fusion", FUSION_METHODS)
        self._choice("fusion_normalization", FUSION_NORMALIZATIONS)
        self._choice("generation_mode", GENERATION_MODES)
        self._choice("sequence_decoding", SEQUENCE_DECODING)
        self._choice("loss_reduction", ("mean", "sum"))
        self._choice("question_overflow", ("truncate", "error"))
        for field in ("n_docs", "question_max_length", "rrf_k", "fusion_depth", "n_candidates", "max_new_tokens"):
            self._positive_int(field)
        self._positive_int("max_input_tokens", allow_none=True)
        self._positive_int("max_passage_tokens", allow_none=True)
        self._positive_int("min_passage_tokens", minimum=0)
        if not isinstance(self.hybrid_alpha, (int, float)) or not 0.0 <= float(self.hybrid_alpha) <= 1.0:
            raise RagConfigError(f"hybrid_alpha must be between 0 and 1, got {self.hybrid_alpha!r}.")
        weight = self.rerank_first_stage_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= float(weight) < float("inf"):
            raise RagConfigError(f"rerank_first_stage_weight must be a number >= 0, got {weight!r}.")
        if not isinstance(self.label_smoothing, (int, float)) or not 0.0 <= float(self.label_smoothing) < 1.0:
            raise RagConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")

    def _check_texts(self) -> None:
        """The prompt and passage templates (their placeholders), the no-answer text and the abstention rule."""
        for field in ("prompt_template", "passage_template", "passage_separator", "instruction"):
            if not isinstance(getattr(self, field), str):
                raise RagConfigError(f"{field} must be a string.")
        if not isinstance(self.no_answer_text, str) or not self.no_answer_text.strip():
            raise RagConfigError(f"no_answer_text must be a non-empty string, got {self.no_answer_text!r}.")
        if self.abstention is not None:
            from .abstention import AbstentionCalibration

            AbstentionCalibration.from_dict(self.abstention)  # raises RagConfigError naming the bad key
        for placeholder in ("{context}", "{question}"):
            if placeholder not in self.prompt_template:
                raise RagConfigError(f"prompt_template must contain {placeholder}; got {self.prompt_template!r}.")
        if "{text}" not in self.passage_template:
            raise RagConfigError(f"passage_template must contain {{text}}; got {self.passage_template!r}.")
        try:
            self.prompt_template.format(context="", question="", instruction="")
            self.passage_template.format(title="", text="", rank=1)
        except (KeyError, IndexError, ValueError) as err:
            raise RagConfigError(
                f"prompt_template / passage_template use an unknown placeholder ({err}); allowed: "
                "{instruction}, {context}, {question} and {title}, {text}, {rank}."
            ) from None

    def _check_locations(self) -> None:
        """Index and reranker locations: relative paths inside the model folder, or the index's own repo."""
        _check_subfolder("index_path", self.index_path, "index")
        if self.reranker is not None:
            _check_subfolder("reranker", self.reranker, "reranker")
            if self.n_candidates < self.n_docs:
                raise RagConfigError(
                    f"n_candidates ({self.n_candidates}) is smaller than n_docs ({self.n_docs}): the reranker "
                    "keeps n_docs of the n_candidates first-stage passages; raise n_candidates or lower n_docs."
                )
        if self.index_revision is not None and self.index_repo_id is None:
            raise RagConfigError("index_revision is set but index_repo_id is not; name the repo that holds the index.")
        self._choice("index_repo_type", ("dataset", "model"))

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_question_encoder_generator_configs(
        cls,
        question_encoder_config: PretrainedConfig,
        generator_config: PretrainedConfig,
        context_encoder_config: PretrainedConfig | None = None,
        **kwargs,
    ) -> RagConfig:
        """Builds a RagConfig from the configs of a question encoder and a generator (and optionally a
        separate context encoder); `kwargs` set the retrieval settings."""
        return cls(
            question_encoder=question_encoder_config.to_dict(),
            generator=generator_config.to_dict(),
            context_encoder=context_encoder_config.to_dict() if context_encoder_config is not None else None,
            **kwargs,
        )

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(out.get("speed_options"), RagSpeedOptions):
            out["speed_options"] = out["speed_options"].to_dict()
        return out

    @property
    def generator_is_encoder_decoder(self) -> bool:
        return bool(getattr(self.generator, "is_encoder_decoder", False))

    @property
    def retrieval_vector_size(self) -> int:
        cfg = self.context_encoder or self.question_encoder
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    def get_text_config(self, decoder=None, encoder=None):  # noqa: D401 - transformers hook
        """The generator's config, which generation utilities consult for vocabulary and cache sizes."""
        return self.generator.get_text_config(decoder=decoder, encoder=encoder) if self.generator else self


AutoConfig.register(MODEL_TYPE, RagConfig, exist_ok=True)

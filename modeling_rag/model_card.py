"""Model cards for RAG models: YAML metadata (with ``model-index`` results) and a readable text.

The text is rendered from ``templates/model_card.md``. Generated sections sit between marker
comments (``<!-- modeling_rag:begin:results -->`` ... ``<!-- modeling_rag:end:results -->``);
regenerating a card replaces only those sections, so whatever a person wrote outside them, and
any metadata key this module does not generate, is kept verbatim.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import (
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    INDEX_CONFIG_NAME,
    INDEX_DIR,
    MODEL_CARD_NAME,
    SHARD_MANIFEST_NAME,
    TRAINING_CONFIG_NAME,
)
from .errors import RagInputError
from .utils.atomic import atomic_write_text

LIBRARY_NAME = "modeling_rag"
BASE_TAGS = ("modeling_rag", "rag", "retrieval-augmented-generation")
SECTIONS = ("summary", "usage", "corpus", "training", "results")
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
DEFAULT_EXAMPLE_QUESTION = "How many days a week may hybrid employees work from home?"

# Local folders of known default models -> their Hub ids (for `base_model` metadata).
KNOWN_BASE_MODELS = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2_135m_instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FRONT_MATTER_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")


def begin_marker(name: str) -> str:
    """The comment that opens generated section ``name``."""
    return f"<!-- modeling_rag:begin:{name} -->"


def end_marker(name: str) -> str:
    """The comment that closes generated section ``name``."""
    return f"<!-- modeling_rag:end:{name} -->"


@dataclass
class RagModelCardData:
    """What a RAG model card says. Every field is optional; unknown facts are left out of the card.

    Attributes:
        model_name: Title of the card and name in ``model-index`` (default: the repo name).
        repo_id: Hub repo id used in the usage snippet.
        question_encoder: Hub id of the question encoder's base model.
        generator: Hub id of the generator's base model.
        context_encoder: Hub id of a separate passage encoder, if any.
        datasets: Hub ids of datasets used (training data, corpus).
        license: SPDX-like license id of the Hub (``"apache-2.0"``).
        language: Language code(s).
        tags: Extra tags (``rag`` and ``retrieval-augmented-generation`` are always added).
        corpus_name: What the passages are (e.g. ``"company handbook"``).
        n_passages: Passages in the index.
        index_kind: Index type (e.g. ``"flat"``, ``"hnsw"``, ``"ivf"``, ``"bm25"``).
        index_metric: Similarity of the index (``"ip"``, ``"l2"``).
        index_encoder: Encoder that embedded the passages.
        index_repo_id: Separate Hub repo holding the index, if it is not inside the model repo.
        index_revision: Revision of ``index_repo_id``.
        n_docs: Passages retrieved per question.
        retrieval: ``"dense"``, ``"bm25"`` or ``"hybrid"``.
        generation_mode: ``"concat"``, ``"rag_sequence"`` or ``"rag_token"``.
        training_config: The training settings (shown as YAML), or ``None`` when not fine-tuned.
        eval_results: One dict per score: ``task`` (default ``"question-answering"``), ``dataset_name``,
            ``dataset_type``, ``dataset_split``, ``metric_type``, ``metric_name``, ``metric_value``; nested
            ``dataset`` / ``metric`` dicts (``{"name", "type", "split"}``, ``{"type", "name", "value"}``) also work.
        example_question: The question in the usage snippet.
        pipeline_tag: Hub pipeline tag, if any.
    """

    model_name: str | None = None
    repo_id: str | None = None
    question_encoder: str | None = None
    generator: str | None = None
    context_encoder: str | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = "apache-2.0"
    language: str | list[str] | None = "en"
    tags: list[str] = field(default_factory=list)
    corpus_name: str | None = None
    n_passages: int | None = None
    index_kind: str | None = None
    index_metric: str | None = None
    index_encoder: str | None = None
    index_repo_id: str | None = None
    index_revision: str | None = None
    n_docs: int | None = None
    retrieval: str | None = None
    generation_mode: str | None = None
    training_config: dict[str, Any] | None = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    example_question: str = DEFAULT_EXAMPLE_QUESTION
    pipeline_tag: str | None = None

    @property
    def title(self) -> str:
        """The card title: ``model_name``, else the repo name, else a generic one."""
        if self.model_name:
            return self.model_name
        if self.repo_id:
            return self.repo_id.split("/")[-1]
        return "RAG model"


# -- eval results ----------------------------------------------------------------------------------


def _first(d: dict, *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def normalize_eval_result(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten one eval result dict to huggingface_hub ``EvalResult`` keyword arguments.

    Raises:
        RagInputError: No dataset name/type, no metric type, or no value.
    """
    if not isinstance(result, dict):
        raise RagInputError(f"An eval result must be a dict, got {type(result).__name__}.")
    dataset = result.get("dataset") if isinstance(result.get("dataset"), dict) else {}
    metric = result.get("metric") if isinstance(result.get("metric"), dict) else {}
    task = result.get("task") if isinstance(result.get("task"), dict) else {}
    out = {
        "task_type": _first(result, "task_type")
        or _first(task, "type")
        or (result.get("task") if isinstance(result.get("task"), str) else None)
        or "question-answering",
        "task_name": _first(result, "task_name") or _first(task, "name"),
        "dataset_name": _first(result, "dataset_name") or _first(dataset, "name"),
        "dataset_type": _first(result, "dataset_type") or _first(dataset, "type"),
        "dataset_split": _first(result, "dataset_split", "split") or _first(dataset, "split"),
        "dataset_config": _first(result, "dataset_config") or _first(dataset, "config"),
        "dataset_revision": _first(result, "dataset_revision") or _first(dataset, "revision"),
        "metric_type": _first(result, "metric_type") or _first(metric, "type"),
        "metric_name": _first(result, "metric_name") or _first(metric, "name"),
        "metric_value": _first(result, "metric_value", "value") if not metric else _first(metric, "value"),
    }
    if isinstance(result.get("dataset"), str):
        out["dataset_name"] = out["dataset_name"] or result["dataset"]
    if isinstance(result.get("metric"), str):
        out["metric_type"] = out["metric_type"] or result["metric"]
    out["dataset_name"] = out["dataset_name"] or out["dataset_type"]
    out["dataset_type"] = out["dataset_type"] or out["dataset_name"]
    missing = [k for k in ("dataset_name", "metric_type", "metric_value") if out[k] is None]
    if missing:
        raise RagInputError(f"Eval result {result!r} has no {', '.join(missing)}.")
    value = out["metric_value"]
    if hasattr(value, "item"):  # numpy / torch scalars
        out["metric_value"] = value.item()
    return {k: v for k, v in out.items() if v is not None}


def _model_index(name: str, results: list[dict[str, Any]]) -> list[dict] | None:
    from huggingface_hub import EvalResult, ModelCardData

    if not results:
        return None
    evals = [EvalResult(**normalize_eval_result(r)) for r in results]
    return ModelCardData(model_name=name, eval_results=evals).to_dict().get("model-index")


# -- metadata --------------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _dedup(items: list) -> list:
    return list(dict.fromkeys(i for i in items if i))


def generated_metadata(data: RagModelCardData) -> dict[str, Any]:
    """The YAML metadata keys this module writes (``None`` values are left out)."""
    base_models = _dedup([data.question_encoder, data.generator, data.context_encoder])
    meta: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "license": data.license,
        "language": data.language,
        "base_model": base_models or None,
        "datasets": _dedup(_as_list(data.datasets)) or None,
        "tags": _dedup(list(BASE_TAGS) + _as_list(data.tags)),
        "pipeline_tag": data.pipeline_tag,
        "model-index": _model_index(data.title, data.eval_results),
    }
    return {k: v for k, v in meta.items() if v is not None}


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    import yaml

    match = _FRONT_MATTER_RE.search(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    return meta, text[match.end() :]


def _merge_metadata(existing: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    merged = dict(existing)
    for key, value in generated.items():
        if key == "tags":
            merged[key] = _dedup(_as_list(existing.get("tags")) + value)
        elif key == "datasets":
            merged[key] = _dedup(_as_list(existing.get("datasets")) + value)
        else:
            merged[key] = value
    return merged


# -- text ------------------------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(data: RagModelCardData) -> str:
    corpus = f"the passages of {data.corpus_name}" if data.corpus_name else "the passages of its corpus"
    if data.n_passages is not None:
        corpus += f" ({data.n_passages:,} passages)"
    encoder = f"the question encoder `{data.question_encoder}`" if data.question_encoder else "its question encoder"
    generator = f"the generator `{data.generator}`" if data.generator else "its generator"
    k = f"the {data.n_docs} most similar passages" if data.n_docs else "the most similar passages"
    return (
        f"A retrieval-augmented generation (RAG) model built with `{LIBRARY_NAME}`. It answers questions from "
        f"{corpus}: {encoder} embeds the question, {k} are retrieved from the index stored with the model, and "
        f"{generator} writes a short answer conditioned on them. Each answer comes with the passages it was drawn "
        "from, so it can be checked."
    )


def _usage(data: RagModelCardData) -> str:
    repo = data.repo_id or data.title
    question = data.example_question.replace("\\", "\\\\").replace('"', '\\"')
    where = (
        f"The index is loaded from the dataset repo `{data.index_repo_id}`."
        if data.index_repo_id
        else "The question encoder, the generator, their tokenizers and the index are all in this repo."
    )
    return (
        "## How to use\n\n"
        "```python\n"
        "from modeling_rag import RagForGeneration\n\n"
        f'model = RagForGeneration.from_pretrained("{repo}")\n'
        f'answer = model.answer(["{question}"])[0]\n'
        "print(answer.answer)\n"
        "for source in answer.sources:  # the passages the answer was drawn from\n"
        "    print(source)\n"
        "```\n\n"
        f"{where} Set `HF_HUB_OFFLINE=1` to load it from the local cache once downloaded."
    )


def _corpus(data: RagModelCardData) -> str:
    rows = []
    if data.corpus_name:
        rows.append(("Corpus", data.corpus_name))
    if data.n_passages is not None:
        rows.append(("Passages", f"{data.n_passages:,}"))
    if data.index_kind:
        rows.append(("Index", f"`{data.index_kind}`"))
    if data.index_metric:
        rows.append(("Similarity", f"`{data.index_metric}`"))
    if data.index_encoder:
        rows.append(("Passage encoder", f"`{data.index_encoder}`"))
    if data.retrieval:
        rows.append(("Retrieval", f"`{data.retrieval}`"))
    if data.n_docs:
        rows.append(("Passages per question", str(data.n_docs)))
    if data.generation_mode:
        rows.append(("Generation mode", f"`{data.generation_mode}`"))
    if data.index_repo_id:
        rev = f" (revision `{data.index_revision}`)" if data.index_revision else ""
        rows.append(("Index repo", f"`{data.index_repo_id}`{rev}"))
    if not rows:
        return ""
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Corpus and retrieval\n\n| | |\n|---|---|\n{table}"


def _training(data: RagModelCardData) -> str:
    import yaml

    parts = ["## Training"]
    bases = [
        f"- Question encoder: `{data.question_encoder}`" if data.question_encoder else None,
        f"- Context encoder: `{data.context_encoder}`" if data.context_encoder else None,
        f"- Generator: `{data.generator}`" if data.generator else None,
    ]
    bases = [b for b in bases if b]
    if bases:
        parts.append("Base models:\n\n" + "\n".join(bases))
    if data.training_config:
        dumped = yaml.safe_dump(data.training_config, sort_keys=False, allow_unicode=True).strip()
        parts.append(f"Fine-tuned with `{LIBRARY_NAME}` using this configuration:\n\n```yaml\n{dumped}\n```")
    else:
        parts.append(
            "No fine-tuning is recorded for this model: the base models are combined as released, "
            "and the passages are embedded with the question encoder."
            if not data.context_encoder
            else "No fine-tuning is recorded for this model: the base models are combined as released."
        )
    return "\n\n".join(parts)


def _results(data: RagModelCardData) -> str:
    if not data.eval_results:
        return ""
    rows = []
    for r in data.eval_results:
        n = normalize_eval_result(r)
        rows.append(
            f"| {n.get('task_name') or n['task_type']} | {n['dataset_name']} | {n.get('dataset_split', '')} "
            f"| {n.get('metric_name') or n['metric_type']} | {_fmt_value(n['metric_value'])} |"
        )
    return "## Evaluation results\n\n| Task | Dataset | Split | Metric | Value |\n|---|---|---|---|---|\n" + "\n".join(
        rows
    )


def render_sections(data: RagModelCardData) -> dict[str, str]:
    """The body of each generated section (an empty string: nothing known, the section is left out)."""
    return {
        "summary": _summary(data),
        "usage": _usage(data),
        "corpus": _corpus(data),
        "training": _training(data),
        "results": _results(data),
    }


def _block_re(name: str) -> re.Pattern:
    return re.compile(re.escape(begin_marker(name)) + r".*?" + re.escape(end_marker(name)), re.DOTALL)


def _block(name: str, body: str) -> str:
    return f"{begin_marker(name)}\n{body}\n{end_marker(name)}"


def _render_new_text(data: RagModelCardData, sections: dict[str, str]) -> str:
    template = TEMPLATE_PATH.read_text(encoding="utf-8")
    filled = string.Template(template).safe_substitute(title=data.title, **sections)
    for name, body in sections.items():
        if not body:  # drop the empty block and the blank line after it
            filled = re.sub(_block_re(name).pattern + r"\n*", "", filled, flags=re.DOTALL)
    return "\n" + filled.rstrip() + "\n"


def _update_text(text: str, sections: dict[str, str]) -> str:
    for name, body in sections.items():
        if not body:
            continue  # unknown now: keep whatever the card had
        pattern = _block_re(name)
        block = _block(name, body)
        if pattern.search(text):
            text = pattern.sub(lambda _m, block=block: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    return text


def build_model_card(data: RagModelCardData, existing_card_text: str | None = None):
    """Build a ``huggingface_hub.ModelCard`` for a RAG model.

    Args:
        data: What to say.
        existing_card_text: A card to update (e.g. the repo's README.md). Its text outside the
            ``modeling_rag`` marker comments and its metadata keys that are not generated are kept verbatim;
            its tags and datasets are kept and extended. A section that is unknown now (e.g. no results) is kept.

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.data.to_dict()["model-index"]`` holds the results.
    """
    import yaml
    from huggingface_hub import ModelCard

    sections = render_sections(data)
    generated = generated_metadata(data)
    if existing_card_text and existing_card_text.strip():
        existing_meta, existing_text = _split_front_matter(existing_card_text)
        meta = _merge_metadata(existing_meta, generated)
        if existing_text.strip():
            text = _update_text(existing_text, sections)
        else:
            text = _render_new_text(data, sections)
    else:
        meta = generated
        text = _render_new_text(data, sections)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return ModelCard(f"---\n{front}\n---\n{text}", ignore_metadata_errors=True)


def write_model_card(
    folder: str | os.PathLike,
    data: RagModelCardData,
    *,
    existing_card_text: str | None = None,
    filename: str = MODEL_CARD_NAME,
) -> str:
    """Write (or update) ``folder/README.md`` atomically; return its path.

    An existing README.md in ``folder`` is updated as by [`build_model_card`] unless ``existing_card_text`` is given.
    """
    path = Path(folder) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if existing_card_text is None and path.is_file():
        existing_card_text = path.read_text(encoding="utf-8")
    card = build_model_card(data, existing_card_text=existing_card_text)
    atomic_write_text(path, str(card))
    return str(path)


# -- reading a saved model folder --------------------------------------------------------------------


def base_model_id(name_or_path: str | None) -> str | None:
    """A Hub id for ``base_model`` metadata: the name if it looks like one, a known default's id, else ``None``."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if _HUB_ID_RE.match(name) and not os.path.exists(name):
        return name
    lowered = name.lower()
    for key, hub_id in KNOWN_BASE_MODELS.items():
        if key in lowered:
            return hub_id
    return None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sub_name(config: dict, key: str) -> str | None:
    sub = config.get(key)
    if isinstance(sub, dict):
        return base_model_id(sub.get("_name_or_path") or sub.get("name_or_path"))
    return None


def card_data_from_model_folder(
    folder: str | os.PathLike,
    eval_results: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> RagModelCardData:
    """Fill [`RagModelCardData`] from a saved model folder.

    Reads ``config.json`` (base model names, ``n_docs``, retrieval settings, index repo), the index's
    ``index_config.json`` (``count``, ``kind``, ``metric``, ``encoder_name``), ``training_config.yaml`` and
    ``eval_results.json`` (a list of result dicts) when present. ``eval_results`` and ``overrides``
    (any ``RagModelCardData`` field) take precedence.
    """
    import yaml

    root = Path(folder)
    config = _read_json(root / CONFIG_NAME) or {}
    fields: dict[str, Any] = {"model_name": root.resolve().name}
    if isinstance(config, dict):
        fields["question_encoder"] = _sub_name(config, "question_encoder")
        fields["generator"] = _sub_name(config, "generator")
        fields["context_encoder"] = _sub_name(config, "context_encoder")
        for key in ("n_docs", "retrieval", "generation_mode", "index_repo_id", "index_revision"):
            if config.get(key) is not None:
                fields[key] = config[key]
    index_path = config.get("index_path") if isinstance(config, dict) else None
    index_config = _read_json(root / (index_path or INDEX_DIR) / INDEX_CONFIG_NAME)
    if not isinstance(index_config, dict):  # a sharded index: its manifest holds the same top-level facts
        index_config = _read_json(root / (index_path or INDEX_DIR) / SHARD_MANIFEST_NAME)
    if isinstance(index_config, dict):
        for src, dest in (
            ("count", "n_passages"),
            ("kind", "index_kind"),
            ("metric", "index_metric"),
            ("encoder_name", "index_encoder"),
        ):
            if index_config.get(src) is not None:
                fields[dest] = index_config[src]
        if fields.get("index_encoder"):
            # indexes built before names were recorded portably may hold a folder of the builder's machine
            from .utils.names import portable_name

            fields["index_encoder"] = portable_name(fields["index_encoder"])
        corpus = _first(index_config, "corpus_name", "corpus")
        if isinstance(corpus, str):
            fields["corpus_name"] = corpus
    training_path = root / TRAINING_CONFIG_NAME
    if training_path.is_file():
        try:
            training = yaml.safe_load(training_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            training = None
        if isinstance(training, dict):
            fields["training_config"] = training
    if eval_results is None:
        stored = _read_json(root / EVAL_RESULTS_NAME)
        if isinstance(stored, dict):
            stored = stored.get("eval_results") or stored.get("results")
        if isinstance(stored, list) and all(isinstance(r, dict) for r in stored):
            eval_results = stored
    if eval_results:
        fields["eval_results"] = list(eval_results)
    fields.update(overrides)
    return RagModelCardData(**{k: v for k, v in fields.items() if v is not None})


__all__ = [
    "RagModelCardData",
    "build_model_card",
    "card_data_from_model_folder",
    "generated_metadata",
    "normalize_eval_result",
    "write_model_card",
]

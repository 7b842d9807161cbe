"""Push to and pull from the Hugging Face Hub, with one code path for local folders and Hub repos.

- [`resolve_model_folder`] turns a local folder or a Hub repo id (at a revision) into a local folder;
  offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) it is served from the cache.
- [`verify_index_checksums`] checks an index folder against the sha256 sums in its ``index_config.json``.
- [`push_folder_to_hub`] / [`push_model_to_hub`] publish a saved folder (or model) as one commit.
- [`download_index_shards`] downloads the manifest and only some shards of a sharded index repo.

Every failure is raised as a [`~modeling_rag.errors.HubError`] (or
[`~modeling_rag.errors.IndexIntegrityError`] for checksums) whose message names the repo, the
revision and the file, and says what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .constants import INDEX_CONFIG_NAME, MODEL_CARD_NAME
from .errors import HubError, IndexIntegrityError
from .utils.hashing import sha256_file

_TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> bool:
    """Whether offline mode is on, read now (huggingface_hub reads ``HF_HUB_OFFLINE`` only at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in _TRUE


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _describe(repo_id: str, repo_type: str, revision: str | None) -> str:
    kind = "" if repo_type == "model" else f"{repo_type} "
    return f"{kind}repo '{repo_id}' at revision '{revision or 'main'}'"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or os.path.isabs(name)
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _check_required(folder: str, require_files: Sequence[str] | None, where: str) -> None:
    missing = [f for f in require_files or () if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise HubError(
            f"{where} has no file {', '.join(repr(m) for m in missing)} (looked in {folder}). "
            "Check the repo id and revision, or save / push the model again so the folder is complete."
        )


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    repo_type: str = "model",
    allow_patterns: str | Sequence[str] | None = None,
    require_files: Sequence[str] | None = None,
) -> str:
    """Return a local folder holding ``name_or_path``: a local directory as is, else a Hub snapshot.

    Args:
        name_or_path: A local directory, or a Hub repo id (``"org/name"``).
        revision: Branch, tag, ``refs/pr/N`` or commit sha of the repo (ignored for a local folder).
        cache_dir: Hub cache folder; defaults to huggingface_hub's (``HF_HUB_CACHE``).
        token: Token for private repos (``None``: the stored one, if any).
        local_files_only: Never touch the network; serve from the cache. Also implied by ``HF_HUB_OFFLINE=1``,
            which is honoured even when set after huggingface_hub was imported.
        repo_type: ``"model"`` or ``"dataset"`` (an index repo) or ``"space"``.
        allow_patterns: Only download files matching these glob patterns.
        require_files: Files (relative paths) that must exist in the folder; a missing one raises.

    Returns:
        The absolute path of the folder (for a repo: the snapshot folder of the resolved commit, named by its sha).

    Raises:
        HubError: Repo or revision not found, offline with nothing cached, Hub unreachable, a required file missing.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        folder = os.path.abspath(name)
        _check_required(folder, require_files, f"Local folder '{name}'")
        return folder
    if _looks_like_path(name):
        raise HubError(
            f"'{name}' is not an existing local folder, and it is not a Hub repo id ('org/name'). "
            "Check the path (relative paths are resolved from the current directory)."
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = local_files_only or _env_offline()
    try:
        folder = snapshot_download(
            name,
            repo_type=repo_type,
            revision=revision,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            token=token,
            local_files_only=offline,
            allow_patterns=list(allow_patterns) if isinstance(allow_patterns, (list, tuple)) else allow_patterns,
        )
    except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        why = None if not offline else ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1")
        raise _download_error(
            err, name, repo_type=repo_type, revision=revision, offline_because=why, cache_dir=cache_dir
        ) from err
    _check_required(folder, require_files, _upper_first(_describe(name, repo_type, revision)))
    return folder


def _download_error(
    err: Exception,
    name: str,
    *,
    repo_type: str,
    revision: str | None,
    offline_because: str | None,
    cache_dir: str | os.PathLike | None,
) -> HubError:
    """The `HubError` saying what went wrong with a snapshot download of `name`, and what to do about it."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _describe(name, repo_type, revision)
    # checked in this order because the Hub's error classes derive from one another
    if isinstance(err, HFValidationError):
        return HubError(f"'{name}' is neither an existing local folder nor a valid Hub repo id ('org/name'): {err}")
    if isinstance(err, RevisionNotFoundError):
        return HubError(
            f"Revision '{revision}' not found in {repo_type} repo '{name}' on {_endpoint()}. "
            "Use an existing branch, tag or full commit sha."
        )
    if isinstance(err, (RepositoryNotFoundError, GatedRepoError)):
        return HubError(
            f"{repo_type.capitalize()} repo '{name}' not found on {_endpoint()} (or it is private and no valid token "
            f"was sent). Check the repo id and repo_type='{repo_type}', or pass token= for a private repo."
        )
    if isinstance(err, LocalEntryNotFoundError):
        # also covers IncompleteSnapshotError (a subclass in recent huggingface_hub)
        if offline_because:
            return HubError(
                f"{_upper_first(where)} is not in the local Hub cache ({cache_dir or _default_cache()}) "
                f"and downloads are disabled ({offline_because}). Run once online to download it, or unset "
                f"HF_HUB_OFFLINE / pass local_files_only=False. ({err})"
            )
        return HubError(
            f"Could not download {where} from {_endpoint()} and it is not fully cached: {err}. "
            "Check the network / HF_ENDPOINT, or run with HF_HUB_OFFLINE=1 once it is cached."
        )
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        return HubError(f"Hub error {status} while downloading {where}: {err}")
    return HubError(f"Could not download {where}: {err}")


def _recorded_checksums(config: Any) -> dict[str, tuple[str, int | None]]:
    """``{relative name: (sha256, size or None)}`` from either checksum layout of ``index_config.json``.

    ``"files": {name: {"sha256": hex, "size": n}}`` (what ``PassageIndex.save`` writes) or
    ``"sha256": {name: hex}``.
    """
    out: dict[str, tuple[str, int | None]] = {}
    if not isinstance(config, dict):
        return out
    files = config.get("files")
    if isinstance(files, dict):
        for name, meta in files.items():
            if isinstance(meta, dict) and isinstance(meta.get("sha256"), str):
                size = meta.get("size")
                out[str(name)] = (meta["sha256"].lower(), int(size) if isinstance(size, int) else None)
    sums = config.get("sha256")
    if isinstance(sums, dict):
        for name, digest in sums.items():
            if isinstance(digest, str):
                out.setdefault(str(name), (digest.lower(), None))
    return out


def verify_index_checksums(
    index_folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
) -> dict[str, str]:
    """Check every file whose checksum ``index_config.json`` records.

    Both layouts are read: ``"files": {name: {"sha256": hex, "size": n}}`` (written by
    ``PassageIndex.save``) and ``"sha256": {name: hex}``.

    Args:
        index_folder: The index folder (holding ``index_config.json``).
        repo_id: Named in error messages when the folder came from the Hub.
        revision: Named in error messages with ``repo_id``.

    Returns:
        The verified ``{relative name: sha256}`` mapping.

    Raises:
        IndexIntegrityError: No ``index_config.json``, no checksums in it, a listed file missing, of another size,
            or with another sha256.
    """
    folder = Path(index_folder)
    origin = f" (from repo '{repo_id}' at revision '{revision or 'main'}')" if repo_id else ""
    config_path = folder / INDEX_CONFIG_NAME
    if not config_path.is_file():
        raise IndexIntegrityError(f"Index folder '{folder}'{origin} has no {INDEX_CONFIG_NAME}; it is not an index.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise IndexIntegrityError(f"Cannot read '{config_path}'{origin}: {err}") from err
    recorded = _recorded_checksums(config)
    if not recorded:
        raise IndexIntegrityError(
            f"'{config_path}'{origin} records no checksums (neither 'files' with sha256 sums nor a 'sha256' "
            "mapping), so the index cannot be verified. Save the index again with this version of modeling_rag."
        )
    hint = (
        " Download it again (force_download, or delete its folder from the Hub cache)."
        if repo_id
        else " Rebuild or copy the index again."
    )
    for name, (expected, size) in recorded.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise IndexIntegrityError(f"'{config_path}'{origin} lists a file outside the index folder: {name!r}")
        path = folder / rel
        if not path.is_file():
            raise IndexIntegrityError(f"Index file '{name}' is missing from '{folder}'{origin}.{hint}")
        if size is not None and path.stat().st_size != size:
            raise IndexIntegrityError(
                f"Index file '{name}' in '{folder}'{origin} is corrupted: it has {path.stat().st_size} bytes, "
                f"{size} were saved.{hint}"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise IndexIntegrityError(
                f"Index file '{name}' in '{folder}'{origin} is corrupted: sha256 {actual} does not match the "
                f"recorded {expected}.{hint}"
            )
    return {name: digest for name, (digest, _size) in recorded.items()}


def _push_error(err: Exception, repo_id: str, repo_type: str, action: str) -> HubError:
    """Turn a huggingface_hub error raised while writing into a HubError saying what to do."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    server_says = ""
    if response is not None:
        server_says = response.headers.get("X-Error-Message") or ""
    where = f"{repo_type} repo '{repo_id}' on {_endpoint()}"
    if status == 401:
        if "Invalid credentials" in server_says:
            return HubError(
                f"The Hub rejected the token while trying to {action} {where}: the token is invalid or expired. "
                "Create a write token at https://huggingface.co/settings/tokens and pass token= or run `hf auth login`."
            )
        return HubError(
            f"Authentication required to {action} {where}. Pass token= (a write token), set HF_TOKEN, "
            "or run `hf auth login`."
        )
    if status == 403:
        return HubError(
            f"The token has no write permission to {action} {where} ({server_says or 'forbidden'}). "
            "Use a token with write access to this namespace."
        )
    if status == 404:
        return HubError(
            f"Could not {action} {where}: not found ({server_says or err}). Check the repo id, "
            "repo_type and that the token's user may write to this namespace."
        )
    return HubError(f"Could not {action} {where}: {err}")


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload RAG model",
    repo_type: str = "model",
    ignore_patterns: str | Sequence[str] | None = None,
) -> str:
    """Upload a folder to a Hub repo as one commit; create the repo (and the branch) if needed.

    Args:
        folder: The folder to upload (e.g. a ``save_pretrained`` folder or an index folder).
        repo_id: ``"org/name"``.
        token: A write token; ``None`` uses ``HF_TOKEN`` or the stored login.
        private: Create the repo private (only when it does not exist yet).
        revision: Branch to commit to; created from ``main`` if missing. ``None``: ``main``.
        create_pr: Open a pull request (``refs/pr/N``) against ``main`` instead of committing to it (not with
            another ``revision``: huggingface_hub opens upload pull requests against the default branch).
        commit_message: The commit title.
        repo_type: ``"model"`` or ``"dataset"`` (e.g. an index repo).
        ignore_patterns: Glob patterns of files not to upload.

    Returns:
        The commit URL (a ``huggingface_hub.CommitInfo`` string: ``.oid`` is the commit sha and ``.pr_url`` /
        ``.pr_revision`` describe the pull request when ``create_pr``).

    Raises:
        HubError: No token, a rejected token, no write permission, or any other Hub error.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = os.fspath(folder)
    if create_pr and revision not in (None, "main"):
        raise HubError(
            f"Cannot push to '{repo_id}' with create_pr=True and revision='{revision}': pull requests are opened "
            "against main. Push to the branch (create_pr=False), or open the pull request without a revision."
        )
    if not os.path.isdir(folder):
        raise HubError(f"Cannot push '{folder}' to '{repo_id}': it is not a folder.")
    if token is None and get_token() is None:
        raise HubError(
            f"No Hugging Face token found to push to {repo_type} repo '{repo_id}'. Pass token= (a write token), "
            "set HF_TOKEN, or run `hf auth login`."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
    except HfHubHTTPError as err:
        raise _push_error(err, repo_id, repo_type, "create") from err
    if revision not in (None, "main") and not create_pr:
        try:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        except HfHubHTTPError as err:
            raise _push_error(err, repo_id, repo_type, f"create branch '{revision}' in") from err
    try:
        return api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns) if isinstance(ignore_patterns, (list, tuple)) else ignore_patterns,
        )
    except HfHubHTTPError as err:
        raise _push_error(err, repo_id, repo_type, "push to") from err


def _existing_card_text(
    repo_id: str, *, token: str | None, revision: str | None, repo_type: str, cache_dir: str
) -> str | None:
    """The README.md of the repo at ``revision`` (or ``main``), or ``None`` when there is none yet."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    for rev in dict.fromkeys([revision or "main", "main"]):
        try:
            path = hf_hub_download(
                repo_id, MODEL_CARD_NAME, revision=rev, repo_type=repo_type, token=token, cache_dir=cache_dir
            )
        except (EntryNotFoundError, HfHubHTTPError, OSError):
            continue
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def push_model_to_hub(
    model: Any,
    repo_id: str,
    *,
    card_data: Any = None,
    eval_results: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Save ``model`` with ``save_pretrained`` into a temporary folder, add a model card, push it as one commit.

    The card is built by [`~modeling_rag.model_card.build_model_card`] from ``card_data`` (or from the saved
    folder and ``eval_results``). If the repo already has a README.md, the text its authors wrote there is kept
    and only the generated sections are refreshed. A README.md written by ``save_pretrained`` itself is kept as is.

    Args:
        model: An object with ``save_pretrained(folder)`` (a ``RagForGeneration``).
        repo_id: ``"org/name"``.
        card_data: A [`~modeling_rag.model_card.RagModelCardData`]; default: read from the saved folder.
        eval_results: Evaluation results for the card (see ``RagModelCardData.eval_results``).
        **kwargs: Passed to [`push_folder_to_hub`] (``token``, ``private``, ``revision``, ``create_pr``,
            ``commit_message``, ``repo_type``).

    Returns:
        The commit URL, as [`push_folder_to_hub`].
    """
    with tempfile.TemporaryDirectory(prefix="modeling_rag_push_") as tmp:
        folder = os.path.join(tmp, "model")
        os.makedirs(folder)
        model.save_pretrained(folder)
        return _card_and_push(folder, repo_id, tmp, card_data=card_data, eval_results=eval_results, **kwargs)


def push_saved_model_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card_data: Any = None,
    eval_results: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Publish a folder written by ``RagForGeneration.save_pretrained`` in one commit, with a model card.

    The folder is checked first (config, safetensors weights, no interrupted save, every part its config
    names: see `saved_model.check_saved_model`) and copied, so the card is written into the copy and
    your folder is left as it is. Arguments as [`push_model_to_hub`].
    """
    from .constants import CONFIG_NAME, SAFE_WEIGHTS_NAME
    from .utils.atomic import JOURNAL_NAME

    src = Path(folder)
    if not src.is_dir():
        raise HubError(f"{src} is not a folder; give the folder that save_pretrained wrote.")
    missing = [name for name in (CONFIG_NAME, SAFE_WEIGHTS_NAME) if not (src / name).is_file()]
    if missing:
        raise HubError(f"{src} is not a saved RAG model: {', '.join(missing)} missing. Save it with save_pretrained.")
    if (src / JOURNAL_NAME).exists():
        raise HubError(
            f"{src} holds an interrupted save; load it once with RagForGeneration.from_pretrained (which restores "
            "the previous files) or save it again, then push."
        )
    from .saved_model import check_saved_model

    check_saved_model(str(src))  # a folder that would be refused at load is not published either
    with tempfile.TemporaryDirectory(prefix="modeling_rag_push_") as tmp:
        staged = os.path.join(tmp, "model")
        shutil.copytree(src, staged, ignore=shutil.ignore_patterns(".staging-*", ".backup-*", ".*.tmp-*"))
        return _card_and_push(staged, repo_id, tmp, card_data=card_data, eval_results=eval_results, **kwargs)


def _card_and_push(folder: str, repo_id: str, tmp: str, *, card_data: Any, eval_results: Any, **kwargs: Any) -> str:
    """Adds (or refreshes) the model card of a staged folder, then pushes it as one commit."""
    from .model_card import card_data_from_model_folder, write_model_card

    if not os.path.exists(os.path.join(folder, MODEL_CARD_NAME)) or eval_results is not None or card_data is not None:
        if card_data is not None:
            data = card_data
        else:
            data = card_data_from_model_folder(folder, eval_results, model_name=repo_id.split("/")[-1], repo_id=repo_id)
        if getattr(data, "repo_id", None) is None:
            data.repo_id = repo_id
        if eval_results is not None and card_data is not None:
            data.eval_results = list(eval_results)
        existing = None
        local_card = os.path.join(folder, MODEL_CARD_NAME)
        if os.path.exists(local_card):
            with open(local_card, encoding="utf-8") as f:
                existing = f.read()
        else:
            existing = _existing_card_text(
                repo_id,
                token=kwargs.get("token"),
                revision=kwargs.get("revision"),
                repo_type=kwargs.get("repo_type", "model"),
                cache_dir=os.path.join(tmp, "cache"),
            )
        write_model_card(folder, data, existing_card_text=existing)
    return push_folder_to_hub(folder, repo_id, **kwargs)


def download_index_shards(
    repo_id: str,
    shards: Sequence[int] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    repo_type: str = "dataset",
) -> str:
    """Downloads the manifest and the shards numbered `shards` (None: all, with any files beside them) of the
    sharded index in a Hub repo, checks them against the manifest, and returns the local snapshot folder.

    A node of a cluster downloads only the shards it serves (``ShardedPassageIndex.open(folder, shards)``);
    shards downloaded later join the same snapshot folder. Raises `HubError` (download) or
    `ShardIntegrityError` (a shard not matching its manifest).
    """
    from .constants import SHARD_MANIFEST_NAME
    from .index.sharded import ShardedPassageIndex, read_manifest, shard_dir_name

    manifest_folder = resolve_model_folder(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        repo_type=repo_type,
        allow_patterns=[SHARD_MANIFEST_NAME],
        require_files=[SHARD_MANIFEST_NAME],
    )
    num_shards = read_manifest(manifest_folder)["num_shards"]
    wanted = list(range(num_shards)) if shards is None else sorted({int(s) for s in shards})
    bad = [s for s in wanted if not 0 <= s < num_shards]
    if bad:
        raise HubError(f"The sharded index in '{repo_id}' has shards 0..{num_shards - 1}; there is no shard {bad}.")
    # everything when all shards are asked for (a bm25/ beside them too), else the manifest and those shards
    patterns = None if shards is None else [SHARD_MANIFEST_NAME, *(f"{shard_dir_name(s)}/*" for s in wanted)]
    folder = resolve_model_folder(
        repo_id,
        revision=os.path.basename(manifest_folder) if revision is None else revision,  # the same commit
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        repo_type=repo_type,
        allow_patterns=patterns,
    )
    ShardedPassageIndex.open(folder, shards=None if shards is None else wanted, verify=True)
    return folder


__all__ = [
    "download_index_shards",
    "push_folder_to_hub",
    "push_model_to_hub",
    "push_saved_model_to_hub",
    "resolve_model_folder",
    "verify_index_checksums",
]

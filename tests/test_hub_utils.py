"""Push / pull through the local Hub server (tests/hub_server.py): no test reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from modeling_rag.errors import HubError, IndexIntegrityError
from modeling_rag.hub_utils import (
    push_folder_to_hub,
    push_model_to_hub,
    resolve_model_folder,
    verify_index_checksums,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo(prefix: str) -> str:
    return f"test-org/{prefix}-{uuid.uuid4().hex[:8]}"


def _write(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def _tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _model_files(version: int = 1) -> dict[str, bytes | str]:
    return {
        "config.json": json.dumps({"model_type": "modeling_rag", "version": version}),
        "model.safetensors": bytes(range(256)) * (4 + version),
        "question_encoder_tokenizer/tokenizer.json": json.dumps({"v": version}),
        "index/passages.jsonl": '{"id": 0, "text": "hello"}\n',
    }


def _index_files(layout: str = "files") -> dict[str, bytes | str]:
    """An index folder with checksums as PassageIndex.save writes them ("files") or as a flat "sha256" map."""
    files: dict[str, bytes | str] = {
        "index.faiss": os.urandom(2048),
        "passages.jsonl": '{"id": 0, "title": "T", "text": "The capital of France is Paris."}\n',
    }
    raw = {name: c.encode() if isinstance(c, str) else c for name, c in files.items()}
    config: dict = {"count": 1, "kind": "flat", "metric": "ip"}
    if layout == "files":
        config["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in raw.items()}
    else:
        config["sha256"] = {n: hashlib.sha256(b).hexdigest() for n, b in raw.items()}
    files["index_config.json"] = json.dumps(config)
    return files


# -- local folders ---------------------------------------------------------------------------------


def test_local_folder_is_returned_as_is(tmp_path):
    folder = _write(tmp_path / "m", {"config.json": "{}"})
    assert resolve_model_folder(folder) == str(folder.resolve())
    assert resolve_model_folder(str(folder), require_files=["config.json"]) == str(folder.resolve())
    with pytest.raises(HubError, match="model.safetensors"):
        resolve_model_folder(folder, require_files=["model.safetensors"])


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, hub_server):
    before = len(hub_server.requests)
    with pytest.raises(HubError, match="not an existing local folder"):
        resolve_model_folder(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(HubError, match="not an existing local folder"):
        resolve_model_folder("./no-such-model")
    assert len(hub_server.requests) == before


# -- push and pull -------------------------------------------------------------------------------------


def test_push_then_resolve_gives_identical_files(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("model")
    folder = _write(tmp_path / "saved", _model_files())
    url = push_folder_to_hub(folder, repo_id, token=hub_token)
    assert url.startswith(f"{hub_server.url}/{repo_id}/commit/")
    assert url.oid in url

    local = resolve_model_folder(repo_id)
    assert local.startswith(fresh_hf_cache)
    assert Path(local).name == url.oid  # the snapshot is keyed by the commit sha
    assert _tree(local) == _tree(folder)

    # an explicit cache_dir is honoured too
    other = resolve_model_folder(repo_id, cache_dir=tmp_path / "other_cache", require_files=["config.json"])
    assert other.startswith(str(tmp_path / "other_cache"))
    assert _tree(other) == _tree(folder)


def test_pinned_revision_gets_the_old_files(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("pinned")
    first = push_folder_to_hub(_write(tmp_path / "v1", _model_files(1)), repo_id, token=hub_token)
    second = push_folder_to_hub(_write(tmp_path / "v2", _model_files(2)), repo_id, token=hub_token, commit_message="v2")
    assert first.oid != second.oid

    latest = resolve_model_folder(repo_id)
    old = resolve_model_folder(repo_id, revision=first.oid)
    assert json.loads(Path(latest, "config.json").read_text())["version"] == 2
    assert json.loads(Path(old, "config.json").read_text())["version"] == 1
    assert _tree(old) == _tree(tmp_path / "v1")
    assert _tree(latest) == _tree(tmp_path / "v2")


def test_push_to_a_branch_and_open_a_pull_request(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("branch")
    push_folder_to_hub(_write(tmp_path / "v1", _model_files(1)), repo_id, token=hub_token)
    dev = push_folder_to_hub(_write(tmp_path / "v2", _model_files(2)), repo_id, token=hub_token, revision="dev")
    pr = push_folder_to_hub(_write(tmp_path / "v3", _model_files(3)), repo_id, token=hub_token, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1

    def version(revision):
        return json.loads(Path(resolve_model_folder(repo_id, revision=revision), "config.json").read_text())["version"]

    assert version("main") == 1  # neither the branch nor the PR moved main
    assert version("dev") == 2
    assert version(dev.oid) == 2
    assert version("refs/pr/1") == 3


def test_allow_patterns_download_only_matching_files(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("patterns")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token)
    local = resolve_model_folder(repo_id, allow_patterns=["*.json"])
    assert set(_tree(local)) == {"config.json", "question_encoder_tokenizer/tokenizer.json"}


def test_dataset_repo_holds_an_index(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("index")
    folder = _write(tmp_path / "index", _index_files())
    push_folder_to_hub(folder, repo_id, token=hub_token, repo_type="dataset", commit_message="Upload index")

    local = resolve_model_folder(repo_id, repo_type="dataset")
    assert "datasets--test-org--" in local
    assert _tree(local) == _tree(folder)
    assert set(verify_index_checksums(local, repo_id=repo_id)) == {"index.faiss", "passages.jsonl"}

    with pytest.raises(HubError, match="not found") as err:  # it is not a model repo
        resolve_model_folder(repo_id)
    assert repo_id in str(err.value) and "repo_type" in str(err.value)


# -- errors --------------------------------------------------------------------------------------------


def test_repo_not_found(hub_server, fresh_hf_cache):
    repo_id = _repo("Missing")
    with pytest.raises(HubError, match="not found") as err:
        resolve_model_folder(repo_id)
    assert repo_id in str(err.value)


def test_revision_not_found(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("rev")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token)
    with pytest.raises(HubError, match="Revision 'no-such-branch' not found") as err:
        resolve_model_folder(repo_id, revision="no-such-branch")
    assert repo_id in str(err.value)


def test_missing_required_file_names_file_repo_and_revision(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("incomplete")
    push_folder_to_hub(_write(tmp_path / "m", {"config.json": "{}"}), repo_id, token=hub_token)
    with pytest.raises(HubError) as err:
        resolve_model_folder(repo_id, require_files=["config.json", "model.safetensors"])
    message = str(err.value)
    assert "model.safetensors" in message and repo_id in message and "'main'" in message
    assert "config.json" not in message.split("looked in")[0]


def test_corrupted_download_fails_the_checksum(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("corrupt")
    commit = push_folder_to_hub(
        _write(tmp_path / "index", _index_files()), repo_id, token=hub_token, repo_type="dataset"
    )
    altered = hub_server.corrupt_file(repo_id, "index.faiss", repo_type="dataset")
    assert altered == commit.oid  # same commit sha, same ETag: only the bytes changed

    local = resolve_model_folder(repo_id, repo_type="dataset")
    assert Path(local).name == commit.oid
    with pytest.raises(IndexIntegrityError, match="index.faiss") as err:
        verify_index_checksums(local, repo_id=repo_id, revision="main")
    assert repo_id in str(err.value) and "corrupted" in str(err.value)
    assert isinstance(err.value, OSError)


@pytest.mark.parametrize("layout", ["files", "sha256"])
def test_verify_index_checksums_layouts(tmp_path, layout):
    folder = _write(tmp_path / "index", _index_files(layout))
    assert set(verify_index_checksums(folder)) == {"index.faiss", "passages.jsonl"}
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(IndexIntegrityError, match="'index.faiss' .* is corrupted: sha256"):
        verify_index_checksums(folder)
    (folder / "index.faiss").write_bytes(data + b"x")
    with pytest.raises(IndexIntegrityError, match="'index.faiss' .* is corrupted"):
        verify_index_checksums(folder)


def test_verify_index_checksums_errors(tmp_path):
    folder = _write(tmp_path / "index", _index_files())
    verify_index_checksums(folder)

    (folder / "passages.jsonl").unlink()
    with pytest.raises(IndexIntegrityError, match="'passages.jsonl' is missing"):
        verify_index_checksums(folder)

    (folder / "index_config.json").write_text(json.dumps({"count": 1}))
    with pytest.raises(IndexIntegrityError, match="no checksums"):
        verify_index_checksums(folder)

    (folder / "index_config.json").write_text(json.dumps({"sha256": {"../outside": "0" * 64}}))
    with pytest.raises(IndexIntegrityError, match="outside the index folder"):
        verify_index_checksums(folder)

    (folder / "index_config.json").unlink()
    with pytest.raises(IndexIntegrityError, match="no index_config.json"):
        verify_index_checksums(folder)


# -- offline -------------------------------------------------------------------------------------------


def test_local_files_only_after_one_download(tmp_path, hub_server, hub_token, fresh_hf_cache):
    repo_id = _repo("Offline")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token)
    online = resolve_model_folder(repo_id)

    before = len(hub_server.requests)
    assert resolve_model_folder(repo_id, local_files_only=True) == online
    assert len(hub_server.requests) == before  # served from the cache alone

    with pytest.raises(HubError, match="not in the local Hub cache") as err:
        resolve_model_folder(repo_id, local_files_only=True, cache_dir=tmp_path / "empty_cache")
    assert "Run once online" in str(err.value) and repo_id in str(err.value)


def test_hf_hub_offline_set_after_import_is_honoured(tmp_path, hub_server, hub_token, fresh_hf_cache, monkeypatch):
    repo_id = _repo("offline-env")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token)
    online = resolve_model_folder(repo_id)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_server.requests)
    assert resolve_model_folder(repo_id) == online
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        resolve_model_folder(_repo("never-downloaded"))
    assert len(hub_server.requests) == before


def test_hf_hub_offline_in_a_fresh_process(tmp_path, hub_server, hub_token, fresh_hf_cache):
    """HF_HUB_OFFLINE=1 set before huggingface_hub is imported, as a user would."""
    repo_id = _repo("offline-proc")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token)
    online = resolve_model_folder(repo_id)

    code = (
        "import sys\n"
        "from modeling_rag.errors import HubError\n"
        "from modeling_rag.hub_utils import resolve_model_folder\n"
        "print(resolve_model_folder(sys.argv[1]))\n"
        "try:\n"
        "    resolve_model_folder(sys.argv[1], cache_dir=sys.argv[2])\n"
        "except HubError as err:\n"
        "    print('HubError:', err)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=fresh_hf_cache, HF_ENDPOINT="http://127.0.0.1:9")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    before = len(hub_server.requests)
    args = [sys.executable, "-c", code, repo_id, str(tmp_path / "empty_cache")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert lines and lines[0] == online, proc.stderr  # served from the cache alone
    empty = "\n".join(lines[1:])
    assert empty.startswith("HubError:"), proc.stderr  # nothing cached: a clear error
    assert "HF_HUB_OFFLINE" in empty and "Run once online" in empty and repo_id in empty
    assert len(hub_server.requests) == before


# -- auth ----------------------------------------------------------------------------------------------


def test_push_without_token_is_a_clear_error(tmp_path, hub_server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = len(hub_server.requests)
    with pytest.raises(HubError, match="No Hugging Face token") as err:
        push_folder_to_hub(_write(tmp_path / "m", _model_files()), _repo("no-token"))
    assert "HF_TOKEN" in str(err.value)
    assert len(hub_server.requests) == before


def test_push_with_a_wrong_token(tmp_path, hub_server, hub_token):
    repo_id = _repo("wrong-token")
    folder = _write(tmp_path / "m", _model_files())
    with pytest.raises(HubError, match="rejected the token"):
        push_folder_to_hub(folder, repo_id, token="hf_not_a_real_token")
    push_folder_to_hub(folder, repo_id, token=hub_token)  # the repo exists now: still refused
    with pytest.raises(HubError, match="rejected the token"):
        push_folder_to_hub(folder, repo_id, token="hf_not_a_real_token", commit_message="again")


def test_push_with_a_read_only_token(tmp_path, hub_server, hub_token):
    from conftest import HUB_READ_TOKEN

    repo_id = _repo("read-only")
    folder = _write(tmp_path / "m", _model_files())
    with pytest.raises(HubError, match="no write permission"):
        push_folder_to_hub(folder, repo_id, token=HUB_READ_TOKEN)
    push_folder_to_hub(folder, repo_id, token=hub_token)
    _write(folder, {"config.json": "{}"})
    with pytest.raises(HubError, match="no write permission") as err:
        push_folder_to_hub(folder, repo_id, token=HUB_READ_TOKEN)
    assert repo_id in str(err.value)


def test_private_repo_needs_a_token_to_read(tmp_path, hub_server, hub_token, fresh_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    repo_id = _repo("private")
    push_folder_to_hub(_write(tmp_path / "m", _model_files()), repo_id, token=hub_token, private=True)
    with pytest.raises(HubError, match="private"):
        resolve_model_folder(repo_id)
    assert _tree(resolve_model_folder(repo_id, token=hub_token)) == _tree(tmp_path / "m")


# -- push_model_to_hub ------------------------------------------------------------------------------------


class _FakeModel:
    """Stands in for RagForGeneration: only ``save_pretrained`` is used."""

    def __init__(self, version: int = 1):
        self.version = version

    def save_pretrained(self, folder: str) -> None:
        _write(Path(folder), _model_files(self.version))
        config = {
            "model_type": "modeling_rag",
            "question_encoder": {"_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "bert"},
            "generator": {"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_type": "llama"},
            "n_docs": 3,
        }
        Path(folder, "config.json").write_text(json.dumps(config))
        Path(folder, "index", "index_config.json").write_text(json.dumps({"count": 1, "kind": "flat", "metric": "ip"}))


def test_push_model_adds_a_card_and_keeps_user_text(tmp_path, hub_server, hub_token, fresh_hf_cache):
    from huggingface_hub import HfApi, ModelCard

    repo_id = _repo("rag-model")
    results = [{"dataset_name": "toy", "dataset_split": "dev", "metric_type": "exact_match", "metric_value": 0.25}]
    push_model_to_hub(_FakeModel(1), repo_id, token=hub_token, eval_results=results)
    local = resolve_model_folder(repo_id)
    card = ModelCard.load(Path(local, "README.md"))
    assert card.data.library_name == "modeling_rag"
    assert card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.25
    assert f'from_pretrained("{repo_id}")' in card.text
    assert card.text.lstrip().startswith(f"# {repo_id.split('/')[-1]}\n")
    assert card.data.to_dict()["model-index"][0]["name"] == repo_id.split("/")[-1]

    # the author edits the card on the Hub, then the model is pushed again with new results
    note = "\nA note written by the author, kept verbatim.\n"
    HfApi(token=hub_token).upload_file(
        path_or_fileobj=(Path(local, "README.md").read_text() + note).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    results[0]["metric_value"] = 0.5
    push_model_to_hub(_FakeModel(2), repo_id, token=hub_token, eval_results=results, commit_message="v2")
    card = ModelCard.load(Path(resolve_model_folder(repo_id), "README.md"))
    assert note in card.text
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5


def test_a_node_downloads_only_its_shards(tmp_path, hub_server, hub_token, fresh_hf_cache):
    import numpy as np

    from modeling_rag.errors import ShardIntegrityError
    from modeling_rag.hub_utils import download_index_shards
    from modeling_rag.index.sharded import ShardedPassageIndex
    from modeling_rag.index.sharded_build import build_sharded_index

    rng = np.random.default_rng(0)
    passages = [{"id": f"p{i}", "title": "", "text": f"passage {i}"} for i in range(30)]
    folder = tmp_path / "sharded"
    build_sharded_index(folder, rng.standard_normal((30, 8)).astype(np.float32), passages, 3, kind="flat")
    repo_id = _repo("sharded")
    push_folder_to_hub(folder, repo_id, token=hub_token, repo_type="dataset")

    local = download_index_shards(repo_id, [1])
    assert sorted(p.name for p in Path(local).iterdir()) == ["shard-00001", "shards.json"]
    part = ShardedPassageIndex.open(local, shards=[1])
    assert part.get_passages([12])[0]["id"] == "p12"
    with pytest.raises(ShardIntegrityError, match="Shard 0 .*missing"):
        ShardedPassageIndex.open(local)
    everything = download_index_shards(repo_id)  # the rest joins the same snapshot
    assert everything == local and ShardedPassageIndex.open(everything).count == 30
    with pytest.raises(HubError, match="no shard"):
        download_index_shards(repo_id, [3])

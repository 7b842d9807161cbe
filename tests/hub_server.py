"""A small Hugging Face Hub-compatible HTTP server for offline tests (standard library only).

It answers what ``huggingface_hub`` (2.x) sends for downloads, uploads and repo management (see
the team's Hub protocol notes), storing repos in a folder on disk with real commits:

- every commit is an immutable snapshot (a copy of all its files) named by a 40-hex sha;
- refs (``main``, other branches, ``refs/pr/N``) point to commits; a revision is a ref or a sha;
- files are served with ``X-Repo-Commit``, an ``ETag`` (the git blob sha1, as on the Hub) and
  ``Content-Length``; errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) and ``HEAD`` errors carry no body;
- writes need ``Authorization: Bearer <token>`` with a token from ``tokens`` (write) — a token from
  ``read_tokens`` gets 403, an unknown one 401 ``Invalid credentials in Authorization header``,
  no header 401.

Layout on disk (``root_dir``)::

    {model,dataset,space}s/{repo_id with "/" -> "--"}/
        repo.json             id, private, refs {name: sha}, commits {sha: {parent, message, files}}
        commits/{sha}/...     the files of that commit

Usage::

    server = start_hub_server(tmp_dir)         # port 0: a free port
    os.environ["HF_ENDPOINT"] = server.url     # before huggingface_hub is imported
    ...
    server.corrupt_file("org/repo", "index/index.faiss")   # same commit sha, other bytes
    server.shutdown()
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_API_ACTIONS = ("revision", "tree", "preupload", "commit", "branch", "refs", "commits", "discussions")
DEFAULT_USER = "test-user"


class HubHTTPError(Exception):
    """An error answer: status, optional ``X-Error-Code`` and a message (sent as JSON ``error``)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub uses as a small file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _safe_rel_path(path: str) -> str:
    """Normalise a path inside a repo; refuse absolute paths and ``..``."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


def _atomic_write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RepoStore:
    """Repositories on disk with commits, refs and snapshots; thread-safe through one lock."""

    def __init__(self, root_dir: str | os.PathLike):
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._counter = 0

    # -- layout -------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id.replace("/", "--")

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "repo.json").is_file()

    def meta(self, repo_type: str, repo_id: str) -> dict:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            raise HubHTTPError(404, f"Repository {repo_id} ({repo_type}) not found", "RepoNotFound")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _save_meta(self, repo_type: str, repo_id: str, meta: dict) -> None:
        _atomic_write_json(self.repo_dir(repo_type, repo_id) / "repo.json", meta)

    def snapshot_dir(self, repo_type: str, repo_id: str, sha: str) -> Path:
        return self.repo_dir(repo_type, repo_id) / "commits" / sha

    # -- repos ----------------------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> None:
        with self.lock:
            if self.exists(repo_type, repo_id):
                raise HubHTTPError(409, f"You already created this {repo_type} repo: {repo_id}")
            rdir = self.repo_dir(repo_type, repo_id)
            (rdir / "commits").mkdir(parents=True, exist_ok=True)
            meta = {
                "id": repo_id,
                "type": repo_type,
                "private": bool(private),
                "createdAt": _now(),
                "refs": {},
                "commits": {},
                "pr_count": 0,
            }
            sha = self._new_commit(rdir, meta, parent=None, files={}, sources={}, message="initial commit")
            meta["refs"]["main"] = sha
            self._save_meta(repo_type, repo_id, meta)

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.meta(repo_type, repo_id)
            shutil.rmtree(self.repo_dir(repo_type, repo_id))

    # -- revisions ------------------------------------------------------------------------------
    def resolve(self, repo_type: str, repo_id: str, revision: str | None) -> tuple[dict, str]:
        """(repo meta, commit sha) of a branch / PR ref / full commit sha; 404 RevisionNotFound otherwise."""
        meta = self.meta(repo_type, repo_id)
        revision = revision or "main"
        if revision in meta["refs"]:
            return meta, meta["refs"][revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in meta["refs"]:
            return meta, meta["refs"][revision[len("refs/heads/") :]]
        if _SHA_RE.match(revision) and revision in meta["commits"]:
            return meta, revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, meta: dict, sha: str) -> dict[str, dict]:
        return meta["commits"][sha]["files"]

    # -- commits --------------------------------------------------------------------------------
    def _new_commit(
        self,
        rdir: Path,
        meta: dict,
        *,
        parent: str | None,
        files: dict[str, dict],
        sources: dict[str, Path | bytes],
        message: str,
        description: str = "",
    ) -> str:
        """Write a snapshot (files copied from ``sources``: a Path of an older snapshot or bytes)."""
        self._counter += 1
        seed = json.dumps([parent, message, files, time.time_ns(), self._counter], sort_keys=True)
        sha = hashlib.sha1(seed.encode()).hexdigest()
        tmp = Path(tempfile.mkdtemp(dir=rdir / "commits", prefix=".tmp-"))
        try:
            for path, src in sources.items():
                dest = tmp / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(src, bytes):
                    dest.write_bytes(src)
                else:
                    shutil.copyfile(src, dest)
            os.replace(tmp, rdir / "commits" / sha)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta["commits"][sha] = {
            "parent": parent,
            "message": message,
            "description": description,
            "date": _now(),
            "files": files,
        }
        return sha

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        operations: list[tuple[str, str, bytes | None]],
        *,
        message: str,
        description: str = "",
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[str, str, int | None]:
        """Apply ``(kind, path, content)`` operations on top of ``revision``; return (sha, ref, pr number).

        ``kind`` is ``"add"``, ``"delete_file"`` or ``"delete_folder"``. A missing branch is created from
        ``main``; ``create_pr`` opens ``refs/pr/N`` on top of ``revision`` instead of moving it.
        """
        with self.lock:
            meta = self.meta(repo_type, repo_id)
            rdir = self.repo_dir(repo_type, repo_id)
            if revision in meta["refs"] or revision.startswith("refs/pr/"):
                _, base = self.resolve(repo_type, repo_id, revision)
            elif _SHA_RE.match(revision):
                raise HubHTTPError(400, f"Cannot commit on a commit sha ({revision}); use a branch")
            else:
                base = meta["refs"]["main"]  # a new branch starts from main
            if parent_commit is not None and parent_commit != base:
                raise HubHTTPError(412, f"Parent commit {parent_commit} is not the head of {revision} ({base})")
            base_files = self.files(meta, base)
            base_dir = self.snapshot_dir(repo_type, repo_id, base)
            files = dict(base_files)
            new_content: dict[str, bytes] = {}
            for kind, path, content in operations:
                if kind == "add":
                    assert content is not None
                    files[path] = {"oid": git_blob_sha1(content), "size": len(content)}
                    new_content[path] = content
                elif kind == "delete_file":
                    if path not in files:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    files.pop(path)
                    new_content.pop(path, None)
                elif kind == "delete_folder":
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        files.pop(p)
                        new_content.pop(p, None)
                else:
                    raise HubHTTPError(400, f"Unknown operation {kind!r}")
            sources: dict[str, Path | bytes] = {p: new_content.get(p, base_dir / p) for p in files}
            sha = self._new_commit(
                rdir, meta, parent=base, files=files, sources=sources, message=message, description=description
            )
            pr_num = None
            if create_pr:
                meta["pr_count"] = pr_num = meta.get("pr_count", 0) + 1
                ref = f"refs/pr/{pr_num}"
            else:
                ref = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            meta["refs"][ref] = sha
            self._save_meta(repo_type, repo_id, meta)
            return sha, ref, pr_num

    def create_discussion(
        self, repo_type: str, repo_id: str, title: str, description: str, pull_request: bool
    ) -> tuple[int, dict]:
        """Open a discussion; a pull request gets a ``refs/pr/N`` ref at the head of ``main``."""
        with self.lock:
            meta = self.meta(repo_type, repo_id)
            meta["pr_count"] = num = meta.get("pr_count", 0) + 1
            discussion = {
                "title": title,
                "description": description,
                "isPullRequest": bool(pull_request),
                "createdAt": _now(),
                "status": "draft" if pull_request else "open",
            }
            meta.setdefault("discussions", {})[str(num)] = discussion
            if pull_request:
                meta["refs"][f"refs/pr/{num}"] = meta["refs"]["main"]
            self._save_meta(repo_type, repo_id, meta)
            return num, discussion

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            meta = self.meta(repo_type, repo_id)
            if branch in meta["refs"]:
                raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
            _, sha = self.resolve(repo_type, repo_id, starting_point or "main")
            meta["refs"][branch] = sha
            self._save_meta(repo_type, repo_id, meta)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self.lock:
            meta = self.meta(repo_type, repo_id)
            if branch not in meta["refs"] or branch == "main":
                raise HubHTTPError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
            del meta["refs"][branch]
            self._save_meta(repo_type, repo_id, meta)

    def corrupt_file(
        self,
        repo_id: str,
        path: str,
        *,
        revision: str = "main",
        repo_type: str = "model",
        content: bytes | None = None,
    ) -> str:
        """Change a stored file of a commit behind the client's back (same commit sha, same ETag).

        With ``content=None`` the bytes are flipped (the size stays the same, so only a checksum notices).
        Returns the commit sha that was altered.
        """
        with self.lock:
            meta, sha = self.resolve(repo_type, repo_id, revision)
            if path not in self.files(meta, sha):
                raise KeyError(f"{path} is not in {repo_id}@{sha}")
            target = self.snapshot_dir(repo_type, repo_id, sha) / path
            data = target.read_bytes()
            if content is None:
                content = bytes(b ^ 0xFF for b in data) if data else b"\0"
            target.write_bytes(content)
            if len(content) != len(data):  # keep Content-Length honest; the oid (ETag) stays stale
                meta["commits"][sha]["files"][path]["size"] = len(content)
                self._save_meta(repo_type, repo_id, meta)
            return sha


class HubServer(ThreadingHTTPServer):
    """The HTTP server; ``.url``, ``.store`` and ``.shutdown()`` (stop and join the thread)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        store: RepoStore,
        tokens: Iterable[str],
        read_tokens: Iterable[str] = (),
        user: str = DEFAULT_USER,
    ):
        super().__init__(address, HubRequestHandler)
        self.store = store
        self.write_tokens = set(tokens)
        self.read_tokens = set(read_tokens)
        self.user = user
        self.thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def corrupt_file(self, repo_id: str, path: str, **kwargs: Any) -> str:
        """See [`RepoStore.corrupt_file`]."""
        return self.store.corrupt_file(repo_id, path, **kwargs)

    def shutdown(self) -> None:  # noqa: D102 - also closes the socket and joins the thread
        super().shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub API and resolve requests to the [`RepoStore`]."""

    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.command == "HEAD":
            # a HEAD answer announces the size of the would-be body but sends none
            self.send_header("Content-Length", str(len(body)) if status < 400 else "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(self, err: HubHTTPError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._json(err.status, {"error": err.message}, headers=headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _require_write(self, what: str) -> None:
        token = self._token()
        if token is None:
            raise HubHTTPError(401, f"You must be authenticated to {what} (send a Bearer token)")
        if token in self.server.write_tokens:
            return
        if token in self.server.read_tokens:
            raise HubHTTPError(403, f"You don't have the rights to {what}: this token is read-only")
        raise HubHTTPError(401, "Invalid credentials in Authorization header")

    def _check_read(self, meta: dict) -> None:
        if meta.get("private"):
            token = self._token()
            if token not in self.server.write_tokens | self.server.read_tokens:
                raise HubHTTPError(401, "Repository not found", "RepoNotFound")

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _dispatch(self) -> None:
        self.server.requests.append((self.command, self.path))
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.split("/") if s]
        try:
            if segments and segments[0] == "api":
                self._api(segments[1:], query, body)
            else:
                self._resolve(segments)
        except HubHTTPError as err:
            self._error(err)
        except Exception as err:  # a bug here should surface as a 500 with the reason, not a hang
            self._error(HubHTTPError(500, f"{type(err).__name__}: {err}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- /{repo}/resolve/{rev}/{path} ---------------------------------------------------------------
    def _resolve(self, seg: list[str]) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HubHTTPError(405, "Method not allowed")
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0][:-1], seg[1:]
        if "resolve" not in seg[:3] or seg.index("resolve") == 0:
            raise HubHTTPError(404, f"Not found: {self.path}")
        i = seg.index("resolve")
        repo_id = "/".join(seg[:i])
        rest = seg[i + 1 :]
        if not rest:
            raise HubHTTPError(404, "Missing revision")
        if rest[0] == "refs" and len(rest) > 2 and rest[1] in ("pr", "heads", "convert"):
            revision, rest = "/".join(rest[:3]), rest[3:]
        else:
            revision, rest = rest[0], rest[1:]
        store = self.server.store
        meta, sha = store.resolve(repo_type, repo_id, revision)
        self._check_read(meta)
        path = "/".join(rest)
        entry = store.files(meta, sha).get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = (store.snapshot_dir(repo_type, repo_id, sha) / path).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        status = 200
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HubHTTPError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, content_type="application/octet-stream", headers=headers)

    # -- /api/... ---------------------------------------------------------------------------------
    def _api(self, seg: list[str], query: dict[str, str], body: bytes) -> None:
        method = self.command
        if seg == ["whoami-v2"]:
            token = self._token()
            if token not in self.server.write_tokens | self.server.read_tokens:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            role = "write" if token in self.server.write_tokens else "read"
            self._json(200, {"type": "user", "name": self.server.user, "auth": {"accessToken": {"role": role}}})
            return
        if seg == ["validate-yaml"] and method == "POST":
            self._json(200, {"errors": [], "warnings": []})
            return
        if seg[:2] == ["repos", "create"] and method == "POST":
            self._create_repo(json.loads(body or b"{}"))
            return
        if seg[:2] == ["repos", "delete"] and method == "DELETE":
            payload = json.loads(body or b"{}")
            self._require_write("delete this repo")
            repo_id = "/".join(x for x in (payload.get("organization"), payload["name"]) if x)
            self.server.store.delete_repo(payload.get("type") or "model", repo_id)
            self._json(200, {})
            return
        if not seg or seg[0] not in ("models", "datasets", "spaces"):
            raise HubHTTPError(404, f"Not found: {self.path}")
        repo_type = seg[0][:-1]
        rest = seg[1:]
        n = 2 if len(rest) >= 2 and rest[1] not in _API_ACTIONS else 1
        repo_id, rest = "/".join(rest[:n]), rest[n:]
        if not repo_id:
            raise HubHTTPError(404, f"Not found: {self.path}")
        action = rest[0] if rest else None
        args = rest[1:]
        if action is None and method == "GET":
            self._info(repo_type, repo_id, None)
        elif action == "revision" and method == "GET":
            self._info(repo_type, repo_id, "/".join(args))
        elif action == "tree" and method == "GET":
            self._tree(repo_type, repo_id, args, query)
        elif action == "refs" and method == "GET":
            self._refs(repo_type, repo_id, query)
        elif action == "commits" and method == "GET":
            self._commits(repo_type, repo_id, "/".join(args) or "main")
        elif action == "preupload" and method == "POST":
            self._preupload(repo_type, repo_id, "/".join(args), json.loads(body or b"{}"))
        elif action == "commit" and method == "POST":
            self._commit(repo_type, repo_id, "/".join(args), query, body)
        elif action == "discussions" and method == "POST" and not args:
            self._require_write("open a discussion")
            payload = json.loads(body or b"{}")
            num, _ = self.server.store.create_discussion(
                repo_type,
                repo_id,
                payload.get("title") or "",
                payload.get("description") or "",
                bool(payload.get("pullRequest")),
            )
            self._json(200, {"num": num, "url": f"{self._repo_url(repo_type, repo_id)}/discussions/{num}"})
        elif action == "discussions" and method == "GET" and len(args) == 1:
            self._discussion(repo_type, repo_id, args[0])
        elif action == "branch" and method == "POST":
            self._require_write("create a branch")
            payload = json.loads(body or b"{}")
            self.server.store.create_branch(repo_type, repo_id, "/".join(args), payload.get("startingPoint"))
            self._json(200, {})
        elif action == "branch" and method == "DELETE":
            self._require_write("delete a branch")
            self.server.store.delete_branch(repo_type, repo_id, "/".join(args))
            self._json(200, {})
        else:
            raise HubHTTPError(404, f"Not found: {method} {self.path}")

    def _create_repo(self, payload: dict) -> None:
        self._require_write("create a repo")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubHTTPError(400, f"Invalid repo type {repo_type!r}")
        name = payload.get("name")
        if not name:
            raise HubHTTPError(400, "Missing repo name")
        repo_id = "/".join(x for x in (payload.get("organization"), name) if x)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        url = self._repo_url(repo_type, repo_id)
        try:
            self.server.store.create_repo(repo_type, repo_id, private=private)
        except HubHTTPError as err:
            if err.status == 409:
                self._json(409, {"error": err.message, "url": url}, headers={"X-Error-Message": err.message})
                return
            raise
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        store = self.server.store
        meta, sha = store.resolve(repo_type, repo_id, revision)
        self._check_read(meta)
        files = store.files(meta, sha)
        commit = meta["commits"][sha]
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else self.server.user,
                "sha": sha,
                "private": meta["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": meta["createdAt"],
                "lastModified": commit["date"],
                "siblings": [{"rfilename": p, "size": f["size"], "blobId": f["oid"]} for p, f in sorted(files.items())],
            },
        )

    def _tree(self, repo_type: str, repo_id: str, args: list[str], query: dict[str, str]) -> None:
        if not args:
            raise HubHTTPError(404, "Missing revision")
        if args[0] == "refs" and len(args) > 2:
            revision, sub = "/".join(args[:3]), args[3:]
        else:
            revision, sub = args[0], args[1:]
        store = self.server.store
        meta, sha = store.resolve(repo_type, repo_id, revision)
        self._check_read(meta)
        files = store.files(meta, sha)
        prefix = "/".join(sub)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for path, f in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            parts = rel.split("/")
            depth = len(parts) if recursive else 1
            for d in range(1, min(depth, len(parts) - 1) + 1):  # directories on the way
                dpath = "/".join(([prefix] if prefix else []) + parts[:d])
                entries.setdefault(dpath, {"type": "directory", "path": dpath, "oid": "0" * 40, "size": 0})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": f["oid"], "size": f["size"]}
        if prefix and not entries:
            raise HubHTTPError(404, f"Entry not found: {prefix}", "EntryNotFound")
        self._json(200, list(entries.values()))

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, str]) -> None:
        meta = self.server.store.meta(repo_type, repo_id)
        self._check_read(meta)
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
            for n, s in meta["refs"].items()
            if not n.startswith("refs/")
        ]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs"):
            out["pullRequests"] = [
                {"name": n.split("/")[-1], "ref": n, "targetCommit": s}
                for n, s in meta["refs"].items()
                if n.startswith("refs/pr/")
            ]
        self._json(200, out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        meta, sha = self.server.store.resolve(repo_type, repo_id, revision)
        self._check_read(meta)
        history = []
        while sha is not None:
            c = meta["commits"][sha]
            history.append(
                {
                    "id": sha,
                    "title": c["message"],
                    "message": c.get("description", ""),
                    "authors": [{"user": self.server.user}],
                    "date": c["date"],
                }
            )
            sha = c["parent"]
        self._json(200, history)

    def _discussion(self, repo_type: str, repo_id: str, num: str) -> None:
        meta = self.server.store.meta(repo_type, repo_id)
        self._check_read(meta)
        discussion = meta.get("discussions", {}).get(num)
        if discussion is None:
            raise HubHTTPError(404, f"Discussion {num} not found")
        self._json(
            200,
            {
                "num": int(num),
                "title": discussion["title"],
                "createdAt": discussion["createdAt"],
                "status": discussion["status"],
                "isPullRequest": discussion["isPullRequest"],
                "author": {"name": self.server.user},
                "repo": {"name": repo_id, "type": repo_type},
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
            },
        )

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        self._require_write("upload to this repo")
        store = self.server.store
        meta = store.meta(repo_type, repo_id)
        try:
            _, sha = store.resolve(repo_type, repo_id, revision)
            files = store.files(meta, sha)
        except HubHTTPError:  # a branch that does not exist yet: the commit creates it
            sha, files = meta["refs"]["main"], {}
        out = []
        for f in payload.get("files", []):
            existing = files.get(f["path"])
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing["oid"] if existing else None,
                }
            )
        self._json(200, {"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, str], body: bytes) -> None:
        self._require_write("commit to this repo")
        store = self.server.store
        store.meta(repo_type, repo_id)  # 404 before parsing
        header: dict = {}
        operations: list[tuple[str, str, bytes | None]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubHTTPError(400, f"Unsupported encoding {value.get('encoding')!r}")
                operations.append(("add", _safe_rel_path(value["path"]), base64.b64decode(value["content"])))
            elif key == "deletedFile":
                operations.append(("delete_file", _safe_rel_path(value["path"]), None))
            elif key == "deletedFolder":
                operations.append(("delete_folder", _safe_rel_path(value["path"]), None))
            elif key == "lfsFile":
                raise HubHTTPError(400, "LFS uploads are not supported by this test server (uploadMode is regular)")
            else:
                raise HubHTTPError(400, f"Unknown commit operation key {key!r}")
        create_pr = query.get("create_pr", "").lower() in ("1", "true")
        sha, _ref, pr_num = store.commit(
            repo_type,
            repo_id,
            revision or "main",
            operations,
            message=header.get("summary") or "Upload files",
            description=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        repo_url = self._repo_url(repo_type, repo_id)
        reply: dict[str, Any] = {"success": True, "commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}"}
        reply["pullRequestUrl"] = f"{repo_url}/discussions/{pr_num}" if pr_num is not None else None
        self._json(200, reply)


def start_hub_server(
    root_dir: str | os.PathLike,
    port: int = 0,
    tokens: Iterable[str] = ("hf_test_token",),
    read_tokens: Iterable[str] = ("hf_read_only_token",),
    host: str = "127.0.0.1",
) -> HubServer:
    """Start a [`HubServer`] storing repos under ``root_dir`` in a daemon thread; return it.

    ``port=0`` picks a free port (see ``server.url``). ``tokens`` may write; ``read_tokens`` may only
    read (writes get 403). Stop it with ``server.shutdown()``.
    """
    server = HubServer((host, port), RepoStore(root_dir), tokens=tokens, read_tokens=read_tokens)
    thread = threading.Thread(target=server.serve_forever, name=f"hub-server-{server.url}", daemon=True)
    server.thread = thread
    thread.start()
    return server


__all__ = ["HubServer", "RepoStore", "git_blob_sha1", "start_hub_server"]

"""A fake Hugging Face Hub on 127.0.0.1, good enough for huggingface_hub 2.4 and infer_cli.hub.

It answers what the real Hub answers for the calls infer makes:

* ``GET /api/models/{org}/{name}[/revision/{rev}][?blobs=true]`` -> model info JSON with ``sha`` and
  ``siblings`` (``rfilename``, ``size``, ``blobId`` and, for LFS files, ``lfs: {sha256, size, pointerSize}``).
* ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}`` -> for a plain (git) file: 200 with ``ETag`` (git blob
  sha1), ``X-Repo-Commit``, ``Content-Length`` and the bytes (Range honoured). For an LFS file (``*.gguf``,
  ``*.bin``, ``*.safetensors``): 302 to the "CDN" with ``X-Linked-Etag`` (sha256), ``X-Linked-Size``,
  ``X-Repo-Commit`` and ``Location``, as huggingface.co does.
* ``HEAD|GET /cdn/{org}/{name}/{commit}/{path}`` on a *second port* (another origin, like the real CDN, so
  huggingface_hub stops at the redirect and httpx drops the Authorization header) -> the bytes, 200 or 206.
* Errors carry the Hub's headers: 401 ``X-Error-Code: RepoNotFound`` for an unknown repo, 404
  ``RevisionNotFound`` / ``EntryNotFound``, 401/403 ``GatedRepo`` for a gated repo without the right token.
* Revisions: ``main`` and the repo's commit, plus the branches, tags and commits that
  :meth:`FakeHub.add_revision` adds, each with its own files.

Fault injection: :meth:`FakeHub.cut_after` (a transfer stops at a byte offset and the socket is closed
mid-body), :meth:`FakeHub.corrupt` (served bytes differ from the advertised sha256). Every request is
logged in :attr:`FakeHub.log` so tests can assert on Range headers, or that nothing was asked at all.

The ``hub`` pytest fixture starts one, points HF_ENDPOINT at it and HF_HOME at the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".gguf", ".bin", ".safetensors")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub sends as ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    gated_token: str | None = None  # downloads need "Authorization: Bearer <gated_token>"
    listing_has_lfs: bool = True  # False: the API listing omits lfs/sha256 (exercises the HEAD fallback)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # other commits -> their files

    def files_at(self, commit: str | None) -> dict[str, bytes]:
        """The files of ``commit`` (``files`` for the repo's own commit)."""
        return self.trees.get(commit or self.commit, self.files)

    def is_lfs(self, filename: str) -> bool:
        return filename.lower().endswith(LFS_SUFFIXES)

    def etag(self, filename: str) -> str:
        data = self.files[filename]
        return sha256_hex(data) if self.is_lfs(filename) else git_blob_sha1(data)


@dataclass
class LoggedRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted, without the query string
    query: str
    headers: dict[str, str]  # lower-case names
    status: int = 0

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _Cut:
    offset: int
    times: int


class FakeHub:
    """The fake Hub's state and its two listening sockets (hub, cdn). Thread-safe."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[LoggedRequest] = []
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._corrupt: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""
        self.ignore_range = False  # True: answer every GET with the whole file (200), as some proxies do
        self.rate: int | None = None  # bytes per second for file bodies; None: as fast as it goes

    # ----------------------------------------------------------------------------- set-up

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        commit: str | None = None,
        gated_token: str | None = None,
        listing_has_lfs: bool = True,
    ) -> str:
        """Serve ``files`` as ``repo_id``; returns its commit sha (derived from the content if not given)."""
        if commit is None:
            digest = hashlib.sha1(repo_id.encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + files[name])
            commit = digest.hexdigest()
        repo = FakeRepo(repo_id, dict(files), commit, gated_token, listing_has_lfs, {"main": commit})
        with self._lock:
            self.repos[repo_id] = repo
        return commit

    def add_revision(self, repo_id: str, revision: str, files: dict[str, bytes], *,
                     commit: str | None = None) -> str:
        """Serve ``files`` as another commit of ``repo_id`` that the branch or tag ``revision``
        points at (``revision`` equal to ``commit``: a commit no branch names); returns the commit."""
        repo = self.repos[repo_id]
        if commit is None:
            digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + files[name])
            commit = digest.hexdigest()
        with self._lock:
            repo.trees[commit] = dict(files)
            if revision != commit:
                repo.refs[revision] = commit
        return commit

    def cut_after(self, filename: str, nbytes: int, times: int = 1, *, repo_id: str | None = None) -> None:
        """The next ``times`` GETs of ``filename`` stop at byte offset ``nbytes`` of the file and the
        connection is closed mid-body. A GET that starts at or past ``nbytes`` sends no body at all."""
        with self._lock:
            self._cuts[(self._repo_for(filename, repo_id), filename)] = _Cut(nbytes, times)

    def corrupt(self, filename: str, *, repo_id: str | None = None) -> None:
        """Serve ``filename`` with one byte flipped, while still advertising the original sha256/size."""
        with self._lock:
            self._corrupt.add((self._repo_for(filename, repo_id), filename))

    def clear_faults(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._corrupt.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def requests(self, method: str | None = None, server: str | None = None) -> list[LoggedRequest]:
        """Logged requests, optionally only one method and/or one server ("hub", "cdn")."""
        with self._lock:
            return [
                r
                for r in self.log
                if (method is None or r.method == method) and (server is None or r.server == server)
            ]

    def file_gets(self, filename: str) -> list[LoggedRequest]:
        """The GETs answered with bytes of ``filename`` (from the CDN, or direct for non-LFS files);
        the Hub's redirects to the CDN are left out."""
        return [
            r
            for r in self.requests("GET")
            if r.path.endswith("/" + filename) and r.status in (200, 206)
            and (r.server == "cdn" or "/resolve/" in r.path)
        ]

    def _repo_for(self, filename: str, repo_id: str | None) -> str:
        if repo_id is not None:
            return repo_id
        owners = [r.repo_id for r in self.repos.values() if filename in r.files]
        if len(owners) != 1:
            raise ValueError(f"{filename!r} is in {len(owners)} repos; pass repo_id=")
        return owners[0]

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.fake = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            # A short poll interval keeps shutdown() (hence each test's teardown) quick.
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"fakehub-{role}", daemon=True
            ).start()
            self._servers.append(server)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    # ----------------------------------------------------------------------------- helpers for handlers

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _take_cut(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            cut = self._cuts.get((repo_id, filename))
            if cut is None:
                return None
            cut.times -= 1
            if cut.times <= 0:
                del self._cuts[(repo_id, filename)]
            return cut.offset

    def _served_bytes(self, repo: FakeRepo, filename: str, commit: str | None = None) -> bytes:
        data = repo.files_at(commit)[filename]
        with self._lock:
            corrupt = (repo.repo_id, filename) in self._corrupt
        if corrupt and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response sets Content-Length
    timeout = 10  # idle keep-alive connections end on their own

    server: ThreadingHTTPServer  # with .fake and .role attributes

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    @property
    def fake(self) -> FakeHub:
        return self.server.fake  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------- dispatch

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self._entry = LoggedRequest(
            self.server.role,  # type: ignore[attr-defined]
            method,
            path,
            parts.query,
            {k.lower(): v for k, v in self.headers.items()},
        )
        self.fake._record(self._entry)
        if self.server.role == "cdn":  # type: ignore[attr-defined]
            self._cdn(method, parts.path)
        elif parts.path.startswith("/api/models/"):
            self._api(method, parts.path)
        elif "/resolve/" in parts.path:
            self._resolve(method, parts.path)
        else:
            self._error(404, None, "Not found")

    # ----------------------------------------------------------------------------- routes

    def _api(self, method: str, raw_path: str) -> None:
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", raw_path)
        if not m:
            return self._error(404, None, "Not found")
        repo = self._repo(unquote(m.group(1)))
        if repo is None:
            return
        commit = self._commit(repo, unquote(m.group(2) or "main"))
        if commit is None:
            return
        siblings = []
        for name, data in sorted(repo.files_at(commit).items()):
            sib = {"rfilename": name}
            if "blobs=true" in self._entry.query:
                sib.update(size=len(data), blobId=git_blob_sha1(data))
                if repo.is_lfs(name) and repo.listing_has_lfs:
                    sib["lfs"] = {"sha256": sha256_hex(data), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit,
            "private": False,
            "gated": "manual" if repo.gated_token else False,
            "disabled": False,
            "tags": ["gguf"],
            "siblings": siblings,
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), method)

    def _resolve(self, method: str, raw_path: str) -> None:
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw_path)
        if not m:
            return self._error(404, None, "Not found")
        repo = self._repo(unquote(m.group(1)))
        if repo is None:
            return
        commit = self._commit(repo, unquote(m.group(2)))
        if commit is None:
            return
        filename = unquote(m.group(3))
        files = repo.files_at(commit)
        if filename not in files:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        if not self._authorized(repo):
            return
        data = files[filename]
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(filename):
            location = f"{self.fake.cdn_url}/cdn/{quote(repo.repo_id)}/{commit}/{quote(filename)}"
            headers = {
                **common,
                "Location": location,
                "ETag": f'"{git_blob_sha1(data)}"',  # the pointer's git oid, as on the real Hub
                "X-Linked-Etag": f'"{sha256_hex(data)}"',
                "X-Linked-Size": str(len(data)),
            }
            return self._send(302, headers, b"", method)
        self._send_file(method, repo, filename, {**common, "ETag": f'"{git_blob_sha1(data)}"'}, commit)

    def _cdn(self, method: str, raw_path: str) -> None:
        m = re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", unquote(raw_path))
        repo = self.fake.repos.get(m.group(1)) if m else None
        files = repo.files_at(m.group(2)) if repo is not None else {}
        if m is None or repo is None or m.group(3) not in files:
            return self._error(404, None, "NoSuchKey")
        filename = m.group(3)
        self._send_file(method, repo, filename, {"ETag": f'"{sha256_hex(files[filename])}"'}, m.group(2))

    # ----------------------------------------------------------------------------- pieces

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            # The real Hub answers 401 (not 404) for a repo that does not exist or is private.
            self._error(401, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: FakeRepo, revision: str) -> str | None:
        if revision == repo.commit or revision in repo.refs or revision in repo.trees:
            return repo.refs.get(revision, revision)
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    def _authorized(self, repo: FakeRepo) -> bool:
        if repo.gated_token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth == f"Bearer {repo.gated_token}":
            return True
        status = 403 if auth else 401
        self._error(status, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                    "authorized list.")
        return False

    def _send_file(self, method: str, repo: FakeRepo, filename: str, headers: dict[str, str],
                   commit: str | None = None) -> None:
        data = self.fake._served_bytes(repo, filename, commit)
        size = len(data)
        start, end = 0, size - 1
        status = 200
        wanted = None if self.fake.ignore_range else self.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not m:
                return self._error(416, None, "Bad range", {"Content-Range": f"bytes */{size}"})
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size or start > end:
                return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        body = data[start : end + 1]
        cut = self.fake._take_cut(repo.repo_id, filename) if method == "GET" else None
        if cut is None:
            return self._send(status, headers, body, method)
        # Promise the whole range, send part of it, then drop the connection: a broken transfer.
        self._send_headers(status, {**headers, "Content-Length": str(len(body))})
        self.wfile.write(body[: max(0, cut - start)])
        self.wfile.flush()
        self._entry.status = status
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode(), self._entry.method)

    def _send_headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
        self._entry.status = status
        self._send_headers(status, {**headers, "Content-Length": str(len(body))})
        if method == "HEAD" or not body:
            return
        if self.fake.rate is None or self._entry.server != "cdn":
            self.wfile.write(body)
            return
        step = max(1, self.fake.rate // 20)
        for i in range(0, len(body), step):  # a slow link: lets a test interrupt mid-transfer
            self.wfile.write(body[i:i + step])
            self.wfile.flush()
            time.sleep(0.05)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running :class:`FakeHub` with HF_ENDPOINT pointing at it and a private HF_HOME under tmp_path.

    Also clears HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN so the developer's own settings cannot leak in,
    including the values huggingface_hub froze at import (offline switch, stored-token path)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-token"))
    fake = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield fake
    finally:
        fake.stop()

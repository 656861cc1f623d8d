"""A local HTTP server standing in for the Hugging Face Hub (through HF_ENDPOINT), for tests
without network: the few endpoints huggingface_hub calls to resolve and download a model.

    GET  /api/models/{repo}/revision/{rev}      repo info: its commit ("sha")
    GET  /api/models/{repo}/tree/{rev}          its files and sizes (snapshot_download lists them)
    HEAD /{repo}/resolve/{rev}/{file}           ETag, X-Repo-Commit, Content-Length
    GET  /{repo}/resolve/{rev}/{file}           the bytes; a Range gives 206 and Content-Range

Errors carry the X-Error-Code huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, GatedRepo). Every request is recorded; `cut[file] = n` drops the connection
after n bytes of that file's next download, once, as a network would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.cluster import ROOT


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None

    @property
    def file(self) -> str | None:
        """The file a resolve request asks for."""
        m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", self.path)
        return m[1] if m else None


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __enter__(self) -> HubStandIn:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[Seen]:
        """The GETs of files: what was downloaded (headers read by a range from 0 included)."""
        return [s for s in self.seen if s.method == "GET" and s.file is not None]

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.seen.append(Seen(h.command, path, h.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/(.+?)/?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id, rev = (api[1], api[3]) if api else (resolve[1], resolve[2]) if resolve else ("", "")
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(h, 404, "RepoNotFound", "Repository not found")
        if rev not in ("main", repo.commit):
            return _error(h, 404, "RevisionNotFound", "Invalid rev id")
        if api and api[2] == "revision":
            return _json(h, {"id": repo_id, "sha": repo.commit, "private": False, "gated": "auto" if repo.gated else False,
                             "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
        if api:
            return _json(h, [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                             for f, b in sorted(repo.files.items())])
        if repo.gated:  # as the Hub answers a request without a token of an account that accepted the terms
            return _error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                                "and be authenticated to access it. Please log in.")
        data = repo.files.get(resolve[3])
        if data is None:
            return _error(h, 404, "EntryNotFound", "Entry not found", repo.commit)
        start, end = 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged[1]), min(int(ranged[2]) if ranged[2] else end, end)
        h.send_response(206 if ranged else 200)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not body:
            return
        stop = self.cut.pop(resolve[3], None) if not ranged else None
        if stop is not None:  # half the file, then the connection drops
            h.wfile.write(data[:stop])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:end + 1])


def _json(h: BaseHTTPRequestHandler, doc: object) -> None:
    raw = json.dumps(doc).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(raw)


def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str, commit: str | None = None) -> None:
    raw = json.dumps({"error": message}).encode()
    h.send_response(status)
    h.send_header("X-Error-Code", code)
    h.send_header("X-Error-Message", message)
    if commit:
        h.send_header("X-Repo-Commit", commit)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(raw)


def sharded_repo(checkpoint: Path, groups: list[range]) -> Repo:
    """The files of a tests.checkpoints checkpoint in shards: the tensors of no expert in the
    first, then one shard per group of experts (all layers), with their index; and files
    mlx-lm does not read, which a download must leave alone."""
    from safetensors.numpy import load_file, save

    tensors = load_file(str(checkpoint / "model.safetensors"))
    expert = re.compile(r"\.experts\.(\d+)\.")
    names = [f"model-{i + 1:05d}-of-{len(groups) + 1:05d}.safetensors" for i in range(len(groups) + 1)]
    parts: list[dict] = [{} for _ in names]
    for key, a in tensors.items():
        m = expert.search(key)
        parts[0 if m is None else 1 + next(i for i, g in enumerate(groups) if int(m[1]) in g)][key] = a
    files = {name: save(part, metadata={"format": "pt"}) for name, part in zip(names, parts)}
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": {k: names[i] for i, part in enumerate(parts) for k in part}}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    for f in checkpoint.iterdir():
        if f.name != "model.safetensors":
            files[f.name] = f.read_bytes()
    files["README.md"] = b"# a model card\n"
    files["pytorch_model.bin"] = b"\0" * 4096  # weights in a format mlx-lm does not read
    return Repo(files)


RESOLVE = """
import sys; from pathlib import Path
from shared.hub import resolve_model
print(resolve_model(sys.argv[1], Path(sys.argv[2]), weights=sys.argv[3] == "all"))
"""


def hub_env(url: str, root: Path, offline: bool = False) -> dict[str, str]:
    """A process's environment with its own Hugging Face cache and no token, pointed at `url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(root / "hf-home"), HF_HUB_CACHE=str(root / "hub"),
               MOEBUS_HOME=str(root / "moebus"), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def resolve(spec: str, env: dict[str, str], weights: str = "all") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESOLVE, spec, env["MOEBUS_HOME"], weights], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)

"""--model ORG/NAME: resolved through huggingface_hub against a local stand-in for the Hub
(tests.hub_standin, reached through HF_ENDPOINT), so the download path itself runs: only the
files mlx-lm reads, a progress bar, an interrupted download resumed, the cache used offline,
one-line errors, and a worker that fetches only the shards of its experts.

huggingface_hub reads its settings (HF_ENDPOINT, HF_HUB_OFFLINE...) once at import: each
resolution runs in a process of its own, as each moebus command does.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from shared.errors import ModelError
from shared.hub import ALLOW_PATTERNS, model_name, origin, parse_spec, resolve_model
from tests.cluster import ROOT
from tests.hub_standin import RESOLVE, HubStandIn, Repo, hub_env, resolve, sharded_repo

REPO = "org/tiny-mixtral"
SMALL = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"}
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
CHUNK = 10 << 20  # huggingface_hub writes what it receives in chunks of 10 MiB: a resume starts at one


def resolve_on_a_terminal(spec: str, env: dict[str, str]) -> tuple[int, str, str]:
    """As a user runs it: stderr is a terminal, where huggingface_hub draws its progress bars
    (tqdm draws nothing on a terminal of 0 columns, a new pty's size)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    with subprocess.Popen([sys.executable, "-c", RESOLVE, spec, env["MOEBUS_HOME"], "all"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=slave, text=True) as proc:
        os.close(slave)
        shown, deadline = b"", time.monotonic() + 120
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child is gone: the terminal closed
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        os.close(master)
        out = proc.stdout.read()
    return proc.wait(30), out, shown.decode(errors="replace")


@pytest.fixture(scope="module")
def hub(checkpoints: dict[str, Path]):
    with HubStandIn() as stand_in:
        stand_in.repos[REPO] = sharded_repo(checkpoints["mixtral"], [range(0, 4), range(4, 8)])
        stand_in.repos["org/gated"] = sharded_repo(checkpoints["mixtral"], [range(0, 8)])
        stand_in.repos["org/gated"].gated = True
        yield stand_in


@pytest.fixture(scope="module")
def downloaded(hub: HubStandIn, tmp_path_factory: pytest.TempPathFactory):
    """The first resolution of REPO, into an empty cache."""
    root = tmp_path_factory.mktemp("first")
    hub.seen.clear()
    code, out, shown = resolve_on_a_terminal(REPO, hub_env(hub.url, root))
    assert code == 0, shown
    return root, Path(out.strip()), shown, list(hub.seen)


def test_only_the_files_mlx_lm_reads_are_downloaded_once_with_a_progress_bar(hub, downloaded):
    root, path, shown, seen = downloaded
    got = [s.file for s in seen if s.method == "GET" and s.file is not None]
    assert set(got) == SMALL | set(SHARDS), got  # no README.md, no pytorch_model.bin
    assert path == root / "hub" / "models--org--tiny-mixtral" / "snapshots" / hub.repos[REPO].commit
    for name in SMALL | set(SHARDS):
        assert (path / name).read_bytes() == hub.repos[REPO].files[name], name
    assert f"moebus: downloading {REPO} from {hub.url}" in shown
    assert "Fetching 7 files: 100%" in shown and "Download complete" in shown, shown  # huggingface_hub's bars


def test_an_interrupted_download_is_resumed_where_it_stopped(hub, tmp_path):
    weights = os.urandom(CHUNK + (3 << 20))
    hub.repos["org/big"] = Repo({"config.json": b"{}", "model.safetensors": weights})
    hub.cut["model.safetensors"] = CHUNK + (1 << 20)  # the connection drops 11 MiB in
    hub.seen.clear()
    done = resolve("org/big", hub_env(hub.url, tmp_path))
    assert done.returncode == 0, done.stderr
    tries = [s.range for s in hub.downloads() if s.file == "model.safetensors"]
    assert tries == [None, f"bytes={CHUNK}-"], tries  # the second asks for the rest only
    assert "Trying to resume download" in done.stderr
    assert (Path(done.stdout.strip()) / "model.safetensors").read_bytes() == weights


def test_a_cached_model_resolves_offline_without_a_request(hub, downloaded):
    root, path, _, _ = downloaded
    hub.seen.clear()
    done = resolve(REPO, hub_env(hub.url, root, offline=True))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == path
    assert hub.seen == []
    online = resolve(REPO, hub_env(hub.url, root))  # online: the repo's commit is asked for, no file again
    assert online.returncode == 0, online.stderr
    assert Path(online.stdout.strip()) == path
    assert [s.path for s in hub.seen] == [f"/api/models/{REPO}/revision/main"]
    assert "moebus: downloading" not in online.stderr


REFUSALS = """
import json, sys; from pathlib import Path
from shared.errors import ModelError
from shared.hub import resolve_model
for spec in sys.argv[2:]:
    try:
        print(json.dumps(f"resolved to {resolve_model(spec, Path(sys.argv[1]))}"))
    except ModelError as e:
        print(json.dumps(str(e)))
"""


def test_a_model_that_cannot_be_had_is_said_in_one_line(hub, tmp_path):
    env = hub_env(hub.url, tmp_path)
    asked = {"org/no-such-model": f"org/no-such-model: no such model on {hub.url} (a private one needs HF_TOKEN)",
             "org/gated": f"org/gated is gated: accept its terms at {hub.url}/org/gated, then set HF_TOKEN to a token "
                          "of that account",
             f"{REPO}@v9": f"{REPO}: no revision 'v9' (a branch, tag or commit of the repo)",
             "not a model": "not a model: no such directory, nor a Hugging Face repo id (ORG/NAME or ORG/NAME@REVISION)"}
    done = subprocess.run([sys.executable, "-c", REFUSALS, env["MOEBUS_HOME"], *asked], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said = [json.loads(line) for line in done.stdout.splitlines()]
    for (spec, want), got in zip(asked.items(), said, strict=True):
        assert got.startswith(want) and "\n" not in got, (spec, got)


def test_a_command_without_network_or_cache_fails_in_one_line(hub, tmp_path):
    done = subprocess.run([sys.executable, "-m", "services.cli", "bundle", "--model", REPO], cwd=ROOT,
                          env=hub_env(hub.url, tmp_path, offline=True), capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (f"moebus bundle: error: {REPO} is not (all) in the Hugging Face cache {tmp_path / 'hub'} and "
                        "HF_HUB_OFFLINE is set: run once with network access to download it")


WORKER = """
import json, sys; from pathlib import Path
import numpy as np
from services.expert_worker.experts import expert_bytes, load_experts
from shared.hub import resolve_model
from shared.wire import decode_reply, decode_request, encode_request
path, whole, held = resolve_model(sys.argv[1], Path(sys.argv[2]), weights=False), Path(sys.argv[3]), [0, 2, 3]
per_expert, _ = expert_bytes(path)
experts, info = load_experts(path, held)
reference, _ = load_experts(whole, held)
x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
ask = encode_request(1, 0, x, np.array([0, 1, 2, 3], np.int32), np.array([0, 2, 3, 2], np.int32))
y, want = (decode_reply(e.compute(decode_request(ask))).y for e in (experts, reference))
print(json.dumps({"path": str(path), "bytes": [per_expert, expert_bytes(whole)[0]], "name": info.name,
                  "equal": bool(np.array_equal(y, want)), "finite": bool(np.isfinite(y).all())}))
"""


def test_a_worker_fetches_only_the_shards_of_its_experts(hub, checkpoints, tmp_path):
    def worker(offline: bool) -> dict:
        env = hub_env(hub.url, tmp_path, offline)
        done = subprocess.run([sys.executable, "-c", WORKER, REPO, env["MOEBUS_HOME"], str(checkpoints["mixtral"])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    hub.seen.clear()
    first = worker(offline=False)
    whole = {s.file for s in hub.downloads() if s.range is None}
    headers = {s.file for s in hub.downloads() if s.range == "bytes=0-100000"}
    assert whole == SMALL | {SHARDS[1]}, whole  # experts 0-3: not the other experts', nor the rest of the model
    assert headers == set(SHARDS)  # shapes, for the capacity it announces before it holds anything
    assert first["bytes"][0] == first["bytes"][1]
    assert first["equal"] and first["finite"]
    assert first["name"] == REPO
    hub.seen.clear()
    again = worker(offline=True)  # a restart without network: the shards and shapes it had
    assert hub.seen == []
    assert again == first


def test_the_download_patterns_are_mlx_lms():
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
    assert list(ALLOW_PATTERNS) == DEFAULT_ALLOW_PATTERNS


def test_a_directory_wins_over_a_repo_id_of_the_same_spelling(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name", tmp_path) == tmp_path / "org" / "name"
    assert resolve_model("./org/name", tmp_path) == tmp_path / "org" / "name"
    with pytest.raises(ModelError) as e:
        resolve_model("./org/other", tmp_path)  # a path, not a repo id: never asked of the Hub
    assert "./org/other: no such directory" in str(e.value)


def test_specs_and_snapshot_paths():
    assert parse_spec("mlx-community/Qwen3-30B-A3B-4bit") == ("mlx-community/Qwen3-30B-A3B-4bit", None)
    assert parse_spec("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for bad in ("name", "a/b/c", "org/name@", "org/na--me", "/abs/path", "~/x"):
        with pytest.raises(ModelError):
            parse_spec(bad)
    snap = Path("/c/hub/models--mlx-community--Qwen3-30B-A3B-4bit/snapshots") / ("a" * 40)
    found = origin(snap)
    assert found is not None and (found.repo_id, found.commit) == ("mlx-community/Qwen3-30B-A3B-4bit", "a" * 40)
    assert model_name(snap) == "mlx-community/Qwen3-30B-A3B-4bit"
    assert origin(Path("/models/Qwen3")) is None and model_name(Path("/models/Qwen3")) == "Qwen3"

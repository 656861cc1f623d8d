"""A newcomer's first hour (issue 20): `moebus status` finds the cluster or fails in one line,
the ready line's curl works as copied, a second `moebus up` names the port it cannot have, and
a gateway other machines reach is not served without a key by accident."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.natsd import free_port
from tests.cluster import ROOT, Up, tail

MODEL = "tiny-qwen3_moe"
KEY = "sk-first-hour"


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path]]:
    """`moebus up` as the multi-Mac recipe starts it: on every address, its key from the environment."""
    home = tmp_path_factory.mktemp("first-hour-home")
    with Up(checkpoints["qwen3_moe"], 1, tmp_path_factory.mktemp("first-hour"), extra=("--host", "0.0.0.0"),
            env={"MOEBUS_HOME": str(home), "MOEBUS_API_KEYS": KEY}) as up:
        yield up, home


def _moebus(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    """A command expected to end by itself (the old `status` never did; the old `up` served):
    past `timeout_s` it is killed with what it started, and the test fails."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MOEBUS_NATS_URL", "MOEBUS_API_KEYS", "MOEBUS_CREDS")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean, **env}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_status_finds_the_cluster_up_started_on_another_port(cluster):
    up, home = cluster
    r = _moebus("status", env={"MOEBUS_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model {MODEL}: ready" in r.stdout and "unowned experts: none" in r.stdout, r.stdout


def test_status_without_a_bus_fails_in_one_line(tmp_path):
    port = free_port()  # nothing listens there
    line = _one_line(_moebus("status", "--nats", f"nats://127.0.0.1:{port}", env={"MOEBUS_HOME": str(tmp_path)}))
    assert line.startswith("moebus status: cannot reach NATS") and f":{port}" in line


def test_the_ready_line_gives_a_reachable_url_and_a_curl_that_works_as_copied(cluster):
    up, _ = cluster
    log = up.log.read_text()
    ready = re.search(r"moebus is ready: (\S+)", log)
    assert ready and ready[1] == up.url, tail(up.log)  # loopback, not http://0.0.0.0
    assert f"from other machines: http://{os.uname().nodename}:{up.port}" in log
    curl = re.search(r"^  curl .*?\n(?:    .*\\\n)*    .*$", log, re.M)
    assert curl and "$MOEBUS_API_KEYS" in curl[0] and KEY not in log, tail(up.log)  # the variable, not the secret
    done = subprocess.run(["bash", "-c", curl[0]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MOEBUS_API_KEYS": KEY})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"][0]["message"]["content"], done.stdout


@pytest.mark.parametrize("flag", ["--port", "--nats-port"])
def test_a_second_up_on_a_taken_port_names_it_and_starts_nothing(cluster, checkpoints, tmp_path, flag):
    up, _ = cluster
    taken = up.port if flag == "--port" else up.nats_port
    ports = {"--port": str(free_port()), "--nats-port": str(free_port()), flag: str(taken)}
    r = _moebus("up", "--model", str(checkpoints["qwen3_moe"]), "--workers", "1",
                *(x for kv in ports.items() for x in kv), env={"MOEBUS_HOME": str(tmp_path)}, timeout_s=180)
    assert "ready" not in r.stdout, r.stdout  # the first cluster answered the old one's health check
    line = _one_line(r)
    assert f":{taken} (in use" in line and flag in line, line
    assert not (tmp_path / "cluster").exists()  # nothing started: not even its bus's users written


@pytest.mark.parametrize("args, env, says", [
    (("gateway", "--host", "0.0.0.0"), {}, "--api-key"),
    (("gateway", "--api-key", ""), {}, "--api-key is empty"),
    (("gateway",), {"MOEBUS_API_KEYS": ""}, "MOEBUS_API_KEYS is set but empty"),
    (("up", "--host", "0.0.0.0", "--api-key", ""), {}, "--api-key is empty"),
    (("up", "--host", "0.0.0.0"), {}, "--insecure"),
])
def test_a_gateway_is_not_served_keyless_by_accident(nats_url, tmp_path, args, env, says):
    r = _moebus(*args, "--port", str(free_port()), "--nats", nats_url, env={"MOEBUS_HOME": str(tmp_path), **env})
    assert says in _one_line(r)


def test_insecure_serves_a_keyless_gateway_on_the_network_with_a_warning(nats_url, tmp_path):
    port, log = free_port(), tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "gateway", "--host", "0.0.0.0", "--port",
                                 str(port), "--nats", nats_url, "--insecure"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "MOEBUS_HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while "gateway listening" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and "gateway listening" in log.read_text(), tail(log)
        assert "WARNING: HTTP on 0.0.0.0 without an API key" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)

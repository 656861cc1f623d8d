"""`moebus up` when one of its processes is killed with -9: the launcher restarts it, open
streams end with an error the client can read, and the next request succeeds."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.cluster import Up, processes, tail, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"
SERVICES = {"router", "worker", "gateway"}
LONG = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 480, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def up(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with Up(checkpoints["mixtral"], 2, tmp_path_factory.mktemp("supervision")) as cluster:
        yield cluster


def _child(up: Up, needle: str) -> int:
    """The pid of the launcher's child whose command line matches `needle`."""
    pids = processes(needle, parent=up.proc.pid)
    assert pids, needle
    return pids[0]


def _stream_until_killed(up: Up, victim: str) -> str:
    """Start a long greedy stream, kill -9 the child matching `victim` after the first tokens;
    returns everything the client read. A read waits at most 60 s: half the gateway's event timeout."""
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{up.url}/v1/completions", json=LONG) as r:
        lines = r.iter_lines()
        read = [next(lines) for _ in range(3)]
        os.kill(_child(up, victim), signal.SIGKILL)
        read += list(lines)
        return "\n".join(read)


def _text(sse: str) -> str:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def test_a_killed_worker_is_restarted_and_the_stream_carries_on(up: Up):
    """Its experts are placed on the survivor and the call that failed is sent there: the
    stream ends as an undisturbed one does; the launcher restarts the worker, which rejoins."""
    undisturbed = httpx.post(f"{up.url}/v1/completions", json={**LONG, "stream": False}, timeout=120)
    text = _stream_until_killed(up, "services.cli worker")
    assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-500:]
    assert _text(text) == undisturbed.json()["choices"][0]["text"]
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{up.url}/health").json()["workers"]) < 2:
        assert time.monotonic() < deadline, tail(up.log)
        time.sleep(0.2)
    assert "restarting it" in tail(up.log, 20000)


def test_a_killed_router_is_restarted_and_its_streams_end_with_an_error(up: Up):
    text = _stream_until_killed(up, "services.cli router")
    assert text.rstrip().endswith("data: [DONE]"), text[-500:]
    # The gateway asked after the router and found it gone (or restarted): it did not wait out
    # the 120 s event timeout, whose error reads "no token from the router within 120s".
    error = text.rsplit('"error"', 1)[-1]
    assert "the router went away during generation" in error or "the router restarted during generation" in error, \
        text[-500:]
    wait_healthy(up.url, [up.proc], up.log, timeout_s=60)
    with OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0) as client:
        r = client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert "router exited with code -9; restarting it" in tail(up.log, 20000)


def test_a_killed_nats_server_is_restarted_and_services_reconnect(up: Up):
    needle = f"nats-server .* -p {up.nats_port}$"
    nats_pid = _child(up, needle)
    seen = len(tail(up.log, 1 << 30))
    os.kill(nats_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while processes(needle, parent=up.proc.pid) in ([], [nats_pid]):  # the launcher starts another
        assert time.monotonic() < deadline, tail(up.log)
        time.sleep(0.2)
    # Each service noticed the loss and found the new server: the /health below is theirs, not stale.
    while set(re.findall(r"nats reconnected\s+service=(\S+)", tail(up.log, 1 << 30)[seen:])) < SERVICES:
        assert time.monotonic() < deadline, tail(up.log)
        time.sleep(0.2)
    wait_healthy(up.url, [up.proc], up.log, timeout_s=60)
    with OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0) as client:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=3,
                                           temperature=0)
    assert r.usage.completion_tokens == 3

"""`moebus up` when one of its processes is killed with -9: the launcher restarts it, open
streams end with an error the client can read, and the next request succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.cluster import Up, tail, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"


@pytest.fixture(scope="module")
def up(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with Up(checkpoints["mixtral"], 2, tmp_path_factory.mktemp("supervision")) as cluster:
        yield cluster


def _child(up: Up, needle: str) -> int:
    """The pid of the launcher's child whose command line holds `needle`."""
    out = subprocess.run(["pgrep", "-P", str(up.proc.pid), "-f", needle], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, (needle, pids)
    return pids[0]


def _stream_until_killed(up: Up, victim: str) -> tuple[str, float]:
    """Start a long greedy stream, kill -9 the child matching `victim` after the first tokens;
    returns everything the client read and how long the stream took to end after the kill."""
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{up.url}/v1/completions",
            json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 480, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        read = [next(lines) for _ in range(3)]
        os.kill(_child(up, victim), signal.SIGKILL)
        killed = time.monotonic()
        read += list(lines)
        return "\n".join(read), time.monotonic() - killed


@pytest.mark.parametrize("victim, needle", [
    ("worker --nats .* --rank 1", "generation failed"),
    ("services.cli router", "router"),
])
def test_a_killed_service_is_restarted_and_its_streams_end_with_an_error(up: Up, victim: str, needle: str):
    text, took = _stream_until_killed(up, victim)
    assert text.rstrip().endswith("data: [DONE]"), text[-500:]
    assert '"error"' in text and needle in text.rsplit('"error"', 1)[1], text[-500:]
    assert took < 12, took  # a dropped worker or a lost router is noticed, not waited out (30 s, 120 s)
    wait_healthy(up.url, [up.proc], up.log, timeout_s=60)
    with OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0) as client:
        r = client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert "restarting it" in tail(up.log, 20000)


def test_a_killed_nats_server_is_restarted_and_services_reconnect(up: Up):
    nats_pid = _child(up, f"nats-server .* -p {up.nats_port}")
    os.kill(nats_pid, signal.SIGKILL)
    time.sleep(1)
    wait_healthy(up.url, [up.proc], up.log, timeout_s=60)
    assert _child(up, f"nats-server .* -p {up.nats_port}") != nats_pid
    with OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0) as client:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=3,
                                           temperature=0)
    assert r.usage.completion_tokens == 3

"""A router left idle keeps its lanes' own connections: nothing runs their event loops between
layer calls but the router's periodic pump (shared.mlx_thread)."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.cluster import tail, wait_healthy
from tests.integration.test_failures import BODY, Services

pytestmark = pytest.mark.slow
PING_MAX = 2
# The server traces each ping it sends and each answer: the test waits on these, not on a clock.
NATS_CONF = f'ping_interval: "1s"\nping_max: {PING_MAX}\ndebug: true\ntrace: true\nmax_traced_msg_len: 64\n'
# A trace line of a router lane's connection: its answer to a PING, or why it was closed.
LANE = re.compile(r'cid:(\d+) - "[^"]*:moebus-router-lane"(?: - "[^"]*")* - '
                  r'(<<- \[PONG\]|Client connection closed: .*)')


def test_an_idle_router_answers_the_servers_pings(checkpoints: dict[str, Path], tmp_path: Path):
    """A server that pings every second and drops a client after two unanswered pings: once the
    router is idle, each of its lanes answers more pings than a silent client outlives; then a
    request is answered and no connection of the router was dropped."""
    s = Services(checkpoints["mixtral"], tmp_path, nats_conf=NATS_CONF)
    server_log = tmp_path / "nats" / "nats-server.log"
    try:
        s.worker()
        wait_healthy(s.url, s.procs, s.log)
        with httpx.Client(base_url=s.url, timeout=60) as http:
            assert http.post("/v1/completions", json=BODY).status_code == 200
            idle = len(tail(server_log, 1 << 30))
            deadline = time.monotonic() + 60
            while True:
                seen = LANE.findall(tail(server_log, 1 << 30)[idle:])
                closed = [line for _, line in seen if line.startswith("Client connection closed")]
                assert not closed, closed  # e.g. "Stale Connection": a lane that did not answer
                pongs = Counter(cid for cid, line in seen)
                if len(pongs) >= 1 and min(pongs.values()) > PING_MAX + 1:
                    break
                assert time.monotonic() < deadline, pongs
                time.sleep(0.2)
            reply = http.post("/v1/completions", json=BODY)
        assert reply.status_code == 200, reply.text
        log = tail(s.log, 100_000)
        assert "nats disconnected" not in log, log[-3000:]
    finally:
        s.stop()

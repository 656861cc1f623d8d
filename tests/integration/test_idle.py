"""A router left idle keeps its lanes' own connections: nothing runs their event loops between
layer calls but the router's periodic pump (shared.mlx_thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.cluster import tail, wait_healthy
from tests.integration.test_failures import BODY, Services

pytestmark = pytest.mark.slow


async def test_an_idle_router_answers_the_servers_pings(checkpoints: dict[str, Path], tmp_path: Path):
    """A server that pings every second and drops a client after two unanswered pings: after
    6 s idle, a request is answered and no connection of the router was dropped."""
    s = Services(checkpoints["mixtral"], tmp_path, nats_conf='ping_interval: "1s"\nping_max: 2\n')
    try:
        s.worker()
        wait_healthy(s.url, s.procs, s.log)
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
            assert (await http.post("/v1/completions", json=BODY)).status_code == 200
            await asyncio.sleep(6)
            reply = await http.post("/v1/completions", json=BODY)
        assert reply.status_code == 200, reply.text
        log = tail(s.log, 100_000)
        assert "nats disconnected" not in log, log[-3000:]
    finally:
        s.stop()

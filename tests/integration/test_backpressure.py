"""A full server refuses with 429 and Retry-After; what it accepted still completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.cluster import Up


@pytest.mark.slow
async def test_beyond_the_queue_requests_get_429(checkpoints: dict[str, Path], tmp_path: Path):
    with Up(checkpoints["mixtral"], 1, tmp_path, extra=("--max-running", "1", "--max-waiting", "1")) as up:
        async with httpx.AsyncClient(base_url=up.url, timeout=60) as http:
            body = {"model": "tiny-mixtral", "prompt": "w1 w2", "max_tokens": 60, "temperature": 0}
            replies = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))
            metrics = (await http.get("/metrics")).text
    codes = sorted(r.status_code for r in replies)
    assert "moebus_sequences_running_max 1.0" in metrics  # never two at once, not even for a step
    assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
    for r in replies:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60

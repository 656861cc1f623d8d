"""KV memory within bounds, with real processes: a load whose KV caches would pass --kv-budget
waits its turn and still gives each request its own greedy text; one that could never fit is
refused with the tokens that would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.router.kv import SLACK
from tests.checkpoints import HEADS, HIDDEN, KV_HEADS, LAYERS
from tests.cluster import ROOT, Up

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"
PER_TOKEN = 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS) * 4  # K and V, every layer, float32: the checkpoint's dtype
PROMPTS = [f"w{i} w{i + 7} w{2 * i + 1}" for i in range(6)]  # 3 tokens each: the word tokenizer adds none
MAX_TOKENS = 20
RESERVATION = (3 + MAX_TOKENS + SLACK) * PER_TOKEN  # as mlx-lm allocates it: a step and speculation's holes beyond
BUDGET = 2 * RESERVATION + RESERVATION // 2  # two sequences fit, never three
BESIDES = 64 << 10  # MLX memory between steps besides the KV caches: each row's last tokens and logprobs


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path]]:
    home = tmp_path_factory.mktemp("kv-home")
    with Up(checkpoints["mixtral"], 1, home, extra=("--kv-budget", str(BUDGET), "--prompt-cache-bytes", "0"), env={"MOEBUS_HOME": str(home)}) as up:
        yield up, home


def _body(prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def _gauges(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


async def test_a_load_beyond_the_budget_waits_its_turn_and_stays_within_it(cluster: tuple[Up, Path]):
    up, _ = cluster
    async with httpx.AsyncClient(base_url=up.url, timeout=120) as http:
        alone = [(await http.post("/v1/completions", json=_body(p))).json() for p in PROMPTS]
        idle = (await http.get("/health")).json()["mlx_active_bytes"]  # the weights and what a step keeps
        done = asyncio.Event()
        seen: list[int] = []

        async def watch() -> None:  # KV bytes in use, as /health shows them, while the load runs
            while not done.is_set():
                seen.append((await http.get("/health")).json()["kv_bytes_in_use"])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            replies = await asyncio.gather(*(http.post("/v1/completions", json=_body(p)) for p in PROMPTS))
        finally:
            done.set()
            await watcher
        health = (await http.get("/health")).json()
        gauges = _gauges((await http.get("/metrics")).text)
    assert all(r["usage"]["prompt_tokens"] == 3 for r in alone)  # the reservation's arithmetic holds
    assert [r.status_code for r in replies] == [200] * 6  # all waited (max_waiting is far), none refused
    for reply, single in zip(replies, alone):  # each, waiting or not, as it runs alone
        assert reply.json()["choices"][0]["text"] == single["choices"][0]["text"]
        assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    # Each running sequence holds (prompt + max_tokens) x the model's bytes per token, at most two at once.
    assert seen and all(b <= BUDGET and b % RESERVATION == 0 for b in seen), seen
    assert gauges["moebus_kv_budget_bytes"] == BUDGET == health["kv_budget_bytes"]
    assert gauges["moebus_kv_bytes_in_use_max"] in (RESERVATION, 2 * RESERVATION)  # a high-water mark: nothing missed
    assert gauges["moebus_sequences_running_max"] <= 2
    assert health["kv_bytes_in_use"] == gauges["moebus_kv_bytes_in_use"] == 0  # every sequence gave its bytes back
    # What the router's MLX really held between steps, beside its weights: within the budget.
    assert 0 < gauges["moebus_mlx_active_bytes_max"] - idle <= BUDGET + BESIDES, (gauges, idle)


async def test_a_request_that_could_never_fit_is_told_how_many_tokens_would(cluster: tuple[Up, Path]):
    up, home = cluster
    async with httpx.AsyncClient(base_url=up.url, timeout=60) as http:
        r = await http.post("/v1/completions", json=_body(PROMPTS[0], max_tokens=500))
        ok = await http.post("/v1/completions", json=_body(PROMPTS[0], max_tokens=BUDGET // PER_TOKEN - SLACK - 3))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and error["type"] == "invalid_request_error"
    assert error["message"] == (f"this request needs {(503 + SLACK) * PER_TOKEN} bytes of KV cache (3 prompt + 500 "
                                f"max_tokens tokens, and the {SLACK} more its cache can hold, at {PER_TOKEN} bytes "
                                f"each); the budget is {BUDGET} bytes (--kv-budget): at most "
                                f"{BUDGET // PER_TOKEN - SLACK} tokens fit")
    fit = BUDGET // PER_TOKEN - SLACK - 3
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == fit  # the most
    out = subprocess.run([sys.executable, "-m", "services.cli", "status"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "MOEBUS_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert f"KV cache: 0 B in use of a {BUDGET / 1024:.1f} KiB budget; prompt cache " in out.stdout, out.stdout

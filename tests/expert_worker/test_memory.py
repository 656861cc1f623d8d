"""A worker allocates nothing new in steady state: MLX's counters over 1,000 bus requests.

A real worker process on a real nats-server; the counters come from its own heartbeat.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import numpy as np
import pytest

from shared import cluster, subjects
from shared.bus import request
from shared.messages import Discover, WorkerAnnounce, decode, encode
from shared.model import describe, find_experts, load_lazy
from shared.wire import decode_reply, encode_request
from tests.cluster import cli, place_all, tail

pytestmark = pytest.mark.slow


async def _announcement(nc: nats.NATS, worker: str | None) -> WorkerAnnounce:
    """The worker's next announcement after everything it was sent has been answered."""
    sub = await nc.subscribe(subjects.ANNOUNCEMENTS)
    try:
        await nc.publish(subjects.WORKERS_DISCOVER, encode(Discover(router="test")))
        while True:
            a = decode(WorkerAnnounce, (await sub.next_msg(timeout=10)).data)
            if worker is None or a.worker == worker:
                return a
    finally:
        await sub.unsubscribe()


async def _wait_ready(nc: nats.NATS, proc, log: Path, num_experts: int) -> WorkerAnnounce:
    """The worker, once it joined and holds every expert (placed here by the test itself)."""
    for _ in range(120):
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{tail(log)}")
        try:
            a = await _announcement(nc, None)
            if len(a.experts) == num_experts:
                return a
            await place_all(nc, a, num_experts)
            await asyncio.sleep(0.5)  # the worker reads placement every 0.25 s, then loads
        except nats.errors.TimeoutError:
            continue
    raise RuntimeError(f"worker never announced itself:\n{tail(log)}")


async def test_mlx_memory_is_flat_over_1000_requests(nats_url: str, checkpoints: dict[str, Path], tmp_path: Path):
    model = checkpoints["mixtral"]
    lazy, config = load_lazy(model)
    info = describe(model, config, find_experts(lazy))
    dim = config["hidden_size"]
    log = tmp_path / "worker.log"
    nc = await nats.connect(nats_url)
    await cluster.bucket(nc.jetstream())  # the router's part: a worker waits for the bucket, it cannot make it
    proc = cli("worker", "--nats", nats_url, "--model", str(model), log=log)
    rng = np.random.default_rng(0)

    async def ask(pairs: int) -> None:
        x = rng.standard_normal((pairs, dim)).astype(np.float32)
        rows = np.arange(pairs, dtype=np.int32)
        experts = rng.integers(0, info.num_experts, pairs).astype(np.int32)
        layer = int(rng.integers(0, info.moe_layers))
        reply = decode_reply(await request(nc, subject, encode_request(layer, 0, x, rows, experts), 30))
        assert reply.y.shape == (pairs, dim)

    try:
        joined = await _wait_ready(nc, proc, log, info.num_experts)
        me, subject = joined.worker, joined.subject
        # Warm-up: every batch size the test sends, then enough mixes of experts for MLX's
        # allocator to have pooled a buffer of each size it needs (grouped compute splits
        # a request by expert, so buffer sizes vary with the mix, not just the batch).
        for pairs in [*range(1, 33), *rng.integers(1, 33, 1000).tolist()]:
            await ask(pairs)
        before = (await _announcement(nc, me)).memory
        for _ in range(1000):
            await ask(int(rng.integers(1, 33)))
        after = (await _announcement(nc, me)).memory
    finally:
        await nc.close()
        proc.terminate()
        proc.wait(30)
    assert before["active"] > 0, before  # the experts themselves
    # Nothing kept per request, no new high-water mark, no new buffers cached.
    assert after["active"] == before["active"], (before, after)
    assert after["peak"] == before["peak"], (before, after)
    assert after["cache"] <= before["cache"], (before, after)

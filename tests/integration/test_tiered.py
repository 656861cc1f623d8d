"""A tiered cluster with real processes: a flash-cache serving every expert from SSD, a DRAM
worker that joins and takes the hottest experts off it, then is killed (kill -9) mid-stream;
every stream gives the greedy text of the flash-cache alone."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest

from shared.placement import MOVE_MARGIN
from tests.checkpoints import NUM_EXPERTS
from tests.cluster import cli, wait_healthy
from tests.integration.test_elastic import ONE_EXPERT, _status_until, _texts
from tests.integration.test_failures import Services

pytestmark = pytest.mark.slow
RECORD = ONE_EXPERT // 2  # one expert of one MoE layer
HOT = 3  # experts the DRAM worker has room for


def _skewed(model: Path, out: Path, hot: list[int]) -> Path:
    """`model` with the gate rows of experts `hot` scaled up: their logits spread wider, so they
    are in a token's top 2 more often (random weights alone route nearly uniformly)."""
    import mlx.core as mx
    shutil.copytree(model, out)
    w = dict(mx.load(str(model / "model.safetensors")))
    for name in [k for k in w if k.endswith("block_sparse_moe.gate.weight")]:
        scale = mx.array([3.0 if e in hot else 1.0 for e in range(w[name].shape[0])])[:, None]
        w[name] = w[name] * scale
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "pt"})
    return out


def _held(s: dict, backend: str) -> list[int]:
    return sorted(e for w in s["workers"] if w["backend"] == backend for e in w["experts"])


def _served(s: dict, backend: str) -> int:
    return sum(w["tokens"] for w in s["workers"] if w["backend"] == backend)


def test_dram_takes_the_hottest_experts_off_the_flash_cache_and_a_kill_gives_them_back(
        checkpoints: dict[str, Path], tmp_path: Path):
    c = Services(_skewed(checkpoints["mixtral"], tmp_path / "tiny-mixtral", [5, 6, 7]), tmp_path, router_args=())
    try:
        c.procs.append(cli("flash-cache", "--nats", c.nats_url, "--model", str(c.model), "--memory-budget",
                           str(4 * RECORD), "--window", "1", log=c.log))
        wait_healthy(c.url, c.procs, c.log)
        reference = asyncio.run(_texts(c.url))  # the flash-cache alone, every expert read from SSD
        s = _status_until(c.nats_url, lambda s: len(s["workers"]) == 1 and not s["unowned_experts"])
        assert _held(s, "flash") == list(range(NUM_EXPERTS["mixtral"]))

        # A DRAM worker joins during streams: the hottest experts by the load so far move to it.
        texts = asyncio.run(_texts(c.url, during=lambda: c.worker("--memory-budget", str(HOT * ONE_EXPERT))))
        assert texts == reference
        s = _status_until(c.nats_url, lambda s: len(s["workers"]) == 2 and s["pending_version"] is None
                          and len(_held(s, "dram")) == HOT)
        load = s["expert_load"]
        hottest = sorted(sorted(range(len(load)), key=lambda e: (-load[e], e))[:HOT])
        # Without placement by load, DRAM would hold the lowest ids: that must be worse than the margin.
        carried = lambda experts: sum(load[e] for e in experts)  # noqa: E731
        assert carried(hottest) - carried(range(HOT)) > MOVE_MARGIN * sum(load), load
        # What DRAM holds is the hottest, or as good within the margin (the router weighs its recent load)
        assert carried(_held(s, "dram")) >= carried(hottest) - MOVE_MARGIN * sum(load), (load, s["owners"])
        # Each expert has one owner: the hot ones' tokens never go to the flash-cache.
        assert _held(s, "flash") == [e for e in range(len(load)) if e not in hottest]
        before = {b: _served(s, b) for b in ("dram", "flash")}
        texts = asyncio.run(_texts(c.url))
        assert texts == reference
        # both serve (their counts come with their next heartbeats), the DRAM worker what is hot
        s = _status_until(c.nats_url, lambda s: all(_served(s, b) > before[b] for b in before))

        # kill -9 of the DRAM worker mid-stream: its experts go back to the flash-cache, no stream fails.
        victim = c.procs[-1]
        texts = asyncio.run(_texts(c.url, during=lambda: victim.send_signal(signal.SIGKILL)))
        assert texts == reference
        s = _status_until(c.nats_url, lambda s: len(s["workers"]) == 1 and not s["unowned_experts"], timeout_s=20)
        assert _held(s, "flash") == list(range(NUM_EXPERTS["mixtral"]))
    finally:
        c.stop()

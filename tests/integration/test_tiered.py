"""A tiered cluster with real processes: a flash-cache serving every expert from SSD, a DRAM
worker that joins and takes the hottest (layer, expert) pairs off it, then is killed (kill -9)
mid-stream; every stream gives the greedy text of the flash-cache alone."""

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
HOT = 3  # experts the DRAM worker has room for: HOT pairs in each MoE layer
# Each layer's own popular experts, as trained routers have: holding the same ids in every
# layer cannot give DRAM the hottest pairs.
SKEW = ([5, 6, 7], [1, 2, 3])


def _skewed(model: Path, out: Path, hot: tuple[list[int], ...]) -> Path:
    """`model` with the gate rows of layer i's experts `hot[i]` scaled up: their logits spread
    wider, so they are in a token's top 2 more often (random weights alone route nearly uniformly)."""
    import mlx.core as mx
    shutil.copytree(model, out)
    w = dict(mx.load(str(model / "model.safetensors")))
    names = sorted((k for k in w if k.endswith("block_sparse_moe.gate.weight")), key=lambda k: int(k.split(".")[2]))
    assert len(names) == len(hot)
    for name, experts in zip(names, hot):
        scale = mx.array([3.0 if e in experts else 1.0 for e in range(w[name].shape[0])])[:, None]
        w[name] = w[name] * scale
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "pt"})
    return out


def _held(s: dict, backend: str) -> list[int]:
    return sorted(e for w in s["workers"] if w["backend"] == backend for e in w["experts"])


def _pairs(s: dict, backend: str) -> set[tuple[int, int]]:
    """The (layer, expert) pairs the workers of `backend` own in the active placement."""
    ids = {w["worker"] for w in s["workers"] if w["backend"] == backend}
    return {(layer, e) for layer, row in enumerate(s["layers"] or []) for e, owners in enumerate(row)
            if ids & set(owners)}


def _served(s: dict, backend: str) -> int:
    return sum(w["tokens"] for w in s["workers"] if w["backend"] == backend)


def test_dram_takes_the_hottest_experts_off_the_flash_cache_and_a_kill_gives_them_back(
        checkpoints: dict[str, Path], tmp_path: Path):
    c = Services(_skewed(checkpoints["mixtral"], tmp_path / "tiny-mixtral", SKEW), tmp_path, router_args=())
    try:
        c.procs.append(cli("flash-cache", "--nats", c.nats_url, "--model", str(c.model), "--memory-budget",
                           str(4 * RECORD), "--window", "1", log=c.log))
        wait_healthy(c.url, c.procs, c.log)
        reference = asyncio.run(_texts(c.url))  # the flash-cache alone, every expert read from SSD
        s = _status_until(c.nats_url, lambda s: len(s["workers"]) == 1 and not s["unowned_experts"])
        assert _held(s, "flash") == list(range(NUM_EXPERTS["mixtral"]))

        # A DRAM worker joins during streams: the hottest pairs by the load so far move to it.
        texts = asyncio.run(_texts(c.url, during=lambda: c.worker("--memory-budget", str(HOT * ONE_EXPERT))))
        assert texts == reference
        layers = len(SKEW)
        s = _status_until(c.nats_url, lambda s: len(s["workers"]) == 2 and s["pending_version"] is None
                          and len(_pairs(s, "dram")) == HOT * layers)
        load = {(layer, e): n for layer, row in enumerate(s["pair_load"]) for e, n in enumerate(row)}
        total = sum(load.values())
        carried = lambda pairs: sum(load[p] for p in pairs)  # noqa: E731
        hottest = sorted(load, key=lambda p: (-load[p], p))[:HOT * layers]
        # Without placement by load, DRAM would hold the lowest pairs: that must be worse than the margin.
        assert carried(hottest) - carried(sorted(load)[:HOT * layers]) > MOVE_MARGIN * total, load
        # Placing by expert id (the same ids in every layer) would carry less: at best the HOT ids
        # of most tokens summed over the layers.
        by_id = sorted(range(NUM_EXPERTS["mixtral"]), key=lambda e: -sum(load[(l, e)] for l in range(layers)))[:HOT]
        assert carried(hottest) > carried((l, e) for l in range(layers) for e in by_id), load
        # What DRAM holds is the hottest, or as good within the margin (the router weighs its recent load)
        dram = _pairs(s, "dram")
        assert carried(dram) >= carried(hottest) - MOVE_MARGIN * total, (load, s["layers"])
        assert {e for _, e in dram} == set(_held(s, "dram")) and len(_held(s, "dram")) > HOT  # ids differ by layer
        # Each pair has one owner: the hot ones' tokens never go to the flash-cache.
        assert _pairs(s, "flash") == set(load) - dram
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

"""The flash-cache as a service on a real bus: it answers the worker's subjects and wire format,
refuses a corrupt record by name without serving its numbers, shows itself to the micro API,
and refuses at start what it could never serve."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import numpy as np
import orjson
import pytest

from services.expert_worker.experts import load_experts
from services.flash_cache.bundle import DATA, write_bundle
from shared import subjects
from shared.messages import WorkerAnnounce, decode
from shared.wire import decode_reply, decode_request, encode_request
from tests.checkpoints import HIDDEN
from tests.cluster import ROOT, cli, place_all, tail
from tests.conftest import nats_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bus of its own: these tests act as the router and write placement."""
    with nats_server(tmp_path_factory.mktemp("flash-nats")) as url:
        yield url


def _request(layer: int, experts: list[int]) -> bytes:
    x = np.random.default_rng(layer).standard_normal((1, HIDDEN)).astype(np.float32)
    return encode_request(layer, 0, x, np.zeros(len(experts), np.int32), np.array(experts, np.int32))


async def _announced(nc: nats.NATS) -> WorkerAnnounce:
    sub = await nc.subscribe(subjects.ANNOUNCEMENTS)
    try:
        return decode(WorkerAnnounce, (await sub.next_msg(timeout=60)).data)
    finally:
        await sub.unsubscribe()


async def test_a_corrupt_record_is_an_error_naming_it_and_the_rest_still_serves(
        bus: str, checkpoints: dict[str, Path], tmp_path: Path):
    model = checkpoints["mixtral"]
    m = write_bundle(model, tmp_path / "bundle")
    data = bytearray((tmp_path / "bundle" / DATA).read_bytes())
    data[m.offset(1, 3) + 64] ^= 0x01  # one bit of expert 3 in MoE layer 1
    (tmp_path / "bundle" / DATA).write_bytes(bytes(data))
    log = tmp_path / "flash.log"
    proc = cli("flash-cache", "--nats", bus, "--bundle", str(tmp_path / "bundle"),
               "--memory-budget", str(2 * m.moe_layers * m.record_bytes), log=log)
    nc = await nats.connect(bus)
    try:
        me = await _announced(nc)
        assert me.capacity == m.num_experts  # all of them, from flash
        await place_all(nc, me, m.num_experts)
        deadline = time.monotonic() + 30  # the flash-cache takes the placement within its poll period
        while (first := await nc.request(me.subject, _request(1, [4, 5]), timeout=10)).headers:
            assert first.headers["Nats-Service-Error-Code"] == "409", first.headers  # not held yet
            assert time.monotonic() < deadline, first.headers
            await asyncio.sleep(0.1)
        bad = await nc.request(me.subject, _request(1, [3, 4]), timeout=10)
        assert bad.headers["Nats-Service-Error-Code"] == "500"
        assert "MoE layer 1 expert 3: crc32" in bad.headers["Nats-Service-Error"]
        again = await nc.request(me.subject, _request(1, [3]), timeout=10)  # its bytes were not kept in a slot
        assert again.headers and "MoE layer 1 expert 3: crc32" in again.headers["Nats-Service-Error"], again.headers
        # Every sound record, expert 4 of the failed pass and expert 3 of the sound layer included,
        # gives the checkpoint's numbers: the same arithmetic as a worker's DRAM experts, bit for bit.
        dram, _ = load_experts(model, list(range(m.num_experts)))
        sound = [(layer, e) for layer in range(m.moe_layers) for e in range(m.num_experts) if (layer, e) != (1, 3)]
        for layer, e in [(1, 4), (1, 5), *sound]:  # 2 slots a layer's worth: records are read again and again
            got = await nc.request(me.subject, _request(layer, [e]), timeout=10)
            assert not got.headers, (layer, e, got.headers)
            want = decode_reply(dram.compute(decode_request(_request(layer, [e])))).y
            np.testing.assert_array_equal(decode_reply(got.data).y, want, err_msg=f"layer {layer} expert {e}")
        np.testing.assert_array_equal(decode_reply(first.data).y,
                                      decode_reply(dram.compute(decode_request(_request(1, [4, 5])))).y)
        stats = orjson.loads((await nc.request(f"$SRV.STATS.{subjects.SERVICE_FLASH}", b"", timeout=5)).data)
        counters = stats["endpoints"][0]["data"]
        assert stats["name"] == subjects.SERVICE_FLASH and counters["records_read"] >= len(sound)
        assert counters["slot_bytes"] == 2 * m.moe_layers * m.record_bytes
    finally:
        await nc.close()
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, tail(log)


def _refused(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "services.cli", "flash-cache", "--nats", "nats://127.0.0.1:1",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    return out.stderr


def test_what_it_could_never_serve_is_refused_at_start(checkpoints: dict[str, Path], tmp_path: Path):
    m = write_bundle(checkpoints["mixtral"], tmp_path / "mixtral")
    # under the 2 experts one token routes to (the pool is shared by the layers)
    err = _refused("--bundle", str(tmp_path / "mixtral"), "--memory-budget", str(2 * m.record_bytes - 1))
    assert "under the 2 experts a token routes to" in err
    err = _refused("--model", str(checkpoints["qwen3_moe"]), "--bundle", str(tmp_path / "mixtral"))
    assert "a bundle of another model" in err

"""Closing a connection whose drain outlasts its bound, on a real nats-server: it ends within
the bound and leaves asyncio nothing to complain about."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from shared.bus import close, connect
from tests.conftest import nats_server


async def test_a_drain_that_outlasts_its_bound_leaves_no_unretrieved_gather(tmp_path: Path):
    complaints: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: complaints.append(context["message"]))
    try:
        with nats_server(tmp_path) as url:
            nc = await connect(url, "test")
            unread = await nc.subscribe("unread")  # its message is never taken: its drain waits on it
            await nc.publish("unread", b"x")
            for _ in range(200):  # delivered soon after the flush, not always before it returns
                if unread.pending_msgs:
                    break
                await asyncio.sleep(0.01)
            assert unread.pending_msgs == 1
            await close(nc, timeout_s=1.0)
            assert nc.is_closed
        gc.collect()  # an abandoned future complains when it is collected
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in complaints if "never retrieved" in c], complaints

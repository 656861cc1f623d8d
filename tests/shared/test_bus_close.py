"""Closing a connection whose drain outlasts its bound, on a real nats-server: it ends within
the bound and leaves asyncio nothing to complain about."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

from shared.bus import close, connect, new_loop
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


def test_a_service_loop_keeps_quiet_about_a_write_on_a_closed_tls_socket_only(caplog):
    """uvloop's TLS handshake finishing on a socket the restarting bus closed reaches the loop's
    handler as this RuntimeError (nats-py reconnects by itself): no traceback for the operator.
    Any other unhandled error still gets one."""
    loop = new_loop()
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            race = RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False "
                                "0x55d0>; the handler is closed")
            loop.call_exception_handler({"message": "Exception in callback SSLProtocol.connection_made",
                                         "exception": race})
            assert not [r for r in caplog.records if r.name == "asyncio"]
            loop.call_exception_handler({"message": "Exception in callback Other", "exception": RuntimeError("boom")})
            (reported,) = [r for r in caplog.records if r.name == "asyncio"]
            assert "Exception in callback Other" in reported.getMessage() and reported.exc_info[1].args == ("boom",)
    finally:
        loop.close()

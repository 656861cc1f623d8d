"""A client that leaves before its answer stops the work behind it, even when a cancel is lost."""

from __future__ import annotations

import asyncio

from services.gateway.middleware import HttpSettings, Limits


def _client_that_leaves(body: bytes = b"{}"):
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    left = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    return receive, left


async def _send(message) -> None:
    raise AssertionError(f"nobody is there to answer: {message}")


async def test_an_app_that_loses_one_cancel_is_cancelled_again():
    """Python 3.11's wait_for hands back a result that arrives as its task is cancelled and
    drops the cancel (nats-py's next_msg awaits one per event). The generation behind such a
    request would then run to its max_tokens for a client that is gone."""
    steps, lost = 0, 0

    async def app(scope, receive, send) -> None:
        nonlocal steps, lost
        while steps < 500:  # a long generation, one event at a time
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:  # the second cancel is heard
                    raise
                lost += 1  # the first is swallowed, as wait_for does
            steps += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})

    receive, left = _client_that_leaves()
    scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": [], "query_string": b""}
    call = asyncio.ensure_future(Limits(app, HttpSettings())(scope, receive, _send))
    await asyncio.sleep(0.1)
    left.set()
    await asyncio.wait_for(call, 3)
    assert lost == 1 and steps < 100, (lost, steps)

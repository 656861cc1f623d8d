"""A hostile client against `moebus up`: slow headers and bodies, idle and abandoned connections,
more connections than the gateway may hold, lone surrogates and broken JSON."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import nats
import pytest

from shared import subjects
from shared.access import cluster_dir, connect_options, load
from shared.messages import GenerateEvent, decode
from shared.natsd import free_port
from tests.cluster import ROOT, Up, wait_healthy

MODEL = "tiny-mixtral"
LIMITS = ("--header-timeout", "2", "--body-timeout", "3", "--keep-alive", "1", "--max-connections", "20")


@pytest.fixture(scope="module")
def long_mixtral(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny mixtral with a 8192-token context, so an unbounded request runs for a minute."""
    out = tmp_path_factory.mktemp("long") / MODEL
    shutil.copytree(checkpoints["mixtral"], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return out


@pytest.fixture(scope="module")
def up(long_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    extra = (*LIMITS, "--max-running", "2", "--max-waiting", "2")
    with Up(long_mixtral, 1, tmp_path_factory.mktemp("hardening"), extra=extra) as cluster:
        yield cluster


Opener = Callable[[int, bytes], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def raw() -> AsyncIterator[Opener]:
    """Opens raw connections to a port, sends their first bytes, and closes them all after the test."""
    writers: list[asyncio.StreamWriter] = []

    async def open_(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(head)
        await writer.drain()
        return reader, writer

    yield open_
    for w in writers:
        w.close()


async def _until_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


def _post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: moebus\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def _closes(up: Up) -> Counter[str]:
    """Connections the gateway closed so far, by reason (moebus_http_connections_closed_total).
    Asked on a connection that closes with its answer, so it counts under no reason itself."""
    async with httpx.AsyncClient(base_url=up.url, timeout=10, headers={"Connection": "close"}) as http:
        text = (await http.get("/metrics")).text
    found = re.findall(r'^moebus_http_connections_closed_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return Counter({reason: int(float(n)) for reason, n in found})


def _error(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


async def test_headers_that_never_finish_are_cut_at_the_header_timeout(up: Up, raw: Opener):
    before = await _closes(up)
    silent, _ = await raw(up.port, b"")
    partial, _ = await raw(up.port, b"POST /v1/completions HTTP/1.1\r\nHost: moebus\r\n")
    dribble_r, dribble_w = await raw(up.port, b"G")

    async def dribble() -> None:  # one byte at a time never ends the headers, nor resets a deadline
        for b in b"ET /health HTTP/1.1\r\nX-Slow: " + b"a" * 300:
            dribble_w.write(bytes([b]))
            await asyncio.sleep(0.1)

    started = time.monotonic()
    drip = asyncio.create_task(dribble())
    # A deadline that each byte reset would fall 2 s after the 33 s dribble: past this wait.
    said = await asyncio.gather(*(_until_closed(r, 20) for r in (silent, partial, dribble_r)))
    drip.cancel()
    assert time.monotonic() - started > 1.5  # not before the 2 s deadline
    assert said[0] == b""  # nothing asked, nothing answered
    for reply in said[1:]:
        assert reply is not None and reply.startswith(b"HTTP/1.1 408 "), reply
        assert _error(reply)["type"] == "timeout_error" and "headers took over 2s" in _error(reply)["message"]
    assert await _closes(up) - before == {"header_timeout": 3}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/messages"])
async def test_a_slow_body_gets_a_408_at_the_body_timeout(up: Up, raw: Opener, path: str):
    before = await _closes(up)
    reader, writer = await raw(up.port, _post_head(path, 1000))
    started = time.monotonic()

    async def dribble() -> None:
        for _ in range(100):
            writer.write(b" ")
            await asyncio.sleep(0.2)

    drip = asyncio.create_task(dribble())
    reply = await _until_closed(reader, 15)  # a deadline each byte reset would fall after the 20 s dribble
    drip.cancel()
    assert reply is not None and reply.startswith(b"HTTP/1.1 408 "), reply
    assert time.monotonic() - started > 2.5  # not before the 3 s deadline
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "body took over 3s" in body["error"]["message"], body
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "timeout_error"
    else:
        assert body["error"]["code"] == "request_timeout" and body["error"]["param"] is None
    assert await _closes(up) - before == {"body_timeout": 1}


async def test_an_idle_keep_alive_connection_is_closed(up: Up, raw: Opener):
    before = await _closes(up)
    reader, _ = await raw(up.port, b"GET /health HTTP/1.1\r\nHost: moebus\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    # --keep-alive 1, not uvicorn's default of 5 s: an ignored setting would close it after this wait.
    assert await _until_closed(reader, 4) == b""
    assert await _closes(up) - before == {"keep_alive": 1}


async def test_health_answers_with_more_slow_clients_than_the_cap(up: Up, raw: Opener):
    """With the cap at 20, each new connection evicts the oldest that is still reading."""
    before = await _closes(up)
    slow = []
    for i in range(30):  # half dribble headers, half bodies; opened in order so the oldest is known
        head = b"GET /v1/models HTTP/1.1\r\nHost: m" if i % 2 else _post_head("/v1/completions", 1000) + b"{"
        slow.append(await raw(up.port, head))
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=up.url, timeout=3) as http:
        r = await http.get("/health")
    assert r.status_code == 200
    closed = await asyncio.gather(*(_until_closed(reader, 15) for reader, _ in slow))
    # 11 were evicted, closed without a word (10 slow ones, then one for /health); the newest
    # 19 stayed until their own deadlines, which answer a 408.
    assert all(c == b"" for c in closed[:11]), closed
    assert all(c is not None and c.startswith(b"HTTP/1.1 408 ") for c in closed[11:]), closed
    assert await _closes(up) - before == {"evicted": 11, "header_timeout": 10, "body_timeout": 9}


async def test_abandoned_requests_give_back_their_slots_at_once(up: Up):
    """--max-running 2 --max-waiting 2: four requests that would each run for minutes,
    abandoned after a second, must not keep everyone else out: the gateway cancels each on
    the router, which ends them there and then (two running, two queued)."""
    # Greedy: the tiny model then never samples its end token, so each would run its 8000 tokens.
    chat = {"model": MODEL, "max_tokens": 8000, "temperature": 0, "messages": [{"role": "user", "content": "w1 w2"}]}
    prompt = {"model": MODEL, "prompt": "w1", "max_tokens": 8000, "temperature": 0}
    bodies = [("/v1/chat/completions", chat), ("/v1/completions", prompt), ("/v1/messages", chat),
              ("/v1/chat/completions", chat)]

    async def abandon(path: str, body: dict) -> str:
        async with httpx.AsyncClient(base_url=up.url, timeout=httpx.Timeout(10, read=1.5)) as http:
            try:
                r = await http.post(path, json=body)
            except httpx.ReadTimeout:
                return "abandoned"
        return f"{r.status_code} {r.text[:200]}"

    # The router's last event of each sequence says why it ended: heard as the gateway hears it.
    ended: dict[str, GenerateEvent] = {}

    async def on_event(msg) -> None:
        event = decode(GenerateEvent, msg.data)
        if event.finish_reason is not None:
            ended[event.request_id] = event

    nc = await nats.connect(up.nats_url, **connect_options(load(cluster_dir(), "gateway")))
    try:
        await nc.subscribe(f"{subjects.STREAM_PREFIX}.>", cb=on_event)
        await nc.flush()
        assert await asyncio.gather(*(abandon(p, b) for p, b in bodies)) == ["abandoned"] * 4
        deadline = time.monotonic() + 30  # far short of the minutes the four would run
        while len(ended) < 4:
            assert time.monotonic() < deadline, f"of the four, the router ended only {ended}"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert [e.finish_reason for e in ended.values()] == ["error"] * 4, ended
    assert all("cancelled" in (e.error or "") for e in ended.values()), ended
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=up.url, timeout=10) as http:
        while (h := (await http.get("/health")).json())["running"] or h["waiting"]:
            assert time.monotonic() < deadline, h
            await asyncio.sleep(0.1)
        # Greedy: a sampled answer may pick the end token early (its logit is 0, not -inf).
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "w1", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


LONE = '"\\ud800"'  # JSON's escape for half a surrogate pair


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {LONE}}}]}}'),
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": '
                             f'[{{"type": "text", "text": "w1 \\udfff"}}]}}]}}'),
    ("/v1/chat/completions", f'{{"model": {LONE}, "messages": [{{"role": "user", "content": "w1"}}]}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": {LONE}}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["w1", {LONE}]}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "w1", "stop": ["w2", {LONE}]}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "w1", "stop": {LONE}}}'),
    ("/v1/messages", f'{{"model": "{MODEL}", "max_tokens": 2, "system": {LONE}, '
                     f'"messages": [{{"role": "user", "content": "w1"}}]}}'),
    ("/v1/messages", f'{{"model": "{MODEL}", "max_tokens": 2, "stop_sequences": [{LONE}], '
                     f'"messages": [{{"role": "user", "content": "w1"}}]}}'),
    ("/v1/messages", f'{{"model": {LONE}, "max_tokens": 2, "messages": [{{"role": "user", "content": "w1"}}]}}'),
])
def test_a_lone_surrogate_is_a_400(up: Up, path: str, body: str):
    r = httpx.post(f"{up.url}{path}", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if path == "/v1/messages":
        assert r.json()["type"] == "error" and err["type"] == "invalid_request_error"
    else:
        assert err["type"] == "invalid_request_error" and err["param"]
    assert "surrogate" in err["message"] or "unicode" in err["message"], err


def test_surrogates_encoded_raw_in_the_bytes_are_a_400_too(up: Up):
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "w1 \xed\xa0\x80"}'  # UTF-8 bytes of U+D800
    r = httpx.post(f"{up.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize("body", [b'{"model": ', b'{"model": "tiny-mixtral", "prompt": "w1",}', b"\xff\xfe"])
def test_broken_json_is_a_400_without_a_param(up: Up, body: bytes):
    r = httpx.post(f"{up.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] is None, err


async def test_more_slow_clients_than_file_descriptors(up: Up, tmp_path: Path, raw: Opener):
    """The reported failure: slow clients beyond the process's descriptor limit made accept()
    fail, /health with it. Without --max-connections, the cap follows the limit: a second
    gateway on the same bus, started with 256 descriptors, must still answer."""
    port = free_port()
    log = tmp_path / "gateway.log"
    command = f"ulimit -n 256 && exec {sys.executable} -m services.cli gateway --nats {up.nats_url} --port {port}"
    with log.open("ab") as out:
        gateway = subprocess.Popen(["sh", "-c", command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, [gateway], log, timeout_s=30)
        for _ in range(400):
            await raw(port, _post_head("/v1/completions", 1000) + b"{")
        async with httpx.AsyncClient(base_url=url, timeout=3) as http:
            r = await http.get("/health")
            metrics = (await http.get("/metrics")).text
    finally:
        gateway.terminate()
        gateway.wait(10)
    assert r.status_code == 200
    assert 'moebus_http_connections_closed_total{reason="evicted"}' in metrics
    assert "Traceback" not in log.read_text(errors="replace")


def test_none_of_it_left_a_traceback(up: Up):
    assert "Traceback" not in up.log.read_text(errors="replace")

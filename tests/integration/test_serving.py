"""One cluster, used as a client would: the API, its errors, and the bus's micro services."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import openai
import orjson
import pytest
from openai import OpenAI

from shared import subjects
from shared.wire import encode_request
from tests.cluster import Up, worker_subject

MODEL = "tiny-mixtral"


@pytest.fixture(scope="module")
def up(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # An open bus: these tests probe the services as a peer that may send anything (the secured
    # bus, which keeps strangers off it, is tests/integration/test_security.py's).
    with Up(checkpoints["mixtral"], 2, tmp_path_factory.mktemp("serving"), extra=("--insecure",)) as cluster:
        yield cluster


@pytest.fixture
def client(up: Up) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_health_models_and_a_streamed_chat(up: Up, client: OpenAI):
    health = httpx.get(f"{up.url}/health").json()
    assert len(health.pop("workers")) == 2
    assert health.pop("kv_budget_bytes") > 0 and health.pop("kv_bytes_in_use") == 0  # nothing runs
    assert isinstance(health.pop("prompt_cache_bytes"), int) and health.pop("mlx_active_bytes") > 0  # the weights at least
    assert health == {"ready": True, "model": MODEL, "experts_covered": 8, "experts_total": 8, "unowned_experts": [],
                      "running": 0, "waiting": 0}
    assert [m.id for m in client.models.list()] == [MODEL]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w1 w2 w3"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 6 and chunks[-1].choices[0].finish_reason == "length"
    same = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1 w2 w3"}],
                                          max_tokens=6, temperature=0)
    assert same.choices[0].message.content == text


def test_streamed_completion_equals_the_whole_one(client: OpenAI):
    whole = client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=5, temperature=0)
    parts = client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=5, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_prompt_longer_than_the_context_is_a_400(up: Up, client: OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[9] * 600, max_tokens=4)
    assert e.value.status_code == 400
    err = _error(e.value.response)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_below_one_is_a_400(client: OpenAI, max_tokens: int):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=max_tokens)
    assert _error(e.value.response)["param"] == "max_tokens"


def test_unknown_model_is_a_404(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "w1"}], max_tokens=2)
    assert _error(e.value.response)["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    b"{not json",
    b'{"model": "tiny-mixtral", "messages": "w1"}',
    b'{"model": "tiny-mixtral", "messages": [{"role": "user", "content": "w1"}], "max_tokens": "many"}',
    b'{"model": "tiny-mixtral", "messages": []}',
    b'[]',
])
def test_malformed_bodies_are_400_in_openai_shape(up: Up, body: bytes):
    r = httpx.post(f"{up.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert _error(r)["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(up: Up):
    body = {"model": MODEL, "prompt": "w1", "max_tokens": 2, "temperature": 0, "frobnicate": True}
    r = httpx.post(f"{up.url}/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


async def test_every_service_answers_srv_ping(up: Up):
    nc = await nats.connect(up.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        names: Counter[str] = Counter()
        try:
            while True:
                msg = await sub.next_msg(timeout=1.0)
                names[orjson.loads(msg.data)["name"]] += 1
        except nats.errors.TimeoutError:
            pass
    finally:
        await nc.close()
    assert names == {subjects.SERVICE_GATEWAY: 1, subjects.SERVICE_ROUTER: 1, subjects.SERVICE_WORKER: 2}


@pytest.mark.parametrize("payload, needle", [
    (b"garbage", "shorter than its header"),
    (b"MBQ1" + bytes(40), "bytes, header says"),
    (encode_request(99, 0, __import__("numpy").zeros((1, 64), "float32"),
                    __import__("numpy").zeros(1, "int32"), __import__("numpy").zeros(1, "int32")), "layer 99"),
])
async def test_malformed_expert_message_gets_an_error_and_the_worker_keeps_serving(up: Up, client: OpenAI,
                                                                                    payload, needle):
    nc = await nats.connect(up.nats_url)
    try:
        before = await _worker_errors(nc)
        msg = await nc.request(await worker_subject(nc), payload, timeout=5)
        after = await _worker_errors(nc)
    finally:
        await nc.close()
    assert msg.headers["Nats-Service-Error-Code"] == "400"
    assert needle in msg.headers["Nats-Service-Error"]
    assert after == before + 1  # a service error: $SRV.STATS counts it
    r = await asyncio.to_thread(client.completions.create, model=MODEL, prompt="w3", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


async def _worker_errors(nc: nats.NATS) -> int:
    """Errors counted by every worker's `$SRV.STATS`."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{subjects.SERVICE_WORKER}", b"", reply=inbox)
    total = 0
    try:
        while True:
            stats = orjson.loads((await sub.next_msg(timeout=0.5)).data)
            total += sum(e["num_errors"] for e in stats["endpoints"])
    except nats.errors.TimeoutError:
        return total
    finally:
        await sub.unsubscribe()

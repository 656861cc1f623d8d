"""The full API with the real openai and anthropic clients, against `moebus up` with an API key."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.cluster import Up

MODEL = "tiny-mixtral"
KEY = "sk-test-moebus"
CHAT = [{"role": "user", "content": "w1 w2 w3"}]


class KeyedUp(Up):
    extra = ("--api-key", KEY, "--max-body-bytes", "20000")


@pytest.fixture(scope="module")
def up(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with Up(checkpoints["mixtral"], 2, tmp_path_factory.mktemp("api"), extra=KeyedUp.extra) as cluster:
        yield cluster


@pytest.fixture
def client(up: Up) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def _greedy(client: OpenAI, max_tokens: int = 12, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].message.content


def test_stop_strings_cut_the_text(client: OpenAI):
    full = _greedy(client)
    words = full.split()
    stop = f" {words[4]} "
    cut = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                         stop=["never-there", stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_reproduces_a_sampled_answer(client: OpenAI):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 50, "min_p": 0.01}).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_logprobs_in_chat_and_completions(client: OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(c.token if i == 0 else " " + c.token for i, c in enumerate(content)) == r.choices[0].message.content
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and c.logprob == pytest.approx(tops[0])
    c = client.completions.create(model=MODEL, prompt="w1", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 4 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_stream_usage_and_max_completion_tokens(client: OpenAI):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=7,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "length"


def test_n_above_one_is_a_clear_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2)
    assert e.value.body["param"] == "n"


def test_anthropic_messages_streamed_and_not(up: Up):
    with anthropic.Anthropic(base_url=up.url, api_key=KEY, max_retries=0) as client:
        kw = dict(model=MODEL, max_tokens=8, extra_body={"temperature": 0}, system="w9 w10",
                  messages=[{"role": "user", "content": "w1 w2 w3"}])
        whole = client.messages.create(**kw)
        assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8
        text = whole.content[0].text
        with client.messages.stream(**kw) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == text and final.stop_reason == "max_tokens"
        stop = f" {text.split()[3]} "
        cut = client.messages.create(**kw, stop_sequences=[stop])
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
        assert cut.content[0].text == text[: text.index(stop)]
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(**{**kw, "model": "claude-nothing"})


def test_api_keys(up: Up):
    assert httpx.get(f"{up.url}/health").status_code == 200  # open for probes
    r = httpx.get(f"{up.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{up.url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{up.url}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    with OpenAI(base_url=f"{up.url}/v1", api_key="wrong", max_retries=0) as bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_body_over_the_limit_is_a_413(up: Up):
    r = httpx.post(f"{up.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "w1 " * 10000, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


async def test_greedy_output_is_the_same_alone_and_among_16(up: Up):
    prompts = [" ".join(f"w{(i * 7 + j) % 300}" for j in range(3 + i % 5)) for i in range(16)]
    async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as client:
        async def one(p: str) -> str:
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)
            return r.choices[0].text
        alone = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
    assert together == alone


def _layer_calls(up: Up) -> float:
    text = httpx.get(f"{up.url}/metrics", headers={"x-api-key": KEY}).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("moebus_expert_layer_calls"))


def test_a_client_that_goes_away_is_dropped(up: Up, client: OpenAI):
    """The sequence stops generating: it does not run on to its 400 tokens (802 layer calls)."""
    before = _layer_calls(up)
    stream = client.completions.create(model=MODEL, prompt="w1", max_tokens=400, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        h = httpx.get(f"{up.url}/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.05)
    assert (h["running"], h["waiting"]) == (0, 0)
    used = _layer_calls(up) - before
    time.sleep(0.5)
    assert _layer_calls(up) - before == used < 200, used


def test_metrics_show_requests_latency_and_expert_load(up: Up, client: OpenAI):
    _greedy(client, max_tokens=3)
    text = httpx.get(f"{up.url}/metrics", headers={"x-api-key": KEY}).text
    for needle in ['moebus_requests_total{endpoint="/v1/chat/completions",status="200"}',
                   "moebus_time_to_first_token_seconds_bucket", "moebus_inter_token_latency_seconds_bucket",
                   'moebus_expert_roundtrip_seconds_bucket{layer="1"', 'moebus_expert_tokens_total{expert="7"}',
                   "moebus_workers_connected 2.0", "moebus_placement_version", 'moebus_micro_batch_steps_total{lane="0"}',
                   "moebus_sequences_running", "moebus_sequences_waiting", "moebus_generated_tokens_total"]:
        assert needle in text, needle
    assert text.count("moebus_worker_tokens_total{worker=") == 2  # both workers served (labelled by id)


def test_openapi_fuzzing_finds_no_server_error(up: Up):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{up.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/messages"}
    seen: list[int] = []
    for op, mode in itertools.product(operations, schemathesis.GenerationMode):
        if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def no_5xx(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        no_5xx()
    assert len(seen) > 2 * len(operations) and any(400 <= s < 500 for s in seen)
    assert 400 in seen  # the negative cases did reach the validation


def test_one_clients_odd_parameters_never_break_the_batch(up: Up, client: OpenAI):
    huge_k = client.completions.create(model=MODEL, prompt="w1", max_tokens=3, temperature=0.7,
                                       extra_body={"top_k": 10**6})
    assert huge_k.usage.completion_tokens == 3
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, param in [({"max_tokens": 10**20}, "max_tokens"), ({"stop": ["x" * 300]}, "stop"),
                        ({"prompt": [2**40]}, "prompt.list[int].0")]:
        r = httpx.post(f"{up.url}/v1/completions", headers=auth, json={"model": MODEL, "prompt": "w1", **body})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param.split(".")[0]), r.text


def test_a_chunked_body_over_the_limit_is_a_413(up: Up):
    def chunks():
        yield b'{"model": "tiny-mixtral", "prompt": "'
        for _ in range(100):
            yield b"w1 " * 100
        yield b'"}'

    r = httpx.post(f"{up.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=chunks())
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]

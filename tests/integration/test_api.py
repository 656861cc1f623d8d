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

from tests.checkpoints import SPECIAL_TOKENS
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


def test_seeds_reproduce_and_differ_over_the_whole_64_bit_range(client: OpenAI):
    """Seeds were reduced mod 2**32: 0 and 2**32 (and 2**200) gave the same text. OpenAI takes a
    signed 64-bit seed; each is its own, and beyond that range is a 400, never a 500."""
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 50, "min_p": 0.01}).choices[0].text

    seeds = [0, 1, 2**32, 2**63 - 1, -1, -(2**63)]
    texts = [sample(s) for s in seeds]
    assert len(set(texts)) == len(seeds), texts  # ~0.1 the most likely token's chance: 24 never repeat
    assert sample(2**32) == texts[2]
    for seed in (2**63, 2**200, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as e:
            sample(seed)
        assert e.value.body["param"] == "seed" and "922337203685477580" in e.value.body["message"]


async def test_sampled_special_tokens_are_counted_but_never_written(up: Up):
    """The demo wrote "who on <s> another winter": at temperature 2 the tiny model samples
    <unk> <s> <pad> about once in a hundred tokens; seeded, so the same ones each run."""
    async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as client:
        def ask(seed: int, **kw):
            return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, temperature=2.0,
                                                  seed=seed, **kw)

        replies = await asyncio.gather(*(ask(seed, logprobs=True) for seed in range(4)))
        streamed = "".join([c.choices[0].delta.content or "" async for c in await ask(0, stream=True) if c.choices])
    tokens = [t.token for r in replies for t in r.choices[0].logprobs.content]
    assert "" in tokens  # a special token was sampled: its text is empty, as in the content
    for r in replies:
        content, scored = r.choices[0].message.content, r.choices[0].logprobs.content
        assert not [s for s in SPECIAL_TOKENS if s in content], content
        assert len(scored) == r.usage.completion_tokens and content == " ".join(t.token for t in scored if t.token)
    assert streamed == replies[0].choices[0].message.content


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


def test_what_a_word_level_model_cannot_do_is_a_clear_400(client: OpenAI):
    """Its template has no tool-call format, its tokens cannot spell JSON: said, not attempted."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param, words in ((dict(tools=[tool]), "tools", "no tool calling"),
                               (dict(response_format={"type": "json_object"}), "response_format", "spell JSON")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **body)
        assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


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


def _idle(up: Up, timeout_s: float = 10) -> tuple[int, int]:
    """(running, waiting) once both are 0, or as they are at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = httpx.get(f"{up.url}/health").json()
        if (h["running"], h["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return h["running"], h["waiting"]
        time.sleep(0.05)


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
    assert _idle(up) == (0, 0)  # with nothing in the router's batch, no step runs: the count below is final
    used = _layer_calls(up) - before
    assert used < 200, used


def test_metrics_show_requests_latency_and_expert_load(up: Up, client: OpenAI):
    _greedy(client, max_tokens=3)
    text = httpx.get(f"{up.url}/metrics", headers={"x-api-key": KEY}).text
    for needle in ['moebus_requests_total{endpoint="/v1/chat/completions",status="200"}',
                   "moebus_time_to_first_token_seconds_bucket", "moebus_inter_token_latency_seconds_bucket",
                   'moebus_expert_roundtrip_seconds_bucket{layer="1"', 'moebus_expert_tokens_total{expert="7"}',
                   "moebus_workers_connected 2.0", "moebus_placement_version", 'moebus_micro_batch_steps_total{lane="0"}',
                   "moebus_sequences_running", "moebus_sequences_waiting", "moebus_generated_tokens_total"]:
        assert needle in text, needle
    high = next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("moebus_sequences_running_max "))
    assert 1 <= high <= 16  # --max-running
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


async def test_one_clients_odd_parameters_never_break_the_batch(up: Up):
    """Odd requests join a batch of normal ones, which must give the text they give alone. Both
    normal streams have a token before the odd requests are sent and still run when all are
    answered: every odd request ran inside their batch (2 + 5 < 8: one lane)."""
    normal, odd_prompt, stream_tokens = ["w1 w2 w3", "w7 w8"], "w4 w5", 20
    odd = [  # (fields, what the answer must be); min_p 1 and top_p 0.001 keep only the most likely token
        ({"temperature": 0.7, "extra_body": {"top_k": 10**6}, "max_tokens": 3},
         lambda r, greedy: r.usage.completion_tokens == 3),
        ({"temperature": 1.0, "extra_body": {"min_p": 1.0}}, lambda r, greedy: r.choices[0].text == greedy),
        ({"temperature": 2.0, "top_p": 0.001}, lambda r, greedy: r.choices[0].text == greedy),
        ({"temperature": 1.0, "seed": -(2**63), "logprobs": 20},
         lambda r, greedy: [len(t) for t in r.choices[0].logprobs.top_logprobs] == [20] * 8),
        ({"temperature": 0, "stop": ["w", " "], "max_tokens": 1},
         lambda r, greedy: (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")),
    ]
    refused = [({"max_tokens": 10**20}, "max_tokens"), ({"stop": ["x" * 300]}, "stop[0]"),
               ({"prompt": [2**40]}, "prompt[0]"), ({"seed": 2**64}, "seed"), ({"temperature": -1}, "temperature")]
    auth, base = {"Authorization": f"Bearer {KEY}"}, {"model": MODEL, "prompt": "w1", "max_tokens": 8}
    async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as client, \
            httpx.AsyncClient(base_url=up.url, headers=auth, timeout=60) as http:
        async def complete(prompt: str, **kw):
            return await client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 8, **kw})

        greedy = (await complete(odd_prompt, temperature=0)).choices[0].text
        streams = [await complete(p, max_tokens=480, temperature=0, stream=True) for p in normal]  # ~60x the odd ones
        readers = [s.__aiter__() for s in streams]
        texts = [(await r.__anext__()).choices[0].text for r in readers]
        answers, refusals = await asyncio.gather(
            asyncio.gather(*(complete(odd_prompt, **fields) for fields, _ in odd)),
            asyncio.gather(*(http.post("/v1/completions", json={**base, **body}) for body, _ in refused)))
        during = (await http.get("/health")).json()
        for i, r in enumerate(readers):
            texts[i] += "".join([(await r.__anext__()).choices[0].text for _ in range(stream_tokens - 1)])
            await streams[i].close()
        alone = [(await complete(p, max_tokens=stream_tokens, temperature=0)).choices[0].text for p in normal]
    for (body, param), r in zip(refused, refusals):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert during["running"] == len(normal), during  # the normal ones had not finished: the odd ones ran among them
    assert texts == alone
    for (fields, ok), r in zip(odd, answers):
        assert ok(r, greedy), (fields, r)
    assert _idle(up) == (0, 0)  # the closed streams were cancelled


def test_a_chunked_body_over_the_limit_is_a_413(up: Up):
    def chunks():
        yield b'{"model": "tiny-mixtral", "prompt": "'
        for _ in range(100):
            yield b"w1 " * 100
        yield b'"}'

    r = httpx.post(f"{up.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=chunks())
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]

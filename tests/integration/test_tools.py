"""Tools, structured output and reasoning with the real openai client, against `moebus up` (2
workers) serving a tiny thinking model with Qwen3's tool-call format, and one with Mistral's.

Random weights never call a tool on their own: the calls here are forced (tool_choice required or
a named function), which constrains generation; the `auto` path's parsing is tested on scripted
text in tests/router/test_output.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from tests.cluster import Up

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 10}, "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["query", "limit"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def client(tools_up: Up) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{tools_up.url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def check_calls(calls, only: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert only is None or call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA[call.function.name])


def test_required_gives_valid_calls(client: OpenAI, model: str):
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=1, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        check_calls(choice.message.tool_calls)


def test_a_named_function_streamed(client: OpenAI, model: str):
    stream = client.chat.completions.create(
        model=model, messages=CHAT, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
        max_tokens=200, temperature=1, seed=5, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": c.id, "name": c.function.name, "arguments": ""})
            entry["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]  # a named function: one call
    assert calls[0]["name"] == "search" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMA["search"])


def test_a_whole_loop_call_result_answer(client: OpenAI, model: str, tools_up: Up, tool_checkpoints):
    first = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)
    (call,) = first.choices[0].message.tool_calls
    messages = [*CHAT, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    answer = second.choices[0]
    assert answer.finish_reason == "length" and not answer.message.tool_calls
    assert answer.message.reasoning_content  # the template opened a think block: the answer starts there
    # The router rendered the whole conversation, the call and its result in the model's own
    # template: the same count of tokens as transformers renders it.
    tok = AutoTokenizer.from_pretrained(str(tool_checkpoints["json_tools"]))
    text = tok.apply_chat_template(
        [*CHAT, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}],
        tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=True) + "<think>\n"
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in text
    assert second.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_reasoning_is_apart_from_the_answer(client: OpenAI, model: str):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    message = r.model_dump()["choices"][0]["message"]
    assert message["reasoning_content"] and not message["content"]
    streamed = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0, stream=True)
    deltas = [c.choices[0].delta.model_dump() for c in streamed if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert sum(bool(d.get("reasoning_content")) for d in deltas) > 1  # streamed as generated, not at the end
    off = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0,
                                         extra_body=NO_THINKING)
    assert off.choices[0].message.content and not off.model_dump()["choices"][0]["message"].get("reasoning_content")


def _s(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


STR = {"type": "string", "maxLength": 8}
SCHEMAS = [
    _s(name=STR),
    _s(n={"type": "integer", "minimum": 0, "maximum": 100}),
    _s(x={"type": "number", "minimum": -1.5, "maximum": 2.5}),
    _s(ok={"type": "boolean"}),
    _s(color={"enum": ["red", "green", "blue"]}),
    _s(level={"const": "high"}),
    _s(tags={"type": "array", "items": STR, "minItems": 1, "maxItems": 3}),
    _s(grid={"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}),
    _s(user=_s(name=STR, age={"type": "integer", "minimum": 0, "maximum": 130})),
    _s(a=_s(b=_s(c={"enum": [1, 2, 3]}))),
    _s(code={"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}),
    _s(date={"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}),
    _s(v={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, STR]}),
    _s(maybe={"type": ["string", "null"], "maxLength": 6}),
    _s(note={"anyOf": [{"type": "null"}, _s(text=STR)]}),
    _s(items={"type": "array", "items": _s(id={"type": "integer", "minimum": 1, "maximum": 99}, done={"type": "boolean"}),
              "minItems": 1, "maxItems": 2}),
    {"type": "object", "properties": {"req": STR, "opt": {"type": "integer", "minimum": 0, "maximum": 3}},
     "required": ["req"], "additionalProperties": False},
    _s(pair={"type": "array", "prefixItems": [{"enum": ["x", "y"]}, {"type": "boolean"}], "items": False,
             "minItems": 2, "maxItems": 2}),
    _s(score={"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 5}),
    _s(kind={"enum": ["a", 1, None, True]}, size={"enum": ["S", "M", "L"]}),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    _s(ref={"$ref": "#/$defs/point"}) | {"$defs": {"point": _s(x={"type": "integer", "minimum": 0, "maximum": 9},
                                                               y={"type": "integer", "minimum": 0, "maximum": 9})}},
]


def test_json_schema_outputs_validate_alone_and_batched_beside_free_requests(tools_up: Up, model: str):
    """22 schemas at temperature 0 and 1, alone and 8 at a time beside free greedy requests: every
    output validates; each greedy one is the same alone and batched; the free ones are unchanged."""
    async def run() -> None:
        async with AsyncOpenAI(base_url=f"{tools_up.url}/v1", api_key="x", max_retries=0) as client:
            async def constrained(schema: dict, temperature: float) -> str:
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=300,
                    temperature=temperature, seed=7,
                    response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                            "strict": True}})
                assert r.choices[0].finish_reason == "stop", r
                return r.choices[0].message.content

            async def free() -> str:
                r = await client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                                         extra_body=NO_THINKING)
                return r.choices[0].message.content

            alone_free = await free()
            alone = [await constrained(schema, 0) for schema in SCHEMAS]
            gate = asyncio.Semaphore(8)

            async def limited(schema: dict, temperature: float) -> str:
                async with gate:
                    return await constrained(schema, temperature)

            jobs = [limited(s, t) for s in SCHEMAS for t in (0, 1)]
            *answers, = await asyncio.gather(*jobs, *[free() for _ in range(4)])
            texts, frees = answers[:len(jobs)], answers[len(jobs):]
            for (schema, _), text in zip([(s, t) for s in SCHEMAS for t in (0, 1)], texts):
                jsonschema.validate(json.loads(text), schema)
            assert frees == [alone_free] * 4
            for schema, text in zip(SCHEMAS, alone):
                jsonschema.validate(json.loads(text), schema)
            assert texts[0::2] == alone  # greedy: the same alone and in a batch

    asyncio.run(run())


def test_logprobs_of_constrained_tokens_leave_out_what_the_grammar_forbids(client: OpenAI, model: str):
    """A forbidden token's logprob is -inf: not an alternative (and not JSON either)."""
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=40, temperature=0, logprobs=True, top_logprobs=20,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS[4]}})
    entries = r.choices[0].logprobs.content
    assert json.loads(r.choices[0].message.content)["color"] in ("red", "green", "blue")
    assert any(len(e.top_logprobs) < 20 for e in entries)  # where the grammar allowed fewer than 20
    assert all(t.logprob > -1e30 for e in entries for t in e.top_logprobs)


def test_a_constrained_answer_cut_by_max_tokens_says_length(client: OpenAI, model: str):
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS[6]}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert '{"tags": '.startswith(r.choices[0].message.content)  # the schema's start, cut


@pytest.mark.parametrize("body, param, words", [
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools", "pattern"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools.0.parameters", "type object"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}), "response_format", "strin"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a"}}), "response_format", "schema"),
])
def test_bad_input_is_a_400_naming_it(client: OpenAI, model: str, body: dict, param: str, words: str):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, **body)
    error = e.value.body
    assert e.value.status_code == 400
    assert (error.get("param") or "").startswith(param.split(".")[0]), error
    assert words in error["message"], error


@pytest.fixture(scope="module")
def mistral_up(tool_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with Up(tool_checkpoints["mistral"], 1, tmp_path_factory.mktemp("mistral")) as cluster:
        yield cluster


def test_mistral_format_calls_and_loop(mistral_up: Up, tool_checkpoints):
    with OpenAI(base_url=f"{mistral_up.url}/v1", api_key="x", max_retries=0) as client:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=1, seed=3)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls)
        call = r.choices[0].message.tool_calls[0]
        messages = [*CHAT, r.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        again = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=4,
                                               temperature=0)
        assert again.choices[0].message.content is not None
        tok = AutoTokenizer.from_pretrained(str(tool_checkpoints["mistral"]))
        calls = [{"function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                 for c in r.choices[0].message.tool_calls]
        text = tok.apply_chat_template([*CHAT, {"role": "assistant", "content": "", "tool_calls": calls},
                                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
                                       tools=TOOLS, tokenize=False)
        assert again.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_the_readme_examples_run(tools_up: Up, model: str, capsys: pytest.CaptureFixture):
    """What a newcomer pastes from README's "Using moebus from applications", as written, against
    a server like the demo (another model name and port)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Using moebus from applications", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.startswith("python")]
    assert len(blocks) == 3
    code = "\n".join(blocks).replace("moebus-demo-moe", model).replace("127.0.0.1:8000", tools_up.url[7:])
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.startswith("get_weather {'city': ")  # the forced call, parsed

"""Tools and thinking with the real anthropic client, against `moebus up` serving a tiny thinking
model with Qwen3's tool-call format (the session's `tools_up`, shared with test_tools.py).

Random weights never call a tool on their own: the calls here are forced (tool_choice any or a
named tool), which the router constrains to a valid call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pytest
from transformers import AutoTokenizer

from tests.cluster import Up

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
SEARCH = {"name": "search", "input_schema": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 10},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["query", "limit"], "additionalProperties": False}}
TOOLS = [WEATHER, SEARCH]
SCHEMA = {t["name"]: t["input_schema"] for t in TOOLS}
T0, T1 = {"temperature": 0}, {"temperature": 1}  # this client has no temperature argument


@pytest.fixture(scope="module")
def client(tools_up: Up) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=tools_up.url, api_key="any", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(tools_up: Up) -> str:
    return httpx.get(f"{tools_up.url}/v1/models").json()["data"][0]["id"]


def check_tool_uses(message, only: str | None = None) -> list:
    """Every block is a call (no text beside it) valid under its tool's input_schema."""
    assert message.stop_reason == "tool_use", message
    assert message.content and {b.type for b in message.content} == {"tool_use"}, message.content
    for b in message.content:
        assert b.id and (only is None or b.name == only)
        jsonschema.validate(b.input, SCHEMA[b.name])
    return message.content


def test_the_documented_tool_use_loop(client: anthropic.Anthropic, model: str, tool_checkpoints: dict[str, Path]):
    """A forced call, its result sent back as a tool_result block, an answer: the conversation
    reaches the model in its own template, counted the same by count_tokens as by the generation."""
    # One call: with parallel calls a random model writes calls until the context is full.
    response = client.messages.create(model=model, max_tokens=200, tools=TOOLS, messages=ASK, extra_body=T1,
                                      tool_choice={"type": "any", "disable_parallel_tool_use": True})
    (call,) = check_tool_uses(response)

    def answered(result: dict) -> list[dict]:
        return [*ASK, {"role": "assistant", "content": response.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, **result}]}]

    failed = answered({"is_error": True, "content": [{"type": "text", "text": "no station"}]})
    answer = client.messages.create(model=model, max_tokens=6, tools=TOOLS, messages=failed, extra_body=T0)
    assert answer.stop_reason == "max_tokens" and answer.usage.output_tokens == 6
    # The template opens a think block: the answer starts there, as a thinking block.
    assert [b.type for b in answer.content] == ["thinking"] and answer.content[0].thinking

    tok = AutoTokenizer.from_pretrained(str(tool_checkpoints["json_tools"]))
    functions = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                   "parameters": t["input_schema"]}} for t in TOOLS]

    def rendered(result: str) -> int:
        text = tok.apply_chat_template(
            [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call.name, "arguments": call.input}}]},
             {"role": "tool", "tool_call_id": call.id, "content": result}],
            tools=functions, add_generation_prompt=True, tokenize=False) + "<think>\n"
        assert f"<tool_response>\n{result}\n</tool_response>" in text
        return len(tok.encode(text, add_special_tokens=False))

    assert answer.usage.input_tokens == rendered("Error: no station")
    assert client.messages.count_tokens(model=model, tools=TOOLS, messages=failed).input_tokens == rendered(
        "Error: no station")
    ok = answered({"content": "sunny"})
    assert client.messages.count_tokens(model=model, tools=TOOLS, messages=ok).input_tokens == rendered("sunny")
    forced = client.messages.count_tokens(model=model, tools=TOOLS, tool_choice={"type": "any"}, messages=ASK)
    assert forced.input_tokens == response.usage.input_tokens  # forced: the template closes the think block


def test_a_named_tool_streamed(client: anthropic.Anthropic, model: str):
    with client.messages.stream(model=model, max_tokens=200, tools=TOOLS, messages=ASK, extra_body=T1,
                                tool_choice={"type": "tool", "name": "search", "disable_parallel_tool_use": True}
                                ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    (call,) = check_tool_uses(final, only="search")
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, b.id, b.name, b.input) for b in starts] == [("tool_use", call.id, "search", {})]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [d.type for d in deltas] == ["input_json_delta"] and json.loads(deltas[0].partial_json) == call.input


def test_thinking_blocks_plain_streamed_and_switched_off(client: anthropic.Anthropic, model: str):
    kw = dict(model=model, max_tokens=8, messages=ASK, extra_body=T0)
    whole = client.messages.create(**kw)
    assert [b.type for b in whole.content] == ["thinking"] and whole.content[0].thinking
    with client.messages.stream(**kw) as stream:
        deltas = [e.delta.thinking for e in stream
                  if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert "".join(deltas) == whole.content[0].thinking and len(deltas) > 1  # streamed as generated
    off = client.messages.create(**kw, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text


@pytest.mark.parametrize("body, words", [
    (dict(tools=[{"name": "f", "input_schema": "an object"}]), "'tools[0].input_schema': expected an object"),
    (dict(tools=[{"name": "f", "input_schema": {"type": "string"}}]), '"type": "object"'),
    (dict(tools=[{"name": "get weather", "input_schema": {"type": "object"}}]), "'tools[0].name'"),
    (dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "server tools) are not supported"),
    (dict(tools=TOOLS, tool_choice={"type": "tool", "name": "nope"}),
     "'tool_choice.name': 'nope', which is not among the tools"),
    (dict(tool_choice={"type": "any"}), '"any" needs tools'),
    (dict(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
     "'messages[0].content[0].tool_use_id'"),
    (dict(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}]),
     "'messages[0].content[0].tool_use_id': 'toolu_1' is the id of no earlier tool_use"),
    (dict(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": ""}}]}]),
     "'messages[0].content[0].type': 'image' blocks are not supported"),
])
def test_bad_input_is_a_400_in_anthropics_shape(tools_up: Up, model: str, body: dict, words: str):
    """Both endpoints validate alike; the error is Anthropic's {"type": "error", "error": {...}}."""
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(f"{tools_up.url}{path}", json={"model": model, "max_tokens": 4, "messages": ASK, **body})
        assert r.status_code == 400, r.text
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
        assert words in error["error"]["message"], error

"""Anthropic's content blocks to the router's chat turns and back, without a server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from anthropic.lib.streaming._messages import accumulate_event

from services.gateway.anthropic_api import StreamedBlocks, content, prompt_fields, stop_reason
from services.gateway.errors import ApiError
from services.gateway.schemas import CountTokensRequest
from shared.messages import GenerateEvent, ToolCall

WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "clock", "input_schema": {"type": "object", "properties": {}}}


def fields(**body) -> dict:
    return prompt_fields(CountTokensRequest.model_validate({"model": "m", **body}))


def refused(**body) -> ApiError:
    with pytest.raises(ApiError) as e:
        fields(**body)
    assert e.value.status == 400
    return e.value


def test_a_tool_use_loop_becomes_calls_and_tool_turns_in_order():
    f = fields(system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "use tools"}], tools=[WEATHER],
               messages=[
                   {"role": "user", "content": "weather in Paris and Rome?"},
                   {"role": "assistant", "content": [
                       {"type": "thinking", "thinking": "two calls", "signature": "sig"},
                       {"type": "redacted_thinking", "data": "xyz"},
                       {"type": "text", "text": "Checking."},
                       {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                       {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}]},
                   {"role": "user", "content": [
                       {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                       {"type": "tool_result", "tool_use_id": "call_2", "is_error": True,
                        "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "station"}]},
                       {"type": "text", "text": "and tomorrow?"}]}])
    assert f["messages"] == [
        {"role": "system", "content": "be brief\n\nuse tools"},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "reasoning": "two calls", "tool_calls": [
            {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "Error: no\n\nstation"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert f["tools"] == [{"name": "get_weather", "description": "the weather in a city",
                           "parameters": WEATHER["input_schema"]}]
    assert (f["tool_choice"], f["tool_name"], f["parallel_tool_calls"]) == ("auto", None, True)
    assert "thinking" not in f


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, ("auto", None, True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ("required", None, False)),
    ({"type": "tool", "name": "clock"}, ("function", "clock", True)),
    ({"type": "none"}, ("none", None, True)),
])
def test_tool_choice(choice: dict, expected: tuple):
    f = fields(tools=[WEATHER, CLOCK], tool_choice=choice, messages=[{"role": "user", "content": "hi"}])
    assert (f["tool_choice"], f["tool_name"], f["parallel_tool_calls"]) == expected


@pytest.mark.parametrize(("thinking", "expected"), [
    ({"type": "enabled", "budget_tokens": 2048}, True), ({"type": "disabled"}, False), ({"type": "adaptive"}, None)])
def test_thinking_switch(thinking: dict, expected: bool | None):
    assert fields(thinking=thinking, messages=[{"role": "user", "content": "hi"}])["thinking"] is expected


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "words", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope', which is not among",
     "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, '"any" needs tools', "tool_choice"),
    ({"tool_choice": {"type": "tool", "name": "clock"}}, '"tool" needs tools', "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "same name", "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "1"}]}]},
     "no earlier tool_use", "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "'image' blocks are not supported", "messages[0].content[0].type"),
    ({"messages": [*HI, {"role": "assistant", "content": [{"type": "document", "source": {}}]}]},
     "'document' blocks are not supported", "messages[1].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
     "belong in assistant turns", "messages[0].content[0].type"),
    ({"messages": [*HI, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]},
     "belong in user turns", "messages[1].content[0].type"),
    ({"messages": [*HI, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "a"}]}]},
     "'server_tool_use' are not supported", "messages[1].content[0].type"),
    ({"messages": [
        *HI, {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                      "content": [{"type": "image", "source": {}}]}]}]},
     "'image' blocks are not supported in a tool_result", "messages[2].content[0].content[0].type"),
])
def test_bad_conversations_are_a_400_naming_the_place(body: dict, words: str, param: str):
    e = refused(**{"messages": HI, **body})
    assert e.message.startswith(f"Invalid '{param}': ") and words in e.message and e.param == param


def event(i: int, text: str = "", reasoning: str = "", calls: list[ToolCall] | None = None,
          finish: str | None = None) -> GenerateEvent:
    return GenerateEvent(request_id="r", index=i, text=text, reasoning=reasoning, tool_calls=calls,
                         finish_reason=finish, prompt_tokens=5, completion_tokens=i + 1)


PARIS = ToolCall(id="call_7", name="get_weather", arguments='{"city": "Paris"}')
ROME = ToolCall(id="call_8", name="get_weather", arguments='{"city": "Rome"}')
ANSWERS = {
    "thinking, text, two calls": [event(0, reasoning="hm"), event(1, reasoning=" ok"), event(2, text="Let me"),
                                  event(3, text=" look"), event(4, calls=[PARIS]),
                                  event(5, calls=[ROME], finish="tool_calls")],
    "whitespace before a call": [event(0, text="\n\n"), event(1, calls=[PARIS]),
                                 event(2, text=" ", finish="tool_calls")],
    "whitespace only, no call": [event(0, reasoning="hm"), event(1, text="\n"), event(2, finish="stop")],
    "nothing": [event(0, finish="length")],
    "thinking only": [event(0, reasoning="hm", finish="length")],
    "one event with all": [event(0, reasoning="a", text="b", calls=[PARIS, ROME], finish="tool_calls")],
}


def test_answers_come_back_as_blocks():
    assert content(ANSWERS["thinking, text, two calls"]) == [
        {"type": "thinking", "thinking": "hm ok", "signature": ""}, {"type": "text", "text": "Let me look"},
        {"type": "tool_use", "id": "call_7", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_8", "name": "get_weather", "input": {"city": "Rome"}}]
    assert [b["type"] for b in content(ANSWERS["whitespace before a call"])] == ["tool_use"]
    assert content(ANSWERS["whitespace only, no call"])[1] == {"type": "text", "text": "\n"}
    assert content(ANSWERS["nothing"]) == [{"type": "text", "text": ""}]
    assert content(ANSWERS["thinking only"]) == [{"type": "thinking", "thinking": "hm", "signature": ""}]
    assert stop_reason(ANSWERS["nothing"][-1]) == "max_tokens"
    assert stop_reason(ANSWERS["one event with all"][-1]) == "tool_use"


def test_a_tool_input_json_cannot_carry_is_a_400():
    """A lone surrogate or a 70-bit integer in a tool_use input would fail on the way to the router."""
    for value in ("\ud800", 2**70):
        with pytest.raises(ValidationError) as e:
            CountTokensRequest.model_validate({"model": "m", "messages": [*HI, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "a", "name": "f", "input": {"v": value}}]}]})
        assert "not encodable as JSON" in str(e.value)


def test_arguments_that_are_not_an_object_are_a_502_not_a_lost_call():
    with pytest.raises(ApiError) as e:
        content([event(0, calls=[ToolCall(id="c", name="f", arguments="[1]")], finish="tool_calls")])
    assert e.value.status == 502 and "'[1]'" in e.value.message


@pytest.mark.parametrize("name", list(ANSWERS))
def test_streamed_blocks_read_by_the_anthropic_client_give_the_same_content(name: str):
    """The SDK's own accumulator (what `messages.stream(...).get_final_message()` runs) rebuilds
    the non-streamed content from the events; indices count up from 0, each block opens and closes."""
    blocks = StreamedBlocks()
    out = [e for ev in ANSWERS[name] for e in blocks.event(ev)] + blocks.finish()
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                                  "content": [], "stop_reason": None, "stop_sequence": None,
                                                  "usage": {"input_tokens": 5, "output_tokens": 0}}}
    snapshot, bufs = None, {}
    for e in [start, *out]:
        snapshot = accumulate_event(event=e, current_snapshot=snapshot, json_bufs=bufs)
    assert [b.to_dict() for b in snapshot.content] == content(ANSWERS[name])
    opened = [e["index"] for e in out if e["type"] == "content_block_start"]
    closed = [e["index"] for e in out if e["type"] == "content_block_stop"]
    assert opened == closed == list(range(len(opened)))
    thinking_ends = [e["delta"]["type"] for e in out if e["type"] == "content_block_delta" and e["index"] == 0]
    if content(ANSWERS[name])[0]["type"] == "thinking":
        assert thinking_ends[-1] == "signature_delta"
    for e in out:
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta":
            assert json.loads(e["delta"]["partial_json"]) in ({"city": "Paris"}, {"city": "Rome"})

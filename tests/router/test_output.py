"""The splitter on scripted model text: answer, thinking and tool calls apart, whatever the
chunking; a call that does not parse comes back as text, never dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from services.router.output import Parts, Splitter, initial_state, machines
from shared.demo import save_bpe_tokenizer
from shared.messages import Tool

WEATHER = Tool(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bpe")
    out = {}
    for style in ("json_tools", "mistral"):
        save_bpe_tokenizer(root / style, style, 512)
        out[style] = load_tokenizer(root / style)
    return out


def run(tokenizer, text: str, chunk: int, tools: bool = True, initial: str = "normal") -> Parts:
    splitter = Splitter(machines(tokenizer)["tools" if tools else "chat"], tokenizer, [WEATHER] if tools else None, initial)
    total = Parts()
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for part in [splitter.feed(p) for p in pieces] + [splitter.finish()]:
        total.text += part.text
        total.reasoning += part.reasoning
        total.calls += part.calls
    return total


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_json_tools_call_thinking_and_text_apart(tokenizers, chunk):
    out = run(tokenizers["json_tools"], f"<think>which city?</think>Checking. {CALL}\n{CALL}", chunk)
    assert out.reasoning == "which city?"
    assert out.text == "Checking. \n"
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Paris"})] * 2
    assert len({c.id for c in out.calls}) == 2  # each call its own id


def test_thinking_opened_by_the_prompt(tokenizers):
    tok = tokenizers["json_tools"]
    prompt = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    assert initial_state(tok, prompt) == "reasoning"
    closed = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    assert initial_state(tok, closed) == "normal"
    out = run(tok, "let me see</think>It is 4.", 2, initial="reasoning")
    assert (out.reasoning, out.text) == ("let me see", "It is 4.")


@pytest.mark.parametrize("body", ['{"name": "get_weather", "arguments": {"city": ', "not json at all", ""])
def test_a_malformed_call_comes_back_as_text(tokenizers, body):
    text = f"Before <tool_call>\n{body}\n</tool_call> after"
    out = run(tokenizers["json_tools"], text, 4)
    assert out.calls == []
    assert out.text == text  # every character the model wrote, markers included


def test_a_call_cut_by_max_tokens_comes_back_as_text(tokenizers):
    text = '<tool_call>\n{"name": "get_weather", "argum'
    out = run(tokenizers["json_tools"], text, 5)
    assert out.calls == [] and out.text == text


def test_without_tools_markers_are_text(tokenizers):
    out = run(tokenizers["json_tools"], f"Hi {CALL}", 3, tools=False)
    assert out.calls == [] and out.text == f"Hi {CALL}"


@pytest.mark.parametrize("chunk", [1, 1000])
def test_mistral_calls_have_no_end_marker(tokenizers, chunk):
    text = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}get_weather[ARGS]{"city": "Oslo"}'
    out = run(tokenizers["mistral"], text, chunk)
    assert out.text == "Sure."
    assert [json.loads(c.arguments)["city"] for c in out.calls] == ["Paris", "Oslo"]


def test_mistral_malformed_call_is_text(tokenizers):
    text = "[TOOL_CALLS]get_weather[ARGS]{broken"
    out = run(tokenizers["mistral"], text, 3)
    assert out.calls == [] and out.text == text

"""Grammars without a model: random tokens the mask allows always spell what the request asked
for (a call in the model's own syntax, valid under its schema; JSON valid under the schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from services.router.constrain import Grammars, GrammarProcessor
from services.router.output import Parts, Splitter, machines
from shared.demo import save_bpe_tokenizer
from shared.errors import BadRequest
from shared.messages import GenerateRequest

WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
SEARCH = {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 10},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["query", "limit"], "additionalProperties": False}}
EXTRA = 16  # the model's logits are wider than the tokenizer, as many checkpoints' are


@pytest.fixture(scope="module")
def grammars(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bpe")
    out = {}
    for style in ("json_tools", "mistral"):
        n = save_bpe_tokenizer(root / style, style, 512)
        tok = load_tokenizer(root / style)
        out[style] = (Grammars(tok, n + EXTRA), tok)
    return out


def request(**fields) -> GenerateRequest:
    return GenerateRequest(request_id="r", stream="moebus.v1.stream.r", max_tokens=64,
                           messages=[{"role": "user", "content": "hi"}], **fields)


def sample(processor: GrammarProcessor, eos: set[int], seed: int, width: int, limit: int = 400) -> list[int]:
    """Random tokens under the processor's mask, as BatchGenerator would call it."""
    rng = np.random.default_rng(seed)
    tokens = [7, 8, 9]  # the prompt: the first call must not consume it
    for _ in range(limit):
        logits = processor(mx.array(tokens), mx.zeros((1, width)))
        allowed = np.flatnonzero(np.isfinite(np.array(logits[0])))
        assert len(allowed) > 0
        token = int(rng.choice(allowed))
        tokens.append(token)
        if token in eos:
            processor(mx.array(tokens), mx.zeros((1, width)))  # one more step after EOS is tolerated
            assert processor.error is None
            return tokens[3:-1]
    raise AssertionError("the grammar never let the sequence end")


def split(tok, ids: list[int]) -> Parts:
    splitter = Splitter(machines(tok)["tools"], tok, None, "normal")
    first, last = splitter.feed(tok.decode(ids)), splitter.finish()
    return Parts(first.text + last.text, first.reasoning + last.reasoning, first.calls + last.calls)


@pytest.mark.parametrize("style", ["json_tools", "mistral"])
@pytest.mark.parametrize("choice", ["required", "function"])
def test_forced_calls_parse_and_validate(grammars, style, choice):
    g, tok = grammars[style]
    schemas = {t["name"]: t["parameters"] for t in (WEATHER, SEARCH)}
    seen = set()
    for seed in range(6):
        req = request(tools=[WEATHER, SEARCH], tool_choice=choice,
                      tool_name="search" if choice == "function" else None, parallel_tool_calls=seed % 2 == 0)
        out = split(tok, sample(g.compile(req), set(g.eos), seed, g.vocab_size))
        assert out.calls, out.text
        assert out.text.strip() == ""
        assert len(out.calls) == 1 or req.parallel_tool_calls
        for call in out.calls:
            assert choice == "required" or call.name == "search"
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            seen.add(call.name)
    assert choice == "function" or seen == {"get_weather", "search"}  # the grammar offers every tool


SCHEMAS = [
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -3, "maximum": 3},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["n", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                      "note": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
     "required": ["code", "note"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_validates(grammars, schema):
    g, tok = grammars["json_tools"]
    for seed in range(4):
        proc = g.compile(request(response_format={"type": "json_schema", "json_schema": schema}))
        jsonschema.validate(json.loads(tok.decode(sample(proc, set(g.eos), seed, g.vocab_size))), schema)


def test_json_object(grammars):
    g, tok = grammars["json_tools"]
    proc = g.compile(request(response_format={"type": "json_object"}))
    text = tok.decode(sample(proc, set(g.eos), 0, g.vocab_size, limit=3000))
    assert isinstance(json.loads(text), dict)


def test_free_requests_have_no_processor(grammars):
    g, _ = grammars["json_tools"]
    assert g.compile(request()) is None
    assert g.compile(request(tools=[WEATHER])) is None  # auto: the model decides


@pytest.mark.parametrize("fields, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}), "response_format", "strin"),
    (dict(response_format={"type": "json_schema", "json_schema": {"type": "string", "pattern": "("}}),
     "response_format", "regex"),
    (dict(tools=[WEATHER], tool_choice="function", tool_name="nope"), "tool_choice", "nope"),
    (dict(tools=[{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 5}}}}]),
     "tools.0.parameters", "'f'"),
    (dict(tools=[{"name": "f", "parameters": {"type": "string"}}]), "tools.0.parameters", "type object"),
])
def test_bad_schemas_are_bad_requests(grammars, fields, param, words):
    g, _ = grammars["json_tools"]
    with pytest.raises(BadRequest) as e:
        g.compile(request(**fields))
    assert e.value.param == param
    assert words in str(e.value)


def test_a_token_the_grammar_refuses_ends_the_sequence_with_the_reason(grammars):
    """Never a mask that allows nothing (sampling from all -inf): only EOS, and an error to report."""
    g, tok = grammars["json_tools"]
    proc = g.compile(request(response_format={"type": "json_object"}))
    width = g.vocab_size
    proc(mx.array([5]), mx.zeros((1, width)))
    logits = proc(mx.array([5, tok.encode("]", add_special_tokens=False)[0]]), mx.zeros((1, width)))
    assert proc.error
    assert np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist() == g.eos

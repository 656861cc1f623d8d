"""The byte-level BPE tokenizers of the demo and the tool checkpoints: any text and JSON spell
and come back, the markers are single tokens that stay in the text, and mlx-lm reads the chat
templates' tool calls with the parser it infers from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.demo import BPE_STYLES, DEMO_NAME, bpe_special_ids, ensure_demo_model, save_bpe_tokenizer
from tests.checkpoints import MAX_POS, mlx_lm_greedy, reference_greedy

STYLES = ("json_tools", "mistral")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ARGS = {"city": "Zürich \"old town\"", "days": [1, 2.5, None, True], "opts": {"unit": "celsius", "x": {}}}


def _call(name: str, arguments: Any, call_id: str = "c1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "I should call it.",
     "tool_calls": [_call("get_weather", {"city": "Paris"}), _call("get_weather", '{"city": "Lyon"}', "c2")]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"t": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": "18"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "And now?"},
]
TOOLS_JSON = json.dumps(TOOLS)  # as transformers' tojson writes it: ", " and ": ", keys in order
RENDERED = {
    "json_tools": (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{json.dumps(TOOLS[0])}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI should call it.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"t": 21}\n</tool_response>\n<tool_response>\n18\n</tool_response>'
        "<|im_end|>\n<|im_start|>assistant\nSunny.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "mistral": (
        '<s>[INST]Weather in Paris?[/INST][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}</s>'
        '[TOOL_RESULTS]{"content": "{\\"t\\": 21}", "call_id": "c1"}[/TOOL_RESULTS]'
        '[TOOL_RESULTS]{"content": "18", "call_id": "c2"}[/TOOL_RESULTS]Sunny.</s>'
        f"[AVAILABLE_TOOLS]{TOOLS_JSON}[/AVAILABLE_TOOLS][INST]Be brief.\n\nAnd now?[/INST]"
    ),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bpe")
    for style in STYLES:
        save_bpe_tokenizer(root / style, style, MAX_POS)
    return {style: root / style for style in STYLES}


@pytest.fixture(scope="module")
def wrappers(saved: dict[str, Path]) -> dict[str, Any]:
    from mlx_lm.utils import load_tokenizer

    return {style: load_tokenizer(path) for style, path in saved.items()}


@pytest.mark.parametrize("style", STYLES)
def test_training_twice_gives_the_same_tokenizer(saved: dict[str, Path], tmp_path: Path, style: str):
    size = save_bpe_tokenizer(tmp_path, style, MAX_POS)
    assert (tmp_path / "tokenizer.json").read_bytes() == (saved[style] / "tokenizer.json").read_bytes()
    assert (tmp_path / "tokenizer_config.json").read_bytes() == (saved[style] / "tokenizer_config.json").read_bytes()
    assert 600 <= size <= 1000


@pytest.mark.parametrize("style", STYLES)
def test_transformers_loads_it_with_its_special_tokens_first(saved: dict[str, Path], style: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(saved[style]))
    special = BPE_STYLES[style]["special"]
    assert tok.convert_ids_to_tokens(list(range(len(special)))) == list(special)
    ids = bpe_special_ids(style)
    assert tok.eos_token_id == ids["eos"] and tok.eos_token == BPE_STYLES[style]["eos"]
    assert tok.bos_token_id == ids["bos"] and tok.pad_token_id == ids["pad"]
    assert tok.chat_template == BPE_STYLES[style]["template"]


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60), value=JSON_VALUES)
def test_any_text_and_json_round_trip(wrappers: dict[str, Any], text: str, value: Any):
    for tok in wrappers.values():
        for s in (text, json.dumps(value), json.dumps(value, ensure_ascii=False, separators=(",", ":"))):
            ids = tok.encode(s, add_special_tokens=False)
            assert tok.decode(ids) == s
            assert tok.unk_token_id not in ids  # every byte has a token: nothing is unknown


@pytest.mark.parametrize("style", STYLES)
def test_round_trip_by_example(wrappers: dict[str, Any], style: str):
    tok = wrappers[style]
    for s in ['{"name": "x", "arguments": {"a": 1, "b": [true, null]}}', "héllo wörld — 日本語 🎉\n\ttab\r\n",
              "  two  spaces, \x00 and \x7f", "the river runs to the sea."]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


@pytest.mark.parametrize("style", STYLES)
def test_markers_are_single_tokens_that_stay_in_the_text(wrappers: dict[str, Any], style: str):
    tok = wrappers[style]
    learned = len(tok) - len(BPE_STYLES[style]["markers"])
    for marker in BPE_STYLES[style]["markers"]:
        ids = tok.encode(f"a{marker}b", add_special_tokens=False)
        assert len(tok.encode(marker, add_special_tokens=False)) == 1 and tok.convert_tokens_to_ids(marker) in ids
        assert tok.convert_tokens_to_ids(marker) >= learned  # added after the learned vocabulary
        assert tok.decode(ids, skip_special_tokens=True) == f"a{marker}b"
    for special in BPE_STYLES[style]["special"]:
        ids = tok.encode(f"a{special}b", add_special_tokens=False)
        assert len(ids) == 3 and tok.decode(ids, skip_special_tokens=True) == "ab"


def test_mlx_lm_infers_the_json_tools_parser_and_thinking(wrappers: dict[str, Any]):
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    tok = wrappers["json_tools"]
    assert _infer_tool_parser(tok._tokenizer) == "json_tools"
    assert tok.has_tool_calling and (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert tok.has_thinking and (tok.think_start, tok.think_end) == ("<think>", "</think>")
    assert tok.think_start_id == tok.convert_tokens_to_ids("<think>")
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}


def test_mlx_lm_infers_the_mistral_parser_and_no_thinking(wrappers: dict[str, Any]):
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    tok = wrappers["mistral"]
    assert _infer_tool_parser(tok._tokenizer) == "mistral"
    assert tok.has_tool_calling and (tok.tool_call_start, tok.tool_call_end) == ("[TOOL_CALLS]", "")
    assert tok.tool_call_start_tokens == (tok.convert_tokens_to_ids("[TOOL_CALLS]"),)
    assert not tok.has_thinking
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("</s>")}


@pytest.mark.parametrize("style", STYLES)
def test_the_template_renders_tools_calls_and_results(wrappers: dict[str, Any], style: str):
    text = wrappers[style].apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED[style]


def test_json_tools_thinking_switch_in_the_generation_prompt(wrappers: dict[str, Any]):
    tok = wrappers["json_tools"]
    ask = [{"role": "user", "content": "hi"}]
    on = tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


def _cut_calls(tok: Any, answer: str) -> list[str]:
    """The texts a server hands the tool parser: after each start marker, up to its end marker
    (mistral has none: up to the end of the turn)."""
    end = tok.tool_call_end or tok.eos_token
    return [part.split(end)[0] for part in answer.split(tok.tool_call_start)[1:]]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "json-text"])
def test_the_parser_reads_back_what_the_template_wrote(wrappers: dict[str, Any], style: str, as_text: bool):
    tok = wrappers[style]
    calls = [("get_weather", ARGS), ("lookup", {"q": "日本 <b>", "n": -3})]
    turn = {"role": "assistant", "content": None, "tool_calls": [
        _call(name, json.dumps(args, ensure_ascii=False) if as_text else args, f"c{i}")
        for i, (name, args) in enumerate(calls)]}
    ask = [{"role": "user", "content": "go"}]
    prompt = tok.apply_chat_template(ask, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*ask, turn], tools=TOOLS, tokenize=False)
    assert full.startswith(prompt)
    answer = full[len(prompt):]  # what the model would have written
    cut = _cut_calls(tok, answer)
    assert len(cut) == 2, answer
    expected = [{"name": n, "arguments": a} for n, a in calls]
    assert [tok.tool_parser(c, TOOLS) for c in cut] == expected
    if style == "mistral":  # no end marker: a server may hand over all the calls at once
        assert tok.tool_parser(answer.removeprefix("[TOOL_CALLS]").removesuffix("</s>"), TOOLS) == expected
    ids = tok.encode(answer, add_special_tokens=False)  # the calls spell in tokens, markers single
    assert ids.count(tok.tool_call_start_tokens[0]) == 2 and tok.decode(ids) == answer


@pytest.mark.parametrize("style", STYLES)
def test_tool_checkpoints_load_in_both_frameworks_and_never_pick_eos(tool_checkpoints: dict[str, Path],
                                                                       style: str):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = tool_checkpoints[style]
    cfg = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    assert cfg["vocab_size"] == len(tok) and cfg["eos_token_id"] == tok.eos_token_id == bpe_special_ids(style)["eos"]
    n_special = len(BPE_STYLES[style]["special"])
    with safe_open(path / "model.safetensors", "np") as f:
        head = f.get_tensor("lm_head.weight")
    assert head.shape[0] == len(tok) and not head[:n_special].any() and head[n_special:].any(axis=1).all()
    prompt = tok.apply_chat_template([{"role": "user", "content": "the river"}], tools=TOOLS,
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = reference_greedy(path, prompt, 12)
    assert len(ref) == 12 and min(ref) >= n_special  # zero logits: specials, EOS too, never win
    assert mlx_lm_greedy(path, prompt, 12) == ref


def test_the_demo_model_has_tools_json_and_thinking(tmp_path: Path):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    path = ensure_demo_model(tmp_path)
    assert path.name == DEMO_NAME and ensure_demo_model(tmp_path) == path  # made once, then found
    model, tok = load(str(path))
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>" and tok.has_thinking
    assert json.loads((path / "config.json").read_text())["vocab_size"] == len(tok)
    assert tok.decode(tok.encode('{"a": [1, "é"]}', add_special_tokens=False)) == '{"a": [1, "é"]}'
    prompt = tok.apply_chat_template([{"role": "user", "content": "the river"}], add_generation_prompt=True)
    out = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=24,
                                              sampler=lambda lp: mx.argmax(lp, axis=-1))]
    text = tok.decode(out)
    assert len(out) == 24 and not set(out) & tok.eos_token_ids
    assert text.isprintable() and "\ufffd" not in text, repr(text)  # greedy writes no stray bytes

"""Prompt reuse on a plain mlx-lm model (no bus): the same greedy tokens as transformers on a cold
start, for every family, alone and in both micro-batches; the byte budget and the eviction order."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm import load

from services.router.engine import Engine, EngineLimits
from services.router.prompt_cache import PromptCache
from shared.messages import GenerateEvent, GenerateRequest
from tests.checkpoints import FAMILIES, reference_greedy

PROMPT = [8, 30, 51, 77, 12, 100, 9, 250, 4]
NEW = 6


def _req(rid: str, max_tokens: int = NEW) -> GenerateRequest:
    return GenerateRequest(request_id=rid, stream=f"moebus.v1.stream.{rid}", max_tokens=max_tokens, temperature=0.0)


def run(engine: Engine, events: list, prompts: dict[str, list[int]]) -> dict[str, tuple[list[int], int]]:
    """{request id: (tokens, cached prompt tokens)} once every one has finished."""
    events.clear()
    for rid, prompt in prompts.items():
        engine.add(_req(rid), prompt)
    for _ in range(200):
        if not engine.step():
            break
    out: dict[str, tuple[list[int], int]] = {}
    for _, e in events:
        tokens, _ = out.get(e.request_id, ([], 0))
        assert e.error is None, e.error
        out[e.request_id] = (tokens + ([e.token] if e.token is not None else []), e.cached_tokens)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefixes_give_the_cold_tokens(family: str, checkpoints: dict[str, Path]):
    path = checkpoints[family]
    model, tokenizer = load(str(path))
    events: list[tuple[str, GenerateEvent]] = []
    cache = PromptCache(1 << 30)
    engine = Engine(model, tokenizer, EngineLimits(max_running=16), events.extend, prompt_cache=cache)
    first = reference_greedy(path, PROMPT, NEW)
    # A second turn: the first turn's prompt and answer, then new tokens.
    turn2 = PROMPT + first + [13, 14, 15]
    second = reference_greedy(path, turn2, NEW)
    shorter = PROMPT[:5] + [200, 201]  # shares only a prefix with what is cached
    third = reference_greedy(path, shorter, NEW)

    assert run(engine, events, {"cold": PROMPT}) == {"cold": (first, 0)}
    assert run(engine, events, {"again": PROMPT}) == {"again": (first, len(PROMPT) - 1)}  # all but the last
    assert run(engine, events, {"turn2": turn2}) == {"turn2": (second, len(PROMPT) + NEW)}  # prompt and answer
    assert run(engine, events, {"prefix": shorter}) == {"prefix": (third, 5)}
    # 12 at once: both micro-batches (two threads) take from the one cache
    together = run(engine, events, {f"r{i}": [PROMPT, turn2, shorter][i % 3] for i in range(12)})
    assert [together[f"r{i}"][0] for i in range(12)] == [[first, second, third][i % 3] for i in range(12)]
    assert all(cached > 0 for _, cached in together.values())
    assert all(len(lane.seqs) == 0 for lane in engine.lanes) and min(lane.steps for lane in engine.lanes) > 0
    assert cache.hits >= 15 and cache.misses == 1
    engine.close()


def test_the_byte_budget_holds_and_the_least_recently_used_goes_first(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    probe = PromptCache(1 << 30)
    engine = Engine(model, tokenizer, EngineLimits(max_running=4), events.extend, prompt_cache=probe)
    run(engine, events, {"probe": [20, 21, 22, 23]})
    one = probe.nbytes  # one short sequence's cache
    assert one > 0
    cache = PromptCache(int(2.5 * one))  # room for two such
    engine.prompt_cache = cache
    prompts = {k: [k_id, 21, 22, 23] for k, k_id in (("a", 30), ("b", 31), ("c", 32))}
    run(engine, events, {"a": prompts["a"]})
    run(engine, events, {"b": prompts["b"]})
    assert run(engine, events, {"a2": prompts["a"]})["a2"][1] > 0  # a is used again: b is now the oldest
    run(engine, events, {"c": prompts["c"]})  # over the budget: b goes
    assert cache.nbytes <= cache.max_bytes
    assert run(engine, events, {"b2": prompts["b"]})["b2"][1] == 0
    assert run(engine, events, {"c2": prompts["c"]})["c2"][1] > 0
    # A load of distinct longer prompts, 4 at a time: the budget holds after every batch.
    for k in range(5):
        run(engine, events, {f"long{k}-{j}": [40 + 4 * k + j] + list(range(50, 80)) for j in range(4)})
        assert 0 < cache.nbytes <= cache.max_bytes
    engine.close()

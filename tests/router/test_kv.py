"""KV memory: the per-token size against mlx-lm's own caches, the budget, and the engine holding it."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from services.cli import parse_size, parser
from services.router.engine import Engine, EngineLimits
from services.router.kv import SLACK, KVBudget, KVSize, _from_config, kv_size, lane_bytes
from shared.errors import ConfigError
from shared.messages import GenerateEvent, GenerateRequest
from tests.checkpoints import FAMILIES


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_per_token_size_is_what_mlx_lm_caches_hold(checkpoints: dict[str, Path], family: str, dtype: str):
    model, _ = load(str(checkpoints[family]))
    model.set_dtype(getattr(mx, dtype))  # the cache takes the activations' dtype: a fixed 2 or 4 bytes is wrong once
    config = json.loads((checkpoints[family] / "config.json").read_text())
    size = kv_size(model, config)
    for tokens in (256, 300):  # one allocation step exactly; then the logical size within the next
        cache = make_prompt_cache(model)
        if dtype == "float32":  # the whole model, as a batch runs it
            model(mx.array([[8 + i % 300 for i in range(tokens)]]), cache=cache)
        else:  # MLX's CPU gather_mm (the experts) is float32 only: the attention layers alone fill the cache
            for layer, c in zip(model.layers, cache):
                attention = layer.norm_attn_norm.attn if family == "dbrx" else layer.self_attn
                attention(mx.zeros((1, tokens, config.get("d_model") or config["hidden_size"]), mx.bfloat16), cache=c)
        mx.eval([c.state for c in cache])
        logical = sum(c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes for c in cache)
        assert size.bytes_for(tokens) == logical
        if tokens == 256:
            assert sum(c.nbytes for c in cache) == logical  # at a step boundary, what is allocated too
    if dtype == "float32":  # the checkpoints' own dtype: the config alone gives the same
        assert _from_config(config) == size


def test_a_sequence_reserves_what_mlx_lm_allocates_for_its_lane():
    size = KVSize(((10, None),))  # 10 bytes a token
    assert lane_bytes(size, []) == 0 and lane_bytes(size, [40]) == 10 * (40 + SLACK)
    assert lane_bytes(size, [40, 200, 7]) == 3 * 10 * (200 + SLACK)  # every row as long as the longest
    kv = KVBudget(size, budget=10_000, max_context=300)
    one = lambda tokens: 10 * (tokens + SLACK)  # noqa: E731 - a row of `tokens`, as allocated
    assert kv.reserve("a", 0, 20, 20) and kv.in_use == one(40)
    # A long one costs its own row and the growth of every row it joins: less in an empty lane.
    assert kv.cost(0, 100, 100) == 2 * one(200) - one(40) and kv.cost(1, 100, 100) == one(200)
    assert kv.reserve("b", 0, 100, 100) and kv.in_use == 2 * one(200) <= 10_000
    assert not kv.reserve("c", 1, 1, 10)  # one(11) more would pass 10,000
    assert "c" not in kv.reserved and kv.in_use == 2 * one(200)
    kv.release("b")
    kv.release("b")  # twice, or never reserved: nothing more is freed
    kv.release("never")
    assert kv.in_use == one(40) and kv.in_use_max == 2 * one(200) and kv.reserved == {"a": 40}
    assert kv.reserve("c", 1, 1, 10) and kv.in_use == one(40) + one(11)
    assert kv.need(50, 1000) == 10 * (300 + SLACK)  # the context ends a sequence before its max_tokens


def test_a_request_that_could_never_fit_is_told_how_many_tokens_would():
    kv = KVBudget(KVSize(((16, None), (16, None))), budget=32 * (100 + SLACK), max_context=4096)  # 100 tokens fit
    assert kv.refusal(40, 60) is None
    e = kv.refusal(40, 61)
    assert e is not None and e.param == "max_tokens"
    assert str(e) == (f"this request needs {32 * (101 + SLACK)} bytes of KV cache (40 prompt + 61 max_tokens tokens, "
                      f"and the {SLACK} more its cache can hold, at 32 bytes each); the budget is {32 * (100 + SLACK)} "
                      f"bytes (--kv-budget): at most 100 tokens fit")
    too_long = kv.refusal(120, 1)
    assert too_long is not None and too_long.param is None  # a shorter max_tokens would not help


def test_a_sliding_window_layer_stops_growing_at_its_size():
    size = KVSize(((8, None), (8, 4)))
    assert size.per_token == 16 and size.bytes_for(10) == 80 + 32
    assert size.tokens_within(112) == 10 and size.tokens_within(111) == 9 and size.tokens_within(0) == 0


def test_a_kv_budget_is_a_size_and_a_bad_one_is_refused_before_anything_starts():
    assert parse_size("8GiB", "--kv-budget") == 8 << 30 and parse_size("512MiB") == 512 << 20
    a = parser().parse_args(["up", "--kv-budget", "lots"])
    with pytest.raises(ConfigError) as e:
        a.fn(a)
    assert str(e.value) == "--kv-budget 'lots': give bytes, or a size such as 2G or 512M"


def _run(engine: Engine) -> None:
    for _ in range(200):  # bounded: a sequence that never gets its bytes must fail the test, not hang it
        if not engine.step():
            return


def _req(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=rid, stream=f"moebus.v1.stream.{rid}", max_tokens=max_tokens, temperature=0.0)


def test_the_engine_starts_a_sequence_only_when_its_kv_fits_beside_the_running_ones(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    config = json.loads((checkpoints["mixtral"] / "config.json").read_text())
    prompts = {f"r{i}": [8 + i, 20 + i, 40 + i] for i in range(5)}
    alone: dict[str, str] = {}
    for rid, p in prompts.items():
        events: list[tuple[str, GenerateEvent]] = []
        engine = Engine(model, tokenizer, EngineLimits(micro_batches=1), events.extend)
        engine.add(_req(rid, 6), p)
        _run(engine)
        alone[rid] = "".join(e.text for _, e in events)

    events = []
    engine = Engine(model, tokenizer, EngineLimits(max_running=8, micro_batches=1), events.extend)
    size = kv_size(model, config)
    engine.kv = KVBudget(size, budget=lane_bytes(size, [3 + 6, 3 + 6]))  # two of them at once
    for rid, p in prompts.items():
        engine.add(_req(rid, 6), p)
    engine.cancel("r4")  # still queued: it never held any
    seen: list[int] = []
    for _ in range(200):
        running = sum(len(lane.seqs) for lane in engine.lanes)
        assert running <= 2 and engine.kv.in_use <= engine.kv.budget
        seen.append(running)
        if not engine.step():
            break
    by_id: dict[str, list[GenerateEvent]] = {}
    for _, e in events:
        by_id.setdefault(e.request_id, []).append(e)
    assert by_id["r4"][-1].finish_reason == "error"
    for rid in ("r0", "r1", "r2", "r3"):  # each waited its turn, then ran as it does alone
        assert by_id[rid][-1].finish_reason == "length" and by_id[rid][-1].completion_tokens == 6
        assert "".join(e.text for e in by_id[rid]) == alone[rid]
    assert max(seen) == 2 and engine.kv.in_use_max == engine.kv.budget  # the budget, not one at a time
    assert engine.kv.in_use == 0 and not engine.kv.reserved and not engine.queue


def test_a_running_sequence_cancelled_gives_its_bytes_to_the_next(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(micro_batches=1), events.extend)
    size = kv_size(model, json.loads((checkpoints["mixtral"] / "config.json").read_text()))
    engine.kv = KVBudget(size, budget=lane_bytes(size, [3 + 50]))  # one at a time
    engine.add(_req("long", 50), [8, 9, 10])
    engine.add(_req("next", 3), [11, 12, 13])
    engine.step()
    assert list(engine.uids) == ["long"] and [s.req.request_id for s in engine.queue] == ["next"]
    engine.cancel("long")
    _run(engine)
    ends = {e.request_id: e.finish_reason for _, e in events if e.finish_reason}
    assert ends == {"long": "error", "next": "length"} and engine.kv.in_use == 0


BESIDES = 64 << 10  # besides the KV caches, a step keeps each row's last tokens and logprobs: a few KiB


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_memory_mlx_holds_between_steps_is_within_the_reservations(checkpoints: dict[str, Path],
                                                                         micro_batches: int):
    """Measured, not computed: sequences of very different lengths leave a lane while others run,
    which is when mlx-lm's batch keeps the longer arrays they were padded to."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    size = kv_size(model, json.loads((checkpoints["mixtral"] / "config.json").read_text()))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(max_running=6, micro_batches=micro_batches), events.extend)
    engine.kv = KVBudget(size, budget=5 * lane_bytes(size, [300]))
    engine.add(_req("warm", 2), [8, 9, 10])
    _run(engine)
    mx.clear_cache()
    base = mx.get_active_memory()
    lengths = [(300, 20), (5, 200), (40, 3), (250, 60), (5, 5), (120, 120), (8, 150), (200, 10)] * 2
    for i, (prompt, max_tokens) in enumerate(lengths):
        engine.add(_req(f"r{i}", max_tokens), [8 + (i * 7 + j) % 300 for j in range(prompt)])
    over: list[int] = []
    for _ in range(2000):
        more = engine.step()
        assert engine.kv.in_use <= engine.kv.budget
        over.append(mx.get_active_memory() - base - engine.kv.in_use)
        if not more:
            break
    ends = [e for _, e in events if e.finish_reason and e.request_id != "warm"]
    assert len(ends) == len(lengths) and all(e.finish_reason == "length" for e in ends)
    assert engine.kv.in_use_max > 3 * lane_bytes(size, [300])  # several ran at once, long beside short
    assert max(over) <= BESIDES, max(over)

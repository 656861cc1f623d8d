"""The batching engine on a plain mlx-lm model (no bus): finishing, stopping, cancelling."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load

from services.router import engine as engine_module
from services.router.engine import Engine, EngineLimits, pick_lane
from shared.messages import GenerateEvent, GenerateRequest
from tests.checkpoints import BOS_ID, PAD_ID, UNK_ID


def _req(rid: str, **kw) -> GenerateRequest:
    kw.setdefault("temperature", 0.0)
    return GenerateRequest(request_id=rid, stream=f"moebus.v1.stream.{rid}", max_tokens=kw.pop("max_tokens", 5), **kw)


def _run(engine: Engine) -> None:
    for _ in range(100):
        if not engine.step():
            return


def test_sequences_finish_and_cancels_before_start_are_honoured(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(max_running=4, max_waiting=4), events.extend)
    engine.cancel("early")  # the gateway gave up before the router added it
    engine.add(_req("early"), [8, 9, 10])
    engine.add(_req("a"), [8, 9, 10])
    engine.add(_req("b", max_tokens=3), [11, 12])
    _run(engine)
    by_id: dict[str, list[GenerateEvent]] = {}
    for _, e in events:
        by_id.setdefault(e.request_id, []).append(e)
    assert [e.finish_reason for e in by_id["early"]] == ["error"]
    assert by_id["a"][-1].finish_reason == "length" and by_id["a"][-1].completion_tokens == 5
    assert by_id["b"][-1].completion_tokens == 3 and [e.index for e in by_id["b"]] == [0, 1, 2]
    assert engine.running == engine.waiting == 0 and not engine.seqs


def test_a_stop_string_ends_the_sequence_and_frees_its_slot(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(), events.extend)
    engine.add(_req("full", max_tokens=8), [8, 9, 10])
    _run(engine)
    text = "".join(e.text for _, e in events)
    stop = f" {text.split()[2]} "
    events.clear()
    engine.add(_req("cut", max_tokens=8, stop=[stop]), [8, 9, 10])
    _run(engine)
    assert "".join(e.text for _, e in events) == text[: text.index(stop)]
    assert events[-1][1].stop_sequence == stop and not engine.seqs


def test_two_lanes_split_the_batch_and_give_the_same_greedy_tokens(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    prompts = [[8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    texts = []
    for lanes in (1, 2):
        events: list[tuple[str, GenerateEvent]] = []
        engine = Engine(model, tokenizer, EngineLimits(micro_batches=lanes, split_at=2), events.extend)
        for i, p in enumerate(prompts):
            engine.add(_req(f"r{i}", max_tokens=6), p)
        engine.step()
        assert [len(lane.seqs) for lane in engine.lanes] == ([4] if lanes == 1 else [2, 2])
        _run(engine)
        engine.close()
        texts.append({rid: "".join(e.text for s, e in events if e.request_id == rid) for rid in map("r{}".format, range(4))})
    assert texts[0] == texts[1] and all(texts[0].values())


def test_small_batches_stay_whole_and_large_ones_split_evenly():
    caps = [8, 8]
    assert pick_lane([0, 0], caps, split_at=8) == 0
    assert pick_lane([5, 0], caps, split_at=8) == 0  # 6 in all: still one batch
    assert pick_lane([0, 3], caps, split_at=8) == 1  # lane 0 emptied: join the running batch
    assert pick_lane([7, 0], caps, split_at=8) == 1  # the 8th opens the second lane
    assert pick_lane([5, 4], caps, split_at=8) == 1
    assert pick_lane([4, 4], caps, split_at=8) == 0
    assert pick_lane([0, 0], caps, split_at=8, coming=8) == 0  # a burst of 8 opens both lanes...
    assert pick_lane([1, 0], caps, split_at=8, coming=7) == 1  # ...and alternates
    assert pick_lane([1, 0], caps, split_at=8, coming=6) == 0  # 7 in all: one batch


def test_a_burst_is_split_evenly_even_when_its_first_sequence_started_alone(checkpoints: dict[str, Path]):
    """Sequences cannot change lanes once in one: 8 arriving one by one must not end up 7 and 1
    (one lane then does almost all the work while the other's bus waits overlap little)."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    engine = Engine(model, tokenizer, EngineLimits(max_running=16), lambda out: None)
    engine.add(_req("first", max_tokens=20), [8, 9])
    engine.step()  # it started alone, the rest of the burst arrived during its step
    for i in range(7):
        engine.add(_req(f"r{i}", max_tokens=20), [10 + i, 9])
    engine.step()
    assert [len(lane.seqs) for lane in engine.lanes] == [4, 4]
    fresh = Engine(model, tokenizer, EngineLimits(max_running=16), lambda out: None)
    for i in range(5):  # fewer than split_at in all: one batch
        fresh.add(_req(f"t{i}", max_tokens=3), [20 + i])
    fresh.step()
    assert [len(lane.seqs) for lane in fresh.lanes] == [5, 0]
    engine.close()
    fresh.close()


def test_a_full_lane_never_leaves_the_other_idle():
    assert pick_lane([4, 0], [4, 4], split_at=8) == 1  # --max-running 8: lane 0 decodes 4 at most
    assert pick_lane([5, 4], [5, 4], split_at=16) == 0  # both full: queue where it is least behind
    assert pick_lane([6, 4], [5, 4], split_at=16) == 1


def test_lanes_share_max_running_exactly(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    for running, caps in ((1, [1]), (3, [2, 1]), (8, [4, 4])):
        engine = Engine(model, tokenizer, EngineLimits(max_running=running), lambda out: None)
        assert [lane.cap for lane in engine.lanes] == caps
        engine.close()


def test_a_failure_outside_the_model_ends_that_lanes_sequences_with_an_error(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(split_at=2), events.extend)
    for i in range(4):
        engine.add(_req(f"r{i}", max_tokens=6), [8 + i, 9])
    engine.step()  # they join their lanes and prefill
    broken = engine.lanes[1]
    broken_ids = {s.req.request_id for s in broken.seqs.values()}

    def explode(*_: object) -> None:
        raise ValueError("detokenizer broke")

    for seq in broken.seqs.values():
        seq.detok.add_token = explode
    _run(engine)
    engine.close()
    last = {e.request_id: e for _, e in events}
    assert {r for r, e in last.items() if e.finish_reason == "error"} == broken_ids
    assert all("detokenizer broke" in last[r].error for r in broken_ids)
    assert all(last[r].finish_reason == "length" for r in last.keys() - broken_ids)
    assert engine.running == engine.waiting == 0


def test_running_never_exceeds_max_running(checkpoints: dict[str, Path]):
    """Long prompts prefilled a few tokens per step keep mlx-lm's prompt batch busy; a lane
    must still never decode more than its share of --max-running."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(max_running=4, prefill_step=2, split_at=2), events.extend)
    for i in range(12):
        engine.add(_req(f"r{i}", max_tokens=3 + i % 4), [8 + i % 5] * (3 + 2 * (i % 4)))
    peak = 0
    for _ in range(200):
        busy = engine.step()
        peak = max(peak, engine.running)
        assert all(len(lane.seqs) <= lane.cap for lane in engine.lanes)
        if not busy:
            break
    engine.close()
    assert 2 <= peak <= 4  # busy, never over
    assert peak <= engine.running_max == 4  # the high-water mark sees prefilling sequences that `running` does not
    finished = [e for _, e in events if e.finish_reason]
    assert len(finished) == 12 and all(e.finish_reason == "length" for e in finished)


def test_the_context_ends_a_sequence_with_length(checkpoints: dict[str, Path]):
    model, tokenizer = load(str(checkpoints["mixtral"]))
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(), events.extend, max_context=9)
    engine.add(_req("long", max_tokens=300), [8, 9, 10, 11, 12, 13])
    _run(engine)
    engine.close()
    last = events[-1][1]
    assert last.finish_reason == "length" and last.completion_tokens == 3


def test_special_tokens_are_generated_and_counted_but_never_in_the_text(checkpoints: dict[str, Path],
                                                                        monkeypatch: pytest.MonkeyPatch):
    """The demo showed "who on <s> another winter": a sampled <s> or <pad> is a token of the
    completion (usage counts it) but no text, streamed or not, and a stop string spans it."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    w = tokenizer.convert_tokens_to_ids
    script = [w("w5"), BOS_ID, w("w6"), PAD_ID, UNK_ID, w("w7"), w("w8")]

    def scripted(*_: object):  # every request samples the script, then w9 for as long as asked
        tokens = itertools.chain(script, itertools.repeat(w("w9")))
        return lambda logprobs: mx.array([next(tokens)])

    monkeypatch.setattr(engine_module, "request_sampler", scripted)
    events: list[tuple[str, GenerateEvent]] = []
    engine = Engine(model, tokenizer, EngineLimits(), events.extend)
    engine.add(_req("plain", max_tokens=7, temperature=1.0, logprobs=True, top_logprobs=2), [8, 9])
    engine.add(_req("cut", max_tokens=7, temperature=1.0, stop=["w6 w7"]), [8, 9])
    _run(engine)
    engine.close()
    plain = [e for _, e in events if e.request_id == "plain"]
    cut = [e for _, e in events if e.request_id == "cut"]
    assert "".join(e.text for e in plain) == "w5 w6 w7 w8" == tokenizer.decode(script, skip_special_tokens=True)
    assert plain[-1].completion_tokens == 7 and plain[-1].finish_reason == "length"
    assert [e.token_text for e in plain] == ["w5", "", "w6", "", "", "w7", "w8"]  # as the text has them
    assert "".join(e.text for e in cut) == "w5 " and cut[-1].stop_sequence == "w6 w7"
    assert cut[-1].finish_reason == "stop" and cut[-1].completion_tokens == 6

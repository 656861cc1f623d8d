"""The batching engine on a plain mlx-lm model (no bus): finishing, stopping, cancelling."""

from __future__ import annotations

from pathlib import Path

from mlx_lm import load

from services.router.engine import Engine, EngineLimits, pick_lane
from shared.messages import GenerateEvent, GenerateRequest


def _req(rid: str, **kw) -> GenerateRequest:
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
        assert [len(lane.seqs) for lane in engine.lanes] == ([4] if lanes == 1 else [2, 2])
        _run(engine)
        engine.close()
        texts.append({rid: "".join(e.text for s, e in events if e.request_id == rid) for rid in map("r{}".format, range(4))})
    assert texts[0] == texts[1] and all(texts[0].values())


def test_small_batches_stay_whole_and_large_ones_split_evenly():
    assert pick_lane([0, 0], split_at=8) == 0
    assert pick_lane([5, 0], split_at=8) == 0  # 6 in all: still one batch
    assert pick_lane([0, 3], split_at=8) == 1  # lane 0 emptied: join the running batch
    assert pick_lane([7, 0], split_at=8) == 1  # the 8th opens the second lane
    assert pick_lane([5, 4], split_at=8) == 1
    assert pick_lane([4, 4], split_at=8) == 0

"""The performance model's formula, fit and roofline carry, checked against numbers worked by hand."""

from __future__ import annotations

import dataclasses

import pytest

from services.perfmodel.fit import bytes_per_us, expert_costs, router_costs, trip_costs
from services.perfmodel.formula import (Costs, Link, Shape, by_workers, distinct_experts, interpolate,
                                        message_bytes, predict)
from services.perfmodel.shapes import Machine, carry, from_config, parse_shape

SHAPE = Shape(layers=2, hidden=4, experts=8, top_k=2)
COSTS = Costs(batches=(1, 8), step_us=(100.0, 200.0), layer_us=(50.0, 80.0), ctx_us=(0.0, 0.0), call_us=10.0,
              expert_us=5.0, pair_us=1.0, rest_us=(200.0, 300.0), bus_bytes_per_us=1e12, cpu_us=(0.0, 0.0),
              cpu_pair_us=0.0, cores=2, emulator_us=(40.0, 40.0))


def test_interpolation_and_worker_counts():
    assert interpolate((1, 4), (10.0, 40.0), 1) == 10.0
    assert interpolate((1, 4), (10.0, 40.0), 2) == 20.0
    assert interpolate((1, 4), (10.0, 40.0), 8) == 80.0  # straight on past the last size
    assert interpolate((2,), (7.0,), 9) == 7.0
    assert by_workers((200.0, 300.0), 2) == 300.0
    assert by_workers((200.0, 300.0), 4) == 500.0  # growing as the last step did


def test_distinct_experts_per_worker():
    assert distinct_experts(8, 2, 1, 1) == pytest.approx(2.0)  # one token: its k experts
    assert distinct_experts(8, 2, 1, 2) == pytest.approx(1.0)  # ... half of them on each of 2 workers
    assert distinct_experts(8, 2, 1000, 2) == pytest.approx(4.0)  # many tokens: every expert a worker holds


def test_one_stream_is_the_chain_worked_by_hand():
    # per layer: router 100/2 + 50 = 100; experts 10 + 2*5 + 2*1 = 22; fixed 200 -> 322 us; 2 layers
    p = predict(SHAPE, COSTS, workers=1, concurrency=1)
    assert (p.micro_batches, p.bound) == (1, "chain")
    assert p.step_ms == pytest.approx(0.644, abs=1e-3)
    assert p.tok_s_total == pytest.approx(1e6 / 644, rel=1e-3)
    # a link of 100 us each way adds 200 us per layer; emulated, the proxy's own 40 us too
    assert predict(SHAPE, COSTS, 1, 1, Link(latency_us=100)).step_ms == pytest.approx(1.044, abs=1e-3)
    assert predict(SHAPE, COSTS, 1, 1, Link(latency_us=100, emulated=True)).step_ms == pytest.approx(1.124, abs=1e-3)


def test_two_workers_split_the_pairs_and_pay_their_fan_out():
    # experts: 10 + 1*5 + 1*1 = 16; fixed 300 -> 100 + 16 + 300 = 416 per layer
    assert predict(SHAPE, COSTS, workers=2, concurrency=1).step_ms == pytest.approx(0.832, abs=1e-3)


def test_link_bandwidth_moves_the_message_bytes():
    size = message_bytes(SHAPE, 1, 1)
    assert size == 24 + 4 * 4 + 8 * 2 + 20 + 2 * 4 * 4
    p = predict(SHAPE, COSTS, 1, 1, Link(gbps=0.001))  # 1 Mbit/s: 8 us per byte
    assert p.transfer_ms == pytest.approx(2 * size * 8 / 1e3, rel=1e-6)


def test_eight_streams_run_two_lanes_and_the_busiest_term_sets_the_pace():
    # 8 sequences: router 200/2 + 80 = 180; b = 4 per lane: pairs 8, distinct 8*(1-(3/4)^4) = 5.47
    p = predict(SHAPE, COSTS, 1, 8)
    x = 10 + 8 * (1 - 0.75 ** 4) * 5 + 8
    assert (p.micro_batches, p.bound) == (2, "chain")
    assert p.step_ms == pytest.approx(2 * (180 + x + 200) / 1e3, abs=1e-3)
    slow_router = dataclasses.replace(COSTS, layer_us=(50.0, 1000.0))  # 2 lanes * 1100 > one chain
    q = predict(SHAPE, slow_router, 1, 8)
    assert q.bound == "router"
    assert q.step_ms == pytest.approx(2 * 2 * 1100 / 1e3, rel=1e-6)
    busy_cpu = dataclasses.replace(COSTS, cpu_us=(5000.0, 5000.0))  # 2 lanes * (180 + 5000) over 2 cores
    assert predict(SHAPE, busy_cpu, 1, 8).bound == "cpu"
    assert predict(SHAPE, busy_cpu, 1, 8).step_ms == pytest.approx(2 * 5180 / 1e3, rel=1e-6)


def test_two_lanes_take_the_routers_measured_cpu_and_a_trip_grows_with_its_batch():
    # the router's lanes took 4800 us of CPU per 8-sequence step: 2400 per layer, 1200 per lane
    lanes = dataclasses.replace(COSTS, cpu_batches=(1, 8), router_cpu_us=(300.0, 4800.0))
    p = predict(SHAPE, lanes, 1, 8)
    x = 10 + 8 * (1 - 0.75 ** 4) * 5 + 8
    assert 1200 + x + 200 < 2400 and p.bound == "router"
    assert p.step_ms == pytest.approx(2 * 2400 / 1e3, abs=1e-3)
    assert p.router_ms == pytest.approx(2 * 1200 / 1e3, abs=1e-3)
    assert predict(SHAPE, lanes, 1, 1).step_ms == predict(SHAPE, COSTS, 1, 1).step_ms  # one lane: as before
    grows = dataclasses.replace(COSTS, rest_batch_us=(800.0, 1500.0))  # 100 us more per token past the first
    assert predict(SHAPE, grows, 1, 4).fixed_ms - predict(SHAPE, COSTS, 1, 4).fixed_ms == pytest.approx(2 * 0.3)


def test_the_split_adds_up_to_the_step():
    for costs in (COSTS, dataclasses.replace(COSTS, cpu_us=(5000.0, 5000.0))):
        for c in (1, 8):
            p = predict(SHAPE, costs, 2, c, Link(latency_us=50, gbps=1))
            parts = p.router_ms + p.experts_ms + p.fixed_ms + p.transfer_ms + p.latency_ms + p.waiting_ms
            assert parts == pytest.approx(p.step_ms, abs=2e-3)
            assert p.tok_s_total == pytest.approx(c * p.tok_s_stream, rel=1e-3)


def test_router_costs_come_apart_by_depth_and_context():
    # step 1000 us, 100 us per layer (+ 0.5 us per context token per layer), 4 and 2 layers
    rows = [{"layers": n, "batch": 1, "context": ctx, "ms": (1000 + n * (100 + 0.5 * ctx)) / 1e3}
            for n in (4, 2) for ctx in (0, 100)]
    batches, step, layer, ctx = router_costs(rows)
    assert batches == (1,)
    assert step[0] == pytest.approx(1000, abs=0.1)
    assert layer[0] == pytest.approx(100, abs=0.1)
    assert ctx[0] == pytest.approx(0.5, abs=1e-3)


def test_expert_costs_by_least_squares():
    rows = [{"pairs": p, "distinct": d, "us": 50 + 10 * d + 2 * p} for p, d in ((2, 2), (8, 6), (16, 9), (32, 12))]
    assert expert_costs(rows) == pytest.approx((50.0, 10.0, 2.0), abs=1e-6)


def test_bus_bytes_and_trip_costs():
    assert bytes_per_us([{"workers": 1, "bytes": 1000, "us": 300}, {"workers": 1, "bytes": 11000, "us": 310}]) == 1000
    calls = [{"workers": 1, "tokens": t, "rest_us": 500 + t, "cpu_us": 900 + 3 * t * SHAPE.top_k} for t in (1, 4)]
    rest, cpu, per_pair = trip_costs(calls, SHAPE, 1e9)
    assert rest == (pytest.approx(501, abs=0.1),)
    assert cpu == (pytest.approx(900, abs=0.1),)
    assert per_pair == pytest.approx(3, abs=0.01)


MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 300}


def test_shapes_from_configs_and_flags():
    s = from_config(MIXTRAL)
    assert (s.layers, s.experts, s.top_k, s.ffn, s.head_dim, s.weight_bytes) == (2, 4, 2, 128, 16, 4.0)
    q = from_config({**MIXTRAL, "num_local_experts": None, "num_experts": 128, "moe_intermediate_size": 768,
                     "head_dim": 128, "torch_dtype": "bfloat16", "quantization": {"bits": 4, "group_size": 64}})
    assert (q.experts, q.ffn, q.head_dim, q.wire_bytes) == (128, 768, 128, 2)
    assert q.weight_bytes == pytest.approx(0.5 + 4 / 64)
    dbrx = from_config({"d_model": 96, "n_heads": 4, "n_layers": 3, "vocab_size": 100,
                        "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 64},
                        "attn_config": {"kv_n_heads": 2}})
    assert (dbrx.layers, dbrx.experts, dbrx.top_k, dbrx.ffn, dbrx.kv_heads) == (3, 16, 4, 64, 2)
    assert parse_shape("layers=2,hidden=64,experts=4,top_k=2,ffn=128,heads=4,kv_heads=2,head_dim=16,vocab=300") == s
    with pytest.raises(ValueError) as e:
        parse_shape("layers=2,depth=3")
    assert "depth" in str(e.value)
    with pytest.raises(ValueError) as e:
        parse_shape("layers=2")
    assert "hidden" in str(e.value)


def test_carry_recomputes_only_the_roofline_part():
    s = from_config(MIXTRAL)
    here = Machine(mem_gbps=20.0, gflops=100.0)
    assert carry(COSTS, s, s, here, here) == COSTS
    fast = Machine(mem_gbps=40.0, gflops=200.0)
    moved = carry(COSTS, s, s, here, fast)
    read = s.expert_bytes / (20.0 * 1e3)  # us to read one expert at 20 GB/s
    assert moved.expert_us == pytest.approx(COSTS.expert_us - read + read / 2)
    assert moved.pair_us == pytest.approx(COSTS.pair_us / 2)
    assert moved.rest_us == COSTS.rest_us  # the bus's fixed cost is not a roofline
    bigger = dataclasses.replace(s, ffn=256)
    assert carry(COSTS, s, bigger, here, here).pair_us == pytest.approx(2 * COSTS.pair_us)


def test_speculation_multiplies_tokens_per_step_and_pays_positions_for_it():
    plain = predict(SHAPE, COSTS, 1, 1)
    spec = predict(SHAPE, COSTS, 1, 1, acceptance=0.7, draft_max=4)
    same_work = predict(SHAPE, COSTS, 1, 5)  # a verify step of 4 drafts computes 5 positions, as 5 streams do
    assert spec.draft_k == 4 and spec.tokens_per_step == pytest.approx(2.7731, abs=1e-3)
    assert spec.step_ms == same_work.step_ms > plain.step_ms
    assert spec.tok_s_stream == pytest.approx(2.7731 * 1e3 / spec.step_ms, rel=1e-3)
    off = predict(SHAPE, COSTS, 1, 1, acceptance=0.0)  # drafts never kept: the router does not draft
    assert off.draft_k == 0 and off.step_ms == plain.step_ms and off.tok_s_stream == plain.tok_s_stream

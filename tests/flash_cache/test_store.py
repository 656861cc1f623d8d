"""The bundle round trip, and the flash-cache's experts against the worker's: same numbers,
reads counted on a scripted trace, corruption caught before it is served."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from services.expert_worker.experts import load_experts
from services.flash_cache.bundle import DATA, MANIFEST, ensure_bundle, open_bundle, write_bundle
from services.flash_cache.store import FlashConfig, FlashExperts, slots_per_layer
from shared.errors import ConfigError, ModelError
from shared.wire import decode_reply, decode_request, encode_request
from tests.checkpoints import FAMILIES, save_mlx_mixtral

CONFIG = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
          "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 128, "rope_theta": 10000.0}
RECORD = 3 * 64 * 96 * 4  # gate, up, down of one expert, fp32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mlx_mixtral(tmp_path_factory.mktemp("flash-model"), CONFIG, seed=3)


@pytest.fixture(scope="module")
def bundle(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(model_dir, out)
    return out


def request(layer: int, tokens: list[list[int]], seed: int = 0) -> bytes:
    """One row per token, paired with each of its experts."""
    x = np.random.default_rng(seed).standard_normal((len(tokens), 64)).astype(np.float32)
    rows = np.array([t for t, es in enumerate(tokens) for _ in es], np.int32)
    experts = np.array([e for es in tokens for e in es], np.int32)
    return encode_request(layer, 0, x, rows, experts)


def flash(bundle: Path, slots: int, window: int = 1, mode: str = "cache", policy: str = "lfu") -> FlashExperts:
    m = open_bundle(bundle)
    budget = slots * m.moe_layers * m.record_bytes if mode != "naive" else m.record_bytes * m.moe_layers * 2
    return FlashExperts(m, FlashConfig(bundle, budget, window, policy, mode)).hold(list(range(m.num_experts)))


def test_bundle_records_hold_each_experts_weights_contiguously(model_dir: Path, bundle: Path):
    # catches: a wrong offset or stride, projections in another order, a record split in pieces
    m = open_bundle(bundle)
    assert (m.moe_layers, m.num_experts, m.record_bytes, m.top_k) == (3, 8, RECORD, 2)
    assert m.stride % 4096 == 0 and m.stride >= RECORD
    weights = mx.load(str(model_dir / "model.safetensors"))
    data = (bundle / DATA).read_bytes()
    for layer, expert in [(0, 0), (1, 5), (2, 7)]:
        record = np.frombuffer(data, np.float32, RECORD // 4, m.offset(layer, expert))
        moe = f"model.layers.{layer}.block_sparse_moe.switch_mlp"
        want = np.concatenate([np.array(weights[f"{moe}.{p}.weight"][expert]).ravel()
                               for p in ("gate_proj", "up_proj", "down_proj")])
        np.testing.assert_array_equal(record, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_output_equals_the_workers(family: str, checkpoints: dict[str, Path], tmp_path: Path):
    # catches: gate and up swapped, down not transposed, a pass computing with the wrong slot
    path = checkpoints[family]
    out = write_bundle(path, tmp_path / "b")
    dram, _ = load_experts(path, list(range(out.num_experts)))
    fc = flash(tmp_path / "b", slots=2)
    e = out.num_experts
    for layer in range(out.moe_layers):
        # 5 tokens over every expert: more experts than slots, so it runs in passes
        tokens = [[t % e, (t + 1) % e] for t in range(5)] + [[e - 1, 0], [2, 3]]
        payload = request(layer, tokens, seed=layer)
        got = decode_reply(fc.compute(decode_request(payload))).y
        want = decode_reply(dram.compute(decode_request(payload))).y
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fc.stats()["resident_bytes"] <= 2 * out.moe_layers * out.record_bytes
    fc.close()


def test_window_hits_evictions_and_bytes_on_a_scripted_trace(bundle: Path):
    # catches: hits read again, the window not protecting a recent expert, bytes not counted per record
    fc = flash(bundle, slots=3, window=2)
    trace = [[0, 1], [0, 2], [3, 0], [1, 0]]  # one token a step, layer 1
    for step, experts in enumerate(trace):
        fc.compute(decode_request(request(1, [experts], seed=step)))
    s = fc.stats()
    # step 1: 0,1 read. step 2: 0 hit, 2 read (3 slots full). step 3: 0 hit, 3 read: evicts 1
    # (used at step 1, outside the 2-step window) not 2 (step 2, inside). step 4: 0 hit, 1 read again.
    assert (s["hits"], s["misses"], s["records_read"]) == (3, 5, 5)
    assert s["bytes_read"] == 5 * RECORD
    assert sorted(fc.slots[1].resident()) == [0, 1, 3]
    assert s["resident_bytes"] == 3 * RECORD and s["slot_bytes"] == 3 * 3 * RECORD
    fc.close()


def test_a_request_wider_than_the_slots_runs_in_passes_within_budget(model_dir: Path, bundle: Path):
    # catches: refusing a long prefill, or growing past the budget to fit it
    fc = flash(bundle, slots=2)
    tokens = [[e, (e + 3) % 8] for e in range(8)]  # all 8 experts in one request
    got = decode_reply(fc.compute(decode_request(request(0, tokens)))).y
    dram, _ = load_experts(model_dir, list(range(8)))
    want = decode_reply(dram.compute(decode_request(request(0, tokens)))).y
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fc.stats()["records_read"] == 8 and len(fc.slots[0].resident()) <= 2
    fc.close()


def test_modes_read_what_their_definitions_say(bundle: Path):
    # catches: on-demand keeping experts (then it is a cache), naive reading only the routed ones
    steps = [[[0, 1]], [[0, 1]], [[0, 2]]]
    for mode, records in (("on-demand", 6), ("naive", 3 * 8), ("cache", 3)):
        fc = flash(bundle, slots=4, mode=mode)
        for i, tokens in enumerate(steps):
            fc.compute(decode_request(request(2, tokens, seed=i)))
        assert fc.stats()["records_read"] == records, mode
        fc.close()


def test_a_corrupt_record_is_refused_by_name_and_never_computed(bundle: Path, tmp_path: Path):
    # catches: serving numbers from a flipped byte, or failing every request for one bad record
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_bytes((bundle / MANIFEST).read_bytes())
    data = bytearray((bundle / DATA).read_bytes())
    m = open_bundle(bundle)
    data[m.offset(1, 3) + 100] ^= 0x40
    (bad / DATA).write_bytes(bytes(data))
    fc = flash(bad, slots=2)
    with pytest.raises(ModelError, match="MoE layer 1 expert 3: crc32"):
        fc.compute(decode_request(request(1, [[3, 4]])))
    fc.compute(decode_request(request(1, [[4, 5]])))  # the rest of the bundle still serves
    fc.close()


def test_truncated_foreign_or_unfinished_bundles_are_refused(model_dir: Path, bundle: Path, tmp_path: Path):
    # catches: a short file served as zeros, another model's experts served, a half-written bundle used
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / MANIFEST).write_bytes((bundle / MANIFEST).read_bytes())
    (cut / DATA).write_bytes((bundle / DATA).read_bytes()[:-4096])
    with pytest.raises(ModelError, match="truncated"):
        open_bundle(cut)
    with pytest.raises(ModelError, match="another model"):
        open_bundle(bundle, fingerprint="0" * 16)
    with pytest.raises(ModelError, match="no bundle.json"):
        open_bundle(tmp_path)
    made = ensure_bundle(model_dir, tmp_path / "auto", tmp_path)  # an unfinished one is written again
    assert open_bundle(made).num_experts == 8


def test_a_budget_under_one_tokens_experts_is_refused_at_start(bundle: Path):
    # catches: starting with fewer slots than a token routes to (it could never compute a step)
    m = open_bundle(bundle)
    assert slots_per_layer(m, 2 * m.moe_layers * m.record_bytes) == 2
    with pytest.raises(ConfigError, match="under the 2 experts a token routes to"):
        slots_per_layer(m, 2 * m.moe_layers * m.record_bytes - 1)


def test_read_ahead_fetches_what_the_next_layers_gate_picks(model_dir: Path, bundle: Path):
    # catches: reading ahead for the wrong layer, ignoring the gate, or a guess that costs the
    # next request its reads anyway (it must find them resident)
    from services.flash_cache.bundle import read_gates
    m = open_bundle(bundle)
    fc = FlashExperts(m, FlashConfig(bundle, 4 * m.moe_layers * m.record_bytes, 1, "lfu", prefetch=True))
    fc.hold(list(range(8)))
    payload = request(0, [[0, 1]], seed=5)
    x = decode_request(payload).x
    guess = sorted(np.argsort(-(x @ read_gates(bundle, m)[1].T)[0])[:2].tolist())
    fc.compute(decode_request(payload))
    fc._settle(1)
    assert sorted(fc.slots[1].resident()) == guess and fc.stats()["prefetched"] == 2
    before = fc.stats()
    got = decode_reply(fc.compute(decode_request(request(1, [guess], seed=6)))).y
    after = fc.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 2
    assert after["prefetch_used"] == 2
    dram, _ = load_experts(model_dir, list(range(8)))
    np.testing.assert_allclose(got, decode_reply(dram.compute(decode_request(request(1, [guess], seed=6)))).y,
                               rtol=1e-5, atol=1e-5)
    fc.close()

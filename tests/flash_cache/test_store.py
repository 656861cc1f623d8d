"""The bundle round trip, and the flash-cache's experts against the worker's: the same numbers
for float and quantized experts, one slot pool over the layers, reads counted on a scripted
trace, corruption caught before it is served."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from services.expert_worker.experts import load_experts
from services.flash_cache.bundle import DATA, MANIFEST, ensure_bundle, open_bundle, write_bundle
from services.flash_cache.store import FlashConfig, FlashExperts, PoolPlan, plan_pools
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
    """A flash-cache whose one pool has `slots` slots (naive: a layer's worth)."""
    m = open_bundle(bundle)
    # each pool's share of the budget is its layers' share of the experts' bytes
    fewest = min(sum(layer.shape() == other.shape() for other in m.layers) for layer in m.layers)
    budget = -(-(slots if mode != "naive" else 2) * m.num_experts * m.expert_bytes // (fewest * m.num_experts))
    return FlashExperts(m, FlashConfig(bundle, budget, window, policy, mode)).hold(list(range(m.num_experts)))


QUANTIZED = {"mixtral-4bit": ("mixtral", {"q_bits": 4, "q_group_size": 32}),
             "qwen3_moe-4bit": ("qwen3_moe", {"q_bits": 4, "q_group_size": 64}),
             "dbrx-4bit": ("dbrx", {"q_bits": 4, "q_group_size": 32}),
             "qwen3_moe-8bit": ("qwen3_moe", {"q_bits": 8, "q_group_size": 32}),
             # down_proj at 6 bits in layer 1, 3 bits elsewhere: layers of two record sizes
             "mixtral-mixed_3_6": ("mixtral", {"quant_predicate": "mixed_3_6", "q_group_size": 32})}


@pytest.fixture(scope="module")
def quantized(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mlx-lm's own conversions of the suite's checkpoints, as the MLX community publishes them."""
    from mlx_lm import convert
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, (family, how) in QUANTIZED.items():
        out[name] = root / name
        convert(str(checkpoints[family]), str(out[name]), quantize=True, **how)
    return out


def test_bundle_records_hold_each_experts_weights_contiguously(model_dir: Path, bundle: Path):
    # catches: a wrong offset or stride, projections in another order, a record split in pieces
    m = open_bundle(bundle)
    assert (m.moe_layers, m.num_experts, m.record_bytes, m.top_k) == (3, 8, RECORD, 2)
    assert [[t.name for t in layer.tensors] for layer in m.layers] == [["gate_up.weight", "down_proj.weight"]] * 3
    assert all(layer.stride % 4096 == 0 and layer.stride >= RECORD and not layer.quant for layer in m.layers)
    weights = mx.load(str(model_dir / "model.safetensors"))
    data = (bundle / DATA).read_bytes()
    for layer, expert in [(0, 0), (1, 5), (2, 7)]:
        record = np.frombuffer(data, np.float32, RECORD // 4, m.offset(layer, expert))
        moe = f"model.layers.{layer}.block_sparse_moe.switch_mlp"
        want = np.concatenate([np.array(weights[f"{moe}.{p}.weight"][expert]).ravel()
                               for p in ("gate_proj", "up_proj", "down_proj")])
        np.testing.assert_array_equal(record, want)


def test_quantized_records_hold_what_mlx_lm_loads(quantized: dict[str, Path], tmp_path: Path):
    # catches: scales or biases left out, another tensor order than the manifest's, the bits of
    # one layer written for all (mixed precision)
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from services.expert_compute import stack_held
    from shared.model import find_experts
    for name in ("dbrx-4bit", "mixtral-mixed_3_6"):
        m = write_bundle(quantized[name], tmp_path / name)
        model, _ = load_model(quantized[name])
        data = (tmp_path / name / DATA).read_bytes()
        for layer, slot in enumerate(find_experts(model)):
            glu = stack_held(slot, list(range(slot.num_experts))) if isinstance(slot.module, list) else slot.module
            layout = m.layers[layer]
            assert {p: (q.bits, q.group_size) for p, q in layout.quant.items()} == {
                p: (getattr(glu, p).bits, getattr(glu, p).group_size) for p in ("gate_proj", "up_proj", "down_proj")}
            for expert in (0, slot.num_experts - 1):
                at = m.offset(layer, expert)
                want = b"".join(np.asarray(a[expert].view(mx.uint16) if a.dtype == mx.bfloat16 else a[expert]).tobytes()
                                for p in ("gate_proj", "up_proj", "down_proj")
                                for _, a in tree_flatten(getattr(glu, p).parameters()))
                assert data[at:at + layout.record_bytes] == want, (name, layer, expert)
    sizes = {layer.record_bytes for layer in m.layers}
    assert len(sizes) == 2  # mixed_3_6: layer 1's down_proj has more bits


@pytest.mark.parametrize("family", [*FAMILIES, *QUANTIZED])
def test_flash_output_equals_the_workers(family: str, checkpoints: dict[str, Path], quantized: dict[str, Path],
                                         tmp_path: Path):
    # catches: gate and up swapped, down not transposed, a pass computing with the wrong slot,
    # a quantized expert computed another way than mlx-lm's (dequantized, other bits or groups)
    path = checkpoints[family] if family in FAMILIES else quantized[family]
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
        np.testing.assert_array_equal(got, want)  # the same compute over the same bytes
    pools = len({layer.record_bytes for layer in out.layers})
    assert len(fc.slots) == pools and fc.stats()["resident_bytes"] <= fc.stats()["slot_bytes"]
    fc.close()


def test_one_pool_serves_every_layer_on_a_scripted_trace(bundle: Path):
    # catches: slots split per layer (4 slots over 3 layers hold no token's 2 experts), experts
    # of different layers taken for one another, the window counted in requests, not tokens
    fc = flash(bundle, slots=4, window=1)
    assert fc.pools[0].window == 3  # one token: a request to each of the 3 layers
    tokens = [[[0, 1], [0], [0]], [[0, 2], [0], [1]], [[0, 1], [1], [1]]]
    for step, layers in enumerate(tokens):
        for layer, experts in enumerate(layers):
            fc.compute(decode_request(request(layer, [experts], seed=step)))
    s = fc.stats()
    # (layer, expert), ticks 0-8. Token 1 fills the 4 slots with (0,0) (0,1) (1,0) (2,0): 4 reads.
    # Token 2: (0,0) hits; (0,2) takes the slot of (0,1), the only one used before the window of
    # the last 3 ticks; (1,0) hits; (2,1) takes (2,0)'s (tick 2, outside the window at tick 5).
    # Token 3: (0,0) hits; (0,1) takes (0,2)'s (tick 3); (1,1) takes (1,0)'s (tick 4, the only
    # one outside the window at tick 7); (2,1) hits. 4 hits, 8 reads.
    assert (s["hits"], s["misses"], s["records_read"]) == (4, 8, 8)
    assert s["bytes_read"] == 8 * RECORD
    assert (fc.resident(0), fc.resident(1), fc.resident(2)) == ([0, 1], [1], [1])
    assert s["resident_bytes"] == 4 * RECORD and s["slot_bytes"] == 4 * RECORD
    fc.close()


def test_a_request_wider_than_the_slots_runs_in_passes_within_budget(model_dir: Path, bundle: Path):
    # catches: refusing a long prefill, or growing past the budget to fit it
    fc = flash(bundle, slots=2)
    tokens = [[e, (e + 3) % 8] for e in range(8)]  # all 8 experts in one request
    got = decode_reply(fc.compute(decode_request(request(0, tokens)))).y
    dram, _ = load_experts(model_dir, list(range(8)))
    want = decode_reply(dram.compute(decode_request(request(0, tokens)))).y
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fc.stats()["records_read"] == 8 and len(fc.pools[0].resident()) <= 2
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
    assert plan_pools(m, 2 * m.record_bytes) == [PoolPlan((0, 1, 2), 2, RECORD)]
    assert plan_pools(m, 100 * m.record_bytes) == [PoolPlan((0, 1, 2), 24, RECORD)]  # never more than all
    with pytest.raises(ConfigError, match="under the 2 experts a token routes to"):
        plan_pools(m, 2 * m.record_bytes - 1)


def test_read_ahead_fetches_what_the_next_layers_gate_picks(model_dir: Path, bundle: Path):
    # catches: reading ahead for the wrong layer, ignoring the gate, or a guess that costs the
    # next request its reads anyway (it must find them resident)
    from services.flash_cache.bundle import read_gates
    m = open_bundle(bundle)
    fc = FlashExperts(m, FlashConfig(bundle, 12 * m.record_bytes, 1, "lfu", prefetch=True))
    fc.hold(list(range(8)))
    payload = request(0, [[0, 1]], seed=5)
    x = decode_request(payload).x
    guess = sorted(np.argsort(-(x @ read_gates(bundle, m)[1].T)[0])[:2].tolist())
    fc.compute(decode_request(payload))
    fc._settle(1)
    assert fc.resident(1) == guess and fc.stats()["prefetched"] == 2
    before = fc.stats()
    got = decode_reply(fc.compute(decode_request(request(1, [guess], seed=6)))).y
    after = fc.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 2
    assert after["prefetch_used"] == 2
    dram, _ = load_experts(model_dir, list(range(8)))
    np.testing.assert_allclose(got, decode_reply(dram.compute(decode_request(request(1, [guess], seed=6)))).y,
                               rtol=1e-5, atol=1e-5)
    fc.close()


def test_a_forged_manifest_is_refused_by_name(bundle: Path, tmp_path: Path):
    # catches: a manifest whose tensors overlap, leave gaps, or have impossible shapes being served
    import json
    for forge in (lambda m: m["layers"][1]["tensors"][1].update(offset=8),  # overlapping the first tensor
                  lambda m: m["layers"][0]["tensors"][0].update(shape=[-3, 64]),
                  lambda m: m["layers"][2].update(offset=0)):  # a layer over another's records
        bad = tmp_path / f"forged-{id(forge)}"
        bad.mkdir()
        manifest = json.loads((bundle / MANIFEST).read_text())
        forge(manifest)
        (bad / MANIFEST).write_text(json.dumps(manifest))
        (bad / DATA).symlink_to(bundle / DATA)
        with pytest.raises(ModelError, match="bundle.json"):
            open_bundle(bad)

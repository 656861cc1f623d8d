"""The model in the object store: published once, fetched expert by expert, every byte checked,
and a worker built from the fetched experts computes exactly what one with the checkpoint does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import numpy as np
import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.expert_worker.experts import LocalExperts, expert_bytes, load_experts, load_fetched
from shared.errors import ModelError, WireError
from shared.messages import decode
from shared.mlx_thread import MLXThread
from shared.modelstore import MODEL_BUCKET, ModelManifest, current, expert_file, fetch, publish
from shared.placement import as_pairs
from shared.wire import decode_reply, decode_request, encode_request
from tests.checkpoints import HIDDEN


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:  # every test starts from an empty store
        await js.delete_object_store(MODEL_BUCKET)
    except NotFoundError:
        pass
    yield js
    await nc.close()


@pytest.fixture(scope="module")
def mlx() -> Iterator[MLXThread]:
    thread = MLXThread("test-mlx")
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def quantized(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("quantized") / "tiny-qwen3_moe-4bit"
    convert(str(checkpoints["qwen3_moe"]), str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


def _outputs(experts: LocalExperts, held: list[int] | list[list[int]]) -> list[np.ndarray]:
    """Every MoE layer's reply to one random request over the experts `held` (in that layer)."""
    rng = np.random.default_rng(7)
    out = []
    for layer, row in enumerate(as_pairs(held, experts.moe_layers)):
        x = rng.standard_normal((6, HIDDEN)).astype(np.float32)
        rows = np.repeat(np.arange(6, dtype=np.int32), 2)
        ids = rng.choice(row, size=len(rows)).astype(np.int32)
        out.append(decode_reply(experts.compute(decode_request(encode_request(layer, 0, x, rows, ids)))).y)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "dbrx", "qwen3_moe-4bit"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["same-in-every-layer", "per-layer"])
async def test_fetched_experts_compute_exactly_what_the_checkpoints_do(
        family, per_layer, checkpoints, quantized, js, mlx, tmp_path):
    """Per layer: a tiered cluster's DRAM worker holds each layer's own experts (here the last
    layer only 2, the first 3 and 1)."""
    checkpoint = quantized if family.endswith("-4bit") else checkpoints[family]
    manifest = await publish(js, checkpoint, mlx.run)
    held = [[3, 1]] + [[2]] * (manifest.moe_layers - 1) if per_layer else [3, 1]
    got = await fetch(js, manifest, held, tmp_path)
    # only the pairs held are downloaded: per layer, its own experts
    assert sorted(p.name for p in got.iterdir() if p.name.startswith("layer")) == sorted(
        expert_file(layer, e) for layer, row in enumerate(as_pairs(held, manifest.moe_layers)) for e in row)
    fetched = await mlx.run(load_fetched, got, manifest, held)
    local, info = await mlx.run(load_experts, checkpoint, held)
    assert fetched.held == local.held == ([1, 2, 3] if per_layer else [1, 3])
    assert fetched.pairs == local.pairs == as_pairs(held, manifest.moe_layers)
    assert manifest.info() == info
    assert manifest.expert_bytes == (await mlx.run(expert_bytes, checkpoint))[0]
    want = await mlx.run(_outputs, local, held)
    for a, b in zip(await mlx.run(_outputs, fetched, held), want, strict=True):
        assert np.array_equal(a, b)


async def test_publishing_the_same_checkpoint_again_uploads_nothing(checkpoints, js, mlx):
    first = await publish(js, checkpoints["mixtral"], mlx.run)
    store = await js.object_store(MODEL_BUCKET)
    before = (await store.status()).stream_info.state
    assert await publish(js, checkpoints["mixtral"], mlx.run) == first
    after = (await store.status()).stream_info.state
    assert (after.messages, after.last_seq) == (before.messages, before.last_seq)


async def test_a_new_checkpoint_replaces_the_old_copy(checkpoints, js, mlx):
    old = await publish(js, checkpoints["mixtral"], mlx.run)
    new = await publish(js, checkpoints["qwen3_moe"], mlx.run)
    assert new.key != old.key and await current(js) == new
    names = {o.name for o in await (await js.object_store(MODEL_BUCKET)).list(ignore_deletes=True)}
    assert names == {"current", f"{new.key}/manifest.json", *(o.name for o in new.files.values()),
                     *(o.name for layer in new.experts for o in layer)}


async def test_a_worker_fetches_only_its_experts_and_keeps_what_it_has(checkpoints, js, mlx, tmp_path):
    manifest = await publish(js, checkpoints["mixtral"], mlx.run)
    got = await fetch(js, manifest, [5, 2], tmp_path)
    files = {p.name for p in got.iterdir()}
    assert files == {"config.json", *(expert_file(layer, e) for layer in range(2) for e in (2, 5))}
    kept, tampered = got / expert_file(0, 2), got / expert_file(1, 5)
    stamp = kept.stat().st_mtime_ns
    tampered.write_bytes(b"not an expert")
    await fetch(js, manifest, [2, 5], tmp_path)
    assert kept.stat().st_mtime_ns == stamp  # verified in place, not downloaded again
    assert tampered.stat().st_size == manifest.experts[1][5].size


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
async def test_a_damaged_object_is_refused_and_never_lands(damage, checkpoints, js, mlx, tmp_path):
    manifest = await publish(js, checkpoints["mixtral"], mlx.run)
    obj = manifest.experts[1][3]
    store = await js.object_store(MODEL_BUCKET)
    data = bytearray((await store.get(obj.name)).data)
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-100:]
    await store.put(obj.name, bytes(data))
    with pytest.raises(ModelError) as e:
        await fetch(js, manifest, [3, 5], tmp_path)
    assert obj.name in str(e.value) and damage in str(e.value)
    if damage == "corrupt":
        assert obj.sha256 in str(e.value)
    else:
        assert f"{obj.size - 100} of {obj.size} bytes" in str(e.value)
    got = tmp_path / manifest.key
    assert not list(got.glob("layer1-expert3*"))
    with pytest.raises(ModelError) as e:
        await mlx.run(load_fetched, got, manifest, [3, 5])
    assert "expert 3 of MoE layer 1 was not fetched" in str(e.value)


async def test_an_object_whose_chunks_are_gone_fails_instead_of_hanging(checkpoints, js, mlx, tmp_path):
    manifest = await publish(js, checkpoints["mixtral"], mlx.run)
    obj = manifest.experts[0][1]
    nuid = (await (await js.object_store(MODEL_BUCKET)).get_info(obj.name)).nuid
    await js.purge_stream(f"OBJ_{MODEL_BUCKET}", subject=f"$O.{MODEL_BUCKET}.C.{nuid}")
    with pytest.raises(ModelError) as e:
        await fetch(js, manifest, [1], tmp_path)
    assert obj.name in str(e.value) and "chunks missing" in str(e.value)
    assert not list((tmp_path / manifest.key).glob("layer0-expert1*"))


async def test_nothing_is_current_before_a_publish(checkpoints, js, mlx):
    assert await current(js) is None
    await js.create_object_store(MODEL_BUCKET)
    assert await current(js) is None
    published = await publish(js, checkpoints["qwen3_moe"], mlx.run)
    assert await current(js) == published


def test_a_manifest_cannot_name_a_file_outside_the_fetch_directory():
    obj = {"name": "k/config.json", "size": 1, "sha256": "0" * 64}
    base = {"key": "0" * 32, "name": "m", "model_type": "mixtral", "fingerprint": "f", "max_context": 8,
            "num_experts": 1, "moe_layers": 1, "expert_bytes": 1, "slots": ["s"], "stacked": True,
            "experts": [[obj]]}
    assert decode(ModelManifest, orjson.dumps({**base, "files": {"config.json": obj}})).files["config.json"].size == 1
    with pytest.raises(WireError) as e:
        decode(ModelManifest, orjson.dumps({**base, "files": {"config.json": obj, "../x": obj}}))
    assert "files.../x" in str(e.value)

"""A worker holds only its share of the experts, and computes exactly what the experts compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from services.expert_worker.experts import expert_bytes, load_experts
from shared.errors import WireError
from shared.wire import decode_reply, decode_request, encode_request
from tests.checkpoints import save_mlx_mixtral
from tests.cluster import ROOT

CONFIG = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 16,
          "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 128, "rope_theta": 10000.0}
EXPERT_BYTES = 4 * 16 * 3 * 256 * 512 * 4  # layers * experts * matrices * d * ffn * fp32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mlx_mixtral(tmp_path_factory.mktemp("sixteen-experts"), CONFIG, seed=1)


def test_worker_output_equals_the_models_own_experts(model_dir: Path):
    from mlx_lm.utils import load_model

    full, _ = load_model(model_dir)
    held = [1, 4, 7, 10, 13]
    experts, info = load_experts(model_dir, held)
    x = mx.random.normal((5, 256))
    inds = mx.array([[1, 4], [7, 10], [13, 1], [4, 4], [10, 13]])
    want = np.array(full.model.layers[2].block_sparse_moe.switch_mlp(x, inds))  # (5, 2, D)
    t, s = np.nonzero(np.isin(np.array(inds), held))
    payload = encode_request(2, 0, np.array(x), t.astype(np.int32), np.array(inds)[t, s].astype(np.int32))
    y = decode_reply(experts.compute(decode_request(payload))).y
    np.testing.assert_allclose(y, want[t, s], rtol=1e-5, atol=1e-5)
    with pytest.raises(WireError) as e:
        experts.compute(decode_request(encode_request(2, 0, np.array(x), t.astype(np.int32),
                                                      np.zeros(len(t), np.int32))))
    assert "[0] of layer 2 are not held" in str(e.value)


_RSS = """
import sys; from pathlib import Path
import mlx.core as mx
from services.expert_worker.experts import load_experts
import psutil
def rss(): return psutil.Process().memory_info().rss
W = int(sys.argv[2]); before = rss()
held = load_experts(Path(sys.argv[1]), list(range(0, 16, W)))
print(rss() - before, mx.get_active_memory())
"""


def test_letting_experts_go_keeps_the_others_exact_and_frees_their_memory(model_dir: Path):
    from mlx_lm.utils import load_model

    full, _ = load_model(model_dir)
    experts, _ = load_experts(model_dir, [1, 4, 7, 10, 13])
    before = mx.get_active_memory()
    experts.keep([4, 13])
    assert experts.held == [4, 13] and mx.get_active_memory() < before
    x = mx.random.normal((3, 256))
    inds = mx.array([[4, 13], [13, 4], [4, 4]])
    want = np.array(full.model.layers[1].block_sparse_moe.switch_mlp(x, inds))
    t, s = np.nonzero(np.ones((3, 2), bool))
    payload = encode_request(1, 0, np.array(x), t.astype(np.int32), np.array(inds)[t, s].astype(np.int32))
    y = decode_reply(experts.compute(decode_request(payload))).y
    np.testing.assert_allclose(y, want[t, s], rtol=1e-5, atol=1e-5)
    with pytest.raises(WireError):  # let go of: a 409 on the bus
        experts.compute(decode_request(encode_request(1, 0, np.array(x), np.zeros(1, np.int32),
                                                      np.ones(1, np.int32))))


def test_each_layer_holds_its_own_experts_exactly_and_answers_for_no_other(model_dir: Path):
    """A tiered cluster places (layer, expert) pairs: layer 0 holds 3 and 5, layer 1 nothing,
    layer 2 only 9, layer 3 all of 3, 5, 9. Each computes as the model's own experts; an expert
    held in another layer only is refused (the router then asks its owner there), as is every
    expert of a layer holding none. Letting go per layer frees memory and keeps the rest exact."""
    from mlx_lm.utils import load_model

    full, _ = load_model(model_dir)
    pairs = [[3, 5], [], [9], [3, 5, 9]]
    experts, _ = load_experts(model_dir, pairs)
    assert experts.held == [3, 5, 9] and experts.pairs == pairs
    x = mx.random.normal((3, 256))

    def ask(layer: int, ids: list[int]) -> np.ndarray:
        inds = np.array([ids] * 3, np.int32)
        t, s = np.nonzero(np.ones(inds.shape, bool))
        payload = encode_request(layer, 0, np.array(x), t.astype(np.int32), inds[t, s])
        got = decode_reply(experts.compute(decode_request(payload))).y
        want = np.array(full.model.layers[layer].block_sparse_moe.switch_mlp(x, mx.array(inds)))[t, s]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        return got

    for layer, ids in enumerate(pairs):
        if ids:
            ask(layer, ids)
    for layer, ids in ((0, [9]), (1, [3]), (2, [5])):
        with pytest.raises(WireError, match=f"of layer {layer} are not held"):
            ask(layer, ids)
    before = mx.get_active_memory()
    experts.keep([[5], [], [], [3, 9]])
    assert experts.pairs == [[5], [], [], [3, 9]] and experts.held == [3, 5, 9]
    assert mx.get_active_memory() < before
    ask(0, [5])
    ask(3, [9, 3])
    with pytest.raises(WireError, match="of layer 2 are not held"):
        ask(2, [9])


def test_capacity_is_counted_in_bytes_of_one_expert_over_every_layer(model_dir: Path):
    assert expert_bytes(model_dir)[0] == EXPERT_BYTES // 16


def test_memory_scales_with_the_share_of_experts(model_dir: Path):
    def measure(world: int) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _RSS, str(model_dir), str(world)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        rss, active = out.stdout.split()
        return int(rss), int(active)

    rss1, active1 = measure(1)
    rss4, active4 = measure(4)
    assert active1 == pytest.approx(EXPERT_BYTES, rel=0.01)
    assert active4 == pytest.approx(EXPERT_BYTES / 4, rel=0.01)
    # the process really holds less: RSS falls by at least half of the 3/4 it gave up
    assert rss1 - rss4 > 0.5 * 0.75 * EXPERT_BYTES


@pytest.mark.parametrize("activation", ["swiglu", "other"])
def test_grouped_compute_equals_switchglu_for_single_rows_and_groups(activation: str):
    """Experts with few rows take numpy's gemv, the others MLX's matmul: both must equal
    mlx-lm's SwitchGLU, with its own SwiGLU and with an activation only MLX computes."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    from services.expert_compute import GEMV_ROWS, GroupedExperts
    from shared.wire import DTYPE_CODES

    class GeluGLU(nn.Module):
        def __call__(self, x, gate):
            return nn.gelu(gate) * x

    mx.random.seed(3)
    kwargs = {} if activation == "swiglu" else {"activation": GeluGLU()}
    glu = SwitchGLU(64, 96, 6, **kwargs)
    x = mx.random.normal((8, 64))
    # expert 0: one row; 1: GEMV_ROWS rows; 2: one more than that (MLX's path); 5: every token
    local = np.array([0] + [1] * GEMV_ROWS + [2] * (GEMV_ROWS + 1) + [5] * 8, np.int32)
    rows = np.array(list(range(len(local) - 8)) + list(range(8)), np.int32) % 8
    want = np.array(glu(x[mx.array(rows)], mx.array(local)[:, None])).reshape(len(local), -1)
    grouped = GroupedExperts.of(glu)
    got = grouped(np.array(x), DTYPE_CODES["float32"], rows, local)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""The experts one worker holds, stacked per layer, and the compute for one request."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU
from mlx_lm.utils import maybe_set_recommended_wired_limit

from shared.arrays import to_mlx, to_numpy
from shared.errors import WireError
from shared.model import ExpertSlot, ModelInfo, describe, find_experts, load_lazy
from shared.wire import ExpertRequest, encode_reply

# DBRX's expert MLP names -> SwitchGLU's: swiglu(w1 x, v1 x) == silu(gate) * up.
_DBRX_NAMES = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


class LocalExperts:
    def __init__(self, layers: list[nn.Module], held: list[int], num_experts: int) -> None:
        self.layers = layers
        self.held = held
        self.num_experts = num_experts
        # Global expert id -> index in this worker's stacked arrays; -1 where not held.
        self.local = np.full(num_experts, -1, np.int32)
        self.local[held] = np.arange(len(held), dtype=np.int32)

    def compute(self, req: ExpertRequest) -> bytes:
        """expert(x[row]) for every pair of the request; runs on the MLX thread."""
        start = time.perf_counter()
        if not 0 <= req.layer < len(self.layers):
            raise WireError(f"layer {req.layer} out of range (0..{len(self.layers) - 1})")
        if len(req.experts) and (req.experts.min() < 0 or req.experts.max() >= self.num_experts):
            raise WireError(f"expert id out of range (0..{self.num_experts - 1})")
        local = self.local[req.experts]
        if (local < 0).any():
            missing = sorted(set(req.experts[local < 0].tolist()))
            raise WireError(f"experts {missing} are not held by this worker")
        x = to_mlx(req.x, req.dtype)  # (rows, D)
        rows = mx.array(req.rows)
        y = self.layers[req.layer](x[rows], mx.array(local)[:, None])  # (pairs, 1, D)
        y = y.reshape(len(local), -1).astype(x.dtype)
        mx.eval(y)
        y = to_numpy(y)
        return encode_reply(req.dtype, y, int(1e6 * (time.perf_counter() - start)))


def load_experts(path: Path, choose: Callable[[int], list[int]]) -> tuple[LocalExperts, ModelInfo]:
    """Load only the experts `choose(num_experts)` picks, from every MoE layer."""
    model, config = load_lazy(path)
    slots = find_experts(model)
    info = describe(path, config, slots)
    held = choose(info.num_experts)
    layers = []
    for slot in slots:
        layer = _stack_held(slot, held)
        mx.eval(layer.parameters())  # reads this layer's held experts, nothing else
        layers.append(layer)
    del model, slots
    gc.collect()
    mx.clear_cache()
    # Metal: wire up to the recommended working set so the stacked expert arrays stay
    # resident instead of being re-wired on use (the hidden cost NOTES.md describes).
    # The CPU build reports no working set and this does nothing.
    maybe_set_recommended_wired_limit()
    return LocalExperts(layers, held, info.num_experts), info


def _stack_held(slot: ExpertSlot, held: list[int]) -> nn.Module:
    idx = mx.array(held, dtype=mx.int32)
    if not isinstance(slot.module, list):
        module = slot.module
        module.update(tree_map(lambda a: a[idx], module.parameters()))
        return module
    # DBRX keeps a list of expert MLPs: stack the held ones into one SwitchGLU.
    params = [slot.module[e].parameters() for e in held]
    stacked = tree_map(lambda *xs: mx.stack(xs), *params)
    glu = SwitchGLU(1, 1, 1)
    first = slot.module[held[0]].w1 if held else None
    if isinstance(first, nn.QuantizedLinear):
        for name in _DBRX_NAMES.values():
            setattr(glu, name, QuantizedSwitchLinear(
                first.group_size, 1, 1, bias=False,
                group_size=first.group_size, bits=first.bits, mode=first.mode,
            ))
    glu.update({_DBRX_NAMES[k]: v for k, v in stacked.items()})
    return glu

"""The seam: modules that stand where mlx-lm's experts were and ask the bus instead."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from shared.model import ExpertSlot

# (layer, x (..., D), indices (..., k)) -> (..., k, D): what SwitchGLU returns.
Exchange = Callable[[int, mx.array, mx.array], mx.array]


class BusExperts(nn.Module):
    """Takes SwitchGLU's place: the model's own block still gates and combines."""

    def __init__(self, layer: int, exchange: Exchange) -> None:
        super().__init__()
        self._layer = layer
        self._exchange = exchange

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self._exchange(self._layer, x, indices)


class DbrxBusBlock(nn.Module):
    """DBRX's SparseMoeBlock with its expert list on the bus.

    mlx-lm's DBRX block loops over tokens and experts in Python, so the block itself is
    replaced; the gate and the combine are the same operations as in mlx-lm's block.
    """

    def __init__(self, block: nn.Module, experts: BusExperts) -> None:
        super().__init__()
        self.router = block.router
        self.num_experts_per_tok = block.num_experts_per_tok
        self.experts = experts

    def __call__(self, x: mx.array) -> mx.array:
        ne = self.num_experts_per_tok
        orig_shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # (N, D)
        gates = mx.softmax(self.router(x).astype(mx.float32), axis=-1)
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=ne - 1, axis=-1)[:, :ne])
        scores = mx.take_along_axis(gates, inds, axis=-1)
        scores = scores / mx.linalg.norm(scores, ord=1, axis=-1, keepdims=True)
        scores = scores.astype(x.dtype)
        y = self.experts(x, inds)  # (N, k, D)
        y = (y * scores[:, :, None]).sum(axis=1)
        return y.reshape(orig_shape)


def install(model: nn.Module, slots: list[ExpertSlot], exchange: Exchange) -> None:
    """Swap every experts module of `model` for the bus; their weights are never read."""
    for layer, slot in enumerate(slots):
        bus = BusExperts(layer, exchange)
        if isinstance(slot.module, list):
            parent_path, _, block_attr = slot.path.rsplit(".", 1)[0].rpartition(".")
            parent = _module_at(model, parent_path)
            setattr(parent, block_attr, DbrxBusBlock(slot.owner, bus))
        else:
            setattr(slot.owner, slot.attr, bus)


def _module_at(model: nn.Module, path: str) -> nn.Module:
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node

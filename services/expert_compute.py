"""How experts are computed, for every backend that serves them: the DRAM worker (the experts it
holds, stacked) and the flash-cache (the experts its slots hold, read from SSD). Both index one
stacked module per MoE layer by their own numbering (held position, or slot) and compute a
request's (row, expert) pairs exactly as mlx-lm's SwitchGLU would.

`Experts` is what the worker service asks of a backend.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU

from shared.arrays import to_mlx, to_numpy
from shared.errors import WireError
from shared.model import ExpertSlot
from shared.placement import Pairs
from shared.wire import ExpertRequest


class NotHeld(WireError):
    """A request for experts this backend does not hold (any more): the router re-plans it."""


class Experts(Protocol):
    """A worker's experts, whatever holds them. Every method runs on the service's MLX thread."""

    held: list[int]  # the experts it answers for, in some MoE layer
    pairs: Pairs  # per MoE layer, those it answers for there
    num_experts: int
    moe_layers: int

    def compute(self, req: ExpertRequest) -> bytes:
        """The reply to `req`: expert(x[row]) for each pair. WireError (NotHeld) when it cannot."""

    def keep(self, held: list[int] | Pairs) -> None:
        """Let go of every expert but `held` (a subset of those held; see `as_pairs`)."""

    def stats(self) -> dict[str, int]:
        """Counters for `nats micro stats` and the worker's status (empty: none)."""

    def close(self) -> None: ...


def check_request(req: ExpertRequest, moe_layers: int, num_experts: int) -> None:
    if not 0 <= req.layer < moe_layers:
        raise WireError(f"layer {req.layer} out of range (0..{moe_layers - 1})")
    if len(req.experts) and (req.experts.min() < 0 or req.experts.max() >= num_experts):
        raise WireError(f"expert id out of range (0..{num_experts - 1})")


class StackedExperts:
    """Metal, and quantized weights: mlx-lm's own SwitchGLU on stacked arrays (gather_mm,
    gather_qmm), indexed by the backend's numbering."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: np.ndarray, code: int, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
        xm = to_mlx(x, code)
        y = self.module(xm[mx.array(rows)], mx.array(local)[:, None])  # (pairs, 1, D)
        y = y.reshape(len(local), -1).astype(xm.dtype)
        mx.eval(y)
        return to_numpy(y)

    def keep(self, idx: mx.array) -> None:
        self.module.update(tree_map(lambda a: a[idx], self.module.parameters()))
        mx.eval(self.module.parameters())


# Up to this many rows for one expert, float32 weights are read as matrix-vector products, one
# per row. MLX's CPU matmul goes through BLAS gemm, which packs (copies) the weight matrix
# before it multiplies: for one row that reads the weights about three times where gemv reads
# them once (mixtral-0.5b's gate|up, 16.8 MB: 4.4 ms in MLX, 1.1 ms as gemv; at 4 rows both
# take ~4.5 ms). Decode at a few streams is all single rows.
GEMV_ROWS = 3


def groups(local: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The request's pairs by expert: their order sorted by expert, and (expert, lo, hi) slices
    of that order, one per distinct expert."""
    order = np.argsort(local, kind="stable")
    ids, starts = np.unique(local[order], return_index=True)
    bounds = [*starts.tolist(), len(local)]
    return order, list(zip(ids.tolist(), bounds, bounds[1:]))


class GroupedExperts:
    """CPU with float weights: each distinct expert's rows multiplied together.

    On the CPU, gather_mm reads an expert's weights once per (token, expert) pair; grouping
    the pairs reads them once per expert, which is most of the time at batch 16. The weights
    stay stacked, gate|up as one (E, 2F, D) array and down as (E, D, F), in the checkpoint's
    (out, in) layout: `x @ take(w, e).T` read them from DRAM as fast as separate per-expert
    arrays and faster than a sliced `w[e]` (which copies) or an (in, out) layout. float32
    SwiGLU experts are computed in numpy through views of the same arrays: gemv for at most
    GEMV_ROWS rows, one matrix product above.
    """

    def __init__(self, gate_up: mx.array, down: mx.array, activation: nn.Module) -> None:
        self.gate_up, self.down = gate_up, down
        width = gate_up.shape[1] // 2
        self._act = mx.compile(lambda h: activation(h[:, width:], h[:, :width]))
        # mlx-lm's SwiGLU is silu(gate) * up: in numpy, the single rows never wait on an MLX
        # evaluation (each one a hand-off to MLX's CPU thread, 70-250 us here).
        self._np_act = swiglu if isinstance(activation, SwiGLU) else None
        self._views()

    @classmethod
    def of(cls, glu: SwitchGLU) -> GroupedExperts:
        """From a model's SwitchGLU, whose gate and up weights it takes over (not kept twice)."""
        gate, up = glu.gate_proj.weight, glu.up_proj.weight
        gate_up = mx.concatenate([gate, up], axis=1)
        mx.eval(gate_up)
        for proj in (glu.gate_proj, glu.up_proj):
            proj.weight = mx.zeros((0,), gate.dtype)
        return cls(gate_up, glu.down_proj.weight, glu.activation)

    def _views(self) -> None:
        # numpy views share MLX's buffers (no copy); only float32 has a fast numpy gemv.
        fp32 = self.gate_up.dtype == mx.float32
        self._np = (np.array(self.gate_up, copy=False), np.array(self.down, copy=False)) if fp32 else None

    def keep(self, idx: mx.array) -> None:
        self.gate_up, self.down = mx.take(self.gate_up, idx, axis=0), mx.take(self.down, idx, axis=0)
        mx.eval(self.gate_up, self.down)
        self._views()

    def __call__(self, x: np.ndarray, code: int, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
        order, slices = groups(local)
        xs = x[rows[order]]  # (pairs, D) in expert order
        out = np.empty((len(local), x.shape[1]), x.dtype)
        few = [g for g in slices if g[2] - g[1] <= GEMV_ROWS] if self._np is not None else []
        many = [g for g in slices if g[2] - g[1] > GEMV_ROWS] if few else slices
        if many and self._np is not None and self._np_act is not None:
            # float32 SwiGLU: numpy's matmul through views of the same arrays, about twice as
            # fast as MLX's here at 4-64 rows for one expert (bench.flash_compute)
            gate_up, down = self._np
            for j, lo, hi in many:
                out[order[lo:hi]] = self._np_act(xs[lo:hi] @ gate_up[j].T) @ down[j].T
        elif many:
            xm = to_mlx(xs, code)
            ys = [self._act(xm[lo:hi] @ mx.take(self.gate_up, j, axis=0).T) @ mx.take(self.down, j, axis=0).T
                  for j, lo, hi in many]
            y = (mx.concatenate(ys) if len(ys) > 1 else ys[0]).astype(xm.dtype)
            mx.eval(y)
            at = np.concatenate([order[lo:hi] for _, lo, hi in many])
            out[at] = to_numpy(y)
        if few:
            gate_up, down = self._np
            pairs = [(j, i) for j, lo, hi in few for i in range(lo, hi)]
            # Another activation runs in MLX on a power-of-two number of rows: its allocator then
            # meets a handful of sizes and reuses its buffers (a worker's memory stays flat).
            rows_h = len(pairs) if self._np_act else 1 << (len(pairs) - 1).bit_length()
            h = np.zeros((rows_h, gate_up.shape[1]), gate_up.dtype)
            for n, (j, i) in enumerate(pairs):
                np.matmul(gate_up[j], xs[i], out=h[n])  # one gemv per row
            a = self._np_act(h) if self._np_act else np.array(self._act(mx.array(h)), copy=False)
            out[order[[i for _, i in pairs]]] = np.stack([down[j] @ a[n] for n, (j, _) in enumerate(pairs)])
        return out


def swiglu(h: np.ndarray) -> np.ndarray:
    """mlx-lm's SwiGLU on gate|up rows: silu(gate) * up."""
    gate, up = np.split(h, 2, axis=1)
    return gate / (1 + np.exp(-gate)) * up


def quantized(module: nn.Module) -> bool:
    return isinstance(module, SwitchGLU) and any(
        isinstance(p, QuantizedSwitchLinear) for p in (module.gate_proj, module.up_proj, module.down_proj))


def groupable(module: nn.Module) -> bool:
    """Grouped compute applies to float SwitchGLU layers without biases, on the CPU."""
    return (mx.default_device() == mx.cpu and isinstance(module, SwitchGLU) and not quantized(module)
            and not any("bias" in p for p in (module.gate_proj, module.up_proj, module.down_proj)))


def compute_layer(module: nn.Module) -> GroupedExperts | StackedExperts:
    """The compute for one MoE layer's stacked experts: grouped on the CPU for float, else mlx-lm's."""
    return GroupedExperts.of(module) if groupable(module) else StackedExperts(module)


# DBRX's expert MLP names -> SwitchGLU's: swiglu(w1 x, v1 x) == silu(gate) * up.
_DBRX_NAMES = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


def stack_held(slot: ExpertSlot, held: list[int]) -> nn.Module:
    """One MoE layer's experts `held`, in that order, as one SwitchGLU."""
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

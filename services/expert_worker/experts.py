"""The experts one worker holds, stacked per layer, and the compute for one request."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU
from mlx_lm.utils import _get_classes, load_model, maybe_set_recommended_wired_limit

from shared.arrays import to_mlx, to_numpy
from shared.errors import ModelError, WireError
from shared.model import ExpertSlot, ModelInfo, describe, find_experts, load_lazy
from shared.modelstore import ModelManifest, expert_file
from shared.shards import check_fetched, fetch_experts, missing
from shared.wire import ExpertRequest, encode_reply


class NotHeld(WireError):
    """A request for experts this worker does not hold (any more): the router re-plans it."""


# DBRX's expert MLP names -> SwitchGLU's: swiglu(w1 x, v1 x) == silu(gate) * up.
_DBRX_NAMES = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


class StackedExperts:
    """Metal, and quantized weights: mlx-lm's own SwitchGLU on stacked arrays (gather_mm)."""

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
    arrays and faster than a sliced `w[e]` (which copies) or an (in, out) layout. An expert
    with at most GEMV_ROWS rows is read by numpy's gemv through a view of the same arrays.
    """

    def __init__(self, glu: SwitchGLU) -> None:
        gate, up = glu.gate_proj.weight, glu.up_proj.weight
        self.gate_up = mx.concatenate([gate, up], axis=1)
        self.down = glu.down_proj.weight
        mx.eval(self.gate_up)
        for proj in (glu.gate_proj, glu.up_proj):
            proj.weight = mx.zeros((0,), gate.dtype)  # the model's copy is not kept twice
        width = gate.shape[1]
        activation = glu.activation  # the model's own, e.g. silu(gate) * up
        self._act = mx.compile(lambda h: activation(h[:, width:], h[:, :width]))
        # mlx-lm's SwiGLU is silu(gate) * up: in numpy, the single rows never wait on an MLX
        # evaluation (each one a hand-off to MLX's CPU thread, 70-250 us here).
        self._np_act = _swiglu if isinstance(activation, SwiGLU) else None
        self._views()

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
        if many:
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


def _swiglu(h: np.ndarray) -> np.ndarray:
    """mlx-lm's SwiGLU on gate|up rows: silu(gate) * up."""
    gate, up = np.split(h, 2, axis=1)
    return gate / (1 + np.exp(-gate)) * up


def groupable(module: nn.Module) -> bool:
    """Grouped compute applies to float SwitchGLU layers without biases, on the CPU."""
    return (mx.default_device() == mx.cpu and isinstance(module, SwitchGLU)
            and not any(isinstance(p, QuantizedSwitchLinear) or "bias" in p
                        for p in (module.gate_proj, module.up_proj, module.down_proj)))


class LocalExperts:
    def __init__(self, layers: list, held: list[int], num_experts: int, moe_layers: int) -> None:
        self.layers = layers  # empty while nothing is held
        self.num_experts = num_experts
        self.moe_layers = moe_layers
        self._index(held)

    def _index(self, held: list[int]) -> None:
        self.held = held
        # Global expert id -> index in this worker's stacked arrays; -1 where not held.
        self.local = np.full(self.num_experts, -1, np.int32)
        self.local[held] = np.arange(len(held), dtype=np.int32)

    def keep(self, held: list[int]) -> None:
        """Let go of every expert but `held` (a subset of those held), in memory: nothing is
        read again. Runs on the MLX thread, between requests."""
        held = sorted(set(held) & set(self.held))
        if not held:
            self.layers = []
        else:
            idx = mx.array(self.local[held], dtype=mx.int32)
            for layer in self.layers:
                layer.keep(idx)
        self._index(held)
        gc.collect()
        mx.clear_cache()

    def check(self, req: ExpertRequest) -> np.ndarray:
        """The request's experts as indices into the held ones; WireError (NotHeld) if it
        cannot be served here."""
        if not 0 <= req.layer < self.moe_layers:
            raise WireError(f"layer {req.layer} out of range (0..{self.moe_layers - 1})")
        if len(req.experts) and (req.experts.min() < 0 or req.experts.max() >= self.num_experts):
            raise WireError(f"expert id out of range (0..{self.num_experts - 1})")
        local = self.local[req.experts]
        if (local < 0).any():
            missing = sorted(set(req.experts[local < 0].tolist()))
            raise NotHeld(f"experts {missing} are not held by this worker")
        return local

    def compute(self, req: ExpertRequest) -> bytes:
        """expert(x[row]) for every pair of the request; runs on the MLX thread."""
        start = time.perf_counter()
        local = self.check(req)
        if not len(local):
            return encode_reply(req.dtype, req.x[:0])
        y = self.layers[req.layer](req.x, req.dtype, req.rows, local)  # (pairs, D), in request order
        return encode_reply(req.dtype, y, int(1e6 * (time.perf_counter() - start)))


def load_experts(path: Path, held: list[int]) -> tuple[LocalExperts, ModelInfo]:
    """Load only the experts `held`, from every MoE layer; a worker's snapshot of the Hugging
    Face cache first fetches the shards holding them (nothing when they are here)."""
    held = sorted(set(held))
    fetch_experts(path, held)
    model, config = load_lazy(path)
    slots = find_experts(model)
    info = describe(path, config, slots)
    modules = [_stack_held(slot, held) for slot in slots] if held else []
    if missing(path):
        check_fetched(path, modules)
    layers = _evaluate(modules)
    del model, slots
    return _settle(layers, held, info.num_experts, info.moe_layers), info


def load_fetched(dest: Path, manifest: ModelManifest, held: list[int]) -> LocalExperts:
    """The experts `held` from the directory `modelstore.fetch` filled: the same LocalExperts
    load_experts(checkpoint, held) builds. Runs on the MLX thread.

    mlx-lm builds the model from config.json and a partial checkpoint of only these experts,
    written in the model's own parameter names, so its quantization applies as it would to the
    checkpoint; the rest of the model stays unevaluated random init and is never read.
    """
    held = sorted(set(held))
    if not held:
        return LocalExperts([], [], manifest.num_experts, manifest.moe_layers)
    with tempfile.TemporaryDirectory(prefix="partial-", dir=dest) as tmp:
        partial = Path(tmp)
        for name in manifest.files:
            shutil.copyfile(dest / name, partial / name)
        for layer, path in enumerate(manifest.slots):
            weights = _fetched_layer(dest, layer, path, held, manifest.stacked)
            mx.save_safetensors(str(partial / f"model-{layer:05d}.safetensors"), weights)
            del weights  # one layer in memory at a time
        # The published quantization settings: a legacy format (AWQ...) was converted at publish.
        overrides = {"quantization": manifest.quantization} if manifest.quantization else None
        try:
            model, _ = load_model(partial, lazy=True, strict=False, get_model_classes=_presanitized,
                                  model_config=overrides)
        except (ValueError, KeyError) as e:
            raise ModelError(f"{manifest.name}: mlx-lm cannot build this model: {e}") from None
        slots = find_experts(model)
        if [s.path for s in slots] != manifest.slots:
            raise ModelError(f"{manifest.name}: mlx-lm's model has experts modules {[s.path for s in slots]}, "
                             f"the manifest {manifest.slots}")
        # Stacked arrays already hold `held` in order; a list of expert modules is indexed globally.
        layers = _evaluate([s.module if manifest.stacked else _stack_held(s, held) for s in slots])
        del model, slots
    return _settle(layers, held, manifest.num_experts, manifest.moe_layers)


def _fetched_layer(dest: Path, layer: int, path: str, held: list[int], stacked: bool) -> dict[str, mx.array]:
    """One MoE layer's held experts under the model's parameter names: stacked in `held`'s
    order, or one module per expert (DBRX's list)."""
    parts = []
    for e in held:
        file = dest / expert_file(layer, e)
        if not file.is_file():
            raise ModelError(f"{file}: expert {e} of MoE layer {layer} was not fetched")
        parts.append(mx.load(str(file)))
    if any(p.keys() != parts[0].keys() for p in parts):
        raise ModelError(f"{dest}: the experts of MoE layer {layer} hold different tensors")
    if stacked:
        return {f"{path}.{name}": mx.stack([p[name] for p in parts]) for name in parts[0]}
    return {f"{path}.{e}.{name}": a for e, p in zip(held, parts) for name, a in p.items()}


def _presanitized(config: dict) -> tuple[type, type]:
    """mlx-lm's classes for `config`, less sanitize: fetched tensors already carry the loaded
    model's own names, and a checkpoint quirk must not be undone twice."""
    model_class, args_class = _get_classes(config)
    return type(model_class.__name__, (model_class,), {"sanitize": lambda self, weights: weights}), args_class


def _evaluate(modules: list[nn.Module]) -> list:
    layers = []
    for module in modules:
        layer = GroupedExperts(module) if groupable(module) else StackedExperts(module)
        mx.eval(module.parameters())  # reads this layer's held experts, nothing else
        layers.append(layer)
    return layers


def _settle(layers: list, held: list[int], num_experts: int, moe_layers: int) -> LocalExperts:
    gc.collect()
    mx.clear_cache()
    # Metal: wire up to the recommended working set so the stacked expert arrays stay
    # resident instead of being re-wired on use (the hidden cost NOTES.md describes).
    # The CPU build reports no working set and this does nothing.
    maybe_set_recommended_wired_limit()
    return LocalExperts(layers, held, num_experts, moe_layers)


def expert_bytes(path: Path) -> tuple[int, ModelInfo]:
    """Bytes one expert takes over every MoE layer (what a worker's capacity is counted in),
    from the checkpoint's shapes alone: nothing is read."""
    model, config = load_lazy(path)
    slots = find_experts(model)
    info = describe(path, config, slots)
    total = 0
    for slot in slots:
        params = [slot.module[0].parameters()] if isinstance(slot.module, list) else [slot.module.parameters()]
        per = sum(a.nbytes for p in params for _, a in tree_flatten(p))
        total += per if isinstance(slot.module, list) else per // slot.num_experts
    return total, info


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

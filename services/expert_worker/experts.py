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
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_model, maybe_set_recommended_wired_limit

from services.expert_compute import NotHeld, check_request, compute_layer, stack_held
from shared.errors import ModelError
from shared.model import ModelInfo, describe, find_experts, load_lazy
from shared.modelstore import ModelManifest, expert_file
from shared.placement import Pairs, as_pairs, experts_in, narrowed
from shared.shards import check_fetched, fetch_experts, missing
from shared.wire import ExpertRequest, encode_reply


class LocalExperts:
    def __init__(self, layers: list, held: list[int] | Pairs, num_experts: int, moe_layers: int) -> None:
        self.layers = layers  # per MoE layer its stacked experts, None where it holds none
        self.num_experts = num_experts
        self.moe_layers = moe_layers
        self._index(as_pairs(held, moe_layers))

    def _index(self, pairs: Pairs) -> None:
        self.pairs = pairs
        self.held = experts_in(pairs)
        # Per layer, global expert id -> index in this worker's stacked arrays; -1 where not held.
        self.local = np.full((self.moe_layers, self.num_experts), -1, np.int32)
        for layer, row in enumerate(pairs):
            self.local[layer, row] = np.arange(len(row), dtype=np.int32)

    def keep(self, held: list[int] | Pairs) -> None:
        """Let go of every expert but `held` (a subset of those held), in memory: nothing is
        read again. Runs on the MLX thread, between requests."""
        pairs = narrowed(held, self.pairs)
        if not any(pairs):
            self.layers = []
        else:
            for layer, row in enumerate(pairs):
                if not row:
                    self.layers[layer] = None
                elif self.layers[layer] is not None:
                    self.layers[layer].keep(mx.array(self.local[layer, row], dtype=mx.int32))
        self._index(pairs)
        gc.collect()
        mx.clear_cache()

    def check(self, req: ExpertRequest) -> np.ndarray:
        """The request's experts as indices into the held ones; WireError (NotHeld) if it
        cannot be served here."""
        check_request(req, self.moe_layers, self.num_experts)
        local = self.local[req.layer, req.experts]
        if (local < 0).any():
            missing = sorted(set(req.experts[local < 0].tolist()))
            raise NotHeld(f"experts {missing} of layer {req.layer} are not held by this worker")
        return local

    def compute(self, req: ExpertRequest) -> bytes:
        """expert(x[row]) for every pair of the request; runs on the MLX thread."""
        start = time.perf_counter()
        local = self.check(req)
        if not len(local):
            return encode_reply(req.dtype, req.x[:0])
        y = self.layers[req.layer](req.x, req.dtype, req.rows, local)  # (pairs, D), in request order
        return encode_reply(req.dtype, y, int(1e6 * (time.perf_counter() - start)))

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def load_experts(path: Path, held: list[int] | Pairs) -> tuple[LocalExperts, ModelInfo]:
    """Load only the experts `held` (per MoE layer, or the same in every layer); a worker's
    snapshot of the Hugging Face cache first fetches the shards holding them (nothing when they
    are here)."""
    ids = experts_in(held)
    fetch_experts(path, ids)
    model, config = load_lazy(path)
    slots = find_experts(model)
    info = describe(path, config, slots)
    pairs = as_pairs(held, info.moe_layers)
    modules = [stack_held(slot, row) if row else None for slot, row in zip(slots, pairs)]
    if missing(path):
        check_fetched(path, [m for m in modules if m is not None])
    layers = _evaluate(modules) if ids else []
    del model, slots
    return _settle(layers, pairs, info.num_experts, info.moe_layers), info


def load_fetched(dest: Path, manifest: ModelManifest, held: list[int] | Pairs) -> LocalExperts:
    """The experts `held` (per MoE layer, or the same in every layer) from the directory
    `modelstore.fetch` filled: the same LocalExperts load_experts(checkpoint, held) builds.
    Runs on the MLX thread.

    mlx-lm builds the model from config.json and a partial checkpoint of only these experts,
    written in the model's own parameter names, so its quantization applies as it would to the
    checkpoint; the rest of the model stays unevaluated random init and is never read.
    """
    pairs = as_pairs(held, manifest.moe_layers)
    if not any(pairs):
        return LocalExperts([], pairs, manifest.num_experts, manifest.moe_layers)
    with tempfile.TemporaryDirectory(prefix="partial-", dir=dest) as tmp:
        partial = Path(tmp)
        for name in manifest.files:
            shutil.copyfile(dest / name, partial / name)
        for layer, (path, row) in enumerate(zip(manifest.slots, pairs)):
            if not row:
                continue  # nothing of this layer: its experts stay random init, never evaluated
            weights = _fetched_layer(dest, layer, path, row, manifest.stacked)
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
        # Stacked arrays already hold the layer's experts in order; a list of expert modules is
        # indexed globally.
        layers = _evaluate([None if not row else s.module if manifest.stacked else stack_held(s, row)
                            for s, row in zip(slots, pairs)])
        del model, slots
    return _settle(layers, pairs, manifest.num_experts, manifest.moe_layers)


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


def _evaluate(modules: list[nn.Module | None]) -> list:
    layers = []
    for module in modules:
        if module is None:  # no expert of this layer held
            layers.append(None)
            continue
        layer = compute_layer(module)
        mx.eval(module.parameters())  # reads this layer's held experts, nothing else
        layers.append(layer)
    return layers


def _settle(layers: list, held: Pairs, num_experts: int, moe_layers: int) -> LocalExperts:
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

"""Loading a MoE checkpoint with mlx-lm and finding its one seam: the experts module.

mlx-lm builds the model lazily; the router then swaps every experts module for one that
calls the bus, and the worker keeps only the experts it owns, so neither ever reads the
weights it does not need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import load_model

from shared.errors import ModelError
from shared.hub import model_name

_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


@dataclass(frozen=True)
class ExpertSlot:
    """One MoE layer's experts: `owner.<attr>` is the module to swap."""

    path: str
    owner: nn.Module
    attr: str
    module: Any  # SwitchGLU / SwitchMLP, or DBRX's list of expert MLPs
    num_experts: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_type: str
    fingerprint: str
    max_context: int
    num_experts: int
    moe_layers: int


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path}: no config.json, not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg}: not valid JSON ({e})") from None


def fingerprint(path: Path) -> str:
    """The same checkpoint gives the same fingerprint on every machine."""
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]


def load_lazy(path: Path) -> tuple[nn.Module, dict]:
    """mlx-lm's model with lazily loaded weights; nothing is read until evaluated. A worker's
    snapshot without all its shards: the others' tensors are placeholders (shared.shards)."""
    from shared.shards import partial_classes
    read_config(path)
    classes = partial_classes(path)
    # Not strict with placeholders: mlx-lm would refuse a snapshot with no weight file yet.
    partial = {} if classes is None else {"get_model_classes": classes, "strict": False}
    try:
        return load_model(path, lazy=True, **partial)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ModelError(f"{path}: mlx-lm cannot load this model: {e}") from None


def find_experts(model: nn.Module) -> list[ExpertSlot]:
    """Every MoE layer's experts module, in layer order."""
    slots: list[ExpertSlot] = []
    for path, module in model.named_modules():
        for attr, child in module.children().items():
            if isinstance(child, (SwitchGLU, SwitchMLP)):
                n = (child.gate_proj if isinstance(child, SwitchGLU) else child.fc1).num_experts
                slots.append(ExpertSlot(f"{path}.{attr}" if path else attr, module, attr, child, n))
            elif attr == "experts" and isinstance(child, list) and _is_dbrx_block(module):
                slots.append(ExpertSlot(f"{path}.{attr}", module, attr, child, len(child)))
    # named_modules walks depth-first from the leaves up; sort by layer number.
    slots.sort(key=lambda s: _layer_key(s.path))
    return slots


def describe(path: Path, config: dict, slots: list[ExpertSlot]) -> ModelInfo:
    if not slots:
        raise ModelError(
            f"{path}: model_type {config.get('model_type')!r} has no experts module; "
            "moebus serves Mixture-of-Experts models only"
        )
    counts = {s.num_experts for s in slots}
    if len(counts) != 1:
        raise ModelError(f"{path}: MoE layers disagree on the number of experts {sorted(counts)}")
    context = next((int(config[k]) for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), 4096)
    return ModelInfo(
        name=model_name(path),
        model_type=str(config.get("model_type")),
        fingerprint=fingerprint(path),
        max_context=context,
        num_experts=counts.pop(),
        moe_layers=len(slots),
    )


def _is_dbrx_block(module: nn.Module) -> bool:
    return hasattr(module, "router") and hasattr(module, "num_experts_per_tok")


def _layer_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))

"""A checkpoint's weight files, and which of them hold which experts.

A checkpoint split in shards names the file of every tensor in model.safetensors.index.json.
A worker given a repo id starts from a snapshot without weights (shared.hub, weights=False) and
fetches only the shards holding tensors of the experts placed on it. mlx-lm then builds the model
from the shards that are here; every tensor of the others stands in as a placeholder of its shape
and dtype (read from the shards' headers), which is never evaluated: NaN where it is a float, so
an expert tensor this module failed to recognise shows in `check_fetched` instead of computing.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shared.errors import ModelError
from shared.hub import fetch_files, hub_errors, origin

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"  # an unsharded checkpoint: mlx-lm's name for its one file
# One expert's tensor, numbered (Mixtral's and Qwen3's hub layout: ...experts.7.w1.weight) ...
_ONE_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# ... or a layer's experts stacked in one tensor (mlx-lm's layout: ...switch_mlp.gate_proj.weight).
_ALL_EXPERTS = re.compile(r"\.(?:experts|switch_mlp)\.")

Header = dict[str, tuple[str, list[int]]]  # tensor name -> (safetensors dtype, shape)


def weight_map(path: Path) -> dict[str, str] | None:
    """Tensor name -> weight file, from the index; None for an unsharded checkpoint."""
    index = path / INDEX
    if not index.is_file():
        return None
    try:
        found = json.loads(index.read_text())["weight_map"]
        return {str(k): str(v) for k, v in found.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{index}: not a safetensors index ({e!r})") from None


def weight_files(path: Path) -> list[str]:
    wm = weight_map(path)
    return sorted(set(wm.values())) if wm is not None else [SINGLE]


def expert_files(wm: dict[str, str] | None, held: Iterable[int]) -> list[str]:
    """The weight files holding a tensor of an expert in `held` (every layer's)."""
    held = set(held)
    if wm is None:
        return [SINGLE] if held else []
    files = set()
    for key, file in wm.items():
        one = _ONE_EXPERT.search(key)
        if (int(one[1]) in held) if one else (held and _ALL_EXPERTS.search(key)):
            files.add(file)
    return sorted(files)


def missing(path: Path) -> list[str]:
    """Weight files a snapshot of the Hugging Face cache lacks (a worker's); a directory of
    one's own is taken as it is."""
    if origin(path) is None:
        return []
    return [f for f in weight_files(path) if not (path / f).is_file()]


def fetch_experts(path: Path, held: Iterable[int]) -> None:
    """Download the shards of `held` a worker's snapshot lacks (nothing to do for a whole one)."""
    if missing(path):
        fetch_files(path, expert_files(weight_map(path), held))


def headers(path: Path) -> Header:
    """Every tensor's dtype and shape: from the shards here, and the others' headers from the
    Hub (a range request each), kept under MOEBUS_HOME for the next start, offline too."""
    from shared.config import home
    found = origin(path)
    assert found is not None, "only a snapshot of the cache lacks shards"
    kept = home() / "hub" / f"models--{found.repo_id.replace('/', '--')}" / f"{found.commit}.json"
    try:
        return {k: (v[0], v[1]) for k, v in json.loads(kept.read_text()).items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass  # not kept yet, or not by us
    out: Header = {}
    for name in weight_files(path):
        out.update(_local_header(path / name) if (path / name).is_file() else _remote_header(path, name))
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(kept)
    return out


def _local_header(file: Path) -> Header:
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            raw = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{file}: not a safetensors file ({e})") from None
    return {k: (v["dtype"], list(v["shape"])) for k, v in raw.items() if k != "__metadata__"}


def _remote_header(path: Path, name: str) -> Header:
    from huggingface_hub import HfApi
    found = origin(path)
    assert found is not None
    with hub_errors(found.repo_id, found.commit):
        meta = HfApi().parse_safetensors_file_metadata(found.repo_id, name, revision=found.commit)
    return {k: (t.dtype, list(t.shape)) for k, t in meta.tensors.items()}


def completed_classes(header: Header) -> Callable[[dict], tuple[type, type]]:
    """mlx-lm's `get_model_classes` for a model whose missing tensors are placeholders: its
    sanitize (and quantization, which looks at the weights' names) then sees a whole checkpoint."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    def placeholder(dtype: str, shape: list[int]) -> Any:
        kind = _DTYPES.get(dtype)
        if kind is None:
            raise ModelError(f"tensor dtype {dtype} of a shard not fetched is not one mlx reads")
        kind = getattr(mx, kind)
        return mx.full(shape, float("nan"), kind) if mx.issubdtype(kind, mx.floating) else mx.zeros(shape, kind)

    def classes(config: dict) -> tuple[type, type]:
        model_class, args_class = _get_classes(config)
        original = getattr(model_class, "sanitize", None)

        def sanitize(self: Any, weights: dict) -> dict:
            weights.update({k: placeholder(*v) for k, v in header.items() if k not in weights})
            return original(self, weights) if original is not None else weights

        return type(model_class.__name__, (model_class,), {"sanitize": sanitize}), args_class

    return classes


def partial_classes(path: Path) -> Callable[[dict], tuple[type, type]] | None:
    """completed_classes for a snapshot that lacks shards; None when every one is here."""
    return completed_classes(headers(path)) if missing(path) else None


def check_fetched(path: Path, modules: list) -> None:
    """Refuse experts built from a placeholder: a tensor of theirs this module did not fetch."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    for module in modules:
        for _, a in tree_flatten(module.parameters()):
            if mx.issubdtype(a.dtype, mx.floating) and mx.isnan(a).any().item():
                raise ModelError(f"{path}: a tensor of the experts held is in none of the shards fetched (an "
                                 "expert naming moebus does not know): give --model a whole local copy")


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
           "BOOL": "bool_", "F8_E4M3": "uint8", "F8_E5M2": "uint8"}

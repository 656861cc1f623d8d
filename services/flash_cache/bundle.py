"""The bundle: a model's experts on SSD for the flash-cache, one contiguous record per
(MoE layer, expert).

    DIR/experts.bin   records [layer][expert], each at a 4 KiB-aligned offset: gate rows, up rows
                      (together the (2F, D) gate|up matrix the compute reads), then down (D, F)
    DIR/gates.bin     each MoE layer's gate (experts, D), float32: the flash-cache's guess of the
                      next layer's experts (prefetch); absent where the model's gate is not a plain Linear
    DIR/bundle.json   BundleManifest: the model it came from, the record layout, one crc32 per record

One record holds all three projections of an expert, so fetching an expert is one read of one
chunk (tens of KiB to MBs) instead of three smaller ones; moebus routes whole experts, so there is
no neuron-level split to bundle within a record. The manifest is written last: a bundle
interrupted while written has no manifest and is made again.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU
from pydantic import Field

from shared.errors import ModelError
from shared.messages import Big, Message
from shared.model import ExpertSlot, ModelInfo, describe, find_experts, load_lazy

MANIFEST, DATA, GATES = "bundle.json", "experts.bin", "gates.bin"
ALIGN = 4096
FORMAT = 2  # 2: gates.bin
# float32 and float16 are stored as they are and computed in numpy; bfloat16 (which numpy has
# no type for) is widened to float32.
DTYPES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "float32"}


class BundleManifest(Message):
    format: int = Field(ge=FORMAT, le=FORMAT)
    name: str = Field(max_length=256)
    model_type: str = Field(max_length=64)
    fingerprint: str = Field(max_length=64)  # the checkpoint's (shared.model.fingerprint)
    max_context: Big
    num_experts: int = Field(ge=1, le=1 << 16)
    moe_layers: int = Field(ge=1, le=1 << 12)
    top_k: int = Field(ge=1, le=1 << 16)  # experts each token routes to per layer
    hidden: int = Field(ge=1, le=1 << 20)  # D
    ffn: int = Field(ge=1, le=1 << 20)  # F: an expert's intermediate size
    dtype: str = Field(pattern=r"^(float32|float16)$")
    stride: Big  # bytes between records: the payload rounded up to ALIGN
    crc32: list[list[Big]]  # [layer][expert]
    gates_crc32: Big | None = None  # GATES written

    @property
    def gate_up_bytes(self) -> int:
        return 2 * self.ffn * self.hidden * np.dtype(self.dtype).itemsize

    @property
    def record_bytes(self) -> int:
        """An expert's payload: gate|up then down."""
        return 3 * self.ffn * self.hidden * np.dtype(self.dtype).itemsize

    def offset(self, layer: int, expert: int) -> int:
        return (layer * self.num_experts + expert) * self.stride

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, model_type=self.model_type, fingerprint=self.fingerprint,
                         max_context=self.max_context, num_experts=self.num_experts, moe_layers=self.moe_layers)


def top_k(config: dict) -> int:
    """Experts per token, under the names the supported families use."""
    for cfg in (config, config.get("ffn_config") or {}):
        for key in ("num_experts_per_tok", "moe_top_k", "top_k"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    raise ModelError("config.json names no experts-per-token (num_experts_per_tok)")


def _projections(slot: ExpertSlot) -> tuple[mx.array, mx.array, mx.array]:
    """The (E, F, D), (E, F, D), (E, D, F) weights of one layer's float SwiGLU experts."""
    from services.expert_worker.experts import _stack_held, groupable  # the worker's own checks and stacking
    glu = _stack_held(slot, list(range(slot.num_experts))) if isinstance(slot.module, list) else slot.module
    if not isinstance(glu, SwitchGLU) or not groupable(glu) or not isinstance(glu.activation, SwiGLU):
        raise ModelError(f"{slot.path}: the flash-cache serves float SwiGLU experts without biases; "
                         f"this model's ({type(glu).__name__}) are not")
    return glu.gate_proj.weight, glu.up_proj.weight, glu.down_proj.weight


def _gate(slot: ExpertSlot) -> np.ndarray | None:
    """The layer's router weights (experts, D) where they are one plain Linear (Mixtral's and
    Qwen's `gate`, DBRX's `router.layer`)."""
    for path in (("gate",), ("router", "layer")):
        module = slot.owner
        for name in path:
            module = getattr(module, name, None)
        if isinstance(module, nn.Linear) and module.weight.shape[0] == slot.num_experts and "bias" not in module:
            return np.asarray(module.weight.astype(mx.float32))
    return None


def write_bundle(model_path: Path, out: Path, progress=None) -> BundleManifest:
    """Write the bundle of the checkpoint at `model_path` into `out`, one MoE layer in memory
    at a time. `progress(done, total)` is called after each layer."""
    model, config = load_lazy(model_path)
    slots = find_experts(model)
    info = describe(model_path, config, slots)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # no manifest until the records are all there
    tmp = out / (DATA + ".part")
    crcs: list[list[int]] = []
    gates: list[np.ndarray | None] = []
    shape = None
    with open(tmp, "wb") as f:
        for n, slot in enumerate(slots):
            gate, up, down = _projections(slot)
            dtype = DTYPES.get(gate.dtype)
            if dtype is None:
                raise ModelError(f"{slot.path}: experts of dtype {gate.dtype} cannot be bundled")
            arrays = [np.asarray(a.astype(getattr(mx, dtype))) for a in (gate, up, down)]
            layer_shape = (gate.shape[1], gate.shape[2], dtype)
            if shape not in (None, layer_shape):
                raise ModelError(f"{slot.path}: experts of shape {layer_shape}, earlier layers {shape}")
            shape = layer_shape
            payload = sum(a[0].nbytes for a in arrays)
            stride = -(-payload // ALIGN) * ALIGN
            row = []
            for e in range(slot.num_experts):
                record = b"".join(a[e].tobytes() for a in arrays)
                row.append(zlib.crc32(record))
                f.write(record + bytes(stride - payload))
            crcs.append(row)
            gates.append(_gate(slot))
            del arrays, gate, up, down
            if progress:
                progress(n + 1, len(slots))
        f.flush()
        os.fsync(f.fileno())
    ffn, hidden, dtype = shape
    gates_crc = None
    if all(g is not None for g in gates):
        blob = np.stack(gates).astype("<f4").tobytes()
        (out / GATES).write_bytes(blob)
        gates_crc = zlib.crc32(blob)
    manifest = BundleManifest(
        format=FORMAT, name=info.name, model_type=info.model_type, fingerprint=info.fingerprint,
        max_context=info.max_context, num_experts=info.num_experts, moe_layers=info.moe_layers,
        top_k=top_k(config), hidden=hidden, ffn=ffn, dtype=dtype, stride=stride, crc32=crcs,
        gates_crc32=gates_crc,
    )
    os.replace(tmp, out / DATA)
    (out / MANIFEST).write_text(manifest.model_dump_json())
    return manifest


def open_bundle(path: Path, fingerprint: str | None = None) -> BundleManifest:
    """The manifest of the bundle at `path`, checked against its data file's size and, given
    one, the fingerprint of the model it must belong to."""
    try:
        manifest = BundleManifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ModelError(f"{path}: no {MANIFEST}: not a bundle, or one whose writing did not finish "
                         "(moebus bundle writes it again)") from None
    except ValueError as e:
        raise ModelError(f"{path / MANIFEST}: not a bundle manifest ({str(e).splitlines()[0]})") from None
    if len(manifest.crc32) != manifest.moe_layers or any(len(r) != manifest.num_experts for r in manifest.crc32):
        raise ModelError(f"{path / MANIFEST}: crc32 must list {manifest.moe_layers} x {manifest.num_experts} records")
    if manifest.stride < manifest.record_bytes:
        raise ModelError(f"{path / MANIFEST}: stride {manifest.stride} is under the record's {manifest.record_bytes} bytes")
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise ModelError(f"{path}: a bundle of another model ({manifest.name}, fingerprint {manifest.fingerprint}, "
                         f"not {fingerprint})")
    want = manifest.moe_layers * manifest.num_experts * manifest.stride
    try:
        size = (path / DATA).stat().st_size
    except FileNotFoundError:
        raise ModelError(f"{path}: no {DATA}") from None
    if size != want:
        raise ModelError(f"{path / DATA}: truncated or padded: {size} bytes, the manifest says {want}")
    return manifest


def read_gates(path: Path, m: BundleManifest) -> np.ndarray | None:
    """The gates (layers, experts, D) of the bundle at `path`, checked; None if it has none."""
    if m.gates_crc32 is None:
        return None
    blob = (path / GATES).read_bytes()
    if len(blob) != m.moe_layers * m.num_experts * m.hidden * 4 or zlib.crc32(blob) != m.gates_crc32:
        raise ModelError(f"{path / GATES}: corrupt (size or crc32 is not the manifest's): write the bundle again")
    return np.frombuffer(blob, "<f4").reshape(m.moe_layers, m.num_experts, m.hidden)


def ensure_bundle(model_path: Path, out: Path | None, root: Path) -> Path:
    """The bundle of `model_path`: at `out`, or under `root` by the checkpoint's key, written
    first (with a progress bar) when it is missing or unfinished; refused when it is another
    model's."""
    from shared.hub import model_name
    from shared.model import fingerprint
    from shared.modelstore import checkpoint_key
    out = out or root / "bundles" / checkpoint_key(model_path)
    try:
        found = open_bundle(out)
    except ModelError:  # missing, unfinished, truncated or of an older format: written anew
        found = None
    if found is not None:
        open_bundle(out, fingerprint(model_path))  # a bundle of another model: refused, not overwritten
        return out
    from tqdm import tqdm
    with tqdm(total=None, desc=f"bundling {model_name(model_path)} into {out}", unit="layer") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        write_bundle(model_path, out, progress)
    return out

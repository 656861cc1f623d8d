"""The bundle: a model's experts on SSD for the flash-cache, one contiguous record per
(MoE layer, expert).

    DIR/experts.bin   each MoE layer's records, one per expert at a 4 KiB-aligned stride: every
                      tensor of the expert's projections, as mlx-lm holds them
    DIR/gates.bin     each MoE layer's gate (experts, D), float32: the flash-cache's guess of the
                      next layer's experts (prefetch); absent where the model's gate is not a plain Linear
    DIR/bundle.json   BundleManifest: the model it came from, each layer's record layout, one
                      crc32 per record

A float layer's record is gate|up (2F, D) then down (D, F), in the checkpoint's dtype: the
(2F, D) gate|up matrix the grouped compute reads. A quantized layer's record holds each
projection's packed weight, scales and biases (and whatever else mlx-lm's quantized module
holds) with its bits, group size and mode, so the flash-cache computes with the module mlx-lm
computes with. Layers may differ (mixed-precision conversions): each has its own layout.

One record holds all of an expert, so fetching it is one read of one chunk (tens of KiB to
MBs) instead of several smaller ones; moebus routes whole experts, so there is no neuron-level
split to bundle within a record. The manifest is written last: a bundle interrupted while
written has no manifest and is made again.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU, SwitchLinear
from pydantic import Field

from services.expert_compute import quantized, stack_held
from shared.errors import ModelError
from shared.messages import Big, Message
from shared.model import ExpertSlot, ModelInfo, describe, find_experts, load_lazy

MANIFEST, DATA, GATES = "bundle.json", "experts.bin", "gates.bin"
ALIGN = 4096
FORMAT = 3  # 3: a layout per layer, quantized experts
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# How each dtype's bytes are held in numpy (which has no bfloat16: its raw 16 bits).
STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "uint32": "<u4", "uint8": "u1"}
MLX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "uint32": mx.uint32,
              "uint8": mx.uint8}
_TENSOR = r"^(gate_up|gate_proj|up_proj|down_proj)\.(weight|scales|biases|bias|global_scale)$"


class TensorSpec(Message):
    name: str = Field(pattern=_TENSOR)
    dtype: str = Field(pattern=r"^(float32|float16|bfloat16|uint32|uint8)$")
    shape: list[Annotated[int, Field(ge=1, le=1 << 24)]] = Field(max_length=3)  # one expert's
    offset: Big  # bytes from the start of the record

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(STORAGE[self.dtype]).itemsize


class Quant(Message):
    bits: int = Field(ge=1, le=8)
    group_size: int = Field(ge=1, le=1 << 12)
    mode: str = Field(pattern=r"^[a-z0-9]{1,16}$")


class LayerLayout(Message):
    """One MoE layer's records: the tensors of each, how its projections are quantized
    (absent: float), and where the layer's records sit in experts.bin."""

    tensors: list[TensorSpec] = Field(min_length=2, max_length=16)
    quant: dict[str, Quant] = Field(default_factory=dict, max_length=3)
    offset: Big  # of the layer's first record
    stride: Big  # bytes between records: the payload rounded up to ALIGN

    @property
    def record_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shape(self) -> tuple:
        """What makes two layers' records interchangeable in one slot: all but where they sit."""
        return tuple((t.name, t.dtype, tuple(t.shape), t.offset) for t in self.tensors), tuple(
            sorted((k, q.bits, q.group_size, q.mode) for k, q in self.quant.items()))


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
    layers: list[LayerLayout] = Field(max_length=1 << 12)
    crc32: list[list[Big]]  # [layer][expert]
    gates_crc32: Big | None = None  # GATES written

    @property
    def record_bytes(self) -> int:
        """The largest expert record of any layer."""
        return max(layer.record_bytes for layer in self.layers)

    @property
    def expert_bytes(self) -> int:
        """One expert over every MoE layer."""
        return sum(layer.record_bytes for layer in self.layers)

    @property
    def data_bytes(self) -> int:
        return sum(layer.stride * self.num_experts for layer in self.layers)

    def offset(self, layer: int, expert: int) -> int:
        return self.layers[layer].offset + expert * self.layers[layer].stride

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


def _tensors(slot: ExpertSlot) -> tuple[list[tuple[str, mx.array]], dict[str, Quant], SwitchGLU]:
    """One layer's expert tensors, stacked (E, ...), in record order; how each projection is
    quantized; the module they come from."""
    glu = stack_held(slot, list(range(slot.num_experts))) if isinstance(slot.module, list) else slot.module
    if not isinstance(glu, SwitchGLU) or not isinstance(glu.activation, SwiGLU):
        raise ModelError(f"{slot.path}: the flash-cache serves mlx-lm's SwitchGLU experts with SwiGLU; "
                         f"this model's ({type(glu).__name__}) are not")
    projections = {p: getattr(glu, p) for p in PROJECTIONS}
    if not quantized(glu) and not any("bias" in m for m in projections.values()):
        # gate rows then up rows: the (2F, D) gate|up matrix the grouped compute reads
        return [("gate_proj.weight", glu.gate_proj.weight), ("up_proj.weight", glu.up_proj.weight),
                ("down_proj.weight", glu.down_proj.weight)], {}, glu
    tensors, quant = [], {}
    for name, module in projections.items():
        if isinstance(module, QuantizedSwitchLinear):
            quant[name] = Quant(bits=module.bits, group_size=module.group_size, mode=module.mode)
        elif not isinstance(module, SwitchLinear):
            raise ModelError(f"{slot.path}.{name}: a {type(module).__name__}, not a (quantized) SwitchLinear")
        tensors += [(f"{name}.{k}", a) for k, a in tree_flatten(module.parameters())]
    return tensors, quant, glu


def _layout(tensors: list[tuple[str, np.ndarray, str]], quant: dict[str, Quant], offset: int) -> LayerLayout:
    specs, at = [], 0
    for name, array, dtype in tensors:
        specs.append(TensorSpec(name=name, dtype=dtype, shape=list(array.shape[1:]), offset=at))
        at += array[0].nbytes
    if [t.name for t in specs] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]:
        # float without biases: gate and up are one tensor
        gate, up, down = specs
        specs = [TensorSpec(name="gate_up.weight", dtype=gate.dtype, shape=[2 * gate.shape[0], gate.shape[1]],
                            offset=0), down]
    return LayerLayout(tensors=specs, quant=quant, offset=offset, stride=-(-at // ALIGN) * ALIGN)


def _numpy(a: mx.array) -> tuple[np.ndarray, str]:
    """The array's bytes as numpy holds them, and its dtype's name."""
    name = next((k for k, v in MLX_DTYPES.items() if v == a.dtype), None)
    if name is None:
        raise ModelError(f"experts of dtype {a.dtype} cannot be bundled")
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a), name


def _gate(slot: ExpertSlot) -> np.ndarray | None:
    """The layer's router weights (experts, D) where they are one plain Linear (Mixtral's and
    Qwen's `gate`, DBRX's `router.layer`), dequantized if quantized: they only guess the next
    layer's experts for read-ahead."""
    for path in (("gate",), ("router", "layer")):
        module = slot.owner
        for name in path:
            module = getattr(module, name, None)
        if isinstance(module, nn.QuantizedLinear) and "bias" not in module:
            weight = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                                   module.bits, mode=module.mode)
        elif isinstance(module, nn.Linear) and "bias" not in module:
            weight = module.weight
        else:
            continue
        if weight.shape[0] == slot.num_experts:
            return np.asarray(weight.astype(mx.float32))
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
    layouts: list[LayerLayout] = []
    dims = None
    with open(tmp, "wb") as f:
        for n, slot in enumerate(slots):
            named, quant, glu = _tensors(slot)
            arrays = [(name, *_numpy(a)) for name, a in named]
            layout = _layout(arrays, quant, f.tell())
            dims = dims or (glu.gate_proj.input_dims, glu.gate_proj.output_dims)
            if glu.gate_proj.input_dims != dims[0]:
                raise ModelError(f"{slot.path}: experts of hidden size {glu.gate_proj.input_dims}, earlier layers {dims[0]}")
            row = []
            for e in range(slot.num_experts):
                record = b"".join(a[e].tobytes() for _, a, _ in arrays)
                row.append(zlib.crc32(record))
                f.write(record + bytes(layout.stride - len(record)))
            crcs.append(row)
            layouts.append(layout)
            gates.append(_gate(slot))
            del arrays, named, glu
            if progress:
                progress(n + 1, len(slots))
        f.flush()
        os.fsync(f.fileno())
    gates_crc = None
    if all(g is not None for g in gates):
        blob = np.stack(gates).astype("<f4").tobytes()
        (out / GATES).write_bytes(blob)
        gates_crc = zlib.crc32(blob)
    manifest = BundleManifest(
        format=FORMAT, name=info.name, model_type=info.model_type, fingerprint=info.fingerprint,
        max_context=info.max_context, num_experts=info.num_experts, moe_layers=info.moe_layers,
        top_k=top_k(config), hidden=dims[0], ffn=dims[1], layers=layouts, crc32=crcs, gates_crc32=gates_crc,
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
    _check_layout(path, manifest)
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise ModelError(f"{path}: a bundle of another model ({manifest.name}, fingerprint {manifest.fingerprint}, "
                         f"not {fingerprint})")
    want = manifest.data_bytes
    try:
        size = (path / DATA).stat().st_size
    except FileNotFoundError:
        raise ModelError(f"{path}: no {DATA}") from None
    if size != want:
        raise ModelError(f"{path / DATA}: truncated or padded: {size} bytes, the manifest says {want}")
    return manifest


def _check_layout(path: Path, m: BundleManifest) -> None:
    """Every layer's records inside the file, one after the other, each tensor inside its record."""
    if len(m.layers) != m.moe_layers:
        raise ModelError(f"{path / MANIFEST}: {len(m.layers)} layer layouts for {m.moe_layers} MoE layers")
    at = 0
    for n, layer in enumerate(m.layers):
        ends = [t.offset + t.nbytes for t in layer.tensors]
        starts = [t.offset for t in layer.tensors]
        if layer.offset != at or starts != [0, *ends[:-1]] or layer.stride < ends[-1]:
            raise ModelError(f"{path / MANIFEST}: MoE layer {n}'s record layout is not contiguous in its stride")
        at += layer.stride * m.num_experts


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

"""The model in a JetStream object store: the router publishes its checkpoint once, one object
per (MoE layer, expert), and a worker without the checkpoint fetches only its own experts.

Objects in the bucket MODEL_BUCKET, for a checkpoint whose copy is named `key`:

    {key}/config.json                 the small files mlx-lm reads to build the model
    {key}/experts/{layer}/{expert}    one expert's tensors in one MoE layer (safetensors, named
                                      relative to the layer's experts module)
    {key}/manifest.json               ModelManifest: every object above with its size and sha256
    current                           the key of the published model

The manifest is written after every object it lists and `current` after the manifest, so a
worker never sees a half-published model. Every fetched byte is checked against the manifest
before it lands where a loader looks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from nats.errors import NoRespondersError
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore
from pydantic import Field, model_validator

from shared import subjects
from shared.errors import ModelError, WireError
from shared.messages import Big, Message, decode, encode
from shared.model import ExpertSlot, ModelInfo, describe, find_experts, load_lazy
from shared.placement import Pairs, as_pairs

MODEL_BUCKET = subjects.MODEL_BUCKET
POINTER = "current"
# What mlx-lm's load_model reads besides weights (hf_quant_config.json: ModelOpt exports).
SMALL_FILES = ("config.json", "hf_quant_config.json")

MLXRun = Callable[..., Awaitable[Any]]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Key = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
# Fetched files are written under these names: no separators, no leading dot.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]


class StoredObject(Message):
    name: str = Field(max_length=256)  # in the object store
    size: Big
    sha256: Sha256


class ModelManifest(Message):
    """What a worker needs, without the checkpoint, to hold and compute some of its experts."""

    key: Key
    name: str = Field(max_length=256)
    model_type: str = Field(max_length=64)
    fingerprint: str = Field(max_length=64)
    max_context: Big
    num_experts: int = Field(ge=1, le=1 << 16)
    moe_layers: int = Field(ge=1, le=1 << 12)
    expert_bytes: Big  # one expert over every MoE layer, as experts.expert_bytes counts it
    # Each MoE layer's experts module in the model, e.g. model.layers.0.block_sparse_moe.switch_mlp.
    slots: list[Annotated[str, Field(max_length=256)]]
    stacked: bool  # the module holds (experts, ...) arrays; False: a list of expert modules (DBRX)
    # mlx-lm's settings once loaded: legacy formats (AWQ, GPTQ...) were converted at publish.
    quantization: dict[str, Any] | None = None
    files: dict[FileName, StoredObject] = Field(max_length=len(SMALL_FILES))
    experts: list[list[StoredObject]]  # [layer][expert]

    @model_validator(mode="after")
    def _shape(self) -> ModelManifest:
        if "config.json" not in self.files:
            raise ValueError("no config.json")
        if len(self.slots) != self.moe_layers or len(self.experts) != self.moe_layers:
            raise ValueError(f"slots and experts must list {self.moe_layers} MoE layers")
        if any(len(layer) != self.num_experts for layer in self.experts):
            raise ValueError(f"every MoE layer must list {self.num_experts} experts")
        return self

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, model_type=self.model_type, fingerprint=self.fingerprint,
                         max_context=self.max_context, num_experts=self.num_experts,
                         moe_layers=self.moe_layers)


def expert_object(key: str, layer: int, expert: int) -> str:
    return f"{key}/experts/{layer}/{expert}"


def expert_file(layer: int, expert: int) -> str:
    """Where `fetch` puts an expert's object in the directory it returns."""
    return f"layer{layer}-expert{expert}.safetensors"


def checkpoint_key(path: Path) -> str:
    """Names this checkpoint's published copy: its small files, and its weight files by name,
    size and mtime (hashing every weight byte would take minutes for a big model)."""
    h = hashlib.sha256()
    for name in SMALL_FILES:
        if (path / name).is_file():
            h.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


async def publish(js: JetStreamContext, path: Path, mlx_run: MLXRun) -> ModelManifest:
    """Fill the object store from the checkpoint at `path`, unless it already holds this copy;
    then point `current` at it, and if that moved it, delete every other copy."""
    key = checkpoint_key(path)
    store = await _store(js) or await js.create_object_store(MODEL_BUCKET)
    manifest = await _manifest(js, key)
    if manifest is None:
        manifest = await _upload(store, key, path, mlx_run)
    if await _pointer(js) != key:
        await store.put(POINTER, key.encode())
        await _prune(store, key)
    return manifest


async def current(js: JetStreamContext) -> ModelManifest | None:
    """The manifest of the published model, or None when nothing is published (yet)."""
    key = await _pointer(js)
    if key is None:
        return None
    manifest = await _manifest(js, key)
    if manifest is None:
        raise ModelError(f"object store {MODEL_BUCKET}: '{POINTER}' names {key}, which has no manifest")
    return manifest


async def fetch(js: JetStreamContext, manifest: ModelManifest, held: list[int] | Pairs, dest: Path) -> Path:
    """Download the small files and the experts `held` (per MoE layer, or the same in every
    layer: see `as_pairs`) into a directory under `dest`, kept as a cache: a file already there
    is kept if its sha256 matches. ModelError names an object that is missing, truncated or
    corrupt; it never lands in the directory."""
    try:
        pairs = as_pairs(held, manifest.moe_layers)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if bad := sorted({e for row in pairs for e in row if not 0 <= e < manifest.num_experts}):
        raise ModelError(f"experts {bad} out of range (0..{manifest.num_experts - 1})")
    out = dest / manifest.key
    out.mkdir(parents=True, exist_ok=True)
    wanted = [*manifest.files.items(),
              *((expert_file(layer, e), manifest.experts[layer][e]) for layer, row in enumerate(pairs) for e in row)]
    for file, obj in wanted:
        await _fetch_object(js, obj, out / file)
    return out


async def _store(js: JetStreamContext) -> ObjectStore | None:
    try:
        return await js.object_store(MODEL_BUCKET)
    except BucketNotFoundError:
        return None


async def _info(js: JetStreamContext, name: str) -> api.ObjectInfo | None:
    """An object's metadata (None: no such object, or no store yet), by a direct get."""
    meta = f"{subjects.MODEL_OBJECTS}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    try:
        msg = await js.get_last_msg(subjects.MODEL_STREAM, meta, direct=True)
    except (NotFoundError, NoRespondersError):
        return None
    try:
        info = api.ObjectInfo.from_response(json.loads(msg.data or b""))
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{name}: unreadable object metadata in {MODEL_BUCKET}: {e!r}") from None
    return None if info.deleted else info


async def _read(js: JetStreamContext, name: str) -> bytes | None:
    info = await _info(js, name)
    if info is None:
        return None
    return b"".join([chunk async for chunk in _chunks(js, info)])


async def _pointer(js: JetStreamContext) -> str | None:
    data = await _read(js, POINTER)
    if data is None:
        return None
    key = data.decode(errors="replace")
    if not (len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
        raise ModelError(f"object store {MODEL_BUCKET}: '{POINTER}' holds {key[:40]!r}, not a model key")
    return key


async def _manifest(js: JetStreamContext, key: str) -> ModelManifest | None:
    data = await _read(js, f"{key}/manifest.json")
    if data is None:
        return None
    try:
        manifest = decode(ModelManifest, data)
    except WireError as e:
        raise ModelError(f"{key}/manifest.json: {e}") from None
    if manifest.key != key:
        raise ModelError(f"{key}/manifest.json describes {manifest.key}")
    return manifest


async def _put(store: ObjectStore, name: str, data: bytes, sha256: str) -> StoredObject:
    await store.put(name, data)
    return StoredObject(name=name, size=len(data), sha256=sha256)


async def _upload(store: ObjectStore, key: str, path: Path, mlx_run: MLXRun) -> ModelManifest:
    files = {}
    for name in SMALL_FILES:
        if (path / name).is_file():
            data = (path / name).read_bytes()
            files[name] = await _put(store, f"{key}/{name}", data, hashlib.sha256(data).hexdigest())
    model, config = await mlx_run(load_lazy, path)
    slots: list[ExpertSlot] = await mlx_run(find_experts, model)
    info = describe(path, config, slots)
    experts: list[list[StoredObject]] = []
    per_expert = 0
    for layer, slot in enumerate(slots):
        tensors = await mlx_run(_take_layer, slot)
        per_expert += sum(a.nbytes for a in tensors[0].values())
        objects = []
        for e in range(len(tensors)):
            data, sha = await mlx_run(_serialize, tensors[e])
            tensors[e] = {}  # serializing copied the expert out of the layer: let the copy go
            objects.append(await _put(store, expert_object(key, layer, e), data, sha))
        experts.append(objects)
        del tensors  # every expert's slice shares the layer's arrays: now the layer can go
    manifest = ModelManifest(
        key=key, name=info.name, model_type=info.model_type, fingerprint=info.fingerprint,
        max_context=info.max_context, num_experts=info.num_experts, moe_layers=info.moe_layers,
        expert_bytes=per_expert, slots=[s.path for s in slots], stacked=not isinstance(slots[0].module, list),
        quantization=config.get("quantization"), files=files, experts=experts,
    )
    await store.put(f"{key}/manifest.json", encode(manifest))
    return manifest


def _take_layer(slot: ExpertSlot) -> list[dict[str, mx.array]]:
    """One MoE layer's experts, each as {name relative to the experts module: array}; the model
    lets go of the layer, so publishing holds about one layer (and one expert's copy) at a time."""
    modules = slot.module if isinstance(slot.module, list) else [slot.module]
    arrays = [dict(tree_flatten(m.parameters())) for m in modules]
    mx.eval(arrays)
    # Slices stay lazy: evaluated all at once they would copy the whole layer a second time.
    experts = arrays if isinstance(slot.module, list) else [
        {k: a[e] for k, a in arrays[0].items()} for e in range(slot.num_experts)]
    for m in modules:
        m.update(tree_map(lambda a: mx.zeros((0,), a.dtype), m.parameters()))
    return experts


def _serialize(tensors: dict[str, mx.array]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    mx.save_safetensors(buf, tensors)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


async def _prune(store: ObjectStore, key: str) -> None:
    """Delete the copies of other checkpoints: a changed checkpoint would otherwise leave a
    whole model behind in the store each time."""
    try:
        objects = await store.list(ignore_deletes=True)
    except NotFoundError:
        return
    for obj in objects:
        if obj.name != POINTER and not obj.name.startswith(f"{key}/"):
            await store.delete(obj.name)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Files this process fetched or checked, with the (size, mtime) they had then: a placement
# change reloads the whole share, and its unchanged files need not be hashed again.
_verified: dict[Path, tuple[int, int]] = {}


async def _fetch_object(js: JetStreamContext, obj: StoredObject, target: Path) -> None:
    if target.is_file():
        st = target.stat()
        if st.st_size == obj.size and (_verified.get(target) == (st.st_size, st.st_mtime_ns)
                                       or await asyncio.to_thread(_sha256, target) == obj.sha256):
            _verified[target] = (st.st_size, st.st_mtime_ns)
            return
    info = await _info(js, obj.name)
    if info is None:
        raise ModelError(f"{obj.name}: not in the object store {MODEL_BUCKET}")
    if info.size != obj.size:
        raise _size_error(obj, info.size)
    part = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.part")  # two workers may share a cache
    sha, size = hashlib.sha256(), 0
    try:
        with part.open("wb") as f:
            async for chunk in _chunks(js, info):
                sha.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if size != obj.size:
            raise _size_error(obj, size)
        if sha.hexdigest() != obj.sha256:
            raise ModelError(f"{obj.name}: corrupt: sha256 {sha.hexdigest()} is not the manifest's {obj.sha256}")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(target)
    st = target.stat()
    _verified[target] = (st.st_size, st.st_mtime_ns)


def _size_error(obj: StoredObject, size: int) -> ModelError:
    what = "truncated" if size < obj.size else "too long"
    return ModelError(f"{obj.name}: {what}: got {size} of {obj.size} bytes")


async def _chunks(js: JetStreamContext, info: api.ObjectInfo) -> AsyncIterator[bytes]:
    """An object's bytes by direct gets, chunk after chunk. Not nats-py's `get`: it makes a
    consumer, which a worker may not (a consumer's deliver subject is the creator's choice,
    see shared.security); and each get here has the bus's timeout, so nothing waits forever."""
    chunks = f"{subjects.MODEL_OBJECTS}.C.{info.nuid}"
    seq, got = 0, 0
    for _ in range(info.chunks or 0):
        try:
            msg = await js.get_msg(subjects.MODEL_STREAM, seq=seq + 1, subject=chunks, next=True, direct=True)
        except (NotFoundError, NoRespondersError):
            raise ModelError(f"{info.name}: chunks missing after {got} bytes (deleted meanwhile?)") from None
        seq = msg.seq or seq + 1
        got += len(msg.data or b"")
        yield msg.data or b""

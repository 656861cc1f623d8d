"""Binary expert messages: a fixed little-endian header, then raw array bytes.

ExpertRequest (router -> worker), one per worker per MoE layer:
    header  magic "MBQ1" | dtype u8 | pad u8*3 | layer u32 | rows u32 | dim u32 | pairs u32
    body    x      rows*dim values of `dtype`   the hidden states of the tokens this worker needs
            row    pairs int32                  which row of x each (token, expert) pair uses
            expert pairs int32                  the global expert id of each pair
ExpertReply (worker -> router):
    header  magic "MBR2" | dtype u8 | pad u8*3 | pairs u32 | dim u32 | compute_us u32
    body    y      pairs*dim values of `dtype`  expert(x[row]) for each pair, in request order
    compute_us is the worker's own time on the request: the router subtracts it from the
    round trip to tell the bus's share from the compute's.

Errors travel as NATS micro service errors (headers), never in this format.
Decoding returns numpy views into the message bytes: no copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from shared.errors import WireError

# Wire dtype code -> numpy storage dtype. bfloat16 travels as its raw 16 bits.
DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 2: np.dtype("<u2")}
DTYPE_NAMES = {0: "float32", 1: "float16", 2: "bfloat16"}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}

_REQ = struct.Struct("<4sB3xIIII")
_REP = struct.Struct("<4sB3xIII")
_REQ_MAGIC = b"MBQ1"
_REP_MAGIC = b"MBR2"
_I32 = np.dtype("<i4")


@dataclass(frozen=True)
class ExpertRequest:
    layer: int
    dtype: int
    x: np.ndarray  # (rows, dim)
    rows: np.ndarray  # (pairs,) int32
    experts: np.ndarray  # (pairs,) int32


@dataclass(frozen=True)
class ExpertReply:
    dtype: int
    y: np.ndarray  # (pairs, dim)
    compute_us: int


def request_size(rows: int, dim: int, pairs: int, itemsize: int) -> int:
    return _REQ.size + rows * dim * itemsize + 2 * pairs * 4


def reply_size(pairs: int, dim: int, itemsize: int) -> int:
    return _REP.size + pairs * dim * itemsize


def encode_request(layer: int, dtype: int, x: np.ndarray, rows: np.ndarray, experts: np.ndarray) -> bytes:
    n, dim = x.shape
    header = _REQ.pack(_REQ_MAGIC, dtype, layer, n, dim, len(rows))
    return b"".join(
        (header, _bytes(x, DTYPES[dtype]), _bytes(rows, _I32), _bytes(experts, _I32))
    )


def decode_request(data: bytes) -> ExpertRequest:
    if len(data) < _REQ.size:
        raise WireError(f"expert request: {len(data)} bytes is shorter than its header")
    magic, dtype, layer, n, dim, pairs = _REQ.unpack_from(data)
    if magic != _REQ_MAGIC:
        raise WireError(f"expert request: bad magic {magic!r}")
    np_dtype = _dtype(dtype)
    want = request_size(n, dim, pairs, np_dtype.itemsize)
    if len(data) != want:
        raise WireError(f"expert request: {len(data)} bytes, header says {want}")
    off = _REQ.size
    x = np.frombuffer(data, np_dtype, n * dim, off).reshape(n, dim)
    off += n * dim * np_dtype.itemsize
    rows = np.frombuffer(data, _I32, pairs, off)
    experts = np.frombuffer(data, _I32, pairs, off + 4 * pairs)
    if pairs and (rows.min() < 0 or rows.max() >= n):
        raise WireError("expert request: a pair points outside x")
    return ExpertRequest(layer, dtype, x, rows, experts)


def encode_reply(dtype: int, y: np.ndarray, compute_us: int = 0) -> bytes:
    pairs, dim = y.shape
    header = _REP.pack(_REP_MAGIC, dtype, pairs, dim, min(max(compute_us, 0), 0xFFFFFFFF))
    return header + _bytes(y, DTYPES[dtype])


def decode_reply(data: bytes) -> ExpertReply:
    if len(data) < _REP.size:
        raise WireError(f"expert reply: {len(data)} bytes is shorter than its header")
    magic, dtype, pairs, dim, compute_us = _REP.unpack_from(data)
    if magic != _REP_MAGIC:
        raise WireError(f"expert reply: bad magic {magic!r}")
    np_dtype = _dtype(dtype)
    if len(data) != reply_size(pairs, dim, np_dtype.itemsize):
        raise WireError("expert reply: length does not match its header")
    y = np.frombuffer(data, np_dtype, pairs * dim, _REP.size).reshape(pairs, dim)
    return ExpertReply(dtype, y, compute_us)


def _dtype(code: int) -> np.dtype:
    try:
        return DTYPES[code]
    except KeyError:
        raise WireError(f"unknown dtype code {code}") from None


def _bytes(a: np.ndarray, dtype: np.dtype) -> bytes | memoryview:
    if a.dtype != dtype:
        raise WireError(f"array of {a.dtype} where the header says {dtype}")
    if a.size == 0:
        return b""  # memoryview cannot cast a zero-sized shape
    return memoryview(np.ascontiguousarray(a)).cast("B")

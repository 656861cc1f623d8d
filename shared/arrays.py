"""Moving arrays between MLX and the wire's numpy views."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from shared.errors import WireError
from shared.wire import DTYPE_CODES

_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_CODE_MX = {code: _MX[name] for name, code in DTYPE_CODES.items()}


def wire_dtype(a: mx.array) -> int:
    for code, dt in _CODE_MX.items():
        if a.dtype == dt:
            return code
    raise WireError(f"no wire dtype for {a.dtype}")


def to_numpy(a: mx.array) -> np.ndarray:
    """Evaluated MLX array -> numpy in wire storage (bfloat16 as raw uint16)."""
    if a.dtype == mx.bfloat16:
        return np.asarray(a.view(mx.uint16))
    return np.asarray(a)


def to_mlx(a: np.ndarray, code: int) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if _CODE_MX[code] == mx.bfloat16 else out

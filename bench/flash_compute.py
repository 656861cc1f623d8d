"""The flash-cache's compute over its slots: what it uses (the worker's code, services.expert_compute)
against numpy alone, which the flash-cache used before, per request of R rows to one expert.

    python -m bench.flash_compute [--rows 1,4,16] [--reps 50]

Float32: the flash-cache's old numpy compute against the shared grouped compute (it measured
MLX's matmul at about half numpy's speed above GEMV_ROWS rows, and now uses numpy's too). 4-bit:
mlx-lm's quantized kernel (exact: what mlx-lm computes) against dequantizing the expert in MLX
and multiplying in numpy (not bit-equal, so not used). The bench model's
expert shape (D 512, F 1024). Prints a table; writes bench/flash_compute.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from shared.blas import reexec_with_fast_blas

if __name__ == "__main__":
    reexec_with_fast_blas("bench.flash_compute")  # the BLAS the flash-cache process has, before mlx loads

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU  # noqa: E402

from bench.table import write_and_show  # noqa: E402
from services.expert_compute import GroupedExperts, StackedExperts, swiglu  # noqa: E402
from shared.wire import DTYPE_CODES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
D, F, SLOTS = 512, 1024, 8


def _numpy_expert(gate_up: np.ndarray, down: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The flash-cache's numpy compute before it shared the worker's."""
    h = np.stack([gate_up @ row for row in xs]) if len(xs) <= 3 else xs @ gate_up.T
    a = swiglu(h)
    return np.stack([down @ row for row in a]) if len(a) <= 3 else a @ down.T


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "flash_compute.json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    gate_up = mx.array(rng.standard_normal((SLOTS, 2 * F, D)).astype(np.float32) * 0.05)
    down = mx.array(rng.standard_normal((SLOTS, D, F)).astype(np.float32) * 0.05)
    grouped = GroupedExperts(gate_up, down, SwiGLU())
    np_gate_up, np_down = np.array(gate_up, copy=False), np.array(down, copy=False)
    glu = SwitchGLU(D, F, SLOTS)
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = QuantizedSwitchLinear(D if name != "down_proj" else F, F if name != "down_proj" else D, SLOTS,
                                  bias=False, group_size=64, bits=4)
        setattr(glu, name, q)
    mx.eval(glu.parameters())
    stacked = StackedExperts(glu)
    code = DTYPE_CODES["float32"]

    def dequantized(proj) -> np.ndarray:
        return np.asarray(mx.dequantize(proj.weight[3], proj.scales[3], proj.biases[3], 64, 4))

    rows_out = []
    for r in map(int, a.rows.split(",")):
        x = rng.standard_normal((r, D)).astype(np.float32)
        rows, local = np.arange(r, dtype=np.int32), np.full(r, 3, np.int32)
        float_np = _time(lambda: _numpy_expert(np_gate_up[3], np_down[3], x), a.reps)
        float_shared = _time(lambda: grouped(x, code, rows, local), a.reps)
        q_mlx = _time(lambda: stacked(x, code, rows, local), a.reps)
        q_np = _time(lambda: _numpy_expert(np.concatenate([dequantized(glu.gate_proj), dequantized(glu.up_proj)]),
                                           dequantized(glu.down_proj), x), a.reps)
        rows_out.append({"rows": r, "float_numpy_us": round(float_np, 1), "float_shared_us": round(float_shared, 1),
                         "q4_mlx_us": round(q_mlx, 1), "q4_dequantize_numpy_us": round(q_np, 1)})
    report = {"machine": {"cores": os.cpu_count(), "os": platform.platform()},
              "shape": {"hidden": D, "ffn": F}, "rows": rows_out}
    write_and_show(a.out, report, rows_out, [("rows", "rows", 5), ("float numpy us", "float_numpy_us", 15),
                                             ("float shared us", "float_shared_us", 16),
                                             ("4-bit mlx us", "q4_mlx_us", 13),
                                             ("4-bit dequant+numpy us", "q4_dequantize_numpy_us", 23)])


if __name__ == "__main__":
    main()

"""A fast BLAS for mlx's CPU build on Linux.

The `mlx[cpu]` wheel calls a reference BLAS (1.7 GFLOP/s on a 64x4096x4096 fp32 matmul here);
preloading OpenBLAS (Debian's libopenblas0-pthread) gives ~98 GFLOP/s. The MLX services re-exec
themselves with it preloaded; MOEBUS_BLAS=reference turns that off. macOS uses Accelerate/Metal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def find_openblas() -> str | None:
    return next((p for p in CANDIDATES if Path(p).is_file()), None)


def fast_blas_env(env: dict[str, str]) -> dict[str, str] | None:
    """`env` with OpenBLAS preloaded, or None when there is nothing to change."""
    if not sys.platform.startswith("linux") or env.get("MOEBUS_BLAS") == "reference":
        return None
    lib = find_openblas()
    if lib is None or lib in env.get("LD_PRELOAD", ""):
        return None
    preload = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    # Threads: OpenBLAS's default (a thread per core) unless OPENBLAS_NUM_THREADS says otherwise;
    # `moebus up` sets it so the processes it starts share the cores (see blas_threads).
    return {**env, "LD_PRELOAD": preload}


def reexec_with_fast_blas(module: str) -> None:
    """Restart `python -m module` with OpenBLAS preloaded, if it is installed and not yet loaded."""
    env = fast_blas_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def blas_threads(cores: int, processes: int) -> int:
    """BLAS threads for each of `processes` MLX processes sharing one machine (`moebus up`).

    Expert matmuls read weights from DRAM and a second thread reads them faster, but only on
    an idle core: on 2 cores, giving the router and two workers two threads each cost a
    quarter of the throughput at 16 streams and the demo load fell from 6.4x to 5.0x. A
    service alone on its machine keeps OpenBLAS's default, one thread per core.
    """
    return max(1, cores // max(1, processes))

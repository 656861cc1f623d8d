"""The flash-cache's experts: records read from the bundle into a fixed number of DRAM slots
per MoE layer, and the compute for one request. Runs on the service's MLX thread.

A request's distinct experts are admitted in passes of at most the layer's slots
(`policy.LayerSlots`); the misses of a pass are read in parallel, one positioned read per
record straight into its slot, and checked against the record's crc32 before any of them is
used. After a read the kernel is told to drop the pages it cached for it, so the DRAM the
experts take is the slots' and nothing else, and what a test or benchmark counts as read came
from the disk.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from services.defaults import FLASH_MODES, READ_THREADS, WINDOW
from services.expert_worker.experts import GEMV_ROWS, NotHeld, _swiglu, groups
from services.flash_cache.bundle import DATA, BundleManifest, read_gates
from services.flash_cache.policy import LayerSlots
from shared.arrays import to_mlx, to_numpy
from shared.errors import ConfigError, ModelError, WireError
from shared.wire import DTYPE_NAMES, ExpertRequest, encode_reply



TRACE_MAX = 1 << 20  # requests a --trace keeps: a benchmark's, not a server's lifetime


@dataclass(frozen=True)
class FlashConfig:
    bundle: Path
    budget: int  # bytes of expert slots in DRAM, over every MoE layer
    window: int = WINDOW  # experts used in the last `window` requests to a layer are not evicted first
    policy: str = "lfu"
    # cache: the slots as a cache; on-demand: every routed expert read when used, nothing kept;
    # naive: every expert of the layer read for every request (the baseline the slots beat).
    mode: str = "cache"
    read_threads: int = READ_THREADS  # positioned reads in flight at once: SSDs serve parallel reads faster
    drop_page_cache: bool = True
    trace: Path | None = None  # written at close: each request's (layer, distinct experts)
    # After a request to layer L, read ahead the experts layer L+1's gate picks for the same
    # hidden states (the bundle keeps the gates): an early guess of the next request.
    prefetch: bool = False


def slots_per_layer(manifest: BundleManifest, budget: int) -> int:
    """The slots each MoE layer gets from `budget`; ConfigError when a layer could not hold even
    the experts one token routes to."""
    slots = min(manifest.num_experts, budget // (manifest.moe_layers * manifest.record_bytes))
    if slots < manifest.top_k:
        need = manifest.moe_layers * manifest.top_k * manifest.record_bytes
        raise ConfigError(f"--memory-budget {budget} bytes gives each of {manifest.moe_layers} MoE layers {slots} "
                          f"expert slots, under the {manifest.top_k} experts a token routes to: give at least "
                          f"{need} bytes ({manifest.record_bytes} bytes per expert record)")
    return slots


class FlashExperts:
    """Duck-types the worker's LocalExperts: `held`, `check`, `compute`, `keep`."""

    def __init__(self, manifest: BundleManifest, cfg: FlashConfig) -> None:
        if cfg.mode not in FLASH_MODES:
            raise ConfigError(f"flash-cache mode {cfg.mode!r}: one of {', '.join(FLASH_MODES)}")
        self.m, self.cfg = manifest, cfg
        self.num_experts, self.moe_layers = manifest.num_experts, manifest.moe_layers
        dtype, f, d = np.dtype(manifest.dtype), manifest.ffn, manifest.hidden
        # naive reads a whole layer each time, into one layer's worth of slots shared by all layers
        slots = manifest.num_experts if cfg.mode == "naive" else slots_per_layer(manifest, cfg.budget)
        self.slots = [LayerSlots(slots, cfg.window, cfg.policy) for _ in range(manifest.moe_layers)]
        buffers = 1 if cfg.mode == "naive" else manifest.moe_layers
        # Preallocated once: nothing is allocated per request. (untouched pages cost no memory)
        self.gate_up = [np.empty((slots, 2 * f, d), dtype) for _ in range(buffers)]
        self.down = [np.empty((slots, d, f), dtype) for _ in range(buffers)]
        self.fd = os.open(cfg.bundle / DATA, os.O_RDONLY)
        if sys.platform == "darwin" and cfg.drop_page_cache:
            import fcntl
            fcntl.fcntl(self.fd, fcntl.F_NOCACHE, 1)  # macOS has no posix_fadvise; reads bypass its cache
        self.pool = ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="flash-read")
        self.held: list[int] = []
        self.local = np.zeros(self.num_experts, bool)  # held here
        self.trace: list[tuple[int, list[int]]] = []
        self.gates = read_gates(cfg.bundle, manifest) if cfg.prefetch and cfg.mode == "cache" else None
        if cfg.prefetch and self.gates is None:
            raise ConfigError("--prefetch needs --mode cache and a bundle with its model's gates "
                              "(a gate that is one plain Linear)")
        self.ahead: dict[int, tuple[list[tuple[int, int]], list[Future]]] = {}  # layer -> reads in flight
        self.guessed: dict[int, set[int]] = {}  # layer -> experts read ahead for its next request
        self.counters = dict.fromkeys(("requests", "pairs", "hits", "misses", "records_read", "bytes_read",
                                       "io_us", "compute_us", "prefetched", "prefetch_used"), 0)

    def hold(self, held: list[int]) -> FlashExperts:
        """Serve `held` from now on (nothing is read until a request needs it)."""
        self.held = sorted(set(held))
        self.local[:] = False
        self.local[self.held] = True
        return self

    def keep(self, held: list[int]) -> None:
        for layer in list(self.ahead):
            self._settle(layer)
        gone = sorted(set(self.held) - set(held))
        for layer in self.slots:
            layer.drop(gone)
        self.hold(sorted(set(held) & set(self.held)))

    def close(self) -> None:
        for layer in list(self.ahead):
            self._settle(layer)
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        if self.cfg.trace is not None:
            self.cfg.trace.write_text(json.dumps({"layers": self.moe_layers, "experts": self.num_experts,
                                                  "requests": self.trace}))

    def stats(self) -> dict[str, int]:
        resident = sum(len(s.slot_of) for s in self.slots) if self.cfg.mode == "cache" else 0
        slots = sum(s.slots for s in self.slots) if self.cfg.mode != "naive" else self.num_experts
        # ru_maxrss: kilobytes on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {**self.counters, "resident_bytes": resident * self.m.record_bytes,
                "slot_bytes": slots * self.m.record_bytes, "peak_rss_bytes": peak}

    def check(self, req: ExpertRequest) -> None:
        if not 0 <= req.layer < self.moe_layers:
            raise WireError(f"layer {req.layer} out of range (0..{self.moe_layers - 1})")
        if len(req.experts) and (req.experts.min() < 0 or req.experts.max() >= self.num_experts):
            raise WireError(f"expert id out of range (0..{self.num_experts - 1})")
        if len(req.experts) and not self.local[req.experts].all():
            missing = sorted(set(req.experts[~self.local[req.experts]].tolist()))
            raise NotHeld(f"experts {missing} are not held by this flash-cache")

    def compute(self, req: ExpertRequest) -> bytes:
        start = time.perf_counter()
        self.check(req)
        if not len(req.experts):
            return encode_reply(req.dtype, req.x[:0])
        x = req.x if DTYPE_NAMES[req.dtype] == self.m.dtype else np.asarray(
            to_mlx(req.x, req.dtype).astype(getattr(mx, self.m.dtype)))
        order, slices = groups(req.experts)
        xs = x[req.rows[order]]
        out = np.empty((len(req.experts), x.shape[1]), x.dtype)
        layer = self.slots[req.layer]
        io = self._settle(req.layer)
        guessed = self.guessed.pop(req.layer, set())
        by_expert = {e: (lo, hi) for e, lo, hi in slices}
        if self.cfg.trace is not None and len(self.trace) < TRACE_MAX:
            self.trace.append((req.layer, list(by_expert)))
        for chunk in self._passes(req.layer, list(by_expert)):
            io += self._admit(req.layer, chunk)
            gate_up, down = self._buffers(req.layer)
            for e in chunk:
                lo, hi = by_expert[e]
                s = layer.slot_of[e] if self.cfg.mode != "naive" else e
                out[order[lo:hi]] = _expert(gate_up[s], down[s], xs[lo:hi])
            if self.cfg.mode == "on-demand":
                layer.drop(chunk)
        layer.tick()
        if self.gates is not None and req.layer + 1 < self.moe_layers:
            self._read_ahead(req.layer + 1, x)
        y = out if DTYPE_NAMES[req.dtype] == self.m.dtype else to_numpy(
            mx.array(out).astype(to_mlx(req.x[:0], req.dtype).dtype))
        spent = time.perf_counter() - start
        c = self.counters
        c["requests"] += 1
        c["pairs"] += len(req.experts)
        c["prefetch_used"] += len(guessed & by_expert.keys())
        c["io_us"] += int(1e6 * io)
        c["compute_us"] += int(1e6 * (spent - io))
        return encode_reply(req.dtype, y, int(1e6 * spent))

    def _passes(self, layer: int, experts: list[int]) -> list[list[int]]:
        if self.cfg.mode == "naive":
            return [experts]
        return self.slots[layer].passes(experts)

    def _buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        i = 0 if self.cfg.mode == "naive" else layer
        return self.gate_up[i], self.down[i]

    def _admit(self, layer: int, chunk: list[int]) -> float:
        """Make `chunk` resident; the seconds its reads took."""
        slots = self.slots[layer]
        if self.cfg.mode == "naive":
            loads = [(e, e) for e in range(self.num_experts)]
            self.counters["misses"] += len(chunk)
        else:
            hits, misses = slots.hits, slots.misses
            loads = slots.admit(chunk)
            self.counters["hits"] += slots.hits - hits
            self.counters["misses"] += slots.misses - misses
        if not loads:
            return 0.0
        start = time.perf_counter()
        gate_up, down = self._buffers(layer)
        try:
            bad = [r for r in self.pool.map(lambda es: self._read(layer, es[0], gate_up[es[1]], down[es[1]]), loads) if r]
        except BaseException:  # a read failed (the disk, the file): those slots hold unknown bytes
            slots.drop([e for e, _ in loads])
            raise
        if bad:  # nothing of this pass is computed: those slots now hold unknown bytes
            slots.drop([e for e, _ in loads])
            raise ModelError(f"{self.cfg.bundle / DATA}: {bad[0]}; the bundle is corrupt: write it again "
                             "(moebus bundle)")
        self.counters["records_read"] += len(loads)
        self.counters["bytes_read"] += len(loads) * self.m.record_bytes
        return time.perf_counter() - start

    def _read_ahead(self, layer: int, x: np.ndarray) -> None:
        """Start reading the experts `layer`'s gate picks for `x` (returns at once)."""
        self._settle(layer)  # one read-ahead per layer in flight
        logits = x.astype(np.float32, copy=False) @ self.gates[layer].T
        k = self.m.top_k
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        guess = [e for e in dict.fromkeys(top.ravel().tolist()) if self.local[e]][: self.slots[layer].slots]
        loads = self.slots[layer].prefetch(guess)
        if loads:
            gate_up, down = self._buffers(layer)
            self.ahead[layer] = (loads, [self.pool.submit(self._read, layer, e, gate_up[s], down[s]) for e, s in loads])
            self.counters["prefetched"] += len(loads)
        self.guessed[layer] = {e for e, _ in loads}

    def _settle(self, layer: int) -> float:
        """Wait for `layer`'s read-ahead: the seconds waited (a bad record is let go: a request
        needing it reads it again and fails by name)."""
        loads, futures = self.ahead.pop(layer, ([], []))
        if not loads:
            return 0.0
        start = time.perf_counter()
        bad = [e for (e, _), f in zip(loads, futures) if f.exception() or f.result()]
        self.slots[layer].drop(bad)
        self.counters["records_read"] += len(loads)
        self.counters["bytes_read"] += len(loads) * self.m.record_bytes
        return time.perf_counter() - start

    def _read(self, layer: int, expert: int, gate_up: np.ndarray, down: np.ndarray) -> str | None:
        """One record into its slot (a thread of the pool); what is wrong with it, or None."""
        offset, size = self.m.offset(layer, expert), self.m.record_bytes
        got = os.preadv(self.fd, [memoryview(gate_up).cast("B"), memoryview(down).cast("B")], offset)
        if self.cfg.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, self.m.stride, os.POSIX_FADV_DONTNEED)
        if got != size:
            return f"MoE layer {layer} expert {expert}: truncated record ({got} of {size} bytes)"
        crc = zlib.crc32(down, zlib.crc32(gate_up))
        if crc != self.m.crc32[layer][expert]:
            return f"MoE layer {layer} expert {expert}: crc32 {crc:08x} is not the manifest's {self.m.crc32[layer][expert]:08x}"
        return None


def _expert(gate_up: np.ndarray, down: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """down @ swiglu(gate_up @ x) for each row of xs: gemv per row for a few (no weight packing),
    one matrix product for more."""
    if len(xs) <= GEMV_ROWS:
        h = np.stack([gate_up @ row for row in xs])
    else:
        h = xs @ gate_up.T
    a = _swiglu(h)
    return np.stack([down @ row for row in a]) if len(a) <= GEMV_ROWS else a @ down.T

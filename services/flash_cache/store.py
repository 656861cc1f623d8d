"""The flash-cache's experts: records read from the bundle into a fixed pool of DRAM slots, and
the compute for one request. Runs on the service's MLX thread.

The slots are MLX arrays, stacked as a worker stacks the experts it holds, and computed by the
same code (services.expert_compute) indexed by slot; the reads go straight into them through
numpy views of the same memory. Every MoE layer whose records have one layout shares one pool
(`policy.SlotPool`, keyed by (layer, expert)); a mixed-precision model has a pool per layout,
each given the budget in proportion to its layers' share of the experts' bytes.

A request's distinct experts are admitted in passes of at most the pool's slots; the misses of a
pass are read in parallel, one positioned read per record straight into its slot, and checked
against the record's crc32 before any of them is used. After a read the kernel is told to drop
the pages it cached for it, so the DRAM the experts take is the slots' and nothing else, and
what a test or benchmark counts as read came from the disk.
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
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU, SwitchLinear
from mlx_lm.utils import maybe_set_recommended_wired_limit

from services.defaults import FLASH_MODES, READ_THREADS, WINDOW
from services.expert_compute import GroupedExperts, NotHeld, StackedExperts, check_request
from services.flash_cache.bundle import DATA, MLX_DTYPES, PROJECTIONS, BundleManifest, LayerLayout, read_gates
from services.flash_cache.policy import SlotPool
from shared.arrays import to_mlx
from shared.errors import ConfigError, ModelError
from shared.placement import Pairs, as_pairs, experts_in, narrowed
from shared.wire import ExpertRequest, encode_reply

TRACE_MAX = 1 << 20  # requests a --trace keeps: a benchmark's, not a server's lifetime


@dataclass(frozen=True)
class FlashConfig:
    bundle: Path
    budget: int  # bytes of expert slots in DRAM, over every MoE layer
    window: int = WINDOW  # experts the last `window` tokens used are not evicted first
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


@dataclass(frozen=True)
class PoolPlan:
    layers: tuple[int, ...]  # the MoE layers whose records share this pool's layout
    slots: int
    record_bytes: int


def plan_pools(m: BundleManifest, budget: int) -> list[PoolPlan]:
    """The slot pools `budget` buys: one per record layout, each its share of the budget by its
    layers' bytes. ConfigError when a pool could not hold the experts one token routes to."""
    classes: dict[tuple, list[int]] = {}
    for n, layer in enumerate(m.layers):
        classes.setdefault(layer.shape(), []).append(n)
    total = m.num_experts * m.expert_bytes
    plans = []
    for layers in classes.values():
        record = m.layers[layers[0]].record_bytes
        share = len(layers) * m.num_experts * record
        plans.append(PoolPlan(tuple(layers), min(len(layers) * m.num_experts, budget * share // total // record),
                              record))
    short = [p for p in plans if p.slots < m.top_k]
    if short:
        # each pool's share of the budget must buy top_k of its records
        need = max(-(-m.top_k * p.record_bytes * total // (len(p.layers) * m.num_experts * p.record_bytes))
                   for p in plans)
        raise ConfigError(f"--memory-budget {budget} bytes gives {short[0].slots} expert slots to MoE layers "
                          f"{list(short[0].layers)}, under the {m.top_k} experts a token routes to: give at least "
                          f"{need} bytes ({short[0].record_bytes} bytes per expert record)")
    return plans


class Slots:
    """One pool's slots as MLX arrays, one stacked array per tensor of the layout; numpy views
    of the same memory for the reads; and the compute over them, indexed by slot."""

    def __init__(self, layout: LayerLayout, slots: int, hidden: int) -> None:
        self.layout, self.count = layout, slots
        arrays, self.views = {}, []
        for t in layout.tensors:
            raw = mx.uint16 if t.dtype == "bfloat16" else MLX_DTYPES[t.dtype]
            a = mx.zeros((slots, *t.shape), raw)
            mx.eval(a)  # its own memory, written in place by the reads
            self.views.append(np.array(a, copy=False))
            arrays[t.name] = a.view(mx.bfloat16) if t.dtype == "bfloat16" else a
        mx.eval(list(arrays.values()))
        self.compute = _compute(layout, arrays, hidden)

    def buffers(self, slot: int) -> list[memoryview]:
        return [memoryview(v[slot]).cast("B") for v in self.views]


def _compute(layout: LayerLayout, arrays: dict[str, mx.array], hidden: int) -> GroupedExperts | StackedExperts:
    """The worker's compute over the slots: grouped for float, mlx-lm's SwitchGLU otherwise."""
    if "gate_up.weight" in arrays:
        return GroupedExperts(arrays["gate_up.weight"], arrays["down_proj.weight"], SwiGLU())
    glu = SwitchGLU(hidden, 1, 1)  # its own weights are never evaluated: replaced below
    for name in PROJECTIONS:
        params = {k.split(".", 1)[1]: a for k, a in arrays.items() if k.startswith(name + ".")}
        q = layout.quant.get(name)
        module = (QuantizedSwitchLinear(q.group_size, 1, 1, bias=False, group_size=q.group_size, bits=q.bits,
                                        mode=q.mode) if q else SwitchLinear(1, 1, 1, bias=False))
        if q:
            module.biases = module.global_scale = None
        for key, a in params.items():
            setattr(module, key, a)
        setattr(glu, name, module)
    return StackedExperts(glu)


class FlashExperts:
    """An `Experts` backend (services.expert_compute) serving every expert from the bundle."""

    def __init__(self, manifest: BundleManifest, cfg: FlashConfig) -> None:
        if cfg.mode not in FLASH_MODES:
            raise ConfigError(f"flash-cache mode {cfg.mode!r}: one of {', '.join(FLASH_MODES)}")
        self.m, self.cfg = manifest, cfg
        self.num_experts, self.moe_layers = manifest.num_experts, manifest.moe_layers
        plans = plan_pools(manifest, cfg.budget)
        self.pool_of = [0] * manifest.moe_layers
        self.pools: list[SlotPool] = []
        self.slots: list[Slots] = []
        for n, plan in enumerate(plans):
            for layer in plan.layers:
                self.pool_of[layer] = n
            # naive reads a whole layer each time, into one layer's worth of slots (slot = expert)
            count = manifest.num_experts if cfg.mode == "naive" else plan.slots
            # the window is in tokens: each token asks each of the pool's layers once
            self.pools.append(SlotPool(count, cfg.window * len(plan.layers), cfg.policy))
            self.slots.append(Slots(manifest.layers[plan.layers[0]], count, manifest.hidden))
        # Metal: the slots stay wired like a worker's stacked experts (nothing on the CPU build).
        maybe_set_recommended_wired_limit()
        self.fd = os.open(cfg.bundle / DATA, os.O_RDONLY)
        if sys.platform == "darwin" and cfg.drop_page_cache:
            import fcntl
            fcntl.fcntl(self.fd, fcntl.F_NOCACHE, 1)  # macOS has no posix_fadvise; reads bypass its cache
        self.pool = ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="flash-read")
        self.held: list[int] = []
        self.pairs: Pairs = [[] for _ in range(self.moe_layers)]
        self.local = np.zeros((self.moe_layers, self.num_experts), bool)  # held here, per layer
        self.trace: list[tuple[int, list[int]]] = []
        self.gates = read_gates(cfg.bundle, manifest) if cfg.prefetch and cfg.mode == "cache" else None
        if cfg.prefetch and self.gates is None:
            raise ConfigError("--prefetch needs --mode cache and a bundle with its model's gates "
                              "(a gate that is one plain Linear)")
        self.ahead: dict[int, tuple[list[tuple[tuple[int, int], int]], list[Future]]] = {}  # layer -> reads in flight
        self.guessed: dict[int, set[int]] = {}  # layer -> experts read ahead for its next request
        self.counters = dict.fromkeys(("requests", "pairs", "hits", "misses", "records_read", "bytes_read",
                                       "io_us", "compute_us", "prefetched", "prefetch_used"), 0)

    def hold(self, held: list[int] | Pairs) -> FlashExperts:
        """Serve `held` (per MoE layer, or the same in every layer) from now on (nothing is read
        until a request needs it)."""
        self.pairs = as_pairs(held, self.moe_layers)
        self.held = experts_in(self.pairs)
        self.local[:] = False
        for layer, row in enumerate(self.pairs):
            self.local[layer, row] = True
        return self

    def keep(self, held: list[int] | Pairs) -> None:
        """Serve only `held` of what it serves; the slots of the rest are free for the others."""
        for layer in list(self.ahead):
            self._settle(layer)
        pairs = narrowed(held, self.pairs)
        for layer, (want, have) in enumerate(zip(pairs, self.pairs)):
            self.pools[self.pool_of[layer]].drop([(layer, e) for e in sorted(set(have) - set(want))])
        self.hold(pairs)

    def close(self) -> None:
        for layer in list(self.ahead):
            self._settle(layer)
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        if self.cfg.trace is not None:
            self.cfg.trace.write_text(json.dumps({"layers": self.moe_layers, "experts": self.num_experts,
                                                  "requests": self.trace}))

    def resident(self, layer: int) -> list[int]:
        """The experts of `layer` in DRAM now."""
        return sorted(e for lay, e in self.pools[self.pool_of[layer]].resident() if lay == layer)

    def stats(self) -> dict[str, int]:
        cache = self.cfg.mode == "cache"
        resident = sum(len(p.slot_of) * s.layout.record_bytes for p, s in zip(self.pools, self.slots)) if cache else 0
        # ru_maxrss: kilobytes on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {**self.counters, "resident_bytes": resident, "peak_rss_bytes": peak,
                "slot_bytes": sum(s.count * s.layout.record_bytes for s in self.slots)}

    def check(self, req: ExpertRequest) -> None:
        check_request(req, self.moe_layers, self.num_experts)
        held = self.local[req.layer, req.experts]
        if len(req.experts) and not held.all():
            missing = sorted(set(req.experts[~held].tolist()))
            raise NotHeld(f"experts {missing} of layer {req.layer} are not held by this flash-cache")

    def compute(self, req: ExpertRequest) -> bytes:
        start = time.perf_counter()
        self.check(req)
        if not len(req.experts):
            return encode_reply(req.dtype, req.x[:0])
        layer, n = req.layer, self.pool_of[req.layer]
        pool, slots = self.pools[n], self.slots[n]
        out = np.empty((len(req.experts), req.x.shape[1]), req.x.dtype)
        io = self._settle(layer)
        guessed = self.guessed.pop(layer, set())
        distinct = list(dict.fromkeys(req.experts.tolist()))
        if self.cfg.trace is not None and len(self.trace) < TRACE_MAX:
            self.trace.append((layer, sorted(distinct)))
        for chunk in self._passes(layer, distinct):
            io += self._admit(layer, chunk)
            pairs = np.nonzero(np.isin(req.experts, chunk))[0]
            where = (req.experts[pairs] if self.cfg.mode == "naive"
                     else np.array([pool.slot_of[(layer, e)] for e in req.experts[pairs].tolist()], np.int32))
            out[pairs] = slots.compute(req.x, req.dtype, req.rows[pairs], where)
            if self.cfg.mode == "on-demand":
                pool.drop([(layer, e) for e in chunk])
        pool.tick()
        if self.gates is not None and layer + 1 < self.moe_layers:
            self._read_ahead(layer + 1, req.x, req.dtype)
        spent = time.perf_counter() - start
        c = self.counters
        c["requests"] += 1
        c["pairs"] += len(req.experts)
        c["prefetch_used"] += len(guessed & set(distinct))
        c["io_us"] += int(1e6 * io)
        c["compute_us"] += int(1e6 * (spent - io))
        return encode_reply(req.dtype, out, int(1e6 * spent))

    def _passes(self, layer: int, experts: list[int]) -> list[list[int]]:
        if self.cfg.mode == "naive":
            return [experts]
        return [[e for _, e in chunk] for chunk in self.pools[self.pool_of[layer]].passes([(layer, e) for e in experts])]

    def _admit(self, layer: int, chunk: list[int]) -> float:
        """Make `chunk` of `layer` resident; the seconds its reads took."""
        n = self.pool_of[layer]
        pool, slots = self.pools[n], self.slots[n]
        if self.cfg.mode == "naive":
            loads = [((layer, e), e) for e in range(self.num_experts)]
            self.counters["misses"] += len(chunk)
        else:
            hits, misses = pool.hits, pool.misses
            loads = pool.admit([(layer, e) for e in chunk])
            self.counters["hits"] += pool.hits - hits
            self.counters["misses"] += pool.misses - misses
        if not loads:
            return 0.0
        start = time.perf_counter()
        try:
            bad = [r for r in self.pool.map(lambda ks: self._read(*ks[0], slots.buffers(ks[1])), loads) if r]
        except BaseException:  # a read failed (the disk, the file): those slots hold unknown bytes
            pool.drop([k for k, _ in loads])
            raise
        if bad:  # nothing of this pass is computed: those slots now hold unknown bytes
            pool.drop([k for k, _ in loads])
            raise ModelError(f"{self.cfg.bundle / DATA}: {bad[0]}; the bundle is corrupt: write it again "
                             "(moebus bundle)")
        self.counters["records_read"] += len(loads)
        self.counters["bytes_read"] += len(loads) * slots.layout.record_bytes
        return time.perf_counter() - start

    def _read_ahead(self, layer: int, x: np.ndarray, code: int) -> None:
        """Start reading the experts `layer`'s gate picks for `x` (returns at once)."""
        self._settle(layer)  # one read-ahead per layer in flight
        xf = np.asarray(to_mlx(x, code).astype(mx.float32))
        logits = xf @ self.gates[layer].T
        k = self.m.top_k
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        n = self.pool_of[layer]
        guess = [e for e in dict.fromkeys(top.ravel().tolist()) if self.local[layer, e]][: self.pools[n].slots]
        loads = self.pools[n].prefetch([(layer, e) for e in guess])
        if loads:
            self.ahead[layer] = (loads, [self.pool.submit(self._read, *key, self.slots[n].buffers(s))
                                         for key, s in loads])
            self.counters["prefetched"] += len(loads)
        self.guessed[layer] = {e for (_, e), _ in loads}

    def _settle(self, layer: int) -> float:
        """Wait for `layer`'s read-ahead: the seconds waited (a bad record is let go: a request
        needing it reads it again and fails by name)."""
        loads, futures = self.ahead.pop(layer, ([], []))
        if not loads:
            return 0.0
        start = time.perf_counter()
        bad = [key for (key, _), f in zip(loads, futures) if f.exception() or f.result()]
        self.pools[self.pool_of[layer]].drop(bad)
        self.counters["records_read"] += len(loads)
        self.counters["bytes_read"] += len(loads) * self.m.layers[layer].record_bytes
        return time.perf_counter() - start

    def _read(self, layer: int, expert: int, buffers: list[memoryview]) -> str | None:
        """One record into its slot (a thread of the pool); what is wrong with it, or None."""
        offset, size = self.m.offset(layer, expert), self.m.layers[layer].record_bytes
        got = os.preadv(self.fd, buffers, offset)
        if self.cfg.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, self.m.layers[layer].stride, os.POSIX_FADV_DONTNEED)
        if got != size:
            return f"MoE layer {layer} expert {expert}: truncated record ({got} of {size} bytes)"
        crc = 0
        for b in buffers:
            crc = zlib.crc32(b, crc)
        if crc != self.m.crc32[layer][expert]:
            return f"MoE layer {layer} expert {expert}: crc32 {crc:08x} is not the manifest's {self.m.crc32[layer][expert]:08x}"
        return None

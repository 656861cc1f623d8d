"""The performance model: a decode step's time from a model's shape, a machine's measured costs
and a link. Pure: every input is a number, so it is tested by hand.

One decode step of c sequences runs every MoE layer once. moebus splits the sequences into m
micro-batches ("lanes", m = 2 from 8 sequences on) of b = c/m; per layer and lane:

    r     = router compute outside the experts    (step_us(c) + with_us(N))/L + layer_us(c) + ctx * ctx_us(c)
            (with two lanes: the CPU the router's own lanes took per step for c, over L, over m)
    x     = expert compute on the busiest worker  call_us + d * expert_us + p * pair_us
            with p = b*k/N pairs and d = (E/N) * (1 - (1 - k/E)^b) distinct experts per worker
    fixed = the round trip's fixed cost           rest_us(N) + its growth with the lane's b tokens
    move  = its bytes, over the bus and the link  bytes / bus_bytes_per_us + bytes * 8 / link_bps
    lat   = the link's latency                    2 * one-way latency + what waiting it costs (measured)

    layer time  T = max(r + x + fixed + move + lat, one lane's chain: compute, trip, compute
                        m * r,                     the router's own work for every lane
                        m * cpu / cores)           the machine's CPU, when processes share it
    step time   L * T;   tokens/s per stream 1 / step;   in aggregate c / step

`cpu` is the CPU time one layer call and its router work take over every process (measured:
on a shared machine the workers, the bus and the router take turns at the same cores). At m = 1
only the chain counts: a lane waits for its own trip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from services.router.draft_policy import choose_k, tokens_per_step

SPLIT_AT = 8  # sequences from which the router runs two micro-batches (its engine's default)


@dataclass(frozen=True)
class Shape:
    layers: int  # MoE layers (a dense layer's cost goes into step_us)
    hidden: int
    experts: int
    top_k: int
    wire_bytes: int = 4  # bytes per value on the bus (the model's dtype)


@dataclass(frozen=True)
class Costs:
    """What one machine measured (or is assumed to) cost, in µs. The `*_b` lists are per batch
    size `batches`; between two sizes the cost is interpolated, past the last extrapolated."""

    batches: tuple[int, ...]
    step_us: tuple[float, ...]  # per step, outside the layers (embedding, LM head, sampling)
    layer_us: tuple[float, ...]  # per layer outside the experts (attention, gate, the sync to route)
    ctx_us: tuple[float, ...]  # per layer per token of context
    call_us: float  # a worker's fixed compute per request
    expert_us: float  # per distinct expert in a request (reading its weights, its ops)
    pair_us: float  # per (token, expert) pair (its FLOPs)
    rest_us: tuple[float, ...]  # a round trip's fixed cost past the compute, for 1, 2, 3... workers
    bus_bytes_per_us: float  # the bus's cost per byte (both ways)
    cpu_us: tuple[float, ...]  # CPU a layer call takes over every process, per 1, 2, 3... workers, one token
    cpu_pair_us: float  # ... and per pair
    cores: int
    emulator_us: tuple[float, ...] = ()  # the link proxy's own cost per round trip, per worker count (validation runs)
    workers_step_us: tuple[float, ...] = ()  # the router's extra time per step with 1, 2, 3... workers beside it
    rest_batch_us: tuple[float, ...] = ()  # a trip's fixed cost's growth past one token, per lane batch (`batches`)
    cpu_batches: tuple[int, ...] = ()  # sequences, with the router's own lanes (two from SPLIT_AT on)
    router_cpu_us: tuple[float, ...] = ()  # the router's CPU per step for them, every lane together
    # Waiting costs more than the wait on some machines (a core that idles resumes slowly): per
    # layer, beyond twice the link's one-way latency, measured at these one-way delays.
    idle_delays_us: tuple[int, ...] = ()
    idle_us: tuple[float, ...] = ()


@dataclass(frozen=True)
class Link:
    latency_us: float = 0.0  # one way
    gbps: float = 0.0  # 0: no limit
    emulated: bool = False  # through the link proxy: add its own cost


@dataclass(frozen=True)
class Prediction:
    concurrency: int
    workers: int
    micro_batches: int
    step_ms: float
    tok_s_stream: float
    tok_s_total: float
    # Where a step's time goes, ms, adding up to step_ms: one lane's chain per layer (compute
    # on the router and on the busiest worker, the trip's fixed cost, moving its bytes, the
    # link's latency), and the time that chain waits on the router's other lane or the CPU.
    router_ms: float
    experts_ms: float
    fixed_ms: float
    transfer_ms: float
    latency_ms: float
    waiting_ms: float
    bound: str  # "chain", "router" or "cpu": which term set the layer time
    tokens_per_step: float = 1.0  # per stream: more than 1 with speculative decoding
    draft_k: int = 0  # drafted tokens each stream verifies per step

    def as_dict(self) -> dict:
        return asdict(self)


def interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise linear through (xs, ys); straight on past either end."""
    if len(xs) == 1:
        return ys[0]
    i = max(1, min(len(xs) - 1, next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def by_workers(values: tuple[float, ...], n: int) -> float:
    """A per-worker-count cost for n workers: measured up to len(values), then growing as the
    last step did."""
    if n <= len(values):
        return values[n - 1]
    step = values[-1] - values[-2] if len(values) > 1 else 0.0
    return values[-1] + step * (n - len(values))


def distinct_experts(experts: int, top_k: int, tokens: float, workers: int) -> float:
    """Expected distinct experts one worker computes for `tokens` tokens routed uniformly."""
    return experts / workers * (1.0 - (1.0 - top_k / experts) ** tokens)


def micro_batches(concurrency: int) -> int:
    return 2 if concurrency >= SPLIT_AT else 1


def message_bytes(shape: Shape, tokens: float, workers: int) -> float:
    """Bytes a layer's trip moves to and from one worker: the rows it needs, its pairs' outputs."""
    pairs = tokens * shape.top_k / workers
    rows = min(tokens, pairs)
    return 24 + rows * shape.hidden * shape.wire_bytes + 8 * pairs + 20 + pairs * shape.hidden * shape.wire_bytes


def predict(shape: Shape, costs: Costs, workers: int, concurrency: int, link: Link = Link(),
            context: int = 0, acceptance: float | None = None, draft_max: int = 4) -> Prediction:
    """A step's time and tokens/s. With `acceptance` (the share of drafted tokens a verify step
    keeps, as published for a drafter), each stream verifies k drafts a step, k as the router
    picks it, so a step carries k + 1 positions per stream and yields 1 + a + ... + a^k tokens."""
    k = choose_k(acceptance, draft_max) if acceptance is not None else 0
    m = micro_batches(concurrency)
    b = math.ceil(concurrency / m) * (k + 1)  # positions in one lane's step
    concurrency_in = concurrency
    concurrency = concurrency * (k + 1)  # what the step computes is as many positions
    at = lambda ys, n=concurrency: interpolate(costs.batches, ys, n)  # noqa: E731
    extra = by_workers(costs.workers_step_us, workers) if costs.workers_step_us else 0.0
    if m > 1 and costs.router_cpu_us:  # every lane's work, as measured with the router's own lanes
        whole = interpolate(costs.cpu_batches, costs.router_cpu_us, concurrency) + extra
        r = (whole / shape.layers + context * at(costs.ctx_us)) / m
    else:
        r = (at(costs.step_us) + extra) / shape.layers + at(costs.layer_us) + context * at(costs.ctx_us)
    pairs = b * shape.top_k / workers
    d = distinct_experts(shape.experts, shape.top_k, b, workers)
    x = costs.call_us + d * costs.expert_us + pairs * costs.pair_us
    size = message_bytes(shape, b, workers)
    growth = max(0.0, at(costs.rest_batch_us, b) - costs.rest_batch_us[0]) if costs.rest_batch_us else 0.0
    emulator = by_workers(costs.emulator_us, workers) if link.emulated and costs.emulator_us else 0.0
    fixed = by_workers(costs.rest_us, workers) + growth + emulator
    latency = 2 * link.latency_us
    if costs.idle_delays_us and link.latency_us > 0:
        latency += max(0.0, interpolate((0, *costs.idle_delays_us), (0.0, *costs.idle_us), link.latency_us))
    transfer = size / costs.bus_bytes_per_us + (size * 8 / (link.gbps * 1e3) if link.gbps > 0 else 0.0)
    chain = r + x + fixed + transfer + latency
    cpu = m * (r + by_workers(costs.cpu_us, workers) + b * shape.top_k * costs.cpu_pair_us) / costs.cores
    terms = {"chain": chain, "router": m * r, "cpu": cpu}
    bound = max(terms, key=terms.get)
    layer = terms[bound]
    step = shape.layers * layer
    parts = {"router_ms": r, "experts_ms": x, "fixed_ms": fixed, "transfer_ms": transfer, "latency_ms": latency,
             "waiting_ms": layer - chain}
    per_step = tokens_per_step(acceptance, k) if acceptance is not None else 1.0
    return Prediction(concurrency=concurrency_in, workers=workers, micro_batches=m, step_ms=round(step / 1e3, 3),
                      tok_s_stream=round(per_step * 1e6 / step, 2),
                      tok_s_total=round(concurrency_in * per_step * 1e6 / step, 2),
                      **{key: round(v * shape.layers / 1e3, 3) for key, v in parts.items()}, bound=bound,
                      tokens_per_step=round(per_step, 3), draft_k=k)

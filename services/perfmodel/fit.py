"""From a calibration's measurements to the formula's costs (pure, tested by hand).

Each cost comes from the measurements of one part, never from an end-to-end run (no gateway,
HTTP, batching of streams or link): the router's per-step and per-layer cost from its engine at
two depths, the worker's from its compute at several request sizes (least squares), a trip's
fixed cost from the router's exchange driving real workers less their compute, the per-byte
cost from the bare bus at two sizes.
"""

from __future__ import annotations

import numpy as np

from services.perfmodel.formula import Costs, Shape, message_bytes


def _by(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def router_costs(rows: list[dict]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(batches, step_us, layer_us, ctx_us) from `non_expert` rows: full and half depth at the
    shortest context give the per-layer and per-step split; the longest context, the slope."""
    rows = [r for r in rows if r.get("lanes", 1) <= 1]  # one lane: its time outside the trips is the router's
    full, half = max(r["layers"] for r in rows), min(r["layers"] for r in rows)
    short, long = min(r["context"] for r in rows), max(r["context"] for r in rows)
    batches = tuple(sorted({r["batch"] for r in rows}))
    step, layer, ctx = [], [], []
    for b in batches:
        f = _by(rows, layers=full, batch=b, context=short)[0]["ms"] * 1e3
        h = _by(rows, layers=half, batch=b, context=short)[0]["ms"] * 1e3
        per_layer = (f - h) / (full - half) if full > half else 0.0
        per_layer = max(0.0, per_layer)
        layer.append(round(per_layer, 2))
        step.append(round(max(0.0, f - full * per_layer), 2))
        if long > short:
            g = _by(rows, layers=full, batch=b, context=long)[0]["ms"] * 1e3
            ctx.append(round(max(0.0, (g - f) / (long - short) / full), 5))
        else:
            ctx.append(0.0)
    return batches, tuple(step), tuple(layer), tuple(ctx)


def expert_costs(rows: list[dict]) -> tuple[float, float, float]:
    """(call_us, expert_us, pair_us): us = call + distinct * expert + pairs * pair, least
    squares over the measured sizes, no cost below zero."""
    a = np.array([[1.0, r["distinct"], r["pairs"]] for r in rows])
    y = np.array([r["us"] for r in rows])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    if (coef < 0).any():  # refit without the negative terms
        keep = coef >= 0
        coef = np.zeros(3)
        coef[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
        coef = np.maximum(coef, 0.0)
    return tuple(round(float(c), 3) for c in coef)  # type: ignore[return-value]


def bytes_per_us(rows: list[dict]) -> float:
    """The bare bus's bytes per µs, one worker, between its smallest and largest message."""
    one = sorted(_by(rows, workers=1), key=lambda r: r["bytes"])
    small, big = one[0], one[-1]
    slope = (big["us"] - small["us"]) / (big["bytes"] - small["bytes"])
    return round(1.0 / slope, 1) if slope > 0 else 1e9


def trip_costs(calls: list[dict], shape: Shape, per_us: float) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """(rest_us per worker count, cpu_us per worker count at no pairs, cpu_pair_us) from real
    workers' calls: the round trip less the slowest worker's compute and less the bytes moved."""
    counts = sorted({r["workers"] for r in calls})
    rest, cpu, per_pair = [], [], []
    for w in counts:
        rows = sorted(_by(calls, workers=w), key=lambda r: r["tokens"])
        one = rows[0]
        rest.append(round(max(0.0, one["rest_us"] - message_bytes(shape, one["tokens"], w) / per_us), 1))
        pairs = np.array([r["tokens"] * shape.top_k for r in rows], float)
        used = np.array([r["cpu_us"] for r in rows], float)
        slope = float(np.polyfit(pairs, used, 1)[0]) if len(rows) > 1 else 0.0
        slope = max(0.0, slope)
        per_pair.append(slope)
        cpu.append(round(max(0.0, float(np.mean(used - slope * pairs))), 1))
    return tuple(rest), tuple(cpu), round(float(np.mean(per_pair)), 2)


def in_place_costs(rows: list[dict], shape: Shape, per_us: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(rest_us, workers_step_us) per worker count, from the router's engine driving real
    workers at batch 1: its trips less their compute and bytes, and its time per step outside
    them beyond its time beside one worker."""
    full, short = max(r["layers"] for r in rows), min(r["context"] for r in rows)
    one = {r["workers"]: r for r in rows if r["layers"] == full and r["batch"] == 1 and r["context"] == short}
    counts = sorted(one)
    rest = tuple(round(max(0.0, one[w]["trip_rest_us"] - message_bytes(shape, 1, w) / per_us), 1) for w in counts)
    step = tuple(round(1e3 * (one[w]["ms"] - one[counts[0]]["ms"]), 1) for w in counts)
    return rest, step


def lane_costs(rows: list[dict]) -> tuple[tuple[float, ...], tuple[int, ...], tuple[float, ...]]:
    """(rest_batch_us per one-lane batch, cpu_batches, router_cpu_us) from the router's engine
    beside one worker, at full depth and the shortest context."""
    full, short = max(r["layers"] for r in rows), min(r["context"] for r in rows)
    rows = sorted((r for r in rows if r["layers"] == full and r["context"] == short), key=lambda r: r["batch"])
    rest = tuple(r.get("trip_rest_us", 0.0) for r in rows if r.get("lanes", 1) <= 1)
    return rest, tuple(r["batch"] for r in rows), tuple(round(1e3 * r.get("cpu_ms", r["ms"]), 1) for r in rows)


def idle_costs(waiting: list[dict]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(delays, per-layer cost beyond 2 x delay) from the router and one worker through the link
    at those delays, against the same link at delay 0: its time outside the trips and the trips."""
    full = max(r["layers"] for r in waiting)
    pick = lambda rows: next(r for r in rows if r["layers"] == full)  # noqa: E731
    base = pick([r for r in waiting if r["delay_us"] == 0])
    delays = sorted({r["delay_us"] for r in waiting} - {0})
    extra = []
    for d in delays:
        row = pick([r for r in waiting if r["delay_us"] == d])
        outside = 1e3 * (row["ms"] - base["ms"]) / full
        extra.append(round(outside + row["trip_rest_us"] - base["trip_rest_us"] - 2 * d, 1))
    return tuple(int(d) for d in delays), tuple(extra)


def costs(profile: dict, shape: Shape) -> Costs:
    """The formula's costs from a calibration profile (`moebus perfmodel calibrate`)."""
    batches, step, layer, ctx = router_costs(profile["non_expert"])
    call, expert, pair = expert_costs(profile["expert_compute"])
    per_us = bytes_per_us(profile["bare_bus"])
    serial_rest, cpu, cpu_pair = trip_costs(profile["layer_calls"], shape, per_us)
    rest, with_workers = in_place_costs(profile["in_place"], shape, per_us) if "in_place" in profile \
        else (serial_rest, ())
    growth, cpu_batches, router_cpu = lane_costs(profile["non_expert"])
    delays, idle = idle_costs(profile["waiting"]) if profile.get("waiting") else ((), ())
    linked, _, _ = trip_costs(profile["layer_calls_through_link"], shape, per_us)
    emulator = tuple(round(max(0.0, a - b), 1) for a, b in zip(linked, serial_rest))  # both measured the same way
    return Costs(batches=batches, step_us=step, layer_us=layer, ctx_us=ctx, call_us=call, expert_us=expert,
                 pair_us=pair, rest_us=rest, bus_bytes_per_us=per_us, cpu_us=cpu, cpu_pair_us=cpu_pair,
                 cores=int(profile["machine"]["cores"]), emulator_us=emulator,
                 workers_step_us=with_workers, rest_batch_us=growth, cpu_batches=cpu_batches,
                 router_cpu_us=router_cpu, idle_delays_us=delays, idle_us=idle)

"""`moebus perfmodel calibrate`: measure this machine's parts and write a profile (JSON).

The profile holds the raw measurements and the model shape they were taken on; `predict` fits
the formula's costs from them (services/perfmodel/fit.py), so a profile is never tuned to the
runs it predicts.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class CalibrateConfig:
    model: Path
    out: Path
    workers: tuple[int, ...] = (1, 2, 3)
    batches: tuple[int, ...] = (1, 2, 4, 8)
    contexts: tuple[int, ...] = (16, 256)
    call_tokens: tuple[int, ...] = (1, 4)
    expert_tokens: tuple[int, ...] = (1, 2, 4, 8)
    samples: int = 400  # round trips per measurement
    idle_delays: tuple[float, ...] = (0.0, 500.0, 2000.0)  # link delays the router and a worker wait through
    steps: int = 10  # decode steps per router measurement


def machine() -> dict:
    from shared.blas import find_openblas

    return {"cores": os.cpu_count() or 1, "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "blas": "openblas" if find_openblas() and os.environ.get("LD_PRELOAD") else "default",
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "")}


def calibrate(cfg: CalibrateConfig) -> dict:
    from services.perfmodel import calls, measure
    from shared.model import read_config

    config = read_config(cfg.model)
    steps = (2 * len(cfg.contexts) * len(cfg.batches) + 2 * (len(cfg.workers) - 1) + 2 * len(cfg.idle_delays)
             + len(cfg.expert_tokens) + 2 * 3
             + 2 * len(cfg.workers) * len(cfg.call_tokens) + 1)
    started = time.perf_counter()
    with tqdm(total=steps, desc="calibrate", unit="part", leave=True) as bar:
        def tick() -> None:
            bar.update(1)

        bar.set_postfix_str("roofline peaks")
        peaks = measure.peaks()
        tick()
        in_place, direct = [], []
        for w in cfg.workers:  # the router's engine and exchange driving w real workers, then bare calls
            bar.set_postfix_str(f"router and {w} worker{'s' if w > 1 else ''}")
            with calls.cluster(cfg.model, w) as caller:
                first = w == cfg.workers[0]
                rows = measure.non_expert(cfg.model, cfg.batches if first else cfg.batches[:1],
                                          cfg.contexts if first else cfg.contexts[:1], cfg.steps, tick, caller)
                in_place += [{"workers": w, **r} for r in rows]
                direct += calls.measure_calls(caller, cfg.model, w, cfg.call_tokens, cfg.samples, tick)
        non_expert = [r for r in in_place if r["workers"] == cfg.workers[0]]
        waiting = []
        for d in cfg.idle_delays:  # what waiting on a slow link costs the processes beyond the wait itself
            bar.set_postfix_str(f"router and a worker {d:g} µs away")
            with calls.cluster(cfg.model, 1, True, d) as caller:
                rows = measure.non_expert(cfg.model, cfg.batches[:1], cfg.contexts[:1], cfg.steps, tick, caller)
                waiting += [{"delay_us": d, **r} for r in rows]
        bar.set_postfix_str("expert compute")
        compute = measure.expert_compute(cfg.model, cfg.expert_tokens, cfg.samples // 4, tick)
        bar.set_postfix_str("bare bus")
        bare = measure.bare_bus((1024, 65536), (1, 2, 3), cfg.samples, tick)
        bar.set_postfix_str("layer calls through the link proxy")
        linked = calls.layer_calls(cfg.model, cfg.workers, cfg.call_tokens, cfg.samples, True, tick)
    return {"machine": machine(), "model": {"path": str(cfg.model), "config": config},
            "seconds": round(time.perf_counter() - started, 1), "peaks": peaks, "non_expert": non_expert,
            "in_place": in_place,
            "waiting": waiting,
            "expert_compute": compute, "bare_bus": bare, "layer_calls": direct, "layer_calls_through_link": linked}


def write(profile: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1) + "\n")


def run(cfg: CalibrateConfig) -> dict:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as each service under `moebus up` on this machine
    profile = calibrate(cfg)
    write(profile, cfg.out)
    return profile

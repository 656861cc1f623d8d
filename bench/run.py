"""`make bench`: mlx-lm single-process vs moebus with 1-3 workers, and the bus vs bare nats-py.

    python -m bench.run [--models mixtral-0.5b,thin] [--tokens 16] [--quick]

Writes bench/results.json and prints a table. `--quick` runs the tiny model at small settings:
the suite uses it to check that the benchmark works, never to time anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import bus, load, models
from shared.blas import blas_threads

ROOT = Path(__file__).resolve().parents[1]


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return r.read().decode()


def worker_memory(url: str) -> dict:
    """Each worker's MLX counters from its heartbeat (1 s), and the layer calls so far."""
    time.sleep(1.5)  # a fresh heartbeat
    text = scrape(url)
    out: dict = {"layer_calls": int(metric(text, "moebus_expert_layer_calls_total"))}
    for labels, value in re.findall(r"^moebus_worker_mlx_memory_bytes\{([^}]*)\} (\S+)$", text, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out.setdefault(tags["worker"], {})[tags["kind"]] = int(float(value))
    return out


def bus_figures(url: str, shape: dict) -> dict:
    text = scrape(url)
    calls = metric(text, "moebus_expert_layer_calls_total")
    request_bytes = int(metric(text, "moebus_expert_payload_bytes_total") / max(calls, 1))
    reply_bytes = shape["num_experts_per_tok"] * shape["hidden_size"] * 4 + 16  # one token's pairs, fp32
    raw = bus.raw_rtt_us(request_bytes, reply_bytes)
    return {"payload_bytes": request_bytes, "reply_bytes": reply_bytes,
            "layer_rtt_us_p50": round(1e6 * metric(text, "moebus_expert_roundtrip_recent_seconds", '{quantile="0.5"}'), 1),
            "layer_rtt_us_p99": round(1e6 * metric(text, "moebus_expert_roundtrip_recent_seconds", '{quantile="0.99"}'), 1),
            # the round trip less the slowest worker's own compute: what the bus and hops cost
            "worker_compute_us_p50": round(1e6 * metric(text, "moebus_expert_compute_recent_seconds", '{quantile="0.5"}'), 1),
            "bus_share_us_p50": round(1e6 * metric(text, "moebus_expert_bus_recent_seconds", '{quantile="0.5"}'), 1),
            # a decode step's time outside its expert round trips, p50 (one stream: one token)
            "router_non_expert_ms": round(1e3 * metric(text, "moebus_router_step_outside_experts_recent_seconds",
                                                       '{quantile="0.5"}'), 2),
            "raw_nats_rtt_us_p50": raw["p50"], "raw_nats_rtt_us_p99": raw["p99"]}


_STARTED = time.perf_counter()


def progress(line: str) -> None:
    """One line per configuration, with the time so far: a run takes minutes."""
    m, s = divmod(int(time.perf_counter() - _STARTED), 60)
    print(f"[{m:2d}:{s:02d}] {line}", file=sys.stderr, flush=True)


def bench_model(path: Path, workers: list[int], concurrency: list[int], tokens: int, log: Path) -> dict:
    # mlx-lm with the BLAS threads each moebus process gets with 1 worker (the ratios use this;
    # with 2-3 workers on more than 3 cores, moebus processes get fewer), and with the whole
    # machine, as a user running it alone would.
    progress(f"{path.name}: single-process mlx-lm")
    mlx_lm = baseline(path, tokens, blas_threads(os.cpu_count() or 1, 2))
    mlx_lm_all_cores = baseline(path, tokens, os.cpu_count() or 1)
    shape = models.describe(path)["shape"]
    runs, figures, memory = [], {}, {}
    for w in workers:
        progress(f"{path.name}: starting moebus with {w} worker{'s' if w > 1 else ''}")
        with load.cluster(str(path), w, log) as url:
            for c in concurrency:
                progress(f"{path.name}: {w} worker{'s' if w > 1 else ''}, {c} stream{'s' if c > 1 else ''}")
                r = asyncio.run(load.run(url, c, tokens))
                runs.append({"workers": w, **r})
                if w == workers[0] and c == 1:  # one message per layer: the bus at its plainest
                    figures = bus_figures(url, shape)
                if w == workers[-1] and c == concurrency[0]:
                    memory["after_warm_up"] = worker_memory(url)
            if w == workers[-1]:
                memory["at_end"] = worker_memory(url)
    # The runs above decode two micro-batches from 8 sequences on (the default); the same
    # cluster with one batch shows what the overlap gains.
    overlap = []
    w2 = min(2, workers[-1])
    progress(f"{path.name}: {w2} workers with one batch (what two micro-batches gain)")
    with load.cluster(str(path), w2, log, ("--micro-batches", "1")) as url:
        for c in concurrency[1:]:
            one = asyncio.run(load.run(url, c, tokens))
            two = next(r for r in runs if r["workers"] == w2 and r["concurrency"] == c)
            overlap.append({"workers": w2, "concurrency": c, "tok_s_one_batch": one["tok_s"],
                            "tok_s_two_micro_batches": two["tok_s"], "itl_ms_p50_one_batch": one["itl_ms_p50"],
                            "gain": round(two["tok_s"] / one["tok_s"], 2)})
    figures["mlx_lm_non_expert_ms"] = mlx_lm["non_expert_ms"]
    return {"model": models.describe(path), "mlx_lm_tok_s": mlx_lm, "mlx_lm_tok_s_all_cores": mlx_lm_all_cores,
            "runs": runs, "bus": figures,
            "overlap": overlap, "worker_memory": memory,
            "ratios": ratios(runs, mlx_lm, figures, workers, concurrency)}


def baseline(path: Path, tokens: int, threads: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "bench.baseline", str(path), str(tokens)], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "blas_threads": threads}


def ratios(runs: list[dict], mlx_lm: dict, figures: dict, workers: list[int], concurrency: list[int]) -> dict:
    def get(w: int, c: int) -> dict:
        return next(r for r in runs if r["workers"] == w and r["concurrency"] == c)

    top = concurrency[-1]
    decode_1 = 1000 / get(workers[0], 1)["itl_ms_p50"]  # decode tokens/s, like mlx-lm's batch-1 figure
    at_top = [get(w, top)["tok_s"] for w in workers]
    return {
        "bus_vs_raw": round(figures["layer_rtt_us_p50"] / figures["raw_nats_rtt_us_p50"], 2),
        "bus_share_vs_raw": round(figures["bus_share_us_p50"] / figures["raw_nats_rtt_us_p50"], 2),
        "one_worker_vs_mlx_lm": round(decode_1 / mlx_lm["batch1_tok_s"], 2),
        "two_workers_vs_mlx_lm": round(1000 / get(min(2, workers[-1]), 1)["itl_ms_p50"] / mlx_lm["batch1_tok_s"], 2),
        "router_vs_mlx_lm_non_expert": round(figures["router_non_expert_ms"] / mlx_lm["non_expert_ms"], 2),
        "c16_vs_mlx_lm_batch16": round(get(min(2, workers[-1]), top)["tok_s"] / mlx_lm["batch16_tok_s"], 2),
        "more_workers_never_slower": all(b >= a for a, b in zip(at_top, at_top[1:])),
    }


def table(name: str, res: dict) -> str:
    base, full = res["mlx_lm_tok_s"], res["mlx_lm_tok_s_all_cores"]
    lines = [f"\n{name}: {res['model']['parameters'] / 1e6:.0f}M parameters, mlx-lm single process "
             f"{base['batch1_tok_s']} tok/s (batch 1), {base['batch16_tok_s']} (batch 16) with "
             f"{base['blas_threads']} BLAS thread(s) like each moebus process; with all {full['blas_threads']} cores "
             f"{full['batch1_tok_s']} / {full['batch16_tok_s']}",
             f"{'workers':>7} {'streams':>7} {'tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}"]
    for r in res["runs"]:
        lines.append(f"{r['workers']:>7} {r['concurrency']:>7} {r['tok_s']:>8} {r['ttft_ms_p50']:>9} "
                     f"{r['itl_ms_p50']:>8} {r['itl_ms_p99']:>8}")
    b = res["bus"]
    lines.append(f"layer round trip p50/p99 {b['layer_rtt_us_p50']}/{b['layer_rtt_us_p99']} µs for {b['payload_bytes']} B; "
                 f"bare nats-py {b['raw_nats_rtt_us_p50']}/{b['raw_nats_rtt_us_p99']} µs")
    lines.append(f"  of which the slowest worker's compute p50 {b['worker_compute_us_p50']} µs, "
                 f"the bus and its hops {b['bus_share_us_p50']} µs")
    lines.append(f"time per token outside the experts, one stream: router {b['router_non_expert_ms']} ms, "
                 f"mlx-lm {b['mlx_lm_non_expert_ms']} ms")
    for o in res["overlap"]:
        lines.append(f"two micro-batches, {o['workers']} workers, {o['concurrency']} streams: "
                     f"{o['tok_s_two_micro_batches']} vs {o['tok_s_one_batch']} tok/s ({o['gain']}x)")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in res["ratios"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-0.5b,thin")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="the tiny model, 1-2 workers, concurrency 1 and 2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models", help="where models are made once")
    a = ap.parse_args()
    names = ["tiny"] if a.quick else a.models.split(",")
    workers, concurrency = ([1, 2], [1, 2]) if a.quick else ([1, 2, 3], [1, 4, 16])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"machine": {"cores": os.cpu_count(), "memory_gib": _memory_gib(), "os": platform.platform()}}
    for i, name in enumerate(names):
        path = models.build(name, a.models_dir)
        res = bench_model(path, workers, concurrency, a.tokens, a.out.with_suffix(".log"))
        if i == 0:
            report.update(res)  # the main model's figures at the top, the others under their names
        else:
            report[name] = res
        print(table(name, res), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.out} in {report['seconds']} s")


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    main()

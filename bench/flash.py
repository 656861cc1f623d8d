"""`make bench-flash`: the flash-cache against all experts in DRAM, naive and on-demand reads.

    python -m bench.flash [--tokens 24] [--bits 4] [--quick]

On the `flash-wide` model quantized to 4 bits as mlx-lm's convert does (`--bits 0`: the `flash`
model in float32; experts 4x the memory budget either way), twice: with routing that varies token by token (uniform), and with its gates
shaped for locality (`shape_routing`). One stream each; the bundle's pages are dropped from the
OS cache before every mode. Each cache run records its routing trace, on which the bytes an
optimal (Belady) cache of the same slots would read, and the same slots split per layer, are
computed offline. `tiered`: a DRAM worker with the same budget (a quarter of the experts) beside
the flash-cache, after one run of the same workload for the router to place the hottest experts
in it. Writes bench/flash.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import load, models
from bench.run import metric, progress, scrape
from bench.table import write_and_show

ROOT = Path(__file__).resolve().parents[1]
BUDGET_FRACTION = 4  # the experts are this many times the budget
EMBED_SCALE = 30.0  # token-dominated hidden states: routing near uniform (reuse within 1 step ~ top_k / experts)
LOCALITY_BIAS = 0.12  # the shaped model's popularity bias: measured reuse within 1 step ~0.3 (uniform: 0.125)
# Sampled, seeded tokens: a random model decoding greedily repeats one token, and its routing
# with it, which no real text does; with a seed every mode decodes the same tokens.
SAMPLING = {"temperature": 1.0, "seed": 7}


def shape_routing(src: Path, dst: Path, bias: float, seed: int = 0) -> Path:
    """`src` with routing that varies token by token, and, with `bias`, locality as trained
    routers show. A random model's residual stream is dominated by what every token shares,
    so its tokens all route alike; scaled embeddings make each token's own embedding dominate,
    and sampled tokens then route almost uniformly. With `bias`, every token also carries a
    constant component (the embeddings' first dimension) that each layer's gate reads with a
    per-expert bias of -bias * ln(rank) (in units of the gate logits' spread) over a
    layer-specific order of the experts: a few experts of each layer are popular."""
    import mlx.core as mx
    import numpy as np

    if (dst / "model.safetensors").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    w = dict(mx.load(str(src / "model.safetensors")))
    rng = np.random.default_rng(seed)
    embed = np.array(w["model.embed_tokens.weight"]) * EMBED_SCALE
    if bias:
        embed[:, 0] = 4 * embed.std()  # the constant component: the gates' bias input
        for name in [k for k in w if k.endswith("block_sparse_moe.gate.weight")]:
            gate = np.array(w[name])
            ranks = rng.permutation(gate.shape[0]) + 1
            gate[:, 0] = -bias * np.log(ranks) * 2.0 * gate[:, 1:].std() * np.sqrt(gate.shape[1])
            w[name] = mx.array(gate)
    w["model.embed_tokens.weight"] = mx.array(embed)
    mx.save_safetensors(str(dst / "model.safetensors"), w)
    return dst


def quantize(src: Path, dst: Path, bits: int) -> Path:
    """`src` as mlx-lm's convert quantizes it (group size 64), as the MLX community publishes models."""
    from mlx_lm import convert

    if not (dst / "config.json").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        convert(str(src), str(dst), quantize=True, q_bits=bits, q_group_size=64 if "tiny" not in src.name else 32)
    return dst


def drop_cache(path: Path) -> None:
    """Evict the bundle's pages from the OS cache: every mode starts from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss(pattern: str) -> int:
    """VmHWM of the running process whose command line matches `pattern`."""
    import psutil  # not pgrep: a fresh machine may lack it

    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid() or not re.search(pattern, " ".join(proc.info["cmdline"] or [])):
            continue
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            return int(m.group(1)) * 1024
    return 0


def run_mode(model: Path, mode: dict, budget: int, tokens: int, log: Path, trace: Path | None) -> dict:
    env = {"MOEBUS_FLASH_MODE": mode.get("mode", "cache"), "MOEBUS_WINDOW": str(mode.get("window", 5)),
           "MOEBUS_FLASH_POLICY": mode.get("policy", "lfu"), "MOEBUS_FLASH_TRACE": str(trace or ""),
           "MOEBUS_FLASH_PREFETCH": "1" if mode.get("prefetch") else ""}
    extra = () if mode["name"] == "dram" else ("--memory-budget", str(budget))
    # dram: one worker with every expert; tiered: DRAM workers beside the flash-cache; else it alone
    workers = 1 if mode["name"] == "dram" else mode.get("workers", 0)
    with load.cluster(str(model), workers, log, extra, env) as url:
        if workers and mode["name"] != "dram":
            # The load the router places by: the same workload first, then a load check (5 s)
            # and the DRAM worker loading what moved to it.
            asyncio.run(load.run(url, 1, tokens, **SAMPLING))
            time.sleep(mode.get("settle_s", 8))
        before = scrape(url)
        r = asyncio.run(load.run(url, 1, tokens, **SAMPLING))
        time.sleep(1.5)  # the counters of the flash-cache's next heartbeat
        text = scrape(url)
        rss = peak_rss(r"services\.cli (worker|flash-cache) ")
        rss_flash, rss_worker = peak_rss(r"services\.cli flash-cache "), peak_rss(r"services\.cli worker ")
    read = metric(text, "moebus_flash_bytes_read_total", '{worker="' + _worker(text) + '"}') if _worker(text) else 0
    ahead = {k: metric(text, f"moebus_flash_{k}_total", '{worker="' + _worker(text) + '"}') if _worker(text) else 0
             for k in ("prefetched", "prefetch_used")}
    hits = metric(text, "moebus_flash_hits_total", '{worker="' + _worker(text) + '"}') if _worker(text) else 0
    misses = metric(text, "moebus_flash_misses_total", '{worker="' + _worker(text) + '"}') if _worker(text) else 0
    generated = r["tokens"] + 4  # the warm-up request's 4 tokens read too
    if workers and mode["name"] != "dram":  # what the measured run read, not the first
        generated = r["tokens"]
        read -= metric(before, "moebus_flash_bytes_read_total", '{worker="' + _worker(text) + '"}')
    pairs = {w: metric(text, "moebus_worker_tokens_total", f'{{worker="{w}"}}')
             - metric(before, "moebus_worker_tokens_total", f'{{worker="{w}"}}') for w in _workers(text)}
    flash_pairs = pairs.get(_worker(text), 0.0)
    return {"mode": mode["name"], "tok_s": r["tok_s"], "itl_ms_p50": r["itl_ms_p50"],
            "bytes_read_per_token": int(read / generated), "bytes_read": int(read),
            "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
            "dram_pair_share": round(1 - flash_pairs / sum(pairs.values()), 3) if sum(pairs.values()) else None,
            "peak_rss_bytes": rss, "peak_rss_flash_bytes": rss_flash, "peak_rss_worker_bytes": rss_worker,
            "tokens": generated,
            "prefetch_accuracy": round(ahead["prefetch_used"] / ahead["prefetched"], 3) if ahead["prefetched"] else None}


def _workers(text: str) -> list[str]:
    return re.findall(r'^moebus_worker_tokens_total\{worker="([^"]+)"\}', text, re.M)


def _worker(text: str) -> str:
    m = re.search(r'^moebus_flash_bytes_read_total\{worker="([^"]+)"\}', text, re.M)
    return m.group(1) if m else ""


def offline(trace_file: Path, slots: int, record: int, tokens: int) -> dict:
    """On the recorded trace, with the pool's `slots`: Belady's bytes, what each policy and
    window would read, the best static choice in hindsight (what knowing the popularities
    would give), the same slots split evenly per layer (the flash-cache before the pool), and
    the trace's reuse within K steps of a layer."""
    from services.flash_cache.policy import belady_misses, reuse_within, simulate, static_misses

    t = json.loads(trace_file.read_text())
    layers = t["layers"]
    pool = [[(layer, e) for e in experts] for layer, experts in t["requests"]]  # every request, in order
    per_layer: list[list[list[int]]] = [[] for _ in range(layers)]
    for layer, experts in t["requests"]:
        per_layer[layer].append(experts)
    belady = belady_misses(pool, slots)
    out = {"belady_bytes_per_token": int(belady * record / tokens),
           "trace_reuse": {f"k{k}": round(sum(reuse_within(s, k) * len(s) for s in per_layer)
                                          / max(1, sum(len(s) for s in per_layer)), 3) for k in (1, 5, 10)},
           "simulated_records": {}}
    for policy in ("lru", "lfu"):
        for k in (0, 1, 5, 10):
            out["simulated_records"][f"{policy}_k{k}"] = simulate(pool, slots, k * layers, policy)
    split = slots // layers
    if split >= 1:
        out["simulated_records"]["per_layer_lfu_k5"] = sum(simulate(s, split, 5, "lfu") for s in per_layer)
        out["simulated_records"]["per_layer_belady"] = sum(belady_misses(s, split) for s in per_layer)
    out["simulated_records"]["static_best"] = static_misses(pool, slots)
    out["simulated_records"]["belady"] = belady
    return out


def bench_model(model: Path, label: str, tokens: int, quick: bool, log: Path, traces_dir: Path) -> dict:
    from services.flash_cache.bundle import ensure_bundle, open_bundle
    from services.flash_cache.store import plan_pools
    from shared.config import home

    bundle = ensure_bundle(model, None, home())
    m = open_bundle(bundle)
    experts = m.num_experts * m.expert_bytes
    budget = max(experts // BUDGET_FRACTION, m.moe_layers * m.top_k * m.record_bytes)
    slots = sum(p.slots for p in plan_pools(m, budget))  # one pool: the bench's models have one layout
    modes = [{"name": "dram"}, {"name": "naive", "mode": "naive"}, {"name": "on-demand", "mode": "on-demand"}]
    if quick:  # one of each kind: the suite checks the benchmark works end to end
        modes += [{"name": "cache-k1-prefetch", "window": 1, "prefetch": True},
                  {"name": "tiered-k1", "window": 1, "workers": 1, "settle_s": 0}]
    else:
        modes += [{"name": f"cache-k{k}", "window": k} for k in (1, 5, 10)]
        modes += [{"name": f"cache-k{k}-prefetch", "window": k, "prefetch": True} for k in (1, 5, 10)]
        modes += [{"name": "cache-k5-lru", "window": 5, "policy": "lru"}]
        # a DRAM worker with the same budget (a quarter of the experts) beside the flash-cache
        modes += [{"name": "tiered-k5", "window": 5, "workers": 1}]
    runs, traces = [], {}
    for mode in modes:
        progress(f"flash {label}: {mode['name']}")
        drop_cache(bundle / "experts.bin")
        trace = traces_dir / f"{label}-{mode['name']}.json" if mode["name"].startswith(("cache", "tiered")) else None
        runs.append(run_mode(model, mode, budget, tokens, log, trace))
        if trace is not None and trace.is_file():
            traces[mode["name"]] = offline(trace, slots, m.record_bytes, runs[-1]["tokens"])
            runs[-1]["bytes_vs_belady"] = round(runs[-1]["bytes_read_per_token"]
                                                / max(1, traces[mode["name"]]["belady_bytes_per_token"]), 2)
    by = {r["mode"]: r for r in runs}
    best = max((r for r in runs if r["mode"].startswith("cache")), key=lambda r: r["tok_s"])
    tiered = next(r for r in runs if r["mode"].startswith("tiered"))
    # the flash-cache alone at the tiered run's window (the quick run has only the prefetching one)
    alone = by.get(tiered["mode"].replace("tiered", "cache"), by.get("cache-k1-prefetch"))
    first = traces[next(iter(traces))] if traces else {}
    return {"model": models.describe(model), "experts_bytes": experts, "budget_bytes": budget,
            "pool_slots": slots, "record_bytes": m.record_bytes, "runs": runs, "offline": traces,
            "belady_bytes_per_token": first.get("belady_bytes_per_token"), "trace_reuse": first.get("trace_reuse"),
            "ratios": {"best_mode": best["mode"],
                       "speedup_vs_naive": round(best["tok_s"] / by["naive"]["tok_s"], 2),
                       "speedup_vs_on_demand": round(best["tok_s"] / by["on-demand"]["tok_s"], 2),
                       "bytes_vs_belady": best.get("bytes_vs_belady"),
                       "vs_dram": round(best["tok_s"] / by["dram"]["tok_s"], 2),
                       "tiered_vs_flash_alone": round(tiered["tok_s"] / alone["tok_s"], 2),
                       "tiered_dram_pair_share": tiered["dram_pair_share"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="the tiny model, one routing, four modes: checks the benchmark runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "flash.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models")
    ap.add_argument("--bits", type=int, default=4, help="quantize the experts as mlx-lm does (4, 8); 0: float")
    a = ap.parse_args()
    os.environ.setdefault("MOEBUS_HOME", str(a.models_dir / "home"))  # the bundles live with the models
    started = time.perf_counter()
    base = models.build("tiny" if a.quick else "flash-wide" if a.bits else "flash", a.models_dir)
    log = a.out.with_suffix(".log")
    report: dict = {"machine": {"cores": os.cpu_count(), "os": platform.platform(),
                                "disk": "the bundle's filesystem, OS page cache dropped before each mode"},
                    "settings": {"bits": a.bits, "tokens": a.tokens, "budget_fraction": BUDGET_FRACTION}}
    variants = {"locality": LOCALITY_BIAS} if a.quick else {"uniform": 0.0, "locality": LOCALITY_BIAS}
    for label, bias in variants.items():
        model = shape_routing(base, base.with_name(f"{base.name}-{label}"), bias)
        if a.bits:
            model = quantize(model, model.with_name(f"{model.name}-{a.bits}bit"), a.bits)
        with tempfile.TemporaryDirectory(prefix="flash-traces-") as traces:
            report[label] = bench_model(model, label, a.tokens, a.quick, log, Path(traces))
    report["seconds"] = round(time.perf_counter() - started, 1)
    rows = [{"routing": label, **r, "hit_rate": r["hit_rate"] if r["hit_rate"] is not None else "-",
             "MB_per_token": round(r["bytes_read_per_token"] / 2**20, 1), "peak_rss_MB": r["peak_rss_bytes"] >> 20}
            for label in variants for r in report[label]["runs"]]
    write_and_show(a.out, report, rows, [("routing", "routing", 8), ("mode", "mode", 13), ("tok/s", "tok_s", 7),
                                         ("MiB read/token", "MB_per_token", 14), ("hit rate", "hit_rate", 8),
                                         ("peak RSS MiB", "peak_rss_MB", 12)])
    for label in variants:
        r = report[label]
        print(f"{label}: budget {r['budget_bytes'] >> 20} MiB for {r['experts_bytes'] >> 20} MiB of experts "
              f"({r['pool_slots']} slots in one pool); Belady {r['belady_bytes_per_token'] / 2**20:.1f} MiB/token; "
              f"reuse within K {r['trace_reuse']}; ratios {r['ratios']}")
    print(f"wrote {a.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()

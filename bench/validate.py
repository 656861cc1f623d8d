"""`make validate-model`: the performance model's predictions against measured runs.

    python -m bench.validate [--model thin] [--profile FILE] [--tokens 24]

Calibrates once (`moebus perfmodel calibrate`, unless --profile is given), then measures
configurations of workers x streams x link delay through `moebus up --link-delay-us`, and
predicts each from the profile alone: the profile is never refitted to these runs. Writes
bench/perfmodel-validation.json and bench/perfmodel-validation.png.

Measured tokens/s is the decode rate: streams / median gap between tokens, as predicted (a
step's time); time to first token and prefill are not part of either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

from bench import load, models
from bench.run import progress

ROOT = Path(__file__).resolve().parents[1]
# (workers, streams, one-way delay µs): 1-3 workers, 1 and 8 streams, 0 / 200 / 1000 µs
CONFIGS = [(w, c, d) for d in (0, 1000) for w in (1, 2, 3) for c in (1, 8)] + [(2, 1, 200), (2, 8, 200)]
QUICK = [(1, 1, 0), (2, 8, 200)]


def calibrate(model: Path, out: Path, quick: bool) -> None:
    progress(f"calibrating on {model.name} (moebus perfmodel calibrate)")
    subprocess.run([sys.executable, "-m", "services.cli", "perfmodel", "calibrate", "--model", str(model),
                    "--out", str(out), *(["--quick"] if quick else [])], cwd=ROOT, check=True)


def predicted(profile: Path, workers: int, streams: int, delay: float) -> dict:
    from services.perfmodel.cli import prediction

    args = Namespace(workers=workers, concurrency=streams, link_latency_us=delay, link_gbps=0.0, context=0,
                     profile=str(profile), shape=None, model=None, machine=None, emulated=True)
    return prediction(args)["prediction"]


def measure(model: Path, configs: list[tuple[int, int, int]], tokens: int, log: Path) -> dict:
    out = {}
    clusters = sorted({(w, d) for w, _, d in configs})
    for w, d in clusters:
        progress(f"{w} worker(s), link delay {d} µs each way")
        with load.cluster(str(model), w, log, ("--link-delay-us", str(d))) as url:
            for c in sorted(c for ww, c, dd in configs if (ww, dd) == (w, d)):
                r = asyncio.run(load.run(url, c, tokens))
                out[(w, c, d)] = {**r, "decode_tok_s": round(c * 1000 / r["itl_ms_p50"], 2)}
                progress(f"  {c} stream(s): {out[(w, c, d)]['decode_tok_s']} tok/s")
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    top = 1.15 * max(max(r["predicted_tok_s"], r["measured_tok_s"]) for r in rows)
    ax.plot([0, top], [0, top], color="grey", lw=1, label="predicted = measured")
    ax.fill_between([0, top], [0, 0.85 * top], [0, 1.15 * top], color="grey", alpha=0.15, label="±15%")
    for c, marker in ((1, "o"), (8, "s")):
        pts = [r for r in rows if r["concurrency"] == c]
        sc = ax.scatter([r["measured_tok_s"] for r in pts], [r["predicted_tok_s"] for r in pts], marker=marker,
                        c=[r["delay_us"] for r in pts], cmap="viridis", vmin=0, vmax=1000, s=60,
                        label=f"{c} stream{'s' if c > 1 else ''}")
        for r in pts:
            ax.annotate(f"{r['workers']}w", (r["measured_tok_s"], r["predicted_tok_s"]), fontsize=7,
                        xytext=(4, -8), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="link delay, µs each way")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="measured tokens/s (decode)", ylabel="predicted tokens/s",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="thin", help="bench model to run on (bench/models.py)")
    ap.add_argument("--profile", type=Path, help="a profile to use instead of calibrating now")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="the tiny model, two configurations (the suite's check)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "perfmodel-validation.json")
    a = ap.parse_args()
    started = time.perf_counter()
    model = models.build("tiny" if a.quick else a.model, ROOT / "bench" / "models")
    configs = QUICK if a.quick else CONFIGS
    profile = a.profile or a.out.with_name("perfmodel-profile.json")
    if a.profile is None:
        calibrate(model, profile, a.quick)
    measured = measure(model, configs, 8 if a.quick else a.tokens, a.out.with_suffix(".log"))
    rows = []
    for w, c, d in configs:
        p = predicted(profile, w, c, d)
        m = measured[(w, c, d)]
        rows.append({"workers": w, "concurrency": c, "delay_us": d, "predicted_tok_s": p["tok_s_total"],
                     "measured_tok_s": m["decode_tok_s"],
                     "error": round(p["tok_s_total"] / m["decode_tok_s"] - 1, 3), "bound": p["bound"],
                     "predicted_step_ms": p["step_ms"], "measured_itl_ms_p50": m["itl_ms_p50"],
                     "measured_wall_tok_s": m["tok_s"]})
    report = {"machine": {"cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()},
              "model": models.describe(model), "profile": str(profile), "tokens": a.tokens,
              "configurations": rows, "within_15pct": sum(abs(r["error"]) <= 0.15 for r in rows),
              "max_abs_error": max(abs(r["error"]) for r in rows), "seconds": round(time.perf_counter() - started, 1)}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'workers':>7} {'streams':>7} {'delay µs':>8} {'predicted':>9} {'measured':>9} {'error':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['concurrency']:>7} {r['delay_us']:>8} {r['predicted_tok_s']:>9} "
              f"{r['measured_tok_s']:>9} {100 * r['error']:>6.1f}%")
    print(f"{report['within_15pct']} of {len(rows)} within ±15%; wrote {a.out}")
    try:
        plot(rows, a.out.with_suffix(".png"), f"moebus performance model, {model.name}, {os.cpu_count()} cores")
        print(f"wrote {a.out.with_suffix('.png')}")
    except ImportError:
        print("no plot: matplotlib is not installed (make validate-model installs it)")


if __name__ == "__main__":
    main()

"""Speculative decoding over the bus (issue 23): tokens/s with drafts of a known acceptance rate
against none, and tokens per layer round trip against (1 - a^(k+1)) / (1 - a).

    python -m bench.speculation [--models thin,mixtral-0.5b] [--quick]

Random weights make real drafters' acceptance meaningless, so the drafter here is the router's
replay drafter: each prompt's greedy continuation, recorded first with single-process mlx-lm
(moebus's greedy tokens are mlx-lm's: tested), each drafted token replaced by a wrong one with
probability 1 - a. One `moebus up` per model serves every condition: each prompt carries its own
a, and prompts the file does not know get no drafts (the baseline). Per condition, c streams
at once, `--reps` times; tokens/s is completion tokens over the time from the first streamed
token to the last, and tokens per round trip is completion tokens over decode steps (c = 1).
Every answer is checked against the recording. Writes bench/speculation.json, prints tables.
`--quick` runs the tiny model at tiny settings: it checks that the benchmark works, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from openai import AsyncOpenAI

from bench import models
from bench.conversation import Words, stream_turn
from bench.load import cluster
from bench.run import metric, progress, scrape
from bench.table import write_and_show
from services.router.draft_policy import choose_k, tokens_per_step

ROOT = Path(__file__).resolve().parents[1]
K = 4  # --draft-max, the default
# (acceptance or None for no drafts, streams at once)
CONDITIONS = [(None, 1), (0.0, 1), (0.5, 1), (0.7, 1), (0.9, 1), (None, 4), (0.7, 4)]


def record(path: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations from single-process mlx-lm: what moebus will write, token for token."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    return [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=tokens,
                                              sampler=lambda lp: mx.argmax(lp, axis=-1))] for p in prompts]


def steps(url: str) -> float:
    return sum(float(line.split()[-1]) for line in scrape(url).splitlines()
               if line.startswith("moebus_micro_batch_steps_total"))


async def condition(url: str, client: AsyncOpenAI, model: str, runs: list[list[int]], recorded: list[list[int] | None],
                    tokens: int, drafter: str = "replay") -> dict:
    """The runs at once: their decode tokens/s, steps, and whether each answer is the recording."""
    before, text0 = steps(url), scrape(url)
    t0 = time.perf_counter()
    out = await asyncio.gather(*(stream_turn(client, model, p, tokens) for p in runs))
    wall = time.perf_counter() - t0
    after, text1 = steps(url), scrape(url)
    first = min(t0 + r["ttft"] for r in out)
    last = max(t0 + r["seconds"] for r in out)
    decoded = sum(r["completion_tokens"] - 1 for r in out)
    label = f'{{drafter="{drafter}"}}'
    delta = {k: metric(text1, f"moebus_{k}_total", label) - metric(text0, f"moebus_{k}_total", label)
             for k in ("draft_tokens", "draft_tokens_accepted", "verify_steps", "verify_step_tokens", "draft_seconds")}
    return {"tok_s": decoded / max(last - first, 1e-9), "wall_s": wall, "steps": after - before,
            # without the drafter's own time: what the verify steps alone give (c = 1)
            "tok_s_verify_only": decoded / max(last - first - delta["draft_seconds"], 1e-9),
            "tokens": sum(r["completion_tokens"] for r in out),
            "exact": all(rec is None or r["answer"] == rec[:len(r["answer"])] for r, rec in zip(out, recorded)),
            **delta}


async def run_model(url: str, plan: list[tuple[float | str | None, int, list[list[list[int]]]]],
                    recorded: dict[tuple[int, ...], list[int]], tokens: int, drafter: str = "replay") -> list[dict]:
    """Every condition once per rep, the reps interleaved: drift over the run touches all alike."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900) as client:
        model = (await client.models.list()).data[0].id
        results: list[list[dict]] = [[] for _ in plan]
        for rep in range(len(plan[0][2])):
            for i, (accept, streams, reps) in enumerate(plan):
                runs = reps[rep]
                r = await condition(url, client, model, runs, [recorded.get(tuple(p)) for p in runs], tokens, drafter)
                text = scrape(url)  # the last round trips: mostly this condition's
                r.update({f"{k}_us_p50": round(1e6 * metric(text, f"moebus_{name}", '{quantile="0.5"}'), 1)
                          for k, name in (("layer_rtt", "expert_roundtrip_recent_seconds"),
                                          ("worker_compute", "expert_compute_recent_seconds"),
                                          ("router_outside_step", "router_step_outside_experts_recent_seconds"))})
                results[i].append(r)
                progress(f"  a={accept} c={streams}: {r['tok_s']:.2f} tok/s, exact={r['exact']}, "
                         f"layer rtt {r['layer_rtt_us_p50']} us (worker {r['worker_compute_us_p50']} us)")
    rows = []
    for (accept, streams, _), res in zip(plan, results):
        rows.append({"accept": accept, "streams": streams, "reps": res,
                     "tok_s": statistics.median(r["tok_s"] for r in res),
                     # the first step prefills and picks each stream's first token: decode steps after it
                     "tokens_per_step": statistics.median((r["tokens"] - streams) / max(r["steps"] - 1, 1) for r in res),
                     "tokens_per_verify_step": sum(r["verify_step_tokens"] for r in res)
                     / max(1, sum(r["verify_steps"] for r in res)),
                     "exact": all(r["exact"] for r in res),
                     "tok_s_verify_only": statistics.median(r["tok_s_verify_only"] for r in res),
                     "acceptance": sum(r["draft_tokens_accepted"] for r in res) / max(1, sum(r["draft_tokens"] for r in res)),
                     **{k: statistics.median(r[k] for r in res)
                        for k in ("layer_rtt_us_p50", "worker_compute_us_p50", "router_outside_step_us_p50")}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="thin,mixtral-0.5b")
    ap.add_argument("--quick", action="store_true", help="the tiny model at tiny settings")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per stream")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "speculation.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models", help="where models are made once")
    a = ap.parse_args()
    names = ["tiny"] if a.quick else a.models.split(",")
    if a.quick:
        a.tokens, a.reps = 12, 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()},
                    "settings": {"tokens": a.tokens, "reps": a.reps, "workers": a.workers, "draft_max": K},
                    "models": {}}
    table = []
    started = time.perf_counter()
    for name in names:
        path = models.build(name, a.models_dir)
        words = Words(models.describe(path)["shape"]["vocab_size"], 7)
        warm = [words.opening(8)]
        plan = [(accept, c, [[words.opening(16) for _ in range(c)] for _ in range(a.reps)])
                for accept, c in CONDITIONS]
        every = [p for _, _, reps in plan for runs in reps for p in runs]
        progress(f"{name}: recording {len(every)} greedy continuations with mlx-lm")
        recorded = dict(zip(map(tuple, every), record(path, every, a.tokens)))  # all: every answer is checked
        rates = {tuple(p): accept for accept, _, reps in plan if accept is not None for runs in reps for p in runs}
        replay = a.out.with_name(f"speculation-{name}.replay.json")  # the baseline's prompts are not in it
        replay.write_text(json.dumps({"accept": 0.0, "seed": 1, "runs": [
            {"prompt": list(p), "continuation": recorded[p], "accept": rate} for p, rate in rates.items()]}))
        progress(f"{name}: moebus up, {a.workers} worker(s), --draft-replay")
        with cluster(str(path), a.workers, a.out.with_name("speculation.log"), ("--draft-replay", str(replay))) as url:
            asyncio.run(run_model(url, [(None, 1, [warm])], {}, 4))  # allocations and kernels first
            rows = asyncio.run(run_model(url, plan, recorded, a.tokens))
        base = {c: r["tok_s"] for r in rows for c in [r["streams"]] if r["accept"] is None}
        for r in rows:
            r["ratio"] = r["tok_s"] / base[r["streams"]]
            if r["accept"] is not None:
                k = choose_k(r["accept"], K)
                r["formula_k4"], r["policy_k"], r["formula_policy_k"] = (tokens_per_step(r["accept"], K), k,
                                                                          tokens_per_step(r["accept"], k))
            table.append({"model": name, "c": r["streams"], "a": "none" if r["accept"] is None else f"{r['accept']:.1f}",
                          "tok_s": f"{r['tok_s']:.2f}", "ratio": f"{r['ratio']:.2f}x",
                          "per_step": f"{r['tokens_per_step']:.2f}",
                          "per_verify": "" if r["accept"] is None else f"{r['tokens_per_verify_step']:.2f}",
                          "formula": "" if r["accept"] is None else f"{r['formula_policy_k']:.2f} (k={r['policy_k']})",
                          "kept": "" if r["accept"] is None else f"{r['acceptance']:.2f}",
                          "exact": "yes" if r["exact"] else "NO", "vonly": ""})
        # Real drafters: the model drafting for itself on the router (every draft kept: the verify
        # step's own cost against the ideal k + 1), and prompt lookup (what it finds in a random
        # model's text: its acceptance says nothing of real text).
        for label, flags, drafter in (("self", ("--draft-model", str(path)), "model"), ("lookup", (), "lookup")):
            progress(f"{name}: moebus up, drafter {drafter}")
            own = [[words.opening(16)] for _ in range(a.reps)]
            with cluster(str(path), a.workers, a.out.with_name("speculation.log"), flags) as url:
                asyncio.run(run_model(url, [(None, 1, [warm])], {}, 4, drafter))
                r = asyncio.run(run_model(url, [(label, 1, own)], {}, a.tokens, drafter))[0]
            r["ratio"] = r["tok_s"] / base[1]  # against no drafts in the replay cluster: another start
            report.setdefault("real_drafters", {}).setdefault(name, {})[label] = r
            table.append({"model": name, "c": 1, "a": label, "tok_s": f"{r['tok_s']:.2f}",
                          "ratio": f"{r['ratio']:.2f}x", "per_step": f"{r['tokens_per_step']:.2f}",
                          "per_verify": f"{r['tokens_per_verify_step']:.2f}",
                          "formula": f"{K + 1:.2f} (k={K})" if label == "self" else "",
                          "kept": f"{r['acceptance']:.2f}", "exact": "(tests)",
                          "vonly": f"{r['tok_s_verify_only']:.2f} ({r['tok_s_verify_only'] / base[1]:.2f}x)"})
        report["models"][name] = rows
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_and_show(a.out, report, table, [("model", "model", 13), ("streams", "c", 7), ("a", "a", 5),
                                          ("tok/s", "tok_s", 7), ("vs none", "ratio", 8), ("tokens/step", "per_step", 11),
                                          ("per verify step", "per_verify", 15),
                                          ("formula (policy's k)", "formula", 20), ("drafts kept", "kept", 11),
                                          ("exact", "exact", 7),
                                          ("tok/s less drafting", "vonly", 19)])


if __name__ == "__main__":
    main()

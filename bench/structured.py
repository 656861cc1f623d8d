"""`make bench`: what structured output costs, JSON-constrained streams beside free ones in `moebus up`.

    python -m bench.structured [--models mixtral-0.5b,thin] [--tokens 32] [--workers 2] [--repeats 3] [--quick]

Each bench model is built with a byte-level BPE tokenizer of its vocab size (bench.models,
`<name>-bpe`) whose lm_head never picks EOS or a token with '"': a free answer and one constrained
to SCHEMA (its string never closes) both run to max_tokens. For each model, one cluster, then at
1 and 8 streams: all free, all constrained, and a mixed batch (half free, half constrained) whose
free streams are compared with those of the all-free batch of the same size. The mask time per
constrained token is the router's moebus_grammar_mask_seconds over moebus_grammar_masks, taken
around each run. Every run repeats (interleaved, so drift hits all alike) and reports medians.
Writes bench/structured.json and prints a table. `--quick`: the tiny model, just to see it runs.
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
from bench.load import cluster, stream_one
from bench.run import metric, progress, scrape

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
JSON = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA, "strict": True}}}


def scenarios(top: int) -> dict[str, list[bool]]:
    """Each run's streams, True where constrained. The mixed batch alternates pairs: a burst
    split between two micro-batches alternates too, so each gets both kinds."""
    half = top // 2
    mixed = [i % 4 >= 2 for i in range(top)] if top >= 4 else [i % 2 == 1 for i in range(top)]
    # compared runs next to each other: the machine drifts
    return {"free-1": [False], "json-1": [True], f"free-{top}": [False] * top, f"mixed-{top}": mixed,
            f"json-{top}": [True] * top, f"free-{half}": [False] * half}


def group(results: list[dict], tokens: int) -> dict:
    """Figures of some streams of one run: tokens/s from the first request to the last token."""
    if any(r["ttft"] is None for r in results):
        raise SystemExit("a stream sent no content")
    ends = [r["ttft"] + sum(r["gaps"]) for r in results]  # its last content chunk, from its request
    gaps = sorted(g for r in results for g in r["gaps"])
    total = sum(r["tokens"] for r in results)
    return {"streams": len(results), "completed": sum(r["tokens"] == tokens for r in results), "tokens": total,
            "tok_s": total / max(ends) if ends else 0.0,
            "stream_tok_s": statistics.mean(r["tokens"] / e for r, e in zip(results, ends)) if ends else 0.0,
            "itl_ms_p50": 1000 * gaps[len(gaps) // 2] if gaps else 0.0,
            "itl_ms_p99": 1000 * gaps[int(len(gaps) * 0.99)] if gaps else 0.0}


async def one_run(client: AsyncOpenAI, model: str, url: str, kinds: list[bool], tokens: int) -> dict:
    before = await asyncio.to_thread(scrape, url)
    results = await asyncio.gather(*(stream_one(client, model, f"the river {i}", tokens, **(JSON if c else {}))
                                     for i, c in enumerate(kinds)))
    after = await asyncio.to_thread(scrape, url)  # a sequence adds its mask time when it ends
    seconds, masks, *steps = (metric(after, *name) - metric(before, *name) for name in (
        ("moebus_grammar_mask_seconds",), ("moebus_grammar_masks",),
        ("moebus_micro_batch_steps_total", '{lane="0"}'), ("moebus_micro_batch_steps_total", '{lane="1"}')))
    out = {"free": group([r for r, c in zip(results, kinds) if not c], tokens),
           "json": group([r for r, c in zip(results, kinds) if c], tokens)}
    out["json"] |= {"masks": masks, "mask_us_per_token": 1e6 * seconds / masks if masks else 0.0}
    # decode steps of each micro-batch lane: both near max_tokens when the burst was split evenly
    return {k: v | {"lane_steps": steps} for k, v in out.items() if v["streams"]}


async def check_constrained(client: AsyncOpenAI, model: str) -> None:
    """The grammar is applied (else this measures nothing): the answer opens SCHEMA's object."""
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "the river"}],
                                             max_tokens=16, temperature=0, **JSON)
    text = r.choices[0].message.content or ""
    if not text.startswith('{"text": "'):
        raise SystemExit(f"the answer does not follow the schema: {text!r}")


def median_of(runs: list[dict]) -> dict:
    """Per stream kind, the median of each figure over the repeats."""
    def med(values: list) -> float | list:
        if isinstance(values[0], list):
            return [med(list(v)) for v in zip(*values)]
        return round(statistics.median(values), 3)

    return {kind: {k: med([r[kind][k] for r in runs]) for k in runs[0][kind]} for kind in runs[0]}


async def bench_model(url: str, top: int, tokens: int, repeats: int) -> dict:
    plan = scenarios(top)
    raw: dict[str, list[dict]] = {name: [] for name in plan}
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        await check_constrained(client, model)
        await one_run(client, model, url, plan[f"mixed-{top}"], 4)  # warm up both paths at the batch's size
        for rep in range(repeats):
            for name, kinds in plan.items():
                progress(f"  {name} ({rep + 1}/{repeats})")
                raw[name].append(await one_run(client, model, url, kinds, tokens))
    half = top // 2

    def ratio(a: str, a_kind: str, b: str, key: str) -> float:
        """The median over repeats of run a's figure over run b's free streams' in the same repeat."""
        return round(statistics.median(x[a_kind][key] / y["free"][key] for x, y in zip(raw[a], raw[b])), 3)

    runs = {name: median_of(rs) for name, rs in raw.items()}
    return {
        "runs": runs, "raw": raw,
        "ratios": {
            "json_vs_free_c1": ratio("json-1", "json", "free-1", "tok_s"),
            f"json_vs_free_c{top}": ratio(f"json-{top}", "json", f"free-{top}", "tok_s"),
            # free streams beside constrained ones against those of an all-free batch of the same size
            "mixed_free_stream_tok_s_vs_all_free": ratio(f"mixed-{top}", "free", f"free-{top}", "stream_tok_s"),
            "mixed_free_itl_vs_all_free": ratio(f"mixed-{top}", "free", f"free-{top}", "itl_ms_p50"),
            # ...and against the same free streams alone (a smaller batch: faster anyway)
            f"mixed_free_tok_s_vs_free_{half}_alone": ratio(f"mixed-{top}", "free", f"free-{half}", "tok_s"),
        },
        "mask_us_per_token": {n: runs[n]["json"]["mask_us_per_token"] for n in runs if "json" in runs[n]},
    }


def profile_steps(path: Path, rows: int, steps: int) -> dict:
    """In this process, the router's work after the forward pass of a decode step of `rows`
    sequences, on random logits, as mlx-lm's GenerationBatch does it: once any row has a logits
    processor, every row is sliced out, processed and concatenated; then log-softmax and greedy
    sampling. Per step (median µs): no processors; the per-row loop alone (identity processors);
    half and all rows constrained, with the grammar's own mask time (llguidance and unpacking
    its bits) apart from the rest (the mask applied with mx.where, the loop)."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from services.router.constrain import Grammars
    from shared.messages import GenerateRequest, ResponseFormat
    from shared.subjects import stream_subject

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    tokenizer = load_tokenizer(path)
    grammars = Grammars(tokenizer, vocab)
    req = GenerateRequest(request_id="p", stream=stream_subject("p"), max_tokens=steps, messages=[],
                          response_format=ResponseFormat(type="json_schema", json_schema=SCHEMA))
    quotes = mx.array([i for t, i in tokenizer.get_vocab().items() if '"' in t])
    plans = {"free": [None] * rows, "loop_only": [lambda tokens, x: x] * rows,
             **{f"{n}_constrained": [grammars.compile(req) if e < n else None for e in range(rows)]
                for n in sorted({rows // 2, rows} - {0})}}
    out = {}
    for name, procs in plans.items():
        context = [[0] for _ in range(rows)]
        times = []
        for _ in range(steps):
            logits = mx.random.normal((rows, vocab))
            logits[:, quotes] = 0.0  # as the bench models: a string never closes
            mx.eval(logits)
            t0 = time.perf_counter()
            if any(procs):
                logits = mx.concatenate([p(mx.array(context[e]), logits[e:e + 1]) if p else logits[e:e + 1]
                                         for e, p in enumerate(procs)], axis=0)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = mx.argmax(logprobs, axis=-1)
            mx.eval(sampled, logprobs)
            times.append(time.perf_counter() - t0)
            for e, t in enumerate(sampled.tolist()):
                context[e].append(t)
        mask = sum(getattr(p, "mask_s", 0.0) for p in procs if p)
        out[name] = {"step_us": round(1e6 * statistics.median(times), 1), "mask_us": round(1e6 * mask / steps, 1)}
    for v in out.values():
        v["added_us"] = round(v["step_us"] - out["free"]["step_us"], 1)  # what it adds to a step
    return out


def show(name: str, res: dict) -> None:
    print(f"\n{name}: medians of {len(next(iter(res['raw'].values())))} runs")
    print(f"{'run':>10} {'kind':>5} {'streams':>7} {'done':>4} {'tok/s':>7} {'per stream':>10} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'mask µs/tok':>11}")
    for run, kinds in res["runs"].items():
        for kind, g in kinds.items():
            mask = f"{g['mask_us_per_token']:.0f}" if kind == "json" else ""
            print(f"{run:>10} {kind:>5} {g['streams']:>7} {g['completed']:>4} {g['tok_s']:>7.2f} "
                  f"{g['stream_tok_s']:>10.2f} {g['itl_ms_p50']:>8.1f} {g['itl_ms_p99']:>8.1f} {mask:>11}")
    print("ratios (medians of each repeat's): " + ", ".join(f"{k} {v}" for k, v in res["ratios"].items()))
    for rows, plans in res["step_profile"].items():
        print(f"after the forward pass, {rows.split('_')[1]} rows, µs per step: " + ", ".join(
            f"{plan} {v['step_us']:.0f} ({v['added_us']:+.0f}, mask {v['mask_us']:.0f})" for plan, v in plans.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-0.5b,thin")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of every stream")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each kind; the medians are reported")
    ap.add_argument("--quick", action="store_true", help="the tiny model, 2 streams, 1 run: only that it works")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "structured.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models", help="where models are made once")
    a = ap.parse_args()
    names = ["tiny"] if a.quick else a.models.split(",")
    top, tokens, repeats = (2, min(a.tokens, 6), 1) if a.quick else (8, a.tokens, a.repeats)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"machine": {"cores": os.cpu_count(), "os": platform.platform()}, "workers": a.workers,
                    "max_tokens": tokens, "repeats": repeats, "schema": SCHEMA}
    for name in names:
        progress(f"{name}: building the model with a byte-level BPE tokenizer (once)")
        path = models.build(name, a.models_dir, tokenizer="bpe")
        progress(f"{name}: a decode step's logits processing, in this process")
        profile = {f"rows_{n}": profile_steps(path, n, 4 * tokens) for n in (1, top)}
        progress(f"{name}: starting moebus with {a.workers} workers")
        with cluster(str(path), a.workers, a.out.with_suffix(".log")) as url:
            res = asyncio.run(bench_model(url, top, tokens, repeats))
        report[name] = {"model": models.describe(path), **res, "step_profile": profile}
        show(name, report[name])
    report["seconds"] = round(time.perf_counter() - started, 1)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()

"""Prompt reuse in conversations (issue 22): a second turn's time to first token against the
first's, and a 16-stream load of multi-turn conversations, with the prompt cache on and off.

    python -m bench.conversation [--models mixtral-0.5b,thin] [--quick]

Per model, `moebus up` (2 workers) with the default prompt cache serves `--reps` fresh
conversations: turn 1 is a 2,000-token prompt (token ids through /v1/completions, so its length
is exact), turn 2 is turn 1's prompt, its answer and 50 new tokens, then a fresh prompt of those
50 tokens alone (what turn 2 costs with no cache behind it); each streamed for its time to first
token, with the bus bytes it sent (the delta of moebus_expert_payload_bytes_total). Then
`--prompt-cache-bytes 0` serves the same turn-2 prompts: turn 2 on a cold server. On the first
model, both clusters also serve 16 concurrent conversations of 3 turns each.
Writes bench/conversation.json and prints tables.
`--quick` runs the tiny model at tiny settings: it checks that the benchmark works, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI

from bench import models
from bench.load import cluster
from bench.run import metric, progress, scrape
from bench.table import write_and_show
from shared.demo import SPECIAL

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("expert_payload_bytes_total", "expert_layer_calls_total", "prompt_cache_hits", "prompt_cache_misses",
           "prompt_cache_tokens_reused", "prompt_cache_bytes")


class Words:
    """Random prompts of the word tokenizer's ids. Every prompt starts with a token no other
    prompt on the cluster starts with: a shared first token would let the cache serve a token of
    what should be a cold start."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.firsts = list(range(len(SPECIAL), vocab))
        self.rng.shuffle(self.firsts)
        self.vocab = vocab

    def opening(self, n: int) -> list[int]:
        return [self.firsts.pop()] + self.more(n - 1)

    def more(self, n: int) -> list[int]:
        return [self.rng.randrange(len(SPECIAL), self.vocab) for _ in range(n)]


def counters(url: str) -> dict[str, float]:
    text = scrape(url)
    return {k: metric(text, f"moebus_{k}") for k in METRICS}


async def stream_turn(client: AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion: its time to first token, and its answer as token ids."""
    t0 = time.perf_counter()
    first, texts, usage = None, [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            texts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    # The word tokenizer decodes to "w12 w7 ...": word i is token id len(SPECIAL) + i.
    answer = [len(SPECIAL) + int(w[1:]) for w in "".join(texts).split()]
    if usage is None or first is None or len(answer) != usage.completion_tokens:
        raise SystemExit(f"unexpected stream: {len(answer)} words for usage {usage}")
    details = usage.prompt_tokens_details
    return {"ttft": first - t0, "seconds": end - t0, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "cached_tokens": details.cached_tokens if details else 0,
            "answer": answer}


async def decode_bytes(url: str, client: AsyncOpenAI, model: str, words: Words) -> float:
    """Bus bytes of one decode step of one sequence (mean over 32 steps): what a turn's answer
    adds to its bytes, taken off to leave its prefill's."""
    sent = []
    for max_tokens in (1, 33):
        before = counters(url)["expert_payload_bytes_total"]
        await stream_turn(client, model, words.opening(1), max_tokens)
        sent.append(counters(url)["expert_payload_bytes_total"] - before)
    return (sent[1] - sent[0]) / 32


async def measured_turn(url: str, client: AsyncOpenAI, model: str, prompt: list[int], max_tokens: int,
                        step_bytes: float) -> dict:
    before = counters(url)
    r = await stream_turn(client, model, prompt, max_tokens)
    after = counters(url)
    sent = after["expert_payload_bytes_total"] - before["expert_payload_bytes_total"]
    r["bus_bytes"] = int(sent)
    r["prefill_bus_bytes"] = int(sent - (r["completion_tokens"] - 1) * step_bytes)  # the answer's steps off
    r["layer_calls"] = int(after["expert_layer_calls_total"] - before["expert_layer_calls_total"])
    return r


async def two_turns(url: str, words: Words, prompt_tokens: int, new_tokens: int, max_tokens: int, reps: int,
                    replay: list[list[int]] | None = None) -> tuple[dict, list[list[int]]]:
    """Turn 1 and turn 2 of `reps` fresh conversations, each followed by a fresh prompt as long
    as what turn 2 prefilled (turn 2's cost with no cache behind it). With `replay` (the turn-2
    prompts of a run with the cache on), those alone: turn 2 on a cold server. Returns the
    figures and the turn-2 prompts."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900) as client:
        model = (await client.models.list()).data[0].id
        step_bytes = await decode_bytes(url, client, model, words)
        # A short pair first: a cluster's first requests pay for allocations and compiled kernels.
        warm = words.opening(min(prompt_tokens, 512))
        answer = (await stream_turn(client, model, warm, max_tokens))["answer"]
        await stream_turn(client, model, warm + answer + words.more(new_tokens), max_tokens)
        pairs, prompts = [], []
        for rep in range(reps):
            if replay is not None:
                pairs.append({"turn2": await measured_turn(url, client, model, replay[rep], max_tokens, step_bytes)})
                continue
            p1 = words.opening(prompt_tokens)
            t1 = await measured_turn(url, client, model, p1, max_tokens, step_bytes)
            prompts.append(p1 + t1["answer"] + words.more(new_tokens))
            t2 = await measured_turn(url, client, model, prompts[-1], max_tokens, step_bytes)
            short = words.opening(t2["prompt_tokens"] - t2["cached_tokens"])
            pairs.append({"turn1": t1, "turn2": t2,
                          "short": await measured_turn(url, client, model, short, max_tokens, step_bytes)})
    for p in pairs:
        for r in p.values():
            r.pop("answer")
    med = {f"{turn}_{k}": statistics.median(p[turn][k] for p in pairs)
           for turn in pairs[0] for k in ("ttft", "prefill_bus_bytes", "bus_bytes", "cached_tokens",
                                          "prompt_tokens", "layer_calls")}
    if replay is None:
        med["ratio"] = statistics.median(p["turn2"]["ttft"] / p["turn1"]["ttft"] for p in pairs)
    return {"decode_step_bus_bytes": round(step_bytes), "pairs": pairs, "median": med}, prompts


def pct(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


async def conversation(client: AsyncOpenAI, model: str, words: Words, opening: int, turns: int, new: int,
                       max_tokens: int) -> list[dict]:
    prompt, out = words.opening(opening), []
    for turn in range(turns):
        r = await stream_turn(client, model, prompt, max_tokens)
        prompt = prompt + r.pop("answer") + words.more(new)
        out.append({"turn": turn + 1, **r})
    return out


async def load(url: str, words: Words, streams: int, opening: int, turns: int, new: int, max_tokens: int) -> dict:
    """`streams` conversations at once, each turn sent when the previous answer is in."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900) as client:
        model = (await client.models.list()).data[0].id
        await stream_turn(client, model, words.opening(opening), 4)  # warm up
        before = counters(url)
        t0 = time.perf_counter()
        convs = await asyncio.gather(*(conversation(client, model, words, opening, turns, new, max_tokens)
                                       for _ in range(streams)))
        wall = time.perf_counter() - t0
        after = counters(url)
    done = [t for c in convs for t in c]
    later = [t["ttft"] for t in done if t["turn"] > 1]
    ttft = [t["ttft"] for t in done]
    tokens = sum(t["completion_tokens"] for t in done)
    delta = {k: after[k] - before[k] for k in METRICS if k != "prompt_cache_bytes"}
    return {"streams": streams, "turns": len(done), "tokens": tokens, "seconds": round(wall, 2),
            "tok_s": round(tokens / wall, 2),
            "ttft_ms_p50": round(1000 * pct(ttft, 0.5)), "ttft_ms_p95": round(1000 * pct(ttft, 0.95)),
            "later_ttft_ms_p50": round(1000 * pct(later, 0.5)), "later_ttft_ms_p95": round(1000 * pct(later, 0.95)),
            "prompt_tokens": sum(t["prompt_tokens"] for t in done),
            "cached_tokens": sum(t["cached_tokens"] for t in done),
            "bus_bytes": int(delta["expert_payload_bytes_total"]),
            "prompt_cache_hits": int(delta["prompt_cache_hits"]), "prompt_cache_misses": int(delta["prompt_cache_misses"]),
            "prompt_cache_bytes_at_end": int(after["prompt_cache_bytes"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-0.5b,thin", help="the first also runs the 16-stream load")
    ap.add_argument("--quick", action="store_true", help="the tiny model at tiny settings")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="turn 1's prompt")
    ap.add_argument("--new-tokens", type=int, default=50, help="turn 2's tokens after turn 1's answer")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="fresh conversations per cluster (medians are reported)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3, help="turns of each load conversation")
    ap.add_argument("--opening", type=int, default=500, help="a load conversation's first prompt")
    ap.add_argument("--load-new", type=int, default=40, help="tokens each later load turn adds after the answer")
    ap.add_argument("--load-max-tokens", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "conversation.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "models", help="where models are made once")
    a = ap.parse_args()
    if a.quick:
        names = ["tiny"]
        a.prompt_tokens, a.new_tokens, a.max_tokens, a.reps = 120, 10, 4, 1
        a.streams, a.turns, a.opening, a.load_new, a.load_max_tokens = 3, 2, 40, 8, 4
    else:
        names = a.models.split(",")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = {k: getattr(a, k) for k in ("workers", "prompt_tokens", "new_tokens", "max_tokens", "reps", "streams",
                                           "turns", "opening", "load_new", "load_max_tokens")}
    report: dict = {"machine": {"cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()},
                    "settings": settings, "models": {}}
    turn_rows, load_rows = [], []
    for i, name in enumerate(names):
        path = models.build(name, a.models_dir)
        vocab = models.describe(path)["shape"]["vocab_size"]
        res: dict = {}
        prompts: list[list[int]] | None = None
        for reuse, extra in (("on", ()), ("off", ("--prompt-cache-bytes", "0"))):
            progress(f"{name}: moebus up, prompt cache {reuse}")
            with cluster(str(path), a.workers, a.out.with_name("conversation.log"), extra) as url:
                words = Words(vocab, 0)
                res[reuse], prompts = asyncio.run(two_turns(url, words, a.prompt_tokens, a.new_tokens,
                                                            a.max_tokens, a.reps, prompts))
                if i == 0:
                    progress(f"{name}: {a.streams} conversations, prompt cache {reuse}")
                    lr = asyncio.run(load(url, words, a.streams, a.opening, a.turns, a.load_new,
                                          a.load_max_tokens))
                    res[f"load_{reuse}"] = lr
                    load_rows.append({"model": name, "reuse": reuse, **lr})
        on, off = res["on"]["median"], res["off"]["median"]
        res["turn2_vs_cold_turn2"] = round(on["turn2_ttft"] / off["turn2_ttft"], 3)
        res["target_met"] = on["ratio"] <= 0.2
        report["models"][name] = res
        turn_rows.append({"model": name, "t1": round(1000 * on["turn1_ttft"]), "t2": round(1000 * on["turn2_ttft"]),
                          "ratio": round(on["ratio"], 3), "cold": round(1000 * off["turn2_ttft"]),
                          "short": round(1000 * on["short_ttft"]), "cached": int(on["turn2_cached_tokens"]),
                          "b1": round(on["turn1_prefill_bus_bytes"] / 1e6, 2),
                          "b2": round(on["turn2_prefill_bus_bytes"] / 1e6, 2),
                          "bcold": round(off["turn2_prefill_bus_bytes"] / 1e6, 2)})
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_and_show(a.out, report, turn_rows,
                   [("model", "model", 13), ("turn1 TTFT ms", "t1", 13), ("turn2 TTFT ms", "t2", 13),
                    ("turn2/turn1", "ratio", 11), ("cold turn2 ms", "cold", 13), ("new only ms", "short", 11),
                    ("cached", "cached", 6), ("prefill bus MB: turn1", "b1", 21), ("turn2", "b2", 6),
                    ("cold turn2", "bcold", 10)])
    print(f"\n{a.streams} conversations of {a.turns} turns ({a.opening}-token openings, +answer +{a.load_new} a turn, "
          f"{a.load_max_tokens} tokens an answer):", file=sys.stdout)
    cols = [("model", "model", 13), ("reuse", "reuse", 5), ("tok/s", "tok_s", 7), ("TTFT p50", "ttft_ms_p50", 8),
            ("TTFT p95", "ttft_ms_p95", 8), ("turns 2+ p50", "later_ttft_ms_p50", 12),
            ("turns 2+ p95", "later_ttft_ms_p95", 12), ("prompt tok", "prompt_tokens", 10),
            ("cached tok", "cached_tokens", 10), ("bus MB", "bus_mb", 8)]
    print(" ".join(f"{t:>{w}}" for t, _, w in cols))
    for r in load_rows:
        r["bus_mb"] = round(r["bus_bytes"] / 1e6, 1)
        print(" ".join(f"{r[k]:>{w}}" for _, k, w in cols))
    print(f"\nwrote {a.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()

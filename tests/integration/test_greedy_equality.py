"""Greedy tokens through `moebus up --workers N` equal transformers' and single-process mlx-lm's."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from tests.checkpoints import FAMILIES, mlx_lm_greedy, reference_greedy, vocab
from tests.cluster import Up

PROMPTS = [[8, 30, 51, 77, 12], [100, 9, 250, 4, 5, 6, 7, 300, 41]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, list[list[int]]]:
    refs = {}
    for family, path in checkpoints.items():
        refs[family] = [reference_greedy(path, p, NEW_TOKENS) for p in PROMPTS]
        # the single-process mlx-lm run is the second witness: moebus changes only where experts run
        assert refs[family] == [mlx_lm_greedy(path, p, NEW_TOKENS) for p in PROMPTS]
        refs[family].append(reference_greedy(path, turn2(refs[family]), NEW_TOKENS))
    return refs


def turn2(refs: list[list[int]]) -> list[int]:
    """A conversation's next turn: the first prompt, its answer, new tokens."""
    return PROMPTS[0] + refs[0] + [13, 14, 15]


# Every family on 2 and 3 workers; 1 worker (every expert in one place, the plainest split) once.
SPLITS = [(f, w) for f in FAMILIES for w in (1, 2, 3) if w > 1 or f == FAMILIES[0]]


@pytest.mark.slow
@pytest.mark.parametrize("family, workers", SPLITS)
async def test_greedy_tokens_match_transformers(family, workers, checkpoints, references, tmp_path):
    """One prompt at a time, then (on 2 and 3 workers) 4 and 12 at once: both micro-batches, the
    default, decode and take turns at MLX while the other waits on the bus. Speculation runs
    throughout, every sequence of a batch drafting (rows of one step keeping different lengths):
    on 1 and 2 workers a drafter proposes transformers' own tokens, 30% of them wrong; on 3 the
    model itself, whole on the router, drafts (--draft-model)."""
    words = {w: i for i, w in enumerate(vocab())}
    replay = tmp_path / "replay.json"
    prompts = [*PROMPTS, turn2(references[family])]
    replay.write_text(json.dumps({"accept": 0.7, "seed": workers, "runs": [
        {"prompt": p, "continuation": r} for p, r in zip(prompts, references[family])]}))
    drafter = ("--draft-model", str(checkpoints[family])) if workers == 3 else ("--draft-replay", str(replay))
    with Up(checkpoints[family], workers, tmp_path, extra=(*drafter, "--speculate-max-running", "16")) as up:
        async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key="-", max_retries=0) as client:
            cached: list[int] = []

            async def one(prompt: list[int]) -> list[int]:
                r = await client.completions.create(model=f"tiny-{family}", prompt=prompt, max_tokens=NEW_TOKENS,
                                                    temperature=0)
                assert r.choices[0].finish_reason == "length"
                assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == NEW_TOKENS
                cached.append(r.usage.prompt_tokens_details.cached_tokens)
                return [words[w] for w in r.choices[0].text.split()]
            alone = [await one(p) for p in PROMPTS]
            # The next turn reuses the first's prompt and answer from the prompt cache: only the new
            # tokens are prefilled, and the answer is still transformers' for the whole prompt.
            alone.append(await one(turn2(references[family])))
            assert cached == [0, 0, len(PROMPTS[0]) + NEW_TOKENS]
            few = await asyncio.gather(*(one(p) for p in PROMPTS * 2)) if workers > 1 else None
            together = await asyncio.gather(*(one(p) for p in PROMPTS * 6)) if workers > 1 else None
        text = httpx.get(f"{up.url}/metrics").text
        steps = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("moebus_micro_batch_steps")]
    assert alone == references[family]
    drafted, kept = _metric(text, "moebus_draft_tokens_total"), _metric(text, "moebus_draft_tokens_accepted_total")
    assert _metric(text, "moebus_verify_steps_total") > 0 and kept > NEW_TOKENS
    if workers < 3:
        assert kept < drafted  # drafts refused too: rows kept different lengths
    if together is not None:
        assert few == references[family][:2] * 2
        assert together == references[family][:2] * 6
        assert len(steps) == 2 and min(steps) > 0, steps  # both lanes decoded


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dram"), [(f, 0) for f in FAMILIES] + [("qwen3_moe", 1)])
async def test_flash_cache_keeps_the_greedy_tokens_while_evicting(family, dram, checkpoints, references, tmp_path):
    """`moebus up --memory-budget` under the experts' size serves them from SSD: 4 slots for
    2 layers, so experts are evicted and read again during the run, alone and 12 at once; with
    `--workers 1`, a DRAM worker beside it holds the hottest experts (a tiered cluster)."""
    from services.flash_cache.bundle import open_bundle
    words = {w: i for i, w in enumerate(vocab())}
    home = tmp_path / "home"
    budget = 2 * 2 * 3 * 64 * 128 * 4  # 4 fp32 expert records (gate, up, down) of one layer
    with Up(checkpoints[family], dram, tmp_path, extra=("--memory-budget", str(budget), "--window", "1"),
            env={"MOEBUS_HOME": str(home)}) as up:
        async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key="-", max_retries=0) as client:
            async def one(prompt: list[int]) -> list[int]:
                r = await client.completions.create(model=f"tiny-{family}", prompt=prompt,
                                                    max_tokens=NEW_TOKENS, temperature=0)
                return [words[w] for w in r.choices[0].text.split()]
            alone = [await one(p) for p in PROMPTS]
            together = await asyncio.gather(*(one(p) for p in PROMPTS * 6))
        (bundle,) = (home / "bundles").iterdir()
        m = open_bundle(bundle)
        # More records read than the model has: experts were evicted and read again. The counters
        # come with the flash-cache's next heartbeat.
        deadline = time.monotonic() + 10
        while (read := _metric(text := httpx.get(f"{up.url}/metrics").text, "moebus_flash_records_read_total")
               ) <= (m.moe_layers * m.num_experts if not dram else 0):
            assert time.monotonic() < deadline, f"{read:g} records read, of {m.moe_layers * m.num_experts}"
            await asyncio.sleep(0.1)
    assert alone == references[family][:2]
    assert together == references[family][:2] * 6
    assert _metric(text, "moebus_flash_slot_bytes") <= budget
    assert "flash-cache" in up.log.read_text()
    # the DRAM worker and the flash-cache each answered pairs (the flash-cache alone: one)
    served = [line for line in text.splitlines() if line.startswith("moebus_worker_tokens_total{")
              and float(line.split()[-1]) > 0]
    assert len(served) == 1 + dram, served

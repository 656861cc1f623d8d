"""Greedy tokens through `moebus up --workers N` equal transformers' and single-process mlx-lm's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

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
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers(family, workers, checkpoints, references, tmp_path):
    words = {w: i for i, w in enumerate(vocab())}
    with Up(checkpoints[family], workers, tmp_path) as up, OpenAI(base_url=f"{up.url}/v1", api_key="-") as client:
        got = []
        for prompt in PROMPTS:
            r = client.completions.create(model=f"tiny-{family}", prompt=prompt, max_tokens=NEW_TOKENS,
                                          temperature=0)
            assert r.choices[0].finish_reason == "length"
            assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == NEW_TOKENS
            got.append([words[w] for w in r.choices[0].text.split()])
    assert got == references[family]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
async def test_two_micro_batches_overlapping_keep_the_greedy_tokens(family, checkpoints, references, tmp_path):
    """Two lanes decode at once and take turns at MLX while the other waits on the bus."""
    words = {w: i for i, w in enumerate(vocab())}
    with Up(checkpoints[family], 2, tmp_path, extra=("--micro-batches", "2")) as up:
        async with AsyncOpenAI(base_url=f"{up.url}/v1", api_key="-", max_retries=0) as client:
            async def one(prompt: list[int]) -> list[int]:
                r = await client.completions.create(model=f"tiny-{family}", prompt=prompt,
                                                    max_tokens=NEW_TOKENS, temperature=0)
                return [words[w] for w in r.choices[0].text.split()]
            got = await asyncio.gather(*(one(p) for p in PROMPTS * 6))  # 12: both lanes busy
        steps = [float(line.split()[-1]) for line in httpx.get(f"{up.url}/metrics").text.splitlines()
                 if line.startswith("moebus_micro_batch_steps")]
    assert got == references[family] * 6
    assert len(steps) == 2 and min(steps) > 0, steps  # both lanes decoded

"""MLX-quantized (4-bit) checkpoints, as mlx-lm's convert writes them, serve the same greedy tokens."""

from __future__ import annotations


import pytest
from openai import OpenAI

from tests.checkpoints import mlx_lm_greedy, vocab
from tests.cluster import Up

PROMPT = [8, 30, 51, 77, 12]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "dbrx"])
def test_4bit_checkpoint_matches_single_process_mlx_lm(family, checkpoints, tmp_path):
    from mlx_lm import convert

    quantized = tmp_path / f"tiny-{family}-4bit"
    convert(str(checkpoints[family]), str(quantized), quantize=True, q_bits=4, q_group_size=32)
    want = mlx_lm_greedy(quantized, PROMPT, 10)
    words = {w: i for i, w in enumerate(vocab())}
    with Up(quantized, 2, tmp_path) as up, OpenAI(base_url=f"{up.url}/v1", api_key="-") as client:
        r = client.completions.create(model=quantized.name, prompt=PROMPT, max_tokens=10, temperature=0)
    assert [words[w] for w in r.choices[0].text.split()] == want

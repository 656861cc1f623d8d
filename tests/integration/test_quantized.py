"""MLX-quantized checkpoints, as mlx-lm's convert writes them, serve the same greedy tokens as
single-process mlx-lm: from DRAM workers, and from the flash-cache's SSD bundle."""

from __future__ import annotations


import pytest
from openai import OpenAI

from tests.checkpoints import mlx_lm_greedy, vocab
from tests.cluster import Up

PROMPT = [8, 30, 51, 77, 12]
# (family, how mlx-lm converts it, workers, --memory-budget: over it the flash-cache serves)
CASES = [
    ("qwen3_moe", {"q_bits": 4, "q_group_size": 32}, 2, None),
    ("dbrx", {"q_bits": 4, "q_group_size": 32}, 2, None),
    # 2 layers x (gate, up, down) of 64 x 128 at 4 bits, scales and biases: a pool of 3 records
    ("mixtral", {"q_bits": 4, "q_group_size": 32}, 0, 3 * 3 * (64 * 128 // 2 + 2 * 64 * 128 // 32 * 4)),
    # down_proj at 6 bits in layer 1, 3 bits elsewhere: two pools; one DRAM worker beside them
    ("qwen3_moe", {"quant_predicate": "mixed_3_6", "q_group_size": 32}, 1, 80_000),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "how", "workers", "budget"), CASES,
                         ids=["qwen3_moe-4bit", "dbrx-4bit", "mixtral-4bit-flash", "qwen3_moe-mixed-tiered"])
def test_quantized_checkpoint_matches_single_process_mlx_lm(family, how, workers, budget, checkpoints, tmp_path):
    from mlx_lm import convert

    quantized = tmp_path / f"tiny-{family}-q"
    convert(str(checkpoints[family]), str(quantized), quantize=True, **how)
    want = mlx_lm_greedy(quantized, PROMPT, 10)
    words = {w: i for i, w in enumerate(vocab())}
    extra = ("--memory-budget", str(budget)) if budget else ()
    with Up(quantized, workers, tmp_path, extra=extra, env={"MOEBUS_HOME": str(tmp_path / "home")}) as up, \
            OpenAI(base_url=f"{up.url}/v1", api_key="-") as client:
        r = client.completions.create(model=quantized.name, prompt=PROMPT, max_tokens=10, temperature=0)
        log = up.log.read_text()
    assert [words[w] for w in r.choices[0].text.split()] == want
    assert ("flash-cache" in log) == (budget is not None)

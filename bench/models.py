"""Benchmark models made locally: random fp32 weights in mlx-lm's Mixtral layout, a word tokenizer.

`mixtral-0.5b` is the NOTES model (d 1024, 8 layers, 8 experts, ffn 2048, vocab 32000: ~0.49B
parameters); `thin` is many thin layers where the bus dominates (24 layers, d 512, 32 experts,
top-4); `flash` has experts much larger than its benchmark's memory budget; `tiny` is for the suite's check that the benchmark runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SPECS: dict[str, dict] = {
    "mixtral-0.5b": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    "thin": dict(hidden_size=512, intermediate_size=256, num_hidden_layers=24, num_attention_heads=8,
                 num_key_value_heads=4, num_local_experts=32, num_experts_per_tok=4, vocab_size=8000),
    # experts 4x the flash benchmark's budget: 8 layers x 16 experts x 6 MiB records (768 MiB)
    "flash": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, vocab_size=4000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=300),
}


def build(name: str, root: Path) -> Path:
    """The model's directory under `root`, made once (seed 0)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral

    from shared.demo import SPECIAL, save_word_tokenizer

    path = root / name
    if (path / "model.safetensors").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = {"model_type": "mixtral", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, **SPECS[name]}
    mx.random.seed(0)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    model.lm_head.weight[: len(SPECIAL)] = 0.0  # never stops early: every run decodes max_tokens
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    words = [f"w{i}" for i in range(config["vocab_size"] - len(SPECIAL))]
    save_word_tokenizer(path, words, config["max_position_embeddings"])
    return path


def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    shape = {k: config[k] for k in SPECS["tiny"]}
    return {"name": path.name, "shape": shape, "bytes": (path / "model.safetensors").stat().st_size,
            "parameters": (path / "model.safetensors").stat().st_size // 4}

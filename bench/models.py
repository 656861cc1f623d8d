"""Benchmark models made locally: random fp32 weights in mlx-lm's Mixtral layout, a word tokenizer.

`mixtral-0.5b` is the NOTES model (d 1024, 8 layers, 8 experts, ffn 2048, vocab 32000: ~0.49B
parameters); `thin` is many thin layers where the bus dominates (24 layers, d 512, 32 experts,
top-4); `flash` has experts much larger than its benchmark's memory budget; `tiny` is for the suite's check that the benchmark runs.

`build(name, root, tokenizer="bpe")` makes the same shape with a byte-level BPE tokenizer of the
model's vocab size and a Qwen3-style chat template (JSON output, tool calls), in `<name>-bpe`.
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
    # the same at 4 bits would read fast enough to be compute-bound here: the 4-bit benchmark's
    # model has wider experts, 8 x 16 records of 2.8 MiB at 4 bits (360 MiB; 2.3 GiB as float)
    "flash-wide": dict(hidden_size=1024, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, vocab_size=4000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=300),
}


def build(name: str, root: Path, tokenizer: str = "word") -> Path:
    """The model's directory under `root`, made once (seed 0). `tokenizer`: "word" (w0 w1 ...,
    cannot spell JSON) or "bpe" (byte-level BPE, in `<name>-bpe`)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral

    from shared.demo import SPECIAL, save_word_tokenizer

    if tokenizer not in ("word", "bpe"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected word or bpe")
    path = root / (name if tokenizer == "word" else f"{name}-bpe")
    if (path / "model.safetensors").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = {"model_type": "mixtral", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, **SPECS[name]}
    if tokenizer == "bpe":
        config["vocab_size"], config["eos_token_id"], never = save_bpe_tokenizer(
            path, config["vocab_size"], config["max_position_embeddings"])
        config.pop("bos_token_id")
    else:
        words = [f"w{i}" for i in range(config["vocab_size"] - len(SPECIAL))]
        save_word_tokenizer(path, words, config["max_position_embeddings"])
        never = list(range(len(SPECIAL)))
    mx.random.seed(0)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    # Zero logits never win against random ones: no run stops before max_tokens
    model.lm_head.weight[mx.array(never)] = 0.0
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def save_bpe_tokenizer(path: Path, vocab: int, max_len: int) -> tuple[int, int, list[int]]:
    """bench.grammar's byte-level BPE of `vocab` learned tokens, with the demo's Qwen3-style
    template (mlx-lm reads it as json_tools). Returns the tokenizer's length (the model's
    vocab_size), its EOS id, and the ids the model must never choose: the added tokens, so a
    free answer stays content, and every token with a '"', so a JSON string never closes and a
    constrained answer runs to max_tokens too."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from bench.grammar import train_tokenizer
    from shared.demo import _save_fast
    from shared.demo_templates import JSON_TOOLS_TEMPLATE

    tok = train_tokenizer(vocab)  # specials <|endoftext|> <|im_end|>, markers <tool_call> </tool_call>
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(m, normalized=False) for m in ("<think>", "</think>", "<tool_response>",
                                                               "</tool_response>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=JSON_TOOLS_TEMPLATE, model_max_length=max_len,
                                   clean_up_tokenization_spaces=False, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    _save_fast(fast, path, JSON_TOOLS_TEMPLATE)
    added = sorted(tok.get_added_tokens_decoder())
    quotes = [i for text, i in tok.get_vocab(with_added_tokens=False).items() if '"' in text]
    return len(fast), tok.token_to_id("<|im_end|>"), sorted(set(added) | set(quotes))


def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    shape = {k: config[k] for k in SPECS["tiny"]}
    return {"name": path.name, "shape": shape, "bytes": (path / "model.safetensors").stat().st_size,
            "parameters": (path / "model.safetensors").stat().st_size // 4}

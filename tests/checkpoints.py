"""Tiny random-weight Hugging Face MoE checkpoints for CPU tests.

``build_checkpoint(family, out_dir)`` writes a directory that both transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer``) and ``mlx_lm.load`` accept:
config.json, model.safetensors (classic per-expert hub layout, which is what
transformers 5 ``save_pretrained`` emits), tokenizer.json, tokenizer_config.json.

Tokenizer: WordLevel over ``<unk> <s> </s> <pad> system user assistant :`` and
``w0 .. w311`` (ids 0..319), Whitespace pre-tokenizer, WordPiece decoder with
cleanup off, so ``decode(ids)`` is the tokens joined by single spaces. No BOS
is added automatically; prompts are whatever ids the caller passes.

``tokenizer="json_tools"`` or ``"mistral"`` instead writes the byte-level BPE of
``shared.demo.save_bpe_tokenizer`` (any text and JSON spell; a chat template with tools that
mlx-lm's tool parsers read): vocab_size is that tokenizer's size, its special tokens take ids
0.. and bos/eos/pad come from it, its tool and thinking markers are the last ids.

EOS: the lm_head rows of the special tokens are zero, so their logits are
exactly 0 while the max over hundreds of random logits is positive: greedy decoding
effectively never emits EOS. Callers should still ask for a fixed
``max_new_tokens``; both greedy helpers below never stop early.

Run ``python -m tests.checkpoints OUT_DIR FAMILY [--seed N] [--tokenizer STYLE]`` to build one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen3_moe", "dbrx")
TOKENIZERS = ("word", "json_tools", "mistral")

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
ROLE_TOKENS = ("system", "user", "assistant", ":")  # so the chat template encodes
VOCAB_SIZE = 320
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 128  # per-expert intermediate size (qwen3_moe: moe_intermediate_size)
TOP_K = 2
NUM_EXPERTS = {"mixtral": 8, "qwen3_moe": 6, "dbrx": 4}
ROPE_THETA = 10000.0  # not mlx-lm's Mixtral default (1e6): catches a missing flat key
MAX_POS = 512
# Much larger than HF's 0.02 so logits/router scores are well separated and
# greedy tokens do not flip on fp32 rounding differences between frameworks.
INIT_STD = 0.2
NORM_JITTER = 0.1  # norm gains 1 +/- jitter: a loader that drops them diverges

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def vocab() -> list[str]:
    words = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - len(ROLE_TOKENS))]
    return [*SPECIAL_TOKENS, *ROLE_TOKENS, *words]


def _hf_config(family: str, vocab_size: int = VOCAB_SIZE, ids: dict[str, int | None] | None = None) -> Any:
    from transformers import DbrxConfig, MixtralConfig, Qwen3MoeConfig

    ids = ids or dict(bos=BOS_ID, eos=EOS_ID, pad=PAD_ID)
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    common = dict(
        vocab_size=vocab_size, tie_word_embeddings=False, initializer_range=INIT_STD,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )
    if family == "mixtral":
        return MixtralConfig(
            hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            num_local_experts=NUM_EXPERTS[family], num_experts_per_tok=TOP_K,
            max_position_embeddings=MAX_POS, rope_parameters=rope, **common,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            hidden_size=HIDDEN, intermediate_size=2 * FFN, moe_intermediate_size=FFN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
            num_experts=NUM_EXPERTS[family], num_experts_per_tok=TOP_K,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
            max_position_embeddings=MAX_POS, rope_parameters=rope, **common,
        )
    if family == "dbrx":
        return DbrxConfig(
            d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=MAX_POS,
            attn_config=dict(kv_n_heads=KV_HEADS, clip_qkv=8.0, rope_theta=ROPE_THETA),
            ffn_config=dict(
                ffn_hidden_size=FFN, moe_num_experts=NUM_EXPERTS[family],
                moe_top_k=TOP_K, ffn_act_fn={"name": "silu"},
            ),
            **common,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _init_weights(model: Any, seed: int, n_special: int = len(SPECIAL_TOKENS)) -> None:
    """Own init from a seeded generator: independent of HF init code, deterministic."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + NORM_JITTER * noise if p.ndim == 1 else INIT_STD * noise)
        # Zero logits for special tokens: greedy (almost surely) never picks EOS.
        model.get_output_embeddings().weight[:n_special] = 0.0


# Keys transformers 5 dropped/renamed but mlx-lm's ModelArgs still read.
def _patch_config(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", ROPE_THETA)
    if family == "qwen3_moe":
        cfg["num_experts"] = cfg["num_local_experts"]
    if family == "dbrx":
        # Sub-configs get serialised with PretrainedConfig boilerplate; keep hub keys.
        keep_attn = ("attn_pdrop", "clip_qkv", "kv_n_heads", "rope_theta")
        keep_ffn = ("ffn_act_fn", "ffn_hidden_size", "moe_jitter_eps", "moe_loss_weight",
                    "moe_normalize_expert_weights", "moe_num_experts", "moe_top_k")
        cfg["attn_config"] = {k: cfg["attn_config"][k] for k in keep_attn}
        cfg["ffn_config"] = {k: cfg["ffn_config"][k] for k in keep_ffn}
    return cfg


def _save_tokenizer(out_dir: Path) -> None:
    from shared.demo import save_word_tokenizer

    save_word_tokenizer(out_dir, vocab()[len(SPECIAL_TOKENS):], MAX_POS, CHAT_TEMPLATE)


def build_checkpoint(family: str, out_dir: Path, *, seed: int = 0, tokenizer: str = "word") -> Path:
    """`tokenizer`: "word" (ids above), or a BPE style of shared.demo ("json_tools", "mistral")."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.demo import BPE_STYLES, bpe_special_ids, save_bpe_tokenizer

    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "word":
        _save_tokenizer(out_dir)
        config, n_special = _hf_config(family), len(SPECIAL_TOKENS)
    else:  # the tokenizer first: the model's vocab_size and special ids come from it
        vocab_size = save_bpe_tokenizer(out_dir, tokenizer, MAX_POS)
        config = _hf_config(family, vocab_size, bpe_special_ids(tokenizer))
        n_special = len(BPE_STYLES[tokenizer]["special"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed, n_special)
    model.save_pretrained(str(out_dir))
    (out_dir / "generation_config.json").unlink(missing_ok=True)  # nothing useful in it
    cfg_path = out_dir / "config.json"
    cfg = _patch_config(family, json.loads(cfg_path.read_text()))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def reference_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids from transformers greedy decoding; never stops on EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # generate() refills an eos_token_id=None kwarg from model.generation_config,
    # so clear it there: otherwise output is cut short if EOS is ever emitted.
    model.generation_config.eos_token_id = None
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad,
        )
    return out[0, len(prompt_ids):].tolist()


def mlx_lm_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids from single-process mlx-lm greedy decoding (generate_step has no EOS check)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    steps = generate_step(
        mx.array(prompt_ids), model, max_tokens=max_new_tokens,
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
    )
    return [int(tok) for tok, _ in steps]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("family", choices=FAMILIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="word")
    args = ap.parse_args(argv)
    print(build_checkpoint(args.family, args.out_dir, seed=args.seed, tokenizer=args.tokenizer))


if __name__ == "__main__":
    main()


def save_mlx_mixtral(path: Path, config: dict[str, Any], seed: int) -> Path:
    """A random Mixtral in mlx-lm's own layout (stacked experts) at `path`: for tests of the
    experts alone, which need no tokenizer and no transformers reference."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral

    mx.random.seed(seed)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path

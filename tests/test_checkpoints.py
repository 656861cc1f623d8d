from __future__ import annotations

import json
from pathlib import Path

import pytest

# Works whether pytest imports this file as tests.test_checkpoints (tests/ is a
# package or cwd on sys.path) or as a top-level module (rootdir-prepend mode).
try:
    from tests import checkpoints as ck
except ImportError:  # pragma: no cover - depends on how pytest was invoked
    import checkpoints as ck  # type: ignore[no-redef]

PROMPTS = ([5, 7, 9, 10, 6, 7], [20, 21, 22], [300, 12, 44, 44, 44, 150, 8, 270])
NEW_TOKENS = 16

# Representative safetensors keys (classic hub layout that mlx-lm's sanitize reads).
EXPECTED_KEYS = {
    "mixtral": "model.layers.1.block_sparse_moe.experts.7.w3.weight",
    "qwen3_moe": "model.layers.1.mlp.experts.5.gate_proj.weight",
    "dbrx": "transformer.blocks.1.ffn.experts.mlp.v1",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: ck.build_checkpoint(f, root / f) for f in ck.FAMILIES}


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_mlx_lm_matches_transformers(built: dict[str, Path], family: str) -> None:
    for prompt in PROMPTS:
        ref = ck.reference_greedy(built[family], prompt, NEW_TOKENS)
        assert len(ref) == NEW_TOKENS
        assert min(ref) >= len(ck.SPECIAL_TOKENS)  # specials (EOS) are never emitted
        assert ck.mlx_lm_greedy(built[family], prompt, NEW_TOKENS) == ref


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_files_and_config(built: dict[str, Path], family: str) -> None:
    from safetensors import safe_open

    d = built[family]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == ck.VOCAB_SIZE == len(ck.vocab())
    assert cfg["rope_theta"] == ck.ROPE_THETA
    if family == "qwen3_moe":
        assert cfg["num_experts"] == ck.NUM_EXPERTS[family]
    with safe_open(d / "model.safetensors", "np") as f:
        assert EXPECTED_KEYS[family] in f.keys()


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_deterministic(tmp_path: Path, family: str) -> None:
    a = ck.build_checkpoint(family, tmp_path / "a", seed=3)
    b = ck.build_checkpoint(family, tmp_path / "b", seed=3)
    c = ck.build_checkpoint(family, tmp_path / "c", seed=4)
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_roundtrip(built: dict[str, Path]) -> None:
    import random

    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from transformers import AutoTokenizer

    d = built["mixtral"]
    hf = AutoTokenizer.from_pretrained(str(d))
    wrapped = load_mlx_tokenizer(d)
    words = ck.vocab()
    assert len(hf) == ck.VOCAB_SIZE
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ck.BOS_ID, ck.EOS_ID, ck.PAD_ID)

    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(ck.VOCAB_SIZE) for _ in range(rng.randrange(1, 24))]
        text = hf.decode(ids)
        assert text == " ".join(words[i] for i in ids)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert wrapped.decode(ids) == text
        detok = wrapped.detokenizer
        detok.reset()
        parts = []
        for i in ids:
            detok.add_token(i)
            parts.append(detok.last_segment)
        detok.finalize()
        parts.append(detok.last_segment)
        assert "".join(parts) == text

    chat = [{"role": "user", "content": "w1 w2"}]
    prompt = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "user : w1 w2\nassistant :"
    assert ck.UNK_ID not in hf.encode(prompt, add_special_tokens=False)

"""The demo model: a small random-weight Mixtral made locally, so moebus runs with no downloads.

Its text is not meaningful (random weights); its shape is a real MoE's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "moebus-demo-moe"
DEMO_CONFIG = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
_WORDS = """the of and to in a is that for it as was with be by on not he this are or his
from at which but have an they you were her she there one all we their been has when who will
more no if out so what up said would about into than them can only other time new some could
these two may first then do any like my now over such our man me even most made after also did
many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year
off come since against go came right used take three system user assistant : . , ? ! river
mountain light dark water fire stone tree bird song road city house door window star moon sun
cloud rain wind snow sea ship boat field garden flower forest morning evening night summer
winter spring autumn red blue green gold silver white black quiet loud slow fast warm cold
open close begin end find keep hold turn walk run speak write read sing dream think remember
""".split()


def save_word_tokenizer(out_dir: Path, words: list[str], max_len: int, template: str = CHAT_TEMPLATE) -> None:
    """A word-level tokenizer (special tokens first) that transformers and mlx-lm both load.

    Decoding joins words with single spaces, so text round-trips exactly.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [*SPECIAL, *[w for w in words if w not in SPECIAL]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with " "
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=template, model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes the template to chat_template.jinja and a class name older
    # loaders do not know; fold both back into the classic tokenizer_config.json.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=template)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def demo_words() -> list[str]:
    return list(dict.fromkeys(_WORDS))


def ensure_demo_model(home: Path) -> Path:
    """The demo model's directory, made on first use (deterministic: seed 0)."""
    path = home / DEMO_NAME
    if (path / "model.safetensors").is_file():
        return path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral

    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=home))
    words = demo_words()
    config = {**DEMO_CONFIG, "vocab_size": len(SPECIAL) + len(words)}
    mx.random.seed(0)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    # Special tokens never win, so the demo writes until max_tokens instead of stopping at once.
    model.lm_head.weight[: len(SPECIAL)] = 0.0
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_word_tokenizer(tmp, words, config["max_position_embeddings"])
    try:
        os.replace(tmp, path)  # atomic: two processes starting at once both end with one model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

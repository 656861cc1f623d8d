"""The demo model: a small random-weight Mixtral made locally, so moebus runs with no downloads.

Its text is not meaningful (random weights); its shape is a real MoE's. Its tokenizer is a
byte-level BPE trained here on a fixed corpus, so it spells any text and any JSON, with a
Qwen3-style chat template (tools, <tool_call>, <think>) that mlx-lm's parsers read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.demo_templates import JSON_TOOLS_TEMPLATE, MISTRAL_TEMPLATE

DEMO_NAME = "moebus-demo-moe"  # the served model's name: clients ask for it
DEMO_DIR = "demo-v2"  # bumped when the demo changes, so an older one on disk is not served
DEMO_STYLE = "json_tools"
DEMO_CONFIG = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float32",
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

# Per style: special tokens (ids 0.., dropped from text), then markers that stay in the text
# so that the tool-call and reasoning parsers find them.
BPE_STYLES: dict[str, dict[str, Any]] = {
    "json_tools": dict(
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        markers=("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"),
        template=JSON_TOOLS_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
    ),
    "mistral": dict(
        special=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                 "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        markers=("[TOOL_CALLS]", "[ARGS]"),
        template=MISTRAL_TEMPLATE, bos="<s>", eos="</s>", pad=None, unk="<unk>",
    ),
}
BPE_VOCAB = 800  # learned tokens incl. the 256 bytes and the special tokens; the markers come on top

_JSON_KEYS = ["name", "arguments", "city", "unit", "query", "location", "id", "a", "b", "value", "result",
              "content", "type", "items", "count", "text", "answer", "date", "limit", "format"]
_JSON_VALUES: list[Any] = ["x", "Paris", "celsius", "the river", 1, 42, -7, 3.5, 1e-3, True, False, None, [],
                           {}, [1, 2, 3], ["a", "b"], {"a": 1, "b": [True, None]}, "line\nbreak", 'say "hi" \\ ok']
_TOOL_WORDS = ["function", "description", "parameters", "object", "string", "number", "integer", "boolean",
               "array", "null", "properties", "required", "enum", "get_weather", "search", "lookup", "call_id",
               "tool", "tools", "weather", "temperature"]


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
    _save_fast(fast, out_dir, template)


def _bpe_corpus() -> list[str]:
    """A fixed corpus: the demo's words, JSON as models write it, digits and punctuation."""
    words = demo_words() + _TOOL_WORDS
    lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 4)]
    lines += [" ".join(words[i::7]) + " ." for i in range(7)]
    for i, key in enumerate(_JSON_KEYS):
        args = {key: _JSON_VALUES[i % len(_JSON_VALUES)],
                _JSON_KEYS[(i + 3) % len(_JSON_KEYS)]: _JSON_VALUES[(i + 5) % len(_JSON_VALUES)]}
        call = {"name": _TOOL_WORDS[i % len(_TOOL_WORDS)], "arguments": args}
        lines += [json.dumps(call), json.dumps(call, separators=(",", ":")), json.dumps(args, indent=2)]
    unit = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    schema = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": unit},
                             "required": ["city"]}}}
    lines += [json.dumps(schema)] * 3
    lines += [" ".join(str(n) for n in range(i, 1000, 37)) for i in range(37)]
    lines += ["0123456789 3.14159 -2.5e10 1,000 100% $5 #1 @user a_b a-b a/b a\\b ~ ^ * + = | < > & ` ;"]
    lines += ["( ) [ ] { } \" ' , . : ; ! ? - _ ... -- \n \t \r\n"] * 2
    return lines


def save_bpe_tokenizer(out_dir: Path, style: str, max_len: int) -> int:
    """A byte-level BPE (so any text and any JSON can be spelled) with the chat template of
    `style`, "json_tools" or "mistral", saved as transformers and mlx-lm load it. The same fixed
    corpus trains the same merges every time. Returns len(tokenizer): the model's vocab_size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in BPE_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {sorted(BPE_STYLES)}")
    st = BPE_STYLES[style]
    tok = Tokenizer(models.BPE(unk_token=st["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, min_frequency=2, special_tokens=list(st["special"]), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_bpe_corpus(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in st["special"]])
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in st["markers"]])
    named = {f"{k}_token": st[k] for k in ("bos", "eos", "pad", "unk") if st[k]}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=st["template"], model_max_length=max_len,
        clean_up_tokenization_spaces=False, **named,
    )
    _save_fast(fast, out_dir, st["template"])
    return len(fast)


def bpe_special_ids(style: str) -> dict[str, int | None]:
    """The ids of the style's bos/eos/pad tokens (special tokens take ids 0.. in order)."""
    st = BPE_STYLES[style]
    return {k: st["special"].index(st[k]) if st[k] else None for k in ("bos", "eos", "pad")}


def _save_fast(fast: Any, out_dir: Path, template: str) -> None:
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes the template to chat_template.jinja and a class name older
    # loaders do not know; fold both back into the classic tokenizer_config.json.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=template)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _unreadable_byte_ids(out_dir: Path) -> list[int]:
    """Ids of the byte tokens that are no text alone: control bytes, and bytes of UTF-8 sequences."""
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    # GPT-2's byte-to-character map: printable Latin-1 stays, the rest moves to chr(256 + n).
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in shown]
    chars = {**{b: chr(b) for b in shown}, **{b: chr(256 + n) for n, b in enumerate(moved)}}
    return [vocab[chars[b]] for b in range(256) if not (32 <= b < 127 or b == 10)]


def demo_words() -> list[str]:
    return list(dict.fromkeys(_WORDS))


def ensure_demo_model(home: Path) -> Path:
    """The demo model's directory, made on first use (deterministic: seed 0)."""
    path = home / DEMO_DIR / DEMO_NAME
    if (path / "model.safetensors").is_file():
        return path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    vocab_size = save_bpe_tokenizer(tmp, DEMO_STYLE, DEMO_CONFIG["max_position_embeddings"])
    ids = bpe_special_ids(DEMO_STYLE)
    config = {**DEMO_CONFIG, "vocab_size": vocab_size, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
              "pad_token_id": ids["pad"]}
    mx.random.seed(0)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    # Special tokens never win, so the demo writes until max_tokens instead of stopping at once;
    # nor, greedy, do bytes that are no text alone (a random model would write "\x02" and "\ufffd").
    # Sharper logits make sampling pick those zeroed rows rarely too.
    quiet = [*range(len(BPE_STYLES[DEMO_STYLE]["special"])), *_unreadable_byte_ids(tmp)]
    model.lm_head.weight = 4.0 * model.lm_head.weight
    model.lm_head.weight[mx.array(quiet)] = 0.0
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(tmp, path)  # atomic: two processes starting at once both end with one model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

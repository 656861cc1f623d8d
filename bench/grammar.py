"""`make bench-grammar`: the grammar engine's cost per token, llguidance against outlines-core.

    python -m bench.grammar [--vocab 32000 150000] [--tokens 1000]

Byte-level BPE tokenizers are trained locally (on the venv's .py/.md/.txt files, cached under
~/.cache/moebus-bench/grammar) at each vocabulary size. Two grammars: a strict-mode JSON schema
(`response_format`) and a forced tool call `<tool_call>\\n{"name":...,"arguments":{...}}\\n</tool_call>`.
Each engine walks the tokens of valid instances: per step it computes the mask (timed), checks
the next token is allowed, and consumes it (timed); alone and 8 sequences at once. Also: compile
time, which of a few invalid instances each engine rejects, and applying a mask to MLX logits.
Results: docs/structured-output.md, "Choosing the grammar engine".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import time
from pathlib import Path

import llguidance as llg
import llguidance.numpy as llg_np
import mlx.core as mx
import numpy as np
import outlines_core as oc
from outlines_core.json_schema import build_regex_from_schema
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SITE = Path(sysconfig.get_paths()["purelib"])  # the corpus: text files of the installed packages
CACHE = Path.home() / ".cache/moebus-bench/grammar"
CORPUS_CHARS = 80_000_000  # enough distinct words for 150k merges; ~20 s of training here
EOS = "<|im_end|>"
BATCH = 8

SCHEMA = {
    "type": "object",
    "properties": {
        "location": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "coords": {"anyOf": [
                    {"type": "array", "items": {"type": "number", "minimum": -180, "maximum": 180},
                     "minItems": 2, "maxItems": 2},
                    {"type": "null"}]},
            },
            "required": ["city", "country", "coords"], "additionalProperties": False,
        },
        "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "fields": {"type": "array", "items": {"enum": ["temperature", "precipitation", "wind", "humidity"]},
                   "minItems": 1, "maxItems": 3},
        "alerts": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {
                "level": {"enum": ["info", "warning", "severe"]},
                "threshold": {"type": "number", "minimum": 0, "maximum": 100},
                "note": {"type": ["string", "null"], "maxLength": 80},
            },
            "required": ["level", "threshold", "note"], "additionalProperties": False}},
        "detailed": {"type": "boolean"},
    },
    "required": ["location", "unit", "days", "fields", "alerts", "detailed"],
    "additionalProperties": False,
}
TOOL = "get_forecast"
TOOL_SCHEMA = {"type": "object", "properties": {"name": {"const": TOOL}, "arguments": SCHEMA},
               "required": ["name", "arguments"], "additionalProperties": False}
# Each breaks one keyword of SCHEMA; an engine that enforces the schema rejects every one.
BROKEN = {
    "days maximum": ("days", 30), "pattern": ("location", {"city": "Oslo", "country": "nor", "coords": None}),
    "minItems": ("fields", []), "maxItems": ("fields", ["wind"] * 4), "enum": ("unit", "rankine"),
    "number maximum": ("alerts", [{"level": "info", "threshold": 150, "note": None}]),
    "maxLength": ("location", {"city": "x" * 41, "country": "NO", "coords": None}),
}


def instance(rng: random.Random) -> dict:
    """A random instance valid under SCHEMA."""
    coords = [round(rng.uniform(-90, 90), 4), round(rng.uniform(-180, 180), 4)] if rng.random() < 0.5 else None
    alerts = [{"level": rng.choice(["info", "warning", "severe"]), "threshold": round(rng.uniform(0, 100), 1),
               "note": rng.choice([None, "gusts over the fjord after noon", "heavy rain expected"])}
              for _ in range(rng.randint(0, 3))]
    return {"location": {"city": rng.choice(["Oslo", "San Francisco", "Tokyo", "Lagos"]),
                         "country": rng.choice(["NO", "US", "JP", "NG"]), "coords": coords},
            "unit": rng.choice(["celsius", "fahrenheit", "kelvin"]), "days": rng.randint(1, 14),
            "fields": rng.sample(["temperature", "precipitation", "wind", "humidity"], rng.randint(1, 3)),
            "alerts": alerts, "detailed": rng.random() < 0.5}


def render(grammar: str, args: dict) -> str:
    # Compact separators: both engines are set up without free whitespace.
    if grammar == "json":
        return json.dumps(args, separators=(",", ":"))
    return f"<tool_call>\n{json.dumps({'name': TOOL, 'arguments': args}, separators=(',', ':'))}\n</tool_call>"


def train_tokenizer(vocab: int) -> Tokenizer:
    path = CACHE / f"bpe-{vocab}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    texts, total = [], 0
    for p in sorted(SITE.rglob("*")):
        if p.suffix in (".py", ".md", ".txt") and p.is_file() and total < CORPUS_CHARS:
            texts.append(p.read_text(errors="ignore"))
            total += len(texts[-1])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Qwen-style: the tool-call tags are single added tokens.
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    print(f"trained vocab {vocab} on {total / 1e6:.0f}M chars in {time.perf_counter() - t0:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: how byte-level BPE spells raw bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        self.eos = tok.token_to_id(EOS)
        self.tokenizer = llg.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=self.eos)
        self.executor = llg.LLExecutor(num_threads=os.cpu_count())
        self.open_tag, self.close_tag = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")

    def compile(self, grammar: str) -> llg.LLMatcher:
        if grammar == "json":
            g = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
        else:  # llguidance sees added tokens as special: the tags are named by id
            body = json.dumps(TOOL_SCHEMA | {"x-guidance": {"whitespace_flexible": False}})
            g = llg.LLMatcher.grammar_from_lark(
                f'start: <[{self.open_tag}]> "\\n" %json {body} "\\n" <[{self.close_tag}]>')
        m = llg.LLMatcher(self.tokenizer, g, log_level=0)
        if m.is_error():
            raise SystemExit(f"llguidance: {m.get_error()}")
        return m

    def sequences(self, compiled: llg.LLMatcher, n: int) -> list:
        return [compiled.deep_copy() for _ in range(n)]

    def mask(self, seqs: list, bitmask: np.ndarray) -> None:
        if len(seqs) == 1:
            llg_np.fill_next_token_bitmask(seqs[0], bitmask)
        else:
            llg_np.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(seqs)], bitmask)

    def consume(self, seq: llg.LLMatcher, token: int) -> None:
        seq.consume_token(token)

    def accepts(self, compiled: llg.LLMatcher, ids: list[int]) -> bool:
        m = compiled.deep_copy()
        return m.consume_tokens(ids) and m.is_accepting()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer):
        self.eos = tok.token_to_id(EOS)
        spell = byte_decoder()
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        vocab: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab(with_added_tokens=True).items():
            if text in ("<|endoftext|>", EOS):
                continue
            raw = text.encode() if text in added else bytes(spell[c] for c in text)
            vocab.setdefault(raw, []).append(i)
        self.vocabulary = oc.Vocabulary(self.eos, vocab)

    def compile(self, grammar: str) -> oc.Index:
        if grammar == "json":
            return oc.Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), self.vocabulary)
        body = build_regex_from_schema(json.dumps(TOOL_SCHEMA), whitespace_pattern="")
        return oc.Index(f"<tool_call>\\n{body}\\n</tool_call>", self.vocabulary)

    def sequences(self, compiled: oc.Index, n: int) -> list:
        return [oc.Guide(compiled) for _ in range(n)]

    def mask(self, seqs: list, bitmask: np.ndarray) -> None:
        for i, g in enumerate(seqs):  # no batch API: one call per sequence
            row = bitmask[i]
            g.write_mask_into(row.ctypes.data, row.size, row.itemsize)

    def consume(self, seq: oc.Guide, token: int) -> None:
        seq.advance(token, return_tokens=False)

    def accepts(self, compiled: oc.Index, ids: list[int]) -> bool:
        state = compiled.get_initial_state()
        for t in ids:
            state = compiled.get_next_state(state, t)
            if state is None:
                return False
        return compiled.is_final_state(state)


def walk(engine, compiled, walks: list[list[int]], steps: int, vocab: int) -> tuple[list[float], list[float]]:
    """Per step: the batch's masks (µs), and one consume (µs). Each sequence spells its own
    instance and starts over after EOS."""
    seqs = engine.sequences(compiled, len(walks))
    pos = [0] * len(walks)
    bitmask = llg_np.allocate_token_bitmask(len(walks), vocab)
    mask_us, consume_us = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.mask(seqs, bitmask)
        mask_us.append((time.perf_counter() - t0) * 1e6)
        for i, seq in enumerate(seqs):
            t = walks[i][pos[i]]
            if not (bitmask[i, t // 32] >> (t % 32)) & 1:
                raise SystemExit(f"{engine.name}: mask forbids valid token {t} at position {pos[i]}")
            if pos[i] == len(walks[i]) - 1:  # EOS: the sequence ends (outlines-core has no state after it)
                seq.reset()
                pos[i] = 0
                continue
            t0 = time.perf_counter()
            engine.consume(seq, t)
            consume_us.append((time.perf_counter() - t0) * 1e6)
            pos[i] += 1
    return mask_us, consume_us


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def apply_mask_us(vocab: int, rows: int, reps: int = 200) -> list[float]:
    """Bits -> bool mask -> mx.where on a logits block, evaluated."""
    logits = mx.random.normal((rows, vocab))
    bitmask = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, size=(rows, (vocab + 31) // 32), dtype=np.int32)
    mx.eval(logits)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab].astype(bool)
        mx.eval(mx.where(mx.array(allowed), logits, -mx.inf))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 150000])
    ap.add_argument("--tokens", type=int, default=1000, help="timed steps per engine, grammar and batch size")
    args = ap.parse_args()
    rng = random.Random(0)
    instances = [instance(rng) for _ in range(BATCH)]
    rows: list[list[str]] = []
    rejects: dict[str, set[str]] = {}
    for vocab in args.vocab:
        tok = train_tokenizer(vocab)
        n_vocab = tok.get_vocab_size()
        for cls in (Llguidance, OutlinesCore):
            t0 = time.perf_counter()
            engine = cls(tok)
            setup_ms = (time.perf_counter() - t0) * 1e3
            for grammar in ("json", "tool"):
                t0 = time.perf_counter()
                compiled = engine.compile(grammar)
                compile_ms = (time.perf_counter() - t0) * 1e3
                walks = [tok.encode(render(grammar, x)).ids + [engine.eos] for x in instances]
                first, _ = walk(engine, compiled, walks[:1], 1, n_vocab)
                alone, consume = walk(engine, compiled, walks[:1], args.tokens, n_vocab)
                batch, _ = walk(engine, compiled, walks, args.tokens, n_vocab)
                broken = {k: instances[0] | {key: v} for k, (key, v) in BROKEN.items()}
                missed = [k for k, x in broken.items() if engine.accepts(compiled, tok.encode(render(grammar, x)).ids)]
                rejects.setdefault(engine.name, set()).update(missed)
                us = [f"{f(xs):.0f}" for xs in (alone, batch) for f in (np.mean, np.median, lambda v: pct(v, 99))]
                rows.append([engine.name, f"{vocab // 1000}k", grammar, f"{setup_ms:.0f}", f"{compile_ms:.1f}",
                             f"{first[0]:.0f}", *us[:3], f"{np.median(consume):.0f}", *us[3:],
                             f"{len(BROKEN) - len(missed)}/{len(BROKEN)}"])
    head = ["engine", "vocab", "grammar", "setup ms", "compile ms", "1st mask", "mask mean", "p50", "p99",
            "consume p50", f"batch-{BATCH} mean", "p50", "p99", "rejects invalid"]
    print(f"\n{os.cpu_count()} cores; {args.tokens} steps each; times in µs unless named; "
          f"batch-{BATCH}: all {BATCH} masks of one step")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for name, missed in rejects.items():
        if missed:
            print(f"{name} accepts instances that break: {', '.join(sorted(missed))}")
    print(f"\nmask applied to MLX logits (np.unpackbits + mx.where, evaluated), {mx.default_device()}")
    print("| vocab | rows | p50 µs | p99 µs |\n|---|---|---|---|")
    for vocab in args.vocab:
        for n in (1, BATCH):
            us = apply_mask_us(vocab, n)
            print(f"| {vocab // 1000}k | {n} | {pct(us, 50):.0f} | {pct(us, 99):.0f} |")


if __name__ == "__main__":
    main()

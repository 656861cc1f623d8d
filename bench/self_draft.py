"""Drafter (3), tried: the served model drafting for itself on the router with only the experts
the router could hold (the hottest fraction f of each layer's experts; f = 0: no experts, the
attention and dense path alone). Measured in one process, without the bus:

- tokens per verify step: the speculative loop run against the model's own greedy continuation
  (recorded with the full model), drafting k tokens with the held-experts model, as the router's
  `DraftModel` would (its own KV cache per sequence, greedy);
- the drafting time per verify step against the full model's time per token in this process
  (a bus step costs more than that: every MoE layer adds a round trip);
- what a verify step would give end to end at c = 1, with the step's time taken as the full
  model's here plus `--bus-ms` per step (the layer round trips, from the speculation bench).

    python -m bench.self_draft [--models thin,mixtral-0.5b] [--tokens 64] [--bus-ms 40]

Random weights: agreement between the model and its held-experts self here says how far the
dropped experts move the argmax of a random model, not what a trained model would accept.
Writes bench/self_draft.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from bench import models
from bench.run import progress
from bench.table import write_and_show
from services.router.drafters import DraftModel

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
K = 4


class Counted(nn.Module):
    """The MoE block as it is, counting which experts its tokens pick."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.counts = mx.zeros((block.num_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        b = self.block
        inds = mx.argpartition(-b.gate(x), kth=b.num_experts_per_tok - 1, axis=-1)[..., :b.num_experts_per_tok]
        self.counts = self.counts + mx.zeros((b.num_experts,)).at[inds.reshape(-1)].add(1)
        return b(x)


class Held(nn.Module):
    """The MoE block routed among the held experts only: the others' gates are -inf."""

    def __init__(self, block: nn.Module, held: list[int]) -> None:
        super().__init__()
        self.block = block
        self.off = mx.array([0.0 if e in held else -float("inf") for e in range(block.num_experts)])
        self.none = not held

    def __call__(self, x: mx.array) -> mx.array:
        if self.none:
            return mx.zeros_like(x)
        b, k = self.block, self.block.num_experts_per_tok
        gates = b.gate(x) + self.off
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
        return (b.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2)


def _swap(model: nn.Module, make) -> list[nn.Module]:
    """Each layer's MoE block replaced by make(block); the originals, to put back."""
    originals = []
    for layer in model.layers:
        originals.append(layer.block_sparse_moe)
        layer.block_sparse_moe = make(layer.block_sparse_moe)
    return originals


def _put_back(model: nn.Module, originals: list[nn.Module]) -> None:
    for layer, block in zip(model.layers, originals):
        layer.block_sparse_moe = block


def greedy(model: nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """The model's greedy continuation and its seconds per token."""
    from mlx_lm.generate import generate_step
    out, t0 = [], 0.0
    for i, (t, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=tokens,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))):
        out.append(int(t))
        if i == 0:
            t0 = time.perf_counter()  # after the prefill
    return out, (time.perf_counter() - t0) / max(1, tokens - 1)


def speculate(drafter: DraftModel, prompt: list[int], target: list[int], k: int) -> tuple[int, int, int, float]:
    """Verify steps, drafts kept, drafts made, and drafting seconds to reproduce `target`."""
    state, at, steps, kept, drafted, seconds = drafter.start(prompt), 0, 0, 0, 0, 0.0
    while at < len(target) - 1:
        t0 = time.perf_counter()
        drafts = drafter.propose(state, prompt + target[:at + 1], min(k, len(target) - 1 - at))
        seconds += time.perf_counter() - t0
        a = 0
        while a < len(drafts) and drafts[a] == target[at + 1 + a]:
            a += 1
        steps, kept, drafted, at = steps + 1, kept + a, drafted + len(drafts), at + 1 + a
    return steps, kept, drafted, seconds


def run_model(name: str, tokens: int, prompts: int, bus_ms: float) -> list[dict]:
    from mlx_lm import load
    model, _ = load(str(models.build(name, ROOT / "bench" / "models")))
    vocab = model.args.vocab_size
    runs = [[(7 + 131 * i + 17 * j) % vocab for j in range(16)] for i in range(prompts)]
    counters = _swap(model, Counted)
    recorded = [greedy(model, p, tokens) for p in runs]
    counts = [layer.block_sparse_moe.counts.tolist() for layer in model.layers]
    _put_back(model, counters)
    full_s = sum(s for _, s in recorded) / len(recorded)
    rows = []
    for f in FRACTIONS:
        n = len(counts[0])
        hot = [sorted(range(n), key=lambda e: -c[e])[:round(f * n)] for c in counts]
        layers = iter(hot)
        originals = _swap(model, lambda block: Held(block, next(layers)))
        steps = kept = drafted = 0
        seconds = 0.0
        for p, (target, _) in zip(runs, recorded):
            s, a, d, sec = speculate(DraftModel(model), p, target, K)
            steps, kept, drafted, seconds = steps + s, kept + a, drafted + d, seconds + sec
        _put_back(model, originals)
        per_step = (kept + steps) / steps
        draft_ms = 1e3 * seconds / steps
        step_ms = 1e3 * full_s + bus_ms  # a one-token step over the bus
        rows.append({"model": name, "held": f, "tokens_per_step": round(per_step, 2),
                     "acceptance": round(kept / max(1, drafted), 3), "draft_ms_per_step": round(draft_ms, 1),
                     "full_ms_per_token": round(1e3 * full_s, 1),
                     "predicted_speedup": round(per_step * step_ms / (step_ms + draft_ms), 2)})
        progress(f"{name} held {f:.2f}: {per_step:.2f} tokens/step, drafting {draft_ms:.1f} ms/step")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="thin,mixtral-0.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--bus-ms", type=float, default=40.0, help="a step's layer round trips over the bus, ms")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "self_draft.json")
    a = ap.parse_args()
    rows = [r for name in a.models.split(",") for r in run_model(name, a.tokens, a.prompts, a.bus_ms)]
    report = {"machine": {"cores": __import__("os").cpu_count(), "os": platform.platform()},
              "settings": {"tokens": a.tokens, "prompts": a.prompts, "draft_max": K, "bus_ms": a.bus_ms}, "rows": rows}
    write_and_show(a.out, report, rows, [("model", "model", 14), ("held", "held", 5), ("tok/step", "tokens_per_step", 9),
                                         ("accepted", "acceptance", 9), ("draft ms", "draft_ms_per_step", 9),
                                         ("full ms", "full_ms_per_token", 8), ("pred x", "predicted_speedup", 7)])


if __name__ == "__main__":
    main()

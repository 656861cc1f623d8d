"""Single-process mlx-lm on the same model: decode tokens/s at batch 1 and at batch 16, and
the time per token outside the experts at batch 1.

Run as `python -m bench.baseline MODEL_DIR TOKENS` (its own process, with the fast BLAS, like
the services); prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import batch_generate, generate_step


def batch1(model, prompt: list[int], tokens: int) -> float:
    stamps = []
    for _ in generate_step(mx.array(prompt), model, max_tokens=tokens, sampler=lambda lp: mx.argmax(lp, -1)):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # decode only, as moebus's ITL


def batch16(model, tokenizer, tokens: int) -> float:
    prompts = [[8 + i, 9 + i, 10 + i] for i in range(16)]
    t0 = time.perf_counter()
    batch_generate(model, tokenizer, prompts, max_tokens=tokens)
    return 16 * tokens / (time.perf_counter() - t0)  # aggregate, as moebus's concurrency-16 figure


def without_experts(model) -> None:
    """The same model with every experts module answering zeros at once (through moebus's
    own seam): what is left of a token's time is mlx-lm's time outside the experts."""
    from services.router.bus_experts import install
    from shared.model import find_experts

    install(model, find_experts(model),
            lambda layer, x, inds: mx.zeros((*x.shape[:-1], inds.shape[-1], x.shape[-1]), x.dtype))


def main() -> None:
    path, tokens = sys.argv[1], int(sys.argv[2])
    model, tokenizer = load(path)
    batch1(model, [8, 9, 10], 4)  # warm up
    out = {"batch1_tok_s": round(batch1(model, [8, 9, 10], tokens), 2),
           "batch16_tok_s": round(batch16(model, tokenizer, tokens), 2)}
    without_experts(model)
    batch1(model, [8, 9, 10], 4)
    out["non_expert_ms"] = round(1000 / batch1(model, [8, 9, 10], tokens), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    from shared.blas import reexec_with_fast_blas

    reexec_with_fast_blas("bench.baseline")  # the same BLAS as the services it is compared with
    main()

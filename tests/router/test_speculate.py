"""Speculative decoding on a plain mlx-lm model (no bus): the verify step gives the tokens decoding
without drafts gives, greedy and seeded, alone and batched, whatever the drafts; the policy,
the drafters and the KV cache's rollback on their own."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache

from services.router.drafters import PromptLookup, Replay, make_drafter
from services.router.engine import Engine, EngineLimits
from services.router.prompt_cache import PromptCache
from services.router.sampling import SeededSampler
from services.router.draft_policy import PROBE_EVERY, choose_k, tokens_per_step
from services.router.holes import HOLE_LIMIT, HoledKVCache, drop_tail
from services.router.speculate import SeqState
from services.cli import parser
from shared.errors import ConfigError
from shared.messages import GenerateEvent, GenerateRequest
from tests.checkpoints import FAMILIES, reference_greedy

PROMPTS = {f"r{i}": [8 + (i * 7 + j) % 300 for j in range(3 + 11 * i)] for i in range(4)}  # 3 to 36 tokens


def test_tokens_per_step_and_the_draft_length_that_pays():
    assert tokens_per_step(0.0, 4) == 1 and tokens_per_step(1.0, 4) == 5
    assert math.isclose(tokens_per_step(0.7, 4), 1 + 0.7 + 0.49 + 0.343 + 0.2401)
    assert choose_k(0.0, 4) == 0 and choose_k(0.05, 4) == 0  # drafts that are never kept cost a position each
    assert choose_k(0.7, 4) == 4 and choose_k(0.95, 8) == 8
    assert choose_k(0.5, 4) == 2  # 1.75 tokens for 1.2 of the time beats 1.5 for 1.1 and 1.875 for 1.3
    assert choose_k(0.7, 0) == 0  # --draft-max 0


def test_a_sequence_whose_drafts_fail_stops_drafting_and_looks_again_now_and_then():
    s = SeqState(draft=None)
    assert s.k(4) == 1  # the prior: a third kept
    for _ in range(8):
        s.record(drafted=s.k(4) or 1, kept=0)
    assert s.alpha < 0.1
    ks = [s.k(4) for _ in range(3 * PROBE_EVERY)]
    assert ks.count(1) == 3 and set(ks) == {0, 1}  # one probe every PROBE_EVERY steps
    for _ in range(10):
        s.record(drafted=4, kept=4)
    assert s.k(4) == 4


def test_a_drafter_with_nothing_to_propose_is_asked_less_and_less_often():
    s = SeqState(draft=None)
    asked = []
    for step in range(200):
        if s.k(4):
            asked.append(step)
            s.proposed([] if step < 150 else [7])
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert gaps[:6] == [2, 3, 5, 9, 17, 33] and max(gaps) == PROBE_EVERY + 1  # 1, 2, 4 ... 32 steps between
    assert asked[-1] == 199 and asked[-2] == 198  # it proposed again: asked every step


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup(sizes=(3, 2))
    state = lookup.start([1, 2, 3])
    assert lookup.propose(state, [1, 2, 3, 9], 4) == []  # nothing repeats yet
    # ... 5 6 7 8 | 6 7 -> the 2-gram "6 7" was followed by 8, 1, 5
    assert lookup.propose(state, [1, 2, 3, 9, 5, 6, 7, 8, 1, 5, 6, 7], 3) == [8, 1, 5]
    # a longer match wins over a later shorter one: "1 5 6" -> 7; the 2-gram "5 6" alone last led to 9
    ctx = [1, 5, 6, 7, 4, 5, 6, 9, 1, 5, 6]
    longest, shortest = PromptLookup(sizes=(3, 2)), PromptLookup(sizes=(2,))
    assert longest.propose(longest.start([]), ctx, 2) == [7, 4]
    assert shortest.propose(shortest.start([]), ctx, 2) == [9, 1]


def test_replay_drafts_the_recording_corrupted_at_the_rate_asked_and_the_same_each_time():
    recorded = list(range(100, 1100))
    replay = Replay({(1, 2): recorded}, accept=0.7, seed=3)
    state = replay.start([1, 2])
    drafts = [replay.propose(state, [1, 2, *recorded[:at]], 4) for at in range(0, 990, 4)]
    flat = [t for d in drafts for t in d]
    kept = sum(t == r for t, r in zip(flat, recorded))
    assert 0.65 < kept / len(flat) < 0.75
    assert replay.propose(state, [1, 2, *recorded[:8]], 4) == drafts[2]  # a position's draft is fixed
    assert replay.propose(replay.start([7]), [7, 1], 4) == []  # no recording: no drafts


def _rows(cache: HoledKVCache) -> list[list[float]]:
    return [cache.extract(b).keys[0, 0, :, 0].tolist() for b in range(len(cache.offset))]


def test_drop_tail_forgets_each_rows_own_rejected_positions():
    cache = HoledKVCache.adopt(BatchKVCache([2, 0, 1]))  # rows of 3, 5 and 4 tokens, left-padded to 5
    keys = mx.arange(15, dtype=mx.float32).reshape(3, 1, 5, 1)
    cache.update_and_fetch(keys, keys + 100)
    step = mx.array([[[[1000 + 10 * b + j] for j in range(3)]] for b in range(3)], dtype=mx.float32)
    cache.update_and_fetch(step, step + 100)  # a verify step: 3 positions a row
    drop_tail([cache], [2, 0, 1])  # row 0 keeps 1 of them, row 1 all 3, row 2 two
    want = [[2, 3, 4, 1000], [5, 6, 7, 8, 9, 1010, 1011, 1012], [11, 12, 13, 14, 1020, 1021]]
    assert _rows(cache) == want and cache.holes() == 2
    assert [cache.extract(b).values[0, 0, :, 0].tolist() for b in range(3)] == [[v + 100 for v in r] for r in want]
    assert cache.offset.tolist() == [4, 8, 6]  # each row's next position (RoPE's), holes not counted
    # The holes are hidden from attention: a new position sees each row's kept ones only.
    mask = cache.make_mask(1, return_array=True)
    assert mask[:, 0, 0, :].tolist()[0][:9] == [False, False, True, True, True, True, False, False, True]
    two = mx.array([[[[2000 + b], [2001 + b]]] for b in range(3)], dtype=mx.float32)
    cache.update_and_fetch(two, two + 100)  # the next step writes after the holes
    drop_tail([cache], [1, 1, 1])  # the same for all: a plain trim
    want = [r + [2000 + b] for b, r in enumerate(want)]
    assert _rows(cache) == want and cache.offset.tolist() == [5, 9, 7]
    cache.squeeze()  # holes become left padding: the same rows, no hole map
    assert cache.hole is None and _rows(cache) == want
    assert cache.left_padding.tolist() == [4, 0, 2] and cache.offset.tolist() == [5, 9, 7]  # 9 positions a row


def test_holes_survive_the_batchs_own_operations_and_are_squeezed_at_the_limit():
    cache = HoledKVCache.adopt(BatchKVCache([0, 0]))
    k = mx.arange(8, dtype=mx.float32).reshape(2, 1, 4, 1)
    cache.update_and_fetch(k, k)
    drop_tail([cache], [0, 2])  # row 1 forgets 6, 7
    other = BatchKVCache([0])  # a sequence joining the batch
    new = mx.array([[[[50], [51]]]], dtype=mx.float32)
    other.update_and_fetch(new, new)
    cache.extend(other)
    assert _rows(cache) == [[0, 1, 2, 3], [4, 5], [50, 51]]
    cache.filter([1, 2])  # the first leaves
    assert _rows(cache) == [[4, 5], [50, 51]]
    for step in range(HOLE_LIMIT):  # a row that keeps dropping is squeezed once it holds the limit
        x = mx.full((2, 1, 1, 1), 100.0 + step)
        cache.update_and_fetch(x, x)
        drop_tail([cache], [0, 1])
    assert cache.hole is None and _rows(cache) == [[4, 5, *(100.0 + s for s in range(HOLE_LIMIT))], [50, 51]]


def _run(engine: Engine, prompts: dict[str, list[int]], max_tokens: int, temperature: float = 0.0,
         seed: int | None = None) -> dict[str, list[int]]:
    events: list[tuple[str, GenerateEvent]] = []
    engine.publish = events.extend
    for rid, prompt in prompts.items():
        engine.add(GenerateRequest(request_id=rid, stream=f"moebus.v1.stream.{rid}", max_tokens=max_tokens,
                                   temperature=temperature, seed=seed), prompt)
    for _ in range(500):
        if not engine.step():
            break
    out: dict[str, list[int]] = {}
    for _, e in events:
        assert e.error is None, e.error
        out.setdefault(e.request_id, []).extend([e.token] if e.token is not None else [])
    return out


def _engine(model, tokenizer, drafter=None, micro_batches: int = 1, **kw) -> Engine:
    return Engine(model, tokenizer, EngineLimits(max_running=8, micro_batches=micro_batches), lambda _: None,
                  drafter=drafter, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_with_drafts_are_transformers_alone_and_batched(checkpoints: dict[str, Path], family: str):
    model, tokenizer = load(str(checkpoints[family]))
    new = 16
    refs = {rid: reference_greedy(checkpoints[family], p, new) for rid, p in PROMPTS.items()}
    plain = _run(_engine(model, tokenizer), PROMPTS, new)
    assert plain == {rid: r[:len(plain[rid])] for rid, r in refs.items()}  # an end token may stop one early
    recorded = {tuple(p): refs[rid] for rid, p in PROMPTS.items()}
    for accept in (1.0, 0.6, 0.0):
        engine = _engine(model, tokenizer, Replay(recorded, accept, seed=7))
        alone = {rid: _run(engine, {rid: p}, new)[rid] for rid, p in PROMPTS.items()}
        together = _run(engine, PROMPTS, new)  # rows draft different k and keep different lengths
        assert alone == together == plain, accept
        stats = engine.spec_stats
        if accept == 1.0:  # every drafted token kept: several tokens a step
            assert stats.accepted == stats.drafted > 0 and stats.tokens > 2 * stats.steps
        elif accept == 0.6:
            assert 0 < stats.accepted < stats.drafted
        else:  # nothing kept: each run of a sequence stops drafting within 8 tokens (1 at a time)
            assert stats.accepted == 0 and 0 < stats.drafted <= 8 * 2 * len(PROMPTS)
    # Prompt lookup, with prompts that repeat themselves: it finds something to propose.
    loops = {rid: (p[:4] * 4)[:-1] for rid, p in PROMPTS.items()}
    engine = _engine(model, tokenizer, PromptLookup())
    assert _run(engine, loops, new) == _run(_engine(model, tokenizer), loops, new)
    assert engine.spec_stats.drafted > 0


def test_seeded_sampling_gives_the_same_tokens_with_drafts_as_without(checkpoints: dict[str, Path]):
    """Each position draws with its own key of the request's chain, and a verify step commits only
    the positions it keeps: so the tokens are those of decoding without drafts, token for token."""
    model, tokenizer = load(str(checkpoints["qwen3_moe"]))
    plain = _run(_engine(model, tokenizer), PROMPTS, 24, temperature=0.8, seed=11)
    recorded = {tuple(p): plain[rid] for rid, p in PROMPTS.items()}
    engine = _engine(model, tokenizer, Replay(recorded, 0.7, seed=2), micro_batches=2)
    assert _run(engine, PROMPTS, 24, temperature=0.8, seed=11) == plain
    assert 0 < engine.spec_stats.accepted < engine.spec_stats.drafted
    other = _run(_engine(model, tokenizer), PROMPTS, 24, temperature=0.8, seed=12)
    assert other != plain  # the seed matters: the equality above is not that of a greedy run


def test_the_acceptance_rule_keeps_the_models_distribution():
    """A deterministic draft x is kept with probability p(x); on a rejection the token comes from
    p without x, renormalised: together, p. Measured over many seeds on a 4-token vocabulary."""
    p = mx.array([0.1, 0.2, 0.3, 0.4])
    logprobs = mx.log(mx.stack([p, p]))
    draft, n = 2, 4000
    first, kept, rejected = Counter(), 0, Counter()
    for seed in range(n):
        sampler = SeededSampler(mx.random.key(seed), 1.0, 1.0, 0, 0.0)
        y = sampler.draw(logprobs).tolist()
        first[y[0]] += 1
        if y[0] == draft:
            kept += 1
        else:
            rejected[y[0]] += 1
    for token, prob in enumerate(p.tolist()):
        assert abs(first[token] / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    assert abs(kept / n - 0.3) < 4 * math.sqrt(0.21 / n)
    for token, prob in ((0, 0.1 / 0.7), (1, 0.2 / 0.7), (3, 0.4 / 0.7)):  # max(0, p - q), normalised
        share = rejected[token] / (n - kept)
        assert abs(share - prob) < 4 * math.sqrt(prob * (1 - prob) / (n - kept))


def test_a_sequence_that_stops_inside_a_verify_step_leaves_only_its_own_tokens(checkpoints: dict[str, Path]):
    """A stop token among kept drafts ends the sequence there: nothing after it is sent, and the
    prompt cache gets its tokens only, so the next turn reusing it is what a cold start gives."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    prompt = PROMPTS["r2"]
    cold = _run(_engine(model, tokenizer), {"a": prompt}, 12)["a"]
    stop = next(i for i in range(4, 12) if cold[i] not in cold[:i])  # a token it first writes mid-way
    tokenizer.add_eos_token(cold[stop])  # ...made a stop token: a step of kept drafts ends there
    assert _run(_engine(model, tokenizer), {"a": prompt}, 12)["a"] == cold[:stop]
    turn2 = prompt + cold[:stop + 1] + [13, 14]
    want = _run(_engine(model, tokenizer), {"b": turn2}, 6)["b"]
    engine = _engine(model, tokenizer, Replay({tuple(prompt): cold}, 1.0), prompt_cache=PromptCache(1 << 26))
    assert _run(engine, {"a": prompt}, 12)["a"] == cold[:stop]
    assert engine.spec_stats.tokens > stop + 1  # the steps verified tokens past the stop token: not sent
    assert _run(engine, {"b": turn2}, 6)["b"] == want


@pytest.mark.parametrize("flags, message", [
    (["--speculate", "maybe"], "--speculate must be lookup or off, not 'maybe'"),
    (["--draft-max", "99"], "--draft-max must be 0..16, not 99"),
    (["--draft-replay", "/nonexistent/replay.json"], "--draft-replay /nonexistent/replay.json: not a replay file"),
    (["--speculate", "off", "--draft-model", "/x"], "--speculate off and a drafter (--draft-model, --draft-replay) "
                                                     "contradict each other"),
])
def test_bad_speculation_flags_are_refused_before_anything_starts(flags: list[str], message: str):
    for command in ("up", "router"):
        a = parser().parse_args([command, *flags])
        with pytest.raises(ConfigError) as e:
            a.fn(a)
        assert str(e.value).startswith(message)


def test_a_model_whose_cache_cannot_forget_does_not_speculate(checkpoints: dict[str, Path]):
    """Recurrent state (linear attention) or a sliding window cannot drop a rejected tail: such a
    model decodes one token a step, and says so."""
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

    model, tokenizer = load(str(checkpoints["mixtral"]))
    assert _engine(model, tokenizer, PromptLookup()).drafter is not None
    for other in (lambda: ArraysCache(2), lambda: RotatingKVCache(max_size=64)):
        model.make_cache = lambda other=other: [KVCache(), other()]  # one such layer is enough
        assert _engine(model, tokenizer, PromptLookup()).drafter is None
    del model.make_cache


def test_a_draft_model_drafts_its_own_greedy_tokens(checkpoints: dict[str, Path]):
    """The served model as its own draft model keeps every draft; another model of the same
    tokenizer keeps few. Either way the tokens are those of decoding without drafts."""
    model, tokenizer = load(str(checkpoints["mixtral"]))
    plain = _run(_engine(model, tokenizer), PROMPTS, 16)
    same = make_drafter("lookup", checkpoints["mixtral"], None, tokenizer)
    engine = _engine(model, tokenizer, same)
    assert _run(engine, PROMPTS, 16) == plain
    assert engine.spec_stats.accepted == engine.spec_stats.drafted > 16
    other = _engine(model, tokenizer, make_drafter("lookup", checkpoints["dbrx"], None, tokenizer))
    assert _run(other, PROMPTS, 16) == plain
    assert other.spec_stats.accepted < other.spec_stats.drafted


def test_a_draft_model_of_another_tokenizer_is_refused(checkpoints: dict[str, Path], tool_checkpoints):
    _, tokenizer = load(str(checkpoints["mixtral"]))
    with pytest.raises(ConfigError, match="its tokenizer is not the served model's"):
        make_drafter("lookup", tool_checkpoints["json_tools"], None, tokenizer)


class _PastTheVocabulary:
    """A drafter proposing ids the model has no embedding for (a draft model with a larger table,
    a corrupt replay file): never trusted, so never fed to the model."""

    name = "wild"

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def start(self, prompt: list[int]) -> None:
        return None

    def propose(self, state: None, context: list[int], k: int) -> list[int]:
        return [context[-1], self.vocab, self.vocab + 1][:k]  # one in range, then past the table


def test_drafts_past_the_vocabulary_are_cut_before_the_model_sees_them(checkpoints: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch):
    # catches: an id past the embedding table looked up anyway. It reads whatever memory follows
    # the table: NaN there (memory MLX hands out again) poisons the verify step's attention, even
    # at positions the mask hides, and the rest of the text (seen once in a suite run)
    model, tokenizer = load(str(checkpoints["dbrx"]))
    plain = _run(_engine(model, tokenizer), PROMPTS, 12)
    vocab = model.args.vocab_size
    fed: list[int] = []
    forward = type(model).__call__

    def spy(self, inputs, *args, **kwargs):
        fed.append(int(inputs.max().item()))
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", spy)
    engine = _engine(model, tokenizer, _PastTheVocabulary(vocab))
    assert {rid: _run(engine, {rid: p}, 12)[rid] for rid, p in PROMPTS.items()} == plain
    assert engine.spec_stats.drafted > 0 and engine.spec_stats.steps > 0  # the one in range was verified
    assert max(fed) < vocab

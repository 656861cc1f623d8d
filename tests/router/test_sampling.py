from __future__ import annotations

import mlx.core as mx
import pytest

from services.router.sampling import StopText, request_sampler


@pytest.mark.parametrize("pieces, stops, sent, hit", [
    (["hello E", "N", "D more"], ["END"], "hello ", "END"),
    (["a b", " c"], ["x"], "a b c", None),
    (["ab", "c\n", "\nz"], ["\n\n", "zz"], "abc", "\n\n"),
    (["xEN", "Dy"], ["END", "ENDY"], "x", "END"),
])
def test_stop_text_sends_everything_before_the_first_stop(pieces, stops, sent, hit):
    s = StopText(stops)
    out, found = "", None
    for p in pieces:
        text, found = s.feed(p)
        out += text
        if found:
            break
    if not found:
        out += s.flush()
    assert (out, found) == (sent, hit)


def test_text_that_may_start_a_stop_is_held_back_then_released():
    s = StopText(["END"])
    assert s.feed("go E") == ("go ", None)
    assert s.feed("x") == ("Ex", None)
    assert s.flush() == ""


def test_a_seeded_sampler_repeats_and_greedy_is_shared():
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 50), key=mx.random.key(3))))
    a, b = request_sampler(1.0, 1.0, 0, 0.0, 5), request_sampler(1.0, 1.0, 0, 0.0, 5)
    assert [a(logprobs).item() for _ in range(20)] == [b(logprobs).item() for _ in range(20)]
    c = request_sampler(1.0, 0.9, 20, 0.05, 6)
    assert [c(logprobs).item() for _ in range(20)] != [a(logprobs).item() for _ in range(20)]
    assert request_sampler(0.0, 1.0, 0, 0.0, None) is request_sampler(0.0, 0.5, 3, 0.0, 9)
    assert request_sampler(0.0, 1.0, 0, 0.0, None)(logprobs).item() == mx.argmax(logprobs).item()


def test_every_64_bit_seed_has_its_own_key():
    """Seeds were reduced mod 2**32: 0, 2**32 and 2**63 drew the same tokens, and -1 raised."""
    logprobs = mx.zeros((1, 300))  # uniform: 24 draws of 300 tokens never repeat by chance
    seeds = [0, 1, 1 << 32, (1 << 63) - 1, -1, -(1 << 63), -(1 << 63)]

    def draw(sample) -> tuple[int, ...]:
        return tuple(sample(logprobs).item() for _ in range(24))

    draws = [draw(request_sampler(1.0, 1.0, 0, 0.0, s)) for s in seeds]
    assert draws[-1] == draws[-2]  # the same seed, the same tokens
    assert len(set(draws)) == len(seeds) - 1

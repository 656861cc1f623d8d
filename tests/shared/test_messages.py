from __future__ import annotations

import pytest

from shared.errors import WireError
from shared.messages import GenerateEvent, GenerateRequest, WorkerAnnounce, decode, encode


def test_round_trip():
    a = WorkerAnnounce(worker="w0", subject="moebus.v1.experts.w0", model="abc", layers=2, experts=[0, 2])
    assert decode(WorkerAnnounce, encode(a)) == a


def test_defaults_fill_missing_optional_fields():
    g = decode(GenerateRequest, b'{"request_id": "r", "stream": "moebus.v1.stream.r", "max_tokens": 3}')
    assert g.temperature == 1.0 and g.prompt is None  # the HTTP API's default too


OK = '"request_id": "r", "stream": "moebus.v1.stream.r"'


@pytest.mark.parametrize("data, needle", [
    (b"not json", "Invalid JSON"),
    (b"[1, 2]", "object"),
    (b'{"request_id": "r", "stream": "moebus.v1.stream.r"}', "max_tokens"),
    (f'{{{OK}, "max_tokens": "3"}}'.encode(), "max_tokens"),
    (f'{{{OK}, "max_tokens": true}}'.encode(), "max_tokens"),
    (f'{{{OK}, "max_tokens": 3, "prompt": 5}}'.encode(), "prompt"),
    # A forged request must not create a sequence that never ends, nor publish to wildcards.
    (b'{"request_id": "r", "stream": "moebus.v1.stream.>", "max_tokens": 3}', "stream"),
    (b'{"request_id": "r", "stream": "moebus.v1.stream.*", "max_tokens": 3}', "stream"),
    (b'{"request_id": "r", "stream": "moebus.v1.stream.a b", "max_tokens": 3}', "stream"),
    (b'{"request_id": "r", "stream": "elsewhere.r", "max_tokens": 3}', "stream"),
    (f'{{{OK}, "max_tokens": 4611686018427387904}}'.encode(), "max_tokens"),
    (f'{{{OK}, "max_tokens": 3, "timeout_s": 1e308}}'.encode(), "timeout_s"),
    (f'{{{OK}, "max_tokens": 3, "timeout_s": 0}}'.encode(), "timeout_s"),
    (f'{{{OK}, "max_tokens": 3, "temperature": 1e999}}'.encode(), "temperature"),
    (f'{{{OK}, "max_tokens": 3, "top_logprobs": 21}}'.encode(), "top_logprobs"),
    (f'{{{OK}, "max_tokens": 3, "stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}}'.encode(), "stop"),
    (f'{{{OK}, "max_tokens": 3, "prompt": [-1]}}'.encode(), "prompt"),
    (f'{{{OK}, "max_tokens": 3, "prompt": "\\ud800"}}'.encode(), "Invalid JSON"),
])
def test_bad_messages_name_the_problem(data, needle):
    with pytest.raises(WireError) as e:
        decode(GenerateRequest, data)
    assert needle in str(e.value)


def test_optional_int_accepts_null():
    ev = decode(GenerateEvent, b'{"request_id": "r", "index": 0, "token": null}')
    assert ev.token is None

from __future__ import annotations

import pytest

from shared.errors import WireError
from shared.messages import GenerateEvent, GenerateRequest, WorkerAnnounce, decode, encode


def test_round_trip():
    a = WorkerAnnounce("w0", "moebus.v1.experts.w0", "abc", 2, [0, 2])
    assert decode(WorkerAnnounce, encode(a)) == a


def test_defaults_fill_missing_optional_fields():
    g = decode(GenerateRequest, b'{"request_id": "r", "stream": "s", "max_tokens": 3}')
    assert g.temperature == 0.0 and g.prompt is None


@pytest.mark.parametrize("data, needle", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "object"),
    (b'{"request_id": "r", "stream": "s"}', "max_tokens"),
    (b'{"request_id": "r", "stream": "s", "max_tokens": "3"}', "wrong type"),
    (b'{"request_id": "r", "stream": "s", "max_tokens": true}', "wrong type"),
    (b'{"request_id": "r", "stream": "s", "max_tokens": 3, "prompt": 5}', "wrong type"),
])
def test_bad_messages_name_the_problem(data, needle):
    with pytest.raises(WireError) as e:
        decode(GenerateRequest, data)
    assert needle in str(e.value)


def test_optional_int_accepts_null():
    ev = decode(GenerateEvent, b'{"request_id": "r", "index": 0, "token": null}')
    assert ev.token is None

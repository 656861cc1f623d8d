from __future__ import annotations

import numpy as np
import pytest

from shared.errors import WireError
from shared.wire import decode_reply, decode_request, encode_reply, encode_request


def _request(rows: int = 3, dim: int = 4, pairs: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    r = rng.integers(0, rows, pairs).astype(np.int32)
    e = rng.integers(0, 8, pairs).astype(np.int32)
    return x, r, e, encode_request(7, 0, x, r, e)


def test_request_round_trips_without_copying():
    x, r, e, data = _request()
    req = decode_request(data)
    assert req.layer == 7 and req.dtype == 0
    np.testing.assert_array_equal(req.x, x)
    np.testing.assert_array_equal(req.rows, r)
    np.testing.assert_array_equal(req.experts, e)
    assert not req.x.flags.owndata  # a view into the message bytes


def test_reply_round_trips_bfloat16_bits_and_compute_time():
    y = np.arange(12, dtype="<u2").reshape(3, 4)
    got = decode_reply(encode_reply(2, y, compute_us=1234))
    assert got.dtype == 2 and got.compute_us == 1234
    np.testing.assert_array_equal(got.y, y)
    assert decode_reply(encode_reply(2, y, compute_us=-5)).compute_us == 0  # clamped, never a struct error


@pytest.mark.parametrize("cut", [0, 5, 20, -1])
def test_truncated_request_is_refused(cut):
    *_, data = _request()
    with pytest.raises(WireError) as e:
        decode_request(data[:cut])
    assert "expert request" in str(e.value)


def test_bad_magic_and_dtype_are_refused():
    *_, data = _request()
    with pytest.raises(WireError, match="magic"):
        decode_request(b"XXXX" + data[4:])
    with pytest.raises(WireError, match="dtype"):
        decode_request(data[:4] + bytes([9]) + data[5:])


def test_pair_pointing_outside_x_is_refused():
    x = np.zeros((2, 4), np.float32)
    data = encode_request(0, 0, x, np.array([0, 2], np.int32), np.array([1, 1], np.int32))
    with pytest.raises(WireError, match="outside"):
        decode_request(data)


def test_reply_length_must_match_header():
    data = encode_reply(0, np.zeros((2, 4), np.float32))
    with pytest.raises(WireError):
        decode_reply(data + b"\0")
    with pytest.raises(WireError):
        decode_reply(data[:10])


def test_encode_refuses_mismatched_dtype():
    with pytest.raises(WireError):
        encode_reply(0, np.zeros((2, 4), np.float64))


def test_empty_messages_round_trip():
    got = decode_reply(encode_reply(0, np.zeros((0, 8), np.float32)))
    assert got.y.shape == (0, 8)
    req = decode_request(encode_request(1, 0, np.zeros((0, 8), np.float32), np.zeros(0, np.int32),
                                        np.zeros(0, np.int32)))
    assert req.x.shape == (0, 8) and len(req.rows) == 0

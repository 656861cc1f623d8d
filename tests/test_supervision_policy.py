"""The launcher's restart policy and the services' log throttle: pure logic, no processes."""

from __future__ import annotations

import pytest

from services.launcher import restart_delay
from shared.bus import Throttled


def test_restarts_back_off_and_give_up_after_repeated_failures():
    assert restart_delay([0.0], now=0.0) == 0.5
    assert restart_delay([0.0, 1.0, 2.0], now=2.0) == 2.0
    assert restart_delay([0.0, 1.0, 2.0, 3.0, 4.0], now=4.0) is None  # 5 in a minute: give up
    assert restart_delay([0.0, 1.0, 2.0, 3.0, 100.0], now=100.0) == 0.5  # old failures are forgiven


def test_repeated_warnings_are_rate_limited(capsys: pytest.CaptureFixture):
    throttled = Throttled(period_s=60)
    for _ in range(50):
        throttled.warning("nats disconnected", url="nats://x")
    out = capsys.readouterr()
    assert (out.out + out.err).count("nats disconnected") == 1

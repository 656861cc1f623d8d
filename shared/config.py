"""Settings from flags and MOEBUS_* variables: a flag wins, then the variable, then the default.

Read only from `main()`; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.errors import ConfigError

T = TypeVar("T")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def setting(flag: T | None, key: str, default: T, cast: Callable[[str], T]) -> T:
    if flag is not None:
        return flag
    raw = os.environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError as e:
        raise ConfigError(f"{key}={raw!r}: {e}") from None


def positive(value: float, key: str) -> float:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")
    return value


def home() -> Path:
    """Where moebus keeps what it makes (the demo model): MOEBUS_HOME or ~/.cache/moebus."""
    return Path(os.environ.get("MOEBUS_HOME") or Path.home() / ".cache" / "moebus")

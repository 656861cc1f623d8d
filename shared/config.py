"""Settings from flags and MOEBUS_* variables: a flag wins, then the variable, then the default.

Read only from `main()`; nothing reads the environment at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class LocalCluster:
    """Where the `moebus up` of this MOEBUS_HOME serves: one-shot commands (`moebus status`)
    find its bus here rather than guessing the default port."""

    pid: int  # the launcher's: a record whose launcher is gone is ignored
    nats_url: str
    http_url: str
    creds_dir: str = ""  # --creds of `moebus up`, when it was given one


def _record() -> Path:
    return home() / "up.json"


def record_cluster(c: LocalCluster) -> None:
    path = _record()
    tmp = path.with_name(f".up.{c.pid}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(c)))
        tmp.replace(path)  # a reader never sees half a file
    except OSError:  # a read-only home costs `moebus status` only its guess of the URL
        tmp.unlink(missing_ok=True)


def forget_cluster(pid: int) -> None:
    """Remove the record at a clean exit, unless another launcher has written its own since."""
    found = _read()
    if found is not None and found.pid == pid:
        _record().unlink(missing_ok=True)


def local_cluster() -> LocalCluster | None:
    """The recorded cluster if its launcher still runs."""
    found = _read()
    if found is None:
        return None
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:  # killed without cleaning up
        return None
    except PermissionError:  # another user's, alive
        pass
    return found


def _read() -> LocalCluster | None:
    try:
        return LocalCluster(**json.loads(_record().read_text()))
    except (OSError, ValueError, TypeError):  # none, or not one we wrote
        return None

"""The one exception tree of moebus.

    MoebusError
    ├── ConfigError            a flag or MOEBUS_* variable is missing or malformed
    │   └── IdentityInUse      a live worker holds this worker identity (exit status 3)
    ├── ModelError             a checkpoint moebus cannot serve (dense, unsupported, broken)
    ├── WireError              a binary or JSON message that does not decode
    ├── BadRequest             a client asked for something invalid (HTTP 400)
    │   └── ContextLengthExceeded
    ├── NotReady               the cluster cannot serve yet (HTTP 503)
    └── BusError               a bus request failed
        ├── BusTimeout         no reply in time
        ├── NoResponders       nobody listens on the subject
        └── RemoteError        the peer answered with a service error (code, description)
"""

from __future__ import annotations


class MoebusError(Exception):
    """Base of every error moebus raises on purpose."""

    code = "internal_error"


class ConfigError(MoebusError):
    code = "config_error"


class IdentityInUse(ConfigError):
    """Its own exit status: a service manager must not restart into the same refusal, but
    should restart after any other failure at start."""

    exit_status = 3


class ModelError(MoebusError):
    code = "model_error"


class WireError(MoebusError):
    code = "bad_message"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequest(MoebusError):
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class NotReady(MoebusError):
    code = "not_ready"


class BusError(MoebusError):
    code = "bus_error"


class BusTimeout(BusError):
    code = "bus_timeout"


class NoResponders(BusError):
    code = "no_responders"


class RemoteError(BusError):
    """A peer answered with a micro-service error: `status` is its numeric code."""

    code = "remote_error"

    def __init__(self, subject: str, status: str, description: str) -> None:
        super().__init__(f"{subject}: {status} {description}")
        self.subject = subject
        self.status = status
        self.description = description

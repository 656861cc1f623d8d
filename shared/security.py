"""Who may do what on the bus: one NATS user per role (one per worker), with subject permissions.

`moebus init-cluster` writes a credentials file per user and the server's configuration; a
service finds its credentials by itself on the machine that made them, or is given `--creds`.
Each user's permissions follow from its role alone (`permissions`), so the server config is
rendered, never edited by hand:

| role    | publishes                                               | subscribes                                 |
|---------|---------------------------------------------------------|--------------------------------------------|
| router  | expert requests, discover, stream events, the buckets   | router subjects, announcements             |
| gateway | router requests, cancels                                | stream events (its responses)              |
| worker  | its own announcements and identity; reads the buckets   | its expert and identity subjects, discover |
| admin   | status and `$SRV` requests; reads and watches placement | its replies                                |

Everyone subscribes only to its own inbox prefix (`_INBOX.<user>`), so no peer reads another's
replies, and answers requests through `allow_responses` rather than a publish permission.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from shared import subjects as S
from shared.errors import ConfigError
from shared.messages import Message, Name

Role = Literal["router", "gateway", "worker", "admin"]
# The micro service names each role runs: a worker user runs a worker or a flash-cache.
SERVICES = {"router": (S.SERVICE_ROUTER,), "gateway": (S.SERVICE_GATEWAY,),
            "worker": (S.SERVICE_WORKER, S.SERVICE_FLASH)}
DEFAULT_WORKERS = 16  # worker identities made by default: one per worker process of the cluster
# init-cluster's nats.conf listens on loopback, as `moebus up`'s bus: other machines only when told.
DEFAULT_LISTEN = "127.0.0.1:4222"
NATS_CONTEXT = "moebus"  # the `nats` CLI context init-cluster writes for the admin user


class Creds(Message):
    """A credentials file: who this is, its secret, and the CA that signs the server's certificate."""

    user: Name
    role: Role
    password: str = Field(min_length=16, max_length=256)
    ca: str = Field(default="", max_length=1 << 16)  # PEM; empty: the server speaks plain TCP

    @property
    def inbox(self) -> str:
        return f"_INBOX.{self.user}"


def _js_read(stream: str) -> list[str]:
    # Direct gets only. JetStream answers on whatever reply subject the asker names: a consumer
    # would push a whole stream (the model: gigabytes) onto it, and a stream info or message
    # get answered onto a stream's subject is stored there (placement overwritten). A direct
    # get's answer is not stored.
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def _js_write(stream: str, data: str) -> list[str]:
    api = "$JS.API"
    return [*_js_read(stream), f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.UPDATE.{stream}",
            f"{api}.STREAM.PURGE.{stream}", f"{api}.STREAM.MSG.DELETE.{stream}", f"{api}.STREAM.NAMES",
            f"{api}.CONSUMER.*.{stream}", f"{api}.CONSUMER.*.{stream}.>", data]


def _js_watch(stream: str) -> list[str]:
    # What `nats kv get|watch|ls|history` asks: the bucket's stream info, direct gets, and an
    # ordered consumer pushed to the asker's inbox. Only the admin gets it: a consumer may name
    # any subject to be pushed to, so it is for the trusted operator alone.
    api = "$JS.API"
    return [*_js_read(stream), f"{api}.INFO", f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.NAMES",
            f"{api}.STREAM.LIST", f"{api}.CONSUMER.*.{stream}", f"{api}.CONSUMER.*.{stream}.>"]


def _micro(role: str) -> list[str]:
    # nats micro's discovery: `$SRV.PING`, `$SRV.INFO.<name>`, `$SRV.STATS.<name>.<id>`: only ours.
    return ["$SRV.*", *(s for name in SERVICES[role] for s in (f"$SRV.*.{name}", f"$SRV.*.{name}.*"))]


def permissions(role: Role, user: str) -> dict:
    """The NATS permissions of `user` in `role` (a pure function: the server config renders it)."""
    inbox = f"_INBOX.{user}.>"
    if role == "router":
        pub = [f"{S.PREFIX}.experts.>", S.WORKERS_DISCOVER, f"{S.STREAM_PREFIX}.>", S.BUS_PROBE, "$JS.API.INFO",
               *_js_write(S.CLUSTER_STREAM, f"{S.CLUSTER_KEYS}.>"), *_js_write(S.MODEL_STREAM, f"{S.MODEL_OBJECTS}.>")]
        sub = [f"{S.PREFIX}.router.>", S.ANNOUNCEMENTS, inbox, *_micro(role)]
    elif role == "gateway":
        pub = [S.ROUTER_GENERATE, S.ROUTER_CANCEL, S.ROUTER_TOKENS, S.ROUTER_STATUS, S.ROUTER_METRICS, S.ROUTER_CLUSTER]
        sub = [f"{S.STREAM_PREFIX}.>", S.GATEWAY_HEALTH, inbox, *_micro(role)]
    elif role == "worker":
        pub = [S.announce_subject_of(user), S.identity_subject(user), *_js_read(S.CLUSTER_STREAM),
               *_js_read(S.MODEL_STREAM)]
        sub = [S.experts_subject_of(user), S.identity_subject(user), S.WORKERS_DISCOVER, inbox, *_micro(role)]
    elif role == "admin":
        pub = ["$SRV.>", S.ROUTER_STATUS, S.ROUTER_CLUSTER, S.GATEWAY_HEALTH, *_js_watch(S.CLUSTER_STREAM)]
        sub = [inbox]
    else:
        raise ConfigError(f"unknown role {role!r}")
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}, "allow_responses": True}


def server_conf(users: list[Creds], tls_dir: Path | None = None) -> str:
    """The `authorization` (and `tls`) blocks of nats-server's config, for these users.

    The config format accepts JSON values, so every string is quoted by json.dumps."""
    entries = [{"user": c.user, "password": c.password, "permissions": permissions(c.role, c.user)} for c in users]
    out = f"authorization {{\n  users: {json.dumps(entries, indent=2)}\n}}\n"
    if tls_dir is not None:
        # handshake_first: no byte before TLS, so a client cannot be talked into sending its
        # password in clear by a server that does not ask for TLS.
        out += (f"tls {{\n  cert_file: {json.dumps(str(tls_dir / 'server-cert.pem'))}\n"
                f"  key_file: {json.dumps(str(tls_dir / 'server-key.pem'))}\n  timeout: 5\n  handshake_first: true\n}}\n")
    return out


def make_creds(role: Role, user: str, ca: str = "") -> Creds:
    return Creds(user=user, role=role, password=secrets.token_urlsafe(32), ca=ca)


def worker_user(n: int) -> str:
    return f"worker-{n}"


def is_loopback(url: str) -> bool:
    """Whether every server of `url` (comma-separated) is on this machine."""
    hosts = [urlparse(u.strip() if "://" in u else f"nats://{u.strip()}").hostname or "" for u in url.split(",")]
    return all(h == "localhost" or _loopback_ip(h) for h in hosts)


def _loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback  # a name such as 127.x.example.com is not
    except ValueError:
        return False

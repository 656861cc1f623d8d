"""Every NATS subject moebus uses, declared once, next to its message type.

| subject                          | from -> to                | message                        |
|----------------------------------|---------------------------|--------------------------------|
| moebus.v1.experts.<id>.<worker>  | router -> worker (req)    | wire.ExpertRequest -> ExpertReply (binary) |
| moebus.v1.workers.announce.<id>.<worker> | worker -> router (pub) | messages.WorkerAnnounce     |
| moebus.v1.workers.discover       | router -> workers (pub)   | messages.Discover              |
| moebus.v1.workers.identity.<identity> | worker -> its holder (req) | IdentityClaim -> the holder's (expert_worker.identity) |
| moebus.v1.router.generate        | gateway -> router (req)   | GenerateRequest -> GenerateAccepted |
| <GenerateRequest.stream>         | router -> gateway (pub)   | messages.GenerateEvent         |
| moebus.v1.router.cancel          | gateway -> router (pub)   | messages.Cancel                |
| moebus.v1.router.tokens          | gateway -> router (req)   | GenerateRequest -> TokenCount  |
| moebus.v1.router.status          | any -> router (req)       | {} -> RouterStatus             |
| moebus.v1.router.metrics         | gateway -> router (req)   | {} -> Prometheus text          |
| moebus.v1.router.cluster         | any -> router (req)       | {} -> ClusterStatus            |
| moebus.v1.gateway.health         | any -> gateway (req)      | {} -> health JSON              |

A worker's id is `<identity>-<suffix>`: the identity is its NATS user on a secured cluster (its
host name otherwise), the suffix unique to the process. Subjects carry the identity as a token
of its own, so the server's permissions can give each worker user its own subjects only.
"""

from __future__ import annotations

PREFIX = "moebus.v1"

WORKERS_ANNOUNCE = f"{PREFIX}.workers.announce"
WORKERS_DISCOVER = f"{PREFIX}.workers.discover"
WORKERS_IDENTITY = f"{PREFIX}.workers.identity"
ROUTER_GENERATE = f"{PREFIX}.router.generate"
ROUTER_CANCEL = f"{PREFIX}.router.cancel"
ROUTER_TOKENS = f"{PREFIX}.router.tokens"
ROUTER_STATUS = f"{PREFIX}.router.status"
ROUTER_METRICS = f"{PREFIX}.router.metrics"
ROUTER_CLUSTER = f"{PREFIX}.router.cluster"
GATEWAY_HEALTH = f"{PREFIX}.gateway.health"
ANNOUNCEMENTS = f"{WORKERS_ANNOUNCE}.>"  # the router's subscription
STREAM_PREFIX = f"{PREFIX}.stream"  # GenerateRequest.stream = STREAM_PREFIX.<request id>

# JetStream buckets, and the streams and subjects JetStream keeps them in.
CLUSTER_BUCKET = "moebus-cluster"  # key-value: placement (shared.cluster)
CLUSTER_STREAM, CLUSTER_KEYS = f"KV_{CLUSTER_BUCKET}", f"$KV.{CLUSTER_BUCKET}"
MODEL_BUCKET = "moebus-model"  # object store: the shared model (shared.modelstore)
MODEL_STREAM, MODEL_OBJECTS = f"OBJ_{MODEL_BUCKET}", f"$O.{MODEL_BUCKET}"

# NATS micro service names, as `nats micro ls` shows them.
SERVICE_GATEWAY = "moebus-gateway"
SERVICE_ROUTER = "moebus-router"
SERVICE_WORKER = "moebus-expert-worker"
SERVICE_FLASH = "moebus-flash-cache"  # answers the same experts subjects as a worker


def identity(worker: str) -> str:
    """The user (or host) part of a worker id."""
    return worker.rsplit("-", 1)[0]


def experts_subject(worker: str) -> str:
    """Where worker `worker` answers expert requests (wire.ExpertRequest)."""
    return f"{PREFIX}.experts.{identity(worker)}.{worker}"


def announce_subject(worker: str) -> str:
    """Where worker `worker` announces itself; the router takes an announcement only from here."""
    return f"{WORKERS_ANNOUNCE}.{identity(worker)}.{worker}"


def experts_subject_of(user: str) -> str:
    """Every expert subject of a worker user (a permission)."""
    return f"{PREFIX}.experts.{user}.*"


def announce_subject_of(user: str) -> str:
    return f"{WORKERS_ANNOUNCE}.{user}.*"


def identity_subject(user: str) -> str:
    """Where the live holder of worker identity `user` answers who it is (one process per identity)."""
    return f"{WORKERS_IDENTITY}.{user}"


def stream_subject(request_id: str) -> str:
    return f"{STREAM_PREFIX}.{request_id}"

# Nobody listens here: nats-server itself answers "no responders" at once, so the router learns
# whether the server hears it at all (a stalled bus times out).
BUS_PROBE = f"{PREFIX}.probe"

"""Every NATS subject moebus uses, declared once, next to its message type.

| subject                          | from -> to                | message                        |
|----------------------------------|---------------------------|--------------------------------|
| moebus.v1.experts.<worker>       | router -> worker (req)    | wire.ExpertRequest -> ExpertReply (binary) |
| moebus.v1.workers.announce       | worker -> router (pub)    | messages.WorkerAnnounce        |
| moebus.v1.workers.discover       | router -> workers (pub)   | messages.Discover              |
| moebus.v1.router.generate        | gateway -> router (req)   | GenerateRequest -> GenerateAccepted |
| <GenerateRequest.stream>         | router -> gateway (pub)   | messages.GenerateEvent         |
| moebus.v1.router.cancel          | gateway -> router (pub)   | messages.Cancel                |
| moebus.v1.router.status          | any -> router (req)       | {} -> RouterStatus             |
| moebus.v1.router.metrics         | gateway -> router (req)   | {} -> Prometheus text          |
| moebus.v1.router.cluster         | any -> router (req)       | {} -> ClusterStatus            |
| moebus.v1.gateway.health         | any -> gateway (req)      | {} -> health JSON              |
"""

from __future__ import annotations

PREFIX = "moebus.v1"

WORKERS_ANNOUNCE = f"{PREFIX}.workers.announce"
WORKERS_DISCOVER = f"{PREFIX}.workers.discover"
ROUTER_GENERATE = f"{PREFIX}.router.generate"
ROUTER_CANCEL = f"{PREFIX}.router.cancel"
ROUTER_STATUS = f"{PREFIX}.router.status"
ROUTER_METRICS = f"{PREFIX}.router.metrics"
ROUTER_CLUSTER = f"{PREFIX}.router.cluster"
GATEWAY_HEALTH = f"{PREFIX}.gateway.health"
STREAM_PREFIX = f"{PREFIX}.stream"  # GenerateRequest.stream = STREAM_PREFIX.<request id>

# NATS micro service names, as `nats micro ls` shows them.
SERVICE_GATEWAY = "moebus-gateway"
SERVICE_ROUTER = "moebus-router"
SERVICE_WORKER = "moebus-expert-worker"


def experts_subject(worker: str) -> str:
    """Where worker `worker` answers expert requests (wire.ExpertRequest)."""
    return f"{PREFIX}.experts.{worker}"


def stream_subject(request_id: str) -> str:
    return f"{STREAM_PREFIX}.{request_id}"

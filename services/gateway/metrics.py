"""The gateway's Prometheus metrics; /metrics adds the router's (expert round trips, load)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("moebus_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("moebus_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("moebus_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("moebus_time_to_first_token_seconds", "From request to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moebus_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.connections_closed = Counter(
            "moebus_http_connections_closed", "Connections the gateway closed, by reason: header_timeout, "
            "body_timeout, keep_alive (idle past --keep-alive), evicted (at the cap, for a newer one), "
            "refused (at the cap, all busy), shutdown",
            ["reason"], registry=r)

    def count_tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

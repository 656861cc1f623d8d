"""The router's numbers: counted in plain arrays on the hot path, turned into Prometheus text
only when scraped (through the gateway's /metrics)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ExchangeStats:
    """Per-layer expert round trips and where the tokens went; written by the MLX thread."""

    def __init__(self, layers: int, experts: int) -> None:
        self.rtt_counts = np.zeros((layers, len(RTT_BUCKETS) + 1), np.int64)
        self.rtt_sum = np.zeros(layers)
        self.expert_tokens = np.zeros(experts, np.int64)
        self.worker_pairs: Counter[str] = Counter()
        self.payload_bytes = 0
        self.recent = np.zeros(2048)  # the last round trips, for exact quantiles
        self.recent_compute = np.zeros(2048)  # the slowest worker's own compute in each of them
        self.calls = 0
        # Each decode step's wall time less the round trips it waited on: the router's own time
        # (attention, gates, sampling, planning). Two lanes overlap, so there it is a lower bound.
        self.recent_outside = np.zeros(512)
        self.steps = 0
        self._in_step = 0.0

    def record(self, layer: int, seconds: float, compute: float, experts: np.ndarray,
               pairs: dict[str, int], nbytes: int) -> None:
        self.rtt_counts[layer, np.searchsorted(RTT_BUCKETS, seconds)] += 1
        self.rtt_sum[layer] += seconds
        self._in_step += seconds
        self.recent[self.calls % len(self.recent)] = seconds
        self.recent_compute[self.calls % len(self.recent)] = compute
        self.calls += 1
        self.expert_tokens += np.bincount(experts.ravel(), minlength=len(self.expert_tokens))
        self.worker_pairs.update(pairs)
        self.payload_bytes += nbytes

    def record_step(self, seconds: float) -> None:
        self.recent_outside[self.steps % len(self.recent_outside)] = max(0.0, seconds - self._in_step)
        self.steps += 1
        self._in_step = 0.0


class RouterCollector:
    def __init__(self, stats: ExchangeStats, gauges: Callable[[], dict[str, float]],
                 memory: Callable[[], dict[str, dict]], lanes: Callable[[], list[int]]) -> None:
        self.stats = stats
        self.gauges = gauges
        self.memory = memory
        self.lanes = lanes

    def collect(self) -> Iterator:
        s = self.stats
        rtt = HistogramMetricFamily("moebus_expert_roundtrip_seconds",
                                    "One MoE layer's fan-out to its workers and back", labels=["layer"])
        for layer in range(len(s.rtt_sum)):
            cumulative = np.cumsum(s.rtt_counts[layer]).tolist()
            buckets = [(str(b), c) for b, c in zip(RTT_BUCKETS, cumulative)] + [("+Inf", cumulative[-1])]
            rtt.add_metric([str(layer)], buckets, float(s.rtt_sum[layer]))
        yield rtt
        experts = CounterMetricFamily("moebus_expert_tokens", "Tokens routed to each expert, all layers",
                                      labels=["expert"])
        for e, n in enumerate(s.expert_tokens.tolist()):
            experts.add_metric([str(e)], n)
        yield experts
        workers = CounterMetricFamily("moebus_worker_tokens", "(token, expert) pairs sent to each worker",
                                      labels=["worker"])
        for subject, n in sorted(s.worker_pairs.items()):
            workers.add_metric([subject.rsplit(".", 1)[-1]], n)
        yield workers
        yield CounterMetricFamily("moebus_expert_payload_bytes", "Bytes of expert requests sent", value=s.payload_bytes)
        yield CounterMetricFamily("moebus_expert_layer_calls", "MoE layer fan-outs", value=s.calls)
        n = min(s.calls, len(s.recent))
        rtt, compute = s.recent[:n], s.recent_compute[:n]
        for name, what, values in (
            ("roundtrip", "layer round trips", rtt),
            ("compute", "layer round trips spent in the slowest worker's compute", compute),
            ("bus", "layer round trips less that compute: the bus's share", rtt - compute),
        ):
            family = GaugeMetricFamily(f"moebus_expert_{name}_recent_seconds",
                                       f"Quantiles of the last {len(s.recent)} {what}", labels=["quantile"])
            for q in (0.5, 0.99):
                family.add_metric([str(q)], float(np.quantile(values, q)) if n else 0.0)
            yield family
        outside = GaugeMetricFamily("moebus_router_step_outside_experts_recent_seconds",
                                    f"Quantiles of the last {len(s.recent_outside)} decode steps' time outside "
                                    "their expert round trips", labels=["quantile"])
        n = min(s.steps, len(s.recent_outside))
        for q in (0.5, 0.99):
            outside.add_metric([str(q)], float(np.quantile(s.recent_outside[:n], q)) if n else 0.0)
        yield outside
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"moebus_{name}", name.replace("_", " "), value=value)
        steps = CounterMetricFamily("moebus_micro_batch_steps", "Decode steps each micro-batch lane ran",
                                    labels=["lane"])
        for lane, n in enumerate(self.lanes()):
            steps.add_metric([str(lane)], n)
        yield steps
        memory = GaugeMetricFamily("moebus_worker_mlx_memory_bytes",
                                   "Each worker's MLX allocator counters, from its last heartbeat",
                                   labels=["worker", "kind"])
        for worker, counters in sorted(self.memory().items()):
            for kind, value in sorted(counters.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    memory.add_metric([worker, kind], float(value))
        yield memory


def registry(stats: ExchangeStats, gauges: Callable[[], dict[str, float]],
             memory: Callable[[], dict[str, dict]], lanes: Callable[[], list[int]]) -> Callable[[], bytes]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RouterCollector(stats, gauges, memory, lanes))
    return lambda: generate_latest(reg)

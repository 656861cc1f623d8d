"""The router's numbers: counted in plain arrays on the hot path, turned into Prometheus text
only when scraped (through the gateway's /metrics)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# HELP lines of the router's plain gauges where the name alone does not say it.
GAUGE_HELP = {"sequences_running_max": "The most sequences in the batch at once (prefilling or decoding) since the "
                                       "router started: never above --max-running",
              "grammar_mask_seconds": "Seconds spent computing constrained decoding's token masks, in all "
                                      "(divided by moebus_grammar_masks: the time per constrained token)",
              "grammar_masks": "Token masks computed for constrained sequences (one per constrained token)",
              "prompt_cache_bytes": "Bytes of the finished prompts' KV caches kept for reuse",
              "prompt_cache_budget_bytes": "The prompt cache's byte budget (--prompt-cache-bytes)",
              "prompt_cache_entries": "Finished sequences whose KV cache is kept",
              "prompt_cache_hits": "Requests that started from a cached prefix, since the router started",
              "prompt_cache_misses": "Requests prefilled in full, since the router started",
              "prompt_cache_tokens_reused": "Prompt tokens taken from the cache instead of prefilled, in all",
              "kv_bytes_in_use": "Bytes of KV cache reserved by running sequences: each can grow to its prompt + "
                                  "max_tokens, and a lane's rows are as long as its longest, plus one 256-token step",
              "mlx_active_bytes": "The router's MLX memory now: weights, KV caches, prompt cache",
              "mlx_active_bytes_max": "The router's most MLX memory between decode steps since it started",
              "kv_bytes_in_use_max": "The most KV bytes reserved at once since the router started: never above "
                                     "--kv-budget",
              "kv_budget_bytes": "--kv-budget: a sequence starts only when its KV cache fits beside the running ones"}


class ExchangeStats:
    """Per-layer expert round trips and where the tokens went; written by the MLX thread."""

    def __init__(self, layers: int, experts: int) -> None:
        self.rtt_counts = np.zeros((layers, len(RTT_BUCKETS) + 1), np.int64)
        self.rtt_sum = np.zeros(layers)
        self.pair_tokens = np.zeros((layers, experts), np.int64)  # tokens routed to each (layer, expert)
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
        self.pair_tokens[layer] += np.bincount(experts.ravel(), minlength=self.pair_tokens.shape[1])
        self.worker_pairs.update(pairs)
        self.payload_bytes += nbytes

    @property
    def expert_tokens(self) -> np.ndarray:
        """Tokens routed to each expert, all layers."""
        return self.pair_tokens.sum(axis=0)

    def record_step(self, seconds: float) -> None:
        self.recent_outside[self.steps % len(self.recent_outside)] = max(0.0, seconds - self._in_step)
        self.steps += 1
        self._in_step = 0.0


class RouterCollector:
    def __init__(self, stats: ExchangeStats, gauges: Callable[[], dict[str, float]],
                 workers: Callable[[], dict], lanes: Callable[[], list[int]],
                 speculation: Callable[[], tuple[str, Any] | None]) -> None:
        self.stats = stats
        self.gauges = gauges
        self.workers = workers
        self.lanes = lanes
        self.speculation = speculation  # (drafter name, SpecStats), or None when it is off

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
            yield GaugeMetricFamily(f"moebus_{name}", GAUGE_HELP.get(name, name.replace("_", " ")), value=value)
        steps = CounterMetricFamily("moebus_micro_batch_steps", "Decode steps each micro-batch lane ran",
                                    labels=["lane"])
        for lane, n in enumerate(self.lanes()):
            steps.add_metric([str(lane)], n)
        yield steps
        yield from _speculation(self.speculation())
        reports = self.workers()
        memory = GaugeMetricFamily("moebus_worker_mlx_memory_bytes",
                                   "Each worker's MLX allocator counters, from its last heartbeat",
                                   labels=["worker", "kind"])
        for worker, a in sorted(reports.items()):
            for kind, value in sorted(a.memory.items()):
                memory.add_metric([worker, kind], float(value))
        yield memory
        yield from _flash(reports)


# A flash-cache's counters (services.flash_cache.store) as Prometheus families.
_FLASH = {"bytes_read": ("counter", 1.0, "bytes_read", "Expert bytes read from the bundle on SSD"),
          "records_read": ("counter", 1.0, "records_read", "Expert records read from the bundle"),
          "hits": ("counter", 1.0, "hits", "Expert uses served from DRAM slots"),
          "misses": ("counter", 1.0, "misses", "Expert uses that needed a read"),
          "io_us": ("counter", 1e-6, "io_seconds", "Time spent reading experts"),
          "compute_us": ("counter", 1e-6, "compute_seconds", "Time spent computing experts"),
          "resident_bytes": ("gauge", 1.0, "resident_bytes", "Expert bytes held in DRAM slots"),
          "slot_bytes": ("gauge", 1.0, "slot_bytes", "DRAM reserved for expert slots (the budget used)"),
          "prefetched": ("counter", 1.0, "prefetched", "Expert records read ahead on the next layer's gate"),
          "prefetch_used": ("counter", 1.0, "prefetch_used", "Records read ahead that the next request used"),
          "peak_rss_bytes": ("gauge", 1.0, "peak_rss_bytes", "The flash-cache process's peak resident memory")}


def _flash(reports: dict) -> Iterator:
    flash = {w: a.flash for w, a in reports.items() if a.flash}
    for key, (kind, scale, name, doc) in _FLASH.items():
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            f"moebus_flash_{name}", doc, labels=["worker"])
        for worker, counters in sorted(flash.items()):
            if key in counters:
                family.add_metric([worker], scale * counters[key])
        yield family


def _speculation(spec: tuple[str, Any] | None) -> Iterator:
    for attr, name, doc in (("drafted", "draft_tokens", "Tokens drafted for verify steps"),
                            ("accepted", "draft_tokens_accepted", "Drafted tokens the model kept"),
                            ("steps", "verify_steps", "Decode steps that verified drafts"),
                            ("tokens", "verify_step_tokens", "Tokens verify steps yielded, kept drafts and the "
                                                             "model's own (divided by verify steps: tokens per step)"),
                            ("draft_seconds", "draft_seconds", "Seconds spent proposing drafts (a draft model's "
                                                               "own forward passes)")):
        family = CounterMetricFamily(f"moebus_{name}", doc, labels=["drafter"])
        if spec is not None:
            family.add_metric([spec[0]], getattr(spec[1], attr))
        yield family


def registry(stats: ExchangeStats, gauges: Callable[[], dict[str, float]],
             workers: Callable[[], dict], lanes: Callable[[], list[int]],
             speculation: Callable[[], tuple[str, Any] | None] = lambda: None) -> Callable[[], bytes]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RouterCollector(stats, gauges, workers, lanes, speculation))
    return lambda: generate_latest(reg)

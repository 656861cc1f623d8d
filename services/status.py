"""`moebus status [--json]`: the cluster as the router sees it, read over the bus."""

from __future__ import annotations

import sys

import orjson

from shared import subjects
from shared.access import connect_options
from shared.bus import close, request
from shared.errors import MoebusError
from shared.messages import ClusterStatus, decode
from shared.security import Creds


async def fetch(nats_url: str, creds: Creds | None = None, timeout_s: float = 5.0) -> ClusterStatus:
    import nats

    failures: list[Exception] = []

    async def keep(e: Exception) -> None:  # nats-py's default logs a traceback per attempt
        failures.append(e)

    try:
        # max_reconnect_attempts=0 means "no limit" to nats-py's first connect: 1 gives up after a retry.
        nc = await nats.connect(nats_url, connect_timeout=timeout_s, max_reconnect_attempts=1, allow_reconnect=False,
                                reconnect_time_wait=0.2, error_cb=keep, **connect_options(creds))
    except Exception as e:  # noqa: BLE001 - one clear line whatever nats-py raises
        cause = failures[-1] if failures else e
        raise MoebusError(f"cannot reach NATS at {nats_url}: {str(cause) or type(cause).__name__}") from None
    try:
        return decode(ClusterStatus, await request(nc, subjects.ROUTER_CLUSTER, b"{}", timeout_s))
    finally:
        await close(nc, 2.0)


def render(s: ClusterStatus) -> str:
    lines = [f"model {s.model}: {'ready' if s.ready else 'NOT READY'}, placement v{s.placement_version}"
             + (f" (v{s.pending_version} loading)" if s.pending_version else "") + f", replicas {s.replicas}"]
    lines.append(f"{'worker':<28} {'host':<20} {'capacity':>8} {'held':>5} {'tokens':>10} {'heartbeat':>9}  experts")
    for w in s.workers:
        flag = (" (draining)" if w.draining else "") + (" (flash-cache)" if w.backend == "flash" else "")
        lines.append(f"{w.worker:<28} {w.host[:20]:<20} {w.capacity:>8} {len(w.experts):>5} {w.tokens:>10} "
                     f"{w.last_heartbeat_s:>8.1f}s  {_ranges(w.experts)}{flag}")
    if not s.workers:
        lines.append("(no workers)")
    if s.layers:  # a tiered cluster places (layer, expert) pairs: the ids above are held in some layer
        total = sum(len(row) for row in s.layers)
        for w in s.workers:
            held = sum(w.worker in owners for row in s.layers for owners in row)
            lines.append(f"{w.worker}: {held} of the {total} (layer, expert) pairs")
    lines.append(f"unowned experts: {_ranges(s.unowned_experts) or 'none'}")
    if s.kv_budget_bytes:
        lines.append(f"KV cache: {_size(s.kv_bytes_in_use)} in use of a {_size(s.kv_budget_bytes)} budget; "
                     f"prompt cache {_size(s.prompt_cache_bytes)}")
    if s.expert_load and sum(s.expert_load):
        total = sum(s.expert_load)
        hot = sorted(range(len(s.expert_load)), key=lambda e: -s.expert_load[e])[:5]
        lines.append("busiest experts: " + ", ".join(f"{e} ({100 * s.expert_load[e] / total:.0f}%)" for e in hot))
    return "\n".join(lines)


def _size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = min(len(units) - 1, max(0, (n.bit_length() - 1) // 10))
    return f"{n} B" if i == 0 else f"{n / (1 << 10 * i):.1f} {units[i]}"


def _ranges(ids: list[int]) -> str:
    out: list[str] = []
    for e in sorted(ids):
        if out and out[-1].split("-")[-1] == str(e - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{e}"
        else:
            out.append(str(e))
    return ",".join(out)


async def show(nats_url: str, creds: Creds | None, as_json: bool, hint: str = "") -> int:
    """`hint`: added to an error, where the URL came from and what else to try."""
    try:
        s = await fetch(nats_url, creds)
    except MoebusError as e:
        print(f"moebus status: {e}{hint}", file=sys.stderr)
        return 2
    print(orjson.dumps(s.model_dump(), option=orjson.OPT_INDENT_2).decode() if as_json else render(s))
    return 0

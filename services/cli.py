"""The `moebus` command: `up` for the whole system, or one service per command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from shared.config import DEFAULT_NATS_URL, home, positive, setting
from shared.errors import MoebusError
from shared.logs import configure


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # ~1.5x faster bus round trips than the default loop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


def _model(flag: str | None) -> Path:
    raw = setting(flag, "MOEBUS_MODEL", "", str)
    if raw:
        return Path(raw).expanduser().resolve()
    from shared.demo import ensure_demo_model
    return ensure_demo_model(home())


def cmd_router(a: argparse.Namespace) -> None:
    from services.router.main import RouterConfig, serve
    cfg = RouterConfig(
        nats_url=setting(a.nats, "MOEBUS_NATS_URL", DEFAULT_NATS_URL, str), model=_model(a.model),
        expert_timeout_s=positive(setting(a.expert_timeout, "MOEBUS_EXPERT_TIMEOUT", 30.0, float), "expert timeout"),
    )
    _run(serve(cfg))


def cmd_worker(a: argparse.Namespace) -> None:
    from services.expert_worker.main import WorkerConfig, serve
    cfg = WorkerConfig(
        nats_url=setting(a.nats, "MOEBUS_NATS_URL", DEFAULT_NATS_URL, str), model=_model(a.model),
        rank=setting(a.rank, "MOEBUS_WORKER_RANK", 0, int), world=setting(a.world, "MOEBUS_WORKERS", 1, int),
    )
    _run(serve(cfg))


def cmd_gateway(a: argparse.Namespace) -> None:
    from services.gateway.main import GatewayConfig, serve
    cfg = GatewayConfig(
        nats_url=setting(a.nats, "MOEBUS_NATS_URL", DEFAULT_NATS_URL, str),
        host=setting(a.host, "MOEBUS_HOST", "127.0.0.1", str), port=setting(a.port, "MOEBUS_PORT", 8000, int),
    )
    _run(serve(cfg))


def cmd_up(a: argparse.Namespace) -> None:
    from services.launcher import UpConfig, up
    cfg = UpConfig(
        model=_model(a.model), workers=setting(a.workers, "MOEBUS_WORKERS", 2, int),
        host=setting(a.host, "MOEBUS_HOST", "127.0.0.1", str), port=setting(a.port, "MOEBUS_PORT", 8000, int),
        nats_url=setting(a.nats, "MOEBUS_NATS_URL", "", str), nats_port=setting(a.nats_port, "MOEBUS_NATS_PORT", 4222, int),
    )
    sys.exit(up(cfg))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moebus", description="Mixture-of-Experts serving, split by expert over NATS.")
    p.add_argument("--log-level", default=None, help="debug, info, warning (MOEBUS_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True)

    def service(name: str, fn, help: str, model: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--nats", help=f"NATS URL (MOEBUS_NATS_URL, default {DEFAULT_NATS_URL})")
        if model:
            sp.add_argument("--model", help="local Hugging Face MoE checkpoint dir (MOEBUS_MODEL; default: the demo model)")
        sp.set_defaults(fn=fn)
        return sp

    up = service("up", cmd_up, "the whole system: nats-server, router, workers, gateway")
    up.add_argument("--workers", type=int, help="expert-worker processes (MOEBUS_WORKERS, default 2)")
    up.add_argument("--host", help="gateway host (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up.add_argument("--nats-port", type=int, help="embedded nats-server port when --nats is not given (default 4222)")
    r = service("router", cmd_router, "the router: everything but the experts")
    r.add_argument("--expert-timeout", type=float, help="seconds to wait for a worker (default 30)")
    w = service("worker", cmd_worker, "an expert worker: experts e with e mod world == rank")
    w.add_argument("--rank", type=int, help="this worker's rank, 0..world-1 (MOEBUS_WORKER_RANK)")
    w.add_argument("--world", type=int, help="how many workers share the experts (MOEBUS_WORKERS)")
    g = service("gateway", cmd_gateway, "the HTTP API", model=False)
    g.add_argument("--host", help="listen host (MOEBUS_HOST, default 127.0.0.1)")
    g.add_argument("--port", type=int, help="listen port (MOEBUS_PORT, default 8000)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure(args.command, setting(args.log_level, "MOEBUS_LOG_LEVEL", "info", str))
    try:
        args.fn(args)
    except MoebusError as e:
        print(f"moebus {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The `moebus` command: `up` for the whole system, or one service per command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from shared.config import DEFAULT_NATS_URL, home, positive, setting
from shared.errors import ConfigError, MoebusError
from shared.logs import configure

# Flags `moebus up` passes on to the service that owns them.
ROUTER_FLAGS = ("expert_timeout", "max_running", "max_waiting", "max_prompt_tokens", "prefill_step", "micro_batches")
GATEWAY_FLAGS = ("api_key", "max_body_bytes", "request_timeout")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # ~1.5x faster bus round trips than the default loop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro)
    finally:
        if "mlx.core" in sys.modules:  # this thread's streams, before the interpreter goes
            sys.modules["mlx.core"].clear_streams()


def _model(flag: str | None) -> Path:
    raw = setting(flag, "MOEBUS_MODEL", "", str)
    if raw:
        return Path(raw).expanduser().resolve()
    from shared.demo import ensure_demo_model
    return ensure_demo_model(home())


def _nats(a: argparse.Namespace) -> str:
    return setting(a.nats, "MOEBUS_NATS_URL", DEFAULT_NATS_URL, str)


def cmd_router(a: argparse.Namespace) -> None:
    from services.router.engine import EngineLimits
    from services.router.main import RouterConfig, serve
    limits = EngineLimits(
        max_running=int(positive(setting(a.max_running, "MOEBUS_MAX_RUNNING", 16, int), "max running")),
        max_waiting=setting(a.max_waiting, "MOEBUS_MAX_WAITING", 64, int),
        prefill_step=int(positive(setting(a.prefill_step, "MOEBUS_PREFILL_STEP", 512, int), "prefill step")),
        micro_batches=setting(a.micro_batches, "MOEBUS_MICRO_BATCHES", 2, int),
    )
    if limits.micro_batches not in (1, 2):
        raise ConfigError(f"--micro-batches must be 1 or 2, not {limits.micro_batches}")
    cfg = RouterConfig(
        nats_url=_nats(a), model=_model(a.model), limits=limits,
        expert_timeout_s=positive(setting(a.expert_timeout, "MOEBUS_EXPERT_TIMEOUT", 30.0, float), "expert timeout"),
        max_prompt_tokens=int(positive(setting(a.max_prompt_tokens, "MOEBUS_MAX_PROMPT_TOKENS", 1 << 30, int),
                                       "max prompt tokens")),
    )
    _run(serve(cfg))


def cmd_worker(a: argparse.Namespace) -> None:
    from services.expert_worker.main import WorkerConfig, serve
    cfg = WorkerConfig(
        nats_url=_nats(a), model=_model(a.model),
        rank=setting(a.rank, "MOEBUS_WORKER_RANK", 0, int), world=setting(a.world, "MOEBUS_WORKERS", 1, int),
    )
    _run(serve(cfg))


def cmd_gateway(a: argparse.Namespace) -> None:
    from services.gateway.app import HttpSettings
    from services.gateway.main import GatewayConfig, serve
    keys = a.api_key or [k for k in setting(None, "MOEBUS_API_KEYS", "", str).split(",") if k]
    http = HttpSettings(api_keys=tuple(keys), max_body_bytes=int(positive(
        setting(a.max_body_bytes, "MOEBUS_MAX_BODY_BYTES", 4 << 20, int), "max body bytes")))
    cfg = GatewayConfig(
        nats_url=_nats(a), http=http,
        host=setting(a.host, "MOEBUS_HOST", "127.0.0.1", str), port=setting(a.port, "MOEBUS_PORT", 8000, int),
        deadline_s=positive(setting(a.request_timeout, "MOEBUS_REQUEST_TIMEOUT", 600.0, float), "request timeout"),
    )
    _run(serve(cfg))


def cmd_up(a: argparse.Namespace) -> None:
    from services.launcher import UpConfig, up
    cfg = UpConfig(
        model=_model(a.model), workers=setting(a.workers, "MOEBUS_WORKERS", 2, int),
        host=setting(a.host, "MOEBUS_HOST", "127.0.0.1", str), port=setting(a.port, "MOEBUS_PORT", 8000, int),
        nats_url=setting(a.nats, "MOEBUS_NATS_URL", "", str),
        nats_port=setting(a.nats_port, "MOEBUS_NATS_PORT", 4222, int),
        router_args=_forward(a, ROUTER_FLAGS), gateway_args=_forward(a, GATEWAY_FLAGS),
    )
    sys.exit(up(cfg))


def _forward(a: argparse.Namespace, names: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        value = getattr(a, name)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            out += [f"--{name.replace('_', '-')}", str(v)]
    return tuple(out)


def _router_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--expert-timeout", type=float, help="seconds to wait for a worker (MOEBUS_EXPERT_TIMEOUT, 30)")
    sp.add_argument("--max-running", type=int, help="sequences decoded together (MOEBUS_MAX_RUNNING, 16)")
    sp.add_argument("--max-waiting", type=int, help="queued requests beyond those; then 429 (MOEBUS_MAX_WAITING, 64)")
    sp.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (MOEBUS_MAX_PROMPT_TOKENS)")
    sp.add_argument("--prefill-step", type=int, help="prompt tokens per step (MOEBUS_PREFILL_STEP, 512)")
    sp.add_argument("--micro-batches", type=int, help="2: from 8 running sequences on, decode two halves that "
                                                      "overlap compute and bus waits; 1: one batch (MOEBUS_MICRO_BATCHES, 2)")


def _gateway_flags(sp: argparse.ArgumentParser, listen: bool) -> None:
    if listen:
        sp.add_argument("--host", help="listen host (MOEBUS_HOST, default 127.0.0.1)")
        sp.add_argument("--port", type=int, help="listen port (MOEBUS_PORT, default 8000)")
    sp.add_argument("--api-key", action="append", help="accepted API key, repeatable (MOEBUS_API_KEYS, comma-separated)")
    sp.add_argument("--max-body-bytes", type=int, help="largest request body (MOEBUS_MAX_BODY_BYTES, 4 MiB)")
    sp.add_argument("--request-timeout", type=float, help="deadline of one request in s (MOEBUS_REQUEST_TIMEOUT, 600)")


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
    up.add_argument("--nats-port", type=int, help="embedded nats-server port when --nats is not given (default 4222)")
    _router_flags(up)
    _gateway_flags(up, listen=True)
    _router_flags(service("router", cmd_router, "the router: everything but the experts"))
    w = service("worker", cmd_worker, "an expert worker: experts e with e mod world == rank")
    w.add_argument("--rank", type=int, help="this worker's rank, 0..world-1 (MOEBUS_WORKER_RANK)")
    w.add_argument("--world", type=int, help="how many workers share the experts (MOEBUS_WORKERS)")
    _gateway_flags(service("gateway", cmd_gateway, "the HTTP API", model=False), listen=True)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if argv is None and args.command in ("router", "worker", "up"):
        from shared.blas import reexec_with_fast_blas
        reexec_with_fast_blas("services.cli")  # before mlx is imported; children inherit the environment
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

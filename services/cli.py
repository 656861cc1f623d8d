"""The `moebus` command: `up` for the whole system, or one service per command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from services import defaults as D
from shared.blas import blas_threads
from shared.config import DEFAULT_NATS_URL, home, positive, setting
from shared.errors import ConfigError, MoebusError
from shared.logs import configure
from shared.security import DEFAULT_LISTEN, DEFAULT_WORKERS, NATS_CONTEXT, Creds, Role

# Flags `moebus up` passes on to the service that owns them.
ROUTER_FLAGS = ("share_model", "expert_timeout", "max_running", "max_waiting", "max_prompt_tokens", "prefill_step",
                "micro_batches", "replicas", "prompt_cache_bytes", "kv_budget", "speculate", "draft_max",
                "draft_model", "draft_replay", "speculate_max_running")
WORKER_FLAGS = ("memory_budget",)
GATEWAY_FLAGS = ("api_key", "max_body_bytes", "request_timeout", "header_timeout", "body_timeout", "keep_alive",
                 "max_connections")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    from shared.bus import new_loop

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(coro)
    finally:
        if "mlx.core" in sys.modules:  # this thread's streams, before the interpreter goes
            sys.modules["mlx.core"].clear_streams()


def _model(flag: str | None, weights: bool = True) -> Path:
    """--model (MOEBUS_MODEL): a directory, a Hugging Face repo id, or the demo model."""
    from shared.hub import resolve_model
    return resolve_model(setting(flag, "MOEBUS_MODEL", "", str), home(), weights=weights)


def _nats(a: argparse.Namespace) -> str:
    return setting(a.nats, "MOEBUS_NATS_URL", DEFAULT_NATS_URL, str)


def _insecure(a: argparse.Namespace) -> bool:
    return bool(a.insecure or setting(None, "MOEBUS_INSECURE", "", str) in ("1", "true", "yes"))


def _creds(a: argparse.Namespace, role: Role) -> Creds | None:
    """This service's NATS credentials: --creds, else this machine's cluster directory."""
    from shared.access import resolve
    given = setting(a.creds, "MOEBUS_CREDS", "", str)
    return resolve(_nats(a), Path(given).expanduser() if given else None, _insecure(a), role)


def cmd_router(a: argparse.Namespace) -> None:
    from services.router.engine import EngineLimits
    from services.router.main import RouterConfig, serve
    limits = EngineLimits(
        max_running=int(positive(setting(a.max_running, "MOEBUS_MAX_RUNNING", D.MAX_RUNNING, int), "max running")),
        max_waiting=setting(a.max_waiting, "MOEBUS_MAX_WAITING", D.MAX_WAITING, int),
        prefill_step=int(positive(setting(a.prefill_step, "MOEBUS_PREFILL_STEP", D.PREFILL_STEP, int), "prefill step")),
        micro_batches=setting(a.micro_batches, "MOEBUS_MICRO_BATCHES", D.MICRO_BATCHES, int),
        draft_max=setting(a.draft_max, "MOEBUS_DRAFT_MAX", D.DRAFT_MAX, int),
        speculate_max_running=int(positive(setting(a.speculate_max_running, "MOEBUS_SPECULATE_MAX_RUNNING",
                                                   D.SPECULATE_MAX_RUNNING, int), "speculate max running")),
    )
    replicas = setting(a.replicas, "MOEBUS_REPLICAS", D.REPLICAS, int)
    if not 1 <= replicas <= 16:
        raise ConfigError(f"--replicas must be 1..16, not {replicas}")
    if limits.micro_batches not in (1, 2):
        raise ConfigError(f"--micro-batches must be 1 or 2, not {limits.micro_batches}")
    _draft_max(limits.draft_max)
    speculation = _speculation(a, resolve=True)
    cfg = RouterConfig(
        nats_url=_nats(a), creds=_creds(a, "router"), model=_model(a.model), limits=limits, replicas=replicas,
        share_model=bool(a.share_model or setting(None, "MOEBUS_SHARE_MODEL", "", str) in ("1", "true", "yes")),
        expert_timeout_s=positive(setting(a.expert_timeout, "MOEBUS_EXPERT_TIMEOUT", D.EXPERT_TIMEOUT_S, float), "expert timeout"),
        max_prompt_tokens=int(positive(setting(a.max_prompt_tokens, "MOEBUS_MAX_PROMPT_TOKENS", D.MAX_PROMPT_TOKENS, int),
                                       "max prompt tokens")),
        prompt_cache_bytes=_prompt_cache_bytes(setting(a.prompt_cache_bytes, "MOEBUS_PROMPT_CACHE_BYTES", "", str)),
        kv_budget=parse_size(kv, "--kv-budget") if (kv := setting(a.kv_budget, "MOEBUS_KV_BUDGET", "", str)) else None,
        **speculation,
    )
    _run(serve(cfg))


def _draft_max(k: int) -> None:
    if not 0 <= k <= 16:
        raise ConfigError(f"--draft-max must be 0..16, not {k}")


def _speculation(a: argparse.Namespace, resolve: bool) -> dict[str, Any]:
    """--speculate lookup|off, --draft-model PATH|ORG/NAME, or --draft-replay FILE (measurement:
    a known acceptance rate); the router makes the drafter from them (services.router.drafters)."""
    speculate = setting(a.speculate, "MOEBUS_SPECULATE", "lookup", str)
    draft_model = setting(a.draft_model, "MOEBUS_DRAFT_MODEL", "", str)
    if speculate not in ("lookup", "off"):
        raise ConfigError(f"--speculate must be lookup or off, not {speculate!r}")
    if a.draft_replay:
        from services.router.drafters import Replay
        Replay.from_file(Path(a.draft_replay))  # refused now, not by the router
    if (draft_model or a.draft_replay) and a.speculate == "off":
        raise ConfigError("--speculate off and a drafter (--draft-model, --draft-replay) contradict each other")
    return {"speculate": speculate, "draft_replay": Path(a.draft_replay) if a.draft_replay else None,
            "draft_model": (_model(draft_model) if resolve else Path(draft_model)) if draft_model else None}


def _prompt_cache_bytes(given: str) -> int:
    """--prompt-cache-bytes: a size, 0 for none, or by default a share of the machine's memory."""
    if given:
        return parse_size(given) if given.strip() != "0" else 0
    return int(D.PROMPT_CACHE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cmd_worker(a: argparse.Namespace) -> None:
    from services.expert_worker.main import WorkerConfig, serve
    budget = setting(a.memory_budget, "MOEBUS_MEMORY_BUDGET", "", str)
    model = setting(a.model, "MOEBUS_MODEL", "", str)  # none: the experts come from the cluster's model store
    creds = _creds(a, "worker")
    cfg = WorkerConfig(nats_url=_nats(a), creds=creds, identity=creds.user if creds else "",
                       model=_model(model, weights=False) if model else None,  # its experts' shards: once placed
                       memory_budget=parse_size(budget) if budget else None)
    _run(serve(cfg))


def cmd_bundle(a: argparse.Namespace) -> None:
    from services.flash_cache.bundle import ensure_bundle, open_bundle
    path = ensure_bundle(_model(a.model), Path(a.out).expanduser().resolve() if a.out else None, home())
    m = open_bundle(path)
    print(f"moebus: bundle of {m.name} in {path}: {m.moe_layers} MoE layers x {m.num_experts} experts, "
          f"{m.expert_bytes} bytes per expert over its layers, {m.data_bytes} bytes")


def cmd_flash_cache(a: argparse.Namespace) -> None:
    from services.expert_worker.main import WorkerConfig, serve, spare_memory
    from services.flash_cache.bundle import ensure_bundle, open_bundle
    from services.flash_cache.store import FlashConfig, plan_pools
    model = setting(a.model, "MOEBUS_MODEL", "", str)
    if a.bundle and not model:
        bundle = Path(a.bundle).expanduser().resolve()
        open_bundle(bundle)
    else:  # the model's bundle, written on first use
        bundle = ensure_bundle(_model(model), Path(a.bundle).expanduser().resolve() if a.bundle else None, home())
    budget = setting(a.memory_budget, "MOEBUS_MEMORY_BUDGET", "", str)
    window = setting(a.window, "MOEBUS_WINDOW", D.WINDOW, int)
    if window < 0:
        raise ConfigError(f"--window must be 0 or more, not {window}")
    threads = int(positive(setting(a.read_threads, "MOEBUS_READ_THREADS", D.READ_THREADS, int), "--read-threads"))
    policy, mode = setting(a.policy, "MOEBUS_FLASH_POLICY", D.FLASH_POLICIES[0], str), setting(
        a.mode, "MOEBUS_FLASH_MODE", D.FLASH_MODES[0], str)
    trace = setting(a.trace, "MOEBUS_FLASH_TRACE", "", str)
    flash = FlashConfig(bundle=bundle, budget=parse_size(budget) if budget else spare_memory(), window=window,
                        policy=policy, mode=mode, read_threads=threads, trace=Path(trace) if trace else None,
                        prefetch=bool(a.prefetch or setting(None, "MOEBUS_FLASH_PREFETCH", "", str) in ("1", "true", "yes")))
    if flash.mode != "naive":
        plan_pools(open_bundle(bundle), flash.budget)  # refused now, not after joining
    creds = _creds(a, "worker")
    cfg = WorkerConfig(nats_url=_nats(a), creds=creds, identity=creds.user if creds else "", model=None,
                       flash=flash)
    _run(serve(cfg))


def parse_size(text: str, flag: str = "--memory-budget") -> int:
    """Bytes from "2G", "512M", "1.5GB", "8GiB" or a plain number."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give bytes, or a size such as 2G or 512M") from None
    if size <= 0:
        raise ConfigError(f"{flag} {text!r} must be positive")
    return size


def cmd_status(a: argparse.Namespace) -> None:
    from services.status import show
    from shared.access import resolve
    from shared.config import local_cluster
    url, given = setting(a.nats, "MOEBUS_NATS_URL", "", str), setting(a.creds, "MOEBUS_CREDS", "", str)
    local = None if url else local_cluster()  # no URL given: the cluster `moebus up` runs here
    if local is not None:
        url, given = local.nats_url, given or local.creds_dir
        hint = f" (the bus of `moebus up`, pid {local.pid}, recorded in {home()})"
    elif url:
        hint = ""
    else:
        url, hint = DEFAULT_NATS_URL, f" (no `moebus up` runs from {home()}: give --nats URL)"
    creds = resolve(url, Path(given).expanduser() if given else None, _insecure(a), "admin")
    sys.exit(asyncio.run(show(url, creds, a.json, hint)))


def _api_keys(a: argparse.Namespace) -> tuple[str, ...]:
    """--api-key, else MOEBUS_API_KEYS. An empty key is refused: it is what `--api-key "$UNSET"`
    gives, and the gateway would let in every request that carries no key."""
    if a.api_key is not None:
        if not all(k.strip() for k in a.api_key):
            raise ConfigError("--api-key is empty (an unset shell variable?): give the key itself")
        return tuple(a.api_key)
    raw = os.environ.get("MOEBUS_API_KEYS")
    keys = tuple(k.strip() for k in (raw or "").split(",") if k.strip())
    if raw is not None and not keys:
        raise ConfigError("MOEBUS_API_KEYS is set but empty: give it a key, or unset it")
    return keys


def _guard_open_gateway(a: argparse.Namespace, host: str, keys: tuple[str, ...], warn: bool = True) -> None:
    """A gateway other machines reach needs a key, unless told --insecure (then it warns)."""
    from shared.security import is_loopback
    if keys or is_loopback(f"[{host}]" if ":" in host else host):
        return
    if not _insecure(a):
        raise ConfigError(f"refusing to serve HTTP on {host} without an API key: anyone on the network could use it; "
                          "give --api-key KEY (or MOEBUS_API_KEYS), or --insecure to serve it open")
    if warn:
        print(f"moebus: WARNING: HTTP on {host} without an API key (--insecure): anyone on the network can use it",
              file=sys.stderr, flush=True)


def cmd_gateway(a: argparse.Namespace) -> None:
    from services.gateway.connections import ConnectionLimits
    from services.gateway.main import GatewayConfig, serve
    from services.gateway.middleware import HttpSettings
    keys, host = _api_keys(a), setting(a.host, "MOEBUS_HOST", D.HOST, str)
    _guard_open_gateway(a, host, keys)
    http = HttpSettings(api_keys=keys, max_body_bytes=int(positive(
        setting(a.max_body_bytes, "MOEBUS_MAX_BODY_BYTES", D.MAX_BODY_BYTES, int), "max body bytes")))
    connections = ConnectionLimits(
        header_timeout_s=positive(setting(a.header_timeout, "MOEBUS_HEADER_TIMEOUT", D.HEADER_TIMEOUT_S, float), "header timeout"),
        body_timeout_s=positive(setting(a.body_timeout, "MOEBUS_BODY_TIMEOUT", D.BODY_TIMEOUT_S, float), "body timeout"),
        keep_alive_s=positive(setting(a.keep_alive, "MOEBUS_KEEP_ALIVE", D.KEEP_ALIVE_S, float), "keep-alive"),
        max_connections=int(positive(setting(a.max_connections, "MOEBUS_MAX_CONNECTIONS", D.MAX_CONNECTIONS, int),
                                     "max connections")),
    )
    cfg = GatewayConfig(
        nats_url=_nats(a), creds=_creds(a, "gateway"), http=http, connections=connections,
        host=host, port=setting(a.port, "MOEBUS_PORT", D.PORT, int),
        deadline_s=positive(setting(a.request_timeout, "MOEBUS_REQUEST_TIMEOUT", D.REQUEST_TIMEOUT_S, float), "request timeout"),
    )
    _run(serve(cfg))


def cmd_up(a: argparse.Namespace) -> None:
    from services.launcher import UpConfig, up
    if a.secure and a.insecure:
        raise ConfigError("--secure and --insecure contradict each other")
    nats_url = setting(a.nats, "MOEBUS_NATS_URL", "", str)
    creds = setting(a.creds, "MOEBUS_CREDS", "", str)
    if creds and Path(creds).expanduser().is_file():
        raise ConfigError("moebus up --creds takes a cluster directory (each service takes its own file from it)")
    if nats_url:  # a server of its own: refuse it now rather than in every child
        _creds(a, "router")
    keys, host = _api_keys(a), setting(a.host, "MOEBUS_HOST", D.HOST, str)
    _guard_open_gateway(a, host, keys, warn=False)  # the gateway says it once it starts
    budget = setting(a.memory_budget, "MOEBUS_MEMORY_BUDGET", "", str)
    if kv := setting(a.kv_budget, "MOEBUS_KV_BUDGET", "", str):
        parse_size(kv, "--kv-budget")  # refused now, not by the router it starts
    _speculation(a, resolve=False)  # likewise
    _draft_max(setting(a.draft_max, "MOEBUS_DRAFT_MAX", D.DRAFT_MAX, int))
    cfg = UpConfig(
        creds_dir=str(Path(creds).expanduser().resolve()) if creds else "",
        insecure=_insecure(a), nats_host=setting(a.nats_host, "MOEBUS_NATS_HOST", D.NATS_HOST, str),
        model=_model(a.model), workers=setting(a.workers, "MOEBUS_WORKERS", D.WORKERS, int),
        workers_given=a.workers is not None or "MOEBUS_WORKERS" in os.environ,
        host=host, port=setting(a.port, "MOEBUS_PORT", D.PORT, int), auth=_shown_key(a, keys),
        nats_url=nats_url,
        nats_port=setting(a.nats_port, "MOEBUS_NATS_PORT", D.NATS_PORT, int),
        router_args=_forward(a, ROUTER_FLAGS), gateway_args=_forward(a, GATEWAY_FLAGS),
        worker_args=_forward(a, WORKER_FLAGS),
        memory_budget=parse_size(budget) if budget else None,
        window=setting(a.window, "MOEBUS_WINDOW", D.WINDOW, int),
        link=_link(a),
    )
    sys.exit(up(cfg))


def _shown_key(a: argparse.Namespace, keys: tuple[str, ...]) -> str:
    """The key the ready line's curl sends: one given on the command line as it is, one from
    the environment as the variable (a shell expands it; the log does not keep it)."""
    if not keys:
        return ""
    if a.api_key:
        return keys[0]
    return "$MOEBUS_API_KEYS" if len(keys) == 1 else "${MOEBUS_API_KEYS%%,*}"


def _link(a: argparse.Namespace) -> tuple[float, float] | None:
    """--link-delay-us / --link-gbps: the workers reach the bus through an emulated link."""
    if a.link_delay_us is None and a.link_gbps is None:
        return None
    delay, gbps = a.link_delay_us or 0.0, a.link_gbps or 0.0
    if delay < 0 or gbps < 0:
        raise ConfigError("--link-delay-us and --link-gbps cannot be negative")
    return delay, gbps


def _forward(a: argparse.Namespace, names: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        value = getattr(a, name)
        if isinstance(value, bool):  # a switch
            out += [f"--{name.replace('_', '-')}"] if value else []
            continue
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            out += [f"--{name.replace('_', '-')}", str(v)]
    return tuple(out)


def cmd_init_cluster(a: argparse.Namespace) -> None:
    from shared.access import (Tls, cluster_dir, configured_listen, init_cluster, local_url, parse_listen, tls_dir,
                               write_nats_context)
    from shared.security import is_loopback
    if bool(a.tls_cert) != bool(a.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = Tls(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca) if a.tls_ca else None) if a.tls_cert else None
    directory = Path(a.dir).expanduser() if a.dir else cluster_dir()
    a.listen = a.listen or configured_listen(directory) or DEFAULT_LISTEN
    made = init_cluster(directory, a.workers, tls, Path(a.store_dir) if a.store_dir else None, a.listen)
    secure, (host, port) = tls_dir(directory) is not None, parse_listen(a.listen)
    # The hint names the bus nats.conf describes: its scheme, its port, and whether others can reach it.
    lan = not is_loopback(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    up_flags = (" --nats-host 0.0.0.0" if lan else "") + (f" --nats-port {port}" if port != D.NATS_PORT else "")
    print(f"moebus: cluster credentials in {directory} ({len(made)} new); its nats.conf listens on {a.listen}")
    creds = "" if directory == cluster_dir() else f" --creds {directory}"  # `up` finds only its default
    print(f"  moebus up{up_flags}{creds}" + ("" if creds else "     # uses them by itself"))
    print(f"  nats-server -c {directory / 'nats.conf'}     # or the bus alone")
    reach = "" if lan else (f"  (the bus must listen beyond loopback first: --listen 0.0.0.0:{port}, "
                            "or moebus up --nats-host 0.0.0.0)")
    print(f"  on another machine: moebus worker --nats {'tls' if secure else 'nats'}://THIS-HOST:{port} "
          f"--creds worker-N.creds{reach}")
    if a.nats_context:
        path, ours = write_nats_context(directory, local_url(a.listen, secure), a.nats_context)
        if ours:
            print(f"  nats --context {a.nats_context} micro ls     # the NATS CLI as admin (context in {path})")
        else:
            print(f"moebus: a nats context {a.nats_context!r} that is not this cluster's is in {path}: left as it is "
                  "(--nats-context NAME writes another)", file=sys.stderr)


def _router_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--expert-timeout", type=float, help=f"seconds to wait for a worker (MOEBUS_EXPERT_TIMEOUT, {D.EXPERT_TIMEOUT_S:g})")
    sp.add_argument("--max-running", type=int, help=f"sequences decoded together (MOEBUS_MAX_RUNNING, {D.MAX_RUNNING})")
    sp.add_argument("--max-waiting", type=int, help=f"queued requests beyond those; then 429 (MOEBUS_MAX_WAITING, {D.MAX_WAITING})")
    sp.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (MOEBUS_MAX_PROMPT_TOKENS)")
    sp.add_argument("--prompt-cache-bytes", help="KV caches of finished prompts kept for reuse by later requests, "
                                                 "e.g. 2G; 0 turns reuse off (MOEBUS_PROMPT_CACHE_BYTES; default: "
                                                 f"{D.PROMPT_CACHE_SHARE * 100:.0f}%% of the machine's memory)")
    sp.add_argument("--kv-budget", help="bytes for running sequences' KV caches, e.g. 8GiB: a request starts when "
                                        "its prompt + max_tokens fit, and waits meanwhile (MOEBUS_KV_BUDGET; default: "
                                        f"{D.KV_SHARE * 100:.0f}%% of the machine's memory less the router's weights)")
    sp.add_argument("--prefill-step", type=int, help=f"prompt tokens per step (MOEBUS_PREFILL_STEP, {D.PREFILL_STEP})")
    sp.add_argument("--micro-batches", type=int, help="2: from 8 running sequences on, decode two halves that "
                                                      f"overlap compute and bus waits; 1: one batch (MOEBUS_MICRO_BATCHES, {D.MICRO_BATCHES})")
    sp.add_argument("--speculate", help="draft tokens and verify several per round trip: lookup (the prompt and "
                                        "the text so far) or off (MOEBUS_SPECULATE, lookup)")
    sp.add_argument("--draft-max", type=int, help="drafted tokens a sequence verifies per step, at most; 0: none "
                                                  f"(MOEBUS_DRAFT_MAX, {D.DRAFT_MAX})")
    sp.add_argument("--speculate-max-running", type=int, help="a micro-batch of more sequences does not draft: "
                                                              "its batch fills each round trip already "
                                                              f"(MOEBUS_SPECULATE_MAX_RUNNING, {D.SPECULATE_MAX_RUNNING})")
    sp.add_argument("--draft-model", help="draft with a small model of the same tokenizer, on the router: a "
                                          "directory or ORG/NAME[@REVISION] (MOEBUS_DRAFT_MODEL)")
    sp.add_argument("--draft-replay", help=argparse.SUPPRESS)  # benchmarks: a drafter of known acceptance
    sp.add_argument("--share-model", action="store_true", default=None,
                    help="put the experts in NATS (once), for workers started without --model (MOEBUS_SHARE_MODEL=1)")
    sp.add_argument("--replicas", type=int, help="owners of every expert where capacity allows: with 2, a worker "
                                                 f"lost is taken over at once (MOEBUS_REPLICAS, {D.REPLICAS})")


def _worker_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--memory-budget", help="memory for experts, e.g. 8G (MOEBUS_MEMORY_BUDGET; default: 80%% of "
                                            "what the machine has free)")


def _flash_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--window", type=int, help="experts used by the last K tokens of a layer stay in memory "
                                               f"(MOEBUS_WINDOW, default {D.WINDOW})")


def _gateway_flags(sp: argparse.ArgumentParser, listen: bool) -> None:
    if listen:
        sp.add_argument("--host", help=f"listen host (MOEBUS_HOST, default {D.HOST})")
        sp.add_argument("--port", type=int, help=f"listen port (MOEBUS_PORT, default {D.PORT})")
    sp.add_argument("--api-key", action="append", help="accepted API key, repeatable (MOEBUS_API_KEYS, comma-"
                                                       "separated); needed for a --host other machines reach, unless "
                                                       "--insecure")
    sp.add_argument("--max-body-bytes", type=int, help=f"largest request body in bytes (MOEBUS_MAX_BODY_BYTES, {D.MAX_BODY_BYTES})")
    sp.add_argument("--request-timeout", type=float, help=f"deadline of one request in s (MOEBUS_REQUEST_TIMEOUT, {D.REQUEST_TIMEOUT_S:g})")
    sp.add_argument("--header-timeout", type=float,
                    help=f"s to receive a request's headers, then the connection closes (MOEBUS_HEADER_TIMEOUT, {D.HEADER_TIMEOUT_S:g})")
    sp.add_argument("--body-timeout", type=float,
                    help=f"s to receive a request's whole body, then 408 (MOEBUS_BODY_TIMEOUT, {D.BODY_TIMEOUT_S:g})")
    sp.add_argument("--keep-alive", type=float, help=f"s an idle connection stays open (MOEBUS_KEEP_ALIVE, {D.KEEP_ALIVE_S:g})")
    sp.add_argument("--max-connections", type=int, help="open connections at most, also kept below the file "
                                                         f"descriptor limit (MOEBUS_MAX_CONNECTIONS, {D.MAX_CONNECTIONS})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moebus", description="Mixture-of-Experts serving, split by expert over NATS.")
    p.add_argument("--log-level", default=None, help="debug, info, warning (MOEBUS_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True)

    def service(name: str, fn, help: str, model: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--nats", help=f"NATS URL (MOEBUS_NATS_URL, default {DEFAULT_NATS_URL})")
        sp.add_argument("--creds", help="credentials file from `moebus init-cluster`, or its directory (MOEBUS_CREDS; "
                                        "default: this machine's cluster, when it has one)")
        sp.add_argument("--insecure", action="store_true", help="allow an open bus without credentials "
                                                                "(MOEBUS_INSECURE=1)")
        if model:
            sp.add_argument("--model", help="a Hugging Face MoE model: ORG/NAME[@REVISION] (downloaded once into the "
                                            "Hugging Face cache) or a local directory (MOEBUS_MODEL; default: the "
                                            "demo model; a worker: only the shards of the experts it holds, or "
                                            "without --model, those experts from the router's copy over NATS)")
        sp.set_defaults(fn=fn)
        return sp

    up = service("up", cmd_up, "the whole system: nats-server, router, workers, gateway")
    up.add_argument("--workers", type=int, help=f"expert-worker processes (MOEBUS_WORKERS, default {D.WORKERS}); "
                                                "with a flash-cache, DRAM workers beside it, given only (0: none)")
    up.add_argument("--nats-port", type=int, help=f"embedded nats-server port when --nats is not given (default {D.NATS_PORT})")
    up.add_argument("--nats-host", help="address the embedded nats-server listens on: 0.0.0.0 lets other machines "
                                        f"join (MOEBUS_NATS_HOST, default {D.NATS_HOST})")
    up.add_argument("--secure", action="store_true", help="the default: per-service NATS users and permissions")
    _router_flags(up)
    _worker_flags(up)
    _flash_flags(up)
    up.add_argument("--link-delay-us", type=float, help="emulate a network between the workers and the bus: one-way "
                                                        "delay in µs (through `moebus perfmodel proxy`)")
    up.add_argument("--link-gbps", type=float, help="... and its bandwidth in Gbit/s (default unlimited)")
    _gateway_flags(up, listen=True)
    init = sub.add_parser("init-cluster", help="credentials and nats-server config for a secured cluster")
    init.add_argument("--dir", help="where to write them (default: $MOEBUS_HOME/cluster, where services look)")
    init.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="worker identities, one per worker "
                                                                            f"process (default {DEFAULT_WORKERS})")
    init.add_argument("--tls-cert", help="server certificate (PEM): clients then speak TLS")
    init.add_argument("--tls-key", help="its private key (PEM)")
    init.add_argument("--tls-ca", help="the CA that signed it (default: the certificate is self-signed)")
    init.add_argument("--store-dir", help="JetStream storage of the nats.conf written (default: DIR/jetstream)")
    init.add_argument("--listen", help=f"listen address of the nats.conf written (default: the one it has, else "
                      f"{DEFAULT_LISTEN}, as `moebus up`; 0.0.0.0:4222 lets other machines in)")
    init.add_argument("--nats-context", default=NATS_CONTEXT, help="the `nats` CLI context written for the admin user "
                                                                    f"(default {NATS_CONTEXT}; '' writes none)")
    init.set_defaults(fn=cmd_init_cluster)
    _router_flags(service("router", cmd_router, "the router: everything but the experts"))
    _worker_flags(service("worker", cmd_worker, "an expert worker: joins the cluster and holds the experts placed on it"))
    st = service("status", cmd_status, "workers, placement and expert load of a running cluster", model=False)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _gateway_flags(service("gateway", cmd_gateway, "the HTTP API", model=False), listen=True)
    fc = service("flash-cache", cmd_flash_cache, "experts served from SSD through a fixed memory budget")
    fc.add_argument("--bundle", help="the bundle to serve (default: the model's, written on first use under "
                                     "$MOEBUS_HOME/bundles)")
    fc.add_argument("--memory-budget", help="memory for expert slots, e.g. 512MiB (MOEBUS_MEMORY_BUDGET; default: "
                                            "80%% of what the machine has free)")
    _flash_flags(fc)
    fc.add_argument("--policy", choices=D.FLASH_POLICIES, help="eviction outside the window (MOEBUS_FLASH_POLICY, default lfu)")
    fc.add_argument("--mode", choices=D.FLASH_MODES, help="cache (default); on-demand and naive read every expert anew, the "
                                                     "benchmark's baselines (MOEBUS_FLASH_MODE)")
    fc.add_argument("--read-threads", type=int, help=f"parallel reads (MOEBUS_READ_THREADS, default {D.READ_THREADS})")
    fc.add_argument("--prefetch", action="store_true", help="after each layer, read ahead the experts the next "
                                                            "layer's gate picks (MOEBUS_FLASH_PREFETCH=1)")
    fc.add_argument("--trace", help="write each layer request's experts to this JSON file at exit: the routing "
                                    "trace the benchmark replays (MOEBUS_FLASH_TRACE)")
    bd = sub.add_parser("bundle", help="write a model's experts as a bundle for the flash-cache")
    bd.add_argument("--model", help="ORG/NAME[@REVISION] of the Hugging Face Hub, or a local directory (MOEBUS_MODEL; "
                                    "default: the demo model)")
    bd.add_argument("--out", help="bundle directory (default: under $MOEBUS_HOME/bundles)")
    bd.set_defaults(fn=cmd_bundle)
    from services.perfmodel.cli import add_parser
    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    mlx_work = args.command in ("router", "worker", "up", "flash-cache", "bundle") or \
        (args.command == "perfmodel" and args.perfmodel == "calibrate")  # predict, cost, proxy: no MLX
    if argv is None and mlx_work:
        from shared.blas import reexec_with_fast_blas
        if args.command == "perfmodel":  # each service's BLAS threads under `up`
            os.environ.setdefault("OPENBLAS_NUM_THREADS", str(blas_threads(os.cpu_count() or 1, 2)))
        reexec_with_fast_blas("services.cli")  # before mlx is imported; children inherit the environment
    configure(args.command, setting(args.log_level, "MOEBUS_LOG_LEVEL", "info", str))
    try:
        args.fn(args)
    except MoebusError as e:
        print(f"moebus {args.command}: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_status", 2))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

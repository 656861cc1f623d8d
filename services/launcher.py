"""`moebus up`: nats-server, the router, N workers and the gateway as child processes."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services import defaults
from shared.access import cluster_dir, ensure_users, server_block, tls_dir
from shared.blas import blas_threads
from shared.config import LocalCluster, forget_cluster, record_cluster
from shared.errors import ConfigError
from shared.hub import model_name
from shared.natsd import bind_error, bus_child, free_port, start_nats
from shared.security import DEFAULT_WORKERS, is_loopback


@dataclass(frozen=True)
class UpConfig:
    model: Path
    workers: int = defaults.WORKERS
    host: str = defaults.HOST
    port: int = defaults.PORT
    nats_url: str = ""  # empty: start an embedded nats-server on nats_port
    nats_port: int = defaults.NATS_PORT
    nats_host: str = defaults.NATS_HOST
    insecure: bool = False  # an open bus: no users, no permissions
    creds_dir: str = ""  # a cluster directory the services take their credentials from; "": this machine's
    ready_timeout_s: float = 300.0
    router_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    memory_budget: int | None = None  # bytes for experts per worker; the whole model's over it: a flash-cache
    # With a flash-cache: `workers` DRAM workers beside it (the hottest experts) when --workers was
    # given, none otherwise (the flash-cache alone on a memory-limited machine).
    workers_given: bool = False
    window: int = defaults.WINDOW
    link: tuple[float, float] | None = None  # (one-way delay µs, Gbit/s): workers reach the bus through the link proxy
    auth: str = ""  # the API key the ready line's example sends: the key, or a shell variable holding it


def check_model(path: Path) -> int:
    """Fail before starting anything if this is not a MoE model moebus can serve; the bytes its
    experts take."""
    from services.expert_worker.experts import expert_bytes
    per_expert, info = expert_bytes(path)
    print(f"moebus: {info.name} ({info.model_type}, {info.moe_layers} MoE layers x {info.num_experts} experts)", flush=True)
    return per_expert * info.num_experts


def use_flash(experts_bytes: int, budget: int | None) -> bool:
    """Serve from SSD when the experts do not fit the memory budget given."""
    return budget is not None and experts_bytes > budget


def restart_delay(failures: list[float], now: float, window_s: float = 60.0, give_up_after: int = 5) -> float | None:
    """Seconds to wait before restarting a child that failed at the times in `failures` (this
    one included), or None to give up: backoff doubles from 0.5 s, and a child failing
    `give_up_after` times within `window_s` is not coming back by itself."""
    recent = [t for t in failures if now - t <= window_s]
    if len(recent) >= give_up_after:
        return None
    return min(0.5 * 2 ** (len(recent) - 1), 8.0)


@dataclass
class Child:
    """One supervised process: restarted with backoff when it exits unasked."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    failures: list[float] = field(default_factory=list)
    restart_at: float | None = None

    def check(self, now: float) -> bool:
        """Restart if due; False when the child keeps failing and moebus should stop."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            self.failures.append(now)
            delay = restart_delay(self.failures, now)
            if delay is None:
                say(f"{self.name} exited with code {code} ({len(self.failures)} failures in a minute); stopping")
                return False
            say(f"{self.name} exited with code {code}; restarting it in {delay:g}s")
            self.restart_at = now + delay
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            try:
                self.proc = self.start()
            except ConfigError as e:
                say(f"{self.name} cannot be restarted: {e}; stopping")
                return False
        return True


def start_link(base: list[str], upstream: str, port: int, link: tuple[float, float],
               stdout: int | None = None) -> subprocess.Popen:
    """The link proxy, once it accepts connections (the workers connect through it at once)."""
    proc = subprocess.Popen([*base, "perfmodel", "proxy", "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
                             "--delay-us", str(link[0]), "--gbps", str(link[1])], preexec_fn=bus_child,
                            stdout=stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ConfigError(f"the link proxy did not start on 127.0.0.1:{port}")


def check_ports(cfg: UpConfig) -> None:
    """Refuse a port already taken before starting anything: a second `moebus up` would find the
    first one's bus and gateway answering, say it is ready, then fail on its own."""
    wanted = [(cfg.host, cfg.port, "--port")]
    if not cfg.nats_url:
        if cfg.nats_port == cfg.port:
            raise ConfigError(f"--port and --nats-port are both {cfg.port}: give them different ports")
        wanted.append((cfg.nats_host, cfg.nats_port, "--nats-port"))
    for host, port, flag in wanted:
        problem = bind_error(host, port)
        if problem:
            raise ConfigError(f"cannot listen on {host}:{port} ({problem}; another moebus?): choose another port "
                              f"with {flag}")


def say(line: str) -> None:
    print(f"moebus: {line}", file=sys.stderr, flush=True)


def up(cfg: UpConfig) -> int:
    experts_bytes = check_model(cfg.model)
    flash = None
    from_ssd = use_flash(experts_bytes, cfg.memory_budget)
    if cfg.workers < (0 if from_ssd else 1):
        raise ConfigError(f"--workers must be at least {0 if from_ssd else 1}, got {cfg.workers}")
    if from_ssd:
        from services.flash_cache.bundle import ensure_bundle, open_bundle
        from services.flash_cache.store import plan_pools
        from shared.config import home
        flash = ensure_bundle(cfg.model, None, home())
        plan_pools(open_bundle(flash), cfg.memory_budget)  # too small for one token: refused now
        print(f"moebus: the experts ({experts_bytes} bytes) exceed --memory-budget {cfg.memory_budget}: serving them "
              f"from SSD through the flash-cache (bundle {flash}, window {cfg.window})"
              + (f", {cfg.workers} DRAM worker(s) beside it holding the hottest" if cfg.workers_given and cfg.workers
                 else ""), flush=True)
    check_ports(cfg)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    tmp = tempfile.TemporaryDirectory(prefix="moebus-nats-")
    try:
        url = cfg.nats_url
        if not url:  # the embedded server restarts on the same port and store: services reconnect
            extra, tls = _secure_nats(cfg)
            nats = Child("nats-server", lambda: start_nats(cfg.nats_port, Path(tmp.name), cfg.nats_host, extra=extra))
            nats.proc = nats.start()
            children.append(nats)
            local = "127.0.0.1" if cfg.nats_host in ("0.0.0.0", "::", "127.0.0.1") else cfg.nats_host
            url = f"{'tls' if tls else 'nats'}://{local}:{cfg.nats_port}"
            how = "open to anyone who reaches it (--insecure)" if cfg.insecure else f"users in {cfg.creds_dir or cluster_dir()}"
            print(f"moebus: nats-server (JetStream) on {cfg.nats_host}:{cfg.nats_port}, {how}", flush=True)
        base = [sys.executable, "-m", "services.cli"]
        bus = ["--nats", url, *(["--insecure"] if cfg.insecure else []),
               *(["--creds", cfg.creds_dir] if cfg.creds_dir else [])]
        worker_bus = bus
        if cfg.link is not None:  # an emulated network between the workers and the bus
            link_port = free_port()
            upstream = url.split("//", 1)[1]
            link = Child("link", lambda: start_link(base, upstream, link_port, cfg.link))
            link.proc = link.start()
            children.append(link)
            worker_bus = ["--nats", f"{url.split('//')[0]}//127.0.0.1:{link_port}", *bus[2:]]
        threads = str(blas_threads(os.cpu_count() or 1, cfg.workers + 1))  # the router and the workers
        env = {"OPENBLAS_NUM_THREADS": threads, **os.environ, "MOEBUS_PARENT_PID": str(os.getpid())}
        commands = [("router", [*base, "router", *bus, "--model", str(cfg.model), *cfg.router_args])]
        if flash is not None:
            commands.append(("flash-cache", [*base, "flash-cache", *worker_bus, "--bundle", str(flash), "--memory-budget",
                                             str(cfg.memory_budget), "--window", str(cfg.window)]))
            # DRAM workers beside it take the hottest experts off it (placed by load)
            commands += [(f"worker {i}", [*base, "worker", *worker_bus, "--model", str(cfg.model), "--memory-budget",
                                          str(cfg.memory_budget), *cfg.worker_args])
                         for i in range(cfg.workers if cfg.workers_given else 0)]
        else:
            commands += [(f"worker {i}", [*base, "worker", *worker_bus, "--model", str(cfg.model), *cfg.worker_args])
                         for i in range(cfg.workers)]
        commands.append(("gateway", [*base, "gateway", *bus, "--host", cfg.host, "--port", str(cfg.port),
                                     *cfg.gateway_args]))
        http, remote = reachable(cfg.host, cfg.port)
        record_cluster(LocalCluster(os.getpid(), url, http, cfg.creds_dir))  # for `moebus status`
        for name, cmd in commands:
            child = Child(name, lambda cmd=cmd: subprocess.Popen(cmd, env=env))
            child.proc = child.start()
            children.append(child)
        announced = False
        deadline = time.monotonic() + cfg.ready_timeout_s
        while not stopping:
            now = time.monotonic()
            if not all(child.check(now) for child in children):
                return 1
            if not announced:
                if healthy(http):
                    announced = True
                    print(banner(http, remote, model_name(cfg.model), cfg.auth), flush=True)
                elif now > deadline:
                    say(f"not ready after {cfg.ready_timeout_s:g}s; stopping")
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        bus = ("nats-server", "link")  # the services first, while they can still drain over it
        _stop_all([(c.name, c.proc) for c in children if c.proc is not None and c.name not in bus])
        _stop_all([(c.name, c.proc) for c in children if c.proc is not None and c.name in bus])
        forget_cluster(os.getpid())
        tmp.cleanup()


def _secure_nats(cfg: UpConfig) -> tuple[str, bool]:
    """The users part of the embedded server's config (this machine's cluster, made if
    missing), and whether it speaks TLS."""
    if cfg.insecure:
        if not is_loopback(cfg.nats_host):
            say(f"WARNING: NATS on {cfg.nats_host} without credentials: anyone on the network reads every prompt")
        return "", False
    directory = Path(cfg.creds_dir) if cfg.creds_dir else cluster_dir()
    ensure_users(directory, max(DEFAULT_WORKERS, cfg.workers))
    tls = tls_dir(directory) is not None
    if not tls and not is_loopback(cfg.nats_host):
        say(f"WARNING: NATS on {cfg.nats_host} without TLS: passwords, prompts and hidden states cross the "
            "network in clear (README: TLS)")
    return server_block(directory), tls


def healthy(url: str) -> bool:
    """Whether `url`/health answers 200 (moebus is ready), asked once with a 1 s timeout."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def reachable(host: str, port: int) -> tuple[str, str]:
    """The gateway's URL from this machine, and from others when it listens on every address
    ("" when it does not: its own address serves both)."""
    if host in ("0.0.0.0", "::", ""):
        local = "[::1]" if host == "::" else "127.0.0.1"  # asyncio binds "::" to IPv6 only
        return f"http://{local}:{port}", f"http://{socket.gethostname()}:{port}"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}", ""


def banner(url: str, remote: str, model: str, auth: str = "") -> str:
    """The ready line, with a curl that works as copied: the key in it when one is needed (in
    double quotes when it is a shell variable, for the shell to expand)."""
    header = f"Authorization: Bearer {auth}"
    key = "" if not auth else f'-H "{header}"' if auth.startswith("$") else f"-H {shlex.quote(header)}"
    key = f"\n    {key} \\" if key else ""
    others = f"\n  from other machines: {remote}  (this machine's name: it listens on every address)" if remote else ""
    return f"""
moebus is ready: {url}  (model "{model}"){others}
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\{key}
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "the river"}}], "max_tokens": 16}}'
Ctrl-C stops everything.
"""


def _stop_all(procs: list[tuple[str, subprocess.Popen]], grace_s: float = 10.0) -> None:
    running = [(name, p) for name, p in procs if p.poll() is None]
    for _, p in running:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for name, p in running:
        try:
            code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            print(f"moebus: {name} did not stop within {grace_s:g}s and was killed", file=sys.stderr, flush=True)
            continue
        if code not in (0, -signal.SIGTERM):
            print(f"moebus: {name} exited with {code} while stopping", file=sys.stderr, flush=True)

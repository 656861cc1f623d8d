"""expert-worker service: `moebus worker --nats URL --model PATH --rank R --world W`."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request

from services.expert_worker.experts import LocalExperts, load_experts
from shared import subjects
from shared.bus import close, connect, stop_event, stop_service, ticks
from shared.errors import ConfigError, WireError
from shared.logs import get_logger
from shared.messages import Discover, WorkerAnnounce, decode, encode
from shared.mlx_thread import MLXThread
from shared.model import ModelInfo, fingerprint
from shared.placement import cluster_conflict, experts_of, worker_ids
from shared.wire import DTYPES, decode_request, reply_size

VERSION = "0.1.0"
log = get_logger("worker")


@dataclass(frozen=True)
class WorkerConfig:
    nats_url: str
    model: Path
    rank: int
    world: int
    heartbeat_s: float = 1.0
    peers_window_s: float = 1.0  # how long to listen for the live workers before joining

    @property
    def worker_id(self) -> str:
        return worker_ids(self.world)[self.rank]


class Worker:
    def __init__(self, cfg: WorkerConfig, experts: LocalExperts, info: ModelInfo, mlx: MLXThread,
                 max_payload: int) -> None:
        self.cfg = cfg
        self.experts = experts
        self.info = info
        self.mlx = mlx
        self.max_payload = max_payload
        # Unique to this process: a second process with the same id never shares its subject,
        # and the router tells a restarted worker from the one it replaced.
        self.subject = subjects.experts_subject(f"{cfg.worker_id}-{uuid.uuid4().hex[:8]}")
        self.pending: set[asyncio.Task] = set()

    async def handle(self, req: Request) -> None:
        # Decode here (cheap, and a bad message is answered at once); compute on the MLX
        # thread and return, so the next request of this subject is not held up.
        try:
            expert_req = decode_request(req.data)
        except WireError as e:
            await req.respond_error("400", str(e))
            return
        size = reply_size(len(expert_req.experts), expert_req.x.shape[1], DTYPES[expert_req.dtype].itemsize)
        if size > self.max_payload:  # refused before any compute: the reply could not be sent
            await req.respond_error("413", f"the reply would be {size} bytes, over the server's maximum message "
                                           f"of {self.max_payload}: send fewer pairs per request")
            return
        work = asyncio.wrap_future(self.mlx.submit(self.experts.compute, expert_req))  # queued now, not when awaited
        task = asyncio.create_task(self._answer(req, work))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, req: Request, work: asyncio.Future) -> None:
        try:
            await req.respond(await work)
        except WireError as e:
            await req.respond_error("400", str(e))
        except Exception as e:  # noqa: BLE001 - a bad request must never kill the worker
            log.exception("expert compute failed")
            await req.respond_error("500", f"expert compute failed: {e!r}")

    def announcement(self, leaving: bool = False) -> bytes:
        return encode(WorkerAnnounce(
            worker=self.cfg.worker_id, subject=self.subject, model=self.info.fingerprint,
            layers=self.info.moe_layers, experts=self.experts.held, world=self.cfg.world, leaving=leaving,
            memory=mlx_memory(),
        ))


def mlx_memory() -> dict[str, int]:
    """MLX's allocator counters (plain reads, no MLX work): flat in steady state because the
    allocator reuses its buffers for requests of sizes it has seen."""
    return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}


async def check_peers(nc: Client, cfg: WorkerConfig) -> None:
    """Refuse to join a cluster this worker disagrees with (ConfigError), before loading."""
    model = fingerprint(cfg.model)
    peers: set[tuple[str, int]] = set()

    async def on_announce(msg: Msg) -> None:
        try:
            a = decode(WorkerAnnounce, msg.data)
        except WireError:
            return
        if a.model == model and not a.leaving:
            peers.add((a.worker, a.world))

    sub = await nc.subscribe(subjects.WORKERS_ANNOUNCE, cb=on_announce)
    await nc.publish(subjects.WORKERS_DISCOVER, encode(Discover(router=cfg.worker_id)))
    await asyncio.sleep(cfg.peers_window_s)
    await sub.unsubscribe()
    why = cluster_conflict(cfg.worker_id, cfg.world, peers)
    if why is not None:
        raise ConfigError(why)


async def serve(cfg: WorkerConfig) -> None:
    if not 0 <= cfg.rank < cfg.world:
        raise ConfigError(f"--rank {cfg.rank} is outside --world {cfg.world}")
    stop = stop_event()
    mlx = MLXThread()
    try:
        async with AsyncExitStack() as stack:
            me, world = cfg.worker_id, worker_ids(cfg.world)
            nc = await connect(cfg.nats_url, name=f"moebus-worker-{me}")
            stack.push_async_callback(close, nc)
            await check_peers(nc, cfg)
            experts, info = await mlx.run(load_experts, cfg.model, lambda n: experts_of(n, world, me))
            if not experts.held:
                raise ConfigError(f"worker {me} holds no experts: --world {cfg.world} exceeds {info.num_experts} experts")
            worker = Worker(cfg, experts, info, mlx, nc.max_payload)
            svc = await add_service(
                nc, name=subjects.SERVICE_WORKER, version=VERSION,
                description="moebus expert worker: a share of the experts of every MoE layer",
                metadata={"worker": me, "model": info.name, "experts": ",".join(map(str, experts.held))},
            )
            await svc.add_endpoint(name="experts", subject=worker.subject, handler=worker.handle)

            async def on_discover(_: Msg) -> None:
                await nc.publish(subjects.WORKERS_ANNOUNCE, worker.announcement())

            await nc.subscribe(subjects.WORKERS_DISCOVER, cb=on_discover)
            log.info("worker ready", worker=me, experts=experts.held, layers=info.moe_layers, subject=worker.subject)
            async for _ in ticks(stop, cfg.heartbeat_s):
                await nc.publish(subjects.WORKERS_ANNOUNCE, worker.announcement())
            try:  # every step bounded (Ctrl-C may have stopped nats-server first); close() flushes
                await nc.publish(subjects.WORKERS_ANNOUNCE, worker.announcement(leaving=True))
                await stop_service(svc)  # no new requests; answer those already taken
                if worker.pending:
                    await asyncio.wait(list(worker.pending), timeout=10)
            except Exception as e:  # noqa: BLE001 - the server may have gone first
                log.warning("stopping without the bus", error=repr(e))
    finally:
        mlx.stop()

"""What the router loads: the model less its experts, the tokenizer, the engine, the grammar
compiler; and how a request becomes token ids and a grammar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
from mlx_lm.utils import load_tokenizer

from services.router.bus_experts import install
from services.router.constrain import GrammarProcessor, Grammars
from services.router.engine import Engine, Publish
from services.router.exchange import ExpertClient
from services.router.drafters import make_drafter
from services.router.kv import KVBudget, default_budget, kv_size, machine_memory, weights_bytes
from services.router.metrics import ExchangeStats
from services.router.prompt_cache import PromptCache
from services.router.prompts import PromptEncoder
from services.router.registry import Table, WorkerRegistry
from shared.errors import BadRequest
from shared.logs import get_logger
from shared.messages import GenerateRequest
from shared.model import ModelInfo, describe, find_experts, load_lazy

if TYPE_CHECKING:
    from services.router.main import RouterConfig

log = get_logger("router")


@dataclass
class Loaded:
    engine: Engine
    prompts: PromptEncoder
    info: ModelInfo
    registry: WorkerRegistry
    grammars: Grammars | None  # None: a tokenizer llguidance cannot read (not a fast tokenizer)

    def prepare(self, g: GenerateRequest) -> tuple[list[int], GrammarProcessor | None]:
        """The prompt's token ids and the answer's grammar; BadRequest for either (a worker thread)."""
        ids = self.prompts.encode(g)
        if self.grammars is not None:
            return ids, self.grammars.compile(g)
        if g.tool_choice in ("required", "function") or (g.response_format and g.response_format.type != "text"):
            raise BadRequest("this model's tokenizer cannot be used for constrained output (not a fast "
                             "tokenizer, or one whose tokens cannot spell JSON)",
                             "tool_choice" if g.tool_choice in ("required", "function") else "response_format")
        return ids, None


def load_router_model(cfg: RouterConfig, client: ExpertClient, publish: Publish) -> Loaded:
    """Everything but the experts: their modules are swapped before any weight is read."""
    model, config = load_lazy(cfg.model)
    slots = find_experts(model)
    info = describe(cfg.model, config, slots)
    install(model, slots, client)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(cfg.model)
    try:
        grammars: Grammars | None = Grammars(tokenizer, max(int(config.get("vocab_size") or 0), len(tokenizer)))
    except Exception as e:  # noqa: BLE001 - the model still serves free text
        log.warning("constrained output is off for this model", error=repr(e))
        grammars = None
    client.stats = ExchangeStats(info.moe_layers, info.num_experts)
    client.table = client.latest = Table.empty(info.num_experts)
    engine = Engine(model, tokenizer, cfg.limits, publish, info.max_context, before_step=client.adopt,
                    after_step=client.stats.record_step,
                    prompt_cache=PromptCache(cfg.prompt_cache_bytes) if cfg.prompt_cache_bytes > 0 else None,
                    drafter=make_drafter(cfg.speculate, cfg.draft_model, cfg.draft_replay, tokenizer))
    budget = cfg.kv_budget or default_budget(weights_bytes(model), machine_memory())  # experts are out by now
    engine.kv = KVBudget(kv_size(model, config), budget, info.max_context)
    client.while_waiting = engine.baton.released  # a lane waiting on its experts lets the other compute
    for lane in engine.lanes:
        lane.call(client.attach)  # each lane's own connection (shared.mlx_thread)
    return Loaded(
        engine,
        PromptEncoder(tokenizer, info.max_context, cfg.max_prompt_tokens),
        info,
        WorkerRegistry(info.num_experts, info.moe_layers, info.fingerprint, 4 * cfg.heartbeat_s,
                       one_per_identity=cfg.creds is not None),
        grammars,
    )

"""A model's shape for the performance model, and the roofline that carries measured costs from
the calibration model and machine to another model or machine.

A cost measured on one shape splits into a fixed part (ops, hops, Python) and a roofline part:
the larger of bytes read over memory bandwidth and FLOPs over peak compute. Moving to another
shape or machine keeps the fixed part and recomputes the roofline part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.perfmodel.formula import Costs, Shape


@dataclass(frozen=True)
class ModelShape:
    layers: int  # MoE layers
    hidden: int
    experts: int
    top_k: int
    ffn: int  # one expert's intermediate size
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weight_bytes: float = 4.0  # bytes per weight: 4 fp32, 2 fp16/bf16, ~0.56 for 4-bit with scales
    wire_bytes: int = 4  # bytes per value on the bus

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.ffn * self.weight_bytes

    @property
    def pair_flops(self) -> float:
        return 6.0 * self.hidden * self.ffn

    @property
    def layer_bytes(self) -> float:
        """Weights one layer reads outside its experts: attention and gate."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return (attn + self.hidden * self.experts) * self.weight_bytes

    @property
    def step_bytes(self) -> float:
        """Weights a step reads outside the layers: the LM head."""
        return self.vocab * self.hidden * self.weight_bytes

    def formula(self) -> Shape:
        return Shape(layers=self.layers, hidden=self.hidden, experts=self.experts, top_k=self.top_k,
                     wire_bytes=self.wire_bytes)


def from_config(config: dict) -> ModelShape:
    """From a Hugging Face config.json (Mixtral, Qwen-MoE, DBRX keys)."""
    if "ffn_config" in config:  # DBRX
        ffn, attn = config["ffn_config"], config["attn_config"]
        hidden, heads = config["d_model"], config["n_heads"]
        return ModelShape(layers=config["n_layers"], hidden=hidden, experts=ffn["moe_num_experts"],
                          top_k=ffn["moe_top_k"], ffn=ffn["ffn_hidden_size"], heads=heads,
                          kv_heads=attn.get("kv_n_heads", heads), head_dim=hidden // heads, vocab=config["vocab_size"],
                          weight_bytes=_weight_bytes(config), wire_bytes=_wire(config))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return ModelShape(
        layers=config["num_hidden_layers"], hidden=hidden,
        experts=config.get("num_local_experts") or config["num_experts"], top_k=config["num_experts_per_tok"],
        ffn=config.get("moe_intermediate_size") or config["intermediate_size"], heads=heads,
        kv_heads=config.get("num_key_value_heads", heads), head_dim=config.get("head_dim") or hidden // heads,
        vocab=config["vocab_size"], weight_bytes=_weight_bytes(config), wire_bytes=_wire(config))


def _wire(config: dict) -> int:
    return 4 if config.get("torch_dtype", "float32") == "float32" else 2


def _weight_bytes(config: dict) -> float:
    q = config.get("quantization") or config.get("quantization_config")
    if q and "bits" in q:
        return q["bits"] / 8 + 4 / q.get("group_size", 64)  # a bf16 scale and bias per group
    return float(_wire(config))


def parse_shape(text: str) -> ModelShape:
    """`layers=48,hidden=2048,...`: every field of ModelShape without a default."""
    fields = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in ModelShape.__dataclass_fields__:
            known = ", ".join(ModelShape.__dataclass_fields__)
            raise ValueError(f"--shape: unknown field {key.strip()!r}; fields: {known}")
        fields[key.strip()] = float(value) if key.strip() == "weight_bytes" else int(value)
    try:
        return ModelShape(**fields)
    except TypeError as e:
        raise ValueError(f"--shape: {e}") from None


@dataclass(frozen=True)
class Machine:
    """The roofline's peaks: memory GB/s and GFLOP/s the expert and router compute reach."""

    mem_gbps: float
    gflops: float


def carry(costs: Costs, source: ModelShape, target: ModelShape, measured: Machine, on: Machine,
          fixed: dict | None = None) -> Costs:
    """Costs measured for `source` on `measured`, moved to `target` on `on`: each roofline part
    recomputed, each fixed part kept (never below zero) or, from `fixed`, replaced by another
    machine's (its FLOPs then run at `on.gflops`, not at the efficiency measured here)."""
    def bytes_us(n: float, m: Machine) -> float:
        return n / (m.mem_gbps * 1e3)

    base = replace(
        costs, expert_us=max(0.0, costs.expert_us - bytes_us(source.expert_bytes, measured)),
        layer_us=tuple(max(0.0, u - bytes_us(source.layer_bytes, measured)) for u in costs.layer_us),
        step_us=tuple(max(0.0, u - bytes_us(source.step_bytes, measured)) for u in costs.step_us),
        pair_us=costs.pair_us * (target.pair_flops / source.pair_flops) * (measured.gflops / on.gflops))
    if fixed:
        base = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in fixed.items()})
        base = replace(base, pair_us=target.pair_flops / (on.gflops * 1e3))
    kv = (target.kv_heads * target.head_dim) / (source.kv_heads * source.head_dim)
    ctx = base.ctx_us if fixed and "ctx_us" in fixed else tuple(
        c * kv * measured.mem_gbps / on.mem_gbps for c in costs.ctx_us)
    return replace(base, expert_us=base.expert_us + bytes_us(target.expert_bytes, on),
                   layer_us=tuple(u + bytes_us(target.layer_bytes, on) for u in base.layer_us),
                   step_us=tuple(u + bytes_us(target.step_bytes, on) for u in base.step_us), ctx_us=ctx)

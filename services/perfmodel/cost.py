"""What a configuration costs per token: buying the machines, powering them, running them.

    total  = capex + energy over the lifetime + extra_usd_per_year × lifetime
    tokens = tokens_per_s × seconds in the lifetime × utilisation
    $/Mtok = total / tokens × 1e6

Hardware is bought once, electricity is paid at an average price, tokens come only while busy.
Everything but `load_config` is pure; the numbers, and where each comes from, live in JSON files
(bench/cost/).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HOURS_PER_YEAR = 365.25 * 24  # 8766: a Julian year, so leap days are not lost over a lifetime


class _Strict(BaseModel):
    # A typo in a cost file must fail loudly, not silently drop a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Machine(_Strict):
    name: str = Field(min_length=1)
    count: int = Field(ge=1)
    price_usd: float = Field(ge=0)
    power_w: float = Field(ge=0, description="average wall power while serving")
    idle_power_w: float = Field(default=0.0, ge=0, description="wall power while idle, counted over idle hours")


class CostConfig(_Strict):
    name: str = Field(min_length=1)
    machines: list[Machine] = Field(min_length=1)
    electricity_usd_per_kwh: float = Field(ge=0)
    utilisation: float = Field(gt=0, le=1, description="fraction of the time the configuration is busy")
    lifetime_years: float = Field(gt=0)
    tokens_per_s: float = Field(gt=0, description="aggregate tokens/s the configuration serves when busy")
    extra_usd_per_year: float = Field(default=0.0, ge=0, description="hosting, networking, support")
    sources: dict[str, str] = Field(default_factory=dict, description="where each number comes from")

    @model_validator(mode="after")
    def _sensible(self) -> CostConfig:
        names = [m.name for m in self.machines]
        if len(set(names)) != len(names):
            raise ValueError(f"machine names must be unique (they key `sources`): {names}")
        if not any(m.price_usd or m.power_w or m.idle_power_w for m in self.machines) and not self.extra_usd_per_year:
            raise ValueError("the configuration costs nothing: give a price, a power or extra_usd_per_year")
        return self


class CostReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    lifetime_years: float
    capex_usd: float
    energy_kwh_per_year: float
    energy_usd_lifetime: float
    extra_usd_lifetime: float
    total_usd_lifetime: float
    tokens_lifetime: float
    usd_per_million_tokens: float
    tokens_per_usd: float
    capex_share: float
    energy_share: float
    extra_share: float


def energy_kwh_per_year(config: CostConfig) -> float:
    """Serving power over the busy hours plus idle power over the rest.

    Idle power counts: a machine kept for serving stays on between requests. Only the busy hours
    produce tokens, so a low utilisation raises $/Mtok through both capex and idle energy.
    """
    busy_h = HOURS_PER_YEAR * config.utilisation
    idle_h = HOURS_PER_YEAR - busy_h
    wh = sum(m.count * (m.power_w * busy_h + m.idle_power_w * idle_h) for m in config.machines)
    return wh / 1000.0


def cost(config: CostConfig) -> CostReport:
    years = config.lifetime_years
    capex = sum(m.count * m.price_usd for m in config.machines)
    kwh = energy_kwh_per_year(config)
    energy = kwh * config.electricity_usd_per_kwh * years
    extra = config.extra_usd_per_year * years
    total = capex + energy + extra
    tokens = config.tokens_per_s * 3600.0 * HOURS_PER_YEAR * years * config.utilisation
    return CostReport(name=config.name, lifetime_years=years, capex_usd=capex, energy_kwh_per_year=kwh,
                      energy_usd_lifetime=energy, extra_usd_lifetime=extra, total_usd_lifetime=total,
                      tokens_lifetime=tokens, usd_per_million_tokens=total / tokens * 1e6,
                      tokens_per_usd=tokens / total, capex_share=capex / total, energy_share=energy / total,
                      extra_share=extra / total)


def compare(a: CostReport, b: CostReport) -> dict:
    """How a fares against b.

    cost_efficiency: b's $/Mtok over a's; 1.15 means a is 1.15× more cost-efficient.
    total_cost: b's lifetime total over a's; it ignores how many tokens each serves.
    """
    return {"a": a.name, "b": b.name,
            "cost_efficiency": b.usd_per_million_tokens / a.usd_per_million_tokens,
            "total_cost": b.total_usd_lifetime / a.total_usd_lifetime}


def unsourced(config: CostConfig) -> list[str]:
    """The numbers that have no entry in `sources`: top-level fields by name, a machine's as NAME.FIELD."""
    keys = ["electricity_usd_per_kwh", "utilisation", "lifetime_years", "tokens_per_s"]
    if "extra_usd_per_year" in config.model_fields_set:
        keys.append("extra_usd_per_year")
    for m in config.machines:
        keys += [f"{m.name}.{k}" for k in ("count", "price_usd", "power_w", "idle_power_w")
                 if k != "idle_power_w" or "idle_power_w" in m.model_fields_set]
    return [k for k in keys if not config.sources.get(k, "").strip()]


def load_config(path: str | Path) -> CostConfig:
    """Read and validate a cost file; a ValueError names each bad field (OSError if unreadable)."""
    path = Path(path)
    try:
        return CostConfig.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        raise ValueError(f"{path}: " + "; ".join(problems)) from None


def _num(x: float) -> str:
    """Three significant figures with a unit: 1.92k, 303M."""
    if math.isfinite(x):
        for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= div:
                return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def table(reports: list[CostReport]) -> str:
    """A plain-text table, one row per configuration."""
    head = ("configuration", "years", "capex $", "kWh/yr", "energy $", "total $", "tokens", "$/Mtok", "tok/$",
            "capex %", "energy %")
    rows = [(r.name, f"{r.lifetime_years:g}", _num(r.capex_usd), _num(r.energy_kwh_per_year),
             _num(r.energy_usd_lifetime), _num(r.total_usd_lifetime), _num(r.tokens_lifetime),
             f"{r.usd_per_million_tokens:.4g}", _num(r.tokens_per_usd), f"{100 * r.capex_share:.1f}",
             f"{100 * r.energy_share:.1f}") for r in reports]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

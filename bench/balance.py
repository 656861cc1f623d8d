"""Load balance of the placement: how hot-expert replicas even out the workers' load.

Pure computation with `shared.placement.place` (no processes): the benchmark models have
random weights, whose gates route nearly uniformly, so the skew comes from a stated trace
instead: expert e gets a share proportional to 1 / (e + 1) ** s (Zipf), as real MoE traces
are skewed toward a few popular experts. A replicated expert's tokens are spread evenly over
its owners, as the router does. Imbalance = the busiest worker's load / the mean.
"""

from __future__ import annotations

from pathlib import Path

from bench.table import write_and_show
from shared.placement import place

ROOT = Path(__file__).resolve().parents[1]


def imbalance(owners: list[list[str]], load: list[float]) -> float:
    per: dict[str, float] = {}
    for e, row in enumerate(owners):
        for w in row:
            per[w] = per.get(w, 0.0) + load[e] / len(row)
    return round(max(per.values()) / (sum(per.values()) / len(per)), 3)


def case(experts: int, workers: int, skew: float, spare: float) -> dict:
    load = [1.0 / (e + 1) ** skew for e in range(experts)]
    capacity = {f"w{i}": int(experts * (1 + spare) / workers) + 1 for i in range(workers)}
    plain = place(capacity, experts)
    hot = place(capacity, experts, load=load)
    return {"experts": experts, "workers": workers, "zipf_s": skew, "spare_capacity": spare,
            "imbalance_without_hot_replicas": imbalance(plain, load),
            "imbalance_with_hot_replicas": imbalance(hot, load),
            "extra_replicas": sum(map(len, hot)) - sum(map(len, plain))}


def main() -> None:
    rows = [case(e, w, s, 0.5) for e in (8, 64, 128) for w in (2, 4) for s in (0.8, 1.2)]
    out = ROOT / "bench" / "balance.json"
    write_and_show(out, rows, rows, [("experts", "experts", 7), ("workers", "workers", 7), ("zipf s", "zipf_s", 6),
                                     ("imbalance plain", "imbalance_without_hot_replicas", 15),
                                     ("with hot replicas", "imbalance_with_hot_replicas", 17),
                                     ("extra", "extra_replicas", 5)])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

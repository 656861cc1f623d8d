"""`moebus perfmodel calibrate | predict | proxy | cost`."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from shared.config import home, setting
from shared.errors import ConfigError


def default_profile() -> Path:
    return home() / "perfmodel" / "profile.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    pm = sub.add_parser("perfmodel", help="predict a cluster's speed and cost from this machine's measurements")
    ps = pm.add_subparsers(dest="perfmodel", required=True)
    cal = ps.add_parser("calibrate", help="measure this machine's parts (a few minutes) and write a profile")
    cal.add_argument("--model", help="ORG/NAME[@REVISION] or a local directory to measure on (MOEBUS_MODEL; "
                                     "default: the demo model)")
    cal.add_argument("--out", help="profile to write (default: $MOEBUS_HOME/perfmodel/profile.json)")
    cal.add_argument("--quick", action="store_true", help="fewer samples and sizes: a rough profile in a minute")
    cal.set_defaults(fn=cmd_calibrate)
    pr = ps.add_parser("predict", help="tokens/s and where the time goes, for a cluster")
    what = pr.add_mutually_exclusive_group()
    what.add_argument("--model", help="ORG/NAME[@REVISION] or a local directory whose config.json gives the shape "
                                      "(default: the profile's model)")
    what.add_argument("--shape", help="layers=48,hidden=2048,experts=128,top_k=8,ffn=768,heads=32,kv_heads=4,"
                                      "head_dim=128,vocab=151936[,weight_bytes=0.5625,wire_bytes=2]")
    pr.add_argument("--workers", type=int, default=1, help="expert workers (default 1)")
    pr.add_argument("--concurrency", type=int, default=1, help="streams decoded together (default 1)")
    pr.add_argument("--link-latency-us", type=float, default=0.0, help="one-way latency between a worker and the bus")
    pr.add_argument("--link-gbps", type=float, default=0.0, help="link bandwidth, Gbit/s (0: unlimited)")
    pr.add_argument("--context", type=int, default=0, help="tokens already in each sequence's KV cache")
    pr.add_argument("--acceptance", type=float, help="speculative decoding: the share of drafted tokens kept "
                                                     "(a drafter's published acceptance rate, 0..1)")
    pr.add_argument("--draft-max", type=int, default=4, help="with --acceptance: drafted tokens per step, at most "
                                                             "(the router's --draft-max, default 4)")
    pr.add_argument("--profile", help="from `calibrate` (default: $MOEBUS_HOME/perfmodel/profile.json)")
    pr.add_argument("--machine", help="JSON of another machine: mem_gbps and gflops (the roofline's peaks) and "
                                      "`costs`, its fixed costs (e.g. bench/machines/m2-ultra.json); the rest is "
                                      "carried over from the profile")
    pr.add_argument("--emulated", action="store_true", help="the workers go through `moebus perfmodel proxy` "
                                                            "(validation runs): add the proxy's own measured cost")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(fn=cmd_predict)
    px = ps.add_parser("proxy", help="a delaying TCP proxy: services connect through it to emulate a network link")
    px.add_argument("--upstream", required=True, help="HOST:PORT of the nats-server")
    px.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1, a free port)")
    px.add_argument("--delay-us", type=float, default=0.0, help="one-way delay added in each direction")
    px.add_argument("--gbps", type=float, default=0.0, help="bandwidth in each direction, Gbit/s (0: unlimited)")
    px.set_defaults(fn=cmd_proxy)
    co = ps.add_parser("cost", help="cost per million tokens and tokens per dollar of configurations")
    co.add_argument("--config", required=True, nargs="+", help="JSON file(s) describing a configuration")
    co.add_argument("--tokens-per-s", type=float, nargs="+", help="aggregate tokens/s of each configuration, "
                                                                   "e.g. from `predict` (default: the file's)")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    co.set_defaults(fn=cmd_cost)


def cmd_calibrate(a: argparse.Namespace) -> None:
    from services.perfmodel.calibrate import CalibrateConfig, run
    from shared.hub import resolve_model

    out = Path(a.out).expanduser() if a.out else default_profile()
    cfg = CalibrateConfig(model=resolve_model(setting(a.model, "MOEBUS_MODEL", "", str), home()), out=out)
    if a.quick:
        cfg = replace(cfg, workers=(1, 2), batches=(1, 8), contexts=(16,), call_tokens=(1, 4), expert_tokens=(1, 4),
                      samples=40, steps=4)
    run(cfg)
    print(f"moebus: wrote the profile {out}", flush=True)


def load_profile(path: str | None) -> dict:
    p = Path(path).expanduser() if path else default_profile()
    if not p.is_file():
        raise ConfigError(f"no profile at {p}: run `moebus perfmodel calibrate` first (or give --profile)")
    try:
        profile = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"{p} is not a profile: {e}") from None
    needed = ("machine", "model", "peaks", "non_expert", "expert_compute", "bare_bus", "layer_calls",
              "layer_calls_through_link")
    missing = [k for k in needed if not isinstance(profile, dict) or k not in profile]
    if missing:
        raise ConfigError(f"{p} is not a whole profile (no {', '.join(missing)}): run `moebus perfmodel calibrate`")
    return profile


def prediction(a: argparse.Namespace) -> dict:
    from services.perfmodel.fit import costs
    from services.perfmodel.formula import Link, predict
    from services.perfmodel.shapes import Machine, carry, from_config, parse_shape

    if a.workers < 1 or a.concurrency < 1 or a.link_latency_us < 0 or a.link_gbps < 0 or a.context < 0:
        raise ConfigError("--workers and --concurrency must be at least 1; latency, bandwidth and context not negative")
    if a.acceptance is not None and not (0 <= a.acceptance < 1 and 0 <= a.draft_max <= 16):
        raise ConfigError("--acceptance must be in [0, 1) and --draft-max 0..16")
    profile = load_profile(a.profile)
    source = from_config(profile["model"]["config"])
    try:
        if a.model:
            from shared.hub import resolve_model
            from shared.model import read_config  # mlx-lm: seconds to import, only for --model

            target = from_config(read_config(resolve_model(a.model, home(), weights=False)))  # config.json alone
        else:
            target = parse_shape(a.shape) if a.shape else source
    except ValueError as e:
        raise ConfigError(str(e)) from None
    measured = Machine(**profile["peaks"])
    c = costs(profile, source.formula())
    on, fixed = measured, None
    if a.machine:
        on, fixed = machine(Path(a.machine))
    if target != source or on != measured or fixed:
        c = carry(c, source, target, measured, on, fixed)
    p = predict(target.formula(), c, a.workers, a.concurrency, Link(a.link_latency_us, a.link_gbps, a.emulated),
                a.context, a.acceptance, a.draft_max)
    return {"shape": target.__dict__, "link": {"latency_us": a.link_latency_us, "gbps": a.link_gbps},
            "prediction": p.as_dict()}


def machine(path: Path) -> tuple:
    """Another machine's peaks and fixed costs (bench/machines/): what it reaches is assumed
    there, with the source of each number."""
    from services.perfmodel.formula import Costs
    from services.perfmodel.shapes import Machine

    try:
        spec = json.loads(path.read_text())
        fixed = spec.get("costs", {})
        unknown = set(fixed) - set(Costs.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown costs {sorted(unknown)}")
        return Machine(mem_gbps=float(spec["mem_gbps"]), gflops=float(spec["gflops"])), fixed
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--machine {path}: {e!r}") from None


def cmd_predict(a: argparse.Namespace) -> None:
    out = prediction(a)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    p = out["prediction"]
    print(f"{p['workers']} worker(s), {p['concurrency']} stream(s), {p['micro_batches']} micro-batch(es): "
          f"{p['tok_s_stream']} tok/s per stream, {p['tok_s_total']} tok/s in all, {p['step_ms']} ms per step "
          f"(bound: {p['bound']})")
    if p["draft_k"]:
        print(f"  speculative decoding: {p['draft_k']} drafts a step, {p['tokens_per_step']} tokens a step per stream")
    for key in ("router_ms", "experts_ms", "fixed_ms", "transfer_ms", "latency_ms", "waiting_ms"):
        print(f"  {key[:-3]:<9} {p[key]:>9.3f} ms")


def cmd_proxy(a: argparse.Namespace) -> None:
    from services.perfmodel.proxy import serve

    try:
        serve(a.upstream, a.listen, a.delay_us, a.gbps)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_cost(a: argparse.Namespace) -> None:
    from services.perfmodel.cost import cost, load_config, table

    from services.perfmodel.cost import compare

    if a.tokens_per_s is not None and len(a.tokens_per_s) != len(a.config):
        raise ConfigError(f"--tokens-per-s gives {len(a.tokens_per_s)} values for {len(a.config)} configurations")
    try:
        configs = [load_config(Path(f)) for f in a.config]
        if a.tokens_per_s is not None:
            configs = [type(c).model_validate({**c.model_dump(), "tokens_per_s": t})
                       for c, t in zip(configs, a.tokens_per_s)]
        reports = [cost(c) for c in configs]
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None
    if a.json:
        print(json.dumps([r.model_dump() for r in reports], indent=2))
        return
    print(table(reports))
    for other in reports[1:]:
        ratio = compare(reports[0], other)
        print(f"{reports[0].name} gives {ratio['cost_efficiency']:.2f}x the tokens per dollar of {other.name}, "
              f"which costs {ratio['total_cost']:.2f}x as much over its life")


"""`moebus perfmodel predict | cost` as a user runs them, and `moebus up --link-delay-us` on a real
cluster: the workers' layer round trips pay the emulated link."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from services.perfmodel.fit import costs
from services.perfmodel.formula import Link, predict
from services.perfmodel.shapes import from_config
from tests.cluster import ROOT, Up

CONFIG = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
          "vocab_size": 300}


def profile() -> dict:
    """A profile as `calibrate` writes it, with numbers chosen by hand."""
    non_expert = [{"layers": n, "batch": b, "context": ctx,
                   "ms": (1000 + 200 * b + n * (100 + 10 * b + 0.5 * ctx)) / 1e3}
                  for n in (4, 2) for b in (1, 4) for ctx in (16, 256)]
    compute = [{"tokens": t, "pairs": 2 * t, "distinct": d, "us": 80 + 20 * d + 3 * 2 * t}
               for t, d in ((1, 2), (2, 3.8), (4, 6.1), (8, 7.5))]
    bus = [{"workers": w, "bytes": b, "us": 300 + 40 * w + b / 500} for w in (1, 2, 3) for b in (1024, 65536)]
    calls = [{"workers": w, "tokens": t, "rest_us": 400 + 100 * w + t, "cpu_us": 700 + 200 * w + 30 * t,
              "rtt_us": 0, "compute_us": 0, "wall_us": 0} for w in (1, 2, 3) for t in (1, 4)]
    linked = [{**c, "rest_us": c["rest_us"] + 60} for c in calls]
    return {"machine": {"cores": 2}, "model": {"config": CONFIG}, "peaks": {"gflops": 100.0, "mem_gbps": 20.0},
            "non_expert": non_expert, "expert_compute": compute, "bare_bus": bus, "layer_calls": calls,
            "layer_calls_through_link": linked}


def moebus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "perfmodel", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_predict_prints_the_formula_for_the_profile(tmp_path: Path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    out = moebus("predict", "--profile", str(path), "--workers", "2", "--concurrency", "8", "--link-latency-us", "150",
                 "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["prediction"]
    shape = from_config(CONFIG).formula()
    want = predict(shape, costs(profile(), shape), 2, 8, Link(latency_us=150))
    assert got == pytest.approx(want.as_dict())
    assert costs(profile(), shape).emulator_us == pytest.approx((60, 60, 60), abs=0.5)  # through the proxy less direct
    slower = json.loads(moebus("predict", "--profile", str(path), "--workers", "2", "--concurrency", "8",
                               "--link-latency-us", "1000", "--json").stdout)["prediction"]
    assert slower["tok_s_total"] < got["tok_s_total"] and slower["latency_ms"] == pytest.approx(4 * 2 * 1000 / 1e3)
    text = moebus("predict", "--profile", str(path), "--shape",
                  "layers=40,hidden=6144,experts=16,top_k=4,ffn=10752,heads=48,kv_heads=8,head_dim=128,vocab=100352,"
                  "weight_bytes=0.5625,wire_bytes=2", "--machine", str(ROOT / "bench" / "machines" / "m2-ultra.json"))
    assert text.returncode == 0, text.stderr
    assert re.search(r"tok/s per stream", text.stdout) and "latency" in text.stdout


def test_predict_refuses_bad_input_with_a_message(tmp_path: Path):
    missing = moebus("predict", "--profile", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "moebus perfmodel calibrate" in missing.stderr
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"machine": {"cores": 2}}))
    out = moebus("predict", "--profile", str(partial))
    assert out.returncode == 2 and "not a whole profile" in out.stderr and "Traceback" not in out.stderr
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    for args, words in ((("--workers", "0"), "at least 1"), (("--shape", "layers=2,depth=3"), "depth"),
                        (("--link-latency-us", "-5"), "negative")):
        out = moebus("predict", "--profile", str(path), *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cost_prints_each_configuration_and_takes_predicted_throughput(tmp_path: Path):
    files = [str(ROOT / "bench" / "cost" / f) for f in ("mac-studio-m2-ultra-x2.json", "h100.json")]
    out = moebus("cost", "--config", *files, "--tokens-per-s", "10", "49", "--json")
    assert out.returncode == 0, out.stderr
    mac, h100 = json.loads(out.stdout)
    year = 8766 * 3600  # both files: busy all the time for 3 years
    assert mac["tokens_lifetime"] == pytest.approx(10 * 3 * year)
    assert h100["tokens_lifetime"] == pytest.approx(49 * 3 * year)
    # twice the throughput, half the cost per token
    twice = json.loads(moebus("cost", "--config", files[0], "--tokens-per-s", "20", "--json").stdout)[0]
    assert twice["usd_per_million_tokens"] == pytest.approx(mac["usd_per_million_tokens"] / 2)
    table = moebus("cost", "--config", *files)
    assert table.returncode == 0 and "$/Mtok" in table.stdout and "tokens per dollar" in table.stdout
    bad = moebus("cost", "--config", *files, "--tokens-per-s", "10")
    assert bad.returncode == 2 and "2 configurations" in bad.stderr


@pytest.mark.slow
def test_an_emulated_link_delays_every_layer_round_trip(checkpoints, tmp_path: Path):
    """3 ms each way: a layer's round trip to the worker takes at least 6 ms, which a tiny model's
    trip on loopback (about 1 ms here) never does unless the link is in the way."""
    with Up(checkpoints["mixtral"], 1, tmp_path, ("--link-delay-us", "3000"),
            env={"MOEBUS_HOME": str(tmp_path / "home")}) as up:
        with OpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0) as client:
            r = client.completions.create(model=checkpoints["mixtral"].name, prompt="the river", max_tokens=4,
                                          temperature=0)
        assert r.usage.completion_tokens == 4
        with urllib.request.urlopen(f"{up.url}/metrics", timeout=10) as m:
            text = m.read().decode()
        p50 = float(re.search(r'^moebus_expert_roundtrip_recent_seconds\{quantile="0.5"\} (\S+)$', text, re.M).group(1))
        assert p50 >= 6e-3
        assert "link" in up.log.read_text()  # the launcher says it started the proxy

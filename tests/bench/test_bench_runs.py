"""`make bench` works: its quick form on the tiny model writes every field the issue asks for.
Timings are not checked here; they are only measured, in `make bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path: Path):
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--tokens", "3", "--out", str(out),
                    "--models-dir", str(tmp_path / "models")],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["model"]["shape"]["num_local_experts"] == 4
    assert set(r["mlx_lm_tok_s"]) == set(r["mlx_lm_tok_s_all_cores"]) == {"batch1_tok_s", "batch16_tok_s",
                                                                          "non_expert_ms", "blas_threads"}
    assert {(x["workers"], x["concurrency"]) for x in r["runs"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(x["completed"] == x["concurrency"] and x["tokens"] == 3 * x["concurrency"] for x in r["runs"])
    assert {"payload_bytes", "layer_rtt_us_p50", "layer_rtt_us_p99", "raw_nats_rtt_us_p50"} <= set(r["bus"])
    assert r["bus"]["payload_bytes"] > 64 * 4  # at least one token's hidden state travelled
    assert set(r["ratios"]) == {"bus_vs_raw", "bus_share_vs_raw", "one_worker_vs_mlx_lm", "two_workers_vs_mlx_lm",
                                "router_vs_mlx_lm_non_expert", "c16_vs_mlx_lm_batch16", "more_workers_never_slower"}
    assert 0 < r["bus"]["worker_compute_us_p50"] < r["bus"]["layer_rtt_us_p50"]
    # a token's time outside the experts: the router's own, and mlx-lm's with its experts answering zeros
    assert 0 < r["bus"]["router_non_expert_ms"] and 0 < r["bus"]["mlx_lm_non_expert_ms"]
    # the overlap run: two micro-batches at every concurrency above 1
    assert [(o["workers"], o["concurrency"]) for o in r["overlap"]] == [(2, 2)]
    assert r["overlap"][0]["tok_s_two_micro_batches"] > 0
    # each worker's MLX counters after warm-up and at the end, with the layer calls between
    mem = r["worker_memory"]
    assert mem["at_end"]["layer_calls"] > mem["after_warm_up"]["layer_calls"]
    workers = {w for w in mem["at_end"] if w != "layer_calls"}
    assert len(workers) == 2 and all(mem["at_end"][w]["active"] > 0 for w in workers)


@pytest.mark.slow
def test_hops_measures_a_hand_off_and_a_worker_answered_directly(tmp_path: Path):
    from bench import models

    model = models.build("tiny", tmp_path / "models")
    out = subprocess.run([sys.executable, "-m", "bench.hops", "--model", str(model), "--n", "20"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    r = json.loads(out.stdout)
    assert r["hand_off"]["other_thread_loop_us"] > 0 and r["hand_off"]["own_loop_us"] > 0
    w = r["worker_direct"]
    assert w["request_bytes"] > 64 * 4 and w["reply_bytes"] > 64 * 4
    assert 0 < w["compute_us_p50"] < w["rtt_us_p50"] and w["bare_nats_us_p50"] > 0


@pytest.mark.slow
def test_quick_flash_benchmark_writes_results(tmp_path: Path):
    out = tmp_path / "flash.json"
    subprocess.run([sys.executable, "-m", "bench.flash", "--quick", "--tokens", "4", "--out", str(out),
                    "--models-dir", str(tmp_path / "models")], cwd=ROOT, check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())["locality"]
    runs = {x["mode"]: x for x in r["runs"]}
    assert set(runs) == {"dram", "naive", "on-demand", "cache-k1-prefetch", "tiered-k1"}
    assert all({"tok_s", "bytes_read_per_token", "hit_rate", "peak_rss_bytes"} <= set(x) for x in runs.values())
    assert all(x["tok_s"] > 0 and x["peak_rss_bytes"] > 0 for x in runs.values())
    # naive reads every expert, on-demand the routed ones, the cache fewer; DRAM reads nothing
    assert runs["naive"]["bytes_read_per_token"] > runs["on-demand"]["bytes_read_per_token"] \
        > runs["cache-k1-prefetch"]["bytes_read_per_token"] and runs["dram"]["bytes_read_per_token"] == 0
    assert runs["cache-k1-prefetch"]["prefetch_accuracy"] is not None
    assert 0 < r["belady_bytes_per_token"] <= runs["cache-k1-prefetch"]["bytes_read_per_token"]
    assert set(r["trace_reuse"]) == {"k1", "k5", "k10"}
    assert {"speedup_vs_naive", "speedup_vs_on_demand", "bytes_vs_belady", "vs_dram", "tiered_vs_flash_alone",
            "tiered_dram_pair_share"} <= set(r["ratios"])
    # the DRAM worker beside the flash-cache answered some pairs, the flash-cache alone none
    assert 0 < runs["tiered-k1"]["dram_pair_share"] < 1 and runs["cache-k1-prefetch"]["dram_pair_share"] == 0
    assert json.loads(out.read_text())["settings"]["bits"] == 4  # a quantized model, as people run

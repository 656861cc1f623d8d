"""`moebus status`'s text and how it finds the local cluster, and the CLI's size parsing."""

from __future__ import annotations

import os
import subprocess

import pytest

from services.cli import parse_size
from services.status import render
from shared.config import LocalCluster, forget_cluster, local_cluster, record_cluster
from shared.errors import ConfigError
from shared.messages import ClusterStatus, WorkerStatus


def test_status_names_workers_ranges_and_unowned_experts():
    w = WorkerStatus(worker="mac-1-abc123", host="mac-1", capacity=6, experts=[0, 1, 2, 5], tokens=120,
                     last_heartbeat_s=0.4, loaded=3, draining=True, speed=95.0)
    text = render(ClusterStatus(model="m", ready=False, placement_version=3, pending_version=4, replicas=1,
                                workers=[w], unowned_experts=[3, 4, 6], expert_load=[5, 0, 0, 0, 0, 0, 15],
                                owners=[]))
    assert "NOT READY, placement v3 (v4 loading)" in text
    assert "mac-1-abc123" in text and "0-2,5 (draining)" in text
    assert "unowned experts: 3-4,6" in text and "busiest experts: 6 (75%)" in text


def test_status_counts_each_workers_pairs_in_a_tiered_placement():
    dram = WorkerStatus(worker="mac-2-d", host="mac-2", capacity=1, experts=[1, 3], tokens=9, last_heartbeat_s=0.1,
                        loaded=2, draining=False, speed=1.0)
    flash = WorkerStatus(worker="mac-1-f", host="mac-1", capacity=4, experts=[0, 1, 2, 3], tokens=9,
                         last_heartbeat_s=0.1, loaded=2, draining=False, speed=1.0, backend="flash")
    layers = [[["mac-1-f"], ["mac-2-d"], ["mac-1-f"], ["mac-1-f"]], [["mac-1-f"]] * 3 + [["mac-2-d"]]]
    text = render(ClusterStatus(model="m", ready=True, placement_version=2, pending_version=None, replicas=1,
                                workers=[dram, flash], unowned_experts=[], expert_load=[], owners=[],
                                layers=layers))
    assert "mac-2-d: 2 of the 8 (layer, expert) pairs" in text and "mac-1-f: 6 of the 8" in text


@pytest.mark.parametrize("text, size", [("512", 512), ("2K", 2048), ("1.5G", 3 << 29), ("8GB", 8 << 30),
                                        ("4GiB", 4 << 30), ("16m", 16 << 20), ("512KiB", 512 << 10),
                                        ("300MB", 300 << 20)])
def test_memory_budgets_read_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "G"])
def test_a_bad_memory_budget_is_a_clear_error(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text)
    assert "--memory-budget" in str(e.value)


def test_status_finds_the_cluster_up_recorded_while_its_launcher_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBUS_HOME", str(tmp_path))
    mine = LocalCluster(os.getpid(), "nats://127.0.0.1:4999", "http://127.0.0.1:18700", "/some/cluster")
    record_cluster(mine)
    assert local_cluster() == mine
    forget_cluster(os.getpid() + 1)  # another launcher's exit leaves this one's record
    assert local_cluster() == mine
    forget_cluster(os.getpid())
    assert local_cluster() is None and not list(tmp_path.iterdir())


def test_a_record_left_by_a_killed_launcher_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBUS_HOME", str(tmp_path))
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    record_cluster(LocalCluster(dead.pid, "nats://127.0.0.1:4999", "http://127.0.0.1:18700"))
    assert local_cluster() is None

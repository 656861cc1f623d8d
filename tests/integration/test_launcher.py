"""`moebus up` as a user meets it: it stops cleanly, and refuses models it cannot serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from shared.natsd import free_port
from tests.cluster import ROOT, Up, wait_healthy


def _gone(up: Up, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not up.children() and not _listening(up.nats_port):
            return True
        time.sleep(0.2)
    return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_child(checkpoints, tmp_path, sig):
    with Up(checkpoints["qwen3_moe"], 2, tmp_path) as up:
        assert len(up.children()) == 4  # router, 2 workers, gateway
        r = httpx.post(f"{up.url}/v1/completions", timeout=60,  # MLX has run in every process
                       json={"model": "tiny-qwen3_moe", "prompt": [8, 9, 10], "max_tokens": 4})
        assert r.status_code == 200
        assert up.stop(sig) == 0
        assert _gone(up)
    log = up.log.read_text()  # every child stopped cleanly: no abort while tearing MLX down
    assert "exited with" not in log and "terminate called" not in log, log[-2000:]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_everything_promptly(checkpoints, tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group. The services stop on
    their own, quickly, without being killed, and over a bus that is still there: nats-server
    has a group of its own and is stopped last, so no service sees it vanish."""
    port, nats_port, log = free_port(), free_port(), tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(checkpoints["mixtral"]),
                                 "--workers", "2", "--port", str(port), "--nats-port", str(nats_port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], log)
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "tiny-mixtral", "prompt": [8, 9], "max_tokens": 3})
        assert r.status_code == 200
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert time.monotonic() - start < 8  # the launcher kills what is left after 10 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "was killed" not in text and "exited with" not in text and "Traceback" not in text, text[-3000:]
    assert "nats disconnected" not in text and "without the bus" not in text, text[-3000:]


@pytest.mark.slow
def test_children_exit_when_the_launcher_is_killed(checkpoints, tmp_path):
    with Up(checkpoints["qwen3_moe"], 1, tmp_path) as up:
        up.stop(signal.SIGKILL)
        assert _gone(up)


def _up(model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "up", "--model", str(model), "--nats-port", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    return lines[0]


def test_a_dense_checkpoint_is_refused_in_one_line(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(tmp_path / "dense")
    line = _one_line(_up(tmp_path / "dense"))
    assert "no experts module" in line and "dense" in line


def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "not_a_real_moe"}))
    mx.save_safetensors(str(tmp_path / "odd" / "model.safetensors"), {"w": mx.zeros(2)})
    assert "not_a_real_moe" in _one_line(_up(tmp_path / "odd"))


def test_a_missing_directory_is_refused_in_one_line(tmp_path):
    assert "nowhere: no such directory, nor a Hugging Face repo id" in _one_line(_up(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _one_line(_up(tmp_path / "empty"))

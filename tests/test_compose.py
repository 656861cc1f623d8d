"""docker-compose.yml is checked by parsing (no Docker engine here): it must start a working system."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import parser

ROOT = Path(__file__).resolve().parents[1]


def test_compose_starts_nats_router_scalable_workers_and_gateway():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert (ROOT / services["router"]["build"]["dockerfile"]).is_file()
    assert "-js" in services["nats"]["command"]
    commands = {name: s["command"] for name, s in services.items() if name != "nats"}
    for name, command in commands.items():
        args = parser().parse_args(command)  # every command is one the CLI accepts
        assert services[name]["environment"]["MOEBUS_NATS_URL"] == "nats://nats:4222"
        assert "nats" in services[name]["depends_on"]
        assert args.command in ("router", "worker", "gateway")
    # One worker service that scales (`--scale expert-worker=N`): nothing per instance in it.
    assert [name for name, c in commands.items() if c[0] == "worker"] == ["expert-worker"]
    worker = services["expert-worker"]
    assert worker["deploy"]["replicas"] >= 1
    assert not {"container_name", "ports", "hostname"} & worker.keys()
    assert worker["stop_grace_period"]
    gateway = parser().parse_args(commands["gateway"])
    assert gateway.host == "0.0.0.0" and f"{gateway.port}:{gateway.port}" in services["gateway"]["ports"]


def test_image_installs_the_project():
    dockerfile = (ROOT / "ops" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile and 'ENTRYPOINT ["moebus"]' in dockerfile

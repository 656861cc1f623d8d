"""docker-compose.yml is checked by parsing and by `docker-compose config` (no Docker engine
here): it must start a working system, secured as `moebus up` is."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.cli import parser
from services.expert_worker.main import WorkerConfig
from shared.natsd import server_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
MOEBUS = ("router", "expert-worker", "gateway")  # the long-running moebus services


@pytest.fixture
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read-only) of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        if len(parts) == 1:  # an anonymous volume
            parts = ["", parts[0]]
        out[parts[1]] = (parts[0], parts[2:] == ["ro"])
    return out


def _seconds(duration: str) -> float:
    """Seconds in a compose duration such as "70s" or "1m30s"."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def _init(services: dict):
    return parser().parse_args(services["init"]["command"])


def test_compose_starts_nats_router_scalable_workers_and_gateway(services: dict):
    assert (ROOT / services["router"]["build"]["dockerfile"]).is_file()
    for name in MOEBUS:
        args = parser().parse_args(services[name]["command"])  # every command is one the CLI accepts
        assert args.command in ("router", "worker", "gateway")
        assert services[name]["environment"]["MOEBUS_NATS_URL"] == "nats://nats:4222"
        assert "nats" in services[name]["depends_on"]
    # One worker service that scales (`--scale expert-worker=N`): nothing per instance in it.
    assert [n for n, s in services.items() if s.get("command", [""])[0] == "worker"] == ["expert-worker"]
    worker = services["expert-worker"]
    assert worker["deploy"]["replicas"] >= 1
    assert not {"container_name", "ports", "hostname"} & worker.keys()
    assert _seconds(worker["stop_grace_period"]) > WorkerConfig.drain_timeout_s  # SIGKILL only after a drain
    gateway = parser().parse_args(services["gateway"]["command"])
    assert gateway.host == "0.0.0.0" and f"{gateway.port}:{gateway.port}" in services["gateway"]["ports"]
    assert services["gateway"]["healthcheck"]["test"]


def test_init_writes_the_cluster_before_anything_starts(services: dict):
    init = _init(services)
    assert init.command == "init-cluster" and init.workers >= services["expert-worker"]["deploy"]["replicas"]
    assert _mounts(services["init"])[init.dir][1] is False  # it writes there
    assert not {"ports", "deploy"} & services["init"].keys() and services["init"].get("restart") == "no"
    for name in ("nats", *MOEBUS):
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}


def test_nats_runs_on_the_generated_config_and_publishes_no_port(services: dict):
    nats = services["nats"]
    assert "ports" not in nats  # the services reach it on the compose network; nothing else does
    init, command = _init(services), nats["command"]
    conf = command[command.index("-c") + 1]
    cluster_volume = _mounts(services["init"])[init.dir][0]
    assert conf == f"{init.dir}/nats.conf" and _mounts(nats)[init.dir] == (cluster_volume, True)
    assert not {"-js", "--jetstream", "-a", "--addr", "--user", "--auth"} & set(command)  # all in the config
    assert _mounts(nats)[init.store_dir][0]  # JetStream on a named volume of nats' own


def test_the_generated_config_is_one_nats_server_accepts(services: dict, tmp_path: Path):
    init = _init(services)
    init.dir = str(tmp_path / "cluster")  # same command, a directory of this test's
    init.fn(init)
    conf = tmp_path / "cluster" / "nats.conf"
    assert f'store_dir: "{init.store_dir}"' in conf.read_text() and "authorization" in conf.read_text()
    checked = subprocess.run([server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_every_service_connects_with_its_own_credentials(services: dict):
    for name in MOEBUS:
        env, args = services[name]["environment"], parser().parse_args(services[name]["command"])
        assert "MOEBUS_INSECURE" not in env and not args.insecure and args.creds is None, name
        assert env.get("MOEBUS_CREDS"), name
    cluster_volume = _mounts(services["init"])[_init(services).dir][0]
    for name in MOEBUS:
        mount = next(t for t, (src, _) in _mounts(services[name]).items() if src == cluster_volume)
        assert PurePosixPath(services[name]["environment"]["MOEBUS_CREDS"]).is_relative_to(mount), name
    # Router and gateway only read; a worker writes its identity's lock (/cluster/locks).
    assert _mounts(services["router"])["/cluster"][1] and _mounts(services["gateway"])["/cluster"][1]


def test_workers_take_the_model_from_the_router_over_nats(services: dict):
    worker, router = services["expert-worker"], services["router"]
    assert "MOEBUS_MODEL" not in worker["environment"] and "/models" not in _mounts(worker)
    assert parser().parse_args(worker["command"]).model is None
    assert router["environment"]["MOEBUS_SHARE_MODEL"] in ("1", "true", "yes")
    # Each replica caches its experts apart: a shared directory would mix partial downloads.
    assert _mounts(worker)["/data"][0] == ""


def test_docker_compose_accepts_it():
    binary = shutil.which("docker-compose")
    command = [binary] if binary else ["docker", "compose"]  # else Compose v2, the docker plugin
    done = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]  # merged as compose merges, not as PyYAML does
    assert "ports" not in resolved["nats"]
    assert all(resolved[name]["environment"]["MOEBUS_CREDS"] for name in MOEBUS)


def test_image_installs_the_project():
    dockerfile = (ROOT / "ops" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile and 'ENTRYPOINT ["moebus"]' in dockerfile
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:  # every package the install looks for is in the image
        top = pattern.removesuffix("*")
        assert f"COPY {top} ./{top}" in dockerfile, top

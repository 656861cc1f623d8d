"""docker-compose.yml is checked by parsing, by running init's script on directories of the
test's own, and as `docker compose config` checks it, without Docker: the Compose
specification's JSON schema, then the references the schema cannot see. It must start a working
system, secured as `moebus up` is, with each service seeing only its own credentials."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema_rs
import pytest
import yaml

from services.cli import parser
from services.expert_worker.main import WorkerConfig
from shared.natsd import server_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
# The Compose specification's JSON schema: compose/config/compose_spec.json of docker-compose 1.29.2
# on PyPI (May 2021; sha256 0dc04bd3...2b112bac), shipped so the check needs no Docker and no network.
SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"
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


def _sources(service: dict) -> set[str]:
    return {source for source, _ in _mounts(service).values()}


def _mount_of(service: dict, path: str) -> tuple[str, str, bool]:
    """(target, source, read-only) of the mount `path` lies in."""
    target = max((t for t in _mounts(service) if PurePosixPath(path).is_relative_to(t)), key=len)
    return (target, *_mounts(service)[target])


def _init_script(services: dict) -> str:
    init = services["init"]
    assert init["entrypoint"] == ["sh", "-c"] and len(init["command"]) == 1  # one shell script
    return init["command"][0]


def _init(services: dict):
    """The arguments init's script gives `moebus init-cluster`."""
    line = next(line for line in _init_script(services).splitlines() if line.startswith("moebus "))
    return parser().parse_args(shlex.split(line)[1:])


def _cluster_volume(services: dict) -> str:
    return _mounts(services["init"])[_init(services).dir][0]


def _run_init(services: dict, root: Path) -> dict[str, Path]:
    """Runs init's script with each volume it mounts a directory under `root`: volume -> directory."""
    mounts = _mounts(services["init"])
    dirs = {source: root / source for source, _ in mounts.values()}
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    targets = "|".join(re.escape(t) for t in sorted(mounts, key=len, reverse=True))
    script = re.sub(rf"({targets})(?=/|\s|$)", lambda m: str(dirs[mounts[m[1]][0]]), _init_script(services))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this moebus
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return dirs


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
    # nats.conf and every password, admin's included: no moebus service sees them.
    assert {name for name, s in services.items() if cluster_volume in _sources(s)} == {"init", "nats"}
    assert not {"-js", "--jetstream", "-a", "--addr", "--user", "--auth"} & set(command)  # all in the config
    assert _mounts(nats)[init.store_dir][0]  # JetStream on a named volume of nats' own


def test_the_generated_config_is_one_nats_server_accepts(services: dict, tmp_path: Path):
    init = _init(services)
    conf = _run_init(services, tmp_path)[_cluster_volume(services)] / "nats.conf"
    assert f'store_dir: "{init.store_dir}"' in conf.read_text() and "authorization" in conf.read_text()
    checked = subprocess.run([server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_every_service_connects_with_its_own_credentials(services: dict):
    for name in MOEBUS:
        env, args = services[name]["environment"], parser().parse_args(services[name]["command"])
        assert "MOEBUS_INSECURE" not in env and not args.insecure and args.creds is None, name
        assert env.get("MOEBUS_CREDS"), name
        assert _cluster_volume(services) not in _sources(services[name]), name  # nats.conf, others' passwords
        # A volume of the service's own, filled by init: no other service mounts it.
        _, volume, _ = _mount_of(services[name], env["MOEBUS_CREDS"])
        assert {other for other, s in services.items() if volume in _sources(s)} == {name, "init"}, name
    for name in ("router", "gateway"):  # one file, read-only
        creds = PurePosixPath(services[name]["environment"]["MOEBUS_CREDS"])
        target, _, read_only = _mount_of(services[name], str(creds))
        assert creds == PurePosixPath(target) / f"{name}.creds" and read_only, name
    # Workers get the directory: a replica takes the first identity free, locking it in DIR/locks.
    worker = services["expert-worker"]
    target, _, read_only = _mount_of(worker, worker["environment"]["MOEBUS_CREDS"])
    assert target == worker["environment"]["MOEBUS_CREDS"] and not read_only


def test_init_copies_each_service_its_own_credentials_and_nothing_else(services: dict, tmp_path: Path):
    dirs = _run_init(services, tmp_path)
    cluster, workers = dirs[_cluster_volume(services)], _init(services).workers

    def volume(name: str) -> Path:
        return dirs[_mount_of(services[name], services[name]["environment"]["MOEBUS_CREDS"])[1]]

    wanted = {volume("router"): {"router.creds"}, volume("gateway"): {"gateway.creds"},
              volume("expert-worker"): {f"worker-{n}.creds" for n in range(1, workers + 1)}}
    assert set(dirs.values()) == {cluster, *wanted}  # init mounts nothing else
    assert {p.name for p in cluster.iterdir()} >= {"nats.conf", "admin.creds", *set().union(*wanted.values())}
    for directory, names in wanted.items():
        assert {p.name for p in directory.iterdir()} == names, directory.name
        assert all((directory / n).read_bytes() == (cluster / n).read_bytes() for n in names)
    # Again, as every `up` runs it: the same secrets, copied over, the modes set back.
    (volume("router") / "router.creds").chmod(0o644)
    before = {p: p.read_bytes() for d in dirs.values() for p in d.glob("*.creds")}
    _run_init(services, tmp_path)
    assert {p: p.read_bytes() for d in dirs.values() for p in d.glob("*.creds")} == before
    for directory in wanted:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o600}, directory.name


def test_workers_take_the_model_from_the_router_over_nats(services: dict):
    worker, router = services["expert-worker"], services["router"]
    assert "MOEBUS_MODEL" not in worker["environment"] and "/models" not in _mounts(worker)
    assert parser().parse_args(worker["command"]).model is None
    assert router["environment"]["MOEBUS_SHARE_MODEL"] in ("1", "true", "yes")
    # Each replica caches its experts apart: a shared directory would mix partial downloads.
    assert _mounts(worker)["/data"][0] == ""


# Formats the schema names that compose checks itself: a Go duration, a short-syntax port.
DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
PORTS = re.compile(r"((\[?[\da-fA-F.:]+\]?:)?(\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?")
FORMATS = {"duration": lambda v: DURATION.fullmatch(v) is not None, "ports": lambda v: PORTS.fullmatch(v) is not None}
ENV = {"MOEBUS_API_KEYS": "sk-test"}  # what `docker compose up` requires set; the rest have defaults
# Compose's interpolation: $$, $NAME, ${NAME} and ${NAME<op>word}, op one of :- - :? ? :+ +
VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


def _interpolated(value: object, env: dict[str, str]) -> object:
    """`value` with its variables resolved in `env`, as compose does before it validates;
    ValueError for what compose refuses: a malformed variable, a required one unset."""
    if isinstance(value, dict):
        return {k: _interpolated(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolated(v, env) for v in value]
    if not isinstance(value, str):
        return value
    if "$" in VARIABLE.sub("", value):
        raise ValueError(f"invalid interpolation format in {value!r}")

    def resolve(m: re.Match) -> str:
        if m[1]:
            return "$"
        name, op, word = m[2] or m[5], m[3] or "", m[4] or ""
        given = env.get(name)
        is_set = bool(given) if op.startswith(":") else given is not None
        if op.endswith("?") and not is_set:
            raise ValueError(f"required variable {name} is missing a value: {word}")
        if op.endswith("-") and not is_set:
            return word
        if op.endswith("+"):
            return word if is_set else ""
        return given or ""

    return VARIABLE.sub(resolve, value)


def _compose_errors(text: str, env: dict[str, str]) -> list[str]:
    """What `docker compose config` would refuse in `text`: a bad interpolation, what the
    schema forbids (unknown keys, wrong types, bad durations or ports), and references to a
    service or a named volume that is not declared."""
    try:
        doc = _interpolated(yaml.safe_load(text), env)
    except ValueError as e:
        return [str(e)]
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()), formats=FORMATS, validate_formats=True)
    errors = [f"{'.'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if errors:
        return errors
    services, volumes = doc["services"], doc.get("volumes") or {}
    for name, service in services.items():
        errors += [f"services.{name}.depends_on: no service {d!r}" for d in service.get("depends_on", [])
                   if d not in services]
        for spec in service.get("volumes", []):
            source = spec.split(":")[0] if ":" in spec else ""  # the short syntax; "/data" alone is anonymous
            if source and not source.startswith((".", "/", "~")) and source not in volumes:
                errors.append(f"services.{name}.volumes: volume {source!r} is not declared")
    return errors


def test_the_compose_specification_accepts_it(services: dict):
    assert _compose_errors(COMPOSE.read_text(), ENV) == []
    resolved = _interpolated(yaml.safe_load(COMPOSE.read_text()), ENV)["services"]
    assert resolved["router"]["environment"]["OPENBLAS_NUM_THREADS"] == "1"  # the default when unset
    assert "ports" not in resolved["nats"]
    for name in MOEBUS:  # each service's own, over the shared environment
        assert resolved[name]["environment"]["MOEBUS_CREDS"] == services[name]["environment"]["MOEBUS_CREDS"]
        assert resolved[name]["environment"]["MOEBUS_NATS_URL"] == "nats://nats:4222"


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("    healthcheck:", "    healthchek:", "'healthchek' was unexpected"),  # a typo'd key
    ("replicas: 2", "replicas: two", '"two" is not of type "integer"'),
    ('restart: "no"', "restart: no", 'false is not of type "string"'),  # YAML 1.1 reads a bare no as false
    ("stop_grace_period: 70s", "stop_grace_period: 70 seconds", 'is not a "duration"'),
    ('ports: ["8000:8000"]', 'ports: ["8000:8000:tcp"]', '"8000:8000:tcp" is not valid under any'),
    ("- creds-router:/creds:ro", "- creds-rooter:/creds:ro", "volume 'creds-rooter' is not declared"),
    ("    nats: {condition: service_started}", "    natz: {condition: service_started}", "no service 'natz'"),
    ("${OPENBLAS_NUM_THREADS:-1}", "${OPENBLAS_NUM_THREADS:-1", "invalid interpolation format"),
])
def test_a_broken_compose_file_is_refused(old: str, new: str, needle: str):
    text = COMPOSE.read_text()
    assert text.count(old) == 1, old
    errors = _compose_errors(text.replace(old, new), ENV)
    assert any(needle in e for e in errors), errors


def test_image_installs_the_project():
    dockerfile = (ROOT / "ops" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile and 'ENTRYPOINT ["moebus"]' in dockerfile
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:  # every package the install looks for is in the image
        top = pattern.removesuffix("*")
        assert f"COPY {top} ./{top}" in dockerfile, top

"""The service definitions in ops/ for workers on other machines: launchd (macOS) and systemd."""

from __future__ import annotations

import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import parser
from services.expert_worker.main import WorkerConfig

OPS = Path(__file__).resolve().parents[1] / "ops"
PLIST = OPS / "moebus-worker.plist"
UNIT = OPS / "moebus-worker@.service"
MOEBUS = str(Path(sys.executable).parent / "moebus")
PLACEHOLDERS = {"__MOEBUS__": MOEBUS, "__NATS_HOST__": "192.0.2.7", "__CREDS__": "/Users/me/worker-3.creds",
                "__HOME__": "/Users/me"}
INSTANCE = "3"
# systemd's specifiers as it expands them for instance 3 of a system unit
SPECIFIERS = {"%i": INSTANCE, "%d": f"/run/credentials/moebus-worker@{INSTANCE}.service", "%C": "/var/cache"}
# A drained worker still answers what it took and closes: the stop timeout leaves it room.
STOP_MARGIN_S = 5


def _filled(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def _worker_args(argv: list[str]):
    args = parser().parse_args(argv)
    assert args.command == "worker" and args.creds and not args.insecure
    assert args.model is None  # the experts come from the router's copy over NATS
    return args


def test_every_placeholder_is_named_and_filled():
    for path in (PLIST, UNIT):
        used = set(re.findall(r"__[A-Z_]+__", path.read_text()))
        assert used and used <= PLACEHOLDERS.keys(), path
        assert not re.findall(r"__[A-Z_]+__", _filled(path.read_text(), PLACEHOLDERS))


def test_launchd_job_runs_a_secured_worker_and_keeps_it_up():
    job = plistlib.loads(_filled(PLIST.read_text(), PLACEHOLDERS).encode())
    program, *argv = job["ProgramArguments"]
    assert program == MOEBUS
    args = _worker_args(argv)
    assert args.nats == "nats://192.0.2.7:4222" and args.creds == PLACEHOLDERS["__CREDS__"]
    # restarted when it fails, not when a newer process took its identity over (exit 0)
    assert job["RunAtLoad"] is True and job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ExitTimeOut"] >= WorkerConfig.drain_timeout_s + STOP_MARGIN_S  # launchd's default: 20 s
    assert job["ProcessType"] == "Interactive"  # unset, launchd throttles its CPU and I/O
    assert "PATH" in job["EnvironmentVariables"] and "MOEBUS_INSECURE" not in job["EnvironmentVariables"]
    assert all(Path(job[k]).is_absolute() for k in ("StandardOutPath", "StandardErrorPath"))


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections; a key may repeat (Environment=), so each holds a list."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_template_runs_instance_n_as_worker_n():
    unit = _unit(_filled(UNIT.read_text(), PLACEHOLDERS | SPECIFIERS))
    service = unit["Service"]
    program, *argv = shlex.split(service["ExecStart"][0])
    assert program == MOEBUS
    args = _worker_args(argv)
    assert args.nats == "nats://192.0.2.7:4222"
    # --creds is systemd's private copy of this instance's own credentials file
    name, _, source = service["LoadCredential"][0].partition(":")
    assert args.creds == f"{SPECIFIERS['%d']}/{name}"
    assert source == f"/etc/moebus/cluster/worker-{INSTANCE}.creds"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_template_drains_restarts_and_is_hardened():
    service = _unit(_filled(UNIT.read_text(), PLACEHOLDERS | SPECIFIERS))["Service"]
    assert service["KillSignal"] == ["SIGTERM"] and service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["3"]  # refused at start: its identity is in use
    assert float(service["TimeoutStopSec"][0].removesuffix("s")) >= WorkerConfig.drain_timeout_s + STOP_MARGIN_S
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "DynamicUser": "yes", "ProtectHome": "yes"}.items():
        assert service[key] == [value], key
    # Its cache is one of its own, writable under ProtectSystem=strict through CacheDirectory=.
    cache = f"/var/cache/{service['CacheDirectory'][0]}"
    assert f"MOEBUS_HOME={cache}" in service["Environment"] and cache.endswith(f"worker-{INSTANCE}")
    assert all(env.startswith("-") for env in service["EnvironmentFile"])  # optional
    assert not any("MOEBUS_INSECURE" in env for env in service["Environment"])


def test_systemd_accepts_the_template(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        if sys.platform == "darwin":  # no systemd to install there: the template is for Linux workers
            pytest.skip("systemd-analyze is Linux's: the template is checked on Linux")
        pytest.fail("systemd-analyze is not installed: `make install-test` installs it as root on Debian and "
                    "Ubuntu, or install the systemd package (apt-get install systemd; dnf install systemd)")
    unit = tmp_path / f"moebus-worker@{INSTANCE}.service"  # verify takes an instance, not a template
    unit.write_text(_filled(UNIT.read_text(), PLACEHOLDERS))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr

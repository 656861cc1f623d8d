"""What `moebus up` checks before starting anything, and its ready line: pure functions and sockets."""

from __future__ import annotations

import shlex
import socket

import pytest

from services.launcher import UpConfig, banner, check_ports, reachable
from shared.errors import ConfigError
from shared.natsd import free_port


@pytest.mark.parametrize("host, local, remote", [
    ("0.0.0.0", "http://127.0.0.1:18700", f"http://{socket.gethostname()}:18700"),
    ("::", "http://[::1]:18700", f"http://{socket.gethostname()}:18700"),
    ("127.0.0.1", "http://127.0.0.1:18700", ""),
    ("192.168.1.5", "http://192.168.1.5:18700", ""),
    ("fe80::1", "http://[fe80::1]:18700", ""),
])
def test_the_ready_line_names_an_address_a_client_can_reach(host, local, remote):
    assert reachable(host, 18700) == (local, remote)


def _curl(text: str) -> list[str]:
    line = text[text.index("  curl"):text.index("Ctrl-C")]
    return shlex.split(line.replace("\\\n", " "))


@pytest.mark.parametrize("auth, header", [
    ("k'ey \"x", "Authorization: Bearer k'ey \"x"),  # given on the command line: as it is, quoted for the shell
    ("$MOEBUS_API_KEYS", "Authorization: Bearer $MOEBUS_API_KEYS"),  # the variable, left for the shell
])
def test_the_ready_lines_curl_carries_the_key(auth, header):
    words = _curl(banner("http://127.0.0.1:1", "", "m", auth))
    assert words[words.index(header) - 1] == "-H"
    text = banner("http://127.0.0.1:1", "", "m", auth)
    assert ('"' + header + '"' in text) == auth.startswith("$")  # double quotes: the shell expands it


def test_without_a_key_the_curl_sends_none():
    assert not [w for w in _curl(banner("http://127.0.0.1:1", "", "m")) if w.startswith("Authorization")]


@pytest.mark.parametrize("flag", ["--port", "--nats-port"])
def test_a_port_in_use_is_refused_by_its_flag(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"port": free_port(), "nats_port": free_port(), flag[2:].replace("-", "_"): port}
        with pytest.raises(ConfigError) as e:
            check_ports(UpConfig(model=tmp_path, **ports))
    assert f"127.0.0.1:{port} (in use" in str(e.value) and f"with {flag}" in str(e.value)


def test_free_ports_pass_and_a_bus_of_its_own_needs_no_nats_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        check_ports(UpConfig(model=tmp_path, port=free_port(), nats_port=free_port()))
        check_ports(UpConfig(model=tmp_path, port=free_port(), nats_port=taken.getsockname()[1],
                             nats_url="nats://elsewhere:4222"))


def test_one_port_for_both_is_refused(tmp_path):
    port = free_port()
    with pytest.raises(ConfigError) as e:
        check_ports(UpConfig(model=tmp_path, port=port, nats_port=port))
    assert "--port and --nats-port are both" in str(e.value)

"""Fixtures: a real nats-server on a free port, tiny checkpoints made with transformers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shared.natsd import free_port, start_nats
from tests.checkpoints import FAMILIES, build_checkpoint


def pytest_configure(config: pytest.Config) -> None:
    """Each test process a MOEBUS_HOME of its own: never the user's, and never another test
    process's (a cluster's credentials and the record `moebus status` reads live there)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["MOEBUS_HOME"] = tempfile.mkdtemp(prefix=f"moebus-home-{worker}-")


@contextmanager
def nats_server(store: Path) -> Iterator[str]:
    """A nats-server with JetStream on a free port, for as long as the block runs."""
    port = free_port()
    proc = start_nats(port, store)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {f: build_checkpoint(f, root / f"tiny-{f}") for f in FAMILIES}


@pytest.fixture(scope="session")
def tool_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints with a byte-level BPE and a chat template with tools, by tool-call format:
    "json_tools" (Qwen3's <tool_call> JSON, <think>) and "mistral" ([TOOL_CALLS]name[ARGS]{...})."""
    root = tmp_path_factory.mktemp("tool-checkpoints")
    return {style: build_checkpoint(family, root / f"tiny-{family}-{style}", tokenizer=style)
            for style, family in (("json_tools", "qwen3_moe"), ("mistral", "mixtral"))}


@pytest.fixture(scope="session")
def moebus_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moebus-home")

"""`moebus up --model ORG/NAME` serves from the Hugging Face cache with HF_HUB_OFFLINE=1: the
cache filled through huggingface_hub from a stand-in for the Hub, which is gone by then."""

from __future__ import annotations

import time
from pathlib import Path

from openai import OpenAI

from tests.cluster import Up
from tests.hub_standin import HubStandIn, hub_env, resolve, sharded_repo

REPO = "org/tiny-mixtral"


def test_up_serves_a_repo_id_from_the_cache_offline(checkpoints: dict[str, Path], tmp_path: Path):
    with HubStandIn() as hub:
        hub.repos[REPO] = sharded_repo(checkpoints["mixtral"], [range(0, 4), range(4, 8)])
        filled = resolve(REPO, hub_env(hub.url, tmp_path))
        assert filled.returncode == 0, filled.stderr
        env = hub_env(hub.url, tmp_path, offline=True)  # and the stand-in stops: no network at all
    with Up(REPO, 1, tmp_path, env=env) as up:  # a repo id, as a user types it
        with OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0) as client:
            reply = client.chat.completions.create(model=REPO, messages=[{"role": "user", "content": "w1 w2"}],
                                                   max_tokens=4, temperature=0)
        ready = f'moebus is ready: {up.url}  (model "{REPO}")'
        deadline = time.monotonic() + 30  # the launcher prints it after its own health check
        while ready not in (log := up.log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert reply.model == REPO and reply.choices[0].message.content, reply
    assert reply.usage.completion_tokens == 4
    assert ready in log
    assert "moebus: downloading" not in log

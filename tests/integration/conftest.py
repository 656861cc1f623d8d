"""Clusters that more than one test module uses: started once per session, on first use."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Up

# As Qwen3's thinking models do: the generation prompt opens the think block, so what the model
# writes first is reasoning, until it closes the block (never, for random weights).
OPENS_THINKING = ("{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                  "{%- endif %}")


def thinking_model(src: Path, dst: Path) -> Path:
    """A copy of a json_tools checkpoint whose template starts every answer thinking, unless asked not to."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert OPENS_THINKING in cfg["chat_template"], "the json_tools template changed: update OPENS_THINKING"
    cfg["chat_template"] = cfg["chat_template"].replace(
        OPENS_THINKING, OPENS_THINKING.replace("{%- endif %}", "{%- else %}{{- '<think>\\n' }}{%- endif %}"))
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="session")
def tools_up(tool_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`moebus up` with 2 workers serving a thinking model with Qwen3's tool-call format."""
    root = tmp_path_factory.mktemp("tools-up")
    model = thinking_model(tool_checkpoints["json_tools"], root / "tiny-thinker")
    with Up(model, 2, root) as cluster:
        yield cluster

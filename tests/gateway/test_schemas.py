"""Request bodies: every string a client sends must be valid Unicode before it reaches the bus."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.gateway.schemas import ChatCompletionRequest, CompletionRequest, MessagesRequest

LONE = "\\ud800"  # as JSON escapes it: json.loads gives a str no UTF-8 encoder takes


@pytest.mark.parametrize(("model", "body"), [
    (ChatCompletionRequest, {"model": LONE, "messages": [{"role": "user", "content": "w1"}]}),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": LONE}]}),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user",
                                                         "content": [{"type": "text", "text": LONE}]}]}),
    (CompletionRequest, {"model": "m", "prompt": LONE}),
    (CompletionRequest, {"model": "m", "prompt": ["w1", LONE]}),
    (CompletionRequest, {"model": "m", "prompt": "w1", "stop": LONE}),
    (MessagesRequest, {"model": "m", "max_tokens": 1, "system": LONE, "messages": [{"role": "user", "content": "w1"}]}),
    (MessagesRequest, {"model": "m", "max_tokens": 1, "system": [{"type": "text", "text": LONE}],
                       "messages": [{"role": "user", "content": "w1"}]}),
])
def test_a_lone_surrogate_anywhere_is_invalid(model: type, body: dict):
    raw = json.dumps(body).replace("\\\\ud800", "\\ud800")  # undo json.dumps escaping the backslash
    with pytest.raises(ValidationError) as e:
        model.model_validate(json.loads(raw))
    assert any("surrogate" in err["msg"] or "unicode" in err["msg"] for err in e.value.errors())


def test_a_whole_surrogate_pair_is_fine():
    body = json.loads('{"model": "m", "prompt": "w1 \\ud83d\\ude00", "stop": ["\\u00e9"]}')
    assert CompletionRequest.model_validate(body).prompt == "w1 \U0001F600"

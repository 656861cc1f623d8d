"""What a sequence's text is: the answer, the thinking before it, and tool calls, split with
mlx-lm's text state machine and parsed with the tool parser mlx-lm picks for the tokenizer.

A call that does not parse is never dropped: it goes back into the answer as the model wrote
it, with a warning in the log.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine

from shared.logs import get_logger
from shared.messages import MAX_TOOL_CALLS, Tool, ToolCall

log = get_logger("output")


@dataclass
class Parts:
    text: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def machines(tokenizer: Any) -> dict[str, TextStateMachine]:
    """The state machines for the model's markers: "tools" for a chat with tools, "chat" for one
    without (its text is never taken for a call), "raw" for a plain completion (text as written)."""
    base: dict[str, list[tuple[str, str]]] = {"normal": []}
    if tokenizer.has_thinking:
        base["normal"].append((tokenizer.think_start, "reasoning"))
        base["reasoning"] = [(tokenizer.think_end, "normal")]
    tools = {k: list(v) for k, v in base.items()}
    if tokenizer.has_tool_calling:
        tools["normal"].append((tokenizer.tool_call_start, "tool"))
        if tokenizer.has_thinking:
            tools["reasoning"].append((tokenizer.tool_call_start, "tool"))
        tools["tool"] = [(tokenizer.tool_call_end, "normal")] if tokenizer.tool_call_end else []
    return {"raw": TextStateMachine({"normal": []}), "chat": TextStateMachine(base), "tools": TextStateMachine(tools)}


def initial_state(tokenizer: Any, prompt: list[int]) -> str:
    """'reasoning' when the prompt leaves a think block open (the template started it)."""
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        return "reasoning"
    return "normal"


class Splitter:
    """One sequence's text, fed as it is generated."""

    def __init__(self, machine: TextStateMachine, tokenizer: Any, tools: list[Tool] | None, initial: str) -> None:
        self.state = machine.make_state(initial)
        self.tokenizer = tokenizer
        self.tools = [t.rendered() for t in tools or []]
        self.call_text: str | None = None  # inside a tool call: its text so far
        self.calls = 0

    def feed(self, text: str) -> Parts:
        out = Parts()
        if not text:
            return out
        self.state, segments = TextStateMachine.split(self.state, text)
        for i, (state, piece) in enumerate(segments):
            if state == "tool":
                self.call_text = (self.call_text or "") + piece
                if i < len(segments) - 1:  # the machine left the call: it is complete
                    self._close(out, self.tokenizer.tool_call_end or "")
            elif state == "reasoning":
                out.reasoning += piece
            else:
                out.text += piece
        return out

    def finish(self) -> Parts:
        """What is held back at the end: text that looked like a marker, a call never closed
        (a format without an end marker, or one cut by max_tokens)."""
        out = Parts()
        self.state, rest, state = TextStateMachine.flush(self.state)
        if state == "tool" or self.call_text is not None:
            self.call_text = (self.call_text or "") + rest
            self._close(out, "")
        elif state == "reasoning":
            out.reasoning += rest
        else:
            out.text += rest
        return out

    def _close(self, out: Parts, end: str) -> None:
        """`end`: the end marker the model wrote, if it wrote one."""
        text, self.call_text = self.call_text or "", None
        calls = self._parse(text)
        if calls is None:
            out.text += f"{self.tokenizer.tool_call_start}{text}{end}"
        else:
            out.calls += calls

    def _parse(self, text: str) -> list[ToolCall] | None:
        try:
            parsed = self.tokenizer.tool_parser(text, self.tools)
            items = parsed if isinstance(parsed, list) else [parsed]
            calls = [ToolCall(id=str(c.get("id") or f"call_{uuid.uuid4().hex[:24]}"), name=c["name"],
                              arguments=_arguments(c.get("arguments", {})))
                     for c in items]
        except Exception as e:  # noqa: BLE001 - any parser failure: the text stays the answer's
            log.warning("a tool call did not parse; returned as text", error=repr(e)[:300], text=text[:300])
            return None
        if self.calls + len(calls) > MAX_TOOL_CALLS:
            log.warning("more tool calls than one answer carries; the rest returned as text", limit=MAX_TOOL_CALLS)
            return None
        self.calls += len(calls)
        return calls


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        json.loads(arguments)  # raises: not JSON
        return arguments
    return json.dumps(arguments, ensure_ascii=False)

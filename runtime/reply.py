"""A reply's text as its tokens arrive: stop strings cut it, Qwen2.5's tool calls are taken out of it, and
only what can no longer change is released, so a stream never shows text that a stop string or a tool
call later takes back.

Qwen2.5's chat template asks for tool calls as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
after any text; each closed block whose JSON names a function becomes a call (arguments as JSON text,
as OpenAI sends them). A block that is not such JSON, or never closes, stays in the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .stream import TextStream
from .tokenizer import TextTokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass
class Delta:
    content: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments as JSON text)


def parsed_call(block: str) -> tuple[str, str] | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest


class ReplyText:
    """Feed token ids with `push`, then call `finish`; each returns what became final, and `content` and
    `calls` add up the whole reply. With `tools`, text from the first `<tool_call>` on waits: closed blocks
    that are calls are released as they close, and if none is, the text is content after all. `prefix`:
    text the reply starts with that was put in the prompt (a forced call's opening). `stopped` turns true
    when a stop string ended the reply."""

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = (), tools: bool = False, prefix: str = ""):
        self.stream, self.stop, self.tools = TextStream(tokenizer), stop, tools
        self.text = prefix
        self.released = 0  # text[:released] was released as content or taken as calls
        self.content = ""
        self.calls: list[tuple[str, str]] = []
        self.stopped = False
        self.calling = bool(prefix)  # past the first <tool_call>

    def push(self, token: int) -> Delta:
        return self.advance(self.stream.push(token), final=False)

    def finish(self) -> Delta:
        return self.advance(self.stream.finish(), final=True)

    def advance(self, piece: str, final: bool) -> Delta:
        if self.stopped:
            return Delta()
        searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        cut = min((index for s in self.stop if (index := self.text.find(s, searched)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        delta = Delta()
        if self.tools and not self.calling and (start := self.text.find(OPEN, self.released)) >= 0:
            self.release(start, delta)
            self.calling = True
        if not self.calling:
            markers = (*self.stop, OPEN) if self.tools else self.stop
            self.release(len(self.text) - (0 if final else held_back(self.text, markers)), delta)
            return delta
        for match in BLOCK.finditer(self.text, self.released):
            if (call := parsed_call(match.group(1))) is None:
                break
            self.take(call, match.end(), delta)
        if final:
            rest = self.text[self.released :].strip()
            if rest.startswith(OPEN) and (call := parsed_call(rest.removeprefix(OPEN))) is not None:
                self.take(call, len(self.text), delta)  # a last call whose closing tag the stop token replaced
            elif not self.calls:
                self.release(len(self.text), delta)  # no call after all: it was text
        return delta

    def release(self, end: int, delta: Delta) -> None:
        piece = self.text[self.released : end] if end > self.released else ""
        self.content += piece
        delta.content += piece
        self.released = max(self.released, end)

    def take(self, call: tuple[str, str], end: int, delta: Delta) -> None:
        self.calls.append(call)
        delta.tool_calls.append(call)
        self.released = end

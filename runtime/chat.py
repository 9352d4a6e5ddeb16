"""The checkpoint's chat template, rendered the way transformers' apply_chat_template renders it.

Same Jinja2 setup as transformers (sandboxed, trim_blocks, lstrip_blocks, loop controls, a `tojson`
that keeps non-ASCII, `raise_exception`, `strftime_now`) and the same variables (messages, tools,
add_generation_prompt, and the special tokens of tokenizer_config.json). Templates are untrusted
code from a checkpoint, hence the sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import RuntimeInputError

Message = dict[str, Any]
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return environment.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self._template = compile_template(source)
        self._special_tokens = special_tokens or {}

    def render(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; template errors surface as RuntimeInputError."""
        if not messages:
            raise RuntimeInputError("a chat needs at least one message")
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self._special_tokens
            )
        except jinja2.exceptions.TemplateError as error:
            raise RuntimeInputError(f"the chat template failed: {error}") from error


def load_chat_template(artifact: Path, override: str | Path | None = None) -> ChatTemplate | None:
    """The template from `override` (a file), else chat_template.jinja, else tokenizer_config.json."""
    config_path = artifact / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise RuntimeInputError(f"chat template file {path} not found")
        return ChatTemplate(path.read_text(), special)
    if (artifact / "chat_template.jinja").is_file():
        return ChatTemplate((artifact / "chat_template.jinja").read_text(), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: use "default"
        source = next((entry["template"] for entry in source if entry.get("name") == "default"), None)
    return ChatTemplate(source, special) if source else None


def _token_text(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else token

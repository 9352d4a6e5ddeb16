"""The checkpoint's chat template, rendered the way transformers' apply_chat_template renders it.

Same Jinja2 setup as transformers (sandboxed, trim_blocks, lstrip_blocks, loop controls, a `tojson`
that keeps non-ASCII, `raise_exception`, `strftime_now`) and the same variables (messages, tools,
add_generation_prompt, and the special tokens of tokenizer_config.json). Templates are untrusted
code from a checkpoint, hence the sandbox and the limits of runtime/template_limits.py; every failure
is a RuntimeInputError naming where the template came from.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext

from artifact import contract

from .errors import RuntimeInputError
from .template_limits import BoundedEnvironment, TemplateLimitExceeded, TemplateLimits, compile_bounded, render_bounded

Message = dict[str, Any]
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_template(source: str, limits: TemplateLimits = TemplateLimits()) -> jinja2.Template:
    environment = BoundedEnvironment(limits, trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = environment.checked(_tojson)
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return compile_bounded(environment, source)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to; `origin` names where the
    template came from in every error."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "(inline source)",
                 limits: TemplateLimits = TemplateLimits()):
        self.source, self.origin, self.limits = source, origin, limits
        try:
            self._template = compile_template(source, limits)
        except jinja2.TemplateSyntaxError as error:
            raise RuntimeInputError(f"the chat template in {origin} cannot be used: line {error.lineno}: "
                                    f"{error.message}; fix it or pass another with --chat-template FILE") from error
        self._special_tokens = special_tokens or {}

    def render(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; every failure of the template is a RuntimeInputError."""
        if not messages:
            raise RuntimeInputError("a chat needs at least one message")
        try:
            return render_bounded(self._template, self.limits, messages=messages, tools=tools,
                                  add_generation_prompt=add_generation_prompt, **self._special_tokens)
        except TemplateLimitExceeded as error:
            raise RuntimeInputError(f"the chat template in {self.origin} was stopped: {error} (limits: "
                                    f"--template-seconds, --template-max-chars)") from error
        except RecursionError as error:
            raise RuntimeInputError(f"the chat template in {self.origin} recursed too deeply") from error
        except Exception as error:  # the template is untrusted code: anything it raises is its failure
            raise RuntimeInputError(f"the chat template in {self.origin} failed: {type(error).__name__}: "
                                    f"{error}") from error


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """A JSON object from the artifact ({} for a missing optional file); RuntimeInputError when unreadable."""
    if not path.is_file():
        if required:
            raise RuntimeInputError(f"{path} is missing; re-export the artifact")
        return {}
    try:
        return contract.read_json_object(path)
    except contract.NotAJsonObject as error:
        raise RuntimeInputError(f"{error}; re-export the artifact") from error


def read_template(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise RuntimeInputError(f"the chat template {path} is not UTF-8 text ({error}); save it as UTF-8") from error
    except OSError as error:
        raise RuntimeInputError(f"cannot read the chat template {path}: {error.strerror}") from error


def load_chat_template(artifact: Path, override: str | Path | None = None,
                       limits: TemplateLimits = TemplateLimits()) -> ChatTemplate | None:
    """The template from `override` (a file), else chat_template.jinja, else tokenizer_config.json."""
    config_path = artifact / contract.TOKENIZER_CONFIG_FILE
    config = read_json(config_path, required=False)
    special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise RuntimeInputError(f"chat template file {path} not found")
        return ChatTemplate(read_template(path), special, str(path), limits)
    if (artifact / contract.CHAT_TEMPLATE_FILE).is_file():
        path = artifact / contract.CHAT_TEMPLATE_FILE
        return ChatTemplate(read_template(path), special, str(path), limits)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: use "default"
        source = next((entry.get("template") for entry in source if isinstance(entry, dict) and entry.get("name") == "default"), None)
    if source is not None and not isinstance(source, str):
        raise RuntimeInputError(f"{config_path}: chat_template is a {type(source).__name__}, not text")
    return ChatTemplate(source, special, f"{config_path} (chat_template)", limits) if source else None


def _token_text(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else token
